//! The canvas denoiser (`dllm::denoise`) against mock models with hand-made logits, and against
//! a naive, array-at-a-time transcription of LLaDA's reference `generate()` loop.

use dllm::config::ModelConfig;
use dllm::denoise::predict::{predict_row, PredictRule, Prediction};
use dllm::denoise::rng;
use dllm::denoise::{
    generation_canvas, infill_canvas, transfer_counts, GenerationParams, Remasking, Session,
    StepInfo,
};
use dllm::error::{Error, Result};
use dllm::model::Model;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const MASK: u32 = 1;
const VOCAB: usize = 16;
const EMB: usize = 20; // embedding padded beyond the vocabulary
const MAX_LEN: usize = 64;

fn tiny_config() -> ModelConfig {
    ModelConfig::from_json(&json!({
        "model_type": "llada", "d_model": 8, "n_heads": 2, "n_layers": 1, "mlp_hidden_size": 8,
        "vocab_size": VOCAB, "embedding_size": EMB, "max_sequence_length": MAX_LEN,
        "mask_token_id": MASK, "eos_token_id": 0, "pad_token_id": 2
    }))
    .unwrap()
}

type LogitsFn = dyn Fn(&[u32], usize) -> Vec<f32> + Send + Sync;

/// A model whose logits row at position `p` is `f(canvas, p)`; it records every call.
struct Mock {
    cfg: ModelConfig,
    f: Box<LogitsFn>,
    forwards: AtomicUsize,
    /// (queries, rule.step) of every predict call.
    calls: Mutex<Vec<(Vec<usize>, u64)>>,
}

impl Mock {
    fn new(f: impl Fn(&[u32], usize) -> Vec<f32> + Send + Sync + 'static) -> Arc<Mock> {
        Arc::new(Mock {
            cfg: tiny_config(),
            f: Box::new(f),
            forwards: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        })
    }
}

impl Model for Mock {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn backend_name(&self) -> &'static str {
        "mock"
    }
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.forwards.fetch_add(1, Ordering::SeqCst);
        Ok((0..ids.len()).flat_map(|p| (self.f)(ids, p)).collect())
    }
    fn predict(
        &self,
        ids: &[u32],
        queries: &[usize],
        rule: &PredictRule,
    ) -> Result<Vec<Prediction>> {
        self.calls
            .lock()
            .unwrap()
            .push((queries.to_vec(), rule.step));
        let logits = self.forward(ids)?;
        Ok(queries
            .iter()
            .map(|&q| predict_row(&logits[q * EMB..(q + 1) * EMB], q, rule))
            .collect())
    }
}

/// Logits that make token `3 + p % 10` the argmax at `p` (`conf[p]` must be positive) with
/// confidence rising with `conf[p]`; the mask token and the padding rows get the largest logit
/// (never to be chosen). The softmax denominator is then exactly 5 (the small terms vanish
/// below its ulp), so equal `conf` values give bit-identical confidences: exact ties.
fn pattern_model(conf: Vec<f32>) -> Arc<Mock> {
    Mock::new(move |_, p| {
        let mut row = vec![0.0f32; EMB];
        row[3 + p % 10] = conf[p];
        row[MASK as usize] = 50.0;
        row[VOCAB..].fill(50.0);
        row
    })
}

/// Pseudo-random logits depending on the position and the whole canvas.
fn canvas_model(scale: f32) -> Arc<Mock> {
    Mock::new(move |ids, p| {
        let h = ids.iter().fold(0u64, |h, &t| rng::mix64(h ^ t as u64));
        (0..EMB)
            .map(|j| (rng::uniform(h, 0, p as u64, j as u64) as f32 - 0.5) * scale)
            .collect()
    })
}

fn params(steps: usize, block_len: usize) -> GenerationParams {
    GenerationParams {
        steps,
        block_len,
        ..Default::default()
    }
}

fn run_all(s: &mut Session) -> Vec<StepInfo> {
    let mut infos = Vec::new();
    s.run_with(|i, _| {
        infos.push(i.clone());
        true
    })
    .unwrap();
    infos
}

