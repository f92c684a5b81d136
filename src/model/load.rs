//! Choosing a backend and loading a model directory onto it.
//!
//! `Auto` takes CUDA when the driver library is present, the kernels were compiled and the
//! model loads on device 0; otherwise it falls back to the CPU and says why in
//! [`LoadedModel::note`]. `Cuda` never falls back: its failure is the error.

use crate::backend::cuda::{llada::LladaCuda, unavailable_reason};
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

fn cpu(dir: &Path, note: Option<String>) -> Result<LoadedModel> {
    Ok(LoadedModel {
        model: Arc::new(Llada::load(dir)?),
        note,
    })
}

/// Loads the model in `dir` on `backend`.
pub fn load_model(dir: &Path, backend: Backend) -> Result<LoadedModel> {
    match backend {
        Backend::Cpu => cpu(dir, None),
        Backend::Cuda => {
            if let Some(why) = unavailable_reason() {
                return Err(crate::Error::Backend(format!("--backend cuda: {why}")));
            }
            Ok(LoadedModel {
                model: Arc::new(LladaCuda::load(dir)?),
                note: None,
            })
        }
        Backend::Auto => match unavailable_reason() {
            Some(why) => cpu(dir, Some(format!("using the CPU backend: {why}"))),
            None => match LladaCuda::load(dir) {
                Ok(m) => Ok(LoadedModel {
                    model: Arc::new(m),
                    note: None,
                }),
                // A malformed model is the user's error on every backend: report it, do not mask it.
                Err(e) if matches!(e.kind(), crate::error::ErrorKind::Format | crate::error::ErrorKind::Io) => Err(e),
                Err(e) => cpu(dir, Some(format!("using the CPU backend: CUDA failed: {e}"))),
            },
        },
    }
}
