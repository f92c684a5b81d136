//! Choosing a backend and loading a model directory onto it.

use crate::error::Result;
use crate::model::llada::Llada;
use crate::model::Model;
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

/// Loads the model in `dir` on `backend`.
pub fn load_model(dir: &Path, backend: Backend) -> Result<LoadedModel> {
    match backend {
        Backend::Cpu => Ok(LoadedModel {
            model: Arc::new(Llada::load(dir)?),
            note: None,
        }),
        Backend::Cuda | Backend::Auto => {
            let why = crate::backend::cuda::unavailable_reason()
                .unwrap_or_else(|| "the CUDA model is not wired yet".to_string());
            if backend == Backend::Cuda {
                return Err(crate::Error::Backend(format!("--backend cuda: {why}")));
            }
            Ok(LoadedModel {
                model: Arc::new(Llada::load(dir)?),
                note: Some(format!("using the CPU backend: {why}")),
            })
        }
    }
}