#[test]
fn default_params_match_the_reference() {
    let p = GenerationParams::default();
    assert_eq!(
        (p.steps, p.block_len, p.temperature, p.seed),
        (128, 32, 0.0, 0)
    );
    assert_eq!(p.remasking, Remasking::LowConfidence);
}

#[test]
fn transfer_counts_hand_cases() {
    assert_eq!(transfer_counts(32, 4), vec![8, 8, 8, 8]);
    assert_eq!(transfer_counts(10, 4), vec![3, 3, 2, 2]);
    assert_eq!(transfer_counts(3, 5), vec![1, 1, 1, 0, 0]);
}

#[test]
fn blocks_for_generation_and_infill() {
    let m = canvas_model(1.0);
    // Generation: prompt of 3, 10 masks, block_len 4 → position ranges 3..7, 7..11, 11..13.
    let s = Session::new(
        m.clone(),
        generation_canvas(&[5, 6, 7], 10, MASK),
        params(3, 4),
    )
    .unwrap();
    let blocks: Vec<Vec<usize>> = s.blocks().map(<[usize]>::to_vec).collect();
    assert_eq!(
        blocks,
        vec![vec![3, 4, 5, 6], vec![7, 8, 9, 10], vec![11, 12]]
    );
    assert_eq!(s.generated_positions(), (3..13).collect::<Vec<_>>());
    assert_eq!(s.total_steps(), 3);
    // 6 masks with block_len 32 are one block.
    let s = Session::new(m.clone(), generation_canvas(&[5], 6, MASK), params(5, 32)).unwrap();
    assert_eq!(s.blocks().count(), 1);
    // Infill: masks split by fixed text are grouped by their order, not their positions.
    let canvas = vec![5, MASK, MASK, 6, MASK, MASK, MASK, 7, MASK];
    let s = Session::new(m.clone(), canvas, params(3, 2)).unwrap();
    let blocks: Vec<Vec<usize>> = s.blocks().map(<[usize]>::to_vec).collect();
    assert_eq!(blocks, vec![vec![1, 2], vec![4, 5], vec![6, 8]]);
    let s = Session::new(m, infill_canvas(&[4, 4], 5, &[9, 9, 9], MASK), params(2, 4)).unwrap();
    let blocks: Vec<Vec<usize>> = s.blocks().map(<[usize]>::to_vec).collect();
    assert_eq!(blocks, vec![vec![2, 3, 4, 5], vec![6]]);
}

#[test]
fn indivisible_steps_name_valid_values() {
    let m = canvas_model(1.0);
    let e = Session::new(m.clone(), generation_canvas(&[5], 12, MASK), params(10, 4)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    let msg = e.to_string();
    assert!(
        msg.contains("steps 10") && msg.contains("3 blocks") && msg.contains("3, 6, 9, 12"),
        "{msg}"
    );
    let e = Session::new(m.clone(), generation_canvas(&[5], 12, MASK), params(0, 4)).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("steps"),
        "{e}"
    );
    let e = Session::new(m.clone(), generation_canvas(&[5], 12, MASK), params(3, 0)).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("block_len"),
        "{e}"
    );
    // No masks: nothing to do, any steps accepted, done from the start.
    let mut s = Session::new(m, vec![5, 6], params(0, 4)).unwrap();
    assert!(s.is_done());
    assert_eq!(
        s.step().unwrap(),
        StepInfo {
            step: 0,
            committed: vec![],
            masks_left: 0,
            done: true
        }
    );
}

