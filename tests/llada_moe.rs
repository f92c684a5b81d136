//! LLaDA-MoE on the CPU backend against the naive f64 reference of `common::naive` (per-head
//! q/k RMSNorms, softmax routing, the top-k experts' SwiGLUs weighted by their probabilities).
//!
//! Checkpoints come from `dllm synth`'s `llada-moe-tiny` preset (bf16, the OLMoE names of the
//! released checkpoints). Also covered: a row's bits do not depend on the rows it shares a
//! forward with (packed batches, narrowed last layers: the experts gather rows), the K/V cache
//! paths, load errors that name the missing expert, the backend choice, and the CLI.

use dllm::config::Arch;
use dllm::error::ErrorKind;
use dllm::model::llada_moe::LladaMoe;
use dllm::model::{load_model, Backend, BatchQuery, CacheStep, CachedQuery, KvCache, Model};
use dllm::synth::{synth_checkpoint, Preset};
use std::path::Path;

mod common;
use common::checkpoint::{read_checkpoint, read_config, write_checkpoint};
use common::logits::{greedy_rule, rel_err, rows};
use common::naive::{assert_greedy_session_follows, rel_l2, worst_row, Faults, Naive};
use common::{json_ok, run_dllm, stdout_ok};

/// A `llada-moe-tiny` checkpoint written by `dllm synth` into a fresh temporary directory.
fn synth_tiny(seed: u64) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::LladaMoeTiny, tmp.path(), seed).unwrap();
    tmp
}

/// Canvases of the tiny preset (vocabulary 512, mask 511).
const CANVASES: [&[u32]; 3] = [
    &[17],
    &[5, 300, 511, 511, 44, 510, 511],
    &[
        3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 511, 511, 511, 511, 100, 200, 300,
    ],
];

#[test]
fn logits_match_the_naive_reference() {
    let tmp = synth_tiny(21);
    let model = LladaMoe::load(tmp.path()).unwrap();
    let cfg = model.config().clone();
    assert_eq!(cfg.arch, Arch::LladaMoe);
    assert!(cfg.qk_norm);
    let x = cfg.experts.unwrap();
    assert_eq!((x.n_experts, x.experts_per_token), (8, 2));
    let naive = Naive::from_dir(tmp.path());
    for ids in CANVASES {
        let want = naive.raw_logits(ids, Faults::default());
        let got = model.forward(ids).unwrap();
        // LLaDA-MoE's logits are not shifted: forward is the raw LM-head output.
        assert_eq!(model.raw_forward(ids).unwrap(), got);
        let e = rel_l2(&got, &want);
        let r = worst_row(&got, &want);
        eprintln!(
            "llada-moe-tiny, {} tokens: logits rel L2 {e:.2e}, worst row {r:.2e}",
            ids.len()
        );
        assert!(
            e <= 1e-4 && r <= 1e-4,
            "{} tokens: logits rel L2 {e:e}, worst row {r:e}",
            ids.len()
        );
        // The comparison can tell the parts of the layer apart: skipping the head norms or
        // renormalising the expert weights is a different model.
        // (One token attends to itself alone: its head norms cannot show.)
        let head_norms_show = ids.len() > 1;
        for (what, faults) in [
            (
                "no q/k norms",
                Faults {
                    no_qk_norm: true,
                    ..Faults::default()
                },
            ),
            (
                "renormalised expert weights",
                Faults {
                    renormalised_experts: true,
                    ..Faults::default()
                },
            ),
        ] {
            if what == "no q/k norms" && !head_norms_show {
                continue;
            }
            let e = rel_l2(&got, &naive.raw_logits(ids, faults));
            assert!(e > 1e-2, "{what}: only {e:e} away");
        }
    }
    // A routing decision the engine's f32 could take differently would make the comparison
    // meaningless: the engine's router probabilities are within ~1e-8 of the reference's (its
    // logits agree to ~5e-7 relative), and no decision was within 100 times that.
    let gap = naive.min_route_gap.get();
    eprintln!("smallest routing gap {gap:.2e}");
    assert!(
        gap > 1e-6,
        "a routing decision within {gap:e}: pick another seed"
    );
}

