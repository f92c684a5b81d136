//! Batching: `Model::predict_batch` (one packed CPU forward over canvases of different lengths)
//! against `predict` on each canvas, `denoise::batch::run_batch` against running each session
//! alone, and `dllm generate --batch-file` against one `generate` per prompt.

use dllm::denoise::batch::{run_batch, solo_sessions, step_round};
use dllm::denoise::predict::{PredictRule, Remasking};
use dllm::denoise::{CacheMode, CommitPolicy, CreditParams, Decoding, GenerationParams, Session};
use dllm::error::ErrorKind;
use dllm::model::{load_cpu, BatchQuery, Model};
use dllm::synth::{synth_checkpoint, Preset};
use std::path::Path;
use std::sync::Arc;

mod common;
use common::{run_dllm, succeeded, MODEL};

fn llada() -> Arc<dyn Model> {
    load_cpu(Path::new(MODEL)).unwrap()
}

/// `n` deterministic ordinary ids (never the mask), then `gen` masks.
fn canvas(m: &dyn Model, seed: u32, n: usize, gen: usize) -> Vec<u32> {
    let cfg = m.config();
    let mut c: Vec<u32> = (0..n as u32)
        .map(|i| 3 + (i * 97 + seed * 31) % (cfg.vocab_size as u32 - 8))
        .filter(|&t| t != cfg.mask_token_id)
        .collect();
    c.resize(c.len() + gen, cfg.mask_token_id);
    c
}

fn rule(m: &dyn Model, temperature: f64, remasking: Remasking, step: u64) -> PredictRule {
    PredictRule {
        temperature,
        remasking,
        seed: 11,
        step,
        mask_token: m.config().mask_token_id,
        vocab_size: m.config().vocab_size,
    }
}

/// A packed batch whose activations would not fit in the host's available memory is refused
/// with an out-of-memory error before anything big is allocated (a failed host allocation
/// aborts the process: a C program embedding dllm would die with it).
#[cfg(target_os = "linux")]
#[test]
fn a_batch_too_big_for_the_host_is_refused_not_aborted() {
    let m = llada();
    let cfg = m.config().clone();
    let free = dllm::memory::host_memory().unwrap().free;
    let seq = cfg.max_seq_len;
    // Enough canvases that the f32 residual stream alone (rows · d_model · 4 bytes) exceeds the
    // available memory by a quarter.
    let batch = (free / 4 * 5 / (4 * cfg.d_model as u64 * seq as u64) + 1) as usize;
    let c = canvas(&*m, 1, seq - 8, 8);
    assert_eq!(c.len(), seq);
    let queries = [seq - 1];
    let r = rule(&*m, 0.0, Remasking::LowConfidence, 0);
    let items: Vec<BatchQuery<'_>> = (0..batch)
        .map(|_| BatchQuery {
            ids: &c,
            queries: &queries,
            rule: &r,
        })
        .collect();
    let e = m.predict_batch(&items).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("activations of {} rows", batch * seq))
            && msg.contains("the host has"),
        "{msg}"
    );
    // The model is unharmed: a one-canvas batch runs.
    assert_eq!(m.predict_batch(&items[..1]).unwrap().len(), 1);
}