#[test]
fn bad_canvases_are_rejected() {
    let m = canvas_model(1.0);
    let e = Session::new(m.clone(), vec![], params(1, 4)).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("empty"),
        "{e}"
    );
    let e = Session::new(
        m.clone(),
        generation_canvas(&[5], MAX_LEN, MASK),
        params(MAX_LEN, MAX_LEN),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("65") && e.to_string().contains("max_seq_len 64"),
        "{e}"
    );
    // Exactly max_seq_len is fine.
    assert!(Session::new(
        m.clone(),
        generation_canvas(&[5], MAX_LEN - 1, MASK),
        params(1, 64)
    )
    .is_ok());
    // Ids inside the padded embedding are accepted; beyond it the error names position and id.
    assert!(Session::new(m.clone(), vec![5, (EMB - 1) as u32, MASK], params(1, 4)).is_ok());
    let e = Session::new(m.clone(), vec![5, 6, EMB as u32, MASK], params(1, 4)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    assert!(
        e.to_string().contains("position 2") && e.to_string().contains("id 20"),
        "{e}"
    );
    let bad_t = GenerationParams {
        temperature: f64::NAN,
        ..params(1, 4)
    };
    assert!(Session::new(m, vec![5, MASK], bad_t).is_err());
}

#[test]
fn commit_order_follows_confidence_with_ties_to_lower_position() {
    // One block of 8 masks after a prompt of 2; 4 steps of 2 commits.
    // Confidence by position: p2:1 p3:5 p4:3 p5:5 p6:2 p7:0.5 p8:4 p9:3
    let conf = vec![9.0, 9.0, 1.0, 5.0, 3.0, 5.0, 2.0, 0.5, 4.0, 3.0];
    let m = pattern_model(conf);
    let mut s = Session::new(m.clone(), generation_canvas(&[7, 7], 8, MASK), params(4, 8)).unwrap();
    let infos = run_all(&mut s);
    let committed: Vec<Vec<usize>> = infos.iter().map(|i| i.committed.clone()).collect();
    // Step 0: the tie at 5 takes both; step 1: 4 (p8), then the tie at 3 goes to p4 over p9.
    assert_eq!(
        committed,
        vec![vec![3, 5], vec![4, 8], vec![6, 9], vec![2, 7]]
    );
    assert_eq!(
        infos.iter().map(|i| i.masks_left).collect::<Vec<_>>(),
        vec![6, 4, 2, 0]
    );
    assert_eq!(
        infos.iter().map(|i| i.done).collect::<Vec<_>>(),
        vec![false, false, false, true]
    );
    // Every committed token is the argmax 3 + p % 10, never the mask (logit 50) or padding (60).
    let expect: Vec<u32> = (0..10)
        .map(|p| if p < 2 { 7 } else { 3 + p as u32 % 10 })
        .collect();
    assert_eq!(s.canvas(), expect);
    // Queries were the still-masked positions of the block, keyed by the global step.
    let calls = m.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![
            ((2..10).collect(), 0),
            (vec![2, 4, 6, 7, 8, 9], 1),
            (vec![2, 6, 7, 9], 2),
            (vec![2, 7], 3)
        ]
    );
}

#[test]
fn mask_token_is_never_committed_even_when_largest() {
    for remasking in [Remasking::LowConfidence, Remasking::Random] {
        for temperature in [0.0, 1.0] {
            let m = Mock::new(|_, p| {
                let mut row = vec![0.0f32; EMB];
                row[MASK as usize] = 100.0;
                row[(p * 7) % VOCAB] += 1.0;
                row
            });
            let p = GenerationParams {
                temperature,
                remasking,
                seed: 3,
                ..params(6, 4)
            };
            let mut s = Session::new(m, generation_canvas(&[5], 12, MASK), p).unwrap();
            s.run().unwrap();
            assert_eq!(s.masks_left(), 0);
            for &t in &s.canvas()[1..] {
                assert!(t != MASK && (t as usize) < VOCAB, "committed {t}");
            }
        }
    }
}

