//! The C ABI declared in `include/dllm.h`: `extern "C"` functions over models, the tokenizer and
//! denoising [`Session`](crate::denoise::Session)s, for C and C++ programs linking libdllm.
//!
//! The header is the contract; `tests/c_abi.rs` checks every declaration here against it with
//! bindgen and runs the C tests of `ffi/tests/` against libdllm.so and libdllm.a.
//!
//! Every export runs its body through `guard` (or `guard_value`): a panic is caught and
//! becomes `DLLM_ERR_INTERNAL`, an error is mapped to a status code and its message stored for
//! [`dllm_last_error`] on the calling thread. Every pointer, length, token id and enum value is
//! checked before use, and nothing is written past a caller's capacity.

#![allow(non_camel_case_types)]

mod batch;
mod model;
mod session;
mod step_record;

pub use batch::*;
pub use model::*;
pub use session::*;

use crate::error::{Error, ErrorKind};
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The ABI version of `include/dllm.h` this library implements: 1 the first header; 2 appended
/// the decoding fields of `dllm_sampling_params`, implemented MARGIN/ENTROPY and added
/// `dllm_session_last_commits`; 3 added `dllm_sessions_step` and `dllm_sessions_run`; 4 appended
/// `cpu_bf16` to `dllm_model_params`; 5 added `dllm_tokenize_literal`; 6 added
/// `dllm_session_last_remasks` and `dllm_session_constrain`; 7 appended the credit and
/// hierarchy fields of `dllm_sampling_params` and added the `_init` functions; 8 added
/// `dllm_model_architecture` and appended `vicinity` to `dllm_sampling_params`. Every version serves programs built against an earlier one.
pub const DLLM_ABI_VERSION: u32 = 8;

/// Result of every fallible call (`dllm_status` in C).
pub type dllm_status = i32;
pub const DLLM_OK: dllm_status = 0;
pub const DLLM_ERR_INVALID_ARGUMENT: dllm_status = 1;
pub const DLLM_ERR_IO: dllm_status = 2;
pub const DLLM_ERR_FORMAT: dllm_status = 3;
pub const DLLM_ERR_UNSUPPORTED: dllm_status = 4;
pub const DLLM_ERR_OUT_OF_MEMORY: dllm_status = 5;
pub const DLLM_ERR_BACKEND: dllm_status = 6;
pub const DLLM_ERR_BUFFER_TOO_SMALL: dllm_status = 7;
pub const DLLM_ERR_STATE: dllm_status = 8;
pub const DLLM_ERR_INTERNAL: dllm_status = 9;

/// Values of `dllm_model_params.backend`.
pub const DLLM_BACKEND_AUTO: i32 = 0;
pub const DLLM_BACKEND_CPU: i32 = 1;
pub const DLLM_BACKEND_CUDA: i32 = 2;

/// Values of `dllm_sampling_params.remasking`.
pub const DLLM_REMASK_LOW_CONFIDENCE: i32 = 0;
pub const DLLM_REMASK_RANDOM: i32 = 1;
pub const DLLM_REMASK_MARGIN: i32 = 2;
pub const DLLM_REMASK_ENTROPY: i32 = 3;

/// Values of `dllm_sampling_params.cache`.
pub const DLLM_CACHE_NONE: i32 = 0;
pub const DLLM_CACHE_PREFIX: i32 = 1;
pub const DLLM_CACHE_DUAL: i32 = 2;

/// How a model is loaded (`dllm_model_params`; fields documented in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct dllm_model_params {
    pub struct_size: u32,
    pub backend: i32,
    pub device: i32,
    pub threads: i32,
    // Version 4 (the version-1 struct ends here, at 16 bytes).
    pub cpu_bf16: i32,
}

/// How a canvas is denoised (`dllm_sampling_params`; fields documented in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct dllm_sampling_params {
    pub struct_size: u32,
    pub steps: i32,
    pub block_len: i32,
    pub temperature: f32,
    pub remasking: i32,
    // 4 bytes of padding (align 8 of `seed`), as in C.
    pub seed: u64,
    // Version 2 (the version-1 struct ends here, at 32 bytes).
    pub threshold: f32,
    pub factor: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub cfg_scale: f32,
    pub stop_at_eos: i32,
    pub cache: i32,
    pub revise: f32,
    // Version 3 (the version-2 struct ends here, at 64 bytes).
    pub credit_alpha: f32,
    pub credit_gamma: f32,
    pub credit_decay: f32,
    pub hierarchy_low: f32,
    // Version 4 (the version-3 struct ends here, at 80 bytes), then 4 bytes of tail padding.
    pub vicinity: i32,
}

