//! The K/V-cache side of a [`Session`](super::Session): when a step refreshes the cache, which
//! rows the other steps compute, and the cached forwards themselves.
//!
//! The first step of each block (and the first step after anything invalidated the cache: a
//! lock, a remask, an EOS fill, new decoding options, a failed forward) is a refresh — a full
//! forward that also stores every layer's K/V, with the same predictions as the uncached loop.
//! The block's later steps compute only the span of [`span_with_vicinity`] (`prefix`: block
//! start to the canvas end; `dual`: the block; each widened by the decoding's vicinity) against
//! the cache.
//!
//! Classifier-free guidance keeps a second cache for the unconditional canvas, refreshed and
//! spanned in step with the first, so guided steps are cached too.

use super::credit::{CreditView, Deposit};
use super::predict::{predict_rows_filtered, Prediction};
use super::session::{cfg_combine, Decoding, StepPlan};
use crate::error::{Error, Result};
use crate::model::kv_cache::{span_with_vicinity, CacheMode, CacheStep, KvCache};
use crate::model::Model;
use std::ops::Range;

/// How many cached forwards of each kind a session ran (guided steps count once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Full forwards that stored the K/V.
    pub refreshes: usize,
    /// Span forwards against the cache.
    pub span_steps: usize,
}

/// The caches of one session and the block they were refreshed for.
#[derive(Debug, Default)]
pub struct CacheState {
    cond: Option<KvCache>,
    uncond: Option<KvCache>,
    /// The block whose step last refreshed the caches; `None`: the next step must refresh.
    block: Option<usize>,
    stats: CacheStats,
}

impl CacheState {
    /// Forces the next cached step to refresh (the canvas changed outside the running block).
    pub fn invalidate(&mut self) {
        self.block = None;
    }

    /// Forwards run so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Errors ([`Error::InvalidArgument`]) when `mode` needs a cache `model` cannot keep.
    pub fn check_supported(model: &dyn Model, mode: CacheMode) -> Result<()> {
        if mode != CacheMode::None && !model.supports_kv_cache() {
            return Err(Error::invalid(format!(
                "cache {}: the {} backend has no K/V cache for the denoising loop yet; use cache none",
                mode.name(),
                model.backend_name()
            )));
        }
        Ok(())
    }

    /// The predictions of `plan` through the caches, and their trace-credit deposits (empty
    /// unless `credit` is given; see [`super::credit`]). `block_range` spans the positions of the
    /// plan's block (lowest to one past the highest); `uncond` is the unconditional canvas when
    /// guidance is on. On error the caches are invalidated.
    #[allow(clippy::too_many_arguments)]
    pub fn predict(
        &mut self,
        model: &dyn Model,
        canvas: &[u32],
        uncond: Option<&[u32]>,
        block_range: Range<usize>,
        plan: &StepPlan,
        decoding: &Decoding,
        credit: Option<&CreditView>,
    ) -> Result<(Vec<Prediction>, Vec<Deposit>)> {
        let step = self.step_for(model, canvas.len(), block_range, plan, decoding)?;
        let cond = Self::cond_of(&mut self.cond, model, canvas.len());
        let result = if !decoding.needs_logits_at(&plan.queries) {
            model
                .predict_cached(canvas, &plan.queries, &plan.rule, cond, &step)
                .map(|p| (p, Vec::new()))
        } else {
            guided(
                model,
                canvas,
                uncond,
                cond,
                &mut self.uncond,
                plan,
                decoding,
                credit,
                &step,
            )
        };
        self.finish(plan, &step, result.is_ok());
        result
    }

    /// What `plan`'s cached forward does (a refresh at a new block or after an invalidation,
    /// else the span of [`span_with_vicinity`]) and the conditional cache it runs on, made for a canvas of
    /// `len` positions on first use. [`CacheState::finish`] records the outcome.
    pub fn begin(
        &mut self,
        model: &dyn Model,
        len: usize,
        block_range: Range<usize>,
        plan: &StepPlan,
        decoding: &Decoding,
    ) -> Result<(CacheStep, &mut KvCache)> {
        let step = self.step_for(model, len, block_range, plan, decoding)?;
        Ok((step, Self::cond_of(&mut self.cond, model, len)))
    }

    /// The step of [`CacheState::begin`].
    fn step_for(
        &self,
        model: &dyn Model,
        len: usize,
        block_range: Range<usize>,
        plan: &StepPlan,
        decoding: &Decoding,
    ) -> Result<CacheStep> {
        Ok(match self.block {
            Some(b) if b == plan.block => CacheStep::Span(
                span_with_vicinity(
                    decoding.cache,
                    block_range,
                    len,
                    model.config().shifted_logits(),
                    decoding.vicinity,
                )
                .ok_or_else(|| Error::State("cached step with cache mode none".into()))?,
            ),
            _ => CacheStep::Refresh,
        })
    }

    /// The conditional cache, made for a canvas of `len` positions on first use.
    fn cond_of<'c>(
        cond: &'c mut Option<KvCache>,
        model: &dyn Model,
        len: usize,
    ) -> &'c mut KvCache {
        cond.get_or_insert_with(|| KvCache::new(model.config(), len))
    }

    /// Records how `plan`'s cached forward `step` ([`CacheState::begin`]) ended: a refresh that
    /// succeeded makes the cache serve the plan's block; a failure invalidates it.
    pub fn finish(&mut self, plan: &StepPlan, step: &CacheStep, ok: bool) {
        if !ok {
            self.invalidate();
            return;
        }
        match step {
            CacheStep::Refresh => {
                self.block = Some(plan.block);
                self.stats.refreshes += 1;
            }
            CacheStep::Span(_) => self.stats.span_steps += 1,
        }
    }
}

/// A cached step that needs host logits: the conditional rows, the unconditional rows through
/// their own cache when `uncond` is given, the guidance combination, then host prediction
/// (filters, constraints, trace credit).
#[allow(clippy::too_many_arguments)]
fn guided(
    model: &dyn Model,
    canvas: &[u32],
    uncond: Option<&[u32]>,
    cond_cache: &mut KvCache,
    uncond_cache: &mut Option<KvCache>,
    plan: &StepPlan,
    decoding: &Decoding,
    credit: Option<&CreditView>,
    step: &CacheStep,
) -> Result<(Vec<Prediction>, Vec<Deposit>)> {
    let cfg = model.config();
    let width = cfg.logits_width();
    let mut logits = model.logits_cached(canvas, &plan.queries, cond_cache, step)?;
    if let Some(un_canvas) = uncond {
        let cache = uncond_cache.get_or_insert_with(|| KvCache::new(cfg, un_canvas.len()));
        let un = model.logits_cached(un_canvas, &plan.queries, cache, step)?;
        if un.len() != logits.len() {
            return Err(Error::Backend(format!(
                "unconditional cached forward gave {} logits, the conditional {}",
                un.len(),
                logits.len()
            )));
        }
        for (c, &u) in logits.iter_mut().zip(&un) {
            *c = cfg_combine(*c, u, decoding.cfg_scale);
        }
    }
    if logits.len() != plan.queries.len() * width {
        return Err(Error::Backend(format!(
            "cached forward gave {} logits for {} positions of width {width}",
            logits.len(),
            plan.queries.len()
        )));
    }
    Ok(predict_rows_filtered(
        &logits,
        width,
        &plan.queries,
        &plan.rule,
        &decoding.filter,
        &decoding.constraints,
        credit,
    ))
}
