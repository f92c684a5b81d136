//! The denoising state machine: a [`Session`] owns one canvas and fills its masked positions
//! step by step with a [`Model`], following LLaDA's reference `generate()`.
//!
//! Each step: one forward over the whole canvas; the still-masked positions of the current
//! block are the queries; the `k` most confident predictions (per [`schedule::transfer_counts`],
//! or [`schedule::dream_count`] under the Dream schedule)
//! are committed ([`commit::top_k`]). Positions that were not masks at creation never change.
//!
//! A step is split into [`Session::plan`] (what forward is needed) and [`Session::apply`] (commit
//! its predictions), so a batching driver can run the forwards of many sessions together.
//!
//! [`Decoding`] (set with [`Session::set_decoding`]) adds the decoding strategies beyond the
//! reference loop: the parallel commit rules of Fast-dLLM (threshold, factor) and dInfer
//! (hierarchy; with all three `steps` becomes an upper bound and a block ends as soon as it has
//! no masks), top-k / top-p, classifier-free guidance, trace credit ([`super::credit`]) and
//! stopping at EOS. Steps that need host logits (filters, guidance, credit, a constrained
//! position) run through [`Model::logits_at`]; the others through [`Model::predict`]. With a
//! block K/V cache ([`Decoding::cache`]) [`Session::step`] runs its forwards through
//! [`super::cached`] instead.
//!
//! Self-correction ([`Decoding::revise`], rules in [`super::revise`]) and the per-step
//! event of [`Session::run_observed`] ([`observe`](super::observe)) are layered on the same
//! plan / predict / apply split: [`Session::predict_scored`] and [`Session::apply_scored`].

use super::cached::{CacheState, CacheStats};
use super::canvas::masked_positions;
use super::commit::{self, Candidate};
use super::constraint::Constraints;
use super::credit::{CreditParams, CreditView, Deposit, Trace};
use super::observe::{BlockDone, StepEvent, StepReport};
use super::predict::{predict_rows_filtered, PredictRule, Prediction, Remasking, SampleFilter};
use super::revise::{self, Ledger};
use super::schedule::{self, Schedule, ScheduleKind};
use crate::error::{Error, Result};
use crate::model::{CacheMode, CacheStep, CachedQuery, Model};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// How a canvas is denoised.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Total denoising steps; under the LLaDA schedule a multiple of the number of blocks.
    /// Default 128.
    pub steps: usize,
    /// Masked positions per block (the last block may be shorter; unused by the Dream
    /// schedule). Default 32.
    pub block_len: usize,
    /// 0 = greedy; `> 0` = Gumbel-max sampling at this temperature. Default 0.
    pub temperature: f64,
    /// Confidence used to rank candidates. Default [`Remasking::LowConfidence`].
    pub remasking: Remasking,
    /// Keys every random draw. Default 0.
    pub seed: u64,
    /// How many tokens each step commits. Default [`ScheduleKind::Llada`].
    pub schedule: ScheduleKind,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            steps: 128,
            block_len: 32,
            temperature: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            schedule: ScheduleKind::Llada,
        }
    }
}

/// Which candidates of a step are committed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CommitPolicy {
    /// The fixed schedule: step `i` of a block commits `transfer_counts(n, s)[i]` (LLaDA).
    #[default]
    Schedule,
    /// Every candidate with confidence ≥ the value, at least one (Fast-dLLM threshold rule).
    Threshold(f64),
    /// The Fast-dLLM factor rule with this factor (see [`commit::factor`]).
    Factor(f64),
    /// dInfer's hierarchical rule (see [`commit::hierarchy`]): each run of adjacent masked
    /// positions commits its most confident when above `low` (> 0, as the C ABI's
    /// `hierarchy_low`, where 0 is off), every position above `high` (when given) commits too,
    /// at least one.
    Hierarchy { high: Option<f64>, low: f64 },
}

impl CommitPolicy {
    /// Whether the number of commits depends on the confidences (`steps` is then a bound).
    pub fn is_dynamic(&self) -> bool {
        !matches!(self, CommitPolicy::Schedule)
    }

    /// Indices (into `candidates`, in rank order) of the candidates this policy commits when the
    /// step's count is `k` (the least count under a dynamic policy).
    pub fn select(&self, candidates: &[Candidate], k: usize) -> Vec<usize> {
        match *self {
            CommitPolicy::Schedule => commit::top_k(candidates, k),
            CommitPolicy::Threshold(t) => commit::threshold(candidates, t, k),
            CommitPolicy::Factor(f) => commit::factor(candidates, f, k),
            CommitPolicy::Hierarchy { high, low } => commit::hierarchy(candidates, high, low, k),
        }
    }
}

