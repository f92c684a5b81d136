//! Decoding strategies of `dllm::denoise` (parallel commit rules, margin/entropy confidence,
//! top-k/top-p, classifier-free guidance, stop at EOS) against mock models with hand-made
//! logits, seeded property loops, and the `fill` / `edit` commands end to end.

use dllm::config::ModelConfig;
use dllm::denoise::predict::{predict_row, PredictRule, Prediction, SampleFilter};
use dllm::denoise::rng;
use dllm::denoise::{CommitPolicy, CreditParams, Decoding, GenerationParams, Remasking, Session};
use dllm::error::Result;
use dllm::model::Model;
use serde_json::json;
use std::process::Output;
use std::sync::{Arc, Mutex};

const MASK: u32 = 1;
const EOS: u32 = 0;
const VOCAB: usize = 16;
const EMB: usize = 20;
const NEG: f32 = f32::NEG_INFINITY;

type LogitsFn = dyn Fn(&[u32], usize) -> Vec<f32> + Send + Sync;

/// A model whose logits row at position `p` is `f(canvas, p)`; it records every forward's
/// canvas and every predict call's step index.
struct Mock {
    cfg: ModelConfig,
    f: Box<LogitsFn>,
    canvases: Mutex<Vec<Vec<u32>>>,
    predict_steps: Mutex<Vec<u64>>,
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
        canvases: Mutex::new(Vec::new()),
        predict_steps: Mutex::new(Vec::new()),
    })
}

impl Model for Mock {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn backend_name(&self) -> &'static str {
        "mock"
    }
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.canvases.lock().unwrap().push(ids.to_vec());
        Ok((0..ids.len()).flat_map(|p| (self.f)(ids, p)).collect())
    }
    fn predict(&self, ids: &[u32], q: &[usize], rule: &PredictRule) -> Result<Vec<Prediction>> {
        self.predict_steps.lock().unwrap().push(rule.step);
        let l = self.forward(ids)?;
        Ok(q.iter()
            .map(|&p| predict_row(&l[p * EMB..(p + 1) * EMB], p, rule))
            .collect())
    }
}

/// Row with the given `(token, logit)` entries and every other entry at −∞.
fn row(entries: &[(usize, f32)]) -> Vec<f32> {
    let mut r = vec![NEG; EMB];
    for &(t, l) in entries {
        r[t] = l;
    }
    r
}

/// Token `3 + p % 10` at position `p`; logit 10 (probability 0.9991 against 19 zero logits) on
/// the positions of `sure`, else 0 (probability 0.05): a hand-made confident / unsure split.
fn split_model(sure: &'static [usize]) -> Arc<Mock> {
    mock(move |_, p| {
        let mut r = vec![0.0f32; EMB];
        r[3 + p % 10] = if sure.contains(&p) { 10.0 } else { 0.0 };
        r[MASK as usize] = NEG;
        r
    })
}

fn params(steps: usize, block_len: usize) -> GenerationParams {
    GenerationParams {
        steps,
        block_len,
        ..Default::default()
    }
}

fn session(m: Arc<Mock>, canvas: Vec<u32>, p: GenerationParams, d: Decoding) -> Session {
    let mut s = Session::new(m, canvas, p).unwrap();
    s.set_decoding(d).unwrap();
    s
}

fn commit(c: CommitPolicy) -> Decoding {
    Decoding {
        commit: c,
        ..Default::default()
    }
}

/// Runs to the end, returning the committed positions of every step.
fn run(s: &mut Session) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    s.run_with(|i, _| {
        out.push(i.committed.clone());
        true
    })
    .unwrap();
    out
}

fn canvas(prompt: usize, gen: usize) -> Vec<u32> {
    let mut c: Vec<u32> = (0..prompt).map(|i| 3 + i as u32 % 10).collect();
    c.resize(prompt + gen, MASK);
    c
}

