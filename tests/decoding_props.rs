//! Properties of the denoising loop over many seeded random runs (fixed and locked positions
//! never change, masks only fall except by self-correction, every run terminates with no masks,
//! self-correction touches only model-committed tokens of the current block and respects its
//! per-position cap, blocks are reported complete once, in order, with a final prefix that never
//! changes), plus a hand-computed self-correction run and the observer's events.

use dllm::config::ModelConfig;
use dllm::denoise::revise::MAX_REMASKS_PER_POSITION;
use dllm::denoise::rng;
use dllm::denoise::{CommitPolicy, Decoding, GenerationParams, Remasking, Session, StepReport};
use dllm::error::{Error, Result};
use dllm::model::Model;
use serde_json::json;
use std::sync::Arc;

const MASK: u32 = 1;
const EOS: u32 = 0;
const VOCAB: usize = 16;
const EMB: usize = 20;

type LogitsFn = dyn Fn(&[u32], usize) -> Vec<f32> + Send + Sync;

/// A model whose logits row at position `p` is `f(canvas, p)`.
struct Mock {
    cfg: ModelConfig,
    f: Box<LogitsFn>,
}

impl Model for Mock {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn backend_name(&self) -> &'static str {
        "mock"
    }
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok((0..ids.len()).flat_map(|p| (self.f)(ids, p)).collect())
    }
}

fn mock(f: impl Fn(&[u32], usize) -> Vec<f32> + Send + Sync + 'static) -> Arc<Mock> {
    Arc::new(Mock {
        cfg: ModelConfig::from_json(&json!({
            "model_type": "llada", "d_model": 8, "n_heads": 2, "n_layers": 1,
            "mlp_hidden_size": 8, "vocab_size": VOCAB, "embedding_size": EMB,
            "max_sequence_length": 64, "mask_token_id": MASK, "eos_token_id": EOS,
            "pad_token_id": 2
        }))
        .unwrap(),
        f: Box::new(f),
    })
}