/// What one `dllm_session_step` did.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct dllm_step_info {
    pub step: i32,
    pub committed: i32,
    pub masks_left: i32,
    pub done: i32,
}

/// The `struct_size` of every version of each parameter struct, oldest first; the last is the
/// current `size_of`. A caller's struct_size must be one of these or larger than the last
/// (a newer header): the fields a version lacks take their defaults, unknown ones are ignored.
/// Appending fields appends a size here; the old sizes stay forever.
const MODEL_PARAMS_SIZES: &[usize] = &[16, 20];
const SAMPLING_PARAMS_SIZES: &[usize] = &[32, 64, 80, 88];
const _: () = assert!(std::mem::size_of::<dllm_model_params>() == 20);
const _: () = assert!(std::mem::offset_of!(dllm_model_params, cpu_bf16) == 16);
const _: () = assert!(std::mem::align_of::<dllm_model_params>() == 4);
const _: () = assert!(std::mem::size_of::<dllm_sampling_params>() == 88);
const _: () = assert!(std::mem::align_of::<dllm_sampling_params>() == 8);
const _: () = assert!(std::mem::offset_of!(dllm_sampling_params, seed) == 24);
const _: () = assert!(std::mem::offset_of!(dllm_sampling_params, threshold) == 32);
const _: () = assert!(std::mem::offset_of!(dllm_sampling_params, revise) == 60);
const _: () = assert!(std::mem::offset_of!(dllm_sampling_params, credit_alpha) == 64);
const _: () = assert!(std::mem::offset_of!(dllm_sampling_params, credit_decay) == 72);
const _: () = assert!(std::mem::offset_of!(dllm_sampling_params, hierarchy_low) == 76);
const _: () = assert!(std::mem::offset_of!(dllm_sampling_params, vicinity) == 80);

impl Default for dllm_model_params {
    fn default() -> Self {
        dllm_model_params {
            struct_size: std::mem::size_of::<Self>() as u32,
            backend: DLLM_BACKEND_AUTO,
            device: 0,
            threads: 0,
            cpu_bf16: -1,
        }
    }
}

impl Default for dllm_sampling_params {
    fn default() -> Self {
        let g = crate::denoise::GenerationParams::default();
        let credit = crate::denoise::CreditParams::default();
        dllm_sampling_params {
            struct_size: std::mem::size_of::<Self>() as u32,
            steps: g.steps as i32,
            block_len: g.block_len as i32,
            temperature: g.temperature as f32,
            remasking: DLLM_REMASK_LOW_CONFIDENCE,
            seed: g.seed,
            threshold: 0.0,
            factor: 0.0,
            top_k: 0,
            top_p: 1.0,
            cfg_scale: 0.0,
            stop_at_eos: 0,
            cache: DLLM_CACHE_NONE,
            revise: 0.0,
            credit_alpha: 0.0,
            credit_gamma: credit.gamma as f32,
            credit_decay: credit.decay as f32,
            hierarchy_low: 0.0,
            vicinity: 0,
        }
    }
}

/// A failure on its way to the caller: the status code and the message for `dllm_last_error`.
#[derive(Debug)]
pub(crate) struct FfiError {
    status: dllm_status,
    msg: String,
}

impl FfiError {
    pub(crate) fn new(status: dllm_status, msg: impl Into<String>) -> Self {
        FfiError {
            status,
            msg: msg.into(),
        }
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        let status = match e.kind() {
            ErrorKind::InvalidArgument => DLLM_ERR_INVALID_ARGUMENT,
            ErrorKind::Io => DLLM_ERR_IO,
            ErrorKind::Format => DLLM_ERR_FORMAT,
            ErrorKind::Unsupported => DLLM_ERR_UNSUPPORTED,
            ErrorKind::Backend => DLLM_ERR_BACKEND,
            ErrorKind::OutOfMemory => DLLM_ERR_OUT_OF_MEMORY,
            ErrorKind::State => DLLM_ERR_STATE,
        };
        FfiError::new(status, e.to_string())
    }
}

