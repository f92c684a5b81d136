//! Packed cached batches on the CPU backend (`Model::predict_cached_batch`): several canvases'
//! cached steps in one call, span steps stacked into one forward with attention against each
//! canvas's own cache. Checked against each canvas's own `predict_cached` (its predictions and
//! the cache it leaves, bit for bit), for LLaDA (the embedded tiny model) and Dream (a `dllm
//! synth` checkpoint: shifted logits, spans one row wider, grouped-query heads), both cache
//! modes, mixed refresh and span items; a bad item fails the call before any cache changes.

use dllm::denoise::predict::{PredictRule, Remasking};
use dllm::denoise::CacheMode;
use dllm::model::kv_cache::span_for;
use dllm::model::{load_cpu_with, CacheStep, CachedQuery, CpuOptions, KvCache, Model};
use dllm::synth::{synth_checkpoint, Preset};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use tempfile::TempDir;

const LLADA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");

/// LLaDA and Dream with f32 activations, and with bf16 activations where the CPU has
/// AVX-512 BF16 (`DLLM_CPU_BF16`: packing must not change a canvas's bits there either).
fn models() -> (TempDir, Vec<Arc<dyn Model>>) {
    let tmp = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::DreamTiny, tmp.path(), 5).unwrap();
    let mut models = Vec::new();
    let modes = if dllm::backend::cpu::skinny_bf16_available() {
        vec![false, true]
    } else {
        vec![false]
    };
    for bf16 in modes {
        let options = CpuOptions {
            bf16_activations: Some(bf16),
        };
        models.push(load_cpu_with(Path::new(LLADA), options).unwrap());
        models.push(load_cpu_with(tmp.path(), options).unwrap());
    }
    (tmp, models)
}

/// One canvas of a test batch: `prompt` deterministic tokens (seeded), `gen` masks, the block
/// its span covers.
struct Canvas {
    ids: Vec<u32>,
    block: Range<usize>,
}

fn canvas(m: &dyn Model, seed: usize, prompt: usize, gen: usize, block: Range<usize>) -> Canvas {
    let cfg = m.config();
    let mut ids: Vec<u32> = (0..prompt)
        .map(|i| 3 + ((i * 7919 + seed * 104_729 + 11) % (cfg.vocab_size - 8)) as u32)
        .collect();
    ids.extend(std::iter::repeat_n(cfg.mask_token_id, gen));
    Canvas { ids, block }
}

/// A rule per canvas: greedy for the first, Gumbel sampling with its own seed for the others.
fn rule(m: &dyn Model, i: usize) -> PredictRule {
    PredictRule {
        temperature: if i == 0 { 0.0 } else { 0.8 },
        remasking: Remasking::LowConfidence,
        seed: 40 + i as u64,
        step: 3,
        mask_token: m.config().mask_token_id,
        vocab_size: m.config().vocab_size,
    }
}

/// Commits a few of the block's masks (what an earlier step of the block would have done), so
/// the span step reads a cache that is stale there.
fn commit_some(m: &dyn Model, c: &mut Canvas) {
    for (j, p) in c.block.clone().step_by(3).enumerate() {
        c.ids[p] = 5 + (j as u32 * 37) % (m.config().vocab_size as u32 - 8);
    }
}

/// Each canvas refreshed into its own cache.
fn refreshed(m: &dyn Model, canvases: &[Canvas]) -> Vec<KvCache> {
    canvases
        .iter()
        .map(|c| {
            let mut kv = KvCache::new(m.config(), c.ids.len());
            m.logits_cached(&c.ids, &[0], &mut kv, &CacheStep::Refresh)
                .unwrap();
            kv
        })
        .collect()
}

/// Every layer's K and V of `kv`.
fn contents(kv: &KvCache) -> Vec<Vec<f32>> {
    (0..kv.n_layers())
        .flat_map(|l| {
            let (k, v) = kv.layer(l);
            [k.to_vec(), v.to_vec()]
        })
        .collect()
}

