//! Batched denoising: several sessions on one model stepped in lockstep, each step's forwards
//! packed into one [`Model::predict_batch`] call (one forward over all the canvases on the CPU
//! and CUDA backends, so every weight is read once per step for the whole batch).
//!
//! Each session keeps its own schedule, rule and state; a step of the batch is one step of every
//! unfinished session. Sessions whose steps need host logits or their own cache (top-k / top-p,
//! guidance, `--revise`, a K/V cache) take their step on their own in the same round. The result
//! of every session is the one it would reach run alone: the same plans, the same predictions
//! (up to the float summation order of the packed linear layers), the same commits.

use super::session::{Session, StepPlan};
use crate::error::{Error, Result};
use crate::model::{BatchQuery, CacheMode};
use std::sync::Arc;

/// Whether `session`'s steps can share a packed forward.
fn batchable(session: &Session) -> bool {
    let d = session.decoding();
    !d.needs_logits() && d.cache == CacheMode::None && d.revise.is_none()
}

/// Steps every session until all are done. The sessions must share one model (the same
/// `Arc`). Returns the number of rounds (packed forwards or solo steps of the slowest session).
/// On error the sessions are left as the last completed round made them.
pub fn run_batch(sessions: &mut [Session]) -> Result<usize> {
    if let Some(first) = sessions.first() {
        let model = first.model();
        if let Some(i) = sessions.iter().position(|s| !Arc::ptr_eq(s.model(), model)) {
            return Err(Error::invalid(format!(
                "batch: session {i} runs on another model than session 0"
            )));
        }
    }
    let mut rounds = 0;
    loop {
        let mut plans: Vec<(usize, StepPlan)> = Vec::new();
        let mut solo = 0;
        for (i, s) in sessions.iter_mut().enumerate() {
            if s.is_done() {
                continue;
            }
            if batchable(s) {
                if let Some(plan) = s.plan() {
                    plans.push((i, plan));
                }
            } else {
                s.step()?;
                solo += 1;
            }
        }
        if plans.is_empty() && solo == 0 {
            return Ok(rounds);
        }
        rounds += 1;
        // Steps that commit nothing run no forward (as in `Session::predict`).
        let (run, empty): (Vec<_>, Vec<_>) = plans.into_iter().partition(|(_, p)| p.k > 0);
        for (i, plan) in &empty {
            sessions[*i].apply(plan, &[])?;
        }
        if run.is_empty() {
            continue;
        }
        let model = sessions[run[0].0].model().clone();
        let items: Vec<BatchQuery<'_>> = run
            .iter()
            .map(|(i, p)| BatchQuery {
                ids: sessions[*i].canvas(),
                queries: &p.queries,
                rule: &p.rule,
            })
            .collect();
        let preds = model.predict_batch(&items)?;
        if preds.len() != run.len() {
            return Err(Error::Backend(format!(
                "predict_batch returned {} results for {} canvases",
                preds.len(),
                run.len()
            )));
        }
        for ((i, plan), p) in run.iter().zip(preds) {
            sessions[*i].apply(plan, &p)?;
        }
    }
}