#[test]
fn fixed_tokens_never_change_and_every_mask_is_filled() {
    let m = canvas_model(4.0);
    for seed in 0..60u64 {
        let r = |i: u64| rng::bits(seed, 99, i, 0);
        let len = 1 + (r(0) % 40) as usize;
        let canvas: Vec<u32> = (0..len)
            .map(|i| {
                if r(1 + i as u64) % 3 == 0 {
                    3 + (r(100 + i as u64) % 13) as u32
                } else {
                    MASK
                }
            })
            .collect();
        let n_masked = canvas.iter().filter(|&&t| t == MASK).count();
        let block_len = 1 + (r(500) % 8) as usize;
        let blocks = n_masked.div_ceil(block_len);
        let steps = blocks * (1 + (r(501) % 4) as usize);
        let p = GenerationParams {
            steps,
            block_len,
            temperature: [0.0, 0.7][(seed % 2) as usize],
            remasking: [Remasking::LowConfidence, Remasking::Random][(seed / 2 % 2) as usize],
            seed,
            ..Default::default()
        };
        let mut s = Session::new(m.clone(), canvas.clone(), p).unwrap();
        let mut taken = 0;
        s.run_with(|info, c| {
            taken += 1;
            for (i, (&a, &b)) in canvas.iter().zip(c).enumerate() {
                assert!(
                    a == MASK || a == b,
                    "seed {seed}: fixed position {i} changed at step {}",
                    info.step
                );
            }
            true
        })
        .unwrap();
        assert_eq!(taken, s.total_steps());
        assert!(s.is_done() && s.masks_left() == 0, "seed {seed}");
        assert!(s.canvas().iter().all(|&t| t != MASK), "seed {seed}");
    }
}

#[test]
fn seeds_are_deterministic_and_distinct_at_positive_temperature() {
    // Flat logits: at temperature 1 every token is equally likely, so seeds must pick differently.
    let m = Mock::new(|_, _| vec![0.0f32; EMB]);
    let gen = |seed| {
        let p = GenerationParams {
            temperature: 1.0,
            seed,
            ..params(8, 8)
        };
        let mut s = Session::new(m.clone(), generation_canvas(&[5], 16, MASK), p).unwrap();
        let infos = run_all(&mut s);
        (s.canvas().to_vec(), infos)
    };
    assert_eq!(gen(7), gen(7));
    assert_ne!(gen(7).0, gen(8).0);
    // Greedy on random logits is seed-independent.
    let m = canvas_model(3.0);
    let greedy = |seed| {
        let p = GenerationParams {
            seed,
            ..params(8, 8)
        };
        let mut s = Session::new(m.clone(), generation_canvas(&[5], 16, MASK), p).unwrap();
        s.run().unwrap();
        s.into_canvas()
    };
    assert_eq!(greedy(1), greedy(2));
}

#[test]
fn later_blocks_wait_for_their_turn() {
    // Confidence grows with position, so a rule that ignored blocks would commit the tail first.
    let conf: Vec<f32> = (0..MAX_LEN).map(|p| 1.0 + p as f32 * 0.1).collect();
    let m = pattern_model(conf);
    let mut s = Session::new(m, generation_canvas(&[5, 5, 5], 20, MASK), params(8, 6)).unwrap();
    let blocks: Vec<Vec<usize>> = s.blocks().map(<[usize]>::to_vec).collect();
    assert_eq!(blocks.len(), 4);
    let spb = s.total_steps() / blocks.len();
    s.run_with(|info, canvas| {
        let b = info.step / spb;
        assert!(
            info.committed.iter().all(|p| blocks[b].contains(p)),
            "step {}: {:?}",
            info.step,
            info
        );
        for later in &blocks[b + 1..] {
            assert!(
                later.iter().all(|&p| canvas[p] == MASK),
                "step {}",
                info.step
            );
        }
        if info.step % spb == spb - 1 {
            assert!(
                blocks[b].iter().all(|&p| canvas[p] != MASK),
                "block {b} not full at its end"
            );
        }
        true
    })
    .unwrap();
}

