//! Block K/V caches (`--cache prefix|dual`) on the CPU backend, for LLaDA (the embedded tiny
//! model) and Dream (a `dllm synth` checkpoint, shifted logits, grouped-query heads):
//! - a refresh is the uncached forward (bit for bit), and a session whose every step refreshes
//!   equals the uncached loop exactly;
//! - right after a refresh, a span forward gives the full forward's rows, and a span query's
//!   logits do not depend on which other positions are queried;
//! - with a one-layer model (whose K/V depend only on token and position) a span forward after
//!   the block changed is still exact, and the cache rows it writes are a fresh refresh's rows at
//!   the span and untouched elsewhere; with eight layers the stale cache is really read;
//! - sessions refresh at each block and after a lock or remask; bad inputs give clear errors.

use dllm::config::ModelConfig;
use dllm::denoise::predict::Prediction;
use dllm::denoise::{CacheMode, CommitPolicy, Decoding, GenerationParams, Remasking, Session};
use dllm::error::Result;
use dllm::model::kv_cache::span_for;
use dllm::model::{load_cpu, CacheStep, KvCache, Model};
use dllm::synth::{synth_checkpoint, Preset};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use tempfile::TempDir;

const LLADA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");
mod common;
use common::logits::{greedy_rule as rule, rel_err, rows};
use common::{json_ok, run_dllm};

fn llada() -> Arc<dyn Model> {
    load_cpu(Path::new(LLADA)).unwrap()
}

/// Rewrites `dir/config.json` with `key = value`.
fn set_config(dir: &Path, key: &str, value: usize) {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = value.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
}

/// The tiny LLaDA with only its first layer: the shards are linked, the config says 1 layer.
fn llada_one_layer() -> (TempDir, Arc<dyn Model>) {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(LLADA).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".safetensors")
            || name == "model.safetensors.index.json"
        {
            std::os::unix::fs::symlink(e.path(), tmp.path().join(&name)).unwrap();
        }
    }
    std::fs::copy(
        Path::new(LLADA).join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    set_config(tmp.path(), "n_layers", 1);
    let m = load_cpu(tmp.path()).unwrap();
    (tmp, m)
}

/// A `dream-tiny` synth checkpoint, optionally cut to `layers` layers.
fn dream(layers: Option<usize>) -> (TempDir, Arc<dyn Model>) {
    let tmp = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::DreamTiny, tmp.path(), 5).unwrap();
    if let Some(n) = layers {
        set_config(tmp.path(), "num_hidden_layers", n);
    }
    let m = load_cpu(tmp.path()).unwrap();
    (tmp, m)
}

/// `prompt` deterministic non-special tokens, then `gen` masks.
fn canvas(m: &dyn Model, prompt: usize, gen: usize) -> Vec<u32> {
    let cfg = m.config();
    let mut c: Vec<u32> = (0..prompt)
        .map(|i| 3 + ((i * 7919 + 11) % (cfg.vocab_size - 8)) as u32)
        .collect();
    assert!(c.iter().all(|&t| t != cfg.mask_token_id));
    c.extend(std::iter::repeat_n(cfg.mask_token_id, gen));
    c
}

#[test]
fn a_refresh_is_the_uncached_forward_bit_for_bit() {
    let (_d, dr) = dream(None);
    for m in [llada(), dr] {
        let ids = canvas(&*m, 13, 19);
        let queries: Vec<usize> = (13..32).step_by(2).collect();
        let mut kv = KvCache::new(m.config(), ids.len());
        let cached = m
            .predict_cached(&ids, &queries, &rule(&*m), &mut kv, &CacheStep::Refresh)
            .unwrap();
        assert_eq!(cached, m.predict(&ids, &queries, &rule(&*m)).unwrap());
        assert!(kv.is_filled());
        let w = m.config().logits_width();
        let logits = m
            .logits_cached(&ids, &queries, &mut kv, &CacheStep::Refresh)
            .unwrap();
        let full = rows(&m.forward(&ids).unwrap(), w, &queries);
        assert!(
            rel_err(&logits, &full) < 1e-6,
            "{}",
            rel_err(&logits, &full)
        );
    }
}

