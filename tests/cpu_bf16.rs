//! bf16 activations on the CPU (`DLLM_CPU_BF16=1`, `CpuOptions::bf16_activations`): the tiny
//! LLaDA's logits against `reference_logits.json` (an fp32 PyTorch forward) within the bf16
//! tolerance the CUDA backend is held to (relative L2 ≤ 1e-2), greedy generation against the
//! f32 CPU path (how many tokens differ is printed), and the switch's contract: off by default,
//! and on only where the CPU has AVX-512 BF16. Skipped (with a message) on CPUs without it.

use dllm::denoise::{CacheMode, Decoding, GenerationParams, Session};
use dllm::model::{load_cpu_with, CpuOptions, Model};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");

fn model(bf16: bool) -> Arc<dyn Model> {
    let options = CpuOptions {
        bf16_activations: Some(bf16),
    };
    load_cpu_with(Path::new(MODEL), options).unwrap()
}

fn available() -> bool {
    let here = dllm::backend::cpu::skinny_bf16_available();
    if !here {
        eprintln!("no AVX-512 BF16 on this CPU: bf16 activations are not checked");
    }
    here
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (j, &x)| if x > b.1 { (j, x) } else { b },
        )
        .0
}

#[test]
fn logits_stay_within_the_bf16_tolerance_of_the_reference() {
    if !available() {
        return;
    }
    let (bf, exact) = (model(true), model(false));
    let width = bf.config().logits_width();
    let text = std::fs::read_to_string(Path::new(MODEL).join("reference_logits.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let (mut rows, mut argmax_equal) = (0, 0);
    for (c, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let logits = bf.forward(&ids).unwrap();
        let first: Vec<f64> = case["logits_first_row"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let num: f64 = logits[..width]
            .iter()
            .zip(&first)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum();
        let den: f64 = first.iter().map(|b| b * b).sum();
        let rel = (num / den).sqrt();
        assert!(rel <= 1e-2, "case {c}: first row relative L2 {rel:e}");
        // Not the f32 path's logits: the activations really are rounded.
        assert_ne!(logits, exact.forward(&ids).unwrap(), "case {c}");
        let l2 = logits
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let want_l2 = case["logits_l2"].as_f64().unwrap();
        assert!(
            ((l2 - want_l2) / want_l2).abs() <= 1e-2,
            "case {c}: L2 {l2} vs {want_l2}"
        );
        for (row, want) in logits
            .chunks_exact(width)
            .zip(case["logits_argmax"].as_array().unwrap())
        {
            rows += 1;
            argmax_equal += usize::from(argmax(row) as u64 == want.as_u64().unwrap());
        }
    }
    eprintln!("bf16 activations: {argmax_equal} of {rows} rows have the reference's argmax");
    assert!(
        argmax_equal * 100 >= rows * 98,
        "{argmax_equal} of {rows} argmaxes equal"
    );
}

#[test]
fn greedy_generation_agrees_with_the_f32_path() {
    if !available() {
        return;
    }
    let prompt: Vec<u32> = vec![1460, 6669, 7085, 42, 318, 77, 2044, 9];
    let (mut total, mut equal) = (0, 0);
    for cache in [CacheMode::None, CacheMode::Dual] {
        let run = |m: Arc<dyn Model>| {
            let mut ids = prompt.clone();
            ids.extend(std::iter::repeat_n(m.config().mask_token_id, 64));
            let params = GenerationParams {
                steps: 32,
                block_len: 32,
                ..Default::default()
            };
            let mut s = Session::new(m, ids, params).unwrap();
            s.set_decoding(Decoding {
                cache,
                ..Decoding::default()
            })
            .unwrap();
            s.run().unwrap();
            s.generated_tokens()
        };
        let (a, b) = (run(model(true)), run(model(false)));
        assert_eq!(a.len(), b.len());
        total += a.len();
        equal += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        eprintln!("{cache:?}: first differing generated token {first:?}");
    }
    eprintln!("bf16 activations: {equal} of {total} generated tokens equal the f32 path's");
    assert!(equal * 100 >= total * 98, "{equal} of {total} tokens equal");
}

#[test]
fn the_switch_is_off_by_default_and_on_only_where_the_cpu_has_it() {
    use dllm::model::llada::Llada;
    let mut m = Llada::load(Path::new(MODEL)).unwrap();
    if std::env::var("DLLM_CPU_BF16").as_deref() != Ok("1") {
        assert!(!m.bf16_activations());
    }
    let here = dllm::backend::cpu::skinny_bf16_available();
    assert_eq!(m.set_bf16_activations(true), here);
    assert_eq!(m.bf16_activations(), here);
    assert!(!m.set_bf16_activations(false));
}