#[test]
fn a_rows_bits_do_not_depend_on_the_rows_beside_it() {
    let tmp = synth_tiny(22);
    let model = LladaMoe::load(tmp.path()).unwrap();
    let width = model.config().logits_width();
    let (a, b) = (CANVASES[1], CANVASES[2]);
    let full_b = model.forward(b).unwrap();
    // Narrowed: the last layer runs the queried rows only, so its experts see fewer rows.
    let at = model.logits_at(b, &[2, 16, 17]).unwrap();
    assert_eq!(at, rows(&full_b, width, &[2, 16, 17]));
    // Packed: two canvases in one forward, every expert over both canvases' rows.
    let rule = greedy_rule(&model);
    let (qa, qb) = ([2usize, 3, 6], [15usize, 16, 17, 18]);
    let batch = model
        .predict_batch(&[
            BatchQuery {
                ids: a,
                queries: &qa,
                rule: &rule,
            },
            BatchQuery {
                ids: b,
                queries: &qb,
                rule: &rule,
            },
        ])
        .unwrap();
    assert_eq!(batch[0], model.predict(a, &qa, &rule).unwrap());
    assert_eq!(batch[1], model.predict(b, &qb, &rule).unwrap());
}

#[test]
fn cached_steps_agree_with_full_forwards() {
    let tmp = synth_tiny(23);
    let model = LladaMoe::load(tmp.path()).unwrap();
    assert!(model.supports_kv_cache());
    let width = model.config().logits_width();
    let ids = CANVASES[2].to_vec();
    let queries = [15usize, 16, 17, 18];
    let mut cache = KvCache::new(model.config(), ids.len());
    let refreshed = model
        .logits_cached(&ids, &queries, &mut cache, &CacheStep::Refresh)
        .unwrap();
    let full = rows(&model.forward(&ids).unwrap(), width, &queries);
    assert_eq!(refreshed, full);
    // Right after the refresh, a span step over the block reads an exact cache.
    let span = model
        .logits_cached(&ids, &queries, &mut cache, &CacheStep::Span(15..19))
        .unwrap();
    let e = rel_err(&span, &full);
    assert!(e < 1e-5, "span after refresh vs full forward: rel {e:e}");

    // With one layer, K/V depend only on token and position: after a commit in the block, the
    // span step (prefix and suffix from the cache) is still the full forward.
    set_layers(tmp.path(), 1);
    let model = LladaMoe::load(tmp.path()).unwrap();
    let mut ids = ids;
    let mut cache = KvCache::new(model.config(), ids.len());
    model
        .logits_cached(&ids, &queries, &mut cache, &CacheStep::Refresh)
        .unwrap();
    ids[15] = 42;
    let span = model
        .logits_cached(&ids, &queries[1..], &mut cache, &CacheStep::Span(15..19))
        .unwrap();
    let full = rows(&model.forward(&ids).unwrap(), width, &queries[1..]);
    let e = rel_err(&span, &full);
    assert!(
        e < 1e-5,
        "one layer, span after a commit vs full forward: rel {e:e}"
    );
}

#[test]
fn packed_cached_spans_equal_each_span_alone() {
    let tmp = synth_tiny(26);
    let model = LladaMoe::load(tmp.path()).unwrap();
    assert!(model.packs_cached_batches());
    let rule = greedy_rule(&model);
    let (a, b) = (CANVASES[1].to_vec(), CANVASES[2].to_vec());
    let (qa, qb) = ([2usize, 3], [15usize, 16, 17, 18]);
    let (sa, sb) = (CacheStep::Span(0..7), CacheStep::Span(15..19));
    // Each span alone, after its refresh.
    let alone = |ids: &[u32], q: &[usize], step: &CacheStep| {
        let mut cache = KvCache::new(model.config(), ids.len());
        model
            .predict_cached(ids, q, &rule, &mut cache, &CacheStep::Refresh)
            .unwrap();
        model
            .predict_cached(ids, q, &rule, &mut cache, step)
            .unwrap()
    };
    let want = [alone(&a, &qa, &sa), alone(&b, &qb, &sb)];
    // Both spans in one forward: each expert runs over rows of both canvases.
    let (mut ca, mut cb) = (
        KvCache::new(model.config(), a.len()),
        KvCache::new(model.config(), b.len()),
    );
    model
        .predict_cached(&a, &qa, &rule, &mut ca, &CacheStep::Refresh)
        .unwrap();
    model
        .predict_cached(&b, &qb, &rule, &mut cb, &CacheStep::Refresh)
        .unwrap();
    let got = model
        .predict_cached_batch(&mut [
            CachedQuery {
                ids: &a,
                queries: &qa,
                rule: &rule,
                cache: &mut ca,
                step: sa.clone(),
            },
            CachedQuery {
                ids: &b,
                queries: &qb,
                rule: &rule,
                cache: &mut cb,
                step: sb.clone(),
            },
        ])
        .unwrap();
    assert_eq!(got, want);
}

