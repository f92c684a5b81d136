//! Kernel launches with programmatic dependent launch (PDL, Hopper).
//!
//! A normal launch starts only after the previous kernel in the stream has finished, so every
//! kernel boundary costs the launch latency plus the ramp-up of the next grid and the tail of the
//! last one. With PDL (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`), the next grid may
//! start as soon as every block of the previous one has executed `griddepcontrol.launch_dependents`;
//! its blocks then wait in `griddepcontrol.wait` (full completion and memory visibility of the
//! previous grid) before touching anything that grid wrote. Our kernels call `dllm_pdl_entry()`
//! (`cuda/common.cuh`: trigger, then wait) first thing, so the order of results is exactly the
//! stream order; the weight-streaming GEMMs issue their first weight loads (constant data) before
//! the wait: the skinny kernels what fits in their registers, the stream kernel (the default for
//! M ≤ 32 since session 4) its whole 5-stage ring, 160 KB per SM (21 MB over 132 SMs, a fifth of
//! a 100 MB projection), which then streams while the small kernel before it (norm, RoPE,
//! attention, SwiGLU) finishes. Both instructions are no-ops in a kernel launched without the
//! attribute.
//!
//! [`Launch`] mirrors `cudarc`'s `LaunchArgs` (`.arg(..)` then `unsafe launch(cfg)`), so a call
//! site only changes its constructor. With parameter checks on ([`set_param_checks`],
//! `DLLM_CHECK_PARAMS=1`; `dllm-gpu-check` turns them on) every launch first compares the sizes
//! of the pushed parameters with the kernel's own parameter list (`cuFuncGetParamInfo`) and
//! refuses a launch whose count or sizes differ, naming the first difference: a host/kernel
//! signature mismatch then fails its check with a message instead of reading garbage. PDL is ON by default since session 5 and turned off with
//! `DLLM_PDL=0` ([`pdl_from_env`]). Session 2 measured no gain on an H100 with the register-fed
//! skinny GEMMs; with the stream GEMM's ring prefetch, session 5 measured on an H200 (same call,
//! graphs on): b1 dual-cache 571.3 → 605.1 tok/s (block step 6.24 → 5.84 ms), b8 dual-cache and
//! b1 no-cache unchanged (1653 vs 1655, 81.5 vs 81.2 tok/s), identical canvases, and all 1015
//! `dllm-gpu-check` checks passing with it. Launches captured into a CUDA graph keep their
//! programmatic edges.

use cudarc::driver::sys;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DriverError,
    LaunchConfig, PushKernelArg,
};
use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex};

/// Most kernel parameters of one launch.
const MAX_ARGS: usize = 32;

/// Whether PDL launches are wanted: on unless `DLLM_PDL=0` (`CudaDevice::open` keeps it off
/// for the Ampere build: PDL needs sm_90).
pub fn pdl_from_env() -> bool {
    super::env_switch::flag("DLLM_PDL", true)
}

/// A kernel launch being assembled: `.arg(..)` each parameter in order, then [`Launch::launch`].
pub struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    pdl: bool,
    /// Pointers to each parameter's value, in order (what `cuLaunchKernelEx` reads).
    params: Vec<*mut c_void>,
    /// The size in bytes of each parameter, in order (for [`check_param_sizes`]).
    sizes: Vec<usize>,
    /// Device addresses of buffer parameters (heap storage: stable while `params` points here).
    addrs: Box<[u64; MAX_ARGS]>,
    n_addrs: usize,
}

impl<'a> Launch<'a> {
    /// A launch of `func` on `stream`, programmatic (PDL) when `pdl`.
    pub fn new(stream: &'a CudaStream, func: &'a CudaFunction, pdl: bool) -> Self {
        Launch {
            stream,
            func,
            pdl,
            params: Vec::with_capacity(MAX_ARGS),
            sizes: Vec::with_capacity(MAX_ARGS),
            addrs: Box::new([0; MAX_ARGS]),
            n_addrs: 0,
        }
    }

    fn push_addr(&mut self, addr: u64) -> &mut Self {
        assert!(
            self.n_addrs < MAX_ARGS,
            "more than {MAX_ARGS} kernel buffer arguments"
        );
        self.addrs[self.n_addrs] = addr;
        let p = &mut self.addrs[self.n_addrs] as *mut u64 as *mut c_void;
        self.n_addrs += 1;
        self.params.push(p);
        self.sizes.push(std::mem::size_of::<u64>());
        self
    }

