//! The CUDA backend: our own kernels (`cuda/*.cu`, compiled by `build.rs`) driven through `cudarc`.
//!
//! Entry point: [`CudaDevice::open`], which first checks that the driver library is present
//! (`cudarc` panics otherwise) and that the kernels were compiled into this build, so callers
//! can fall back to the CPU with a clear message. Kernel modules are looked up by file stem
//! (`gemm` for `cuda/gemm.cu`) with [`CudaDevice::module`]; the sm_90a cubin is preferred when
//! the file was built with one and the device is compute capability 9.0, else the PTX.

pub mod attention;
pub mod check;
pub mod elementwise;
pub mod env_switch;
pub mod gemm;
pub mod gemm_stream;
pub mod gemm_sweep;
pub mod gemm_swiglu;
pub mod gemm_tma;
pub mod launch;
pub mod memory;
pub mod padding;
#[cfg(test)]
mod pipeline_model;
pub mod profile;
pub mod sampling;
pub mod scratch;
pub mod swiglu_layout;
pub mod transformer;

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether this build carries compiled CUDA kernels.
pub fn kernels_compiled() -> bool {
    embedded::KERNELS_COMPILED
}

/// Names of the embedded kernel modules.
pub fn module_names() -> Vec<&'static str> {
    embedded::MODULES.iter().map(|m| m.0).collect()
}

/// Why CUDA cannot be used here, or `None` when it can be tried.
pub fn unavailable_reason() -> Option<String> {
    if !kernels_compiled() {
        return Some("this build has no CUDA kernels (nvcc was not found at build time)".into());
    }
    // SAFETY: only probes for the shared library; loads nothing else.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("the NVIDIA driver library (libcuda) is not present".into());
    }
    None
}

/// The kernel and launch choices the environment makes (each `DLLM_*` switch as the model will
/// read it at load; a kernel that fails its load-time self-test is still skipped), for `dllm
/// info` and the bench reports: (name, value), a bool for each on/off switch.
pub fn switches() -> Vec<(&'static str, serde_json::Value)> {
    let on = |name, b: bool| (name, serde_json::Value::Bool(b));
    vec![
        on("stream_gemm", gemm_stream::requested_by_env()),
        on("tma_gemm", gemm_tma::requested_by_env()),
        on("tma_quad_gemm", gemm_tma::quads_requested_by_env()),
        on("wgmma_gemm", env_switch::flag("DLLM_GEMM_WGMMA", true)),
        on("split_attention", attention::split_requested_by_env()),
        on("key_group_attention", attention::keys_requested_by_env()),
        (
            "attention_stages",
            (if attention::two_stages_requested_by_env() {
                2
            } else {
                3
            })
            .into(),
        ),
        on(
            "reference_kernels",
            transformer::KernelChoice::from_env().naive_gemm,
        ),
        on("pdl", launch::pdl_from_env()),
        on("cuda_graphs", transformer::graphs_from_env()),
        on("session_graphs", transformer::session_graphs_from_env()),
        on(
            "fused_swiglu",
            transformer::KernelChoice::from_env().fused_swiglu,
        ),
        on(
            "l2_prefetch",
            transformer::KernelChoice::from_env().l2_prefetch,
        ),
        ("cache_slots", transformer::cache_slots_from_env().into()),
        (
            "key_group_max_units",
            attention::keys_units_override().map_or("SM count".into(), Into::into),
        ),
        (
            "stream_gemm_blocks",
            gemm_stream::blocks_override().map_or("one per SM".into(), Into::into),
        ),
    ]
}