#[test]
fn credit_lifts_a_steady_prediction_past_the_threshold() {
    // Every masked position predicts token 5 with probability 0.8 (token 6 has 0.2), every
    // forward. Threshold 0.9 alone commits one position per forward: 4 forwards for 4 masks.
    // With dInfer's credit (alpha 0.7, gamma 0.2, decay 0.8) each forward adds 0.8^0.2 = 0.95635
    // to token 5's credit C after decaying it, and the fused probability is
    // 0.8·(1 + C)^0.7 / (0.8·(1 + C)^0.7 + 0.2):
    //   forward 1: C = 0.95635, 0.8648 → the most confident only;
    //   forward 2: C = 1.72143, 0.8896 → again one;
    //   forward 3: C = 2.33349, 0.9028 → both left. 3 forwards.
    let steady = || mock(|_, _| row(&[(5, 0.8f32.ln()), (6, 0.2f32.ln())]));
    let d = |credit| Decoding {
        commit: CommitPolicy::Threshold(0.9),
        credit,
        ..Default::default()
    };
    let plain = run(&mut session(steady(), canvas(1, 4), params(4, 4), d(None)));
    assert_eq!(plain.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1, 1]);
    let credited = run(&mut session(
        steady(),
        canvas(1, 4),
        params(4, 4),
        d(Some(CreditParams::default())),
    ));
    let counts: Vec<usize> = credited.iter().map(Vec::len).collect();
    assert_eq!(counts[..3], [1, 1, 2], "{credited:?}");
    assert!(counts[3..].iter().all(|&c| c == 0), "{credited:?}");
    // Decay 0 keeps only the current forward's credit: 0.8648 every time, one per forward.
    let forgetful = CreditParams {
        decay: 0.0,
        ..Default::default()
    };
    let once = run(&mut session(
        steady(),
        canvas(1, 4),
        params(4, 4),
        d(Some(forgetful)),
    ));
    assert_eq!(once.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1, 1]);
}

#[test]
fn threshold_commits_the_confident_then_at_least_one() {
    // Canvas 2 prompt + 8 masks (positions 2..10); sure at 3, 6, 7.
    let m = split_model(&[3, 6, 7]);
    let mut s = session(
        m.clone(),
        canvas(2, 8),
        params(8, 8),
        commit(CommitPolicy::Threshold(0.9)),
    );
    let steps = run(&mut s);
    // Step 0: the three sure ones; then one per step, ties to the lowest position.
    assert_eq!(
        steps,
        vec![vec![3, 6, 7], vec![2], vec![4], vec![5], vec![8], vec![9]]
    );
    assert_eq!(
        (s.forward_steps(), s.masks_left(), s.is_done()),
        (6, 0, true)
    );
    // `steps` is an upper bound: with 4 steps the least count is ceil(masks left / steps left).
    let mut s = session(
        m,
        canvas(2, 8),
        params(4, 8),
        commit(CommitPolicy::Threshold(0.9)),
    );
    let steps = run(&mut s);
    assert_eq!(steps, vec![vec![3, 6, 7], vec![2, 4], vec![5, 8], vec![9]]);
}

#[test]
fn dynamic_blocks_end_early_and_keep_step_keys() {
    // Everything sure: each block of 4 finishes in one step; the next block starts at its own
    // scheduled step index (4), so random draws stay keyed as in the schedule.
    let m = split_model(&[2, 3, 4, 5, 6, 7, 8, 9]);
    let mut s = session(
        m.clone(),
        canvas(2, 8),
        params(8, 4),
        commit(CommitPolicy::Threshold(0.5)),
    );
    let steps = run(&mut s);
    assert_eq!(steps, vec![vec![2, 3, 4, 5], vec![6, 7, 8, 9]]);
    assert_eq!(*m.predict_steps.lock().unwrap(), vec![0, 4]);
    assert_eq!(
        (s.forward_steps(), s.steps_taken(), s.is_done()),
        (2, 8, true)
    );
}

#[test]
fn factor_rule_in_a_session() {
    // Ranked confidences 0.9991 ×3 then 0.05 ×5; F = 1 bounds 0.5, 0.667, 0.75, 0.8, …: the
    // three sure ones pass, 0.05 fails → 3, then one per step.
    let m = split_model(&[3, 6, 7]);
    let mut s = session(
        m.clone(),
        canvas(2, 8),
        params(8, 8),
        commit(CommitPolicy::Factor(1.0)),
    );
    assert_eq!(run(&mut s)[0], vec![3, 6, 7]);
    // F = 20: bounds 1 − 20/(i+1) < 0.05 for i ≤ 8 → everything at once.
    let mut s = session(
        m,
        canvas(2, 8),
        params(8, 8),
        commit(CommitPolicy::Factor(20.0)),
    );
    assert_eq!(run(&mut s), vec![(2..10).collect::<Vec<_>>()]);
}

