//! GPU checks of the narrowed last layer ([`KernelChoice::query_last_layer`], [`super::narrow`])
//! on a loaded checkpoint, for `dllm-gpu-check`'s model checks: two models identical but for
//! the switch run the same steps, whatever the environment asks for.
//!
//! - A no-cache step's logits (read back with `span_logits` from the step's own forward), over
//!   one canvas and over three, eager, captured and replayed, match the model that finishes
//!   every row within the bf16 tolerance (the last layer's query side runs on other GEMM kernels
//!   at its smaller row count), and rows the narrowed step did not finish are refused rather
//!   than read.
//! - A narrowed dual-cache refresh still stores every row's keys and values: the block forward
//!   after it gives the same bits as after a refresh that finished every row.
//! - Greedy generation through the step API (no cache and dual cache, CUDA graphs as
//!   configured) gives the same tokens as without the switch, up to `gen_miss`.
//! - The Session path's uncached prediction (`Model::predict`, unsorted and repeated queries), a
//!   cached refresh (`Model::predict_cached`), a prediction of a step's rows on another canvas
//!   right after the step, and a padded batch (`Model::predict_batch`: canvases of three
//!   lengths, as many queries each) predict what the model without the switch does: the same
//!   tokens, confidences within the bf16 tolerance.

use super::{CudaTransformer, KernelChoice};
use crate::backend::cuda::check::{self, CheckResult, TOL_BF16};
use crate::backend::cuda::CudaDevice;
use crate::config::ModelConfig;
use crate::denoise::predict::{PredictRule, Prediction};
use crate::error::{Error, Result};
use crate::model::kv_cache::{CacheStep, KvCache};
use crate::model::{BatchQuery, Model};
use crate::weights::WeightStore;
use std::ops::Range;
use std::sync::Arc;

/// Masked positions after the prompt: two blocks of 32.
const GEN: usize = 64;
const BLOCK: usize = 32;

/// The checks (names start with `model.query last layer`); `prompt` holds no mask id.
pub fn query_last_layer_checks(
    dev: &Arc<CudaDevice>,
    store: &WeightStore,
    cfg: &ModelConfig,
    prompt: &[u32],
    gen_miss: f64,
) -> Vec<CheckResult> {
    let load = |on: bool| {
        let kernels = KernelChoice {
            query_last_layer: on,
            ..KernelChoice::fast()
        };
        CudaTransformer::new(dev.clone(), store, cfg, kernels)
    };
    let (on, off) = match (load(true), load(false)) {
        (Ok(on), Ok(off)) => (on, off),
        (Err(e), _) | (_, Err(e)) => {
            return vec![CheckResult::failed("model.query last layer load", e)];
        }
    };
    let mut canvas = prompt.to_vec();
    canvas.resize(prompt.len() + GEN, cfg.mask_token_id);
    let span = prompt.len()..prompt.len() + BLOCK;
    let case = Case {
        cfg,
        canvas: &canvas,
        span,
    };
    vec![
        CheckResult::from_result(
            "model.query last layer step logits == every row b1",
            TOL_BF16,
            case.step_logits(&on, &off, 1),
        ),
        CheckResult::from_result(
            "model.query last layer step logits == every row b3",
            TOL_BF16,
            case.step_logits(&on, &off, 3),
        ),
        CheckResult::from_result(
            "model.query last layer refresh keeps every row's K/V",
            0.0,
            case.refresh(&on, &off),
        ),
        CheckResult::from_result(
            "model.query last layer greedy generation",
            gen_miss,
            case.generation(&on, &off, prompt.len()),
        ),
        CheckResult::from_result(
            "model.query last layer Session predictions",
            TOL_BF16,
            case.session(&on, &off),
        ),
    ]
}

struct Case<'a> {
    cfg: &'a ModelConfig,
    canvas: &'a [u32],
    span: Range<usize>,
}

