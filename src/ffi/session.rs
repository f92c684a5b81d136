//! The session handle of the C ABI: one canvas denoised step by step, with lock and remask.

use super::model::{dllm_model, model_ref, ModelInner};
use super::{
    check_nonnull, check_output, dllm_sampling_params, dllm_status, dllm_step_info, guard,
    guard_value, input_slice, invalid, read_params, to_i32, write_output, FfiResult,
    DLLM_REMASK_ENTROPY, DLLM_REMASK_LOW_CONFIDENCE, DLLM_REMASK_MARGIN, DLLM_REMASK_RANDOM,
    SAMPLING_PARAMS_V1_SIZE,
};
use crate::denoise::{GenerationParams, Remasking, Session, StepInfo};
use std::sync::Arc;

/// The opaque `dllm_session`: a [`Session`] plus a reference to its model's shared state
/// (tokenizer, worker threads), which keeps them alive after `dllm_model_free`.
pub struct dllm_session {
    model: Arc<ModelInner>,
    session: Session,
}

/// # Safety
/// `s` is NULL or a live pointer from [`dllm_session_new`] not used by another thread now.
unsafe fn session_mut<'a>(s: *mut dllm_session) -> FfiResult<&'a mut dllm_session> {
    if s.is_null() {
        return Err(invalid("the session is NULL"));
    }
    // SAFETY: a live handle, used by one thread at a time, by the contract.
    Ok(unsafe { &mut *s })
}

/// # Safety
/// `s` is NULL or a live pointer from [`dllm_session_new`] not modified by another thread now.
unsafe fn session_ref<'a>(s: *const dllm_session) -> FfiResult<&'a dllm_session> {
    if s.is_null() {
        return Err(invalid("the session is NULL"));
    }
    // SAFETY: a live handle by the contract.
    Ok(unsafe { &*s })
}

/// Converts the C parameters into [`GenerationParams`].
fn generation_params(p: &dllm_sampling_params) -> FfiResult<GenerationParams> {
    if p.steps < 1 {
        return Err(invalid(format!("steps must be >= 1, got {}", p.steps)));
    }
    if p.block_len < 1 {
        return Err(invalid(format!(
            "block_len must be >= 1, got {}",
            p.block_len
        )));
    }
    let remasking = match p.remasking {
        DLLM_REMASK_LOW_CONFIDENCE => Remasking::LowConfidence,
        DLLM_REMASK_RANDOM => Remasking::Random,
        DLLM_REMASK_MARGIN | DLLM_REMASK_ENTROPY => {
            return Err(crate::Error::Unsupported(format!(
                "remasking {} ({}) is reserved but not implemented yet",
                p.remasking,
                if p.remasking == DLLM_REMASK_MARGIN {
                    "DLLM_REMASK_MARGIN"
                } else {
                    "DLLM_REMASK_ENTROPY"
                }
            ))
            .into())
        }
        r => {
            return Err(invalid(format!(
                "remasking {r} is not a dllm_remasking value (0 low-confidence, 1 random)"
            )))
        }
    };
    Ok(GenerationParams {
        steps: p.steps as usize,
        block_len: p.block_len as usize,
        temperature: p.temperature as f64,
        remasking,
        seed: p.seed,
        ..Default::default()
    })
}

fn step_info(info: &StepInfo) -> dllm_step_info {
    dllm_step_info {
        step: to_i32(info.step),
        committed: to_i32(info.committed.len()),
        masks_left: to_i32(info.masks_left),
        done: i32::from(info.done),
    }
}

