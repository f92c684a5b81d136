//! Models: map a canvas of token ids to per-position logits.
//!
//! A [`Model`] knows nothing about schedules; the denoiser ([`crate::denoise`]) drives it.
//! [`Model::predict`] is the hook that lets a backend fuse sampling with the forward pass
//! (the CUDA backend returns only the chosen ids and confidences, never the logits); its
//! default runs [`Model::forward`] and samples on the host.
//!
//! Architectures: [`llada`], [`dream`] and [`llada_moe`], all the pre-norm transformer of
//! [`transformer`] under different tensor names ([`tensor_table`]); LLaDA-MoE's feed-forward is
//! a mixture of experts ([`experts`]).

pub mod dream;
pub mod experts;
pub mod kv_cache;
pub mod llada;
pub mod llada_moe;
pub mod load;
pub mod transformer;

pub use kv_cache::{CacheMode, CacheStep, KvCache};
pub use load::{
    load_cpu, load_cpu_with, load_model, load_model_with, Backend, CpuOptions, LoadedModel,
};

use crate::config::{Arch, ModelConfig};
use crate::denoise::predict::{predict_query_rows, predict_rows, PredictRule, Prediction};
use crate::error::Result;

/// A loaded model on some backend.
pub trait Model: Send + Sync {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;

    /// Short backend name for diagnostics ("cpu", "cuda").
    fn backend_name(&self) -> &'static str;

    /// One full forward over `ids` (a single canvas, bidirectional attention).
    /// Returns `ids.len() × config().logits_width()` logits; row `i` is the prediction for
    /// position `i`. For architectures with [`ModelConfig::shifted_logits`] (Dream) that is the
    /// LM-head output at position `max(i − 1, 0)`; otherwise the output at `i`.
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>>;