/// Decoding strategies beyond [`GenerationParams`]; the default is the reference loop.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decoding {
    /// How many candidates a step commits.
    pub commit: CommitPolicy,
    /// Top-k / top-p narrowing of the sampled candidates (temperature > 0 only).
    pub filter: SampleFilter,
    /// Classifier-free guidance scale `s` (0 = off): `logits = un + (s + 1)(cond − un)`, `un`
    /// from the canvas with every position that was not a mask at creation masked.
    pub cfg_scale: f64,
    /// Once an EOS is committed with every position of its gap before it committed, fill the
    /// rest of that gap with EOS (a gap is a run of consecutive generated positions: the whole
    /// generation after a prompt, or one `[MASK:n]` of a canvas with fixed text between gaps);
    /// the run stops when no mask is left.
    pub stop_at_eos: bool,
    /// Block K/V cache between the steps of a block (Fast-dLLM prefix / dual; see
    /// [`crate::model::kv_cache`]). `None` is the reference loop.
    pub cache: CacheMode,
    /// dInfer's vicinity cache update (0 = off): a cached step also recomputes the `vicinity`
    /// positions before its block (and, with the dual cache, after it), refreshing their K/V
    /// in the cache every step ([`crate::model::kv_cache::span_with_vicinity`]). Needs a cache.
    pub vicinity: usize,
    /// Self-correction threshold `R` (`0 < R < 1`; `None` = off): after each step, tokens the
    /// model committed earlier in the current block whose probability under the step's logits
    /// is below `R` are re-masked (see [`super::revise`]). Such steps need host logits.
    pub revise: Option<f64>,
    /// The ids each constrained position may take (see [`super::constraint`]); steps that
    /// predict a constrained position need host logits. Checked against the canvas by
    /// [`Session::set_decoding`]; [`Session::constrain`] edits one position.
    pub constraints: Constraints,
    /// Trace credit (`None` = off): each masked position's earlier predictions in its block
    /// lift the logits of the ids it kept predicting (see [`super::credit`]). Every step then
    /// needs host logits.
    pub credit: Option<CreditParams>,
}

impl Decoding {
    /// Checks the values. Errors ([`Error::InvalidArgument`]) name the option.
    pub fn validate(&self) -> Result<()> {
        match self.commit {
            CommitPolicy::Threshold(t) if !t.is_finite() => {
                return Err(Error::invalid(format!(
                    "threshold must be a finite number, got {t}"
                )))
            }
            CommitPolicy::Factor(f) if !(f.is_finite() && f > 0.0) => {
                return Err(Error::invalid(format!(
                    "factor must be a finite number > 0, got {f}"
                )))
            }
            CommitPolicy::Hierarchy { low, .. } if !(low.is_finite() && low > 0.0) => {
                return Err(Error::invalid(format!(
                    "hierarchy low threshold must be a finite number > 0, got {low}"
                )))
            }
            CommitPolicy::Hierarchy { high: Some(h), .. } if !h.is_finite() => {
                return Err(Error::invalid(format!(
                    "threshold must be a finite number, got {h}"
                )))
            }
            _ => {}
        }
        if !(self.filter.top_p > 0.0 && self.filter.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.filter.top_p
            )));
        }
        if let Some(r) = self.revise {
            revise::validate_threshold(r)?;
            if self.cache != CacheMode::None {
                return Err(Error::invalid(format!(
                    "revise ({r}) needs every step's logits of the whole block: use it with \
                     cache none, not {}",
                    self.cache.name()
                )));
            }
        }
        if let Some(c) = &self.credit {
            c.validate()?;
        }
        if self.vicinity > 0 && self.cache == CacheMode::None {
            return Err(Error::invalid(format!(
                "vicinity ({}) widens the cached steps' rows: use it with cache prefix or dual",
                self.vicinity
            )));
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 0.0) {
            return Err(Error::invalid(format!(
                "cfg_scale must be a finite number >= 0, got {}",
                self.cfg_scale
            )));
        }
        Ok(())
    }

    /// Whether every step needs the logits on the host (filters, guidance or trace credit).
    pub fn samples_on_host(&self) -> bool {
        self.filter.is_active() || self.cfg_scale > 0.0 || self.credit.is_some()
    }

    /// Whether some step may need the logits on the host (filters, guidance, credit or
    /// constraints).
    pub fn needs_logits(&self) -> bool {
        self.samples_on_host() || !self.constraints.is_empty()
    }

    /// Whether a step predicting `queries` needs the logits on the host: filters, guidance,
    /// credit, or a constrained position among `queries` (a constraint elsewhere costs nothing).
    pub fn needs_logits_at(&self, queries: &[usize]) -> bool {
        self.samples_on_host() || self.constraints.constrains_any(queries)
    }
}

/// What one call to [`Session::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInfo {
    /// Global index of the step (0-based); on a finished session, [`Session::total_steps`].
    pub step: usize,
    /// Positions committed by this step, in increasing order (empty on a zero-count step).
    pub committed: Vec<usize>,
    /// Masked positions left after the step.
    pub masks_left: usize,
    /// Every scheduled step has been taken.
    pub done: bool,
}

/// The forward one step needs: run `model.predict(canvas, queries, rule)`, then
/// [`Session::apply`] the result. `k == 0` means no forward is needed.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    /// Global step index.
    pub step: usize,
    /// Block being denoised.
    pub block: usize,
    /// Still-masked positions of the block, in increasing order.
    pub queries: Vec<usize>,
    /// Number of positions to commit (≤ `queries.len()`); under a dynamic [`CommitPolicy`] the
    /// least number (the commit rule may take more).
    pub k: usize,
    pub rule: PredictRule,
    /// Positions holding model-committed tokens that this step may re-mask (self-correction on,
    /// `k > 0`, not the block's last step): the step needs the probability of each one's current
    /// token ([`Session::predict_scored`]). Empty otherwise.
    pub revisable: Vec<usize>,
}

