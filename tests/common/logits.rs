//! Logits helpers shared by the model tests: picking rows, comparing, a greedy rule.

use dllm::denoise::predict::{PredictRule, Remasking};
use dllm::model::Model;

/// Rows `queries` of a `[rows, width]` logits matrix, in that order.
pub fn rows(full: &[f32], width: usize, queries: &[usize]) -> Vec<f32> {
    queries
        .iter()
        .flat_map(|&q| full[q * width..(q + 1) * width].iter().copied())
        .collect()
}

/// max |a − b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    num / den
}

/// Greedy prediction (temperature 0, low-confidence remasking, step 0) for `m`'s vocabulary.
pub fn greedy_rule(m: &dyn Model) -> PredictRule {
    PredictRule {
        temperature: 0.0,
        remasking: Remasking::LowConfidence,
        seed: 0,
        step: 0,
        mask_token: m.config().mask_token_id,
        vocab_size: m.config().vocab_size,
    }
}