/// `DLLM_ERR_INVALID_ARGUMENT` with a message, which reads as the core's
/// [`Error::InvalidArgument`]s do ("invalid argument: …"), so every message of that status
/// looks the same whichever layer found the problem.
pub(crate) fn invalid(msg: impl Into<String>) -> FfiError {
    FfiError::from(Error::InvalidArgument(msg.into()))
}

pub(crate) type FfiResult<T> = std::result::Result<T, FfiError>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // During thread teardown the slot may be gone; the message is then dropped.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs the body of the export `name`: `Ok` is `DLLM_OK`; an error is stored as
/// "`name`: message" for [`dllm_last_error`] and its status returned; a panic becomes
/// `DLLM_ERR_INTERNAL`.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> FfiResult<()>) -> dllm_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => DLLM_OK,
        Ok(Err(e)) => {
            set_last_error(format!("{name}: {}", e.msg));
            e.status
        }
        Err(payload) => {
            set_last_error(format!(
                "{name}: internal error (a panic in dllm, please report it): {}",
                panic_message(payload.as_ref())
            ));
            DLLM_ERR_INTERNAL
        }
    }
}

/// Runs the body of an export that returns a value rather than a status: a panic gives
/// `fallback` (and a message for [`dllm_last_error`]).
pub(crate) fn guard_value<T>(name: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        set_last_error(format!(
            "{name}: internal error (a panic in dllm, please report it): {}",
            panic_message(payload.as_ref())
        ));
        fallback
    })
}

/// Reads a caller's parameter struct whose first field is `struct_size`: NULL gives `default`;
/// the size must be one of `sizes` (those of the struct's versions, oldest first) or larger
/// than the last; the fields beyond `struct_size` keep `default`'s values, fields beyond what
/// this library knows are ignored.
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes, aligned for `T`.
pub(crate) unsafe fn read_params<T: Copy>(
    p: *const T,
    default: T,
    sizes: &[usize],
    name: &str,
) -> FfiResult<T> {
    if p.is_null() {
        return Ok(default);
    }
    // SAFETY: p is non-NULL and (by the contract) points to a struct starting with a u32.
    let size = unsafe { std::ptr::read(p.cast::<u32>()) } as usize;
    let newest = sizes.last().copied().unwrap_or(std::mem::size_of::<T>());
    if !(sizes.contains(&size) || size > newest) {
        let known: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
        return Err(invalid(format!(
            "{name}.struct_size is {size}, expected the size of a version of the struct ({}) \
             or more (initialise the struct with {name}_default)",
            known.join(", ")
        )));
    }
    let mut value = default;
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: the caller's struct holds `size >= n` bytes; `value` holds size_of::<T>() >= n;
    // T is plain old data (repr(C) integers and floats), so any bytes form a valid value.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut value as *mut T).cast::<u8>(), n);
    }
    Ok(value)
}

/// The caller's input array `p[0..n]`; NULL is allowed only when `n == 0`.
///
/// # Safety
/// `p` is NULL or points to `n` readable, initialised elements that stay valid and unmodified
/// for the returned lifetime.
pub(crate) unsafe fn input_slice<'a, T>(p: *const T, n: usize, name: &str) -> FfiResult<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{name} is NULL but its length is {n}")));
    }
    let too_large = match n.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) => bytes > isize::MAX as usize,
        None => true,
    };
    if too_large {
        return Err(invalid(format!("{name}: length {n} is impossibly large")));
    }
    // SAFETY: non-NULL, length checked against isize::MAX bytes, validity by the contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The C token ids `ids` as `u32`s, each checked to be an id of the model: `0 <= id < vocab`
/// (`dllm_model_vocab_size`, the one range the header gives every id argument). An error names
/// the first bad one as `what(index)` says ("position 3", "tokens[3]").
pub(crate) fn model_token_ids(
    ids: &[i32],
    vocab: usize,
    what: impl Fn(usize) -> String,
) -> FfiResult<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| match u32::try_from(id) {
            Ok(u) if (u as usize) < vocab => Ok(u),
            _ => Err(invalid(format!(
                "token id {id} at {} is not an id of the model (valid: 0 to {})",
                what(i),
                vocab as i64 - 1
            ))),
        })
        .collect()
}