/// One canvas being denoised.
pub struct Session {
    model: Arc<dyn Model>,
    params: GenerationParams,
    canvas: Vec<u32>,
    /// Positions that were masks at creation, increasing; chunked by `block_len` into blocks.
    generated: Vec<usize>,
    schedule: Schedule,
    /// Steps taken so far (= global index of the next step).
    cursor: usize,
    /// Per-step counts of the current block, fixed from its mask count when the block starts.
    block_counts: Vec<usize>,
    masks_left: usize,
    mask: u32,
    vocab_size: usize,
    /// Blocks added by [`Session::remask`], denoised after the schedule's blocks, in order.
    extra_blocks: Vec<Vec<usize>>,
    /// For each canvas position, the block that fills it (`usize::MAX`: none). Remasking moves
    /// a position to its new block, so the block running at that time never fills it.
    owner: Vec<usize>,
    decoding: Decoding,
    /// Forward steps actually taken (differs from `cursor` when dynamic blocks end early).
    taken: usize,
    eos: u32,
    /// Block K/V caches (unused under [`CacheMode::None`]).
    cache: CacheState,
    /// Self-correction bookkeeping (which positions the model committed, re-mask counts).
    ledger: Ledger,
    /// Leading blocks already reported complete by [`Session::step_report`].
    blocks_reported: usize,
    /// Trace credit of the block being denoised (unused unless [`Decoding::credit`] is on).
    trace: Trace,
    /// The deposits of the last credited prediction, stored into `trace` when its step is
    /// applied (a prediction only reads the trace, so predicting twice changes nothing).
    pending_credit: Mutex<Option<PendingCredit>>,
}

/// A credited prediction's deposits, waiting for [`Session::apply_scored`] of its step.
#[derive(Debug)]
struct PendingCredit {
    step: usize,
    block: usize,
    deposits: Vec<Deposit>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("backend", &self.model.backend_name())
            .field("params", &self.params)
            .field("len", &self.canvas.len())
            .field("steps_taken", &self.cursor)
            .field("total_steps", &self.total_steps())
            .field("masks_left", &self.masks_left)
            .finish()
    }
}