    /// Launches the kernel with the parameters pushed so far.
    ///
    /// # Safety
    /// As for `cudarc`'s `LaunchArgs::launch`: the parameters must match the kernel's signature
    /// in number, order and type, and every buffer must be valid for what the kernel accesses
    /// until the launch completes.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), LaunchError> {
        assert!(self.params.len() <= MAX_ARGS, "too many kernel arguments");
        self.stream.context().bind_to_thread()?;
        if param_checks() {
            self.check_params()?;
        }
        // SAFETY: all-zero is a valid CUlaunchAttribute (id 0 = ignored, value padding).
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl),
        };
        // SAFETY: `config` and `attr` live across the call; `params` holds one valid pointer per
        // kernel parameter (caller's contract), pointing at caller-owned values or `addrs`.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(LaunchError::Driver)
    }

    /// Compares the pushed parameter sizes with the kernel's. A (kernel, sizes) pair that
    /// matched once is remembered (up to [`MAX_MATCHED`] pairs, then forgotten), so a kernel
    /// launched again the same way costs one lookup. Kernels are known by their handle: one
    /// reused after its module was unloaded (graph sets load their own) may skip its check when
    /// pushed the same sizes as the kernel that held it, never fail one.
    fn check_params(&self) -> Result<(), LaunchError> {
        static MATCHED: LazyLock<Mutex<HashSet<MatchedLaunch>>> = LazyLock::new(Default::default);
        let matched = || MATCHED.lock().unwrap_or_else(|p| p.into_inner());
        let key = (self.func.cu_function() as usize, self.sizes.clone());
        if matched().contains(&key) {
            return Ok(());
        }
        if let Some(layout) = kernel_param_sizes(self.func)? {
            check_param_sizes(&self.sizes, &layout).map_err(LaunchError::Params)?;
        }
        let mut set = matched();
        if set.len() >= MAX_MATCHED {
            set.clear();
        }
        set.insert(key);
        Ok(())
    }
}

/// Most (kernel, sizes) pairs [`Launch::check_params`] remembers.
const MAX_MATCHED: usize = 4096;

/// A kernel (its handle) and the parameter sizes a launch of it pushed.
type MatchedLaunch = (usize, Vec<usize>);

/// Why [`Launch::launch`] failed: the driver's error, or (with parameter checks on) parameters
/// that do not match the kernel's. `Debug` prints the driver error or the message as it is.
pub enum LaunchError {
    Driver(DriverError),
    Params(String),
}

impl From<DriverError> for LaunchError {
    fn from(e: DriverError) -> Self {
        LaunchError::Driver(e)
    }
}

impl std::fmt::Debug for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LaunchError::Driver(e) => e.fmt(f),
            LaunchError::Params(m) => f.write_str(m),
        }
    }
}

/// Parameter checks: 0 = not read yet, 1 = off, 2 = on.
static PARAM_CHECKS: AtomicU8 = AtomicU8::new(0);