/// The same through the C ABI: `dllm_sessions_step` over that many sessions returns
/// `DLLM_ERR_OUT_OF_MEMORY` with a message naming the sizes, and the sessions are unchanged
/// (each then steps alone).
#[cfg(target_os = "linux")]
#[test]
fn the_c_abi_reports_a_batch_too_big_for_the_host_as_out_of_memory() {
    use dllm::ffi::*;
    use std::ffi::{CStr, CString};
    let free = dllm::memory::host_memory().unwrap().free;
    unsafe {
        let dir = CString::new(MODEL).unwrap();
        let mut mp = std::mem::zeroed();
        dllm_model_params_default(&mut mp);
        mp.backend = DLLM_BACKEND_CPU;
        let mut model = std::ptr::null_mut();
        assert_eq!(dllm_model_load(dir.as_ptr(), &mp, &mut model), DLLM_OK);
        let seq = dllm_model_max_length(model) as usize;
        let cfg = llada().config().clone();
        // As above: the f32 residual stream alone exceeds the available memory by a quarter.
        let batch = (free / 4 * 5 / (4 * cfg.d_model as u64 * seq as u64) + 1) as usize;
        // A short prompt, then masks to the model's length; one block, as many steps as masks.
        let mask = cfg.mask_token_id as i32;
        let mut canvas: Vec<i32> = (0..8).map(|i| 3 + i).collect();
        canvas.resize(seq, mask);
        let mut sp = std::mem::zeroed();
        dllm_sampling_params_default(&mut sp);
        sp.block_len = (seq - 8) as i32;
        sp.steps = (seq - 8) as i32;
        let sessions: Vec<*mut dllm_session> = (0..batch)
            .map(|_| {
                let mut s = std::ptr::null_mut();
                assert_eq!(
                    dllm_session_new(model, canvas.as_ptr(), seq, &sp, &mut s),
                    DLLM_OK,
                    "{}",
                    CStr::from_ptr(dllm_last_error()).to_string_lossy()
                );
                s
            })
            .collect();
        let st = dllm_sessions_step(sessions.as_ptr(), batch, std::ptr::null_mut());
        let msg = CStr::from_ptr(dllm_last_error())
            .to_string_lossy()
            .into_owned();
        assert_eq!(st, DLLM_ERR_OUT_OF_MEMORY, "{msg}");
        assert!(
            msg.contains("out of memory") && msg.contains("the host has"),
            "{msg}"
        );
        // Unchanged: the first session's canvas is still the one it was given, and it steps.
        let (mut now, mut n) = (vec![0i32; seq], 0usize);
        assert_eq!(
            dllm_session_canvas(sessions[0], now.as_mut_ptr(), seq, &mut n),
            DLLM_OK
        );
        assert_eq!((n, &now), (seq, &canvas));
        assert_eq!(
            dllm_session_step(sessions[0], std::ptr::null_mut()),
            DLLM_OK
        );
        for s in sessions {
            dllm_session_free(s);
        }
        dllm_model_free(model);
    }
}

/// Packed predictions equal one-by-one predictions: same tokens, confidences within float
/// summation-order noise.
fn packed_equals_single(m: &dyn Model) {
    let canvases = [canvas(m, 1, 9, 7), canvas(m, 2, 23, 16), canvas(m, 3, 4, 3)];
    let queries: Vec<Vec<usize>> = canvases
        .iter()
        .map(|c| (0..c.len()).filter(|p| p % 2 == 1 || *p == 0).collect())
        .collect();
    let rules = [
        rule(m, 0.0, Remasking::LowConfidence, 0),
        rule(m, 0.8, Remasking::Margin, 3),
        rule(m, 0.0, Remasking::Entropy, 5),
    ];
    let items: Vec<BatchQuery<'_>> = (0..3)
        .map(|i| BatchQuery {
            ids: &canvases[i],
            queries: &queries[i],
            rule: &rules[i],
        })
        .collect();
    let batched = m.predict_batch(&items).unwrap();
    assert_eq!(batched.len(), 3);
    for i in 0..3 {
        let single = m.predict(&canvases[i], &queries[i], &rules[i]).unwrap();
        assert_eq!(batched[i].len(), single.len());
        for (b, s) in batched[i].iter().zip(&single) {
            assert_eq!(b.token, s.token, "canvas {i}");
            let tol = 1e-5 * s.confidence.abs().max(1.0);
            assert!((b.confidence - s.confidence).abs() <= tol, "{b:?} vs {s:?}");
        }
    }
}

#[test]
fn packed_forward_predicts_like_single_forwards_llada() {
    packed_equals_single(&*llada());
}

#[test]
fn packed_forward_predicts_like_single_forwards_dream() {
    // GQA, q/k/v biases and the shifted logits inside a packed forward.
    let tmp = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::DreamTiny, tmp.path(), 3).unwrap();
    packed_equals_single(&*load_cpu(tmp.path()).unwrap());
}

fn params(steps: usize, block_len: usize, temperature: f64) -> GenerationParams {
    GenerationParams {
        steps,
        block_len,
        temperature,
        remasking: Remasking::LowConfidence,
        seed: 5,
        ..Default::default()
    }
}