#[test]
fn zero_count_steps_run_no_forward_but_count() {
    // 3 masks over 5 steps: counts 1,1,1,0,0.
    let m = canvas_model(1.0);
    let mut s = Session::new(m.clone(), generation_canvas(&[5], 3, MASK), params(5, 32)).unwrap();
    let infos = run_all(&mut s);
    assert_eq!(
        infos.iter().map(|i| i.committed.len()).collect::<Vec<_>>(),
        vec![1, 1, 1, 0, 0]
    );
    assert_eq!(
        infos.iter().map(|i| i.step).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(m.forwards.load(Ordering::SeqCst), 3);
    assert_eq!((s.steps_taken(), s.total_steps()), (5, 5));
    // Two blocks of 3 with 10 steps: the second block starts at global step 5.
    let m = canvas_model(1.0);
    let mut s = Session::new(m.clone(), generation_canvas(&[5], 6, MASK), params(10, 3)).unwrap();
    s.run().unwrap();
    let steps: Vec<u64> = m.calls.lock().unwrap().iter().map(|c| c.1).collect();
    assert_eq!(steps, vec![0, 1, 2, 5, 6, 7]);
}

#[test]
fn finished_session_step_is_a_no_op() {
    let m = canvas_model(1.0);
    let mut s = Session::new(m.clone(), generation_canvas(&[5], 4, MASK), params(2, 4)).unwrap();
    s.run().unwrap();
    let before = s.canvas().to_vec();
    let forwards = m.forwards.load(Ordering::SeqCst);
    for _ in 0..3 {
        let info = s.step().unwrap();
        assert_eq!(
            info,
            StepInfo {
                step: 2,
                committed: vec![],
                masks_left: 0,
                done: true
            }
        );
    }
    assert_eq!(s.canvas(), before);
    assert_eq!(m.forwards.load(Ordering::SeqCst), forwards);
    assert_eq!(s.steps_taken(), 2);
}

#[test]
fn observer_can_stop_and_the_session_resumes() {
    let m = canvas_model(2.0);
    let make = || {
        Session::new(
            m.clone(),
            generation_canvas(&[5, 6], 12, MASK),
            params(6, 4),
        )
        .unwrap()
    };
    let mut full = make();
    full.run().unwrap();
    let mut s = make();
    let mut seen = 0;
    s.run_with(|_, _| {
        seen += 1;
        seen < 2
    })
    .unwrap();
    assert_eq!((seen, s.steps_taken(), s.is_done()), (2, 2, false));
    s.run().unwrap();
    assert_eq!(s.canvas(), full.canvas());
}

/// A model that breaks the contract by choosing the mask token.
struct Rogue(ModelConfig);

impl Model for Rogue {
    fn config(&self) -> &ModelConfig {
        &self.0
    }
    fn backend_name(&self) -> &'static str {
        "rogue"
    }
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(vec![0.0; ids.len() * EMB])
    }
    fn predict(&self, _: &[u32], queries: &[usize], _: &PredictRule) -> Result<Vec<Prediction>> {
        Ok(queries
            .iter()
            .map(|_| Prediction {
                token: MASK,
                confidence: 1.0,
            })
            .collect())
    }
}

#[test]
#[cfg(not(debug_assertions))]
fn a_backend_choosing_the_mask_is_an_error() {
    let mut s = Session::new(Arc::new(Rogue(tiny_config())), vec![5, MASK], params(1, 4)).unwrap();
    let e = s.step().unwrap_err();
    assert!(matches!(e, Error::Backend(_)), "{e}");
    assert_eq!((s.canvas(), s.steps_taken()), (&[5, MASK][..], 0));
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "backend chose token 1")]
fn a_backend_choosing_the_mask_trips_the_debug_assertion() {
    let mut s = Session::new(Arc::new(Rogue(tiny_config())), vec![5, MASK], params(1, 4)).unwrap();
    let _ = s.step();
}

