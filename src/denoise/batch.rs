//! Batched denoising: several sessions on one model stepped in lockstep, each step's forwards
//! packed into one [`crate::model::Model::predict_batch`] call (one forward over all the canvases on the CPU
//! and CUDA backends, so every weight is read once per step for the whole batch).
//!
//! Each session keeps its own schedule, rule and state; a step of the batch is one step of every
//! unfinished session. Sessions with a K/V cache step together through
//! [`crate::model::Model::predict_cached_batch`] where the model packs cached steps (the CPU
//! backend, and the CUDA backend with `DLLM_PACKED_SESSIONS=1`: each session's span rows
//! stacked into one forward, attention against each one's own cache). Sessions whose steps need
//! host logits (top-k / top-p, guidance), `--revise`, or a cache on a model that does not pack
//! cached steps take their step on their own in the same round ([`step_round`]); run to
//! completion ([`run_batch`]) they run first, one after another. A step that predicts a
//! constrained position ([`super::constraint`]) also runs alone, in its round.
//! The result of every session is the one it would reach run alone: the same plans, the same
//! predictions (up to the float summation order of the packed linear layers), the same commits.

use super::predict::Prediction;
use super::session::{Session, StepInfo, StepPlan};
use crate::error::{Error, Result};
use crate::model::{BatchQuery, CacheMode};
use std::borrow::{Borrow, BorrowMut};
use std::sync::Arc;

/// Whether `session`'s steps can share a packed forward: no host logits for every step (filters,
/// guidance), no self-correction, and no K/V cache unless the model packs cached steps
/// ([`Model::packs_cached_batches`](crate::model::Model::packs_cached_batches)). A step of
/// such a session that predicts a constrained position still runs alone ([`step_round`]).
fn batchable(session: &Session) -> bool {
    let d = session.decoding();
    !d.samples_on_host()
        && d.revise.is_none()
        && (d.cache == CacheMode::None || session.model().packs_cached_batches())
}

/// Checks that every session runs on the same model (the same `Arc`) as the first; the error
/// names the first one that does not.
pub fn check_one_model<S: Borrow<Session>>(sessions: &[S]) -> Result<()> {
    if let Some(first) = sessions.first() {
        let model = first.borrow().model();
        if let Some(i) = sessions
            .iter()
            .position(|s| !Arc::ptr_eq(s.borrow().model(), model))
        {
            return Err(Error::invalid(format!(
                "batch: session {i} runs on another model than session 0"
            )));
        }
    }
    Ok(())
}

/// Steps every session until all are done. The sessions must share one model (the same
/// `Arc`). The sessions that step alone ([`solo_sessions`]) run first, one after another, each
/// to completion; then the others in rounds of packed forwards. Returns the number of rounds
/// (packed forwards, or the steps of the longest solo session when that is more). On error the
/// sessions are left as their last completed steps made them.
pub fn run_batch<S: BorrowMut<Session>>(sessions: &mut [S]) -> Result<usize> {
    check_one_model(sessions)?;
    let mut solo_steps = 0;
    for i in solo_sessions(sessions) {
        let s = sessions[i].borrow_mut();
        let before = s.steps_taken();
        s.run()?;
        solo_steps = solo_steps.max(s.steps_taken() - before);
    }
    let mut rounds = 0;
    while !step_round(sessions)?.is_empty() {
        rounds += 1;
    }
    Ok(rounds.max(solo_steps))
}

