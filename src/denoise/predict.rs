//! Per-position prediction: the candidate token `x0` and its confidence, from one logits row.
//!
//! Semantics follow LLaDA's reference `generate()`:
//! - candidates are ids `< vocab_size` other than the mask token (the mask is never committed);
//! - temperature 0: `x0 = argmax` of the logits; temperature `T > 0`: Gumbel-max in float64,
//!   `argmax_j l_j − T·ln(−ln u_j)` with `u_j` from [`rng::uniform`]`(seed, step, position, j)`;
//!   ties go to the lower id;
//! - `low-confidence`: confidence = softmax probability of `x0` over the whole row (float64,
//!   noise-free logits, as the reference); `random`: confidence = `rng::uniform(seed, step,
//!   position, RANDOM_CONFIDENCE_INDEX)`;
//! - `margin` (Dream `topk_margin`): `p1 − p2`, the two largest softmax probabilities of the
//!   whole row (repeats count: a tied maximum gives 0); `entropy` (Dream `entropy`): `Σ p ln p`
//!   over the whole row, ≤ 0, larger = more confident. Both are noise-free, like low-confidence.
//!
//! The CUDA sampling kernels implement the same function (all four modes) and are tested
//! against this one.
//!
//! [`SampleFilter`] (top-k / top-p) narrows the candidates before the Gumbel draw; it is applied
//! on the host only ([`predict_row_filtered`]) and never changes the confidence, which stays the
//! function of the unfiltered row above. A position constraint
//! ([`Constraints`]) is different: it narrows the row itself, so the confidence is that of
//! the distribution over the allowed ids.

use super::constraint::Constraints;
use super::credit::{CreditView, Deposit};
use super::rng;
use rayon::prelude::*;

/// How confidence is scored when choosing which positions to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remasking {
    /// Softmax probability of the chosen token (LLaDA `low_confidence`).
    LowConfidence,
    /// A uniform random number per position (LLaDA `random`).
    Random,
    /// `p1 − p2` of the row's softmax (Dream `topk_margin`).
    Margin,
    /// `Σ p ln p` of the row's softmax (Dream `entropy`; larger = more confident).
    Entropy,
}

/// Index used for the random-confidence draw, distinct from every vocabulary index.
pub const RANDOM_CONFIDENCE_INDEX: u64 = u64::MAX;

/// Everything a backend needs to turn a logits row into a [`Prediction`].
#[derive(Debug, Clone, PartialEq)]
pub struct PredictRule {
    pub temperature: f64,
    pub remasking: Remasking,
    pub seed: u64,
    /// Global step index (keys the random draws).
    pub step: u64,
    pub mask_token: u32,
    /// Candidate ids are `0..vocab_size`.
    pub vocab_size: usize,
}

impl PredictRule {
    /// The greedy rule of `cfg`'s model at global step `step`: the argmax, ranked by its
    /// probability (temperature 0, low-confidence remasking).
    pub fn greedy(cfg: &crate::config::ModelConfig, step: u64) -> PredictRule {
        PredictRule {
            temperature: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            step,
            mask_token: cfg.mask_token_id,
            vocab_size: cfg.vocab_size,
        }
    }
}

/// The candidate for one position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub token: u32,
    pub confidence: f64,
}

/// Predicts one position from its logits row.
pub fn predict_row(row: &[f32], position: usize, rule: &PredictRule) -> Prediction {
    let n = rule.vocab_size.min(row.len());
    let mask = rule.mask_token as usize;
    let mut best = usize::MAX;
    let mut best_score = f64::NEG_INFINITY;
    for (j, &l) in row[..n].iter().enumerate() {
        if j == mask {
            continue;
        }
        let l = l as f64;
        let score = if rule.temperature > 0.0 {
            let u = rng::uniform(rule.seed, rule.step, position as u64, j as u64);
            rng::gumbel_perturb(l, rule.temperature, u)
        } else {
            l
        };
        // Strict `>` keeps the lowest id on ties; the first candidate always wins over -inf/NaN.
        if score > best_score || best == usize::MAX {
            best = j;
            best_score = score;
        }
    }
    let confidence = match rule.remasking {
        Remasking::LowConfidence => softmax_prob(row, best),
        Remasking::Random => rng::uniform(
            rule.seed,
            rule.step,
            position as u64,
            RANDOM_CONFIDENCE_INDEX,
        ),
        Remasking::Margin => softmax_margin(row),
        Remasking::Entropy => neg_entropy(row),
    };
    Prediction {
        token: best as u32,
        confidence,
    }
}

/// Softmax probability of entry `idx` over the whole row, in float64.
pub fn softmax_prob(row: &[f32], idx: usize) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    (row[idx] as f64 - max).exp() / sum
}