/// Naive transcription of the reference loop over whole arrays: per step, confidence for every
/// position, −∞ outside the current block's masked positions, then k rounds of "take the max,
/// lowest position on ties". Blocks are recomputed from scratch by counting masks.
fn naive_generate(model: &dyn Model, canvas: &[u32], p: &GenerationParams) -> Vec<u32> {
    let (mask, vocab, width) = {
        let c = model.config();
        (c.mask_token_id, c.vocab_size, c.logits_width())
    };
    let mut x = canvas.to_vec();
    let masked: Vec<usize> = (0..x.len()).filter(|&i| x[i] == mask).collect();
    if masked.is_empty() {
        return x;
    }
    let n_blocks = masked.len().div_ceil(p.block_len);
    let spb = p.steps / n_blocks;
    for b in 0..n_blocks {
        let block: Vec<usize> = masked
            .iter()
            .copied()
            .skip(b * p.block_len)
            .take(p.block_len)
            .collect();
        let n = block.len();
        for i in 0..spb {
            let k = n / spb + usize::from(i < n % spb);
            if k == 0 {
                continue;
            }
            let rule = PredictRule {
                temperature: p.temperature,
                remasking: p.remasking,
                seed: p.seed,
                step: (b * spb + i) as u64,
                mask_token: mask,
                vocab_size: vocab,
            };
            let logits = model.forward(&x).unwrap();
            let mut conf = vec![f64::NEG_INFINITY; x.len()];
            let mut x0 = x.clone();
            for q in 0..x.len() {
                if x[q] == mask && block.contains(&q) {
                    let pr = predict_row(&logits[q * width..(q + 1) * width], q, &rule);
                    conf[q] = pr.confidence;
                    x0[q] = pr.token;
                }
            }
            for _ in 0..k {
                let mut best = None;
                for q in 0..x.len() {
                    let better = match best {
                        None => true,
                        Some(bq) => conf[q] > conf[bq],
                    };
                    if conf[q] > f64::NEG_INFINITY && better {
                        best = Some(q);
                    }
                }
                let q = best.unwrap();
                x[q] = x0[q];
                conf[q] = f64::NEG_INFINITY;
            }
        }
    }
    x
}

#[test]
fn matches_a_naive_reference_loop() {
    let m = canvas_model(6.0);
    for seed in 0..40u64 {
        let r = |i: u64| rng::bits(seed, 7, i, 0);
        let prompt: Vec<u32> = (0..1 + r(0) % 5)
            .map(|i| 3 + (r(10 + i) % 12) as u32)
            .collect();
        let suffix: Vec<u32> = (0..r(1) % 4).map(|i| 3 + (r(20 + i) % 12) as u32).collect();
        let n = 1 + (r(2) % 20) as usize;
        let canvas = infill_canvas(&prompt, n, &suffix, MASK);
        let block_len = 1 + (r(3) % 9) as usize;
        let steps = n.div_ceil(block_len) * (1 + (r(4) % 5) as usize);
        let p = GenerationParams {
            steps,
            block_len,
            temperature: [0.0, 0.5, 1.0][(seed % 3) as usize],
            remasking: [Remasking::LowConfidence, Remasking::Random][(seed / 3 % 2) as usize],
            seed,
            ..Default::default()
        };
        let mut s = Session::new(m.clone(), canvas.clone(), p.clone()).unwrap();
        s.run().unwrap();
        assert_eq!(
            s.canvas(),
            naive_generate(m.as_ref(), &canvas, &p),
            "seed {seed} params {p:?}"
        );
    }
}

#[test]
fn tiny_llada_session_matches_the_naive_loop() {
    // The real CPU model overrides `predict` (logits of the queried rows only); the session must
    // agree with the naive loop over full-canvas logits.
    let dir = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/tiny-llada-code"
    ));
    let model: Arc<dyn Model> = Arc::new(dllm::model::llada::Llada::load(dir).unwrap());
    let mask = model.config().mask_token_id;
    let canvas = infill_canvas(&[3, 40, 41, 300], 8, &[500, 12], mask);
    for (seed, temperature) in [(0u64, 0.0), (5, 0.8)] {
        let p = GenerationParams {
            steps: 4,
            block_len: 4,
            temperature,
            seed,
            ..Default::default()
        };
        let mut s = Session::new(model.clone(), canvas.clone(), p.clone()).unwrap();
        s.run().unwrap();
        assert_eq!(s.masks_left(), 0);
        assert_eq!(
            s.canvas(),
            naive_generate(model.as_ref(), &canvas, &p),
            "seed {seed}"
        );
    }
}