/// Starts denoising a copy of `canvas`.
///
/// # Safety
/// `m` is NULL or a live model handle; `canvas` is NULL or points to `n` readable ids; `p` is
/// NULL or points to a `dllm_sampling_params` of at least `struct_size` bytes; `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_new(
    m: *mut dllm_model,
    canvas: *const i32,
    n: usize,
    p: *const dllm_sampling_params,
    out: *mut *mut dllm_session,
) -> dllm_status {
    guard("dllm_session_new", || {
        // SAFETY: by the contract.
        let inner = unsafe { model_ref(m) }?;
        check_nonnull(out, "out")?;
        check_nonnull(canvas, "canvas")?;
        if n == 0 {
            return Err(invalid("the canvas is empty (n = 0)"));
        }
        let max = inner.model.config().max_seq_len;
        if n > max {
            return Err(invalid(format!(
                "canvas of {n} tokens exceeds the model's max_seq_len {max}"
            )));
        }
        // SAFETY: by the contract.
        let ids = unsafe { input_slice(canvas, n, "canvas") }?;
        let ids: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(pos, &id)| {
                u32::try_from(id)
                    .map_err(|_| invalid(format!("token id {id} at position {pos} is negative")))
            })
            .collect::<FfiResult<_>>()?;
        // SAFETY: by the contract.
        let params = unsafe {
            read_params(
                p,
                dllm_sampling_params::default(),
                SAMPLING_PARAMS_V1_SIZE,
                "dllm_sampling_params",
            )
        }?;
        let params = generation_params(&params)?;
        let session = Session::new(inner.model.clone(), ids, params)?;
        // SAFETY: m is a live handle (model_ref succeeded).
        let model = unsafe { (*m).inner.clone() };
        let handle = Box::new(dllm_session { model, session });
        // SAFETY: `out` is non-NULL and writable by the contract.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Takes one refinement step.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now; `info` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_step(
    s: *mut dllm_session,
    info: *mut dllm_step_info,
) -> dllm_status {
    guard("dllm_session_step", || {
        // SAFETY: by the contract.
        let dllm_session { model, session } = unsafe { session_mut(s) }?;
        let done = model.install(|| session.step())?;
        if !info.is_null() {
            // SAFETY: non-NULL and writable by the contract.
            unsafe { info.write(step_info(&done)) };
        }
        Ok(())
    })
}

/// Steps until done.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_run(s: *mut dllm_session) -> dllm_status {
    guard("dllm_session_run", || {
        // SAFETY: by the contract.
        let dllm_session { model, session } = unsafe { session_mut(s) }?;
        model.install(|| session.run())?;
        Ok(())
    })
}

/// Copies the canvas.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now; `tokens` is NULL or points to
/// `cap` writable ids; `n` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_canvas(
    s: *const dllm_session,
    tokens: *mut i32,
    cap: usize,
    n: *mut usize,
) -> dllm_status {
    guard("dllm_session_canvas", || {
        // SAFETY: by the contract.
        let h = unsafe { session_ref(s) }?;
        check_nonnull(n, "n")?;
        check_output(tokens, cap, "tokens")?;
        // Ids are below the embedding size, which Session::new checked fits the model.
        let ids: Vec<i32> = h.session.canvas().iter().map(|&t| t as i32).collect();
        // SAFETY: checked above; buffers by the contract.
        unsafe { write_output(&ids, tokens, cap, n, "tokens") }
    })
}

/// Fixes position `pos` to `token`.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_lock(
    s: *mut dllm_session,
    pos: usize,
    token: i32,
) -> dllm_status {
    guard("dllm_session_lock", || {
        // SAFETY: by the contract.
        let h = unsafe { session_mut(s) }?;
        let token =
            u32::try_from(token).map_err(|_| invalid(format!("token {token} is negative")))?;
        h.session.lock(pos, token)?;
        Ok(())
    })
}

/// Sends positions `begin..end` back to the model as a new block.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_remask(
    s: *mut dllm_session,
    begin: usize,
    end: usize,
) -> dllm_status {
    guard("dllm_session_remask", || {
        // SAFETY: by the contract.
        let h = unsafe { session_mut(s) }?;
        h.session.remask(begin, end)?;
        Ok(())
    })
}

/// The number of steps the schedule holds now, -1 if `s` is NULL.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_total_steps(s: *const dllm_session) -> i32 {
    guard_value("dllm_session_total_steps", -1, || {
        // SAFETY: by the contract.
        match unsafe { session_ref(s) } {
            Ok(h) => to_i32(h.session.total_steps()),
            Err(_) => -1,
        }
    })
}

/// Destroys a session and its reference to the model.
///
/// # Safety
/// `s` is NULL or a live pointer from [`dllm_session_new`], not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_free(s: *mut dllm_session) {
    if s.is_null() {
        return;
    }
    guard_value("dllm_session_free", (), || {
        // SAFETY: the pointer came from Box::into_raw in dllm_session_new and is freed once.
        drop(unsafe { Box::from_raw(s) })
    })
}