/// `switches()` as one line: "stream_gemm on · tma_gemm on · … · cache_slots 4".
pub fn switches_line() -> String {
    switches()
        .iter()
        .map(|(n, v)| match v {
            serde_json::Value::Bool(b) => format!("{n} {}", if *b { "on" } else { "off" }),
            serde_json::Value::String(t) => format!("{n} {t}"),
            other => format!("{n} {other}"),
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Wraps a driver error with what was being done.
pub fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend(format!("CUDA {what}: {e:?}"))
}

/// A CUDA device: context, one non-blocking stream (capturable into CUDA graphs), and the kernel
/// modules loaded so far.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub name: String,
    /// Whether kernels are launched with programmatic dependent launch ([`launch`]).
    pub pdl: bool,
}

impl CudaDevice {
    /// Opens device `ordinal`; a clear error (never a panic) when CUDA is unavailable.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        if let Some(why) = unavailable_reason() {
            return Err(Error::Backend(why));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda_err(&format!("open device {ordinal}"), e))?;
        // A dedicated non-blocking stream: the legacy default stream cannot be captured into a
        // CUDA graph. All of dllm's device work is ordered on this one stream, so cudarc's
        // cross-stream event tracking (an event record per buffer use, and waits that are illegal
        // inside a capture) is turned off before anything is allocated.
        // SAFETY: no CudaSlice exists yet in this context; every later use goes through `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err(&format!("create a stream on device {ordinal}"), e))?;
        let capability = ctx
            .compute_capability()
            .map_err(|e| cuda_err("query compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
        if capability.0 < 9 {
            return Err(Error::Unsupported(format!(
                "CUDA device {name} has compute capability {}.{}; dllm's kernels need 9.0 (Hopper) or newer",
                capability.0, capability.1
            )));
        }
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            capability,
            name,
            pdl: launch::pdl_from_env(),
        }))
    }

    /// The device's free and total memory.
    pub fn memory(&self) -> Result<crate::memory::MemoryInfo> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(|e| cuda_err("query free device memory", e))?;
        Ok(crate::memory::MemoryInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    /// [`Error::OutOfMemory`] unless `need` bytes for `what` fit in the free device memory
    /// ([`crate::memory::check_fits`]). Memory this stream freed returns to the device at its next
    /// synchronisation, so a request that does not fit at first is checked again after one
    /// (not while the stream is capturing a graph).
    pub fn check_fits(&self, what: &str, need: u64) -> Result<()> {
        let first = crate::memory::check_fits(what, need, self.memory()?, &self.name);
        if first.is_ok() || self.capturing()? {
            return first;
        }
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize before a memory check", e))?;
        crate::memory::check_fits(what, need, self.memory()?, &self.name)
    }

    /// Whether the stream is capturing a CUDA graph.
    pub fn capturing(&self) -> Result<bool> {
        let status = self
            .stream
            .capture_status()
            .map_err(|e| cuda_err("query the stream's capture status", e))?;
        Ok(status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// The loaded module compiled from `cuda/<stem>.cu`.
    pub fn module(&self, stem: &str) -> Result<Arc<CudaModule>> {
        let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let (key, ptx, cubin) =
            embedded::MODULES
                .iter()
                .find(|m| m.0 == stem)
                .ok_or_else(|| {
                    Error::Backend(format!(
                        "kernel module `{stem}` is not embedded in this build"
                    ))
                })?;
        if let Some(m) = cache.get(key) {
            return Ok(m.clone());
        }
        let image = match cubin {
            Some(bin) if self.capability == (9, 0) => cudarc::nvrtc::Ptx::from_binary(bin.to_vec()),
            _ => cudarc::nvrtc::Ptx::from_src(*ptx),
        };
        let module = self
            .ctx
            .load_module(image)
            .map_err(|e| cuda_err(&format!("load module `{stem}`"), e))?;
        cache.insert(key, module.clone());
        Ok(module)
    }

    /// Kernel `name` from module `stem`.
    pub fn function(&self, stem: &str, name: &str) -> Result<CudaFunction> {
        self.module(stem)?
            .load_function(name)
            .map_err(|e| cuda_err(&format!("load kernel `{name}` from `{stem}`"), e))
    }

    /// Waits for all queued work and surfaces any asynchronous launch error.
    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }
}
