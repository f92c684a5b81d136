//! Sessions over the embedded LLaDA model and a synthesized Dream model with odd parameters
//! never panic: random canvases (masks,
//! fixed tokens, any length up to 48), step counts and block lengths from 0 to `usize::MAX`,
//! extreme temperatures, every confidence and schedule, commit rules with out-of-range values,
//! top-k / top-p filters, guidance scales, caches and self-correction, with random re-masking
//! and locking between the steps. Each session is refused with an error, stops with an error or
//! runs; a panic fails the test (`steps = usize::MAX` once overflowed the schedule's arithmetic,
//! and `2⁴⁰` steps would have allocated a step table the size of the address space).
//! Deterministic: everything comes from a fixed seed.

mod common;

use common::odd::{panic_message, Rng};
use dllm::denoise::{
    CommitPolicy, CreditParams, Decoding, GenerationParams, Remasking, SampleFilter, ScheduleKind,
    Session,
};
use dllm::model::load::load_cpu;
use dllm::model::{CacheMode, Model};
use dllm::synth::{synth_checkpoint, Preset};
use std::path::Path;
use std::sync::Arc;

#[test]
fn llada_sessions_with_odd_parameters_run_or_fail_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code");
    sessions_with_odd_parameters_run_or_fail_cleanly(load_cpu(&dir).unwrap(), 42);
}

#[test]
fn dream_sessions_with_odd_parameters_run_or_fail_cleanly() {
    // Dream predicts each position from the row before it (shifted logits).
    let dir = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::DreamTiny, dir.path(), 5).unwrap();
    sessions_with_odd_parameters_run_or_fail_cleanly(load_cpu(dir.path()).unwrap(), 43);
}

#[test]
fn llada_moe_sessions_with_odd_parameters_run_or_fail_cleanly() {
    // A mixture of experts: every forward routes its rows, packed batches included.
    let dir = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::LladaMoeTiny, dir.path(), 6).unwrap();
    sessions_with_odd_parameters_run_or_fail_cleanly(load_cpu(dir.path()).unwrap(), 46);
}

fn sessions_with_odd_parameters_run_or_fail_cleanly(model: Arc<dyn Model>, seed: u64) {
    let mask = model.config().mask_token_id;
    let vocab = model.config().vocab_size;
    let mut r = Rng(seed);
    let mut panics = Vec::new();
    let mut finished = 0;
    for it in 0..150 {
        let len = 1 + r.next() % 48;
        let canvas: Vec<u32> = (0..len)
            .map(|_| {
                if r.next().is_multiple_of(3) {
                    (r.next() % (vocab + 8)) as u32
                } else {
                    mask
                }
            })
            .collect();
        let params = GenerationParams {
            steps: r.pick(&[0, 1, 2, 3, 5, 8, 16, 33, 64, 1 << 21, 1 << 40, usize::MAX]),
            block_len: r.pick(&[0, 1, 2, 3, 4, 8, 16, 32, 100, usize::MAX]),
            temperature: r.pick(&[0.0, 0.5, 1.0, 1e-300, 1e300, 1e-9, -1.0, f64::NAN]),
            remasking: r.pick(&[
                Remasking::LowConfidence,
                Remasking::Random,
                Remasking::Margin,
                Remasking::Entropy,
            ]),
            seed: r.next() as u64,
            schedule: r.pick(&[ScheduleKind::Llada, ScheduleKind::Dream]),
        };
        let commit = match r.next() % 3 {
            0 => CommitPolicy::Schedule,
            1 => CommitPolicy::Threshold(r.pick(&[0.0, 0.5, 1.0, 2.0, -1.0, f64::INFINITY])),
            _ => CommitPolicy::Factor(r.pick(&[0.1, 1.0, 5.0, 1e-300, 1e300, 0.0])),
        };
        let mut decoding = Decoding {
            commit,
            filter: SampleFilter {
                top_k: r.pick(&[0, 1, 2, 5, 100_000]),
                top_p: r.pick(&[1.0, 0.5, 1e-9, 0.999, 0.0, 2.0]),
            },
            cfg_scale: r.pick(&[0.0, 0.0, 1.0, 3.0, -1.0, 1e300]),
            stop_at_eos: r.next().is_multiple_of(2),
            cache: r.pick(&[CacheMode::None, CacheMode::Prefix, CacheMode::Dual]),
            vicinity: 0,
            revise: r.pick(&[None, None, Some(0.5), Some(0.01), Some(1.5)]),
            constraints: Default::default(),
            // Odd credit constants run in a test of their own, below.
            credit: None,
        };
        // Cached sessions get odd vicinities too (chosen without a draw, so the sessions
        // above stay the same).
        if decoding.cache != CacheMode::None {
            decoding.vicinity = [0, 1, 4, 1 << 20, usize::MAX][it % 5];
        }
        let label = format!("session {it}: {len} positions, {params:?}, {decoding:?}");
        let m = model.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let Ok(mut s) = Session::new(m, canvas, params) else {
                return false;
            };
            if s.set_decoding(decoding).is_err() {
                return false;
            }
            for _ in 0..64 {
                if s.is_done() {
                    return true;
                }
                if r.next().is_multiple_of(7) {
                    let (a, b) = (r.next() % (len + 2), r.next() % (len + 2));
                    let _ = s.remask(a.min(b), a.max(b));
                }
                if r.next().is_multiple_of(11) {
                    let _ = s.lock(r.next() % (len + 1), (r.next() % (vocab + 8)) as u32);
                }
                if s.step().is_err() {
                    return false;
                }
            }
            s.is_done()
        }));
        match outcome {
            Ok(done) => finished += usize::from(done),
            Err(p) => {
                let msg = panic_message(p);
                panics.push(format!("{label}: {msg}"));
            }
        }
    }
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
    // Not everything was refused: the valid combinations ran to the end.
    assert!(finished > 10, "only {finished} sessions finished");
}