/// Logits that are a pseudo-random function of the whole canvas and the position, with the mask
/// id at −∞ (scale `s`): every step sees new confidences, so self-correction fires often.
fn noisy_model(s: f32) -> Arc<Mock> {
    mock(move |c, p| {
        let key = c.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
            (h ^ t as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut r: Vec<f32> = (0..EMB)
            .map(|j| s * rng::uniform(key, 7, p as u64, j as u64) as f32)
            .collect();
        r[MASK as usize] = f32::NEG_INFINITY;
        r
    })
}

/// Everything one random run looks at.
struct Case {
    canvas: Vec<u32>,
    params: GenerationParams,
    decoding: Decoding,
    /// (position, token) locked before the run.
    locks: Vec<(usize, u32)>,
}

/// A random canvas (prompt pieces and gaps), schedule, decoding and locks for `seed`.
fn case(seed: u64) -> Case {
    let mut i = 0u64;
    let mut u = || {
        i += 1;
        rng::uniform(seed, 99, i, 0)
    };
    let mut canvas = Vec::new();
    for _ in 0..1 + (u() * 3.0) as usize {
        for _ in 0..(u() * 4.0) as usize {
            canvas.push(3 + (u() * 12.0) as u32);
        }
        canvas.resize(canvas.len() + 1 + (u() * 9.0) as usize, MASK);
    }
    let n_masks = canvas.iter().filter(|&&t| t == MASK).count();
    let block_len = 1 + (u() * 6.0) as usize;
    let blocks = n_masks.div_ceil(block_len);
    let params = GenerationParams {
        steps: blocks * (1 + (u() * 5.0) as usize),
        block_len,
        temperature: if u() < 0.3 { 0.7 } else { 0.0 },
        remasking: [
            Remasking::LowConfidence,
            Remasking::Random,
            Remasking::Margin,
            Remasking::Entropy,
        ][(u() * 4.0) as usize],
        seed,
        ..Default::default()
    };
    let decoding = Decoding {
        commit: match (u() * 3.0) as usize {
            0 => CommitPolicy::Schedule,
            1 => CommitPolicy::Threshold(u()),
            _ => CommitPolicy::Factor(0.1 + u() * 2.0),
        },
        stop_at_eos: u() < 0.2,
        revise: (u() < 0.7).then(|| 0.02 + 0.3 * u()),
        ..Default::default()
    };
    let mut locks = Vec::new();
    for _ in 0..(u() * 3.0) as usize {
        let p = (u() * canvas.len() as f64) as usize;
        locks.push((p, 3 + (u() * 12.0) as u32));
    }
    Case {
        canvas,
        params,
        decoding,
        locks,
    }
}

/// Runs `c` on `model`, returning the session's reports and the canvas after each step.
fn run(c: &Case, model: Arc<Mock>) -> (Session, Vec<(StepReport, Vec<u32>)>) {
    let mut s = Session::new(model, c.canvas.clone(), c.params.clone()).unwrap();
    s.set_decoding(c.decoding.clone()).unwrap();
    for &(p, t) in &c.locks {
        s.lock(p, t).unwrap();
    }
    let mut events = Vec::new();
    s.run_observed(|e| {
        events.push((e.report.clone(), e.canvas.to_vec()));
        assert!(events.len() <= 1000, "runaway session");
        true
    })
    .unwrap();
    (s, events)
}

#[test]
fn random_runs_keep_every_invariant() {
    let mut revised_runs = 0;
    let mut capped = 0;
    for seed in 0..400u64 {
        let c = case(seed);
        let (s, events) = run(&c, noisy_model(3.0));
        let ctx = format!(
            "seed {seed}: {:?} {:?} {:?}",
            c.canvas, c.params, c.decoding
        );
        // The fixed positions: prompt positions and locks, with the lock winning.
        let mut fixed: Vec<Option<u32>> =
            c.canvas.iter().map(|&t| (t != MASK).then_some(t)).collect();
        for &(p, t) in &c.locks {
            fixed[p] = Some(t);
        }
        let mut before = c.canvas.clone();
        for &(p, t) in &c.locks {
            before[p] = t;
        }
        let masks = |v: &[u32]| v.iter().filter(|&&t| t == MASK).count();
        let mut remask_count = vec![0u8; c.canvas.len()];
        let mut reported = Vec::new();
        let mut prefix = 0;
        for (r, after) in &events {
            for (p, f) in fixed.iter().enumerate() {
                if let Some(t) = f {
                    assert_eq!(after[p], *t, "{ctx}: fixed position {p} changed");
                }
            }
            // Mask accounting: only the step's commits and re-maskings (and an EOS stop fill)
            // change the mask count; without re-maskings it never rises.
            assert_eq!(masks(after), r.masks_left, "{ctx}");
            assert!(
                masks(after) <= masks(&before) - r.committed.len() + r.remasked.len(),
                "{ctx}: step {} masks {} -> {}",
                r.step,
                masks(&before),
                masks(after)
            );
            if c.decoding.revise.is_none() {
                assert!(r.remasked.is_empty(), "{ctx}");
            }
            for &p in &r.remasked {
                assert!(fixed[p].is_none(), "{ctx}: re-masked fixed position {p}");
                assert_ne!(before[p], MASK, "{ctx}: re-masked a mask at {p}");
                assert!(!r.committed.contains(&p), "{ctx}");
                assert_eq!(after[p], MASK, "{ctx}");
                remask_count[p] += 1;
                assert!(
                    remask_count[p] <= MAX_REMASKS_PER_POSITION,
                    "{ctx}: cap at {p}"
                );
            }
            for &p in &r.committed {
                assert_eq!(before[p], MASK, "{ctx}: committed a non-mask at {p}");
            }
            // Completed blocks: in order, all positions filled; the final prefix only grows.
            for b in &r.completed {
                assert_eq!(b.block, reported.len(), "{ctx}");
                assert!(!after[b.span.clone()].contains(&MASK), "{ctx}");
                reported.push(b.clone());
            }
            assert!(r.final_prefix >= prefix, "{ctx}: final prefix shrank");
            prefix = r.final_prefix;
            assert!(!after[..prefix].contains(&MASK), "{ctx}");
            before = after.clone();
        }
        // The final prefix of every step is the final canvas there.
        let fin = s.canvas().to_vec();
        for (r, after) in &events {
            assert_eq!(after[..r.final_prefix], fin[..r.final_prefix], "{ctx}");
        }
        // Termination: no masks, every block reported, within the schedule's step budget.
        assert!(s.is_done(), "{ctx}");
        assert_eq!(s.masks_left(), 0, "{ctx}");
        assert!(!fin.contains(&MASK), "{ctx}");
        assert_eq!(reported.len(), s.blocks().count(), "{ctx}");
        assert_eq!(prefix, fin.len(), "{ctx}");
        assert!(s.forward_steps() <= c.params.steps, "{ctx}");
        assert_eq!(
            s.revisions(),
            remask_count.iter().map(|&n| n as usize).sum::<usize>(),
            "{ctx}"
        );
        revised_runs += usize::from(s.revisions() > 0);
        capped += remask_count
            .iter()
            .filter(|&&n| n == MAX_REMASKS_PER_POSITION)
            .count();
    }
    // The loop must actually exercise self-correction and its cap.
    assert!(revised_runs > 50, "only {revised_runs} runs re-masked");
    assert!(
        capped > 10,
        "the per-position cap was reached {capped} times"
    );
}

#[test]
fn revise_only_touches_the_current_block() {
    for seed in 0..200u64 {
        let mut c = case(seed);
        c.decoding.revise = Some(0.2);
        c.locks.clear();
        let (s, events) = run(&c, noisy_model(3.0));
        let blocks: Vec<Vec<usize>> = s.blocks().map(|b| b.to_vec()).collect();
        for (r, _) in &events {
            let Some(b) = r.block else { continue };
            for p in &r.remasked {
                assert!(blocks[b].contains(p), "seed {seed}: {p} outside block {b}");
            }
        }
    }
}

/// Token `3 + p` at masked position `p` with confidence falling in `p`. A committed token gets
/// probability ≈ 1, except at position 1 while it is the only committed generated token (≈ 0).
fn hand_model() -> Arc<Mock> {
    mock(|c, p| {
        let mut r = vec![0.0f32; EMB];
        r[MASK as usize] = f32::NEG_INFINITY;
        if c[p] == MASK {
            r[3 + p] = 10.0 - p as f32;
        } else {
            let committed = c[1..].iter().filter(|&&t| t != MASK).count();
            r[c[p] as usize] = if p == 1 && committed == 1 {
                -20.0
            } else {
                20.0
            };
        }
        r
    })
}

#[test]
fn revise_hand_case() {
    // Prompt [9], masks at 1..5, one block, 4 steps: one commit per step.
    let canvas = vec![9, MASK, MASK, MASK, MASK];
    let params = GenerationParams {
        steps: 4,
        block_len: 4,
        ..Default::default()
    };
    let mut s = Session::new(hand_model(), canvas, params).unwrap();
    s.set_decoding(Decoding {
        revise: Some(0.5),
        ..Default::default()
    })
    .unwrap();
    let mut got = Vec::new();
    s.run_observed(|e| {
        got.push((e.step, e.committed.clone(), e.remasked.clone()));
        true
    })
    .unwrap();
    // Step 0 commits 1 (most confident). Step 1 sees 1 as the only committed token: p ≈ 0 <
    // 0.5, re-masked, while 2 is committed; the block's 3 masks are re-planned over 2 steps
    // (2, 1). Step 2 commits 1 and 3 and keeps 2 (p ≈ 1). Step 3, the last, never revises.
    assert_eq!(
        got,
        vec![
            (0, vec![1], vec![]),
            (1, vec![2], vec![1]),
            (2, vec![1, 3], vec![]),
            (3, vec![4], vec![]),
        ]
    );
    assert_eq!(s.canvas(), &[9, 4, 5, 6, 7]);
    assert_eq!(s.revisions(), 1);
    assert_eq!(s.forward_steps(), 4);

    // Without --revise the same model commits one per step and never re-masks.
    let mut s = Session::new(
        hand_model(),
        vec![9, MASK, MASK, MASK, MASK],
        GenerationParams {
            steps: 4,
            block_len: 4,
            ..Default::default()
        },
    )
    .unwrap();
    s.run().unwrap();
    assert_eq!(s.canvas(), &[9, 4, 5, 6, 7]);
    assert_eq!(s.revisions(), 0);
}

#[test]
fn plan_apply_without_scores_is_refused_under_revise() {
    let params = GenerationParams {
        steps: 4,
        block_len: 4,
        ..Default::default()
    };
    let mut s = Session::new(hand_model(), vec![9, MASK, MASK, MASK, MASK], params).unwrap();
    s.set_decoding(Decoding {
        revise: Some(0.5),
        ..Default::default()
    })
    .unwrap();
    s.step().unwrap();
    let plan = s.plan().unwrap();
    assert_eq!(plan.revisable, vec![1]);
    let preds = s.predict(&plan).unwrap();
    let before = s.canvas().to_vec();
    match s.apply(&plan, &preds) {
        Err(Error::State(m)) => assert!(m.contains("apply_scored"), "{m}"),
        other => panic!("expected a state error, got {other:?}"),
    }
    assert_eq!(s.canvas(), before.as_slice(), "session unchanged");
    let (preds, probs) = s.predict_scored(&plan).unwrap();
    assert_eq!(probs.len(), 1);
    assert!(probs[0] < 1e-6, "{probs:?}");
    let r = s.apply_scored(&plan, &preds, &probs).unwrap();
    assert_eq!((r.committed, r.remasked), (vec![2], vec![1]));
}

#[test]
fn bad_revise_values_are_rejected() {
    let mut s = Session::new(
        hand_model(),
        vec![9, MASK],
        GenerationParams {
            steps: 1,
            block_len: 1,
            ..Default::default()
        },
    )
    .unwrap();
    for bad in [0.0, 1.0, -0.5, f64::NAN] {
        let e = s
            .set_decoding(Decoding {
                revise: Some(bad),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("revise"), "{e}");
    }
    assert_eq!(s.decoding().revise, None);
}

#[test]
fn observer_reports_blocks_and_final_prefix_in_a_hand_case() {
    // Prompt of 2, then 6 masks in blocks of 2, 3 steps (one per block), then a suffix token.
    let canvas = vec![9, 9, MASK, MASK, MASK, MASK, MASK, MASK, 8];
    let params = GenerationParams {
        steps: 3,
        block_len: 2,
        ..Default::default()
    };
    let mut s = Session::new(noisy_model(3.0), canvas, params).unwrap();
    assert_eq!(s.final_prefix(), 2);
    let mut got = Vec::new();
    s.run_observed(|e| {
        got.push((
            e.step,
            e.block,
            e.completed
                .iter()
                .map(|b| (b.block, b.span.clone()))
                .collect::<Vec<_>>(),
            e.final_prefix,
            e.done,
        ));
        true
    })
    .unwrap();
    assert_eq!(
        got,
        vec![
            (0, Some(0), vec![(0, 2..4)], 4, false),
            (1, Some(1), vec![(1, 4..6)], 6, false),
            (2, Some(2), vec![(2, 6..8)], 9, true),
        ]
    );
    // A finished session's step reports nothing new.
    let r = s.step_report().unwrap();
    assert!(r.done && r.block.is_none() && r.completed.is_empty() && r.committed.is_empty());
    assert_eq!(r.final_prefix, 9);
}