impl Case<'_> {
    fn rule(&self, step: u64) -> PredictRule {
        PredictRule::greedy(self.cfg, step)
    }

    /// `batch` distinct canvases: the case's canvas with its ids shifted per canvas.
    fn canvases(&self, batch: usize) -> Vec<u32> {
        let (mask, vocab) = (self.cfg.mask_token_id, self.cfg.vocab_size);
        (0..batch)
            .flat_map(|b| {
                self.canvas.iter().map(move |&t| match t {
                    t if t == mask => mask,
                    t => match ((t as usize + 101 * b) % vocab) as u32 {
                        v if v == mask => 0,
                        v => v,
                    },
                })
            })
            .collect()
    }

    /// No-cache steps over `batch` canvases, three times (an eager warm-up, then a capture and
    /// a replay when graphs are on), each followed by its forward's logits of the step's span.
    fn step_logits(
        &self,
        on: &CudaTransformer,
        off: &CudaTransformer,
        batch: usize,
    ) -> Result<(f64, String)> {
        let canvases = self.canvases(batch);
        let len = self.canvas.len();
        let run = |m: &CudaTransformer| -> Result<Vec<Vec<f32>>> {
            (0..3)
                .map(|_| {
                    m.set_canvases(&canvases, batch, len)?;
                    m.step(self.span.clone(), false, false, &self.rule(0), 1)?;
                    m.span_logits(self.span.clone(), 0)
                })
                .collect()
        };
        let (got, want) = (run(on)?, run(off)?);
        let err = got
            .iter()
            .map(|g| check::rel_l2(g, &want[0]))
            .fold(0.0, f64::max);
        // Warm-up, capture and replay run the same kernels: the same bits.
        let repeatable = got.iter().all(|g| {
            g.len() == got[0].len()
                && g.iter()
                    .zip(&got[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits())
        });
        let width = self.cfg.logits_width();
        let want_argmax: Vec<usize> = want[0].chunks(width).map(check::argmax).collect();
        let (same_argmax, _) = check::argmax_agreement(&got[2], width, &want_argmax);
        // The next block's rows were left unfinished by the narrowed step: refused, not read.
        let next = self.span.end..self.span.end + BLOCK;
        let refused = matches!(on.span_logits(next, 0), Err(Error::State(_)));
        let detail = format!(
            "{same_argmax}/{} rows' argmax equal; the three runs bit-identical: {repeatable}; \
             other rows refused: {refused}",
            batch * self.span.len()
        );
        let ok = refused && repeatable;
        Ok((if ok { err } else { f64::INFINITY }, detail))
    }

    /// A refresh step, then a block forward over its span against the stored cache.
    fn refresh(&self, on: &CudaTransformer, off: &CudaTransformer) -> Result<(f64, String)> {
        let fwd_start = self
            .cfg
            .source_position(self.span.start)
            .min(self.span.start);
        let run = |m: &CudaTransformer| -> Result<(Vec<u32>, Vec<f32>)> {
            m.set_canvases(self.canvas, 1, self.canvas.len())?;
            m.step(self.span.clone(), false, true, &self.rule(0), 1)?;
            m.forward_block(fwd_start, self.span.end - fwd_start)?;
            Ok((m.canvases()?, m.span_logits(self.span.clone(), fwd_start)?))
        };
        let ((c_on, l_on), (c_off, l_off)) = (run(on)?, run(off)?);
        if c_on != c_off {
            return Ok((
                f64::INFINITY,
                "the two refreshes committed different tokens (a near tie?)".into(),
            ));
        }
        let differ = l_on
            .iter()
            .zip(&l_off)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        Ok((
            if differ == 0 { 0.0 } else { 1.0 },
            format!(
                "{differ} of {} block logits differ in their bits",
                l_on.len()
            ),
        ))
    }

    /// `Model::predict` and a refresh's `Model::predict_cached` on both models: the largest
    /// relative confidence difference, and whether every token agrees.
    fn session(&self, on: &CudaTransformer, off: &CudaTransformer) -> Result<(f64, String)> {
        let s = self.span.start;
        let queries = [s + 5, s + 1, s + 5, s + 30, s];
        let rule = self.rule(0);
        // Another canvas, and the span's own positions.
        let other = self.canvases(2)[self.canvas.len()..].to_vec();
        let span_queries: Vec<usize> = self.span.clone().collect();
        let run = |m: &CudaTransformer| -> Result<Vec<Prediction>> {
            let mut out = m.predict(self.canvas, &queries, &rule)?;
            let mut cache = KvCache::new(self.cfg, self.canvas.len());
            out.extend(m.predict_cached(
                self.canvas,
                &queries,
                &rule,
                &mut cache,
                &CacheStep::Refresh,
            )?);
            // A step over the span, then a prediction of the same rows of another canvas: none
            // of the step's rows may stand in for the new forward's.
            m.set_canvases(self.canvas, 1, self.canvas.len())?;
            m.step(self.span.clone(), false, false, &rule, 1)?;
            out.extend(m.predict(&other, &span_queries, &rule)?);
            // A padded batch of three canvases of different lengths, one rule and eight
            // queries each (so its last layer narrows too).
            let lens = [
                self.canvas.len(),
                self.canvas.len() - 9,
                self.canvas.len() - 30,
            ];
            let three = self.canvases(3);
            let members: Vec<(&[u32], Vec<usize>)> = lens
                .iter()
                .enumerate()
                .map(|(b, &n)| {
                    let ids = &three[b * self.canvas.len()..b * self.canvas.len() + n];
                    (ids, (s + 2 * b..s + 2 * b + 8).collect())
                })
                .collect();
            let items: Vec<BatchQuery<'_>> = members
                .iter()
                .map(|(ids, q)| BatchQuery {
                    ids,
                    queries: q,
                    rule: &rule,
                })
                .collect();
            out.extend(m.predict_batch(&items)?.into_iter().flatten());
            Ok(out)
        };
        let (got, want) = (run(on)?, run(off)?);
        let same = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.token == w.token)
            .count();
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g.confidence - w.confidence).abs() / w.confidence.abs().max(1e-30))
            .fold(0.0, f64::max);
        let all = same == want.len() && got.len() == want.len();
        Ok((
            if all { err } else { f64::INFINITY },
            format!(
                "{same}/{} tokens equal (predict and a dual-cache refresh with queries {queries:?}, \
                 a step's span predicted on another canvas, a padded batch of three)",
                want.len()
            ),
        ))
    }

    /// Greedy generation of both blocks, one token per step, without and with the dual cache.
    fn generation(
        &self,
        on: &CudaTransformer,
        off: &CudaTransformer,
        prompt_len: usize,
    ) -> Result<(f64, String)> {
        let run = |m: &CudaTransformer, dual: bool| -> Result<Vec<u32>> {
            m.set_canvases(self.canvas, 1, self.canvas.len())?;
            let mut step = 0;
            for b in 0..GEN / BLOCK {
                let span = prompt_len + b * BLOCK..prompt_len + (b + 1) * BLOCK;
                for i in 0..BLOCK {
                    m.step(
                        span.clone(),
                        dual && i > 0,
                        dual && i == 0,
                        &self.rule(step),
                        1,
                    )?;
                    step += 1;
                }
            }
            Ok(m.canvases()?[prompt_len..].to_vec())
        };
        let mut same = 0;
        let mut detail = Vec::new();
        for (dual, mode) in [(false, "no cache"), (true, "dual cache")] {
            let (a, b) = (run(on, dual)?, run(off, dual)?);
            let n = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            same += n;
            detail.push(format!("{mode} {n}/{GEN}"));
        }
        let miss = 1.0 - same as f64 / (2 * GEN) as f64;
        Ok((miss, format!("{} tokens equal", detail.join(", "))))
    }
}