/// Checks an output buffer argument pair: `buf` may be NULL only when `cap == 0`.
pub(crate) fn check_output<T>(buf: *mut T, cap: usize, name: &str) -> FfiResult<()> {
    if buf.is_null() && cap > 0 {
        return Err(invalid(format!("{name} is NULL but cap is {cap}")));
    }
    Ok(())
}

/// Writes `data` to the caller's buffer `buf[0..cap]` and its length to `*n_out`; too small a
/// buffer gives `DLLM_ERR_BUFFER_TOO_SMALL` (with `*n_out` set) and writes nothing to `buf`.
///
/// # Safety
/// `buf` passed [`check_output`] and points to `cap` writable elements; `n_out` is writable.
pub(crate) unsafe fn write_output<T: Copy>(
    data: &[T],
    buf: *mut T,
    cap: usize,
    n_out: *mut usize,
    name: &str,
) -> FfiResult<()> {
    // SAFETY: n_out was checked non-NULL by the caller of this helper.
    unsafe { *n_out = data.len() };
    if data.len() > cap {
        return Err(FfiError::new(
            DLLM_ERR_BUFFER_TOO_SMALL,
            format!(
                "{name}: buffer too small: {} elements needed, cap is {cap}",
                data.len()
            ),
        ));
    }
    if !data.is_empty() {
        // SAFETY: data.len() <= cap and buf holds cap writable elements (non-NULL as cap > 0).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    }
    Ok(())
}

/// Rejects a NULL out-parameter.
pub(crate) fn check_nonnull<T>(p: *const T, name: &str) -> FfiResult<()> {
    if p.is_null() {
        return Err(invalid(format!("{name} is NULL")));
    }
    Ok(())
}

/// Clamps a count to the `int32_t` the header returns.
pub(crate) fn to_i32(x: usize) -> i32 {
    i32::try_from(x).unwrap_or(i32::MAX)
}

/// The ABI version of this library (`DLLM_ABI_VERSION`).
#[no_mangle]
pub extern "C" fn dllm_abi_version() -> u32 {
    DLLM_ABI_VERSION
}

/// A static description of a status code.
#[no_mangle]
pub extern "C" fn dllm_status_string(status: dllm_status) -> *const c_char {
    let s: &'static CStr = match status {
        DLLM_OK => c"ok",
        DLLM_ERR_INVALID_ARGUMENT => c"invalid argument",
        DLLM_ERR_IO => c"I/O error",
        DLLM_ERR_FORMAT => c"malformed file",
        DLLM_ERR_UNSUPPORTED => c"unsupported",
        DLLM_ERR_OUT_OF_MEMORY => c"out of memory",
        DLLM_ERR_BACKEND => c"backend error",
        DLLM_ERR_BUFFER_TOO_SMALL => c"buffer too small",
        DLLM_ERR_STATE => c"invalid state",
        DLLM_ERR_INTERNAL => c"internal error",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// The message of the last failure on this thread ("" if none), valid until the next call.
#[no_mangle]
pub extern "C" fn dllm_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The bytes the exported `dllm_model_params_default` / `dllm_sampling_params_default` write:
/// the structs of ABI version 6 (model params version 4, sampling params version 2), what
/// programs built against headers up to version 6 pass them. These functions never write more,
/// so those programs keep working when the structs grow; newer headers call the `_init`
/// functions with their own `sizeof` instead (macros of the `_default` names).
const MODEL_PARAMS_DEFAULT_SIZE: usize = 20;
const SAMPLING_PARAMS_DEFAULT_SIZE: usize = 64;

/// Writes the first `min(size, sizeof T)` bytes of `value` to `p`, then `struct_size = size`
/// (the `u32` every parameter struct starts with); nothing when `p` is NULL or `size < 4`.
///
/// # Safety
/// `p` is NULL or points to at least `size` writable bytes, aligned for `T`; `T` is a repr(C)
/// parameter struct whose first field is a `u32`.
unsafe fn write_defaults<T: Copy>(p: *mut T, value: T, size: usize) {
    if p.is_null() || size < std::mem::size_of::<u32>() {
        return;
    }
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: `value` holds size_of::<T>() >= n bytes; the caller's struct holds `size >= n`
    // writable bytes by the contract, at least 4 of them for struct_size; no overlap.
    unsafe {
        std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), p.cast::<u8>(), n);
        p.cast::<u32>()
            .write(u32::try_from(size).unwrap_or(u32::MAX));
    }
}