#[test]
fn a_packed_cached_batch_predicts_what_each_canvas_predicts_alone() {
    let (_d, models) = models();
    for m in &models {
        let cfg = m.config().clone();
        for mode in [CacheMode::Dual, CacheMode::Prefix] {
            // The last canvas's prefix span (block to the end, 92 rows) is longer than the
            // skinny kernel's 64: packed with the short ones, it must not change their bits.
            let mut canvases = vec![
                canvas(&**m, 0, 12, 20, 12..20),
                canvas(&**m, 1, 5, 27, 13..21),
                canvas(&**m, 2, 30, 8, 30..38),
                canvas(&**m, 3, 5, 100, 13..21),
            ];
            let count = canvases.len();
            let mut caches = refreshed(&**m, &canvases);
            for c in &mut canvases {
                commit_some(&**m, c);
            }
            // Item 1 refreshes inside the batch (a canvas whose block just started); the
            // others take their span step.
            let steps: Vec<CacheStep> = canvases
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == 1 {
                        CacheStep::Refresh
                    } else {
                        let len = c.ids.len();
                        let span = span_for(mode, c.block.clone(), len, cfg.shifted_logits());
                        CacheStep::Span(span.unwrap())
                    }
                })
                .collect();
            let queries: Vec<Vec<usize>> = canvases
                .iter()
                .map(|c| {
                    c.block
                        .clone()
                        .filter(|&p| c.ids[p] == cfg.mask_token_id)
                        .collect()
                })
                .collect();
            let rules: Vec<PredictRule> = (0..count).map(|i| rule(&**m, i)).collect();
            let mut alone_caches = caches.clone();
            let alone: Vec<_> = (0..count)
                .map(|i| {
                    let c = &canvases[i];
                    m.predict_cached(
                        &c.ids,
                        &queries[i],
                        &rules[i],
                        &mut alone_caches[i],
                        &steps[i],
                    )
                    .unwrap()
                })
                .collect();
            let mut items: Vec<CachedQuery<'_>> = caches
                .iter_mut()
                .enumerate()
                .map(|(i, cache)| CachedQuery {
                    ids: &canvases[i].ids,
                    queries: &queries[i],
                    rule: &rules[i],
                    cache,
                    step: steps[i].clone(),
                })
                .collect();
            let packed = m.predict_cached_batch(&mut items).unwrap();
            drop(items);
            assert_eq!(packed, alone, "{:?} {mode:?}", cfg.arch);
            for (i, (b, a)) in caches.iter().zip(&alone_caches).enumerate() {
                assert!(b.is_filled(), "{:?} {mode:?} canvas {i}", cfg.arch);
                assert!(
                    contents(b) == contents(a),
                    "{:?} {mode:?} canvas {i}: the cache differs from the canvas's own step",
                    cfg.arch
                );
            }
        }
    }
}

#[test]
fn a_bad_item_fails_the_batch_before_any_cache_changes() {
    let (_d, models) = models();
    let m = &models[0];
    let cfg = m.config().clone();
    let mut canvases = vec![
        canvas(&**m, 0, 12, 20, 12..20),
        canvas(&**m, 1, 12, 20, 12..20),
    ];
    let mut caches = refreshed(&**m, &canvases[..1]);
    caches.push(KvCache::new(&cfg, canvases[1].ids.len()));
    commit_some(&**m, &mut canvases[0]);
    let before = contents(&caches[0]);
    let span = span_for(CacheMode::Dual, 12..20, 32, false).unwrap();
    let queries: Vec<usize> = (12..20).collect();
    let r = rule(&**m, 0);
    // The second item's cache was never refreshed: a span on it is refused.
    let mut items: Vec<CachedQuery<'_>> = caches
        .iter_mut()
        .zip(&canvases)
        .map(|(cache, c)| CachedQuery {
            ids: &c.ids,
            queries: &queries,
            rule: &r,
            cache,
            step: CacheStep::Span(span.clone()),
        })
        .collect();
    let err = m.predict_cached_batch(&mut items).unwrap_err();
    drop(items);
    assert!(err.to_string().contains("refresh"), "{err}");
    assert!(caches[0].is_filled() && contents(&caches[0]) == before);
    assert!(!caches[1].is_filled());
    // A query outside its span is refused the same way, naming the position.
    let mut items: Vec<CachedQuery<'_>> = vec![CachedQuery {
        ids: &canvases[0].ids,
        queries: &[3],
        rule: &r,
        cache: &mut caches[0],
        step: CacheStep::Span(span.clone()),
    }];
    let err = m.predict_cached_batch(&mut items).unwrap_err();
    drop(items);
    assert!(err.to_string().contains("query position 3"), "{err}");
    assert!(caches[0].is_filled() && contents(&caches[0]) == before);
}
