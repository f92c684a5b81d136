//! GPU checks of the packed cached steps ([`super::packed`]) on a loaded checkpoint, for
//! `dllm-gpu-check`'s model checks (names start with `{prefix}.packed`); the model's packing
//! switch is turned on for them and restored after.
//!
//! - Three canvases of different lengths refreshed as one padded forward (each storing its
//!   K/V in its own slot), against uncached predictions of the same canvases; then one span
//!   step of each (their spans at different positions, their caches holding different key
//!   counts), one of them predicting fewer positions and another with its own rule, packed into
//!   one forward, against each step run alone on the same caches: the tokens (up to
//!   `token_miss`: the packed GEMMs run at other row counts, on other kernels, so a near-tie may
//!   flip), the confidences where the tokens agree within the bf16 tolerance, and no cache slot
//!   reassigned.
//! - Three greedy dual-cache sessions run as a batch (lockstep, packed span steps) against each
//!   session run alone: the tokens (up to `gen_miss`: a near-tie flipped by the packed GEMMs'
//!   rounding sends a cached generation down another path), the same number of refreshes, and
//!   no span step that found its slot reassigned.

use super::CudaTransformer;
use crate::backend::cuda::check::{self, CheckResult, TOL_BF16};
use crate::denoise::batch::run_batch;
use crate::denoise::predict::{PredictRule, Prediction, Remasking};
use crate::denoise::session::{Decoding, GenerationParams, Session};
use crate::error::Result;
use crate::model::kv_cache::{span_for, CacheMode, CacheStep, KvCache};
use crate::model::{CachedQuery, Model};
use std::ops::Range;
use std::sync::Arc;

/// Masked positions after each prompt: two blocks of 32.
const GEN: usize = 64;
const BLOCK: usize = 32;

/// The checks; `prompt` (at least 8 ids) holds no mask id.
pub fn packed_session_checks(
    prefix: &str,
    cuda: &Arc<CudaTransformer>,
    prompt: &[u32],
    token_miss: f64,
    gen_miss: f64,
) -> Vec<CheckResult> {
    let was = cuda.packed_sessions();
    cuda.set_packed_sessions(true);
    let prompts = three_prompts(prompt);
    let mut out = match span_step(cuda, &prompts) {
        Ok(c) => vec![
            CheckResult::new(
                format!("{prefix}.packed span step tokens == alone"),
                c.token_miss,
                token_miss,
                c.detail.clone(),
            ),
            CheckResult::new(
                format!("{prefix}.packed span step confidences == alone"),
                c.confidence_err,
                TOL_BF16,
                c.detail,
            ),
        ],
        Err(e) => vec![CheckResult::failed(format!("{prefix}.packed span step"), e)],
    };
    out.push(CheckResult::from_result(
        format!("{prefix}.packed sessions == alone"),
        gen_miss,
        sessions(cuda, &prompts),
    ));
    cuda.set_packed_sessions(was);
    out
}

/// What the span-step check measured.
struct SpanStepOutcome {
    /// Fraction of predicted tokens that differ from alone (1 when the prediction counts
    /// differ or a slot was reassigned).
    token_miss: f64,
    /// Relative L2 of the confidences where the tokens agree.
    confidence_err: f64,
    detail: String,
}

/// The prompt, a shorter one (its tail reversed) and a longer one (it twice).
fn three_prompts(prompt: &[u32]) -> Vec<Vec<u32>> {
    let short: Vec<u32> = prompt[..prompt.len() - 5].iter().rev().copied().collect();
    let long: Vec<u32> = prompt.iter().chain(prompt).copied().collect();
    vec![prompt.to_vec(), short, long]
}

/// One canvas of the span-step check: its ids (prompt, 4 committed tokens, masks), cache,
/// span and queries.
struct Canvas {
    ids: Vec<u32>,
    cache: KvCache,
    span: Range<usize>,
    queries: Vec<usize>,
}