/// Turns the launch parameter checks on or off for every later launch of the process (the
/// first launch of a kernel with a given parameter list costs one driver query per parameter,
/// later ones a lookup).
pub fn set_param_checks(on: bool) {
    PARAM_CHECKS.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether launches check their parameters: as [`set_param_checks`] last said, else
/// `DLLM_CHECK_PARAMS=1`.
pub fn param_checks() -> bool {
    match PARAM_CHECKS.load(Ordering::Relaxed) {
        0 => {
            let on = super::env_switch::flag("DLLM_CHECK_PARAMS", false);
            set_param_checks(on);
            on
        }
        v => v == 2,
    }
}

/// The driver version from which `cuFuncGetParamInfo` exists (12.4).
const PARAM_INFO_DRIVER: i32 = 12040;

/// The size of each of `func`'s parameters, in order, from the driver; `None` when the driver
/// is older than [`PARAM_INFO_DRIVER`] (nothing to compare with).
fn kernel_param_sizes(func: &CudaFunction) -> Result<Option<Vec<usize>>, DriverError> {
    let mut version = 0i32;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
    if version < PARAM_INFO_DRIVER {
        return Ok(None);
    }
    let mut sizes = Vec::new();
    // A kernel has at most 32 KiB of parameters: the loop ends at the first index past its last.
    while sizes.len() <= 32 * 1024 {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: `func` is a loaded kernel; the call writes two integers.
        let r = unsafe {
            sys::cuFuncGetParamInfo(func.cu_function(), sizes.len(), &mut offset, &mut size)
        };
        match r {
            sys::CUresult::CUDA_SUCCESS => sizes.push(size),
            sys::CUresult::CUDA_ERROR_INVALID_VALUE => break,
            other => return Err(DriverError(other)),
        }
    }
    Ok(Some(sizes))
}

/// Compares the sizes of the pushed parameters with the kernel's (`expected`); the error names
/// the count or the first parameter whose size differs.
fn check_param_sizes(pushed: &[usize], expected: &[usize]) -> Result<(), String> {
    if let Some(i) = (0..pushed.len().min(expected.len())).find(|&i| pushed[i] != expected[i]) {
        return Err(format!(
            "kernel parameter {i} is {} bytes, the launch pushed {} bytes",
            expected[i], pushed[i]
        ));
    }
    if pushed.len() != expected.len() {
        return Err(format!(
            "the kernel takes {} parameters, the launch pushed {}",
            expected.len(),
            pushed.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sizes_must_match_in_count_and_order() {
        assert_eq!(check_param_sizes(&[8, 8, 4, 4], &[8, 8, 4, 4]), Ok(()));
        assert_eq!(check_param_sizes(&[], &[]), Ok(()));
        // A pointer pushed where the kernel takes an int: named by index.
        let e = check_param_sizes(&[8, 8, 8, 4], &[8, 8, 4, 4]).unwrap_err();
        assert!(
            e.contains("parameter 2 is 4 bytes") && e.contains("pushed 8"),
            "{e}"
        );
        // One argument too few or too many.
        let e = check_param_sizes(&[8, 8, 4], &[8, 8, 4, 4]).unwrap_err();
        assert!(
            e.contains("takes 4 parameters") && e.contains("pushed 3"),
            "{e}"
        );
        let e = check_param_sizes(&[8, 8, 4, 4, 8], &[8, 8, 4, 4]).unwrap_err();
        assert!(
            e.contains("takes 4 parameters") && e.contains("pushed 5"),
            "{e}"
        );
    }
}

macro_rules! scalar_args {
    ($($t:ty),*) => {$(
        // SAFETY: the pointer is to a plain value that outlives the launch builder ('b: 'a).
        unsafe impl<'a, 'b: 'a> PushKernelArg<&'b $t> for Launch<'a> {
            #[inline(always)]
            fn arg(&mut self, arg: &'b $t) -> &mut Self {
                self.params.push(arg as *const $t as *mut c_void);
                self.sizes.push(std::mem::size_of::<$t>());
                self
            }
        }
    )*};
}
scalar_args!(
    i32,
    u32,
    i64,
    u64,
    f32,
    f64,
    sys::CUtensorMap,
    super::gemm_rope::RopeEpi,
    super::gemm_norm::EpiParams
);

macro_rules! buffer_args {
    ($($t:ty),*) => {$(
        // SAFETY: the device address is copied into the builder's own stable storage.
        unsafe impl<'a, 'b: 'a, T> PushKernelArg<$t> for Launch<'a> {
            #[inline(always)]
            fn arg(&mut self, arg: $t) -> &mut Self {
                let (addr, _guard) = arg.device_ptr(self.stream);
                self.push_addr(addr)
            }
        }
    )*};
}
buffer_args!(&'b CudaSlice<T>, &'b mut CudaSlice<T>);

macro_rules! view_args {
    ($($t:ty),*) => {$(
        // SAFETY: the device address is copied into the builder's own stable storage.
        unsafe impl<'a, 'b: 'a, 'c, T> PushKernelArg<$t> for Launch<'a> {
            #[inline(always)]
            fn arg(&mut self, arg: $t) -> &mut Self {
                let (addr, _guard) = arg.device_ptr(self.stream);
                self.push_addr(addr)
            }
        }
    )*};
}
view_args!(
    &'b CudaView<'c, T>,
    &'b CudaViewMut<'c, T>,
    &'b mut CudaViewMut<'c, T>
);
