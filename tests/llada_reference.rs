//! Parity of the CPU LLaDA forward with `reference_logits.json` (an fp32 PyTorch forward of the
//! tiny model's bf16 weights): argmax of every row identical, first row and total L2 within 1e-3
//! relative, row sums within 1e-3 relative to the row's scale.

use dllm::model::{llada::Llada, Model};
use serde_json::Value;
use std::path::Path;

fn model_dir() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/tiny-llada-code"
    ))
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn cpu_forward_matches_reference_logits() {
    let model = Llada::load(model_dir()).unwrap();
    let width = model.config().logits_width();
    let text = std::fs::read_to_string(model_dir().join("reference_logits.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for (c, case) in cases.iter().enumerate() {
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let logits = model.forward(&ids).unwrap();
        assert_eq!(logits.len(), ids.len() * width);

        let argmax: Vec<u64> = logits
            .chunks_exact(width)
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold((0usize, f32::NEG_INFINITY), |b, (j, &x)| {
                        if x > b.1 {
                            (j, x)
                        } else {
                            b
                        }
                    })
                    .0 as u64
            })
            .collect();
        let want: Vec<u64> = case["logits_argmax"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(argmax, want, "case {c}: argmax per row");

        let first = f32s(&case["logits_first_row"]);
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in logits[..width].iter().zip(&first) {
            num += ((a - b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        let rel = (num / den).sqrt();
        assert!(rel <= 1e-3, "case {c}: first row relative L2 error {rel:e}");

        let l2 = logits
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let want_l2 = case["logits_l2"].as_f64().unwrap();
        assert!(
            ((l2 - want_l2) / want_l2).abs() <= 1e-3,
            "case {c}: L2 {l2} vs {want_l2}"
        );

        for (r, (row, want_sum)) in logits
            .chunks_exact(width)
            .zip(f32s(&case["logits_rowsum"]))
            .enumerate()
        {
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            let scale: f64 = row.iter().map(|&x| (x as f64).abs()).sum();
            assert!(
                (sum - want_sum as f64).abs() <= 1e-3 * scale,
                "case {c} row {r}: sum {sum} vs {want_sum}"
            );
        }
    }
}

#[test]
fn predict_equals_forward_then_host_sampling() {
    use dllm::denoise::predict::{predict_row, PredictRule, Remasking};
    let model = Llada::load(model_dir()).unwrap();
    let cfg = model.config().clone();
    let ids: Vec<u32> = vec![1460, 6669, 7085, 1, 1, 1, 1, 42, 1];
    let queries = [3usize, 4, 5, 6, 8];
    for (t, rm) in [(0.0, Remasking::LowConfidence), (0.8, Remasking::Random)] {
        let rule = PredictRule {
            temperature: t,
            remasking: rm,
            seed: 5,
            step: 2,
            mask_token: cfg.mask_token_id,
            vocab_size: cfg.vocab_size,
        };
        let fast = model.predict(&ids, &queries, &rule).unwrap();
        let logits = model.forward(&ids).unwrap();
        let w = cfg.logits_width();
        for (p, &q) in fast.iter().zip(&queries) {
            let slow = predict_row(&logits[q * w..(q + 1) * w], q, &rule);
            assert_eq!(p.token, slow.token);
            assert!(
                (p.confidence - slow.confidence).abs() <= 1e-6 * slow.confidence.abs().max(1e-12)
            );
            assert_ne!(p.token, cfg.mask_token_id);
        }
    }
}

#[test]
fn bad_canvases_are_rejected_with_clear_errors() {
    let model = Llada::load(model_dir()).unwrap();
    let e = model.forward(&[]).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = model.forward(&[5, 9000]).unwrap_err().to_string();
    assert!(e.contains("9000") && e.contains("position 1"), "{e}");
    let long = vec![5u32; model.config().max_seq_len + 1];
    let e = model.forward(&long).unwrap_err().to_string();
    assert!(e.contains("max_sequence_length"), "{e}");
}
