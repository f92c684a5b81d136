//! The commit rule: which of a step's candidate positions become fixed tokens.
//!
//! The default (LLaDA `generate()`) commits the `k` most confident candidates. Order is total
//! and deterministic: higher confidence first, ties to the lower position, NaN below every
//! number (including −∞). Other rules (confidence threshold, Fast-dLLM factor) belong here too,
//! as further functions over the same `(position, confidence)` candidates.

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
}