#[test]
fn span_rows_match_the_full_forward_right_after_a_refresh() {
    let (_d, dr) = dream(None);
    for m in [llada(), dr] {
        let cfg = m.config().clone();
        let ids = canvas(&*m, 20, 24);
        let w = cfg.logits_width();
        let block = 28..36;
        let queries: Vec<usize> = block.clone().collect();
        let full = rows(&m.forward(&ids).unwrap(), w, &queries);
        for mode in [CacheMode::Prefix, CacheMode::Dual] {
            let mut kv = KvCache::new(&cfg, ids.len());
            m.logits_cached(&ids, &queries, &mut kv, &CacheStep::Refresh)
                .unwrap();
            let span = span_for(mode, block.clone(), ids.len(), cfg.shifted_logits()).unwrap();
            let got = m
                .logits_cached(&ids, &queries, &mut kv, &CacheStep::Span(span.clone()))
                .unwrap();
            let e = rel_err(&got, &full);
            assert!(e < 2e-5, "{:?} {mode:?} span {span:?}: {e}", cfg.arch);
            // Predictions through the span agree with the uncached ones.
            let p = m
                .predict_cached(&ids, &queries, &rule(&*m), &mut kv, &CacheStep::Span(span))
                .unwrap();
            let want = m.predict(&ids, &queries, &rule(&*m)).unwrap();
            let tokens = |v: &[Prediction]| v.iter().map(|p| p.token).collect::<Vec<_>>();
            assert_eq!(tokens(&p), tokens(&want), "{:?} {mode:?}", cfg.arch);
        }
    }
}

#[test]
fn a_span_query_has_the_same_logits_whatever_else_is_queried() {
    // To rounding: the last layer's attention runs over the kept rows only, and a product of one
    // query row takes another kernel than one of several.
    let (_d, dr) = dream(None);
    for m in [llada(), dr] {
        let cfg = m.config().clone();
        let ids = canvas(&*m, 20, 24);
        let w = cfg.logits_width();
        let block = 28..36;
        let span = span_for(
            CacheMode::Dual,
            block.clone(),
            ids.len(),
            cfg.shifted_logits(),
        )
        .unwrap();
        let mut kv = KvCache::new(&cfg, ids.len());
        let all: Vec<usize> = block.clone().collect();
        m.logits_cached(&ids, &all, &mut kv, &CacheStep::Refresh)
            .unwrap();
        // The span rewrites the same rows of the cache every time, so each call sees the same
        // keys and values; only the number of rows kept for the last layer and the head changes.
        let step = CacheStep::Span(span);
        let every = m.logits_cached(&ids, &all, &mut kv, &step).unwrap();
        for queries in [vec![30], vec![35, 29], vec![28, 31, 33, 34]] {
            let got = m.logits_cached(&ids, &queries, &mut kv, &step).unwrap();
            let index: Vec<usize> = queries.iter().map(|&q| q - block.start).collect();
            let want = rows(&every, w, &index);
            let e = rel_err(&got, &want);
            assert!(e < 1e-6, "{:?} queries {queries:?}: {e}", cfg.arch);
        }
    }
}

/// Positions `start..end` of `ids` set to ordinary tokens (as if committed).
fn commit(ids: &mut [u32], positions: impl IntoIterator<Item = usize>) {
    for p in positions {
        ids[p] = 5 + (p % 40) as u32;
    }
}

