//! Models: map a canvas of token ids to per-position logits.
//!
//! A [`Model`] knows nothing about schedules; the denoiser ([`crate::denoise`]) drives it.
//! [`Model::predict`] is the hook that lets a backend fuse sampling with the forward pass
//! (the CUDA backend returns only the chosen ids and confidences, never the logits); its
//! default runs [`Model::forward`] and samples on the host.

pub mod llada;
pub mod load;

pub use load::{load_model, Backend, LoadedModel};

use crate::config::ModelConfig;
use crate::denoise::predict::{predict_rows, Prediction, PredictRule};
use crate::error::Result;

/// A loaded model on some backend.
pub trait Model: Send + Sync {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;

    /// Short backend name for diagnostics ("cpu", "cuda").
    fn backend_name(&self) -> &'static str;

    /// One full forward over `ids` (a single canvas, bidirectional attention).
    /// Returns `ids.len() × config().logits_width()` logits, row `i` = output at position `i`.
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>>;

    /// One forward, then for each position in `queries` the candidate token and its confidence
    /// under `rule`. Backends may override this to sample without materialising logits on the host.
    fn predict(&self, ids: &[u32], queries: &[usize], rule: &PredictRule) -> Result<Vec<Prediction>> {
        let logits = self.forward(ids)?;
        Ok(predict_rows(&logits, self.config().logits_width(), queries, queries, rule))
    }
}
