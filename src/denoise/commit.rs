//! The commit rule: which of a step's candidate positions become fixed tokens.
//!
//! The default (LLaDA `generate()`) commits the `k` most confident candidates. Order is total
//! and deterministic: higher confidence first, ties to the lower position, NaN below every
//! number (including −∞). The parallel-decoding rules of Fast-dLLM are further functions over the
//! same `(position, confidence)` candidates: [`threshold`] and [`factor`]; dInfer's
//! [`hierarchy`] is another. All commit at least `min_k` (≥ 1) candidates so that a block always
//! progresses.

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

/// dInfer's hierarchical rule (`HierarchyDecoder`): the candidates split into segments, runs of
/// adjacent positions; each segment's most confident candidate is committed when its confidence
/// is above `low` (every one tied at the segment's maximum), every candidate above `high` too
/// (when given), and at least the `min_k` best (at least one when there are candidates). Both
/// comparisons are strict, as dInfer's. A segment is what parallel decoding is most likely to
/// get wrong together (neighbours predicted independently), so it commits one at a time unless
/// a position is very sure. Indices in rank order. A NaN confidence never commits by the
/// segment or `high` tests and ranks last (dInfer's torch `amax`/`argmax` would take a NaN as the
/// maximum; here a NaN row is never preferred).
pub fn hierarchy(
    candidates: &[Candidate],
    high: Option<f64>,
    low: f64,
    min_k: usize,
) -> Vec<usize> {
    let n = candidates.len();
    let mut take = vec![false; n];
    let mut by_position: Vec<usize> = (0..n).collect();
    by_position.sort_by_key(|&i| candidates[i].position);
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n
            && candidates[by_position[end]].position
                == candidates[by_position[end - 1]].position + 1
        {
            end += 1;
        }
        let segment = &by_position[start..end];
        // NaN never is the maximum (`f64::max` skips it) nor above `low`.
        let best = segment
            .iter()
            .fold(f64::NEG_INFINITY, |m, &i| m.max(candidates[i].confidence));
        for &i in segment {
            let c = candidates[i].confidence;
            if c == best && c > low {
                take[i] = true;
            }
        }
        start = end;
    }
    if let Some(h) = high {
        for (i, c) in candidates.iter().enumerate() {
            if c.confidence > h {
                take[i] = true;
            }
        }
    }
    let ranked = top_k(candidates, n);
    for &i in ranked.iter().take(min_k.max(1)) {
        take[i] = true;
    }
    ranked.into_iter().filter(|&i| take[i]).collect()
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
    fn hierarchy_hand_cases() {
        // Positions 10..=15 then a gap, 20, 21: segments {10..15} and {20, 21}.
        let mut c = cands(&[0.5, 0.3, 0.6, 0.2, 0.95, 0.1]);
        c.push(Candidate {
            position: 20,
            confidence: 0.45,
        });
        c.push(Candidate {
            position: 21,
            confidence: 0.35,
        });
        // Low 0.4: each segment's best (index 4 with 0.95; index 6 with 0.45).
        assert_eq!(hierarchy(&c, None, 0.4, 1), vec![4, 6]);
        // Low 0.5: the second segment's best (0.45) is not above it.
        assert_eq!(hierarchy(&c, None, 0.5, 1), vec![4]);
        // High 0.55 adds index 2 (0.6) beside its segment's best; strict: 0.5 is not above 0.5.
        assert_eq!(hierarchy(&c, Some(0.55), 0.4, 1), vec![4, 2, 6]);
        assert_eq!(hierarchy(&c, Some(0.5), 0.9, 1), vec![4, 2]);
        // Nothing passes: the single best anyway; min_k lifts the count in rank order.
        assert_eq!(hierarchy(&c, None, 0.99, 1), vec![4]);
        assert_eq!(hierarchy(&c, None, 0.99, 3), vec![4, 2, 0]);
        // Ties at a segment's maximum all commit; NaN never does.
        let c = cands(&[0.7, f64::NAN, 0.7, 0.1]);
        assert_eq!(hierarchy(&c, None, 0.4, 1), vec![0, 2]);
        let c = cands(&[f64::NAN, f64::NAN]);
        assert_eq!(hierarchy(&c, None, 0.4, 1), vec![0]);
        assert!(hierarchy(&[], Some(0.5), 0.1, 1).is_empty());
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

    #[test]
    fn hierarchy_matches_its_naive_definition() {
        let levels = [f64::NAN, 0.0, 0.3, 0.5, 0.7, 0.9];
        for seed in 0..300u64 {
            let n = (seed % 11) as usize;
            // Positions with random gaps (0 or 1 skipped), so segments vary.
            let mut pos = 3;
            let c: Vec<Candidate> = (0..n)
                .map(|i| {
                    pos += 1 + (crate::denoise::rng::bits(seed, 2, i as u64, 0) % 2) as usize;
                    Candidate {
                        position: pos,
                        confidence: levels
                            [(crate::denoise::rng::bits(seed, 3, i as u64, 0) % 6) as usize],
                    }
                })
                .collect();
            let order = naive(&c, n);
            // A candidate's segment: walk left and right while the positions stay adjacent.
            let segment_max = |i: usize| {
                let mut m = c[i].confidence;
                let (mut l, mut r) = (i, i);
                while l > 0 && c[l - 1].position + 1 == c[l].position {
                    l -= 1;
                    m = m.max(c[l].confidence);
                }
                while r + 1 < n && c[r].position + 1 == c[r + 1].position {
                    r += 1;
                    m = m.max(c[r].confidence);
                }
                m
            };
            for (high, low, min_k) in [(None, 0.4, 1), (Some(0.8), 0.4, 1), (Some(0.2), 0.6, 3)] {
                let want: Vec<usize> = order
                    .iter()
                    .enumerate()
                    .filter(|&(rank, &i)| {
                        let x = c[i].confidence;
                        rank < min_k
                            || high.is_some_and(|h| x > h)
                            || (x > low && x == segment_max(i))
                    })
                    .map(|(_, &i)| i)
                    .collect();
                assert_eq!(hierarchy(&c, high, low, min_k), want, "{c:?}");
            }
        }
    }
}