/// Trace credit with extreme but valid constants, under every commit rule (the hierarchical one
/// with odd thresholds too), through both caches, greedy and sampled, with self-correction
/// (which makes credit forget re-masked positions) and with stop at EOS: every session runs to
/// the end without a panic. (Out-of-range constants are refused by `CreditParams::validate`,
/// tested on their own.)
#[test]
fn credit_and_hierarchy_with_odd_values_run_to_the_end() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code");
    let model = load_cpu(&dir).unwrap();
    let mask = model.config().mask_token_id;
    // Two gaps, so the hierarchical rule sees more than one run of masks.
    let mut canvas: Vec<u32> = vec![328, 286, 10];
    canvas.extend([mask; 10]);
    canvas.extend([90, 320, 267]);
    canvas.extend([mask; 6]);
    let credits = [
        None,
        Some(CreditParams::default()),
        Some(CreditParams {
            alpha: 1e300,
            gamma: 0.0,
            decay: 1.0,
        }),
        Some(CreditParams {
            alpha: 1e-300,
            gamma: 1e300,
            decay: 0.0,
        }),
    ];
    let commits = [
        CommitPolicy::Threshold(0.9),
        CommitPolicy::Factor(1.0),
        CommitPolicy::Hierarchy {
            high: None,
            low: 0.4,
        },
        CommitPolicy::Hierarchy {
            high: Some(-1.0),
            low: 1e300,
        },
    ];
    // (cache, temperature, revise, stop at EOS)
    let settings = [
        (CacheMode::None, 0.0, None, false),
        (CacheMode::None, 0.9, Some(0.5), false),
        (CacheMode::Dual, 0.0, None, true),
        (CacheMode::Prefix, 0.7, None, true),
    ];
    let mut seed = 0;
    for credit in credits {
        for commit in commits {
            for (cache, temperature, revise, stop_at_eos) in settings {
                seed += 1;
                let params = GenerationParams {
                    steps: 16,
                    block_len: 8,
                    temperature,
                    seed,
                    ..Default::default()
                };
                let decoding = Decoding {
                    commit,
                    cache,
                    credit,
                    revise,
                    stop_at_eos,
                    ..Default::default()
                };
                let label = format!("{decoding:?} {params:?}");
                let m = model.clone();
                let c = canvas.clone();
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut s = Session::new(m, c, params).unwrap();
                    s.set_decoding(decoding).unwrap();
                    s.run().unwrap();
                    (s.is_done(), s.masks_left())
                }));
                match run {
                    Ok(r) => assert_eq!(r, (true, 0), "{label}"),
                    Err(p) => panic!("{label}: {}", panic_message(p)),
                }
            }
        }
    }
}