#[test]
fn one_layer_spans_stay_exact_and_write_their_rows_only() {
    let (_a, l1) = llada_one_layer();
    let (_b, d1) = dream(Some(1));
    for m in [l1, d1] {
        let cfg = m.config().clone();
        assert_eq!(cfg.n_layers, 1);
        let w = cfg.logits_width();
        let a = canvas(&*m, 16, 32);
        let block = 24..32;
        let queries: Vec<usize> = block.clone().collect();
        for mode in [CacheMode::Prefix, CacheMode::Dual] {
            let span = span_for(mode, block.clone(), a.len(), cfg.shifted_logits()).unwrap();
            assert_eq!(span.start, if cfg.shifted_logits() { 23 } else { 24 });
            let mut kv = KvCache::new(&cfg, a.len());
            m.logits_cached(&a, &queries, &mut kv, &CacheStep::Refresh)
                .unwrap();
            let before = kv.clone();
            // Half the block committed; for prefix also a suffix position (inside its span).
            let mut b = a.clone();
            commit(&mut b, [24, 26, 27, 30]);
            if mode == CacheMode::Prefix {
                commit(&mut b, [40]);
            }
            let got = m
                .logits_cached(&b, &queries, &mut kv, &CacheStep::Span(span.clone()))
                .unwrap();
            let want = rows(&m.forward(&b).unwrap(), w, &queries);
            let e = rel_err(&got, &want);
            assert!(e < 2e-5, "{:?} {mode:?}: {e}", cfg.arch);
            // Cache rows: a fresh refresh of `b` inside the span, the old rows outside.
            let mut fresh = KvCache::new(&cfg, b.len());
            m.logits_cached(&b, &[0], &mut fresh, &CacheStep::Refresh)
                .unwrap();
            let kw = kv.width();
            let (k, v) = kv.layer(0);
            for p in 0..b.len() {
                let src = if span.contains(&p) { &fresh } else { &before };
                let (sk, sv) = src.layer(0);
                let r = p * kw..(p + 1) * kw;
                assert!(
                    rel_err(&k[r.clone()], &sk[r.clone()]) < 1e-6
                        && rel_err(&v[r.clone()], &sv[r.clone()]) < 1e-6,
                    "{:?} {mode:?}: cache row {p}",
                    cfg.arch
                );
            }
            // Dual: a change in the suffix is not seen (its K/V stay cached).
            if mode == CacheMode::Dual {
                let mut c = b.clone();
                commit(&mut c, [40, 41, 42]);
                let stale = m
                    .logits_cached(&c, &queries, &mut kv, &CacheStep::Span(span))
                    .unwrap();
                assert!(rel_err(&stale, &got) < 2e-5);
                let full_c = rows(&m.forward(&c).unwrap(), w, &queries);
                assert!(rel_err(&stale, &full_c) > 1e-4, "{:?}", cfg.arch);
            }
        }
    }
}

#[test]
fn deep_models_read_the_stale_prefix_from_the_cache() {
    // With eight layers the prefix K/V of layers 2.. depend on the block's tokens, so after
    // commits the span forward is not the full forward: proof that it reads the cache.
    let m = llada();
    let cfg = m.config().clone();
    let a = canvas(&*m, 16, 16);
    let queries: Vec<usize> = (16..32).collect();
    let mut kv = KvCache::new(&cfg, a.len());
    m.logits_cached(&a, &queries, &mut kv, &CacheStep::Refresh)
        .unwrap();
    let mut b = a.clone();
    commit(&mut b, [16, 17, 18, 19, 20, 21]);
    let got = m
        .logits_cached(&b, &queries, &mut kv, &CacheStep::Span(16..32))
        .unwrap();
    let want = rows(&m.forward(&b).unwrap(), cfg.logits_width(), &queries);
    assert!(rel_err(&got, &want) > 1e-4);
}