    /// Like [`forward`](Self::forward), but row `i` is always the LM-head output at position
    /// `i`, with no shift (what the reference PyTorch `model(ids).logits` returns; `dllm logits`
    /// prints these). The default is [`forward`](Self::forward), correct for unshifted
    /// architectures; a model of a shifted architecture must override it.
    fn raw_forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.forward(ids)
    }

    /// One forward, then the logits that predict each of `positions` (any order, repeats
    /// allowed): `positions.len() × config().logits_width()`, row `i` the row
    /// [`forward`](Self::forward) gives position `positions[i]`. What the host-side predictions
    /// need (filters, guidance, constraints, self-correction) without the rest of the canvas's
    /// LM head or its download. The default runs [`forward`](Self::forward) and keeps those rows;
    /// backends override it to compute only them.
    ///
    /// Errors ([`crate::error::Error::InvalidArgument`]): a position outside the canvas.
    fn logits_at(&self, ids: &[u32], positions: &[usize]) -> Result<Vec<f32>> {
        check_queries(positions, ids.len())?;
        let width = self.config().logits_width();
        let all = self.forward(ids)?;
        let mut out = Vec::with_capacity(positions.len() * width);
        for &p in positions {
            out.extend_from_slice(&all[p * width..(p + 1) * width]);
        }
        Ok(out)
    }

    /// One forward, then for each position in `queries` the candidate token and its confidence
    /// under `rule`. Backends may override this to sample without materialising logits on the host.
    fn predict(
        &self,
        ids: &[u32],
        queries: &[usize],
        rule: &PredictRule,
    ) -> Result<Vec<Prediction>> {
        let logits = self.forward(ids)?;
        Ok(predict_rows(
            &logits,
            self.config().logits_width(),
            queries,
            queries,
            rule,
        ))
    }

    /// Whether [`logits_cached`](Self::logits_cached) and
    /// [`predict_cached`](Self::predict_cached) use the K/V cache. The defaults ignore it (full
    /// forwards, exact but not faster); the denoiser refuses a cache mode on such a model.
    fn supports_kv_cache(&self) -> bool {
        false
    }

    /// Logits of `queries` (row `i` predicts position `queries[i]`, `queries.len() ×
    /// logits_width()`), computed as `step` says against `cache` (see [`kv_cache`]): a refresh
    /// runs the full forward and stores every layer's K/V; a span computes only its rows against
    /// the cache and writes their K/V. The default ignores the cache and runs
    /// [`forward`](Self::forward).
    fn logits_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &mut KvCache,
        step: &CacheStep,
    ) -> Result<Vec<f32>> {
        let _ = (cache, step);
        check_queries(queries, ids.len())?;
        let logits = self.forward(ids)?;
        let w = self.config().logits_width();
        let mut out = Vec::with_capacity(queries.len() * w);
        for &q in queries {
            out.extend_from_slice(&logits[q * w..(q + 1) * w]);
        }
        Ok(out)
    }

    /// [`predict`](Self::predict) through the cache: [`logits_cached`](Self::logits_cached), then
    /// each query's row predicted on the host (with the default `logits_cached`, the full
    /// forward's rows). Backends may override this to sample on the device.
    fn predict_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        rule: &PredictRule,
        cache: &mut KvCache,
        step: &CacheStep,
    ) -> Result<Vec<Prediction>> {
        let logits = self.logits_cached(ids, queries, cache, step)?;
        Ok(predict_query_rows(
            &logits,
            self.config().logits_width(),
            queries,
            rule,
        ))
    }

    /// Whether [`predict_cached_batch`](Self::predict_cached_batch) packs its span steps into
    /// one forward (so the denoiser batches cached sessions in lockstep rather than running
    /// them one after another). The default runs them one by one: false.
    fn packs_cached_batches(&self) -> bool {
        false
    }

    /// [`predict_cached`](Self::predict_cached) for several canvases, each with its own cache
    /// and step. A backend that packs ([`packs_cached_batches`](Self::packs_cached_batches))
    /// runs the span steps' rows through one forward (every weight read once for all of them,
    /// attention per canvas against its own cache); the results are those of calling
    /// [`predict_cached`](Self::predict_cached) on each, up to the float summation order of the
    /// packed products. A packing backend checks every item before it touches any cache. On
    /// error, the caches of the items that did not complete must be refreshed before their
    /// next span step. The default runs them one by one (so an item's error comes after the
    /// earlier items' steps).
    fn predict_cached_batch(&self, items: &mut [CachedQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
        predict_cached_each(self, items)
    }

    /// [`predict`](Self::predict) for several canvases at once (a batch; canvases may differ in
    /// length). Backends may pack them into one forward (the CPU backend stacks the canvases'
    /// rows, the CUDA backend pads them to a common length; every weight is streamed once for
    /// the whole batch); the results are those of calling [`predict`](Self::predict) on each.
    /// The default runs them one by one.
    fn predict_batch(&self, items: &[BatchQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
        items
            .iter()
            .map(|it| self.predict(it.ids, it.queries, it.rule))
            .collect()
    }
}

/// [`Model::predict_cached`] on each of `items` in turn (the default
/// [`Model::predict_cached_batch`], and a packing backend's when packing is off).
pub fn predict_cached_each<M: Model + ?Sized>(
    model: &M,
    items: &mut [CachedQuery<'_>],
) -> Result<Vec<Vec<Prediction>>> {
    items
        .iter_mut()
        .map(|it| model.predict_cached(it.ids, it.queries, it.rule, it.cache, &it.step))
        .collect()
}

/// Checks that every query position lies inside a canvas of `len` positions.
pub fn check_queries(queries: &[usize], len: usize) -> Result<()> {
    match queries.iter().find(|&&q| q >= len) {
        Some(&q) => Err(crate::error::Error::invalid(format!(
            "query position {q} is outside the canvas of {len}"
        ))),
        None => Ok(()),
    }
}

/// Checks a canvas before any compute: not empty, at most the model's `max_sequence_length`
/// ids, every id a row of the embedding.
pub fn check_ids(cfg: &ModelConfig, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Err(crate::error::Error::invalid("empty token sequence"));
    }
    if ids.len() > cfg.max_seq_len {
        return Err(crate::error::Error::invalid(format!(
            "sequence of {} tokens is longer than the model's {} {}",
            ids.len(),
            cfg.arch.config_key("max_sequence_length"),
            cfg.max_seq_len
        )));
    }
    if let Some((pos, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= cfg.embedding_size)
    {
        return Err(crate::error::Error::invalid(format!(
            "token id {id} at position {pos} is outside the embedding ({} rows)",
            cfg.embedding_size
        )));
    }
    Ok(())
}

/// One canvas of a [`Model::predict_batch`] call: its ids, the positions to predict, the rule.
#[derive(Debug, Clone, Copy)]
pub struct BatchQuery<'a> {
    pub ids: &'a [u32],
    pub queries: &'a [usize],
    pub rule: &'a PredictRule,
}

/// One canvas of a [`Model::predict_cached_batch`] call: a [`BatchQuery`] with its K/V cache
/// and what the step does with it.
#[derive(Debug)]
pub struct CachedQuery<'a> {
    pub ids: &'a [u32],
    pub queries: &'a [usize],
    pub rule: &'a PredictRule,
    pub cache: &'a mut KvCache,
    pub step: CacheStep,
}

/// The tensor names of a checkpoint of `cfg`'s architecture.
pub fn tensor_table(cfg: &ModelConfig) -> transformer::TensorTable {
    match cfg.arch {
        Arch::Llada => llada::layout::table(cfg),
        Arch::Dream => dream::layout::table(cfg),
        Arch::LladaMoe => llada_moe::table(cfg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canvases_are_checked_for_length_and_ids() {
        let cfg = ModelConfig::from_json(&json!({
            "model_type": "llada", "d_model": 8, "n_heads": 2, "n_kv_heads": 1, "n_layers": 1,
            "mlp_hidden_size": 8, "vocab_size": 16, "embedding_size": 20,
            "max_sequence_length": 4, "mask_token_id": 1, "eos_token_id": 0, "pad_token_id": 2
        }))
        .unwrap();
        assert!(check_ids(&cfg, &[0, 19, 3, 3]).is_ok());
        let msg = |ids: &[u32]| check_ids(&cfg, ids).unwrap_err().to_string();
        assert!(msg(&[]).contains("empty"));
        assert!(msg(&[0; 5]).contains("5 tokens"));
        let m = msg(&[0, 3, 20]);
        assert!(
            m.contains("token id 20 at position 2") && m.contains("20 rows"),
            "{m}"
        );
    }
}
