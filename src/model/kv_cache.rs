//! The block K/V cache of Fast-dLLM: every layer's keys and values (after RoPE) for every
//! position of one canvas, refreshed by a full forward and read by span forwards.
//!
//! A *refresh* ([`CacheStep::Refresh`]) is a full forward that also stores each layer's K/V. A
//! *span* forward ([`CacheStep::Span`]) computes only the rows of a position range, writes their
//! fresh K/V into the cache in place, and lets those rows attend to the whole cached sequence.
//! The two Fast-dLLM modes differ only in the span ([`span_for`]):
//! - `prefix`: `[block start .. end of canvas)` — the prefix comes from the cache;
//! - `dual`: `[block start .. block end)` — prefix and suffix come from the cache.
//!
//! For architectures with shifted logits (Dream: position `i` is predicted from hidden state
//! `i − 1`) the span starts one row earlier, so the block's first position has its source row.
//! A *vicinity* ([`span_with_vicinity`], dInfer's vicinity cache update) widens the span by `v`
//! positions on each side (clamped to the canvas), so the K/V next to the block are recomputed
//! every step too.
//!
//! Storage is fp32 (the dtype the CPU attention reads): a span forward right after a refresh
//! then sees exactly the K/V a full forward computes, and the cache costs
//! `2 · n_layers · len · n_kv_heads · head_dim · 4` bytes (LLaDA-8B, 1024 positions: 1 GiB;
//! the tiny model, 256 positions: 6 MiB). A device backend would keep its own copy.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use std::ops::Range;

/// Which cache the denoiser keeps between the steps of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Full forward over the canvas every step (the reference loop).
    #[default]
    None,
    /// Fast-dLLM prefix cache: later steps of a block compute `[block start .. end)`.
    Prefix,
    /// Fast-dLLM dual cache: later steps of a block compute only the block.
    Dual,
}

impl CacheMode {
    /// The CLI spelling (`none`, `prefix`, `dual`).
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Prefix => "prefix",
            CacheMode::Dual => "dual",
        }
    }

    /// Parses the CLI spelling; the error lists the accepted values.
    pub fn from_name(s: &str) -> Result<CacheMode> {
        match s {
            "none" => Ok(CacheMode::None),
            "prefix" => Ok(CacheMode::Prefix),
            "dual" => Ok(CacheMode::Dual),
            _ => Err(Error::invalid(format!(
                "cache mode {s:?}: expected none, prefix or dual"
            ))),
        }
    }
}

/// What one cached forward does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStep {
    /// Full forward over the canvas; every layer's K/V are stored.
    Refresh,
    /// Compute only these rows (absolute positions) against the cache; their K/V are written
    /// into the cache in place. Every query's source row must lie inside.
    Span(Range<usize>),
}

/// The rows a non-refresh step of `mode` computes for a block covering the canvas positions
/// `block` (its lowest to one past its highest position) in a canvas of `len` positions, with
/// the one-row widening of shifted architectures. `None` for [`CacheMode::None`].
pub fn span_for(
    mode: CacheMode,
    block: Range<usize>,
    len: usize,
    shifted: bool,
) -> Option<Range<usize>> {
    let start = if shifted {
        block.start.saturating_sub(1)
    } else {
        block.start
    };
    match mode {
        CacheMode::None => None,
        CacheMode::Prefix => Some(start..len),
        CacheMode::Dual => Some(start..block.end),
    }
}

/// [`span_for`] widened by `vicinity` positions before and after (clamped to the canvas): the
/// rows a cached step recomputes with dInfer's vicinity update. `vicinity` 0 is [`span_for`].
pub fn span_with_vicinity(
    mode: CacheMode,
    block: Range<usize>,
    len: usize,
    shifted: bool,
    vicinity: usize,
) -> Option<Range<usize>> {
    span_for(mode, block, len, shifted)
        .map(|s| s.start.saturating_sub(vicinity)..s.end.saturating_add(vicinity).min(len))
}