/// Fills `*p` with the default model parameters of the version-4 struct (20 bytes,
/// `struct_size` 20): the symbol programs built against ABI versions up to 6 call.
///
/// # Safety
/// `p` is NULL or points to at least 20 writable bytes, aligned for `dllm_model_params`.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_params_default(p: *mut dllm_model_params) {
    // SAFETY: forwarded contract.
    unsafe { write_defaults(p, dllm_model_params::default(), MODEL_PARAMS_DEFAULT_SIZE) }
}

/// Fills the caller's `dllm_model_params` of `size` bytes (its `sizeof`) with the defaults of
/// the fields that fit, `struct_size = size` (the header's `dllm_model_params_default` macro).
///
/// # Safety
/// `p` is NULL or points to at least `size` writable bytes, aligned for `dllm_model_params`.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_params_init(p: *mut dllm_model_params, size: usize) {
    // SAFETY: forwarded contract.
    unsafe { write_defaults(p, dllm_model_params::default(), size) }
}

/// Fills `*p` with the default sampling parameters of the version-2 struct (64 bytes,
/// `struct_size` 64): the symbol programs built against ABI versions 2 to 6 call.
///
/// # Safety
/// `p` is NULL or points to at least 64 writable bytes, aligned for `dllm_sampling_params`.
#[no_mangle]
pub unsafe extern "C" fn dllm_sampling_params_default(p: *mut dllm_sampling_params) {
    // SAFETY: forwarded contract.
    unsafe {
        write_defaults(
            p,
            dllm_sampling_params::default(),
            SAMPLING_PARAMS_DEFAULT_SIZE,
        )
    }
}

