//! Choosing a backend and loading a model directory onto it, by architecture.
//!
//! `Auto` takes CUDA when the driver library is present, the kernels were compiled, the
//! architecture has a CUDA model (LLaDA, Dream and LLaDA-MoE all run on [`CudaTransformer`];
//! a mixture beyond the CUDA kernels' limits has none) and the model loads on device 0;
//! otherwise it falls back to the CPU and says why in [`LoadedModel::note`]. `Cuda` never falls
//! back: its failure (an unsupported architecture included) is the error.

use crate::backend::cuda::{transformer::CudaTransformer, unavailable_reason};
use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::model::dream::Dream;
use crate::model::llada::Llada;
use crate::model::llada_moe::LladaMoe;
use crate::model::Model;
use crate::weights::WeightStore;
use std::path::Path;
use std::sync::Arc;

/// Which backend to load a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CUDA when a device and compiled kernels exist, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// A loaded model, plus a note when the requested backend was not used.
pub struct LoadedModel {
    pub model: Arc<dyn Model>,
    pub note: Option<String>,
}

/// Options of a CPU model beyond its files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// bf16 activations in the products
    /// ([`crate::model::transformer::CpuTransformer::set_bf16_activations`]); `None`: as the
    /// `DLLM_CPU_BF16` switch says (off unless it is `1`).
    pub bf16_activations: Option<bool>,
}

impl CpuOptions {
    /// Whether these options ask for bf16 activations (`None`: the `DLLM_CPU_BF16` switch), and
    /// the CPU has AVX-512 BF16 to give them.
    pub fn bf16_on(&self) -> bool {
        self.bf16_activations
            .unwrap_or_else(crate::model::transformer::bf16_activations_from_env)
            && crate::backend::cpu::skinny_bf16_available()
    }
}

/// Loads the model in `dir` on the CPU, whatever its architecture.
pub fn load_cpu(dir: &Path) -> Result<Arc<dyn Model>> {
    load_cpu_with(dir, CpuOptions::default())
}

/// [`load_cpu`] with `options`.
pub fn load_cpu_with(dir: &Path, options: CpuOptions) -> Result<Arc<dyn Model>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(dir)?;
    let bf16 = options.bf16_activations;
    Ok(match cfg.arch {
        Arch::Llada => Arc::new(Llada::from_store(cfg, store)?.with_bf16_activations(bf16)),
        Arch::Dream => Arc::new(Dream::from_store(cfg, store)?.with_bf16_activations(bf16)),
        Arch::LladaMoe => Arc::new(LladaMoe::from_store(cfg, store)?.with_bf16_activations(bf16)),
    })
}

/// Loads the model in `dir` on `backend`.
pub fn load_model(dir: &Path, backend: Backend) -> Result<LoadedModel> {
    load_model_with(dir, backend, CpuOptions::default())
}

/// [`load_model`], with `cpu` for a model that ends up on the CPU.
pub fn load_model_with(
    dir: &Path,
    backend: Backend,
    cpu_options: CpuOptions,
) -> Result<LoadedModel> {
    let cpu = |dir: &Path, note: Option<String>| {
        Ok(LoadedModel {
            model: load_cpu_with(dir, cpu_options)?,
            note,
        })
    };
    if backend == Backend::Cpu {
        return cpu(dir, None);
    }
    // Read (and validate) the config first: a malformed model is reported as such on every backend.
    ModelConfig::from_file(&dir.join("config.json"))?;
    match backend {
        Backend::Cpu => cpu(dir, None),
        Backend::Cuda => {
            if let Some(why) = unavailable_reason() {
                return Err(Error::Backend(format!("--backend cuda: {why}")));
            }
            Ok(LoadedModel {
                model: Arc::new(CudaTransformer::load(dir)?),
                note: None,
            })
        }
        Backend::Auto => match unavailable_reason() {
            Some(why) => cpu(dir, Some(format!("using the CPU backend: {why}"))),
            None => match CudaTransformer::load(dir) {
                Ok(m) => Ok(LoadedModel {
                    model: Arc::new(m),
                    note: None,
                }),
                // A malformed model is the user's error on every backend: report it, do not mask it.
                Err(e)
                    if matches!(
                        e.kind(),
                        crate::error::ErrorKind::Format | crate::error::ErrorKind::Io
                    ) =>
                {
                    Err(e)
                }
                Err(e) => cpu(
                    dir,
                    Some(format!("using the CPU backend: CUDA failed: {e}")),
                ),
            },
        },
    }
}