/// Sessions of different lengths, schedules and rules (one with guidance and one with trace
/// credit, which step on their own inside the batch).
fn sessions(m: &Arc<dyn Model>) -> Vec<Session> {
    let specs: [(u32, usize, usize, GenerationParams, Decoding); 5] = [
        (1, 12, 16, params(8, 8, 0.0), Decoding::default()),
        (2, 30, 8, params(8, 4, 0.7), Decoding::default()),
        (
            3,
            5,
            12,
            params(12, 12, 0.0),
            Decoding {
                commit: CommitPolicy::Threshold(0.3),
                ..Decoding::default()
            },
        ),
        (
            4,
            8,
            8,
            params(4, 8, 0.0),
            Decoding {
                cfg_scale: 0.5,
                ..Decoding::default()
            },
        ),
        (
            5,
            9,
            16,
            params(16, 8, 0.0),
            Decoding {
                commit: CommitPolicy::Threshold(0.9),
                credit: Some(CreditParams::default()),
                ..Decoding::default()
            },
        ),
    ];
    specs
        .into_iter()
        .map(|(seed, n, gen, p, d)| {
            let mut s = Session::new(m.clone(), canvas(&**m, seed, n, gen), p).unwrap();
            s.set_decoding(d).unwrap();
            s
        })
        .collect()
}

#[test]
fn a_batch_ends_where_each_session_alone_ends() {
    let m = llada();
    let mut batch = sessions(&m);
    let rounds = run_batch(&mut batch).unwrap();
    let alone: Vec<Session> = sessions(&m)
        .into_iter()
        .map(|mut s| {
            s.run().unwrap();
            s
        })
        .collect();
    // One round per step of the longest session (a dynamic rule may end blocks early).
    let most_forwards = alone.iter().map(|s| s.forward_steps()).max().unwrap();
    let most_steps = alone.iter().map(|s| s.steps_taken()).max().unwrap();
    assert!(
        (most_forwards..=most_steps).contains(&rounds),
        "{rounds} rounds for {most_forwards}..={most_steps}"
    );
    for (i, (b, a)) in batch.iter().zip(&alone).enumerate() {
        assert!(b.is_done() && b.masks_left() == 0, "session {i}");
        assert_eq!(b.canvas(), a.canvas(), "session {i}");
        assert_eq!(b.steps_taken(), a.steps_taken(), "session {i}");
    }
}

#[test]
fn a_batch_needs_one_model() {
    let (a, b) = (llada(), llada());
    let mut mixed = vec![
        Session::new(a.clone(), canvas(&*a, 1, 4, 4), params(4, 4, 0.0)).unwrap(),
        Session::new(b.clone(), canvas(&*b, 1, 4, 4), params(4, 4, 0.0)).unwrap(),
    ];
    let e = run_batch(&mut mixed).unwrap_err().to_string();
    assert!(e.contains("session 1"), "{e}");
    assert_eq!(mixed[0].steps_taken(), 0, "nothing ran");
}

fn dllm(args: &[&str]) -> std::process::Output {
    succeeded(run_dllm(args, None))
}

#[test]
fn batch_file_prints_what_each_prompt_gives_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    let prompts = [
        "def add(a, b):\\n",
        "",
        "import os",
        "class Stack:\\n    def push(self, x):",
    ];
    std::fs::write(&file, prompts.join("\n")).unwrap();
    let common = [
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--gen-len",
        "12",
        "--steps",
        "6",
        "--block-len",
        "4",
        "--quiet",
    ];
    let mut args = vec!["generate", "--batch-file", file.to_str().unwrap()];
    args.extend(common);
    let out = String::from_utf8(dllm(&args).stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, p) in lines.iter().zip(prompts.iter().filter(|p| !p.is_empty())) {
        let prompt = p.replace("\\n", "\n");
        let mut one = vec!["generate", "--json", "--prompt", &prompt];
        one.extend(common);
        let v: serde_json::Value = serde_json::from_slice(&dllm(&one).stdout).unwrap();
        let text = v["text"].as_str().unwrap();
        let escaped = text
            .replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('\t', "\\t");
        assert_eq!(*line, escaped, "prompt {p:?}");
    }
    // --json: one object per prompt, in order.
    args.push("--json");
    let out = String::from_utf8(dllm(&args).stdout).unwrap();
    let idx = json_indices(&out);
    assert_eq!(idx, [0, 1, 2]);
}

/// The tiny LLaDA recording, for each cached forward, which canvas it was for (its first id).
struct Recording {
    inner: Arc<dyn Model>,
    calls: std::sync::Mutex<Vec<u32>>,
}

