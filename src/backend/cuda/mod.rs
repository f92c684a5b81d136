//! The CUDA backend: our own kernels (`cuda/*.cu`, compiled by `build.rs`) driven through `cudarc`.
//!
//! Entry point: [`CudaDevice::open`], which first checks that the driver library is present
//! (`cudarc` panics otherwise) and that the kernels were compiled into this build, so callers
//! can fall back to the CPU with a clear message. Kernel modules are looked up by file stem
//! (`gemm` for `cuda/gemm.cu`) with [`CudaDevice::module`]. A Hopper (or newer) device runs the
//! Hopper build ([`KernelArch::Hopper`]): the sm_90a cubin where the file has one and the device
//! is compute capability 9.0, else the compute_90 PTX. A compute capability 8.x device (A100,
//! RTX 30/40, Orin) runs the Ampere build ([`KernelArch::Ampere`]): the files without Hopper-only
//! instructions, compiled for sm_80; the Hopper GEMMs (wgmma, TMA, stream), programmatic
//! dependent launch and the L2 prefetch are then off, and attention variants that need more
//! shared memory than the device has are skipped.

pub mod attention;
pub mod canvas_kv;
pub mod check;
pub mod elementwise;
pub mod env_switch;
pub mod gemm;
pub mod gemm_cluster_split;
pub mod gemm_grouped;
pub mod gemm_mlp;
pub mod gemm_norm;
pub mod gemm_rope;
pub mod gemm_stream;
pub mod gemm_sweep;
pub mod gemm_swiglu;
pub mod gemm_tma;
pub mod kernel_dir;
pub mod launch;
pub mod memory;
pub mod moe;
pub mod nvcc;
pub mod padding;
#[cfg(test)]
mod pipeline_model;
pub mod profile;
pub mod resources;
pub mod rope_layout;
pub mod sampling;
pub mod scratch;
pub mod swiglu_layout;
pub mod transformer;

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use nvcc::Image;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// One kernel file as `build.rs` embeds it.
pub struct EmbeddedModule {
    /// The file stem (`gemm` for `cuda/gemm.cu`).
    pub stem: &'static str,
    /// compute_90 PTX.
    pub ptx: &'static str,
    /// The sm_90a cubin, for files with Hopper-only instructions.
    pub sm90a: Option<&'static [u8]>,
    /// The Ampere build (sm_80 machine code + compute_80 PTX), for files without them.
    pub sm80: Option<&'static [u8]>,
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Device `ordinal` as `dllm info --backend cuda` reports it: its description and SM count, and
/// every kernel asked for but not in use there ([`gemm::Gemm::inactive_reasons`], after the
/// GEMM's load-time self-tests).
pub fn device_report(ordinal: usize) -> Result<(String, Vec<String>)> {
    let dev = CudaDevice::open(ordinal)?;
    let gemm = gemm::Gemm::load(&dev)?;
    let description = format!("{} · {} SMs", dev.describe(), dev.num_sms()?);
    Ok((description, gemm.inactive_reasons(&dev)))
}

/// Whether this build carries compiled CUDA kernels.
pub fn kernels_compiled() -> bool {
    embedded::KERNELS_COMPILED
}

/// Names of the embedded kernel modules.
pub fn module_names() -> Vec<&'static str> {
    embedded::MODULES.iter().map(|m| m.stem).collect()
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
        on("cluster_split_gemm", gemm_cluster_split::requested_by_env()),
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
        on(
            "fused_rope",
            transformer::KernelChoice::from_env().fused_rope,
        ),
        on("norm_fold", transformer::KernelChoice::from_env().norm_fold),
        on(
            "query_last_layer",
            transformer::KernelChoice::from_env().query_last_layer,
        ),
        on(
            "layer_chain",
            transformer::KernelChoice::from_env().layer_chain,
        ),
        ("cache_slots", transformer::cache_slots_from_env().into()),
        on("packed_sessions", transformer::packed_sessions_from_env()),
        (
            "kernel_build",
            (if ampere_requested_by_env() {
                "ampere (DLLM_CUDA_ARCH=80)"
            } else {
                "by compute capability"
            })
            .into(),
        ),
        (
            "key_group_max_units",
            attention::keys_units_override().map_or("SM count".into(), Into::into),
        ),
        ("kernel_dir", kernel_dir::report(&module_names()).into()),
        (
            "stream_gemm_blocks",
            if gemm_stream::auto_blocks_requested() {
                "auto (3/4 of the SMs up to 128 MiB of weights)".into()
            } else {
                gemm_stream::blocks_override().map_or("one per SM".into(), Into::into)
            },
        ),
        // The loaded module's ring depth (a DLLM_KERNEL_DIR build may change it): known once a
        // model is loaded (the bench reports' effective switches).
        ("stream_gemm_stages", "as compiled".into()),
        ("fused_mlp", gemm_mlp::requested_by_env().into()),
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

/// Whether `stream` is capturing a CUDA graph (work queued now is recorded, not run).
pub fn stream_capturing(stream: &CudaStream) -> Result<bool> {
    let status = stream
        .capture_status()
        .map_err(|e| cuda_err("query the stream's capture status", e))?;
    Ok(status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Which build of the kernels a device runs (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelArch {
    /// compute_90 PTX and sm_90a cubins: every kernel.
    Hopper,
    /// The sm_80 fatbins of the files without Hopper-only instructions.
    Ampere,
}

/// Whether `DLLM_CUDA_ARCH=80` asks for the Ampere build on a newer device (to check it there).
pub fn ampere_requested_by_env() -> bool {
    env_switch::count("DLLM_CUDA_ARCH", 80..=80).is_some()
}

/// The kernel build a device of compute capability `capability` (major, minor) runs; the Ampere
/// build on a Hopper when `force_ampere`. Older devices are refused.
pub fn kernel_arch(capability: (i32, i32), force_ampere: bool, name: &str) -> Result<KernelArch> {
    match capability.0 {
        9.. if !force_ampere => Ok(KernelArch::Hopper),
        8.. => Ok(KernelArch::Ampere),
        _ => Err(Error::Unsupported(format!(
            "CUDA device {name} has compute capability {}.{}; dllm's kernels need 8.0 (Ampere) or newer",
            capability.0, capability.1
        ))),
    }
}

/// The image of a kernel file that a device of `capability` running `arch` loads: the sm_90a
/// cubin on compute capability 9.0 where the file has one, else (Hopper build) the compute_90
/// PTX; the Ampere build's fatbin, or `None` when the file has none (Hopper-only instructions).
pub fn module_image(
    arch: KernelArch,
    capability: (i32, i32),
    has_sm90a: bool,
    has_sm80: bool,
) -> Option<Image> {
    match arch {
        KernelArch::Hopper if has_sm90a && capability == (9, 0) => Some(Image::Sm90a),
        KernelArch::Hopper => Some(Image::Ptx90),
        KernelArch::Ampere => has_sm80.then_some(Image::Sm80),
    }
}

/// A CUDA device: context, one non-blocking stream (capturable into CUDA graphs), and the kernel
/// modules loaded so far.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    /// The kernel build it runs ([`kernel_arch`]).
    pub arch: KernelArch,
    pub name: String,
    /// Whether kernels are launched with programmatic dependent launch ([`launch`]).
    pub pdl: bool,
    /// `DLLM_KERNEL_DIR` at open: images loaded instead of the embedded ones ([`kernel_dir`]).
    pub kernel_dir: Option<PathBuf>,
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
        let arch = kernel_arch(capability, ampere_requested_by_env(), &name)?;
        let kernel_dir = kernel_dir::from_env()?;
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            capability,
            arch,
            name,
            // PDL's instructions and launch attribute exist from sm_90.
            pdl: launch::pdl_from_env() && arch == KernelArch::Hopper,
            kernel_dir,
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
        stream_capturing(&self.stream)
    }

    /// A device attribute as a count (negative values read as 0); `what` names it in errors.
    pub fn attribute(
        &self,
        attr: cudarc::driver::sys::CUdevice_attribute,
        what: &str,
    ) -> Result<usize> {
        let v = self
            .ctx
            .attribute(attr)
            .map_err(|e| cuda_err(&format!("query {what}"), e))?;
        Ok(v.max(0) as usize)
    }

    /// Streaming multiprocessors (at least 1).
    pub fn num_sms(&self) -> Result<usize> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        Ok(self
            .attribute(
                A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                "multiprocessor count",
            )?
            .max(1))
    }

    /// Whether the sm_90a cubins run here (the Hopper build on compute capability 9.0): the
    /// wgmma and TMA GEMMs.
    pub fn runs_sm90a(&self) -> bool {
        self.arch == KernelArch::Hopper && self.capability == (9, 0)
    }

    /// "NVIDIA H100 80GB HBM3 (9.0, Hopper build)", for the reasons a kernel is not used.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}.{}, {:?} build)",
            self.name, self.capability.0, self.capability.1, self.arch
        )
    }

    /// The loaded module compiled from `cuda/<stem>.cu`.
    pub fn module(&self, stem: &str) -> Result<Arc<CudaModule>> {
        let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let m = embedded::MODULES
            .iter()
            .find(|m| m.stem == stem)
            .ok_or_else(|| {
                Error::Backend(format!(
                    "kernel module `{stem}` is not embedded in this build"
                ))
            })?;
        if let Some(module) = cache.get(m.stem) {
            return Ok(module.clone());
        }
        let image = module_image(
            self.arch,
            self.capability,
            m.sm90a.is_some(),
            m.sm80.is_some(),
        )
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "kernel module `{stem}` uses Hopper-only instructions (no Ampere build); {} \
                 runs the Ampere build",
                self.name
            ))
        })?;
        let from_dir = match &self.kernel_dir {
            Some(dir) => kernel_dir::read(dir, stem, image)?,
            None => None,
        };
        let source = if from_dir.is_some() {
            "from DLLM_KERNEL_DIR"
        } else {
            "embedded"
        };
        let image = match (image, from_dir) {
            (Image::Ptx90, Some(bytes)) => {
                let text = String::from_utf8(bytes).map_err(|_| {
                    Error::invalid(format!(
                        "kernel image {} is not PTX text",
                        Image::Ptx90.file_name(stem)
                    ))
                })?;
                cudarc::nvrtc::Ptx::from_src(text)
            }
            (_, Some(bytes)) => cudarc::nvrtc::Ptx::from_binary(bytes),
            (Image::Ptx90, None) => cudarc::nvrtc::Ptx::from_src(m.ptx),
            (Image::Sm90a, None) => {
                cudarc::nvrtc::Ptx::from_binary(m.sm90a.map(<[u8]>::to_vec).unwrap_or_default())
            }
            (Image::Sm80, None) => {
                cudarc::nvrtc::Ptx::from_binary(m.sm80.map(<[u8]>::to_vec).unwrap_or_default())
            }
        };
        let module = self
            .ctx
            .load_module(image)
            .map_err(|e| cuda_err(&format!("load module `{stem}` ({source})"), e))?;
        cache.insert(m.stem, module.clone());
        Ok(module)
    }

    /// The `int` constant `symbol` of module `stem` (`DLLM_MODULE_INT` in `cuda/common.cuh`): a
    /// compile-time setting the host reads from the loaded image instead of mirroring it, so an
    /// image built with other defines (`DLLM_KERNEL_DIR`) is launched as it was compiled.
    pub fn module_int(&self, stem: &str, symbol: &str) -> Result<i32> {
        let module = self.module(stem)?;
        let what = format!("module constant `{symbol}` of `{stem}`");
        let view = module
            .get_global(symbol, &self.stream)
            .map_err(|e| cuda_err(&format!("find {what}"), e))?;
        if view.len() != 4 {
            return Err(Error::Backend(format!(
                "{what} has {} bytes, not the 4 of an int",
                view.len()
            )));
        }
        let mut bytes = [0u8; 4];
        self.stream
            .memcpy_dtoh(&view, &mut bytes)
            .map_err(|e| cuda_err(&format!("read {what}"), e))?;
        // cudarc does not synchronize for a plain array destination.
        self.sync()?;
        Ok(i32::from_le_bytes(bytes))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn hopper_and_newer_run_the_hopper_build_ampere_its_own_older_none() {
        for cap in [(9, 0), (10, 0), (12, 0)] {
            assert_eq!(kernel_arch(cap, false, "g").unwrap(), KernelArch::Hopper);
            // DLLM_CUDA_ARCH=80 checks the Ampere build on them.
            assert_eq!(kernel_arch(cap, true, "g").unwrap(), KernelArch::Ampere);
        }
        for cap in [(8, 0), (8, 6), (8, 7), (8, 9)] {
            assert_eq!(kernel_arch(cap, false, "g").unwrap(), KernelArch::Ampere);
        }
        let e = kernel_arch((7, 5), false, "Tesla T4").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.to_string()
                .contains("Tesla T4 has compute capability 7.5"),
            "{e}"
        );
    }

    #[test]
    fn each_device_loads_the_image_its_build_names() {
        use KernelArch::{Ampere, Hopper};
        // The sm_90a cubin only on compute capability 9.0 (sm_90a code runs nowhere else).
        assert_eq!(
            module_image(Hopper, (9, 0), true, false),
            Some(Image::Sm90a)
        );
        assert_eq!(
            module_image(Hopper, (10, 0), true, false),
            Some(Image::Ptx90)
        );
        assert_eq!(
            module_image(Hopper, (9, 0), false, true),
            Some(Image::Ptx90)
        );
        // The Ampere build (also when forced on a Hopper) or nothing.
        assert_eq!(module_image(Ampere, (8, 6), false, true), Some(Image::Sm80));
        assert_eq!(module_image(Ampere, (9, 0), true, true), Some(Image::Sm80));
        assert_eq!(module_image(Ampere, (8, 0), true, false), None);
    }

    #[test]
    fn the_model_kernels_have_an_ampere_build_and_the_hopper_gemms_do_not() {
        if !kernels_compiled() {
            // Without nvcc there is nothing to look at (CI builds with DLLM_REQUIRE_NVCC=1).
            return;
        }
        let ampere = |stem: &str| {
            embedded::MODULES
                .iter()
                .find(|m| m.stem == stem)
                .unwrap_or_else(|| panic!("module {stem} missing"))
                .sm80
                .is_some()
        };
        for stem in ["attention", "elementwise", "gemm", "sampling"] {
            assert!(ampere(stem), "{stem} has no Ampere build");
        }
        for stem in ["gemm_stream", "gemm_tma", "gemm_wgmma"] {
            assert!(!ampere(stem), "{stem} uses sm_90 instructions");
        }
    }
}
