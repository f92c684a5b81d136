//! The CPU model's last layer runs only the rows a prediction reads (the queried positions'
//! source rows; every layer still computes every row's keys and values). Checked against the
//! full forward, which runs every row of every layer: the queried rows' logits agree to float
//! rounding, for LLaDA (the embedded tiny model) and Dream (shifted logits: position q reads row
//! q − 1), with queries unsorted, repeated, or none, alone and packed into one batch forward, and
//! through a K/V cache refresh (which must still store every row's keys and values).

use dllm::denoise::predict::{predict_query_rows, PredictRule, Prediction};
use dllm::model::{load_cpu, BatchQuery, CacheStep, KvCache, Model};
use dllm::synth::{synth_checkpoint, Preset};
use std::path::Path;
use std::sync::Arc;

mod common;
use common::logits::{greedy_rule as rule, rel_err, rows};

const LLADA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");

fn models() -> (tempfile::TempDir, Vec<Arc<dyn Model>>) {
    let tmp = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::DreamTiny, tmp.path(), 9).unwrap();
    let dream = load_cpu(tmp.path()).unwrap();
    (tmp, vec![load_cpu(Path::new(LLADA)).unwrap(), dream])
}

/// `len` deterministic ordinary tokens with masks at every third position from `len / 2`.
fn canvas(m: &dyn Model, len: usize, salt: usize) -> Vec<u32> {
    let cfg = m.config();
    (0..len)
        .map(|i| {
            if i >= len / 2 && i % 3 == 0 {
                cfg.mask_token_id
            } else {
                3 + ((i * 7919 + salt * 104_729 + 11) % (cfg.vocab_size - 8)) as u32
            }
        })
        .collect()
}

/// Query sets: unsorted with a repeat, the first and last positions (Dream's position 0 reads
/// row 0 too), a single position, every position.
fn query_sets(len: usize) -> Vec<Vec<usize>> {
    vec![
        vec![len - 3, 5, len - 3, 0, len / 2, 1],
        vec![len - 1],
        (0..len).collect(),
    ]
}

#[test]
fn queried_rows_equal_the_full_forward() {
    let (_tmp, ms) = models();
    for m in ms {
        let arch = m.config().arch;
        let w = m.config().logits_width();
        let ids = canvas(&*m, 37, 0);
        let full = m.forward(&ids).unwrap();
        for queries in query_sets(ids.len()) {
            let want = rows(&full, w, &queries);
            // Through a refresh: the logits themselves.
            let mut kv = KvCache::new(m.config(), ids.len());
            let got = m
                .logits_cached(&ids, &queries, &mut kv, &CacheStep::Refresh)
                .unwrap();
            let e = rel_err(&got, &want);
            assert!(e < 1e-6, "{arch:?} {queries:?}: {e}");
            // Predictions: the same tokens as from the full forward's rows.
            let p = m.predict(&ids, &queries, &rule(&*m)).unwrap();
            let from_full = predict_query_rows(&want, w, &queries, &rule(&*m));
            assert_eq!(p.len(), queries.len());
            for (a, b) in p.iter().zip(&from_full) {
                assert_eq!(a.token, b.token, "{arch:?} {queries:?}");
                assert!((a.confidence - b.confidence).abs() < 1e-6, "{arch:?}");
            }
        }
        // No query: nothing predicted, no error.
        assert!(m.predict(&ids, &[], &rule(&*m)).unwrap().is_empty());
    }
}

#[test]
fn a_refresh_for_few_queries_still_caches_every_row() {
    // A span forward after a refresh reads the cached keys and values of every row: had the
    // refresh stored only its queried rows', the span's logits would not match the full forward.
    let (_tmp, ms) = models();
    for m in ms {
        let arch = m.config().arch;
        let w = m.config().logits_width();
        let ids = canvas(&*m, 40, 1);
        let mut kv = KvCache::new(m.config(), ids.len());
        m.logits_cached(&ids, &[39], &mut kv, &CacheStep::Refresh)
            .unwrap();
        let queries: Vec<usize> = (24..32).collect();
        let got = m
            .logits_cached(&ids, &queries, &mut kv, &CacheStep::Span(20..32))
            .unwrap();
        let want = rows(&m.forward(&ids).unwrap(), w, &queries);
        let e = rel_err(&got, &want);
        assert!(e < 2e-5, "{arch:?}: {e}");
    }
}

/// One packed `predict_batch` of `canvases`, each with its `queries` and `rule`.
fn packed(
    m: &dyn Model,
    rule: &PredictRule,
    canvases: &[Vec<u32>],
    queries: &[Vec<usize>],
) -> Vec<Vec<Prediction>> {
    let items: Vec<BatchQuery> = canvases
        .iter()
        .zip(queries)
        .map(|(ids, q)| BatchQuery {
            ids,
            queries: q,
            rule,
        })
        .collect();
    m.predict_batch(&items).unwrap()
}

#[test]
fn packed_canvases_keep_only_their_own_queried_rows() {
    let (_tmp, ms) = models();
    for m in ms {
        let arch = m.config().arch;
        let w = m.config().logits_width();
        let r = rule(&*m);
        let canvases = [canvas(&*m, 29, 2), canvas(&*m, 17, 3), canvas(&*m, 33, 4)];
        let queries = [
            vec![28, 3, 14, 14],
            vec![],
            (0..33).rev().collect::<Vec<_>>(),
        ];
        let got = packed(&*m, &r, &canvases, &queries);
        for ((ids, q), p) in canvases.iter().zip(&queries).zip(&got) {
            let want = predict_query_rows(&rows(&m.forward(ids).unwrap(), w, q), w, q, &r);
            assert_eq!(p.len(), q.len());
            for (a, b) in p.iter().zip(&want) {
                assert_eq!(a.token, b.token, "{arch:?} {q:?}");
                assert!((a.confidence - b.confidence).abs() < 1e-5, "{arch:?}");
            }
        }
    }
}

#[test]
fn a_packed_batch_predicts_exactly_what_each_canvas_alone_does() {
    // Few rows per product (where a GEMV would round differently from the GEMM that the packed
    // rows take): the same bits, not just the same tokens.
    let (_tmp, ms) = models();
    for m in ms {
        let arch = m.config().arch;
        let r = rule(&*m);
        // A canvas of 3 rows, all queried: alone, no product has more than 3 rows.
        let canvases = [
            canvas(&*m, 31, 5),
            canvas(&*m, 22, 6),
            canvas(&*m, 40, 7),
            canvas(&*m, 3, 8),
        ];
        let queries = [vec![30], vec![12, 15, 21], vec![39, 21], vec![0, 1, 2]];
        let together = packed(&*m, &r, &canvases, &queries);
        for ((ids, q), got) in canvases.iter().zip(&queries).zip(&together) {
            let alone = m.predict(ids, q, &r).unwrap();
            assert_eq!(got.len(), alone.len());
            for (a, b) in got.iter().zip(&alone) {
                assert_eq!(a.token, b.token, "{arch:?} {q:?}");
                assert_eq!(
                    a.confidence.to_bits(),
                    b.confidence.to_bits(),
                    "{arch:?} {q:?}: {} vs {}",
                    a.confidence,
                    b.confidence
                );
            }
        }
    }
}
