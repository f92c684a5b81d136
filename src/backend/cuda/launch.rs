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
//! site only changes its constructor. PDL is ON by default since session 5 and turned off with
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
use std::ffi::c_void;

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
        self
    }

    /// Launches the kernel with the parameters pushed so far.
    ///
    /// # Safety
    /// As for `cudarc`'s `LaunchArgs::launch`: the parameters must match the kernel's signature
    /// in number, order and type, and every buffer must be valid for what the kernel accesses
    /// until the launch completes.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        assert!(self.params.len() <= MAX_ARGS, "too many kernel arguments");
        self.stream.context().bind_to_thread()?;
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
    }
}

macro_rules! scalar_args {
    ($($t:ty),*) => {$(
        // SAFETY: the pointer is to a plain value that outlives the launch builder ('b: 'a).
        unsafe impl<'a, 'b: 'a> PushKernelArg<&'b $t> for Launch<'a> {
            #[inline(always)]
            fn arg(&mut self, arg: &'b $t) -> &mut Self {
                self.params.push(arg as *const $t as *mut c_void);
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