/// Fills the caller's `dllm_sampling_params` of `size` bytes (its `sizeof`) with the defaults of
/// the fields that fit, `struct_size = size` (the header's `dllm_sampling_params_default` macro).
///
/// # Safety
/// `p` is NULL or points to at least `size` writable bytes, aligned for `dllm_sampling_params`.
#[no_mangle]
pub unsafe extern "C" fn dllm_sampling_params_init(p: *mut dllm_sampling_params, size: usize) {
    // SAFETY: forwarded contract.
    unsafe { write_defaults(p, dllm_sampling_params::default(), size) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_are_distinct_and_total() {
        let text = |s| {
            unsafe { CStr::from_ptr(dllm_status_string(s)) }
                .to_str()
                .unwrap()
        };
        let all: Vec<&str> = (DLLM_OK..=DLLM_ERR_INTERNAL).map(text).collect();
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len());
        assert_eq!(text(-7), "unknown status");
    }

    #[test]
    fn guard_maps_errors_and_panics() {
        assert_eq!(guard("f", || Ok(())), DLLM_OK);
        let st = guard("dllm_f", || Err(Error::Unsupported("thing".into()).into()));
        assert_eq!(st, DLLM_ERR_UNSUPPORTED);
        let msg = unsafe { CStr::from_ptr(dllm_last_error()) }
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(msg, "dllm_f: unsupported: thing");
        let st = guard("dllm_g", || panic!("boom {}", 7));
        assert_eq!(st, DLLM_ERR_INTERNAL);
        let msg = unsafe { CStr::from_ptr(dllm_last_error()) }
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            msg.starts_with("dllm_g: internal error") && msg.ends_with("boom 7"),
            "{msg}"
        );
        assert_eq!(guard_value("dllm_h", -1, || -> i32 { panic!("x") }), -1);
    }

    #[test]
    fn each_error_kind_has_its_own_status() {
        let cases = [
            (Error::invalid("a"), DLLM_ERR_INVALID_ARGUMENT),
            (Error::io("f", std::io::Error::other("b")), DLLM_ERR_IO),
            (Error::format("f", "c"), DLLM_ERR_FORMAT),
            (Error::Unsupported("d".into()), DLLM_ERR_UNSUPPORTED),
            (Error::Backend("e".into()), DLLM_ERR_BACKEND),
            (Error::OutOfMemory("f".into()), DLLM_ERR_OUT_OF_MEMORY),
            (Error::State("g".into()), DLLM_ERR_STATE),
        ];
        for (e, status) in cases {
            let what = e.to_string();
            assert_eq!(FfiError::from(e).status, status, "{what}");
        }
    }

    #[test]
    fn defaults_never_write_past_the_callers_struct() {
        // A caller's struct inside a marked, 8-byte aligned buffer of 96 bytes.
        let marked = |f: &dyn Fn(*mut dllm_sampling_params)| -> [u8; 96] {
            let mut aligned = [0xABABABABABABABABu64; 12];
            f(aligned.as_mut_ptr().cast());
            bytemuck::cast(aligned)
        };
        let struct_size = |b: &[u8; 96]| u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize;
        // The exported symbol of ABI versions 2-6: 64 bytes, struct_size 64.
        let b = marked(&|p| unsafe { dllm_sampling_params_default(p) });
        assert!(b[64..].iter().all(|&x| x == 0xAB));
        assert_eq!(struct_size(&b), 64);
        // init: as many bytes as the caller's struct has.
        for size in [32usize, 64, 80, 88, 96] {
            let b = marked(&|p| unsafe { dllm_sampling_params_init(p, size) });
            assert!(b[size.min(88)..].iter().all(|&x| x == 0xAB), "size {size}");
            assert_eq!(struct_size(&b), size);
        }
        // Every field of this version holds its default.
        let mut aligned = [0u64; 12];
        unsafe { dllm_sampling_params_init(aligned.as_mut_ptr().cast(), 88) };
        let got = unsafe { std::ptr::read(aligned.as_ptr().cast::<dllm_sampling_params>()) };
        assert_eq!(got, dllm_sampling_params::default());
        let b = marked(&|p| unsafe { dllm_sampling_params_init(p, 2) });
        assert!(
            b.iter().all(|&x| x == 0xAB),
            "too small for struct_size: nothing written"
        );
        unsafe { dllm_sampling_params_init(std::ptr::null_mut(), 80) };
        // Model params: the exported function writes its 20 bytes, init the caller's size.
        let mut words = [0xABABABABu32; 8];
        unsafe { dllm_model_params_init(words.as_mut_ptr().cast(), 16) };
        assert_eq!(words[0], 16);
        assert_eq!(words[1], DLLM_BACKEND_AUTO as u32);
        assert!(words[4..].iter().all(|&w| w == 0xABABABAB), "{words:x?}");
        let mut words = [0xABABABABu32; 8];
        unsafe { dllm_model_params_default(words.as_mut_ptr().cast()) };
        assert_eq!((words[0], words[4] as i32), (20, -1));
        assert!(words[5..].iter().all(|&w| w == 0xABABABAB));
    }

    #[test]
    fn params_struct_size_is_checked() {
        let d = dllm_sampling_params::default();
        let read = |p: &dllm_sampling_params| unsafe {
            read_params(p, d, SAMPLING_PARAMS_SIZES, "dllm_sampling_params")
        };
        let mut p = d;
        p.steps = 7;
        p.threshold = 0.5;
        assert_eq!(read(&p).unwrap(), p);
        // A version-1 caller: the appended fields keep their defaults, whatever follows.
        p.struct_size = 32;
        let got = read(&p).unwrap();
        assert_eq!((got.steps, got.threshold, got.struct_size), (7, 0.0, 32));
        // A newer caller: the unknown tail is ignored.
        // A version-2 caller: the credit fields keep their defaults.
        p.credit_alpha = 0.5;
        p.struct_size = 64;
        let got = read(&p).unwrap();
        assert_eq!((got.threshold, got.credit_alpha), (0.5, 0.0));
        // A version-3 caller: the vicinity keeps its default.
        p.vicinity = 8;
        p.struct_size = 80;
        let got = read(&p).unwrap();
        assert_eq!((got.credit_alpha, got.vicinity), (0.5, 0));
        p.struct_size = 96;
        assert_eq!(read(&p).unwrap().vicinity, 8);
        for bad in [0, 8, 31, 33, 40, 63, 65, 76, 79, 81, 84, 87] {
            p.struct_size = bad;
            let e = read(&p).unwrap_err();
            assert_eq!(e.status, DLLM_ERR_INVALID_ARGUMENT);
            assert!(
                e.msg.contains("struct_size is") && e.msg.contains("32, 64, 80, 88"),
                "{}",
                e.msg
            );
        }
        assert_eq!(
            unsafe { read_params(std::ptr::null(), d, SAMPLING_PARAMS_SIZES, "x") }.unwrap(),
            d
        );
    }
}