impl Session {
    /// Starts denoising `canvas`: every position holding the model's mask token is generated,
    /// every other position stays fixed.
    ///
    /// Errors ([`Error::InvalidArgument`]): empty canvas, canvas longer than the model's
    /// `max_seq_len`, an id outside the embedding (the message names position and id), a
    /// non-finite or negative temperature, or a bad schedule (see [`Schedule::new`]).
    pub fn new(
        model: Arc<dyn Model>,
        canvas: Vec<u32>,
        params: GenerationParams,
    ) -> Result<Session> {
        let cfg = model.config();
        if canvas.is_empty() {
            return Err(Error::invalid("the canvas is empty"));
        }
        if canvas.len() > cfg.max_seq_len {
            return Err(Error::invalid(format!(
                "canvas of {} tokens exceeds the model's max_seq_len {}",
                canvas.len(),
                cfg.max_seq_len
            )));
        }
        if let Some((pos, &id)) = canvas
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= cfg.embedding_size)
        {
            return Err(Error::invalid(format!(
                "token id {id} at position {pos} is outside the model's embedding ({} rows)",
                cfg.embedding_size
            )));
        }
        if !(params.temperature.is_finite() && params.temperature >= 0.0) {
            return Err(Error::invalid(format!(
                "temperature must be a finite number >= 0, got {}",
                params.temperature
            )));
        }
        let len = canvas.len();
        let mask = cfg.mask_token_id;
        let vocab_size = cfg.vocab_size;
        let eos = cfg.eos_token_id;
        let generated = masked_positions(&canvas, mask);
        let schedule = Schedule::for_kind(
            params.schedule,
            generated.len(),
            params.block_len,
            params.steps,
        )?;
        let mut owner = vec![usize::MAX; canvas.len()];
        for b in 0..schedule.num_blocks() {
            for &p in &generated[schedule.block_range(b)] {
                owner[p] = b;
            }
        }
        Ok(Session {
            masks_left: generated.len(),
            model,
            params,
            canvas,
            generated,
            schedule,
            cursor: 0,
            block_counts: Vec::new(),
            mask,
            vocab_size,
            extra_blocks: Vec::new(),
            owner,
            decoding: Decoding::default(),
            taken: 0,
            eos,
            cache: CacheState::default(),
            ledger: Ledger::new(len),
            blocks_reported: 0,
            trace: Trace::default(),
            pending_credit: Mutex::new(None),
        })
    }

    /// Sets the decoding strategies (see [`Decoding`], its constraints included: they replace
    /// those of earlier calls and of [`Session::constrain`]); allowed at any time, effective
    /// from the next step. Errors ([`Error::InvalidArgument`], nothing changed): bad values, a
    /// constraint outside the canvas or with an id that is the mask or outside the vocabulary.
    pub fn set_decoding(&mut self, decoding: Decoding) -> Result<()> {
        decoding.validate()?;
        decoding
            .constraints
            .validate(self.canvas.len(), self.vocab_size, self.mask)?;
        CacheState::check_supported(&*self.model, decoding.cache)?;
        self.decoding = decoding;
        self.cache.invalidate();
        self.trace.clear();
        *self
            .pending_credit
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// The decoding strategies in effect.
    pub fn decoding(&self) -> &Decoding {
        &self.decoding
    }

    /// The predictions `plan` needs: [`Model::predict`] for the reference loop; with filters or
    /// guidance, [`Model::forward`] (twice for guidance) and host prediction. Always full
    /// forwards: the K/V cache is used by [`Session::step`] only.
    pub fn predict(&self, plan: &StepPlan) -> Result<Vec<Prediction>> {
        if plan.k == 0 {
            return Ok(Vec::new());
        }
        if !self.decoding.needs_logits_at(&plan.queries) && plan.revisable.is_empty() {
            return self.model.predict(&self.canvas, &plan.queries, &plan.rule);
        }
        Ok(self.predict_on_host(plan)?.0)
    }

    /// [`Session::predict`] plus, for each of `plan.revisable`, the probability of the token it
    /// holds under the step's logits (empty when `plan.revisable` is). With revisable positions
    /// the step runs [`Model::forward`] (one forward either way).
    pub fn predict_scored(&self, plan: &StepPlan) -> Result<(Vec<Prediction>, Vec<f64>)> {
        if plan.k == 0 || plan.revisable.is_empty() {
            return Ok((self.predict(plan)?, Vec::new()));
        }
        self.predict_on_host(plan)
    }

    /// Host logits (with guidance), host predictions, and the revisable positions' probabilities.
    /// Only the rows of the queried and the revisable positions are computed
    /// ([`Model::logits_at`]): the queries' first, then the revisable ones'.
    fn predict_on_host(&self, plan: &StepPlan) -> Result<(Vec<Prediction>, Vec<f64>)> {
        let width = self.model.config().logits_width();
        let q = plan.queries.len();
        let positions: Vec<usize> = plan
            .queries
            .iter()
            .chain(&plan.revisable)
            .copied()
            .collect();
        let mut logits = self.model.logits_at(&self.canvas, &positions)?;
        if logits.len() != positions.len() * width {
            return Err(Error::Backend(format!(
                "{} logits for {} positions of width {width}",
                logits.len(),
                positions.len()
            )));
        }
        let s = self.decoding.cfg_scale;
        if s > 0.0 {
            let un = self
                .model
                .logits_at(&self.unconditional_canvas(), &plan.queries)?;
            if un.len() != q * width {
                return Err(Error::Backend(format!(
                    "unconditional forward gave {} logits for {q} positions of width {width}",
                    un.len()
                )));
            }
            for (c, &u) in logits[..q * width].iter_mut().zip(&un) {
                *c = cfg_combine(*c, u, s);
            }
        }
        let (preds, deposits) = predict_rows_filtered(
            &logits[..q * width],
            width,
            &plan.queries,
            &plan.rule,
            &self.decoding.filter,
            &self.decoding.constraints,
            credit_view(&self.decoding, &self.trace, plan).as_ref(),
        );
        self.hold_credit(plan, deposits);
        let probs = revise::token_probs(
            &logits[q * width..],
            width,
            &self.canvas,
            &plan.revisable,
            &self.decoding.constraints,
        );
        Ok((preds, probs))
    }

    /// The canvas of the unconditional guidance pass: every position that was not a mask at
    /// creation (the prompt) holds the mask token; generated positions keep their state.
    pub fn unconditional_canvas(&self) -> Vec<u32> {
        let mut c = vec![self.mask; self.canvas.len()];
        for &p in &self.generated {
            c[p] = self.canvas[p];
        }
        c
    }

    /// Takes one step: plans it, runs the forward if it commits anything, applies the result.
    /// On a finished session it changes nothing and returns `done = true`. On error the
    /// session is unchanged.
    pub fn step(&mut self) -> Result<StepInfo> {
        Ok(self.step_report()?.info())
    }

    /// [`Session::step`], returning the full [`StepReport`] (re-masked positions, completed
    /// blocks, final prefix).
    pub fn step_report(&mut self) -> Result<StepReport> {
        let Some(plan) = self.plan() else {
            return Ok(self.report(self.cursor, None, Vec::new(), Vec::new()));
        };
        let (preds, probs) = self.predict_step(&plan)?;
        self.apply_scored(&plan, &preds, &probs)
    }

    /// The predictions [`Session::step`] uses for `plan` (through the K/V cache when one is on,
    /// which it updates) and the revisable positions' probabilities, for
    /// [`Session::apply_scored`]. `plan` must come from [`Session::plan`] with no change since.
    pub fn predict_step(&mut self, plan: &StepPlan) -> Result<(Vec<Prediction>, Vec<f64>)> {
        if self.decoding.cache == CacheMode::None {
            self.predict_scored(plan)
        } else {
            // Validation keeps --revise off with a cache, so no position needs a probability.
            Ok((self.predict_cached(plan)?, Vec::new()))
        }
    }

    /// The positions of `plan`'s block, lowest to one past the highest.
    fn block_range(&self, plan: &StepPlan) -> Result<Range<usize>> {
        let positions = self.block_positions(plan.block);
        match (positions.first(), positions.last()) {
            (Some(&a), Some(&b)) => Ok(a..b + 1),
            _ => Err(Error::State(format!("block {} is empty", plan.block))),
        }
    }

    /// `plan`'s cached forward as one canvas of a packed batch
    /// ([`crate::model::Model::predict_cached_batch`]): the canvas, the plan's queries and rule,
    /// the session's cache and the step it takes. The session must have a cache mode, no
    /// guidance, and `plan` must commit something (`k > 0`); after the batch,
    /// [`Session::finish_cached`] records the outcome, then [`Session::apply`] the predictions.
    pub fn cached_query<'a>(&'a mut self, plan: &'a StepPlan) -> Result<CachedQuery<'a>> {
        if self.decoding.cache == CacheMode::None
            || self.decoding.needs_logits_at(&plan.queries)
            || plan.k == 0
        {
            return Err(Error::State(
                "a packed cached step needs a cache mode, no guidance and a plan that commits"
                    .into(),
            ));
        }
        let range = self.block_range(plan)?;
        let len = self.canvas.len();
        let (step, cache) = self
            .cache
            .begin(&*self.model, len, range, plan, &self.decoding)?;
        Ok(CachedQuery {
            ids: &self.canvas,
            queries: &plan.queries,
            rule: &plan.rule,
            cache,
            step,
        })
    }

    /// Records how the packed cached forward of [`Session::cached_query`] ended (`ok`), with the
    /// step it took.
    pub fn finish_cached(&mut self, plan: &StepPlan, step: &CacheStep, ok: bool) {
        self.cache.finish(plan, step, ok);
    }

    /// [`Session::predict`] through the block K/V cache (see [`super::cached`]).
    fn predict_cached(&mut self, plan: &StepPlan) -> Result<Vec<Prediction>> {
        if plan.k == 0 {
            return Ok(Vec::new());
        }
        let range = self.block_range(plan)?;
        let uncond = (self.decoding.cfg_scale > 0.0).then(|| self.unconditional_canvas());
        // Fields, not `self`: the cache is borrowed mutably beside the trace.
        let credit = credit_view(&self.decoding, &self.trace, plan);
        let (preds, deposits) = self.cache.predict(
            &*self.model,
            &self.canvas,
            uncond.as_deref(),
            range,
            plan,
            &self.decoding,
            credit.as_ref(),
        )?;
        self.hold_credit(plan, deposits);
        Ok(preds)
    }

    /// Keeps `plan`'s credit deposits until its step is applied (nothing when credit is off).
    fn hold_credit(&self, plan: &StepPlan, deposits: Vec<Deposit>) {
        if self.decoding.credit.is_none() {
            return;
        }
        let pending = PendingCredit {
            step: plan.step,
            block: plan.block,
            deposits,
        };
        *self
            .pending_credit
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(pending);
    }

    /// Stores the held deposits of `plan`'s prediction into the trace (a step applied without a
    /// credited prediction of it stores nothing).
    fn store_credit(&mut self, plan: &StepPlan) {
        let pending = self
            .pending_credit
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Some(params), Some(p)) = (self.decoding.credit.as_ref(), pending) {
            if p.step == plan.step && p.block == plan.block {
                self.trace.commit(params, p.block, &p.deposits);
            }
        }
    }

    /// Cached forwards run so far (all zero under [`CacheMode::None`]).
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Steps until done.
    pub fn run(&mut self) -> Result<()> {
        self.run_with(|_, _| true)
    }

    /// Steps until done, calling `observer(info, canvas)` after each step; the observer
    /// returning `false` stops early (the session can be resumed later).
    pub fn run_with(&mut self, mut observer: impl FnMut(&StepInfo, &[u32]) -> bool) -> Result<()> {
        self.run_observed(|e| observer(&e.report.info(), e.canvas))
    }

    /// Steps until done, calling `observer` with each step's [`StepEvent`] (canvas after the
    /// step, committed and re-masked positions, completed blocks); `false` stops early (the
    /// session can be resumed later).
    pub fn run_observed(&mut self, mut observer: impl FnMut(&StepEvent) -> bool) -> Result<()> {
        while !self.is_done() {
            let report = self.step_report()?;
            let event = StepEvent {
                report: &report,
                canvas: &self.canvas,
            };
            if !observer(&event) {
                break;
            }
        }
        Ok(())
    }

    /// The forward the next step needs, or `None` when the session is done. Entering a new block
    /// fixes that block's per-step counts from its current mask count.
    pub fn plan(&mut self) -> Option<StepPlan> {
        let (block, i) = self.locate(self.cursor)?;
        let queries: Vec<usize> = self
            .block_positions(block)
            .iter()
            .copied()
            .filter(|&p| self.canvas[p] == self.mask && self.owner[p] == block)
            .collect();
        if i == 0 {
            self.block_counts = schedule::transfer_counts(queries.len(), self.block_steps(block));
        }
        let k = if self.decoding.commit.is_dynamic() {
            // Least count that still finishes the block within its remaining steps.
            let steps_left = self.block_steps(block) - i;
            queries.len().div_ceil(steps_left)
        } else {
            match self.params.schedule {
                ScheduleKind::Llada => self.block_counts[i].min(queries.len()),
                // Dream counts from the masks left now, not from the block's start.
                ScheduleKind::Dream => {
                    schedule::dream_count(queries.len(), i, self.block_steps(block))
                }
            }
        };
        let revisable = match self.decoding.revise {
            Some(_) if k > 0 && i + 1 < self.block_steps(block) => self
                .block_positions(block)
                .iter()
                .copied()
                .filter(|&p| {
                    self.owner[p] == block
                        && self.canvas[p] != self.mask
                        && self.ledger.may_revise(p)
                })
                .collect(),
            _ => Vec::new(),
        };
        let rule = PredictRule {
            temperature: self.params.temperature,
            remasking: self.params.remasking,
            seed: self.params.seed,
            step: self.cursor as u64,
            mask_token: self.mask,
            vocab_size: self.vocab_size,
        };
        Some(StepPlan {
            step: self.cursor,
            block,
            queries,
            k,
            rule,
            revisable,
        })
    }

    /// Indices into `plan.queries` (and `preds`, one per query) of the candidates the commit
    /// rule takes, in rank order: what [`Session::apply`] commits.
    pub fn chosen(&self, plan: &StepPlan, preds: &[Prediction]) -> Vec<usize> {
        let candidates: Vec<Candidate> = plan
            .queries
            .iter()
            .zip(preds)
            .map(|(&position, p)| Candidate {
                position,
                confidence: p.confidence,
            })
            .collect();
        self.decoding.commit.select(&candidates, plan.k)
    }

    /// Commits the `plan.k` most confident of `preds` (one per `plan.queries`, in order) and
    /// advances to the next step. `plan` must come from [`Session::plan`] with no change since.
    ///
    /// Errors ([`Error::Backend`], session unchanged): wrong number of predictions, or a chosen
    /// token that is the mask or outside the vocabulary.
    ///
    /// A plan with revisable positions (self-correction on) needs their probabilities: use
    /// [`Session::apply_scored`]; `apply` then fails with [`Error::State`].
    pub fn apply(&mut self, plan: &StepPlan, preds: &[Prediction]) -> Result<StepInfo> {
        Ok(self.apply_scored(plan, preds, &[])?.info())
    }

    /// [`Session::apply`] with `probs` from [`Session::predict_scored`]: after committing, the
    /// revisable positions whose probability is below [`Decoding::revise`] are re-masked and
    /// the block's remaining per-step counts are re-planned to cover them.
    ///
    /// Errors (session unchanged): those of [`Session::apply`]; [`Error::State`] when `probs`
    /// does not hold one probability per `plan.revisable` position.
    pub fn apply_scored(
        &mut self,
        plan: &StepPlan,
        preds: &[Prediction],
        probs: &[f64],
    ) -> Result<StepReport> {
        let revising = plan.k > 0 && !plan.revisable.is_empty();
        if revising && probs.len() != plan.revisable.len() {
            return Err(Error::State(format!(
                "the plan of step {} needs the probabilities of {} revisable positions \
                 (self-correction is on), got {}: use Session::predict_scored and apply_scored",
                plan.step,
                plan.revisable.len(),
                probs.len()
            )));
        }
        if plan.step != self.cursor {
            return Err(Error::State(format!(
                "plan for step {} applied at step {}",
                plan.step, self.cursor
            )));
        }
        let mut committed = Vec::with_capacity(plan.k);
        if plan.k > 0 {
            if preds.len() != plan.queries.len() {
                return Err(Error::Backend(format!(
                    "{} predictions for {} queried positions",
                    preds.len(),
                    plan.queries.len()
                )));
            }
            let chosen = self.chosen(plan, preds);
            for &c in &chosen {
                let t = preds[c].token;
                if t == self.mask || t as usize >= self.vocab_size {
                    debug_assert!(
                        false,
                        "backend chose token {t} at position {}",
                        plan.queries[c]
                    );
                    return Err(Error::Backend(format!(
                        "prediction at position {} is token {t} (the mask or outside the \
                         vocabulary of {})",
                        plan.queries[c], self.vocab_size
                    )));
                }
            }
            for &c in &chosen {
                let p = plan.queries[c];
                debug_assert_eq!(self.canvas[p], self.mask, "position {p} is not masked");
                self.canvas[p] = preds[c].token;
                self.ledger.committed(p);
                committed.push(p);
            }
            committed.sort_unstable();
            self.masks_left -= committed.len();
            self.taken += 1;
            self.store_credit(plan);
        }
        let mut remasked = match self.decoding.revise {
            Some(r) if revising => self.revise(plan, probs, r),
            _ => Vec::new(),
        };
        self.cursor += 1;
        if self.decoding.commit.is_dynamic() {
            // A block with no masks left ends now: jump to the next block's first step.
            let block_done = !self
                .block_positions(plan.block)
                .iter()
                .any(|&p| self.canvas[p] == self.mask && self.owner[p] == plan.block);
            if block_done {
                while let Some((b, _)) = self.locate(self.cursor) {
                    if b != plan.block {
                        break;
                    }
                    self.cursor += 1;
                }
            }
        }
        if self.decoding.stop_at_eos && !committed.is_empty() {
            self.stop_at_eos();
            // Re-masked positions the EOS fill took are not re-maskings after all.
            let (mask, ledger, canvas) = (self.mask, &mut self.ledger, &self.canvas);
            remasked.retain(|&p| {
                let kept = canvas[p] == mask;
                if !kept {
                    ledger.withdraw(p);
                }
                kept
            });
        }
        Ok(self.report(plan.step, Some(plan.block), committed, remasked))
    }

    /// Re-masks the revisable positions of `plan` whose probability fell below `r` and spreads
    /// the block's masks over its remaining steps again. Returns them, increasing.
    fn revise(&mut self, plan: &StepPlan, probs: &[f64], r: f64) -> Vec<usize> {
        let remasked = self.ledger.select(&plan.revisable, probs, r);
        if remasked.is_empty() {
            return remasked;
        }
        for &p in &remasked {
            self.canvas[p] = self.mask;
            // The credit favours the token just rejected: the position starts over.
            self.trace.forget(p);
        }
        self.masks_left += remasked.len();
        // `plan` offers revisable positions only before the block's last step, so steps remain.
        if let Some((block, i)) = self.locate(plan.step) {
            let masks = self
                .owned(block)
                .filter(|&p| self.canvas[p] == self.mask)
                .count();
            let rest = schedule::transfer_counts(masks, self.block_steps(block) - i - 1);
            self.block_counts.truncate(i + 1);
            self.block_counts.extend(rest);
        }
        remasked
    }

    /// The report of a step, reporting newly completed blocks.
    fn report(
        &mut self,
        step: usize,
        block: Option<usize>,
        committed: Vec<usize>,
        remasked: Vec<usize>,
    ) -> StepReport {
        let mut completed = Vec::new();
        while self.blocks_reported < self.num_blocks() {
            let b = self.blocks_reported;
            if self.owned(b).any(|p| self.canvas[p] == self.mask) {
                break;
            }
            let positions = self.block_positions(b);
            let span = match (positions.iter().min(), positions.iter().max()) {
                (Some(&lo), Some(&hi)) => lo..hi + 1,
                _ => 0..0,
            };
            completed.push(BlockDone { block: b, span });
            self.blocks_reported += 1;
        }
        StepReport {
            step,
            block,
            committed,
            remasked,
            completed,
            final_prefix: self.final_prefix(),
            masks_left: self.masks_left,
            done: self.is_done(),
        }
    }

    /// Length of the canvas prefix no later step changes: up to the first position owned by a
    /// block not yet reported complete.
    pub fn final_prefix(&self) -> usize {
        (self.blocks_reported..self.num_blocks())
            .filter_map(|b| self.owned(b).min())
            .min()
            .unwrap_or(self.canvas.len())
    }

    /// The positions block `b` fills (its positions not moved to a later block by a remask).
    fn owned(&self, b: usize) -> impl Iterator<Item = usize> + '_ {
        self.block_positions(b)
            .iter()
            .copied()
            .filter(move |&p| self.owner[p] == b)
    }

    /// Blocks in all: scheduled and added by [`Session::remask`].
    fn num_blocks(&self) -> usize {
        self.schedule.num_blocks() + self.extra_blocks.len()
    }

    /// Re-maskings by self-correction so far.
    pub fn revisions(&self) -> usize {
        self.ledger.total_remasks()
    }

    /// In each gap (run of consecutive generated positions) holding an EOS with every position
    /// of the gap before it committed, fills the gap's later masks with EOS; when no mask is
    /// left, ends the session. A gap ends where fixed text follows, so an EOS in one gap never
    /// reaches into the next.
    fn stop_at_eos(&mut self) {
        let mut start = 0;
        while start < self.generated.len() {
            let mut end = start + 1;
            while end < self.generated.len() && self.generated[end] == self.generated[end - 1] + 1 {
                end += 1;
            }
            self.stop_gap_at_eos(start..end);
            start = end;
        }
        if self.masks_left == 0 {
            self.cursor = self.total_steps();
        }
    }

    /// [`Session::stop_at_eos`] for the gap `self.generated[gap]`.
    fn stop_gap_at_eos(&mut self, gap: Range<usize>) {
        let Some(first_eos) = self.generated[gap.clone()]
            .iter()
            .take_while(|&&p| self.canvas[p] != self.mask)
            .position(|&p| self.canvas[p] == self.eos)
        else {
            return;
        };
        for i in gap.start + first_eos + 1..gap.end {
            let p = self.generated[i];
            // A position whose constraint excludes EOS is left to be generated.
            if self.canvas[p] == self.mask && self.decoding.constraints.admits(p, self.eos) {
                self.canvas[p] = self.eos;
                self.ledger.pinned(p);
                self.masks_left -= 1;
                self.cache.invalidate();
            }
        }
    }

    /// The canvas as it stands.
    pub fn canvas(&self) -> &[u32] {
        &self.canvas
    }

    /// Consumes the session, returning its canvas.
    pub fn into_canvas(self) -> Vec<u32> {
        self.canvas
    }

    /// Every scheduled step has been taken.
    pub fn is_done(&self) -> bool {
        self.cursor >= self.total_steps()
    }

    /// Position in the schedule: steps taken so far, zero-count steps included, and steps
    /// skipped by dynamic blocks that ended early or by an EOS stop counted as passed.
    pub fn steps_taken(&self) -> usize {
        self.cursor
    }

    /// Steps that committed at least one position (each ran one forward, two with guidance).
    pub fn forward_steps(&self) -> usize {
        self.taken
    }

    /// Steps the schedule holds in all.
    pub fn total_steps(&self) -> usize {
        self.schedule.total_steps() + self.extra_blocks.len() * self.extra_block_steps()
    }

    /// Generated positions still holding the mask token.
    pub fn masks_left(&self) -> usize {
        self.masks_left
    }

    /// The positions that were masks at creation, in increasing order.
    pub fn generated_positions(&self) -> &[usize] {
        &self.generated
    }

    /// The tokens now at [`Session::generated_positions`], in order.
    pub fn generated_tokens(&self) -> Vec<u32> {
        self.generated.iter().map(|&p| self.canvas[p]).collect()
    }

    /// The blocks, in denoising order: each a run of generated positions.
    pub fn blocks(&self) -> impl Iterator<Item = &[usize]> + '_ {
        (0..self.num_blocks()).map(|b| self.block_positions(b))
    }

    /// Index of the block the next step works on, `None` when done.
    pub fn current_block(&self) -> Option<usize> {
        self.locate(self.cursor).map(|(b, _)| b)
    }

    /// Restricts the tokens position `pos` may be generated as to `allowed` (any order;
    /// replacing an earlier constraint of `pos`; empty: lifts it), from the next step on: its
    /// prediction then comes from the model's distribution over `allowed` alone (see
    /// [`super::constraint`]). A position that holds a token keeps it; the constraint applies
    /// when it is generated (after [`Session::remask`] or a self-correction), and an EOS stop
    /// ([`Decoding::stop_at_eos`]) does not fill it unless EOS is allowed. A step that
    /// predicts a constrained position takes the host-logits path, as with top-k
    /// ([`Decoding::needs_logits_at`]); self-correction judges it by the narrowed distribution.
    ///
    /// Errors ([`Error::InvalidArgument`], nothing changed): `pos` outside the canvas, an id
    /// that is the mask token or outside the vocabulary.
    pub fn constrain(&mut self, pos: usize, allowed: &[u32]) -> Result<()> {
        self.decoding
            .constraints
            .set(pos, allowed, self.canvas.len(), self.vocab_size, self.mask)
    }

    /// Fixes position `pos` to `token` for the rest of the session (until it is remasked).
    ///
    /// A masked position leaves the schedule of its block: a block that has not started counts
    /// one mask fewer; a running block commits at most its remaining masks, so its last steps
    /// may commit nothing. Any other position (prompt or generated) is overwritten. The number
    /// of steps does not change; locking a finished session is allowed.
    ///
    /// Errors ([`Error::InvalidArgument`], nothing changed): `pos` outside the canvas, `token`
    /// the mask token or outside the vocabulary.
    pub fn lock(&mut self, pos: usize, token: u32) -> Result<()> {
        if pos >= self.canvas.len() {
            return Err(Error::invalid(format!(
                "position {pos} is outside the canvas of {} tokens",
                self.canvas.len()
            )));
        }
        if token == self.mask {
            return Err(Error::invalid(format!(
                "token {token} is the mask token: remask a position to send it back to the model"
            )));
        }
        if token as usize >= self.vocab_size {
            return Err(Error::invalid(format!(
                "token {token} is outside the vocabulary ({} tokens)",
                self.vocab_size
            )));
        }
        if self.canvas[pos] == self.mask {
            self.masks_left -= 1;
        }
        self.canvas[pos] = token;
        self.cache.invalidate();
        self.ledger.pinned(pos);
        Ok(())
    }

    /// Sends positions `begin..end` back to the model.
    ///
    /// Every position of the range not holding the mask token (prompt positions included)
    /// becomes a mask again; together they form one new block, denoised after all existing
    /// blocks with as many steps as each scheduled block (or `steps` when the canvas had no
    /// masks at creation), and only by that block. Positions that already hold the mask keep
    /// their place. A finished session can be stepped again. Nothing happens when no position
    /// changes.
    ///
    /// Errors ([`Error::InvalidArgument`], nothing changed): `begin > end` or `end` beyond the
    /// canvas.
    pub fn remask(&mut self, begin: usize, end: usize) -> Result<()> {
        if begin > end || end > self.canvas.len() {
            return Err(Error::invalid(format!(
                "remask range {begin}..{end} is not inside the canvas of {} tokens",
                self.canvas.len()
            )));
        }
        let changed: Vec<usize> = (begin..end)
            .filter(|&p| self.canvas[p] != self.mask)
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let block = self.schedule.num_blocks() + self.extra_blocks.len();
        for &p in &changed {
            self.canvas[p] = self.mask;
            self.owner[p] = block;
            self.ledger.pinned(p);
        }
        self.masks_left += changed.len();
        self.extra_blocks.push(changed);
        self.cache.invalidate();
        Ok(())
    }

    /// The positions of block `b` (scheduled or added by [`Session::remask`]).
    fn block_positions(&self, b: usize) -> &[usize] {
        let n = self.schedule.num_blocks();
        if b < n {
            &self.generated[self.schedule.block_range(b)]
        } else {
            &self.extra_blocks[b - n]
        }
    }

    /// Steps of block `b`.
    fn block_steps(&self, b: usize) -> usize {
        if b < self.schedule.num_blocks() {
            self.schedule.steps_per_block()
        } else {
            self.extra_block_steps()
        }
    }

    /// Steps of each block added by [`Session::remask`]: as many as each scheduled block, or
    /// `steps` (at least 1) when the canvas had no masks at creation.
    fn extra_block_steps(&self) -> usize {
        match self.schedule.steps_per_block() {
            0 => self.params.steps.max(1),
            s => s,
        }
    }

    /// `(block, step within the block)` of global step `step`, remask blocks included;
    /// `None` past the end.
    fn locate(&self, step: usize) -> Option<(usize, usize)> {
        if let Some(found) = self.schedule.locate(step) {
            return Some(found);
        }
        let rest = step.checked_sub(self.schedule.total_steps())?;
        let per = self.extra_block_steps();
        let b = rest / per;
        (b < self.extra_blocks.len()).then(|| (self.schedule.num_blocks() + b, rest % per))
    }

    /// The parameters the session was created with.
    pub fn params(&self) -> &GenerationParams {
        &self.params
    }

    /// The model driving the session.
    pub fn model(&self) -> &Arc<dyn Model> {
        &self.model
    }
}

/// What a prediction of `plan` reads of the trace credit (`None` when `decoding` has it off).
fn credit_view<'a>(
    decoding: &'a Decoding,
    trace: &'a Trace,
    plan: &StepPlan,
) -> Option<CreditView<'a>> {
    decoding.credit.as_ref().map(|params| CreditView {
        trace,
        params,
        block: plan.block,
    })
}

/// Classifier-free guidance: `un + (s + 1)(cond − un)`, in float64, rounded to f32. Equal
/// inputs give that value (so a −∞ logit in both passes stays −∞ rather than NaN).
pub fn cfg_combine(cond: f32, un: f32, s: f64) -> f32 {
    if cond == un {
        return cond;
    }
    let (c, u) = (cond as f64, un as f64);
    (u + (s + 1.0) * (c - u)) as f32
}
