//! The model handle of the C ABI: loading, accessors, tokenize and detokenize.

use super::{
    check_nonnull, check_output, dllm_model_params, dllm_status, guard, guard_value, input_slice,
    invalid, model_token_ids, read_params, write_output, FfiError, FfiResult, DLLM_BACKEND_AUTO,
    DLLM_BACKEND_CPU, DLLM_BACKEND_CUDA, DLLM_ERR_INTERNAL, MODEL_PARAMS_SIZES,
};
use crate::config::Arch;
use crate::model::{load_model_with, Backend, CpuOptions, Model};
use crate::tokenizer::{SpecialText, Tokenizer};
use std::ffi::{c_char, CStr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What a `dllm_model` handle and every session created from it share.
pub(crate) struct ModelInner {
    pub(crate) model: Arc<dyn Model>,
    pub(crate) tokenizer: Tokenizer,
    /// The model's own worker threads (`threads > 0`); `None` uses rayon's global pool.
    pool: Option<WorkerPool>,
}

impl ModelInner {
    /// Runs `f` on this model's worker threads.
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

/// A rayon pool whose threads are joined when it is dropped, so that freeing the last handle
/// of a model leaves no thread of it behind (rayon alone lets them exit on their own time).
struct WorkerPool {
    /// `Some` until dropped.
    pool: Option<rayon::ThreadPool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl WorkerPool {
    fn new(n: usize) -> FfiResult<WorkerPool> {
        let threads = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let handles = Arc::clone(&threads);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .spawn_handler(move |thread| {
                let mut b =
                    std::thread::Builder::new().name(format!("dllm-worker-{}", thread.index()));
                if let Some(size) = thread.stack_size() {
                    b = b.stack_size(size);
                }
                let handle = b.spawn(|| thread.run())?;
                handles
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(handle);
                Ok(())
            })
            .build()
            .map_err(|e| {
                FfiError::from(crate::Error::Backend(format!(
                    "cannot start {n} CPU worker threads: {e}"
                )))
            })?;
        Ok(WorkerPool {
            pool: Some(pool),
            threads,
        })
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        // Dropping the pool asks its threads to stop; no work is left (nothing else holds the
        // model), so they finish promptly and are joined here.
        drop(self.pool.take());
        let handles = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

/// The opaque `dllm_model`: one caller reference to a shared `ModelInner`. Sessions hold
/// their own references, so freeing the handle first is safe.
pub struct dllm_model {
    pub(crate) inner: Arc<ModelInner>,
}

/// The handle behind a caller's pointer.
///
/// # Safety
/// `m` is NULL or a live pointer returned by [`dllm_model_load`].
pub(crate) unsafe fn model_ref<'a>(m: *const dllm_model) -> FfiResult<&'a ModelInner> {
    if m.is_null() {
        return Err(invalid("the model is NULL"));
    }
    // SAFETY: a live handle by the contract.
    Ok(unsafe { &(*m).inner })
}

#[cfg(unix)]
fn path_from_c(s: &CStr) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes()))
}

#[cfg(not(unix))]
fn path_from_c(s: &CStr) -> PathBuf {
    PathBuf::from(s.to_string_lossy().into_owned())
}

/// Loads the model in `dir`.
///
/// # Safety
/// `dir` is NULL or a NUL-terminated string; `p` is NULL or points to a `dllm_model_params`
/// of at least `struct_size` bytes; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_load(
    dir: *const c_char,
    p: *const dllm_model_params,
    out: *mut *mut dllm_model,
) -> dllm_status {
    guard("dllm_model_load", || {
        check_nonnull(dir, "dir")?;
        check_nonnull(out, "out")?;
        // SAFETY: as documented on this function.
        let params = unsafe {
            read_params(
                p,
                dllm_model_params::default(),
                MODEL_PARAMS_SIZES,
                "dllm_model_params",
            )
        }?;
        let backend = match params.backend {
            DLLM_BACKEND_AUTO => Backend::Auto,
            DLLM_BACKEND_CPU => Backend::Cpu,
            DLLM_BACKEND_CUDA => Backend::Cuda,
            b => {
                return Err(invalid(format!(
                    "backend {b} is not a dllm_backend value (0 auto, 1 cpu, 2 cuda)"
                )))
            }
        };
        if params.device < 0 {
            return Err(invalid(format!("device {} is negative", params.device)));
        }
        if params.device > 0 && backend != Backend::Cpu {
            return Err(crate::Error::Unsupported(format!(
                "device {}: only GPU 0 is supported for now",
                params.device
            ))
            .into());
        }
        if params.threads < 0 {
            return Err(invalid(format!(
                "threads {} is negative (0 = one per core)",
                params.threads
            )));
        }
        let max = crate::backend::cpu::MAX_THREADS;
        if params.threads as usize > max {
            return Err(invalid(format!(
                "threads {} exceeds the most supported, {max} (0 = one per core)",
                params.threads
            )));
        }
        let cpu = CpuOptions {
            bf16_activations: match params.cpu_bf16 {
                -1 => None,
                0 => Some(false),
                1 => Some(true),
                v => {
                    return Err(invalid(format!(
                        "cpu_bf16 {v} is not -1 (as DLLM_CPU_BF16 says), 0 (off) or 1 (on)"
                    )))
                }
            },
        };
        let pool = if params.threads > 0 {
            Some(WorkerPool::new(params.threads as usize)?)
        } else {
            None
        };
        // SAFETY: non-NULL and NUL-terminated by the contract.
        let dir = path_from_c(unsafe { CStr::from_ptr(dir) });
        let load = || load_model_with(&dir, backend, cpu);
        let loaded = match &pool {
            Some(p) => p.install(load),
            None => load(),
        }?;
        let tokenizer = Tokenizer::from_model_dir(&dir)?;
        let inner = ModelInner {
            model: loaded.model,
            tokenizer,
            pool,
        };
        let handle = Box::new(dllm_model {
            inner: Arc::new(inner),
        });
        // SAFETY: `out` is non-NULL and writable by the contract.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Releases the caller's reference to a model.
///
/// # Safety
/// `m` is NULL or a live pointer from [`dllm_model_load`], not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_free(m: *mut dllm_model) {
    if m.is_null() {
        return;
    }
    guard_value("dllm_model_free", (), || {
        // SAFETY: the pointer came from Box::into_raw in dllm_model_load and is freed once.
        drop(unsafe { Box::from_raw(m) })
    })
}

/// Reads one value of a model, -1 when `m` is NULL.
///
/// # Safety
/// `m` is NULL or a live model handle.
unsafe fn model_value(m: *const dllm_model, name: &str, f: impl FnOnce(&ModelInner) -> u64) -> i32 {
    guard_value(name, -1, || {
        // SAFETY: by the contract of the caller.
        match unsafe { model_ref(m) } {
            Ok(inner) => i32::try_from(f(inner)).unwrap_or(i32::MAX),
            Err(_) => -1,
        }
    })
}

/// The mask token id, -1 if `m` is NULL.
///
/// # Safety
/// `m` is NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_mask_token(m: *const dllm_model) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        model_value(m, "dllm_model_mask_token", |i| {
            i.model.config().mask_token_id as u64
        })
    }
}

