//! The commit rule: which of a step's candidate positions become fixed tokens.
//!
//! The default (LLaDA `generate()`) commits the `k` most confident candidates. Order is total
//! and deterministic: higher confidence first, ties to the lower position, NaN below every
//! number (including −∞). The parallel-decoding rules of Fast-dLLM are further functions over the
//! same `(position, confidence)` candidates: [`threshold`] and [`factor`]; both commit at least
//! `min_k` (≥ 1) candidates so that a block always progresses.

use std::cmp::Ordering;

/// One position competing for a commit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub position: usize,
    pub confidence: f64,
}

/// Ranking order: `Less` means `a` is committed before `b`.
pub fn rank_order(a: &Candidate, b: &Candidate) -> Ordering {
    let by_confidence = match (a.confidence.is_nan(), b.confidence.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        // Neither is NaN, so partial_cmp is total here.
        (false, false) => b
            .confidence
            .partial_cmp(&a.confidence)
            .unwrap_or(Ordering::Equal),
    };
    by_confidence.then(a.position.cmp(&b.position))
}

/// Indices (into `candidates`) of the `k` best under [`rank_order`], in rank order.
/// `k` larger than the number of candidates selects them all.
pub fn top_k(candidates: &[Candidate], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..candidates.len()).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |&i: &usize, &j: &usize| rank_order(&candidates[i], &candidates[j]);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// Fast-dLLM threshold rule: every candidate with confidence ≥ `t`, and at least the `min_k`
/// best (at least one when there are candidates). Indices in rank order.
pub fn threshold(candidates: &[Candidate], t: f64, min_k: usize) -> Vec<usize> {
    let ranked = top_k(candidates, candidates.len());
    let n = ranked
        .iter()
        .take_while(|&&i| candidates[i].confidence >= t)
        .count();
    let n = n.max(min_k.max(1)).min(ranked.len());
    ranked[..n].to_vec()
}

