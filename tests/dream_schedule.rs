//! The Dream schedule (`GenerationParams::schedule = ScheduleKind::Dream`) driven by a
//! [`Session`], against a naive transcription of Dream's `diffusion_generate` loop (float64
//! timesteps, top-k of the masked positions over the whole generated region).

use dllm::config::ModelConfig;
use dllm::denoise::predict::{predict_row, PredictRule, Prediction};
use dllm::denoise::{generation_canvas, GenerationParams, ScheduleKind, Session};
use dllm::error::Result;
use dllm::model::Model;
use serde_json::json;
use std::sync::Arc;

const MASK: u32 = 1;
const VOCAB: usize = 16;

/// A model that ignores the canvas: at position `p` token `3 + p % 10` wins with a confidence
/// that grows with `weight(p)` (distinct for every position, so no ties).
struct Fixed {
    cfg: ModelConfig,
}

fn weight(p: usize) -> f32 {
    // A permutation of the positions: 7p mod 61 is distinct for p < 61.
    1.0 + ((7 * p) % 61) as f32 / 10.0
}

impl Model for Fixed {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn backend_name(&self) -> &'static str {
        "fixed"
    }
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok((0..ids.len())
            .flat_map(|p| {
                let mut row = vec![0.0f32; VOCAB];
                row[3 + p % 10] = weight(p);
                row
            })
            .collect())
    }
    fn predict(&self, ids: &[u32], q: &[usize], rule: &PredictRule) -> Result<Vec<Prediction>> {
        let logits = self.forward(ids)?;
        Ok(q.iter()
            .map(|&p| predict_row(&logits[p * VOCAB..(p + 1) * VOCAB], p, rule))
            .collect())
    }
}

fn model() -> Arc<dyn Model> {
    let cfg = ModelConfig::from_json(&json!({
        "model_type": "llada", "d_model": 8, "n_heads": 2, "n_layers": 1, "mlp_hidden_size": 8,
        "vocab_size": VOCAB, "max_sequence_length": 64, "mask_token_id": MASK,
        "eos_token_id": 0, "pad_token_id": 2
    }))
    .unwrap();
    Arc::new(Fixed { cfg })
}

/// Dream's loop, naively: positions committed at each step.
fn naive_dream(masked: &[usize], steps: usize) -> Vec<Vec<usize>> {
    let mut left: Vec<usize> = masked.to_vec();
    let ts: Vec<f64> = (0..=steps)
        .map(|i| 1.0 - i as f64 * (1.0 - 1e-3) / steps as f64)
        .collect();
    let mut out = Vec::new();
    for i in 0..steps {
        let n = left.len();
        let k = if i + 1 < steps {
            (n as f64 * (1.0 - ts[i + 1] / ts[i])) as usize
        } else {
            n
        };
        left.sort_by(|&a, &b| weight(b).partial_cmp(&weight(a)).unwrap());
        let mut chosen: Vec<usize> = left.drain(..k).collect();
        chosen.sort_unstable();
        out.push(chosen);
    }
    out
}

#[test]
fn session_follows_dream_counts_over_the_whole_region() {
    for (gen, steps) in [(10, 4), (40, 8), (40, 3), (7, 12), (25, 1)] {
        let canvas = generation_canvas(&[5, 6, 7], gen, MASK);
        let masked: Vec<usize> = (3..3 + gen).collect();
        let params = GenerationParams {
            steps,
            block_len: 4, // unused by the Dream schedule: no blocks, no divisibility rule
            schedule: ScheduleKind::Dream,
            ..Default::default()
        };
        let mut s = Session::new(model(), canvas, params).unwrap();
        assert_eq!(s.total_steps(), steps);
        let mut got = Vec::new();
        s.run_with(|info, _| {
            got.push(info.committed.clone());
            true
        })
        .unwrap();
        assert_eq!(got, naive_dream(&masked, steps), "gen {gen} steps {steps}");
        assert_eq!(s.masks_left(), 0);
        for p in masked {
            assert_eq!(s.canvas()[p], 3 + (p % 10) as u32);
        }
    }
}

#[test]
fn hand_case_counts() {
    // 10 masks in 4 steps: 2, 2, 2, then the 4 left (see schedule::dream_count).
    let params = GenerationParams {
        steps: 4,
        schedule: ScheduleKind::Dream,
        ..Default::default()
    };
    let mut s = Session::new(model(), generation_canvas(&[5], 10, MASK), params).unwrap();
    let mut counts = Vec::new();
    s.run_with(|info, _| {
        counts.push(info.committed.len());
        true
    })
    .unwrap();
    assert_eq!(counts, vec![2, 2, 2, 4]);
}

#[test]
fn llada_default_is_unchanged_and_differs() {
    // The default is the LLaDA block schedule: 40 masks, block 8 → 5 blocks; 10 steps → 2 per
    // block, 4 tokens per step, never outside the current block.
    assert_eq!(GenerationParams::default().schedule, ScheduleKind::Llada);
    let params = GenerationParams {
        steps: 10,
        block_len: 8,
        ..Default::default()
    };
    let mut s = Session::new(model(), generation_canvas(&[5], 40, MASK), params).unwrap();
    let mut steps = Vec::new();
    s.run_with(|info, _| {
        steps.push(info.committed.clone());
        true
    })
    .unwrap();
    for (i, c) in steps.iter().enumerate() {
        let block = i / 2;
        assert_eq!(c.len(), 4);
        assert!(c
            .iter()
            .all(|&p| (1 + 8 * block..1 + 8 * (block + 1)).contains(&p)));
    }
}