#[test]
fn bad_cached_calls_are_refused() {
    let (_d, dr) = dream(None);
    let ids = canvas(&*dr, 8, 8);
    let mut kv = KvCache::new(dr.config(), ids.len());
    let err = |r: Result<Vec<f32>>| r.unwrap_err().to_string();
    let e = err(dr.logits_cached(&ids, &[8], &mut kv, &CacheStep::Span(7..16)));
    assert!(e.contains("refresh"), "{e}");
    dr.logits_cached(&ids, &[8], &mut kv, &CacheStep::Refresh)
        .unwrap();
    // Dream predicts position 8 from hidden row 7: a span starting at 8 lacks it.
    let e = err(dr.logits_cached(&ids, &[8], &mut kv, &CacheStep::Span(8..16)));
    assert!(e.contains("hidden row 7") && e.contains("8..16"), "{e}");
    let e = err(dr.logits_cached(&ids, &[8], &mut kv, &CacheStep::Span(7..17)));
    assert!(
        e.contains("7..17") && e.contains("outside the canvas of 16"),
        "{e}"
    );
    let e = err(dr.logits_cached(&ids, &[8], &mut kv, &CacheStep::Span(9..9)));
    assert!(e.contains("empty"), "{e}");
    let e = err(dr.logits_cached(&ids, &[16], &mut kv, &CacheStep::Refresh));
    assert!(e.contains("query position 16"), "{e}");
    let mut short = KvCache::new(dr.config(), 10);
    let e = err(dr.logits_cached(&ids, &[8], &mut short, &CacheStep::Refresh));
    assert!(e.contains("10 positions") && e.contains("16"), "{e}");
    // The failed calls left the cache usable, the refused refresh aside: a span still runs.
    assert!(kv.is_filled());
    dr.logits_cached(&ids, &[8], &mut kv, &CacheStep::Span(7..16))
        .unwrap();
}

fn decoding(cache: CacheMode) -> Decoding {
    Decoding {
        cache,
        ..Decoding::default()
    }
}

fn run(m: &Arc<dyn Model>, ids: &[u32], p: &GenerationParams, d: &Decoding) -> Session {
    let mut s = Session::new(m.clone(), ids.to_vec(), p.clone()).unwrap();
    s.set_decoding(d.clone()).unwrap();
    s.run().unwrap();
    s
}

#[test]
fn sessions_whose_every_step_refreshes_equal_the_uncached_loop() {
    let (_d, dr) = dream(None);
    let params = |steps, block_len, temperature, remasking| GenerationParams {
        steps,
        block_len,
        temperature,
        remasking,
        seed: 7,
        ..Default::default()
    };
    for m in [llada(), dr] {
        let ids = canvas(&*m, 12, 24);
        let cases = [
            // One step per block: every step is a block's first.
            (
                params(3, 8, 0.0, Remasking::LowConfidence),
                Decoding::default(),
            ),
            (params(3, 8, 0.8, Remasking::Random), Decoding::default()),
            (params(1, 24, 0.0, Remasking::Margin), Decoding::default()),
            (
                params(3, 8, 0.0, Remasking::Entropy),
                Decoding {
                    cfg_scale: 1.5,
                    ..Decoding::default()
                },
            ),
            (
                params(3, 8, 1.0, Remasking::LowConfidence),
                Decoding {
                    filter: dllm::denoise::SampleFilter {
                        top_k: 5,
                        top_p: 0.9,
                    },
                    commit: CommitPolicy::Threshold(0.5),
                    ..Decoding::default()
                },
            ),
        ];
        for (p, d) in &cases {
            let none = run(&m, &ids, p, d);
            assert_eq!(none.cache_stats().refreshes, 0);
            for mode in [CacheMode::Prefix, CacheMode::Dual] {
                let dc = Decoding {
                    cache: mode,
                    ..d.clone()
                };
                let s = run(&m, &ids, p, &dc);
                assert_eq!(
                    s.canvas(),
                    none.canvas(),
                    "{:?} {mode:?} {p:?}",
                    m.config().arch
                );
                assert_eq!(s.cache_stats().refreshes, 3.min(p.steps));
                assert_eq!(s.cache_stats().span_steps, 0);
            }
        }
    }
}