impl Model for Recording {
    fn config(&self) -> &dllm::config::ModelConfig {
        self.inner.config()
    }
    fn backend_name(&self) -> &'static str {
        "recording"
    }
    fn forward(&self, ids: &[u32]) -> dllm::error::Result<Vec<f32>> {
        self.inner.forward(ids)
    }
    fn supports_kv_cache(&self) -> bool {
        true
    }
    fn logits_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &mut dllm::model::KvCache,
        step: &dllm::model::CacheStep,
    ) -> dllm::error::Result<Vec<f32>> {
        self.calls.lock().unwrap().push(ids[0]);
        self.inner.logits_cached(ids, queries, cache, step)
    }
}

/// Run to completion, cached sessions go one after another (a device K/V cache holds one canvas
/// at a time), and still end where each ends alone.
#[test]
fn cached_sessions_of_a_batch_run_one_after_another() {
    let rec = Arc::new(Recording {
        inner: llada(),
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let m: Arc<dyn Model> = rec.clone();
    let make = |seed: u32| {
        let mut s = Session::new(m.clone(), canvas(&*m, seed, 6, 16), params(8, 8, 0.0)).unwrap();
        s.set_decoding(Decoding {
            cache: dllm::denoise::CacheMode::Dual,
            ..Decoding::default()
        })
        .unwrap();
        s
    };
    let mut batch = vec![make(1), make(2), make(3)];
    run_batch(&mut batch).unwrap();
    let calls = rec.calls.lock().unwrap().clone();
    let firsts: Vec<u32> = batch.iter().map(|s| s.canvas()[0]).collect();
    // Each session's forwards form one contiguous run, in session order.
    let mut runs: Vec<u32> = calls.clone();
    runs.dedup();
    assert_eq!(runs, firsts, "{calls:?}");
    for (i, b) in batch.iter().enumerate() {
        let mut alone = make(i as u32 + 1);
        alone.run().unwrap();
        assert_eq!(b.canvas(), alone.canvas(), "session {i}");
    }
}

/// On the CPU backend (which packs cached steps) cached sessions step together, one round per
/// step of the longest, beside uncached, guided and credited ones; every session ends where it ends
/// alone, with the same refreshes and span steps.
#[test]
fn cached_sessions_step_together_where_the_model_packs_them() {
    let m = llada();
    assert!(m.packs_cached_batches());
    let cached = |cache| Decoding {
        cache,
        ..Decoding::default()
    };
    let make = || {
        let mut batch = sessions(&m);
        let specs = [
            (5, 6, 16, params(8, 8, 0.0), CacheMode::Dual),
            (6, 11, 24, params(12, 8, 0.6), CacheMode::Dual),
            (7, 4, 12, params(6, 4, 0.0), CacheMode::Prefix),
        ];
        for (seed, n, gen, p, mode) in specs {
            let mut s = Session::new(m.clone(), canvas(&*m, seed, n, gen), p).unwrap();
            s.set_decoding(cached(mode)).unwrap();
            batch.push(s);
        }
        batch
    };
    let mut batch = make();
    assert_eq!(
        solo_sessions(&batch),
        vec![3, 4],
        "only the guided and the credited session step alone"
    );
    let rounds = run_batch(&mut batch).unwrap();
    let alone: Vec<Session> = make()
        .into_iter()
        .map(|mut s| {
            s.run().unwrap();
            s
        })
        .collect();
    let most_steps = alone.iter().map(|s| s.steps_taken()).max().unwrap();
    let most_forwards = alone.iter().map(|s| s.forward_steps()).max().unwrap();
    assert!(
        (most_forwards..=most_steps).contains(&rounds),
        "{rounds} rounds for {most_forwards}..={most_steps}"
    );
    for (i, (b, a)) in batch.iter().zip(&alone).enumerate() {
        assert!(b.is_done(), "session {i}");
        assert_eq!(b.canvas(), a.canvas(), "session {i}");
        assert_eq!(b.cache_stats(), a.cache_stats(), "session {i}");
    }
    assert!(batch[5].cache_stats().span_steps > 0);
}

/// A file longer than one chunk runs in chunks of `BATCH_CHUNK` prompts; each line is what the
/// prompt gives in a file of its own chunk alone (so what it gives alone, as above), and a bad
/// line anywhere writes nothing.
#[test]
fn batch_files_longer_than_a_chunk_run_in_chunks_and_check_every_line_first() {
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<String> = (0..70).map(|i| format!("x{} = ", i * 7)).collect();
    let common = [
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--gen-len",
        "4",
        "--steps",
        "2",
        "--block-len",
        "4",
        "--quiet",
    ];
    let run = |name: &str, lines: &[String]| {
        let file = dir.path().join(name);
        std::fs::write(&file, lines.join("\n")).unwrap();
        let mut args = vec!["generate", "--batch-file", file.to_str().unwrap()];
        args.extend(common);
        run_dllm(&args, None)
    };
    let all = run("all.txt", &prompts);
    assert!(all.status.success());
    let all = String::from_utf8(all.stdout).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 70, "{all}");
    // The second chunk (prompts 64..70) on its own.
    let tail = run("tail.txt", &prompts[64..]);
    let tail = String::from_utf8(tail.stdout).unwrap();
    assert_eq!(lines[64..].join("\n"), tail.trim_end());
    // --json indices run on across the chunks.
    let file = dir.path().join("all.txt");
    let mut args = vec!["generate", "--batch-file", file.to_str().unwrap(), "--json"];
    args.extend(common);
    let out = String::from_utf8(run_dllm(&args, None).stdout).unwrap();
    let idx = json_indices(&out);
    assert_eq!(idx, (0..70).collect::<Vec<u64>>());
    // Prompt 68 too long for the model, after an empty line (skipped): an error naming its
    // line of the file, 69, and no result printed.
    let mut bad = prompts.clone();
    bad[67] = "x".repeat(5000);
    bad.insert(10, String::new());
    let out = run("bad.txt", &bad);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.txt line 69: "), "{err}");
}

/// The `index` of each `--json` line of a batch run's output, in order.
fn json_indices(out: &str) -> Vec<u64> {
    out.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["index"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// The tiny LLaDA whose packed uncached forward fails (as when a batch does not fit in memory);
/// cached steps are packed as on the CPU.
struct FailingBatch(Arc<dyn Model>);

impl Model for FailingBatch {
    fn config(&self) -> &dllm::config::ModelConfig {
        self.0.config()
    }
    fn backend_name(&self) -> &'static str {
        "failing batch"
    }
    fn forward(&self, ids: &[u32]) -> dllm::error::Result<Vec<f32>> {
        self.0.forward(ids)
    }
    fn supports_kv_cache(&self) -> bool {
        true
    }
    fn logits_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &mut dllm::model::KvCache,
        step: &dllm::model::CacheStep,
    ) -> dllm::error::Result<Vec<f32>> {
        self.0.logits_cached(ids, queries, cache, step)
    }
    fn packs_cached_batches(&self) -> bool {
        true
    }
    fn predict_cached_batch(
        &self,
        items: &mut [dllm::model::CachedQuery<'_>],
    ) -> dllm::error::Result<Vec<Vec<dllm::denoise::predict::Prediction>>> {
        self.0.predict_cached_batch(items)
    }
    fn predict_batch(
        &self,
        _: &[BatchQuery<'_>],
    ) -> dllm::error::Result<Vec<Vec<dllm::denoise::predict::Prediction>>> {
        Err(dllm::error::Error::Backend(
            "no memory for the batch".into(),
        ))
    }
}

/// A round whose uncached forward fails applies no batched step, the cached sessions' included
/// (their forward runs after it), and the next round after the failure is the step they would
/// have taken.
#[test]
fn a_failed_round_applies_no_batched_step() {
    let m: Arc<dyn Model> = Arc::new(FailingBatch(llada()));
    let dual = |ids: Vec<u32>| {
        let mut s = Session::new(m.clone(), ids, params(8, 8, 0.0)).unwrap();
        s.set_decoding(Decoding {
            cache: CacheMode::Dual,
            ..Decoding::default()
        })
        .unwrap();
        s
    };
    let cached = dual(canvas(&*m, 1, 6, 16));
    let plain = Session::new(m.clone(), canvas(&*m, 2, 6, 16), params(8, 8, 0.0)).unwrap();
    let before = cached.canvas().to_vec();
    let mut batch = vec![cached, plain];
    let err = step_round(&mut batch).unwrap_err();
    assert!(err.to_string().contains("no memory"), "{err}");
    assert_eq!(batch[0].canvas(), &before[..]);
    assert_eq!(batch[0].steps_taken(), 0);
    assert_eq!(batch[0].cache_stats().refreshes, 0);
    // Alone, the cached session steps as if the failed round had not happened.
    let mut alone = dual(before.clone());
    alone.step().unwrap();
    batch[0].step().unwrap();
    assert_eq!(batch[0].canvas(), alone.canvas());
}