#[test]
fn margin_and_entropy_rank_differently_from_low_confidence() {
    // Position 1: probabilities 0.5 / 0.5 (top-1 0.5, margin 0, Σp ln p = −0.693).
    // Position 2: 0.6 and 14 × 0.4/14 (top-1 0.6, margin 0.571, Σp ln p = −1.729).
    let m = mock(|_, p| match p {
        1 => row(&[(3, 0.5f32.ln()), (4, 0.5f32.ln())]),
        _ => {
            let mut entries = vec![(5usize, 0.6f32.ln())];
            entries.extend(
                [0usize, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
                    .iter()
                    .map(|&t| (t, (0.4f32 / 14.0).ln())),
            );
            row(&entries)
        }
    });
    let first = |remasking| {
        let p = GenerationParams {
            remasking,
            ..params(2, 2)
        };
        let mut s = session(m.clone(), vec![7, MASK, MASK], p, Decoding::default());
        run(&mut s)[0].clone()
    };
    assert_eq!(first(Remasking::LowConfidence), vec![2]);
    assert_eq!(first(Remasking::Margin), vec![2]);
    assert_eq!(first(Remasking::Entropy), vec![1]);
}

/// Pseudo-random logits depending on the position and the whole canvas.
fn canvas_model(scale: f32) -> Arc<Mock> {
    mock(move |ids, p| {
        let h = ids.iter().fold(0u64, |h, &t| rng::mix64(h ^ t as u64));
        (0..EMB)
            .map(|j| (rng::uniform(h, 0, p as u64, j as u64) as f32 - 0.5) * scale)
            .collect()
    })
}

#[test]
fn top_k_one_sampling_is_greedy_and_uses_host_logits() {
    let m = canvas_model(6.0);
    let mut greedy = session(m.clone(), canvas(3, 12), params(6, 4), Decoding::default());
    greedy.run().unwrap();
    let d = Decoding {
        filter: SampleFilter {
            top_k: 1,
            top_p: 1.0,
        },
        ..Default::default()
    };
    let p = GenerationParams {
        temperature: 1.0,
        seed: 9,
        ..params(6, 4)
    };
    let m2 = canvas_model(6.0);
    let mut s = session(m2.clone(), canvas(3, 12), p.clone(), d);
    s.run().unwrap();
    assert_eq!(s.canvas(), greedy.canvas());
    assert!(
        m2.predict_steps.lock().unwrap().is_empty(),
        "filters go through forward"
    );
    // Without the filter, T = 1 sampling differs from greedy on this canvas.
    let mut t = session(canvas_model(6.0), canvas(3, 12), p, Decoding::default());
    t.run().unwrap();
    assert_ne!(t.canvas(), greedy.canvas());
}

#[test]
fn guidance_combines_conditional_and_unconditional_logits() {
    // Position 2 sees the prompt (position 0 not masked): token 3 logit 2, token 4 logit 1.9;
    // unconditional (prompt masked): token 3 logit 2, token 4 logit 0. At s = 1:
    // token 3 → 2 + 2·0 = 2, token 4 → 0 + 2·1.9 = 3.8: guidance flips the choice to 4.
    let m = mock(|ids, _| {
        if ids[0] == MASK {
            row(&[(3, 2.0), (4, 0.0), (5, -1.0)])
        } else {
            row(&[(3, 2.0), (4, 1.9), (5, -1.0)])
        }
    });
    let mut plain = session(
        m.clone(),
        vec![9, 8, MASK],
        params(1, 1),
        Decoding::default(),
    );
    plain.run().unwrap();
    assert_eq!(plain.canvas()[2], 3);
    m.canvases.lock().unwrap().clear();
    let d = Decoding {
        cfg_scale: 1.0,
        ..Default::default()
    };
    let mut s = session(m.clone(), vec![9, 8, MASK], params(1, 1), d);
    s.run().unwrap();
    assert_eq!(s.canvas()[2], 4);
    assert_eq!(
        *m.canvases.lock().unwrap(),
        vec![vec![9, 8, MASK], vec![MASK, MASK, MASK]],
        "conditional then unconditional pass"
    );
    assert_eq!(dllm::denoise::session::cfg_combine(1.9, 0.0, 1.0), 3.8);
    assert_eq!(dllm::denoise::session::cfg_combine(NEG, NEG, 1.0), NEG);
}

#[test]
fn stop_at_eos_fills_the_rest_once_the_prefix_is_committed() {
    // Masks at 2..10. EOS at 5 is the most confident; 2, 3, 4 next; 6..9 ordinary tokens.
    let m = mock(|_, p| match p {
        5 => row(&[(EOS as usize, 9.0), (3, 0.0)]),
        2..=4 => row(&[(4, 5.0), (3, 0.0)]),
        _ => row(&[(6, 1.0), (3, 0.0)]),
    });
    let d = Decoding {
        stop_at_eos: true,
        ..Default::default()
    };
    let mut s = session(m.clone(), canvas(2, 8), params(8, 8), d);
    let steps = run(&mut s);
    // EOS first (nothing stops: 2..4 are open), then 2, 3, 4 → stop, 6..9 become EOS.
    assert_eq!(steps, vec![vec![5], vec![2], vec![3], vec![4]]);
    assert!(s.is_done());
    assert_eq!(&s.canvas()[2..], &[4, 4, 4, EOS, EOS, EOS, EOS, EOS]);
    assert_eq!(s.forward_steps(), 4);
    // Without the option all 8 steps run and 6..9 keep their tokens.
    let mut s = session(m, canvas(2, 8), params(8, 8), Decoding::default());
    s.run().unwrap();
    assert_eq!(&s.canvas()[6..], &[6, 6, 6, 6]);
}

#[test]
fn stop_at_eos_ends_only_the_gap_it_is_in() {
    // Two gaps, 2..6 and 7..11, fixed text at 0, 1 and 6. EOS at 3 is the most confident, then
    // 2; the second gap's positions predict ordinary tokens.
    let m = mock(|_, p| match p {
        3 => row(&[(EOS as usize, 9.0), (3, 0.0)]),
        2 => row(&[(4, 5.0), (3, 0.0)]),
        _ => row(&[(6, 1.0), (3, 0.0)]),
    });
    let d = Decoding {
        stop_at_eos: true,
        ..Default::default()
    };
    let canvas = vec![9, 8, MASK, MASK, MASK, MASK, 7, MASK, MASK, MASK, MASK];
    let mut s = session(m, canvas, params(8, 8), d);
    s.run().unwrap();
    // The first gap ends at its EOS; the second keeps its own tokens.
    assert_eq!(&s.canvas()[2..6], &[4, EOS, EOS, EOS]);
    assert_eq!(s.canvas()[6], 7);
    assert_eq!(&s.canvas()[7..], &[6, 6, 6, 6]);
    assert!(s.is_done());
    // 2 forwards for the first gap (3, then 2: the stop fills 4, 5), 4 for the second.
    assert_eq!(s.forward_steps(), 6);
}

#[test]
fn bad_decoding_options_are_rejected() {
    let mut s = Session::new(split_model(&[]), canvas(1, 2), params(2, 2)).unwrap();
    for (d, needle) in [
        (commit(CommitPolicy::Threshold(f64::NAN)), "threshold"),
        (commit(CommitPolicy::Factor(0.0)), "factor"),
        (
            Decoding {
                filter: SampleFilter {
                    top_k: 0,
                    top_p: 0.0,
                },
                ..Default::default()
            },
            "top_p",
        ),
        (
            Decoding {
                cfg_scale: -1.0,
                ..Default::default()
            },
            "cfg_scale",
        ),
    ] {
        let e = s.set_decoding(d).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    assert_eq!(s.decoding(), &Decoding::default());
}

#[test]
fn property_fixed_positions_never_change_masks_only_fall_and_runs_terminate() {
    for seed in 0..60u64 {
        let u = |i: u64| rng::uniform(seed, 99, i, 0);
        let len = 4 + (u(0) * 20.0) as usize;
        let mut c: Vec<u32> = (0..len)
            .map(|i| {
                if u(10 + i as u64) < 0.6 {
                    MASK
                } else {
                    3 + (i % 10) as u32
                }
            })
            .collect();
        c[0] = 5;
        let n_masks = c.iter().filter(|&&t| t == MASK).count();
        let block_len = 1 + (u(1) * 6.0) as usize;
        let blocks = n_masks.div_ceil(block_len).max(1);
        let steps = blocks * (1 + (u(2) * 4.0) as usize);
        let p = GenerationParams {
            steps,
            block_len,
            temperature: if u(3) < 0.5 { 0.0 } else { 0.8 },
            remasking: [
                Remasking::LowConfidence,
                Remasking::Random,
                Remasking::Margin,
                Remasking::Entropy,
            ][(u(4) * 4.0) as usize],
            seed,
            ..Default::default()
        };
        let d = Decoding {
            commit: match (u(5) * 3.0) as usize {
                0 => CommitPolicy::Schedule,
                1 => CommitPolicy::Threshold(u(6)),
                _ => CommitPolicy::Factor(0.1 + u(6) * 2.0),
            },
            filter: SampleFilter {
                top_k: (u(7) * 4.0) as usize,
                top_p: 0.3 + 0.7 * u(8),
            },
            cfg_scale: if u(9) < 0.3 { 1.5 } else { 0.0 },
            stop_at_eos: u(11) < 0.5,
            revise: None,
            ..Decoding::default()
        };
        let m = canvas_model(4.0);
        let mut s = session(m, c.clone(), p, d.clone());
        // Lock one masked and one prompt position.
        let gen = s.generated_positions().to_vec();
        let mut fixed: Vec<(usize, u32)> = c
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != MASK)
            .map(|(i, &t)| (i, t))
            .collect();
        if let Some(&g) = gen.get(gen.len() / 2) {
            s.lock(g, 7).unwrap();
            fixed.push((g, 7));
        }
        s.lock(0, 6).unwrap();
        fixed.retain(|&(i, _)| i != 0);
        fixed.push((0, 6));
        let mut prev = s.masks_left();
        let mut calls = 0;
        while !s.is_done() {
            let info = s.step().unwrap();
            calls += 1;
            assert!(
                calls <= steps,
                "seed {seed}: more steps than the bound {steps}"
            );
            let cv = s.canvas();
            for &(i, t) in &fixed {
                assert_eq!(cv[i], t, "seed {seed}: fixed position {i} changed ({d:?})");
            }
            assert!(info.masks_left <= prev, "seed {seed}: masks grew");
            assert_eq!(info.masks_left, cv.iter().filter(|&&t| t == MASK).count());
            assert!(cv.iter().all(|&t| (t as usize) < VOCAB));
            prev = info.masks_left;
        }
        assert_eq!(s.masks_left(), 0, "seed {seed}: masks left at the end");
        assert!(s.forward_steps() <= steps);
    }
}

// ----------------------------------------------------------------------------------------------
// The CLI end to end (tiny model, CPU, few steps).

mod common;
use common::{canvas_ids as ids, json_ok, run_dllm, stdout_ok, MODEL};

fn dllm(args: &[&str]) -> Output {
    let args = [args, &["--model", MODEL, "--backend", "cpu", "--quiet"]].concat();
    run_dllm(&args, None)
}

fn json_of(out: &Output) -> serde_json::Value {
    json_ok(out)
}

#[test]
fn fill_canvas_keeps_text_and_generate_is_sugar() {
    let tok = dllm::tokenizer::Tokenizer::from_model_dir(MODEL.as_ref()).unwrap();
    let (a, b) = ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n");
    let v = json_of(&dllm(&[
        "fill",
        "--canvas",
        "def add(a, b):\\n    return [MASK:3]\\n\\nprint(add(1, 2))\\n",
        "--steps",
        "3",
        "--block-len",
        "3",
        "--json",
    ]));
    let (ta, tb) = (tok.encode(a).unwrap(), tok.encode(b).unwrap());
    let c = ids(&v);
    assert_eq!(c.len(), ta.len() + 3 + tb.len());
    assert_eq!(&c[..ta.len()], &ta[..]);
    assert_eq!(&c[ta.len() + 3..], &tb[..]);
    assert!(!c.contains(&MASK));
    assert_eq!(v["generated_tokens"].as_u64(), Some(3));
    // infill is the same canvas.
    let w = json_of(&dllm(&[
        "infill",
        "--prefix",
        a,
        "--suffix",
        b,
        "--gen-len",
        "3",
        "--steps",
        "3",
        "--block-len",
        "3",
        "--json",
    ]));
    assert_eq!(ids(&w), c);
    // generate = PROMPT[MASK:n], with a parallel rule: forward steps within the bound.
    let g = json_of(&dllm(&[
        "generate",
        "--prompt",
        "import os",
        "--gen-len",
        "4",
        "--steps",
        "4",
        "--block-len",
        "4",
        "--threshold",
        "0.3",
        "--json",
    ]));
    let f = json_of(&dllm(&[
        "fill",
        "--canvas",
        "import os[MASK:4]",
        "--steps",
        "4",
        "--block-len",
        "4",
        "--threshold",
        "0.3",
        "--json",
    ]));
    assert_eq!(ids(&g), ids(&f));
    let fw = g["forward_steps"].as_u64().unwrap();
    assert!((1..=4).contains(&fw), "{fw}");
}

#[test]
fn edit_regenerates_only_the_widened_span() {
    let tok = dllm::tokenizer::Tokenizer::from_model_dir(MODEL.as_ref()).unwrap();
    let text = "def add(a, b):\n    return a + b\n";
    let path = std::env::temp_dir().join(format!("dllm-edit-{}.py", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let orig = tok.encode(text).unwrap();
    // Bytes 26..28 ("+ ") of "return a + b".
    let v = json_of(&dllm(&[
        "edit",
        "--text-file",
        path.to_str().unwrap(),
        "--span",
        "26..28",
        "--steps",
        "2",
        "--block-len",
        "32",
        "--json",
    ]));
    let c = ids(&v);
    assert_eq!(c.len(), orig.len());
    // The tokens overlapping bytes 26..28, by the decoded prefix lengths.
    let ends: Vec<usize> = (1..=orig.len())
        .map(|i| tok.decode(&orig[..i], false).unwrap().len())
        .collect();
    let span: Vec<usize> = (0..orig.len())
        .filter(|&i| {
            let b0 = if i == 0 { 0 } else { ends[i - 1] };
            ends[i] > 26 && b0 < 28
        })
        .collect();
    assert!(!span.is_empty());
    assert_eq!(v["generated_tokens"].as_u64(), Some(span.len() as u64));
    for i in 0..orig.len() {
        if !span.contains(&i) {
            assert_eq!(c[i], orig[i], "token {i} outside the span changed");
        }
    }
    assert!(!c.contains(&MASK));
    // Bad spans and canvases: one clear error line, no panic.
    for (args, needle) in [
        (
            vec![
                "edit",
                "--text-file",
                path.to_str().unwrap(),
                "--span",
                "9..3",
            ],
            "--span",
        ),
        (
            vec![
                "edit",
                "--text-file",
                path.to_str().unwrap(),
                "--span",
                "0..999",
            ],
            "--span",
        ),
        (
            vec![
                "edit",
                "--text-file",
                path.to_str().unwrap(),
                "--span",
                "5..5",
            ],
            "is empty",
        ),
        (
            vec![
                "edit",
                "--text-file",
                path.to_str().unwrap(),
                "--span",
                "0..3",
                "--gen-len",
                "3",
            ],
            "--gen-len does not apply to edit",
        ),
        (
            vec!["fill", "--canvas", "x[MASK:2]", "--gen-len", "9"],
            "--gen-len does not apply to fill",
        ),
        (vec!["fill", "--canvas", "x[MASK:0]"], "[MASK:"),
        (vec!["fill", "--canvas", "no gap"], "no gap"),
        (
            vec!["fill", "--canvas", "x[MASK:2]", "--top-p", "0"],
            "top_p",
        ),
    ] {
        let out = dllm(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(needle), "{needle} not in {}", lines[0]);
    }
    std::fs::remove_file(&path).ok();
}

#[test]
fn edit_keeps_special_token_text_outside_the_span_and_prints_the_file_byte_for_byte() {
    // A file whose fixed text spells special tokens: they stay text (a "<|mask|>" string is not
    // a gap, a "<|endoftext|>" string is not dropped), and the output is the file with only the
    // span changed: no newline added after it.
    let text = "m = \"<|mask|>\"\ne = \"<|endoftext|>\"\nz = 2\n";
    let path = std::env::temp_dir().join(format!("dllm-edit-special-{}.py", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let span = text.find("z = 2").unwrap();
    let span_arg = format!("{span}..{}", span + 5);
    let args = [
        "edit",
        "--text-file",
        path.to_str().unwrap(),
        "--span",
        &span_arg,
        "--steps",
        "4",
    ];
    let out = dllm(&args);
    let printed = stdout_ok(&out);
    assert!(printed.starts_with(&text[..span]), "{printed:?}");
    assert!(
        printed.ends_with('\n') && !printed.ends_with("\n\n"),
        "{printed:?}"
    );
    let v = json_of(&dllm(&[&args[..], &["--json"]].concat()));
    // Only the tokens of "z = 2" were generated (the prefix's special-looking text is fixed).
    let tok = dllm::tokenizer::Tokenizer::from_model_dir(MODEL.as_ref()).unwrap();
    let fixed = tok.encode_literal(&text[..span]).unwrap().len();
    let total = tok.encode_literal(text).unwrap().len();
    let generated = v["generated_tokens"].as_u64().unwrap() as usize;
    assert!(generated >= 1 && generated <= total - fixed, "{v}");
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap() as usize,
        total - generated
    );
    std::fs::remove_file(&path).ok();
}
