//! The session handle of the C ABI: one canvas denoised step by step, with lock and remask.

use super::model::{dllm_model, model_ref, ModelInner};
use super::step_record::{BeforeStep, LastStep};
use super::{
    check_nonnull, check_output, dllm_sampling_params, dllm_status, dllm_step_info, guard,
    guard_value, input_slice, invalid, model_token_ids, read_params, to_i32, write_output,
    FfiResult, DLLM_CACHE_DUAL, DLLM_CACHE_NONE, DLLM_CACHE_PREFIX, DLLM_REMASK_ENTROPY,
    DLLM_REMASK_LOW_CONFIDENCE, DLLM_REMASK_MARGIN, DLLM_REMASK_RANDOM, SAMPLING_PARAMS_SIZES,
};
use crate::denoise::{
    CacheMode, CommitPolicy, Constraints, CreditParams, Decoding, GenerationParams, Remasking,
    SampleFilter, Session, StepInfo,
};
use std::sync::Arc;

/// The opaque `dllm_session`: a [`Session`] plus a reference to its model's shared state
/// (tokenizer, worker threads), which keeps them alive after `dllm_model_free`.
pub struct dllm_session {
    pub(super) model: Arc<ModelInner>,
    pub(super) session: Session,
    /// What the last step changed (`dllm_session_last_commits`, `dllm_session_last_remasks`).
    pub(super) last: LastStep,
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
        DLLM_REMASK_MARGIN => Remasking::Margin,
        DLLM_REMASK_ENTROPY => Remasking::Entropy,
        r => {
            return Err(invalid(format!(
                "remasking {r} is not a dllm_remasking value \
                 (0 low-confidence, 1 random, 2 margin, 3 entropy)"
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

/// `value` as f64 when it is finite and `>= 0`; else an error naming `field`.
fn non_negative(value: f32, field: &str, off: &str) -> FfiResult<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value as f64)
    } else {
        Err(invalid(format!(
            "{field} must be a finite number >= 0 ({off}), got {value}"
        )))
    }
}

/// Converts the decoding fields (versions 2 to 4) of the C parameters into [`Decoding`].
fn decoding(p: &dllm_sampling_params) -> FfiResult<Decoding> {
    let threshold = non_negative(p.threshold, "threshold", "0 = off")?;
    let factor = non_negative(p.factor, "factor", "0 = off")?;
    let low = non_negative(p.hierarchy_low, "hierarchy_low", "0 = off")?;
    let commit = match (threshold > 0.0, factor > 0.0, low > 0.0) {
        (_, true, true) => {
            return Err(invalid(format!(
                "factor ({factor}) and hierarchy_low ({low}) are both set: \
                 choose one commit rule, set the other to 0"
            )))
        }
        (true, true, false) => {
            return Err(invalid(format!(
                "threshold ({threshold}) and factor ({factor}) are both set: \
                 choose one commit rule, set the other to 0"
            )))
        }
        (high, false, true) => CommitPolicy::Hierarchy {
            high: high.then_some(threshold),
            low,
        },
        (true, false, false) => CommitPolicy::Threshold(threshold),
        (false, true, false) => CommitPolicy::Factor(factor),
        (false, false, false) => CommitPolicy::Schedule,
    };
    let top_k = usize::try_from(p.top_k)
        .map_err(|_| invalid(format!("top_k must be >= 0 (0 = off), got {}", p.top_k)))?;
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(invalid(format!(
            "top_p must be in (0, 1] (1 = off), got {}",
            p.top_p
        )));
    }
    let cfg_scale = non_negative(p.cfg_scale, "cfg_scale", "0 = off")?;
    let stop_at_eos = match p.stop_at_eos {
        0 => false,
        1 => true,
        v => return Err(invalid(format!("stop_at_eos must be 0 or 1, got {v}"))),
    };
    let r = p.revise;
    let revise = if r == 0.0 {
        None
    } else if r > 0.0 && r < 1.0 {
        Some(r as f64)
    } else {
        return Err(invalid(format!(
            "revise must be 0 (off) or in (0, 1), got {r}"
        )));
    };
    // credit_alpha 0 is off (the other two are then unused).
    let credit = (p.credit_alpha != 0.0).then_some(CreditParams {
        alpha: p.credit_alpha as f64,
        gamma: p.credit_gamma as f64,
        decay: p.credit_decay as f64,
    });
    if let Some(c) = &credit {
        c.validate()?;
    }
    let vicinity = usize::try_from(p.vicinity).map_err(|_| {
        invalid(format!(
            "vicinity must be >= 0 (0 = off), got {}",
            p.vicinity
        ))
    })?;
    Ok(Decoding {
        commit,
        filter: SampleFilter {
            top_k,
            top_p: p.top_p as f64,
        },
        cfg_scale,
        stop_at_eos,
        cache: cache_mode(p.cache)?,
        vicinity,
        revise,
        constraints: Constraints::default(),
        credit,
    })
}

/// `dllm_sampling_params.cache` as a [`CacheMode`].
fn cache_mode(cache: i32) -> FfiResult<CacheMode> {
    match cache {
        DLLM_CACHE_NONE => Ok(CacheMode::None),
        DLLM_CACHE_PREFIX => Ok(CacheMode::Prefix),
        DLLM_CACHE_DUAL => Ok(CacheMode::Dual),
        c => Err(invalid(format!(
            "cache {c} is not a dllm_cache value (0 none, 1 prefix, 2 dual)"
        ))),
    }
}

/// One step of `session`, recording in `last` what it changed (the committed predictions, the
/// positions a `stop_at_eos` stop filled with EOS, the re-masked ones). On error nothing
/// changes.
pub(super) fn step_recording(
    session: &mut Session,
    last: &mut LastStep,
) -> crate::Result<StepInfo> {
    let before = BeforeStep::of(session);
    let info = session.step()?;
    before.record(session, last);
    Ok(info)
}

/// The C view of a step that filled `filled` positions.
pub(super) fn step_info(info: &StepInfo, filled: usize) -> dllm_step_info {
    dllm_step_info {
        step: to_i32(info.step),
        committed: to_i32(filled),
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
        let vocab = inner.model.config().vocab_size;
        let ids = model_token_ids(ids, vocab, |pos| format!("position {pos}"))?;
        // SAFETY: by the contract.
        let params = unsafe {
            read_params(
                p,
                dllm_sampling_params::default(),
                SAMPLING_PARAMS_SIZES,
                "dllm_sampling_params",
            )
        }?;
        let generation = generation_params(&params)?;
        let decoding = decoding(&params)?;
        let mut session = Session::new(inner.model.clone(), ids, generation)?;
        session.set_decoding(decoding)?;
        // SAFETY: m is a live handle (model_ref succeeded).
        let model = unsafe { (*m).inner.clone() };
        let handle = Box::new(dllm_session {
            model,
            session,
            last: LastStep::default(),
        });
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
        let dllm_session {
            model,
            session,
            last,
        } = unsafe { session_mut(s) }?;
        let done = model.install(|| step_recording(session, last))?;
        if !info.is_null() {
            // SAFETY: non-NULL and writable by the contract.
            unsafe { info.write(step_info(&done, last.filled.len())) };
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
        let dllm_session {
            model,
            session,
            last,
        } = unsafe { session_mut(s) }?;
        model.install(|| {
            while !session.is_done() {
                step_recording(session, last)?;
            }
            crate::Result::Ok(())
        })?;
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

/// The positions the last step filled and their tokens.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now; `positions` and `tokens` are
/// NULL or point to `cap` writable elements each; `n` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_last_commits(
    s: *const dllm_session,
    positions: *mut usize,
    tokens: *mut i32,
    cap: usize,
    n: *mut usize,
) -> dllm_status {
    guard("dllm_session_last_commits", || {
        // SAFETY: by the contract.
        let h = unsafe { session_ref(s) }?;
        check_nonnull(n, "n")?;
        check_output(positions, cap, "positions")?;
        check_output(tokens, cap, "tokens")?;
        let (pos, ids): (Vec<usize>, Vec<i32>) = h.last.filled.iter().copied().unzip();
        // SAFETY: checked above; buffers by the contract. Both have the same length, so the
        // second write cannot fail once the first succeeded.
        unsafe {
            write_output(&pos, positions, cap, n, "positions")?;
            write_output(&ids, tokens, cap, n, "tokens")
        }
    })
}

/// The positions the last step re-masked.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now; `positions` is NULL or points to
/// `cap` writable elements; `n` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_last_remasks(
    s: *const dllm_session,
    positions: *mut usize,
    cap: usize,
    n: *mut usize,
) -> dllm_status {
    guard("dllm_session_last_remasks", || {
        // SAFETY: by the contract.
        let h = unsafe { session_ref(s) }?;
        check_nonnull(n, "n")?;
        check_output(positions, cap, "positions")?;
        // SAFETY: checked above; buffers by the contract.
        unsafe { write_output(&h.last.remasked, positions, cap, n, "positions") }
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

/// Restricts the tokens position `pos` may be generated as.
///
/// # Safety
/// `s` is NULL or a live session used by no other thread now; `allowed` is NULL or points to
/// `n` readable ids.
#[no_mangle]
pub unsafe extern "C" fn dllm_session_constrain(
    s: *mut dllm_session,
    pos: usize,
    allowed: *const i32,
    n: usize,
) -> dllm_status {
    guard("dllm_session_constrain", || {
        // SAFETY: by the contract.
        let h = unsafe { session_mut(s) }?;
        // SAFETY: by the contract.
        let ids = unsafe { input_slice(allowed, n, "allowed") }?;
        let vocab = h.model.model.config().vocab_size;
        let ids = model_token_ids(ids, vocab, |i| format!("allowed[{i}]"))?;
        h.session.constrain(pos, &ids)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut dllm_sampling_params)) -> dllm_sampling_params {
        let mut p = dllm_sampling_params::default();
        f(&mut p);
        p
    }

    /// The message of a conversion error, which must be INVALID_ARGUMENT.
    fn invalid_msg(p: &dllm_sampling_params) -> String {
        let e = decoding(p).unwrap_err();
        assert_eq!(
            e.status,
            super::super::DLLM_ERR_INVALID_ARGUMENT,
            "{}",
            e.msg
        );
        e.msg
    }

    #[test]
    fn defaults_are_the_reference_loop() {
        let p = dllm_sampling_params::default();
        assert_eq!(decoding(&p).unwrap(), Decoding::default());
        let g = generation_params(&p).unwrap();
        assert_eq!(g, GenerationParams::default());
    }

    #[test]
    fn every_field_maps_to_decoding() {
        let p = with(|p| {
            p.threshold = 0.75;
            p.top_k = 5;
            p.top_p = 0.5;
            p.cfg_scale = 1.5;
            p.stop_at_eos = 1;
        });
        let want = Decoding {
            commit: CommitPolicy::Threshold(0.75),
            filter: SampleFilter {
                top_k: 5,
                top_p: 0.5,
            },
            cfg_scale: 1.5,
            stop_at_eos: true,
            cache: CacheMode::None,
            vicinity: 0,
            revise: None,
            constraints: Constraints::default(),
            credit: None,
        };
        assert_eq!(decoding(&p).unwrap(), want);
        let p = with(|p| {
            p.cache = DLLM_CACHE_DUAL;
            p.vicinity = 6;
        });
        let d = decoding(&p).unwrap();
        assert_eq!((d.cache, d.vicinity), (CacheMode::Dual, 6));
        assert!(decoding(&with(|p| p.vicinity = -1))
            .unwrap_err()
            .msg
            .contains("vicinity"));
        let p = with(|p| {
            p.credit_alpha = 0.5;
            p.credit_gamma = 0.25;
            p.credit_decay = 1.0;
        });
        let want = CreditParams {
            alpha: 0.5,
            gamma: 0.25,
            decay: 1.0,
        };
        assert_eq!(decoding(&p).unwrap().credit, Some(want));
        // Off, whatever the other two hold.
        let p = with(|p| p.credit_decay = -3.0);
        assert_eq!(decoding(&p).unwrap().credit, None);
        let p = with(|p| p.factor = 2.0);
        assert_eq!(decoding(&p).unwrap().commit, CommitPolicy::Factor(2.0));
        let p = with(|p| p.hierarchy_low = 0.4);
        let want = CommitPolicy::Hierarchy {
            high: None,
            low: 0.4f32 as f64,
        };
        assert_eq!(decoding(&p).unwrap().commit, want);
        let p = with(|p| {
            p.hierarchy_low = 0.5;
            p.threshold = 0.75
        });
        let want = CommitPolicy::Hierarchy {
            high: Some(0.75),
            low: 0.5,
        };
        assert_eq!(decoding(&p).unwrap().commit, want);
        for (r, want) in [
            (DLLM_REMASK_LOW_CONFIDENCE, Remasking::LowConfidence),
            (DLLM_REMASK_RANDOM, Remasking::Random),
            (DLLM_REMASK_MARGIN, Remasking::Margin),
            (DLLM_REMASK_ENTROPY, Remasking::Entropy),
        ] {
            let p = with(|p| p.remasking = r);
            assert_eq!(generation_params(&p).unwrap().remasking, want);
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases: Vec<(dllm_sampling_params, &str)> = vec![
            (with(|p| p.threshold = -0.1), "threshold"),
            (with(|p| p.threshold = f32::NAN), "threshold"),
            (with(|p| p.threshold = f32::INFINITY), "threshold"),
            (with(|p| p.factor = -1.0), "factor"),
            (with(|p| p.factor = f32::NAN), "factor"),
            (
                with(|p| {
                    p.threshold = 0.9;
                    p.factor = 1.0
                }),
                "both set",
            ),
            (with(|p| p.top_k = -1), "top_k"),
            (with(|p| p.top_p = 0.0), "top_p"),
            (with(|p| p.top_p = 1.01), "top_p"),
            (with(|p| p.top_p = f32::NAN), "top_p"),
            (with(|p| p.cfg_scale = -0.5), "cfg_scale"),
            (with(|p| p.cfg_scale = f32::INFINITY), "cfg_scale"),
            (with(|p| p.stop_at_eos = 2), "stop_at_eos"),
            (with(|p| p.stop_at_eos = -1), "stop_at_eos"),
            (with(|p| p.revise = 1.0), "revise"),
            (with(|p| p.revise = -0.1), "revise"),
            (with(|p| p.revise = f32::NAN), "revise"),
            (with(|p| p.hierarchy_low = -0.5), "hierarchy_low"),
            (with(|p| p.hierarchy_low = f32::NAN), "hierarchy_low"),
            (
                with(|p| {
                    p.hierarchy_low = 0.4;
                    p.factor = 1.0
                }),
                "hierarchy_low",
            ),
            (with(|p| p.credit_alpha = -0.5), "credit_alpha"),
            (with(|p| p.credit_alpha = f32::NAN), "credit_alpha"),
            (
                with(|p| {
                    p.credit_alpha = 0.7;
                    p.credit_gamma = -1.0
                }),
                "credit_gamma",
            ),
            (
                with(|p| {
                    p.credit_alpha = 0.7;
                    p.credit_decay = 1.5
                }),
                "credit_decay",
            ),
        ];
        for (p, field) in cases {
            let msg = invalid_msg(&p);
            assert!(msg.contains(field), "{field}: {msg}");
        }
        let e = generation_params(&with(|p| p.remasking = 4)).unwrap_err();
        assert!(e.msg.contains("remasking 4"), "{}", e.msg);
    }
}
