//! Several sessions of one model stepped together through the C ABI (`dllm_sessions_step`: one
//! step of each; `dllm_sessions_run`: to completion). In a round every unfinished session takes
//! one step, and the steps that can share a forward pass run as one batched forward
//! ([`crate::denoise::batch::step_round`]), so the weights are read once per round for the
//! whole batch. Each session's steps are those `dllm_session_step` takes, its
//! `dllm_session_last_commits` and `dllm_session_last_remasks` included.

use super::session::{dllm_session, step_info, step_recording};
use super::step_record::{record_stepped, BeforeStep, LastStep};
use super::{check_nonnull, dllm_status, dllm_step_info, guard, invalid, FfiResult};
use crate::denoise::batch::{solo_sessions, step_round};
use crate::denoise::Session;
use std::collections::HashMap;
use std::sync::Arc;

/// The distinct, non-NULL session handles of `sessions[0..n]`, all of one model.
///
/// # Safety
/// `sessions` is NULL or points to `n` readable pointers, each NULL or a live session used by
/// no other thread now.
unsafe fn distinct_sessions<'a>(
    sessions: *const *mut dllm_session,
    n: usize,
) -> FfiResult<Vec<&'a mut dllm_session>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    check_nonnull(sessions, "sessions")?;
    // SAFETY: `n` readable pointers by the contract.
    let ptrs = unsafe { std::slice::from_raw_parts(sessions, n) };
    // Grown as entries are checked: a wrong `n` then meets a NULL or a bad entry before any
    // allocation of its size (`with_capacity(n)` once panicked or aborted on a huge `n`).
    let mut seen: HashMap<*mut dllm_session, usize> = HashMap::new();
    for (i, &p) in ptrs.iter().enumerate() {
        if p.is_null() {
            return Err(invalid(format!("sessions[{i}] is NULL")));
        }
        if let Some(first) = seen.insert(p, i) {
            return Err(invalid(format!(
                "sessions[{i}] is the same session as sessions[{first}]"
            )));
        }
    }
    // SAFETY: live, pairwise distinct handles used by this thread only (checked / by contract),
    // so the mutable references do not alias.
    let handles: Vec<&mut dllm_session> = ptrs.iter().map(|&p| unsafe { &mut *p }).collect();
    if let Some(i) = handles
        .iter()
        .position(|h| !Arc::ptr_eq(&h.model, &handles[0].model))
    {
        return Err(invalid(format!(
            "sessions[{i}] was created from another model than sessions[0] (a batch shares one dllm_model)"
        )));
    }
    Ok(handles)
}

/// Runs `f` on the sessions of `sessions[0..n]` (checked by [`distinct_sessions`]) and their
/// last-step records, inside their model's worker pool; `None` when `n == 0`.
///
/// # Safety
/// As [`distinct_sessions`].
unsafe fn with_sessions<R: Send>(
    sessions: *const *mut dllm_session,
    n: usize,
    f: impl FnOnce(&mut [&mut Session], &mut [&mut LastStep]) -> crate::Result<R> + Send,
) -> FfiResult<Option<R>> {
    // SAFETY: by the contract.
    let handles = unsafe { distinct_sessions(sessions, n) }?;
    let Some(model) = handles.first().map(|h| h.model.clone()) else {
        return Ok(None);
    };
    let (mut sess, mut last): (Vec<&mut Session>, Vec<&mut LastStep>) = handles
        .into_iter()
        .map(|h| (&mut h.session, &mut h.last))
        .unzip();
    Ok(Some(model.install(|| f(&mut sess, &mut last))?))
}

/// What each of `sessions` holds before a round, to record what the round changed.
fn snapshots(sessions: &[&mut Session]) -> Vec<BeforeStep> {
    sessions.iter().map(|s| BeforeStep::of(s)).collect()
}

/// Runs `n` sessions of one model to completion together.
///
/// # Safety
/// `sessions` is NULL or points to `n` readable pointers, each NULL or a live session used by
/// no other thread now.
#[no_mangle]
pub unsafe extern "C" fn dllm_sessions_run(
    sessions: *const *mut dllm_session,
    n: usize,
) -> dllm_status {
    guard("dllm_sessions_run", || {
        // SAFETY: by the contract.
        unsafe {
            with_sessions(sessions, n, |sess, last| {
                // Sessions that step alone first, each to completion (see solo_sessions).
                for i in solo_sessions(sess) {
                    while !sess[i].is_done() {
                        step_recording(sess[i], last[i])?;
                    }
                }
                loop {
                    let before = snapshots(sess);
                    let round = step_round(sess);
                    // Also on a failure: the sessions that stepped before it keep their step.
                    record_stepped(&before, sess, last);
                    if round?.is_empty() {
                        return Ok(());
                    }
                }
            })
        }?;
        Ok(())
    })
}

/// Takes one step of each of `n` sessions of one model together.
///
/// # Safety
/// `sessions` is NULL or points to `n` readable pointers, each NULL or a live session used by
/// no other thread now; `infos` is NULL or points to `n` writable entries.
#[no_mangle]
pub unsafe extern "C" fn dllm_sessions_step(
    sessions: *const *mut dllm_session,
    n: usize,
    infos: *mut dllm_step_info,
) -> dllm_status {
    guard("dllm_sessions_step", || {
        // SAFETY: by the contract.
        let out = unsafe {
            with_sessions(sessions, n, |sess, last| {
                let before = snapshots(sess);
                let stepped = match step_round(sess) {
                    Ok(stepped) => stepped,
                    Err(e) => {
                        // The sessions that stepped on their own before it keep their step.
                        record_stepped(&before, sess, last);
                        return Err(e);
                    }
                };
                let mut stepped = stepped.into_iter().peekable();
                let mut out = Vec::with_capacity(sess.len());
                for (i, before) in before.iter().enumerate() {
                    let info = match stepped.next_if(|(j, _)| *j == i) {
                        Some((_, info)) => info,
                        // Finished: the no-op step `dllm_session_step` reports (done = 1).
                        None => sess[i].step()?,
                    };
                    before.record(sess[i], last[i]);
                    out.push(step_info(&info, last[i].filled.len()));
                }
                Ok(out)
            })
        }?;
        if let (Some(out), false) = (out, infos.is_null()) {
            // SAFETY: `n` writable entries by the contract; `out` holds exactly `n`.
            unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), infos, out.len()) };
        }
        Ok(())
    })
}