/// `p1 − p2`: the two largest softmax probabilities of the whole row, in float64 (NaN entries
/// ignored for the top two; a repeated maximum gives 0). A row of one entry gives `p1`.
pub fn softmax_margin(row: &[f32]) -> f64 {
    let (mut a1, mut a2) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &x in row {
        let x = x as f64;
        if x > a1 {
            a2 = a1;
            a1 = x;
        } else if x > a2 {
            a2 = x;
        }
    }
    let max = a1;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    ((a1 - max).exp() - (a2 - max).exp()) / sum
}

/// `Σ p ln p` of the whole row's softmax, in float64 (≤ 0; 0 for a one-hot distribution,
/// `−ln n` for a uniform one over `n` entries). Zero-probability entries contribute 0; a NaN
/// logit makes it NaN, as it makes the other confidences (and the CUDA kernel's) NaN, so the
/// commit ranks the row last rather than as the most confident.
pub fn neg_entropy(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter()
        .map(|&x| {
            let p = (x as f64 - max).exp() / sum;
            if p > 0.0 || p.is_nan() {
                p * p.ln()
            } else {
                0.0
            }
        })
        .sum()
}

/// Top-k / top-p narrowing of the candidates before the Gumbel draw (Dream order: the
/// temperature-scaled candidate distribution is cut by `top_p` first, then by `top_k`).
///
/// Only sampling (`temperature > 0`) is affected: greedy decoding always picks the most likely
/// candidate, which both filters keep. The default keeps every candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleFilter {
    /// Keep the `top_k` most likely candidates (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely candidates whose probability (softmax of
    /// `logit / T` over the candidates) sums to at least `top_p`; always at least one.
    /// `1.0` = off.
    pub top_p: f64,
}