/// Rewrites the config of the checkpoint in `dir` to its first `n` layers (the others' tensors
/// stay, unread).
fn set_layers(dir: &Path, n: usize) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = n.into();
    cfg["moe_layer_freq"] = vec![1; n].into();
    std::fs::write(&path, cfg.to_string()).unwrap();
}

#[test]
fn a_missing_expert_is_named_and_the_cuda_backend_is_refused_or_skipped() {
    let tmp = synth_tiny(24);
    // A checkpoint without expert 7's up projection in layer 2: the load names it.
    let name = "model.layers.2.mlp.experts.7.up_proj.weight";
    let mut tensors = read_checkpoint(tmp.path());
    assert!(tensors.remove(name).is_some());
    let broken = tempfile::tempdir().unwrap();
    write_checkpoint(broken.path(), &read_config(tmp.path()), &tensors);
    let err = LladaMoe::load(broken.path())
        .err()
        .expect("a missing expert");
    assert!(err.to_string().contains(name), "{err}");
    // With the tensor the same writer's checkpoint loads.
    let whole = tempfile::tempdir().unwrap();
    write_checkpoint(
        whole.path(),
        &read_config(tmp.path()),
        &read_checkpoint(tmp.path()),
    );
    assert!(LladaMoe::load(whole.path()).is_ok());

    // Auto always loads it: on the CUDA model where a device and the kernels are there (the
    // tiny mixture is within its limits), else on the CPU with a note saying why;
    // `--backend cuda` never falls back.
    let loaded = load_model(tmp.path(), Backend::Auto).unwrap();
    assert_eq!(loaded.model.config().arch, Arch::LladaMoe);
    let cfg = dllm::config::ModelConfig::from_file(&tmp.path().join("config.json")).unwrap();
    assert!(cfg.has_cuda_model());
    match dllm::backend::cuda::unavailable_reason() {
        Some(_) => {
            assert_eq!(loaded.model.backend_name(), "cpu");
            assert!(loaded.note.is_some());
            let err = load_model(tmp.path(), Backend::Cuda)
                .err()
                .expect("no CUDA device");
            assert!(matches!(err.kind(), ErrorKind::Backend), "{err}");
        }
        // A device that cannot take it (memory, a failed start) sends auto to the CPU, noted.
        None => assert!(loaded.model.backend_name() == "cuda" || loaded.note.is_some()),
    }
}

#[test]
fn greedy_denoising_commits_the_naive_choice() {
    let tmp = synth_tiny(25);
    let model = std::sync::Arc::new(LladaMoe::load(tmp.path()).unwrap());
    let naive = Naive::from_dir(tmp.path());
    assert_greedy_session_follows(model, &naive, &[5, 300, 44, 17], false);
}