/// The predictions of one packed cached step of the sessions `plans` names (index, plan; each
/// plan commits), through
/// [`Model::predict_cached_batch`](crate::model::Model::predict_cached_batch), by session index:
/// every session records its cache step's outcome (a failure invalidates its cache); the caller
/// applies them.
fn cached_predictions<S: BorrowMut<Session>>(
    sessions: &mut [S],
    plans: &[(usize, StepPlan)],
) -> Result<Vec<(usize, Vec<Prediction>)>> {
    let Some(&(first, _)) = plans.first() else {
        return Ok(Vec::new());
    };
    let model = sessions[first].borrow().model().clone();
    let mut picked: Vec<Option<&StepPlan>> = vec![None; sessions.len()];
    for (i, p) in plans {
        picked[*i] = Some(p);
    }
    let mut items = Vec::with_capacity(plans.len());
    let mut begun = Vec::with_capacity(plans.len());
    let mut failure = None;
    for (i, s) in sessions.iter_mut().enumerate() {
        let Some(plan) = picked[i] else { continue };
        match s.borrow_mut().cached_query(plan) {
            Ok(q) => {
                begun.push((i, q.step.clone()));
                items.push(q);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let result = match failure {
        Some(e) => Err(e),
        None => model.predict_cached_batch(&mut items),
    };
    drop(items);
    let result = result.and_then(|preds| {
        if preds.len() == begun.len() {
            Ok(preds)
        } else {
            Err(Error::Backend(format!(
                "predict_cached_batch returned {} results for {} canvases",
                preds.len(),
                begun.len()
            )))
        }
    });
    for (i, step) in &begun {
        let plan = picked[*i].expect("begun sessions were picked");
        sessions[*i]
            .borrow_mut()
            .finish_cached(plan, step, result.is_ok());
    }
    let preds = result?;
    Ok(begun.iter().map(|(i, _)| *i).zip(preds).collect())
}

/// The unfinished sessions that cannot share a packed forward (host logits, self-correction, or
/// a K/V cache the model does not pack), by index. Run to completion, they are best run one after another: the CUDA model
/// keeps a few device K/V cache slots, so interleaving more cached sessions than that would
/// recycle a slot at every step (each such step a refresh).
pub fn solo_sessions<S: Borrow<Session>>(sessions: &[S]) -> Vec<usize> {
    sessions
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            let s: &Session = (*s).borrow();
            !s.is_done() && !batchable(s)
        })
        .map(|(i, _)| i)
        .collect()
}

/// One round: one step of every unfinished session, the batchable ones through one
/// [`Model::predict_batch`](crate::model::Model::predict_batch) (the others step alone first).
/// Returns the index and [`StepInfo`] of every session that took a step, by index (empty when
/// all were done). The sessions must share one model ([`check_one_model`]). On error, the solo
/// steps taken before it remain and no batched step is applied.
pub fn step_round<S: BorrowMut<Session>>(sessions: &mut [S]) -> Result<Vec<(usize, StepInfo)>> {
    let mut plans: Vec<(usize, StepPlan)> = Vec::new();
    let mut stepped = Vec::new();
    for (i, s) in sessions.iter_mut().enumerate() {
        let s = s.borrow_mut();
        if s.is_done() {
            continue;
        }
        if batchable(s) {
            if let Some(plan) = s.plan() {
                if s.decoding().needs_logits_at(&plan.queries) {
                    // A constrained position among the queries: host logits, alone.
                    stepped.push((i, s.step()?));
                } else {
                    plans.push((i, plan));
                }
            }
        } else {
            let info = s.step()?;
            stepped.push((i, info));
        }
    }
    // Steps that commit nothing run no forward (as in `Session::predict`); cached steps go
    // through the model's cached batch.
    let (run, empty): (Vec<_>, Vec<_>) = plans.into_iter().partition(|(_, p)| p.k > 0);
    let (cached, run): (Vec<_>, Vec<_>) = run
        .into_iter()
        .partition(|(i, _)| sessions[*i].borrow().decoding().cache != CacheMode::None);
    // Both forwards run before any prediction is applied, so a failure of either leaves every
    // batched session as it was (the uncached one first: it touches no cache).
    let mut preds = Vec::new();
    if !run.is_empty() {
        let model = sessions[run[0].0].borrow().model().clone();
        let items: Vec<BatchQuery<'_>> = run
            .iter()
            .map(|(i, p)| BatchQuery {
                ids: sessions[*i].borrow().canvas(),
                queries: &p.queries,
                rule: &p.rule,
            })
            .collect();
        let got = model.predict_batch(&items)?;
        if got.len() != run.len() {
            return Err(Error::Backend(format!(
                "predict_batch returned {} results for {} canvases",
                got.len(),
                run.len()
            )));
        }
        preds.extend(run.iter().map(|(i, _)| *i).zip(got));
    }
    preds.extend(cached_predictions(sessions, &cached)?);
    for (i, p) in preds {
        let plan = run
            .iter()
            .chain(&cached)
            .find(|(j, _)| *j == i)
            .map(|(_, plan)| plan)
            .expect("every prediction is of a planned session");
        let info = sessions[i].borrow_mut().apply(plan, &p)?;
        stepped.push((i, info));
    }
    for (i, plan) in &empty {
        let info = sessions[*i].borrow_mut().apply(plan, &[])?;
        stepped.push((*i, info));
    }
    stepped.sort_unstable_by_key(|(i, _)| *i);
    Ok(stepped)
}
