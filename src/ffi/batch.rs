//! Several sessions of one model stepped together through the C ABI (`dllm_sessions_step`: one
//! step of each; `dllm_sessions_run`: to completion). In a round every unfinished session takes
//! one step, and the steps that can share a forward pass run as one batched forward
//! ([`crate::denoise::batch::step_round`]), so the weights are read once per round for the
//! whole batch. Each session's steps are those `dllm_session_step` takes, its
//! `dllm_session_last_commits` included.

use super::session::{dllm_session, masked_positions, record_filled, step_info};
use super::{check_nonnull, dllm_status, dllm_step_info, guard, invalid, FfiResult};
use crate::denoise::batch::{solo_sessions, step_round};
use crate::denoise::Session;
use std::collections::HashMap;
use std::sync::Arc;

/// A session's `(position, token)` record of its last step (`dllm_session_last_commits`).
type Filled = Vec<(usize, i32)>;

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
/// last-commit records, inside their model's worker pool; `None` when `n == 0`.
///
/// # Safety
/// As [`distinct_sessions`].
unsafe fn with_sessions<R: Send>(
    sessions: *const *mut dllm_session,
    n: usize,
    f: impl FnOnce(&mut [&mut Session], &mut [&mut Filled]) -> crate::Result<R> + Send,
) -> FfiResult<Option<R>> {
    // SAFETY: by the contract.
    let handles = unsafe { distinct_sessions(sessions, n) }?;
    let Some(model) = handles.first().map(|h| h.model.clone()) else {
        return Ok(None);
    };
    let (mut sess, mut filled): (Vec<&mut Session>, Vec<&mut Filled>) = handles
        .into_iter()
        .map(|h| (&mut h.session, &mut h.last_filled))
        .unzip();
    Ok(Some(model.install(|| f(&mut sess, &mut filled))?))
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
            with_sessions(sessions, n, |sess, filled| {
                // Sessions that step alone first, each to completion (see solo_sessions).
                for i in solo_sessions(sess) {
                    while !sess[i].is_done() {
                        let masked = masked_positions(sess[i]);
                        sess[i].step()?;
                        record_filled(sess[i], masked, filled[i]);
                    }
                }
                loop {
                    let masked: Vec<Vec<usize>> =
                        sess.iter().map(|s| masked_positions(s)).collect();
                    let stepped = step_round(sess)?;
                    if stepped.is_empty() {
                        return Ok(());
                    }
                    // Only the sessions that stepped: a finished one keeps its last step's record.
                    for (i, masked) in masked.into_iter().enumerate() {
                        if stepped.binary_search_by_key(&i, |(j, _)| *j).is_ok() {
                            record_filled(sess[i], masked, filled[i]);
                        }
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
            with_sessions(sessions, n, |sess, filled| {
                let masked: Vec<Vec<usize>> = sess.iter().map(|s| masked_positions(s)).collect();
                let mut stepped = step_round(sess)?.into_iter().peekable();
                let mut out = Vec::with_capacity(sess.len());
                for (i, masked) in masked.into_iter().enumerate() {
                    let info = match stepped.next_if(|(j, _)| *j == i) {
                        Some((_, info)) => info,
                        // Finished: the no-op step `dllm_session_step` reports (done = 1).
                        None => sess[i].step()?,
                    };
                    record_filled(sess[i], masked, filled[i]);
                    out.push(step_info(&info, filled[i].len()));
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