/// Fast-dLLM factor rule: with confidences ranked `c1 ≥ c2 ≥ …`, the largest `n` such that
/// `c_i ≥ 1 − f / (i + 1)` for every `i ≤ n` (1-based `i`), and at least `min_k` (at least one
/// when there are candidates). Indices in rank order.
pub fn factor(candidates: &[Candidate], f: f64, min_k: usize) -> Vec<usize> {
    let ranked = top_k(candidates, candidates.len());
    let n = ranked
        .iter()
        .enumerate()
        .take_while(|&(i, &c)| candidates[c].confidence >= 1.0 - f / ((i + 1) as f64 + 1.0))
        .count();
    let n = n.max(min_k.max(1)).min(ranked.len());
    ranked[..n].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(conf: &[f64]) -> Vec<Candidate> {
        conf.iter()
            .enumerate()
            .map(|(i, &c)| Candidate {
                position: 10 + i,
                confidence: c,
            })
            .collect()
    }

    /// Naive reference: repeatedly take the best remaining by a linear scan.
    fn naive(c: &[Candidate], k: usize) -> Vec<usize> {
        let mut left: Vec<usize> = (0..c.len()).collect();
        let mut out = Vec::new();
        while out.len() < k && !left.is_empty() {
            let mut best = 0;
            for j in 1..left.len() {
                let (x, y) = (c[left[j]], c[left[best]]);
                let better = match (x.confidence.is_nan(), y.confidence.is_nan()) {
                    (false, true) => true,
                    (true, _) => false,
                    (false, false) => {
                        x.confidence > y.confidence
                            || (x.confidence == y.confidence && x.position < y.position)
                    }
                };
                if better {
                    best = j;
                }
            }
            out.push(left.remove(best));
        }
        out
    }

    #[test]
    fn ties_go_to_lower_position_and_nan_is_last() {
        let c = cands(&[0.5, 0.9, f64::NAN, 0.9, f64::NEG_INFINITY, 0.1]);
        assert_eq!(top_k(&c, 1), vec![1]);
        assert_eq!(top_k(&c, 2), vec![1, 3]);
        assert_eq!(top_k(&c, 4), vec![1, 3, 0, 5]);
        assert_eq!(top_k(&c, 6), vec![1, 3, 0, 5, 4, 2]);
        assert_eq!(top_k(&c, 99).len(), 6);
        assert!(top_k(&c, 0).is_empty());
        assert!(top_k(&[], 3).is_empty());
    }

    #[test]
    fn matches_naive_selection() {
        let levels = [f64::NAN, f64::NEG_INFINITY, 0.0, 0.25, 0.5, 1.0];
        for seed in 0..300u64 {
            let n = (seed % 13) as usize;
            let conf: Vec<f64> = (0..n)
                .map(|i| levels[(crate::denoise::rng::bits(seed, 0, i as u64, 0) % 6) as usize])
                .collect();
            let c = cands(&conf);
            for k in 0..=n + 1 {
                assert_eq!(
                    top_k(&c, k),
                    naive(&c, k),
                    "seed {seed} k {k} conf {conf:?}"
                );
            }
        }
    }

    #[test]
    fn threshold_hand_cases() {
        let c = cands(&[0.5, 0.95, f64::NAN, 0.9, 0.2]);
        assert_eq!(threshold(&c, 0.9, 1), vec![1, 3]);
        assert_eq!(threshold(&c, 0.91, 1), vec![1]);
        // Nothing reaches the threshold: the single best anyway.
        assert_eq!(threshold(&c, 0.99, 0), vec![1]);
        // min_k lifts the count.
        assert_eq!(threshold(&c, 0.99, 3), vec![1, 3, 0]);
        // NaN never passes a threshold; a low threshold takes all numbers.
        assert_eq!(threshold(&c, 0.0, 1), vec![1, 3, 0, 4]);
        assert_eq!(threshold(&c, 0.0, 9).len(), 5);
        assert!(threshold(&[], 0.5, 1).is_empty());
    }

    #[test]
    fn factor_hand_cases() {
        // F = 1: bounds 1 − 1/2 = 0.5, 1 − 1/3 = 0.667, 1 − 1/4 = 0.75, 1 − 1/5 = 0.8.
        let c = cands(&[0.7, 0.9, 0.76, 0.6]);
        // Ranked 0.9 ≥ 0.5, 0.76 ≥ 0.667, 0.7 < 0.75 → 2.
        assert_eq!(factor(&c, 1.0, 1), vec![1, 2]);
        // F = 1.2: bounds 0.4, 0.6, 0.7, 0.76 → 0.9, 0.76, 0.7 pass, 0.6 < 0.76 → 3.
        assert_eq!(factor(&c, 1.2, 1), vec![1, 2, 0]);
        // Tiny F: nothing passes → the best alone; min_k lifts it.
        assert_eq!(factor(&c, 0.01, 1), vec![1]);
        assert_eq!(factor(&c, 0.01, 2), vec![1, 2]);
        // "For all i ≤ n": a later candidate passing its bound does not count after a failure.
        let c = cands(&[0.9, 0.3, 0.29]);
        // F = 1: 0.9 ≥ 0.5, 0.3 < 0.667 → 1, although nothing else matters.
        assert_eq!(factor(&c, 1.0, 1), vec![0]);
        // Huge F takes everything.
        assert_eq!(factor(&c, 10.0, 1), vec![0, 1, 2]);
        assert!(factor(&[], 1.0, 1).is_empty());
    }

    #[test]
    fn parallel_rules_match_naive_definitions() {
        let levels = [f64::NAN, 0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0];
        for seed in 0..300u64 {
            let n = (seed % 11) as usize;
            let conf: Vec<f64> = (0..n)
                .map(|i| levels[(crate::denoise::rng::bits(seed, 1, i as u64, 0) % 8) as usize])
                .collect();
            let c = cands(&conf);
            let order = naive(&c, n);
            for &t in &[0.0, 0.5, 0.85, 1.0] {
                let mut want: Vec<usize> = order
                    .iter()
                    .copied()
                    .filter(|&i| c[i].confidence >= t)
                    .collect();
                if want.is_empty() && n > 0 {
                    want.push(order[0]);
                }
                assert_eq!(threshold(&c, t, 1), want, "t {t} {conf:?}");
            }
            for &f in &[0.1, 0.5, 1.0, 2.0] {
                let mut m = 0;
                while m < n && c[order[m]].confidence >= 1.0 - f / (m as f64 + 2.0) {
                    m += 1;
                }
                let m = m.max(1).min(n);
                assert_eq!(factor(&c, f, 1), order[..m].to_vec(), "f {f} {conf:?}");
            }
        }
    }
}