/// The end-of-text token id, -1 if `m` is NULL.
///
/// # Safety
/// `m` is NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_eos_token(m: *const dllm_model) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        model_value(m, "dllm_model_eos_token", |i| {
            i.model.config().eos_token_id as u64
        })
    }
}

/// The number of real tokens, -1 if `m` is NULL.
///
/// # Safety
/// `m` is NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_vocab_size(m: *const dllm_model) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        model_value(m, "dllm_model_vocab_size", |i| {
            i.model.config().vocab_size as u64
        })
    }
}

/// The longest canvas the model accepts, -1 if `m` is NULL.
///
/// # Safety
/// `m` is NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_max_length(m: *const dllm_model) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        model_value(m, "dllm_model_max_length", |i| {
            i.model.config().max_seq_len as u64
        })
    }
}

/// The backend name ("cpu", "cuda"), NULL if `m` is NULL.
///
/// # Safety
/// `m` is NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_backend(m: *const dllm_model) -> *const c_char {
    guard_value("dllm_model_backend", std::ptr::null(), || {
        // SAFETY: by the contract.
        let Ok(inner) = (unsafe { model_ref(m) }) else {
            return std::ptr::null();
        };
        let name: &'static CStr = match inner.model.backend_name() {
            "cpu" => c"cpu",
            "cuda" => c"cuda",
            _ => c"unknown",
        };
        name.as_ptr()
    })
}

/// The model's architecture: `"llada"`, `"dream"` or `"llada-moe"` (static); NULL for NULL.
///
/// # Safety
/// `m` is NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn dllm_model_architecture(m: *const dllm_model) -> *const c_char {
    guard_value("dllm_model_architecture", std::ptr::null(), || {
        // SAFETY: by the contract.
        let Ok(inner) = (unsafe { model_ref(m) }) else {
            return std::ptr::null();
        };
        let name: &'static CStr = match inner.model.config().arch {
            Arch::Llada => c"llada",
            Arch::Dream => c"dream",
            Arch::LladaMoe => c"llada-moe",
        };
        name.as_ptr()
    })
}