#[test]
fn the_c_abi_names_each_architecture() {
    use dllm::ffi::*;
    use std::ffi::{CStr, CString};
    let moe = synth_tiny(27);
    let dream = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::DreamTiny, dream.path(), 1).unwrap();
    let llada = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code");
    // The C ABI loads a tokenizer with the model: a four-word one for the synth checkpoints.
    let tokenizer = serde_json::json!({"version": "1.0", "added_tokens": [], "normalizer": null,
        "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>",
            "vocab": {"<unk>": 0, "a": 1, "b": 2, "c": 3}}});
    for dir in [dream.path(), moe.path()] {
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    }
    for (dir, want) in [
        (llada.as_path(), "llada"),
        (dream.path(), "dream"),
        (moe.path(), "llada-moe"),
    ] {
        let c_dir = CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: valid params, a NUL-terminated path and an out pointer; the handle is freed
        // after its last use, and the returned name is a static string.
        unsafe {
            let mut mp = dllm_model_params::default();
            dllm_model_params_init(&mut mp, std::mem::size_of::<dllm_model_params>());
            mp.backend = DLLM_BACKEND_AUTO;
            let mut m = std::ptr::null_mut();
            let st = dllm_model_load(c_dir.as_ptr(), &mp, &mut m);
            let err = CStr::from_ptr(dllm_last_error()).to_string_lossy();
            assert_eq!(st, DLLM_OK, "{want}: {err}");
            let name = CStr::from_ptr(dllm_model_architecture(m));
            assert_eq!(name.to_str().unwrap(), want);
            dllm_model_free(m);
        }
    }
    // SAFETY: NULL is allowed and answers NULL.
    assert!(unsafe { dllm_model_architecture(std::ptr::null()) }.is_null());
}

fn synth_cli(dir: &Path) {
    let out = run_dllm(
        &[
            "synth",
            "--arch",
            "llada-moe",
            "--preset",
            "tiny",
            "--out",
            dir.to_str().unwrap(),
            "--seed",
            "5",
        ],
        None,
    );
    stdout_ok(&out);
}

#[test]
fn cli_synth_info_logits_and_bench() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("moe");
    synth_cli(&dir);
    let d = dir.to_str().unwrap();
    let info = json_ok(&run_dllm(&["info", "--model", d, "--json"], None));
    assert_eq!(info["architecture"], "llada-moe");
    assert_eq!(info["experts"], 8);
    assert_eq!(info["experts_per_token"], 2);
    assert_eq!(info["qk_norm"], true);
    // The CUDA model's weights: every checkpoint matrix as bf16, every vector as f32.
    let store = dllm::weights::WeightStore::open(&dir).unwrap();
    let device_bytes: u64 = store
        .tensor_names()
        .into_iter()
        .map(|name| {
            let t = store.get(name).unwrap();
            t.numel() as u64 * if t.shape.len() == 1 { 4 } else { 2 }
        })
        .sum();
    assert_eq!(info["device_weight_bytes"].as_u64(), Some(device_bytes));
    assert!(info["device_step_bytes_per_canvas"].as_u64().unwrap() > 0);
    let model = LladaMoe::load(&dir).unwrap();
    assert_eq!(
        info["parameters"].as_u64().unwrap() as usize,
        model.config().parameter_count()
    );
    let text = stdout_ok(&run_dllm(&["info", "--model", d], None));
    assert!(
        text.contains("experts      8 per layer · 2 per token · hidden 64 each · q/k head norms"),
        "{text}"
    );

    let ids = [5u32, 300, 511, 44];
    let out = json_ok(&run_dllm(
        &["logits", "--model", d, "--ids", "5,300,511,44", "--json"],
        None,
    ));
    let printed: Vec<Vec<f32>> = serde_json::from_value(out["logits"].clone()).unwrap();
    assert_eq!(printed.concat(), model.forward(&ids).unwrap());

    // The fixed-schedule benchmark runs the engine's denoising loop on the model, both caches.
    for cache in ["none", "dual"] {
        let out = json_ok(&run_dllm(
            &[
                "bench",
                "--model",
                d,
                "--prompt-len",
                "8",
                "--gen-len",
                "16",
                "--block-len",
                "8",
                "--tokens-per-step",
                "2",
                "--cache",
                cache,
                "--json",
            ],
            None,
        ));
        assert_eq!(out["backend"], "cpu", "{out}");
        assert!(out["tok_per_s"].as_f64().unwrap() > 0.0, "{out}");
        assert_eq!(out["masks_left"], 0, "{out}");
    }
}