/// Per-layer keys and values of one canvas, fp32, row-major `[len, n_kv_heads · head_dim]`.
///
/// The host storage is allocated on the first [`KvCache::write`]: a backend that keeps its
/// cache on the device (CUDA) only uses the cache's identity ([`KvCache::id`]) and fill state,
/// so no host memory is spent there.
#[derive(Debug)]
pub struct KvCache {
    id: u64,
    len: usize,
    width: usize,
    n_layers: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    filled: bool,
}

/// Source of [`KvCache::id`] values.
static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_cache_id() -> u64 {
    NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A clone is another cache: the same host K/V and fill state under a new [`KvCache::id`], so a
/// backend that keeps K/V on the device per id never lets the two share (or overwrite) one
/// device cache; the clone's first cached step on such a backend finds no device K/V of its id
/// and runs as a refresh.
impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            id: next_cache_id(),
            len: self.len,
            width: self.width,
            n_layers: self.n_layers,
            k: self.k.clone(),
            v: self.v.clone(),
            filled: self.filled,
        }
    }
}

impl KvCache {
    /// An empty (not yet refreshed) cache for a canvas of `len` positions of a `cfg` model.
    pub fn new(cfg: &ModelConfig, len: usize) -> KvCache {
        let width = cfg.n_kv_heads * cfg.head_dim();
        KvCache {
            id: next_cache_id(),
            len,
            width,
            n_layers: cfg.n_layers,
            k: Vec::new(),
            v: Vec::new(),
            filled: false,
        }
    }

    /// A process-unique identity (a backend holding one device cache uses it to tell whether
    /// the cache a span step names is the one it holds).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Canvas positions covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache covers no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Floats per position and layer (`n_kv_heads · head_dim`).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Layers held.
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Whether a refresh has stored every position (a span forward needs it).
    pub fn is_filled(&self) -> bool {
        self.filled
    }

    /// Forgets the contents: the next cached forward must be a refresh.
    pub fn invalidate(&mut self) {
        self.filled = false;
    }

    /// Marks the cache as holding every position (after a refresh wrote them all).
    pub(crate) fn mark_filled(&mut self) {
        self.filled = true;
    }