/// Text to token ids, special-token text read as those tokens.
///
/// # Safety
/// `m` is NULL or a live model handle; `text` is NULL or points to `text_len` readable bytes;
/// `tokens` is NULL or points to `cap` writable ids; `n_tokens` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_tokenize(
    m: *const dllm_model,
    text: *const c_char,
    text_len: usize,
    tokens: *mut i32,
    cap: usize,
    n_tokens: *mut usize,
) -> dllm_status {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        tokenize(
            "dllm_tokenize",
            m,
            text,
            text_len,
            tokens,
            cap,
            n_tokens,
            SpecialText::Token,
        )
    }
}

/// Text to token ids, special-token text kept as plain text (ABI version 5).
///
/// # Safety
/// As [`dllm_tokenize`].
#[no_mangle]
pub unsafe extern "C" fn dllm_tokenize_literal(
    m: *const dllm_model,
    text: *const c_char,
    text_len: usize,
    tokens: *mut i32,
    cap: usize,
    n_tokens: *mut usize,
) -> dllm_status {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        tokenize(
            "dllm_tokenize_literal",
            m,
            text,
            text_len,
            tokens,
            cap,
            n_tokens,
            SpecialText::Literal,
        )
    }
}

/// [`dllm_tokenize`] (`special` [`SpecialText::Token`]) and [`dllm_tokenize_literal`]
/// ([`SpecialText::Literal`]), as `name`.
///
/// # Safety
/// As [`dllm_tokenize`].
#[allow(clippy::too_many_arguments)]
unsafe fn tokenize(
    name: &'static str,
    m: *const dllm_model,
    text: *const c_char,
    text_len: usize,
    tokens: *mut i32,
    cap: usize,
    n_tokens: *mut usize,
    special: SpecialText,
) -> dllm_status {
    guard(name, || {
        // SAFETY: by the contract.
        let inner = unsafe { model_ref(m) }?;
        check_nonnull(n_tokens, "n_tokens")?;
        check_output(tokens, cap, "tokens")?;
        // SAFETY: by the contract.
        let bytes = unsafe { input_slice(text.cast::<u8>(), text_len, "text") }?;
        let text = std::str::from_utf8(bytes).map_err(|e| {
            invalid(format!(
                "text is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        let ids = inner.tokenizer.encode_as(text, special)?;
        let ids: Vec<i32> = ids
            .into_iter()
            .map(|id| {
                i32::try_from(id).map_err(|_| {
                    FfiError::new(DLLM_ERR_INTERNAL, format!("token id {id} exceeds int32_t"))
                })
            })
            .collect::<FfiResult<_>>()?;
        // SAFETY: checked above; buffers by the contract.
        unsafe { write_output(&ids, tokens, cap, n_tokens, "tokens") }
    })
}

/// Token ids to UTF-8 text, NUL-terminated when it fits.
///
/// # Safety
/// `m` is NULL or a live model handle; `tokens` is NULL or points to `n` readable ids; `buf` is
/// NULL or points to `cap` writable bytes; `n_bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn dllm_detokenize(
    m: *const dllm_model,
    tokens: *const i32,
    n: usize,
    buf: *mut c_char,
    cap: usize,
    n_bytes: *mut usize,
) -> dllm_status {
    guard("dllm_detokenize", || {
        // SAFETY: by the contract.
        let inner = unsafe { model_ref(m) }?;
        check_nonnull(n_bytes, "n_bytes")?;
        check_output(buf, cap, "buf")?;
        // SAFETY: by the contract.
        let ids = unsafe { input_slice(tokens, n, "tokens") }?;
        // The model's range, not the tokenizer's: a model may have more rows than its tokenizer
        // has tokens (padding), and what it generates must detokenize (to no text, as in HF).
        let vocab = inner.model.config().vocab_size;
        let ids = model_token_ids(ids, vocab, |i| format!("tokens[{i}]"))?;
        let text = inner.tokenizer.decode(&ids, false)?;
        let bytes = text.as_bytes();
        // SAFETY: checked above; buffers by the contract.
        unsafe { write_output(bytes, buf.cast::<u8>(), cap, n_bytes, "buf") }?;
        if bytes.len() < cap {
            // SAFETY: bytes.len() < cap, inside the caller's buffer.
            unsafe { buf.add(bytes.len()).write(0) };
        }
        Ok(())
    })
}