fn span_step(cuda: &Arc<CudaTransformer>, prompts: &[Vec<u32>]) -> Result<SpanStepOutcome> {
    let cfg = cuda.config().clone();
    let mut canvases = Vec::new();
    for p in prompts {
        let mut ids = p.clone();
        ids.resize(p.len() + GEN, cfg.mask_token_id);
        let block = p.len()..p.len() + BLOCK;
        let span = span_for(
            CacheMode::Dual,
            block.clone(),
            ids.len(),
            cfg.shifted_logits(),
        )
        .ok_or_else(|| crate::error::Error::invalid("no dual-cache span"))?;
        canvases.push(Canvas {
            cache: KvCache::new(&cfg, ids.len()),
            ids,
            span,
            queries: block.collect(),
        });
    }
    // The refreshes as one padded forward, against uncached predictions of the same canvases.
    let rule0 = PredictRule::greedy(&cfg, 0);
    let refreshed = packed_step(cuda, &mut canvases, &[&rule0; 3], |_| CacheStep::Refresh)?;
    let mut uncached = Vec::new();
    for c in &canvases {
        uncached.push(cuda.predict(&c.ids, &c.queries, &rule0)?);
    }
    // Commit the block's first 4 predictions, as a step would.
    for (c, first) in canvases.iter_mut().zip(&refreshed) {
        for (q, pr) in c.queries.iter().zip(first).take(4) {
            c.ids[*q] = pr.token;
        }
        c.queries.drain(..4);
    }
    // Canvas 1 predicts only part of its masks; canvas 2 has its own rule (another step).
    canvases[1].queries.truncate(10);
    let (r1, r7) = (PredictRule::greedy(&cfg, 1), PredictRule::greedy(&cfg, 7));
    let rules = [&r1, &r1, &r7];
    let misses0 = cuda.cache_slot_misses();
    let packed = packed_step(cuda, &mut canvases, &rules, |c| {
        CacheStep::Span(c.span.clone())
    })?;
    // Alone on the same caches (a span step rewrites only its own rows' K/V).
    let mut alone = Vec::new();
    for (c, rule) in canvases.iter_mut().zip(rules) {
        let step = CacheStep::Span(c.span.clone());
        alone.push(cuda.predict_cached(&c.ids, &c.queries, rule, &mut c.cache, &step)?);
    }
    let misses = cuda.cache_slot_misses() - misses0;
    let counts_ok = [(&refreshed, &uncached), (&packed, &alone)]
        .iter()
        .all(|(p, a)| {
            p.len() == a.len() && p.iter().zip(a.iter()).all(|(x, y)| x.len() == y.len())
        });
    let pairs: Vec<(&Prediction, &Prediction)> = refreshed
        .iter()
        .chain(&packed)
        .flatten()
        .zip(uncached.iter().chain(&alone).flatten())
        .collect();
    let (pc, ac): (Vec<f32>, Vec<f32>) = pairs
        .iter()
        .filter(|(p, a)| p.token == a.token)
        .map(|(p, a)| (p.confidence as f32, a.confidence as f32))
        .unzip();
    let same = pc.len();
    let token_miss = if counts_ok && misses == 0 && !pairs.is_empty() {
        1.0 - same as f64 / pairs.len() as f64
    } else {
        1.0
    };
    let confidence_err = check::rel_l2(&pc, &ac);
    let spans: Vec<&Range<usize>> = canvases.iter().map(|c| &c.span).collect();
    Ok(SpanStepOutcome {
        token_miss,
        confidence_err,
        detail: format!(
            "padded refresh vs uncached, then spans {spans:?} vs alone: {same}/{} tokens \
             agree (prediction counts equal: {counts_ok}); confidences rel. L2 \
             {confidence_err:.2e} where they agree; {misses} slot misses",
            pairs.len()
        ),
    })
}

/// One `predict_cached_batch` call over `canvases` (step `step(canvas)`, rule `rules[i]`).
fn packed_step(
    cuda: &CudaTransformer,
    canvases: &mut [Canvas],
    rules: &[&PredictRule],
    step: impl Fn(&Canvas) -> CacheStep,
) -> Result<Vec<Vec<Prediction>>> {
    let mut items: Vec<CachedQuery<'_>> = canvases
        .iter_mut()
        .zip(rules)
        .map(|(c, rule)| CachedQuery {
            step: step(c),
            ids: &c.ids,
            queries: &c.queries,
            rule,
            cache: &mut c.cache,
        })
        .collect();
    cuda.predict_cached_batch(&mut items)
}

fn sessions(cuda: &Arc<CudaTransformer>, prompts: &[Vec<u32>]) -> Result<(f64, String)> {
    let model: Arc<dyn Model> = cuda.clone();
    let cfg = cuda.config().clone();
    let session = |p: &[u32]| -> Result<Session> {
        let mut canvas = p.to_vec();
        canvas.resize(p.len() + GEN, cfg.mask_token_id);
        let params = GenerationParams {
            steps: GEN / 4,
            block_len: BLOCK,
            temperature: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            ..Default::default()
        };
        let mut s = Session::new(model.clone(), canvas, params)?;
        s.set_decoding(Decoding {
            cache: CacheMode::Dual,
            ..Decoding::default()
        })?;
        Ok(s)
    };
    let misses0 = cuda.cache_slot_misses();
    let mut batch = prompts
        .iter()
        .map(|p| session(p))
        .collect::<Result<Vec<_>>>()?;
    let rounds = run_batch(&mut batch)?;
    let misses = cuda.cache_slot_misses() - misses0;
    let (mut same, mut total, mut refreshes_equal) = (0, 0, true);
    for (p, b) in prompts.iter().zip(&batch) {
        let mut alone = session(p)?;
        alone.run()?;
        let (x, y) = (&b.canvas()[p.len()..], &alone.canvas()[p.len()..]);
        same += x.iter().zip(y).filter(|(a, b)| a == b).count();
        total += y.len();
        refreshes_equal &= b.cache_stats().refreshes == alone.cache_stats().refreshes;
    }
    let miss = if refreshes_equal && misses == 0 && total > 0 {
        1.0 - same as f64 / total as f64
    } else {
        f64::INFINITY
    };
    Ok((
        miss,
        format!(
            "{same}/{total} tokens as alone over {rounds} rounds; refreshes as alone: \
             {refreshes_equal}; {misses} slot misses"
        ),
    ))
}