#[test]
fn sessions_refresh_per_block_and_after_locks_and_remasks() {
    let m = llada();
    let ids = canvas(&*m, 10, 16);
    let p = GenerationParams {
        steps: 8,
        block_len: 8,
        ..GenerationParams::default()
    };
    for mode in [CacheMode::Prefix, CacheMode::Dual] {
        let s = run(&m, &ids, &p, &decoding(mode));
        assert_eq!(s.masks_left(), 0);
        let st = s.cache_stats();
        assert_eq!((st.refreshes, st.span_steps), (2, 6), "{mode:?}");

        let mut s = Session::new(m.clone(), ids.clone(), p.clone()).unwrap();
        s.set_decoding(decoding(mode)).unwrap();
        s.step().unwrap();
        s.step().unwrap();
        s.lock(20, 7).unwrap(); // in the second block
        s.run().unwrap();
        let st = s.cache_stats();
        assert_eq!((st.refreshes, st.span_steps), (3, 5), "{mode:?}");
        assert_eq!(s.canvas()[20], 7);
        s.remask(12, 15).unwrap();
        s.run().unwrap();
        let st = s.cache_stats();
        // Three remasked positions over 4 steps: counts 1, 1, 1, 0 — the last runs no forward.
        assert_eq!((st.refreshes, st.span_steps), (4, 7), "{mode:?}");
        assert_eq!(s.masks_left(), 0);
    }
    // Guided steps keep a second cache: spans run too.
    let d = Decoding {
        cfg_scale: 1.0,
        cache: CacheMode::Dual,
        ..Decoding::default()
    };
    let s = run(&m, &ids, &p, &d);
    assert_eq!(s.masks_left(), 0);
    assert_eq!(
        (s.cache_stats().refreshes, s.cache_stats().span_steps),
        (2, 6)
    );
}

/// A model of the default trait methods: no K/V cache.
struct NoCache(ModelConfig);

impl Model for NoCache {
    fn config(&self) -> &ModelConfig {
        &self.0
    }
    fn backend_name(&self) -> &'static str {
        "mock"
    }
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(vec![0.0; ids.len() * self.0.logits_width()])
    }
}

#[test]
fn a_cache_mode_on_a_model_without_a_cache_is_refused() {
    let m: Arc<dyn Model> = Arc::new(NoCache(llada().config().clone()));
    let mut s = Session::new(m.clone(), vec![5, 1, 1], GenerationParams::default()).unwrap();
    let e = s.set_decoding(decoding(CacheMode::Dual)).unwrap_err();
    assert!(e.to_string().contains("mock backend"), "{e}");
    assert_eq!(s.decoding().cache, CacheMode::None);
    s.set_decoding(decoding(CacheMode::None)).unwrap();
    // The trait's defaults ignore the cache: full forward rows.
    let mut kv = KvCache::new(m.config(), 3);
    let l = m
        .logits_cached(&[5, 1, 1], &[2], &mut kv, &CacheStep::Refresh)
        .unwrap();
    assert_eq!(l.len(), m.config().logits_width());
}

#[test]
fn cli_cache_flag() {
    let dllm = |args: &[&str]| {
        let head = [
            "generate",
            "--model",
            LLADA,
            "--quiet",
            "--prompt",
            "def add(a, b):",
        ];
        run_dllm(&[&head[..], args].concat(), None)
    };
    let base = [
        "--gen-len",
        "16",
        "--steps",
        "8",
        "--block-len",
        "8",
        "--json",
    ];
    let json = |o: std::process::Output| -> Value { json_ok(&o) };
    let none = json(dllm(&base));
    assert_eq!(none["cache"], "none");
    assert_eq!(none["cache_refreshes"], 0);
    let dual = json(dllm(&[&base[..], &["--cache", "dual"]].concat()));
    assert_eq!(dual["cache"], "dual");
    assert_eq!(dual["cache_refreshes"], 2);
    assert_eq!(dual["cache_span_steps"], 6);
    assert_eq!(dual["vicinity"], 0);
    // The vicinity update: the same refreshes and span steps, each span wider.
    let near = json(dllm(
        &[&base[..], &["--cache", "dual", "--vicinity", "4"]].concat(),
    ));
    assert_eq!(
        (&near["vicinity"], &near["cache_refreshes"]),
        (&4.into(), &2.into())
    );
    assert_eq!(near["cache_span_steps"], 6);
    let o = dllm(&[&base[..], &["--vicinity", "4"]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("vicinity") && err.contains("cache"), "{err}");
    let o = dllm(&[&base[..], &["--cache", "full"]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("full") && err.contains("prefix"), "{err}");
}