    /// Keys and values of `layer`, every position (empty before the first write).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) => (k, v),
            _ => (&[], &[]),
        }
    }

    /// Overwrites positions `start .. start + rows` of `layer` with `k`/`v` (`rows · width`
    /// floats each). Contract (checked by the callers in this crate): in bounds.
    pub fn write(&mut self, layer: usize, start: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len(), v.len());
        debug_assert_eq!(k.len() % self.width, 0);
        if self.k.is_empty() {
            self.k = vec![vec![0.0; self.len * self.width]; self.n_layers];
            self.v = vec![vec![0.0; self.len * self.width]; self.n_layers];
        }
        let (a, b) = (start * self.width, start * self.width + k.len());
        self.k[layer][a..b].copy_from_slice(k);
        self.v[layer][a..b].copy_from_slice(v);
    }

    /// Checks that this cache fits a canvas of `len` positions of a `cfg` model.
    pub fn check_fits(&self, cfg: &ModelConfig, len: usize) -> Result<()> {
        let width = cfg.n_kv_heads * cfg.head_dim();
        if self.len != len || self.width != width || self.n_layers != cfg.n_layers {
            return Err(Error::invalid(format!(
                "K/V cache of {} positions × {} floats × {} layers does not fit a canvas of {len} \
                 positions of this model ({width} floats × {} layers)",
                self.len, self.width, self.n_layers, cfg.n_layers
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json(&json!({
            "model_type": "llada", "d_model": 8, "n_heads": 2, "n_kv_heads": 1, "n_layers": 3,
            "mlp_hidden_size": 8, "vocab_size": 16, "embedding_size": 16,
            "max_sequence_length": 64, "mask_token_id": 1, "eos_token_id": 0, "pad_token_id": 2
        }))
        .unwrap()
    }

    #[test]
    fn spans_of_each_mode() {
        assert_eq!(span_for(CacheMode::None, 4..8, 12, false), None);
        assert_eq!(span_for(CacheMode::Prefix, 4..8, 12, false), Some(4..12));
        assert_eq!(span_for(CacheMode::Dual, 4..8, 12, false), Some(4..8));
        // Shifted: one row earlier, except at position 0.
        assert_eq!(span_for(CacheMode::Prefix, 4..8, 12, true), Some(3..12));
        assert_eq!(span_for(CacheMode::Dual, 4..8, 12, true), Some(3..8));
        assert_eq!(span_for(CacheMode::Dual, 0..8, 12, true), Some(0..8));
    }

    #[test]
    fn a_vicinity_widens_the_span_within_the_canvas() {
        use CacheMode::*;
        // A block 8..16 of a 40-position canvas.
        assert_eq!(span_with_vicinity(Dual, 8..16, 40, false, 0), Some(8..16));
        assert_eq!(span_with_vicinity(Dual, 8..16, 40, false, 4), Some(4..20));
        assert_eq!(span_with_vicinity(Dual, 8..16, 40, true, 4), Some(3..20));
        assert_eq!(span_with_vicinity(Dual, 8..16, 40, false, 30), Some(0..40));
        assert_eq!(
            span_with_vicinity(Dual, 8..16, 40, false, usize::MAX),
            Some(0..40)
        );
        assert_eq!(span_with_vicinity(Prefix, 8..16, 40, false, 4), Some(4..40));
        assert_eq!(span_with_vicinity(None, 8..16, 40, false, 4), Option::None);
    }

    #[test]
    fn a_clone_is_another_cache_with_the_same_contents() {
        let c = cfg();
        let mut kv = KvCache::new(&c, 5);
        let k: Vec<f32> = (0..4).map(|i| i as f32 + 0.5).collect();
        kv.write(2, 3, &k, &k);
        kv.mark_filled();
        let copy = kv.clone();
        // Its own identity (a device cache keyed by it is not shared) ...
        assert_ne!(copy.id(), kv.id());
        assert_ne!(copy.clone().id(), copy.id());
        // ... with the same K/V, size and fill state.
        assert!(copy.is_filled());
        assert_eq!(copy.layer(2), kv.layer(2));
        assert_eq!((copy.len(), copy.width(), copy.n_layers()), (5, 4, 3));
    }

    #[test]
    fn writes_land_at_their_rows_and_fit_is_checked() {
        let c = cfg();
        let mut kv = KvCache::new(&c, 5);
        assert_eq!((kv.len(), kv.width(), kv.n_layers()), (5, 4, 3));
        assert!(!kv.is_filled());
        let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
        kv.write(1, 2, &k, &v);
        let (lk, lv) = kv.layer(1);
        assert!(lk[..8].iter().all(|&x| x == 0.0));
        assert_eq!(&lk[8..16], k.as_slice());
        assert_eq!(&lv[8..16], v.as_slice());
        assert!(lk[16..].iter().all(|&x| x == 0.0));
        assert!(kv.layer(0).0.iter().all(|&x| x == 0.0));
        assert!(kv.check_fits(&c, 5).is_ok());
        let e = kv.check_fits(&c, 6).unwrap_err().to_string();
        assert!(e.contains("5 positions") && e.contains("6"), "{e}");
        kv.mark_filled();
        assert!(kv.is_filled());
        kv.invalidate();
        assert!(!kv.is_filled());
    }

    #[test]
    fn mode_names_round_trip() {
        for m in [CacheMode::None, CacheMode::Prefix, CacheMode::Dual] {
            assert_eq!(CacheMode::from_name(m.name()).unwrap(), m);
        }
        let e = CacheMode::from_name("full").unwrap_err().to_string();
        assert!(e.contains("none, prefix or dual"), "{e}");
    }
}