impl Default for SampleFilter {
    fn default() -> Self {
        SampleFilter {
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SampleFilter {
    /// Whether the filter can change a prediction.
    pub fn is_active(&self) -> bool {
        self.top_k > 0 || self.top_p < 1.0
    }

    /// Candidate ids of `row` (under `rule`) that survive the filter, in decreasing logit order
    /// (ties to the lower id); `None` when the filter keeps every candidate.
    pub fn allowed(&self, row: &[f32], rule: &PredictRule) -> Option<Vec<usize>> {
        if !self.is_active() || rule.temperature <= 0.0 {
            return None;
        }
        let n = rule.vocab_size.min(row.len());
        let mask = rule.mask_token as usize;
        let mut ids: Vec<usize> = (0..n).filter(|&j| j != mask && !row[j].is_nan()).collect();
        ids.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let mut keep = ids.len();
        if self.top_p < 1.0 && !ids.is_empty() {
            let t = rule.temperature;
            let top = row[ids[0]] as f64 / t;
            let w: Vec<f64> = ids
                .iter()
                .map(|&j| (row[j] as f64 / t - top).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            keep = ids.len();
            for (i, wi) in w.iter().enumerate() {
                acc += wi / total;
                if acc >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.top_k > 0 {
            keep = keep.min(self.top_k);
        }
        ids.truncate(keep.max(1));
        Some(ids)
    }
}

/// [`predict_row`] with the candidates narrowed by `filter` (no change when it is inactive or
/// the rule is greedy). The confidence is the same function of the row as in [`predict_row`].
pub fn predict_row_filtered(
    row: &[f32],
    position: usize,
    rule: &PredictRule,
    filter: &SampleFilter,
) -> Prediction {
    let base = predict_row(row, position, rule);
    let Some(allowed) = filter.allowed(row, rule) else {
        return base;
    };
    let mut best = usize::MAX;
    let mut best_score = f64::NEG_INFINITY;
    let mut sorted = allowed;
    sorted.sort_unstable();
    for &j in &sorted {
        let u = rng::uniform(rule.seed, rule.step, position as u64, j as u64);
        let score = rng::gumbel_perturb(row[j] as f64, rule.temperature, u);
        if score > best_score || best == usize::MAX {
            best = j;
            best_score = score;
        }
    }
    let confidence = match rule.remasking {
        Remasking::LowConfidence => softmax_prob(row, best),
        _ => base.confidence,
    };
    Prediction {
        token: best as u32,
        confidence,
    }
}

/// Predicts one position per entry of `rows`/`positions`: row `rows[i]` of the row-major logits
/// (row width `width`) gives the prediction for canvas position `positions[i]` (which keys the
/// random draws). Full-canvas logits use `rows == positions`; logits of only the queried
/// positions use `rows = 0..n`.
pub fn predict_rows(
    logits: &[f32],
    width: usize,
    rows: &[usize],
    positions: &[usize],
    rule: &PredictRule,
) -> Vec<Prediction> {
    assert_eq!(rows.len(), positions.len(), "one logits row per position");
    rows.par_iter()
        .zip(positions.par_iter())
        .map(|(&r, &q)| predict_row(&logits[r * width..(r + 1) * width], q, rule))
        .collect()
}

/// [`predict_rows`] for logits that hold only the queried rows, in order: row `i` predicts
/// `queries[i]`.
pub fn predict_query_rows(
    logits: &[f32],
    width: usize,
    queries: &[usize],
    rule: &PredictRule,
) -> Vec<Prediction> {
    let rows: Vec<usize> = (0..queries.len()).collect();
    predict_rows(logits, width, &rows, queries, rule)
}

/// Host prediction of the queried rows: row `i` of the row-major `logits` (row width `width`)
/// predicts `queries[i]`, narrowed to its allowed ids when `constraints` restricts it (see
/// [`super::constraint`]), fused with its trace credit when `credit` is given (see
/// [`super::credit`]), then predicted with `filter`. Also gives each row's credit deposit
/// (empty without credit), for the session to store when it applies the step.
pub fn predict_rows_filtered(
    logits: &[f32],
    width: usize,
    queries: &[usize],
    rule: &PredictRule,
    filter: &SampleFilter,
    constraints: &Constraints,
    credit: Option<&CreditView>,
) -> (Vec<Prediction>, Vec<Deposit>) {
    assert_eq!(
        logits.len(),
        queries.len() * width,
        "one logits row per query"
    );
    let rows: Vec<(Prediction, Option<Deposit>)> = queries
        .par_iter()
        .enumerate()
        .map(|(r, &q)| {
            let row = constraints.row_for(q, &logits[r * width..(r + 1) * width]);
            match credit {
                Some(c) => {
                    let (fused, d) = c.fuse(q, &row, rule.mask_token, rule.vocab_size);
                    (predict_row_filtered(&fused, q, rule, filter), Some(d))
                }
                None => (predict_row_filtered(&row, q, rule, filter), None),
            }
        })
        .collect();
    let (preds, deposits): (Vec<Prediction>, Vec<Option<Deposit>>) = rows.into_iter().unzip();
    (preds, deposits.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(t: f64, remasking: Remasking) -> PredictRule {
        PredictRule {
            temperature: t,
            remasking,
            seed: 1,
            step: 0,
            mask_token: 2,
            vocab_size: 5,
        }
    }

    #[test]
    fn greedy_skips_mask_and_padding_and_scores_softmax() {
        // id 2 is the mask (largest logit), id 5 is embedding padding beyond vocab_size.
        let row = [0.0f32, 1.0, 9.0, 1.0, -1.0, 20.0];
        let p = predict_row(&row, 0, &rule(0.0, Remasking::LowConfidence));
        assert_eq!(p.token, 1, "tie between ids 1 and 3 goes to the lower id");
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((p.confidence - 1f64.exp() / z).abs() < 1e-15);
    }

    #[test]
    fn random_confidence_is_the_keyed_uniform() {
        let row = [0.0f32, 1.0, 0.0, 3.0, 0.0];
        let p = predict_row(&row, 4, &rule(0.0, Remasking::Random));
        assert_eq!(p.token, 3);
        assert_eq!(p.confidence, rng::uniform(1, 0, 4, RANDOM_CONFIDENCE_INDEX));
    }

    #[test]
    fn gumbel_sampling_follows_the_distribution() {
        // Logits ln(0.1), ln(0.6), mask, ln(0.3): at T=1 Gumbel-max samples softmax over the candidates.
        let row = [0.1f32.ln(), 0.6f32.ln(), 50.0, 0.3f32.ln()];
        let mut counts = [0usize; 4];
        let n = 20000;
        for step in 0..n {
            let r = PredictRule {
                step,
                vocab_size: 4,
                ..rule(1.0, Remasking::LowConfidence)
            };
            counts[predict_row(&row, 0, &r).token as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        for (id, p) in [(0, 0.1), (1, 0.6), (3, 0.3)] {
            let f = counts[id] as f64 / n as f64;
            assert!((f - p).abs() < 0.015, "id {id}: {f} vs {p}");
        }
    }

    #[test]
    fn margin_and_entropy_hand_cases() {
        // Probabilities 0.5, 0.3, 0.2 (as logits ln p).
        let row = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        assert!((softmax_margin(&row) - 0.2).abs() < 1e-7);
        let want = 0.5 * 0.5f64.ln() + 0.3 * 0.3f64.ln() + 0.2 * 0.2f64.ln();
        assert!((neg_entropy(&row) - want).abs() < 1e-7);
        // Sign: a peaked distribution scores higher (closer to 0) than a flat one.
        let peaked = [10.0f32, 0.0, 0.0, 0.0];
        let flat = [1.0f32, 1.0, 1.0, 1.0];
        assert!(neg_entropy(&peaked) > neg_entropy(&flat));
        assert!((neg_entropy(&flat) + 4f64.ln()).abs() < 1e-12);
        assert!(neg_entropy(&peaked) <= 0.0);
        // A NaN logit: NaN, like the other confidences (never the most confident 0).
        assert!(neg_entropy(&[1.0, f32::NAN, 3.0]).is_nan());
        assert!(softmax_prob(&[1.0, f32::NAN, 3.0], 2).is_nan());
        // A tied maximum has zero margin; repeats count.
        assert_eq!(softmax_margin(&[2.0, 2.0, 0.0]), 0.0);
        // The margin is over the whole row: the mask id (index 2) takes part, as in the kernel.
        let r = PredictRule {
            vocab_size: 3,
            ..rule(0.0, Remasking::Margin)
        };
        let p = predict_row(&[1.0, 0.0, 3.0], 0, &r);
        assert_eq!(p.token, 0);
        let z = 1f64.exp() + 1.0 + 3f64.exp();
        assert!((p.confidence - (3f64.exp() - 1f64.exp()) / z).abs() < 1e-12);
        let r = PredictRule {
            vocab_size: 3,
            ..rule(0.0, Remasking::Entropy)
        };
        assert_eq!(
            predict_row(&[1.0, 0.0, 3.0], 0, &r).confidence,
            neg_entropy(&[1.0, 0.0, 3.0])
        );
    }

    #[test]
    fn filter_hand_cases() {
        // Candidates 0, 1, 3 (2 is the mask, 4 is beyond vocab_size 4) with probs 0.1, 0.6, 0.3 at T=1.
        let row = [0.1f32.ln(), 0.6f32.ln(), 50.0, 0.3f32.ln(), 60.0];
        let r = PredictRule {
            vocab_size: 4,
            ..rule(1.0, Remasking::LowConfidence)
        };
        let f = |top_k, top_p| SampleFilter { top_k, top_p };
        assert_eq!(f(0, 1.0).allowed(&row, &r), None);
        assert_eq!(f(2, 1.0).allowed(&row, &r), Some(vec![1, 3]));
        assert_eq!(f(0, 0.5).allowed(&row, &r), Some(vec![1]));
        assert_eq!(f(0, 0.85).allowed(&row, &r), Some(vec![1, 3]));
        assert_eq!(f(0, 0.95).allowed(&row, &r), Some(vec![1, 3, 0]));
        // top_p first, then top_k.
        assert_eq!(f(1, 0.95).allowed(&row, &r), Some(vec![1]));
        // Temperature sharpens before top_p: at T=0.5 probs ∝ 0.01, 0.36, 0.09 → 0.783 for id 1
        // (0.6 at T=1, where 0.77 needs two candidates).
        let r2 = PredictRule {
            temperature: 0.5,
            ..r.clone()
        };
        assert_eq!(f(0, 0.77).allowed(&row, &r), Some(vec![1, 3]));
        assert_eq!(f(0, 0.77).allowed(&row, &r2), Some(vec![1]));
        assert_eq!(f(0, 0.79).allowed(&row, &r2), Some(vec![1, 3]));
        // Greedy ignores the filter.
        let g = PredictRule {
            temperature: 0.0,
            ..r.clone()
        };
        assert_eq!(f(1, 0.1).allowed(&row, &g), None);
        // Sampling with top_k 1 always gives the most likely candidate; top_k 2 never id 0.
        let mut seen = [0usize; 5];
        for step in 0..2000 {
            let rs = PredictRule { step, ..r.clone() };
            assert_eq!(predict_row_filtered(&row, 0, &rs, &f(1, 1.0)).token, 1);
            seen[predict_row_filtered(&row, 0, &rs, &f(2, 1.0)).token as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0);
        // Renormalised 0.6 / 0.9 = 2/3 for id 1.
        let frac = seen[1] as f64 / 2000.0;
        assert!((frac - 2.0 / 3.0).abs() < 0.04, "{frac}");
        // Inactive filter = predict_row exactly.
        let rs = PredictRule {
            step: 7,
            ..r.clone()
        };
        assert_eq!(
            predict_row_filtered(&row, 3, &rs, &f(0, 1.0)),
            predict_row(&row, 3, &rs)
        );
    }
}
