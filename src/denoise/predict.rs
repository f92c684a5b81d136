//! Per-position prediction: the candidate token `x0` and its confidence, from one logits row.
//!
//! Semantics follow LLaDA's reference `generate()`:
//! - candidates are ids `< vocab_size` other than the mask token (the mask is never committed);
//! - temperature 0: `x0 = argmax` of the logits; temperature `T > 0`: Gumbel-max in float64,
//!   `argmax_j l_j − T·ln(−ln u_j)` with `u_j` from [`rng::uniform`]`(seed, step, position, j)`;
//!   ties go to the lower id;
//! - `low-confidence`: confidence = softmax probability of `x0` over the whole row (float64,
//!   noise-free logits, as the reference); `random`: confidence = `rng::uniform(seed, step,
//!   position, RANDOM_CONFIDENCE_INDEX)`.
//!
//! The CUDA sampling kernels implement the same function and are tested against this one.

use super::rng;
use rayon::prelude::*;

/// How confidence is scored when choosing which positions to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remasking {
    /// Softmax probability of the chosen token (LLaDA `low_confidence`).
    LowConfidence,
    /// A uniform random number per position (LLaDA `random`).
    Random,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(t: f64, remasking: Remasking) -> PredictRule {
        PredictRule { temperature: t, remasking, seed: 1, step: 0, mask_token: 2, vocab_size: 5 }
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
            let r = PredictRule { step, vocab_size: 4, ..rule(1.0, Remasking::LowConfidence) };
            counts[predict_row(&row, 0, &r).token as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        for (id, p) in [(0, 0.1), (1, 0.6), (3, 0.3)] {
            let f = counts[id] as f64 / n as f64;
            assert!((f - p).abs() < 0.015, "id {id}: {f} vs {p}");
        }
    }
}
