//! The pre-norm SwiGLU transformer (LLaDA, Dream and LLaDA-MoE) on the GPU: weights uploaded
//! once as bf16, a batch of canvases resident on the device, full-canvas and block (Fast-dLLM
//! dual cache) forwards, the LM head run only for query rows, and on-GPU sampling and commit.
//!
//! Architectures differ only in tensor names ([`crate::model::tensor_table`]), q/k/v biases
//! (Dream; added to q, k and v by the fused RoPE kernel), q/k head norms and a mixture of
//! experts for the MLP (LLaDA-MoE: `rmsnorm_heads` between the QKV GEMM and RoPE, and
//! [`super::moe`]'s router, routing, grouped expert GEMMs and combine; never the RoPE epilogue,
//! the norm fold, the fused MLP or the layer chain) and shifted logits (Dream: position `p`
//! is predicted by the LM-head output at `max(p − 1, 0)`, [`CudaTransformer::forward`] rows
//! follow [`crate::model::Model::forward`]'s contract; a block forward then starts one position
//! before the block so the block's first position has its source row).
//!
//! Layer `l` of a forward over rows `r = b·L + i` (canvas `b`, position `start + i`):
//! `x` (fp32 residual) → RMSNorm → bf16 → fused QKV GEMM (`[q|k|v]` weight `[d + 2·kv, d]`) →
//! RoPE on q and k → attention → `attn_out` GEMM added into `x` → RMSNorm → fused gate|up GEMM
//! (`[2h, d]`) → SwiGLU → `ff_out` GEMM added into `x`. The head gathers the query rows of `x`,
//! applies `ln_f` and the LM head GEMM (fp32 logits) in chunks of [`HEAD_CHUNK_ROWS`] rows, then
//! the sampling kernel turns each row into a token and a confidence.
//!
//! K/V cache: per layer `[batch, seq_cap, kv_dim]` bf16. A full forward with `store_cache`
//! writes every position's K (after RoPE) and V; a block forward over `[start, start + len)`
//! writes its fresh K/V at those positions and attends to the whole cached sequence. RoPE and
//! the cache write are one fused kernel (`rope_qkv`).
//!
//! Batches ([`Model::predict_batch`]): canvases of different lengths are padded to the longest
//! length `L` of a sub-batch ([`padding`]) and run as one full forward over `batch × L` rows;
//! a per-canvas length buffer (`kv_len`) makes attention skip the padding keys, so each
//! canvas's rows see exactly its own keys. Only this padded forward passes the lengths; every
//! other forward, and every captured graph, attends as before.
//!
//! CUDA graphs (`graphs`): the steady-state dual-cache block step ([`CudaTransformer::step`]
//! with `use_cache`: every layer over the block rows, `ln_f` + LM head on them, sampling and
//! commit) and the no-cache step (the same over a full forward) are captured once per (kind,
//! batch, canvas length, block start, forward rows, k) and replayed afterwards, when the
//! prediction rule does not depend on the step index (temperature 0, low-confidence remasking:
//! the greedy default). The dual cache's refresh (a full forward that stores the K/V) runs once
//! per block, so it stays eager. A graph bakes in buffer addresses, so each (batch, canvas
//! length, forward rows) shape owns its own GEMM and sampler instances (their split-K / partial
//! scratch is sized by one eager warm-up step of that shape and never grows afterwards), the
//! graphs live in the step buffers' `State` and die with them, and the query rows are uploaded
//! before the replay. `DLLM_CUDA_GRAPH=0` (or [`CudaTransformer::set_graphs`]) runs every step
//! eagerly. The Session path's cached forwards keep their K/V in per-cache `slots`.
//!
//! Setting `DLLM_CUDA_SAFE=1` runs the reference (naive) GEMM and attention kernels instead of
//! the fast ones, so a wrong fast kernel can be told apart from a wrong model.

use super::attention::{Attention, AttnShape, AttnVariant};
use super::canvas_kv::CanvasKv;
use super::elementwise::{Elementwise, IdLayout, KvDst, RopeDst, RopeQkvShape};
use super::gemm::{Gemm, GemmOut, GemmVariant, MlpInput, MlpOutJob, MlpQkvJob};
use super::gemm_norm::{NormFold, NormPrep};
use super::gemm_rope::{RopeArgs, RopeTable};
use super::memory::{self, StepBuffers};
use super::moe::{ExpertWeights, Moe, MoeBuffers, MoeShape};
use super::padding;
use super::profile::{OpProfiler, OpTime};
use super::rope_layout;
use super::sampling::{commit_record_len, parse_commit_record, CommitRule, Sampler};
use super::swiglu_layout;
use super::{cuda_err, CudaDevice};
use crate::backend::cpu::rope_inv_freq;
use crate::config::ModelConfig;
use crate::denoise::predict::{PredictRule, Prediction};
use crate::error::{Error, Result};
use crate::model::kv_cache::{CacheStep, KvCache};
use crate::model::{check_ids, check_queries, BatchQuery, Model};
use crate::weights::{DType, TensorView, WeightStore};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};
use std::collections::HashMap;
use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

mod fold_plan;
mod graphs;
mod model_impl;
mod narrow;
mod narrow_check;
mod packed;
mod packed_check;
mod slots;
mod upload;
use fold_plan::FoldPlan;
pub use graphs::{graphs_from_env, session_graphs_from_env};
use graphs::{rule_is_step_free, GraphSet, ShapeKey, StepKind};
use narrow::LastLayerRows;
pub use narrow_check::query_last_layer_checks;
pub use packed::packed_sessions_from_env;
pub use packed_check::packed_session_checks;
pub use slots::cache_slots_from_env;
use slots::{slot_of, CacheSlot, SlotPolicy};
use upload::{qk_rows, upload_f32, upload_ffn, upload_qkv_grouped, upload_stacked};

/// Query rows per LM-head chunk (bounds the fp32 logits buffer: rows × embedding_size × 4 B).
pub const HEAD_CHUNK_ROWS: usize = 256;
/// Elements converted per host-side staging chunk during weight upload.
const UPLOAD_CHUNK: usize = 1 << 24;

/// Most rows (canvases × padded length) one padded forward of
/// [`Model::predict_batch`] covers; a larger batch is split into several padded forwards. At
/// 4096 rows every GEMM of an 8B model is well past the weight-streaming regime, so more rows
/// per forward would only grow the step buffers (and the K/V cache allocated with them).
pub const MAX_BATCH_ROWS: usize = 4096;

/// Most positions of the RoPE epilogue's table (16 MB at head_dim 128); longer canvases rotate
/// with `rope_qkv` past the GEMM.
const ROPE_TABLE_POSITIONS: usize = 32_768;

/// The id written into the padding of a padded batch (any valid id: padding keys are masked
/// out of attention and padding rows are never queried).
const PAD_ID: u32 = 0;

/// Which kernels the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelChoice {
    /// Reference GEMM kernel (`gemm_naive`) instead of the fast ones.
    pub naive_gemm: bool,
    /// Reference attention kernel instead of the tensor-core one.
    pub naive_attention: bool,
    /// SwiGLU fused into the gate/up GEMM's epilogue (gate and up rows interleaved at upload,
    /// [`super::swiglu_layout`]); needs the fast GEMMs and an MLP width divisible by 8, else
    /// the separate SwiGLU kernel runs. On unless `DLLM_FUSED_SWIGLU=0`: verified on an H200
    /// (2026-11-28, every GEMM and model check with it; b1 dual-cache +1.4 %, b8 +3.0 %, b1
    /// uncached +3.2 % tok/s, docs/perf.md "Session 9").
    pub fused_swiglu: bool,
    /// Block forwards request each layer's attention-output weights into L2 while RoPE and
    /// attention run (HBM otherwise idle then), so the weight-streaming GEMM after them reads
    /// L2: `DLLM_L2_PREFETCH=1` (opt-in: 1.5 % slower on the b1 block step on an H200, session 9).
    pub l2_prefetch: bool,
    /// RoPE and the K/V cache write in the QKV GEMM's epilogue (q and k rows uploaded in the
    /// grouped order of [`super::rope_layout`], [`super::gemm_rope`]); where the GEMM that runs
    /// cannot, `rope_qkv` rotates the grouped layout. `DLLM_FUSED_ROPE=1` (opt-in: session 10,
    /// not yet run on a GPU); needs the fast GEMMs and a head size divisible by 16. Where the
    /// epilogue runs, `l2_prefetch` (a hint `rope_qkv` carries) does not.
    pub fused_rope: bool,
    /// The RMSNorm inside each layer folded into the GEMMs around it ([`super::gemm_norm`]: the
    /// residual-adding GEMM writes `x ⊙ γ` and per-row partial sums of squares, the next GEMM
    /// scales its rows): `DLLM_NORM_FOLD=1` (opt-in: session 11, not yet run on a GPU). Where
    /// either GEMM of a pair runs on a kernel without it, that norm stays a kernel.
    pub norm_fold: bool,
    /// The last layer of a full step (no-cache steps, dual-cache refreshes) runs its queries,
    /// attention output and MLP only for the rows the step predicts (`transformer::narrow`; keys and
    /// values still for every row): `DLLM_QUERY_LAST_LAYER=1` (opt-in: session 12, not yet run
    /// on a GPU).
    pub query_last_layer: bool,
    /// The layer chain: with the layer tail (`DLLM_FUSED_MLP=1`), the fold and the RoPE epilogue,
    /// each layer's tail launch also runs the next layer's QKV projection (a fourth stream job,
    /// [`super::gemm::MlpQkvJob`]), so a batch-1 block step runs two launches per layer:
    /// `DLLM_LAYER_CHAIN=1` (opt-in: session 13, not yet run on a GPU).
    pub layer_chain: bool,
}

impl KernelChoice {
    /// The fast kernels, the SwiGLU fused unless `DLLM_FUSED_SWIGLU=0`.
    pub fn fast() -> Self {
        KernelChoice {
            naive_gemm: false,
            naive_attention: false,
            fused_swiglu: super::env_switch::flag("DLLM_FUSED_SWIGLU", true),
            l2_prefetch: super::env_switch::flag("DLLM_L2_PREFETCH", false),
            fused_rope: super::env_switch::flag("DLLM_FUSED_ROPE", false),
            norm_fold: super::env_switch::flag("DLLM_NORM_FOLD", false),
            query_last_layer: super::env_switch::flag("DLLM_QUERY_LAST_LAYER", false),
            layer_chain: super::env_switch::flag("DLLM_LAYER_CHAIN", false),
        }
    }

    /// The reference GEMM and attention kernels (and the separate SwiGLU).
    pub fn reference() -> Self {
        KernelChoice {
            naive_gemm: true,
            naive_attention: true,
            fused_swiglu: false,
            l2_prefetch: false,
            fused_rope: false,
            norm_fold: false,
            query_last_layer: false,
            layer_chain: false,
        }
    }

    /// [`KernelChoice::fast`] unless `DLLM_CUDA_SAFE=1` asks for [`KernelChoice::reference`].
    pub fn from_env() -> Self {
        if super::env_switch::explicitly_on("DLLM_CUDA_SAFE") {
            KernelChoice::reference()
        } else {
            KernelChoice::fast()
        }
    }
}

/// The kernel families that keep per-instance device scratch (split-K workspace, sampling
/// partials). A captured graph bakes in their scratch addresses, so graphs use their own
/// instance per shape (see [`GraphSet`]) and the eager path uses the model's.
struct Kit {
    gemm: Gemm,
    sampler: Sampler,
}

impl Kit {
    fn load(dev: &CudaDevice) -> Result<Kit> {
        Ok(Kit {
            gemm: Gemm::load(dev)?,
            sampler: Sampler::load(dev)?,
        })
    }
}

/// Which device K/V cache a forward reads and writes: the main one (`batch_cap` canvases, the
/// device-resident step API of [`CudaTransformer::step`]), a Session cache's slot
/// ([`CacheSlot`], one canvas), or each canvas's own slot ([`State::canvas_kv`], the packed
/// cached steps of [`Model::predict_cached_batch`]: span forwards, and full forwards that store
/// the K/V).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum KvSel {
    Main,
    Slot(usize),
    Canvases,
}

struct LayerWeights {
    /// `[q_dim + 2·kv_dim, d]`: q_proj, k_proj, v_proj stacked.
    qkv: CudaSlice<u16>,
    /// `[q_dim + 2·kv_dim]` fp32 q/k/v biases (Dream), added by the fused RoPE kernel.
    qkv_bias: Option<CudaSlice<f32>>,
    /// `[d, d]`.
    attn_out: CudaSlice<u16>,
    ffn: LayerFfn,
    attn_norm: CudaSlice<f32>,
    ff_norm: CudaSlice<f32>,
    /// The RMSNorms of each q and each k head (`[head_dim]` f32 each; LLaDA-MoE), applied
    /// before RoPE.
    qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

/// A layer's feed-forward weights.
enum LayerFfn {
    Dense {
        /// `[2h, d]`: ff_proj (gate) then up_proj (interleaved for the fused SwiGLU).
        gate_up: CudaSlice<u16>,
        /// `[d, h]`.
        ff_out: CudaSlice<u16>,
    },
    /// A mixture of experts ([`super::moe`]).
    Experts(ExpertWeights),
}

struct Weights {
    wte: CudaSlice<u16>,
    layers: Vec<LayerWeights>,
    ln_f: CudaSlice<f32>,
    /// `None` when the head is tied to `wte`.
    head: Option<CudaSlice<u16>>,
    bytes: usize,
}

/// Device buffers of one model instance, sized for `batch_cap × seq_cap` rows.
struct State {
    batch_cap: usize,
    seq_cap: usize,
    /// Current canvases: `batch` canvases of `seq` tokens in `canvas` (`[batch, seq]`, i32).
    batch: usize,
    seq: usize,
    canvas: CudaSlice<i32>,
    x: CudaSlice<f32>,
    xn: CudaSlice<u16>,
    /// The norm fold ([`KernelChoice::norm_fold`]): `x ⊙ γ` of the attention norm (written by
    /// the down projection, read by the next layer's QKV; the MLP norm's goes to `xn`), and the
    /// partial sums of squares behind each (`[rows, d_model / 32]`).
    xa: CudaSlice<u16>,
    sq_attn: CudaSlice<f32>,
    sq_ff: CudaSlice<f32>,
    qkv: CudaSlice<u16>,
    attn: CudaSlice<u16>,
    gu: CudaSlice<u16>,
    act: CudaSlice<u16>,
    /// The main K/V cache (`batch_cap · seq_cap` rows per layer), allocated by the first forward
    /// that writes it (the device-resident step API; Session caches use [`CacheSlot`]s).
    k_cache: Vec<CudaSlice<u16>>,
    v_cache: Vec<CudaSlice<u16>>,
    /// Whether the cache holds K/V of every position of the current canvases.
    cache_valid: bool,
    /// The Session caches' own device K/V ([`CacheSlot`]); the main cache above serves the
    /// device-resident step API only.
    slots: Vec<CacheSlot>,
    /// Counts slot uses (the order of [`CacheSlot::last_use`]).
    slot_clock: u64,
    /// The slots of the canvases of a packed cached step, while it runs ([`KvSel::Canvases`]).
    canvas_kv: Option<CanvasKv>,
    /// Rows per canvas of the last forward (its `x` holds `batch × rows_per_canvas` rows).
    fwd_len: usize,
    /// Whether the current canvases are a padded batch ([`Model::predict_batch`]): canvas `b`
    /// holds `kv_len[b] ≤ seq` real ids, and a full forward excludes the keys past them.
    padded: bool,
    /// `[batch_cap]` real lengths of the current canvases (read only when `padded`).
    kv_len: CudaSlice<i32>,
    /// Query rows (indices into `x`) and their canvas positions, with the host copy they came from.
    q_idx: CudaSlice<i32>,
    q_pos: CudaSlice<i32>,
    q_host: (Vec<i32>, Vec<i32>),
    /// Which rows the last forward's last layer finished ([`narrow`]).
    last_rows: LastLayerRows,
    /// The LM head's input rows (f32, one chunk); after a narrowed forward, the query rows'
    /// final residual in query order.
    hq: CudaSlice<f32>,
    hqn: CudaSlice<u16>,
    logits: CudaSlice<f32>,
    tokens: CudaSlice<i32>,
    conf: CudaSlice<f64>,
    record: CudaSlice<i32>,
    /// The mixture's step buffers (LLaDA-MoE), for `batch_cap · seq_cap` rows.
    moe: Option<MoeBuffers>,
    /// Captured block steps (they point into the buffers above and are dropped with them).
    graph_sets: HashMap<ShapeKey, GraphSet>,
    /// Shapes the Session path's layers ran at eagerly so far (a shape is graphed from its
    /// second sighting on).
    layer_shapes_seen: HashSet<ShapeKey>,
}

/// Layer `li`'s K and V cache in the cache `sel` picks: the main cache's, or a Session slot's
/// (`None` for per-canvas slots: [`CanvasKv`] addresses them).
fn layer_cache<'s>(
    (k_cache, v_cache, slots): (
        &'s mut [CudaSlice<u16>],
        &'s mut [CudaSlice<u16>],
        &'s mut [CacheSlot],
    ),
    sel: KvSel,
    li: usize,
) -> Option<(CudaViewMut<'s, u16>, CudaViewMut<'s, u16>)> {
    match sel {
        KvSel::Main => Some((k_cache[li].as_view_mut(), v_cache[li].as_view_mut())),
        KvSel::Slot(j) => {
            let slot = &mut slots[j];
            Some((slot.k[li].as_view_mut(), slot.v[li].as_view_mut()))
        }
        KvSel::Canvases => None,
    }
}

/// LLaDA with every weight resident on one CUDA device.
pub struct CudaTransformer {
    dev: Arc<CudaDevice>,
    cfg: ModelConfig,
    kernels: KernelChoice,
    ew: Elementwise,
    /// Kernel instances of the eager path.
    kit: Kit,
    attn: Attention,
    w: Weights,
    /// Capture and replay the steady-state block step (see the module docs).
    graphs: AtomicBool,
    /// Why a capture failed (graphs are off from then on).
    graph_error: Mutex<Option<String>>,
    inv_freq: CudaSlice<f32>,
    /// (cos, sin) for the QKV GEMM's RoPE epilogue ([`KernelChoice::fused_rope`]).
    rope_table: Option<RopeTable>,
    state: Mutex<Option<State>>,
    /// Per-operation event timing of eager steps (`dllm bench --profile`).
    profiler: OpProfiler,
    /// The mixture-of-experts kernels and shape (LLaDA-MoE).
    moe: Option<(Moe, MoeShape)>,
    /// [`CudaTransformer::cache_slot_misses`].
    slot_misses: std::sync::atomic::AtomicUsize,
    /// Most Session cache slots ([`cache_slots_from_env`]; a packed batch may hold one per
    /// canvas).
    cache_slots: usize,
    /// Pack the span steps of Session batches ([`packed_sessions_from_env`]).
    packed_sessions: AtomicBool,
    /// Graph the layers of the Session path's forwards ([`session_graphs_from_env`]; off after
    /// one of their captures failed, leaving the step graphs alone).
    session_graphs: AtomicBool,
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    dev.stream
        .alloc_zeros::<T>(n.max(1))
        .map_err(|e| memory::alloc_err(&format!("allocate {what} ({n} elements)"), e))
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} does not fit in i32")))
}

impl CudaTransformer {
    /// Opens CUDA device 0 and loads the checkpoint in `dir` (config.json + safetensors).
    pub fn load(dir: &Path) -> Result<CudaTransformer> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir)?;
        let dev = CudaDevice::open(0)?;
        CudaTransformer::new(dev, &store, &cfg, KernelChoice::from_env())
    }

    /// Uploads every weight of `store` (validated against `cfg`'s LLaDA layout) to `dev`.
    pub fn new(
        dev: Arc<CudaDevice>,
        store: &WeightStore,
        cfg: &ModelConfig,
        kernels: KernelChoice,
    ) -> Result<CudaTransformer> {
        if let Some(why) = super::moe::unsupported(cfg) {
            return Err(Error::Unsupported(format!(
                "the CUDA backend cannot run this {} model ({why}): run it on the CPU backend",
                cfg.arch.name()
            )));
        }
        let moe_shape = MoeShape::of(cfg);
        let table = crate::model::tensor_table(cfg);
        let (d, h, e) = (cfg.d_model, cfg.mlp_hidden, cfg.embedding_size);
        // The fused SwiGLU only where the fast GEMMs run (a tiled kernel for every row count:
        // the naive one has no fused epilogue) and the rows group evenly.
        let kit = Kit::load(&dev)?;
        let tiled =
            kit.gemm.is_enabled(GemmVariant::Wide) || kit.gemm.is_enabled(GemmVariant::Wgmma);
        let kernels = KernelChoice {
            // The bulk prefetch instruction exists from sm_90.
            l2_prefetch: kernels.l2_prefetch && dev.arch == super::KernelArch::Hopper,
            fused_swiglu: kernels.fused_swiglu
                && !kernels.naive_gemm
                && tiled
                && swiglu_layout::supported(h),
            // The q/k head norms run between the QKV GEMM and RoPE.
            fused_rope: kernels.fused_rope
                && !kernels.naive_gemm
                && !cfg.qk_norm
                && rope_layout::supported(cfg.head_dim()),
            // A mixture's residual add is its combine kernel, not a GEMM epilogue: no norm fold
            // (and so no layer chain) around it.
            norm_fold: kernels.norm_fold && moe_shape.is_none(),
            layer_chain: kernels.layer_chain && moe_shape.is_none(),
            ..kernels
        };
        dev.check_fits(
            &format!(
                "the weights of `{}` ({} layers)",
                store.dir().display(),
                cfg.n_layers
            ),
            memory::weight_bytes(cfg),
        )?;
        let kv = cfg.n_kv_heads * cfg.head_dim();
        let wte = store.get_shaped(&table.embedding, &[e, d])?;
        let mut bytes = 0usize;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for n in &table.blocks {
            let q = store.get_shaped(&n.q, &[d, d])?;
            let k = store.get_shaped(&n.k, &[kv, d])?;
            let v = store.get_shaped(&n.v, &[kv, d])?;
            let o = store.get_shaped(&n.o, &[d, d])?;
            let (ffn, ffn_bytes) = upload_ffn(&dev, store, &n.ffn, (d, h), kernels.fused_swiglu)?;
            let qk_norm = match &n.qk_norm {
                Some((qn, kn)) => Some((
                    upload_f32(&dev, &store.get_shaped(qn, &[cfg.head_dim()])?)?,
                    upload_f32(&dev, &store.get_shaped(kn, &[cfg.head_dim()])?)?,
                )),
                None => None,
            };
            if qk_norm.is_some() && n.qkv_bias.is_some() {
                return Err(Error::Unsupported(
                    "the CUDA backend adds q/k/v biases after the q/k head norms, not before"
                        .into(),
                ));
            }
            let an = store.get_shaped(&n.attn_norm, &[d])?;
            let fnm = store.get_shaped(&n.mlp_norm, &[d])?;
            let qkv_bias = match &n.qkv_bias {
                Some((qb, kb, vb)) => {
                    let (qv, kvv) = (
                        store.get_shaped(qb, &[d])?.to_f32_vec(),
                        store.get_shaped(kb, &[kv])?.to_f32_vec(),
                    );
                    let mut bias = qk_rows(&qv, &kvv, kernels.fused_rope, cfg);
                    bias.extend(store.get_shaped(vb, &[kv])?.to_f32_vec());
                    Some(dev.stream.clone_htod(&bias).map_err(|e| {
                        memory::alloc_err(&format!("upload tensor `{qb}` (+k, v)"), e)
                    })?)
                }
                None => None,
            };
            layers.push(LayerWeights {
                qkv: if kernels.fused_rope {
                    upload_qkv_grouped(&dev, (&q, &k, &v), cfg)?
                } else {
                    upload_stacked(&dev, &[q, k, v])?
                },
                qkv_bias,
                attn_out: upload_stacked(&dev, &[o])?,
                ffn,
                attn_norm: upload_f32(&dev, &an)?,
                ff_norm: upload_f32(&dev, &fnm)?,
                qk_norm,
            });
            bytes += 2 * (d * (d + 2 * kv) + d * d) + ffn_bytes;
        }
        let ln_f = upload_f32(&dev, &store.get_shaped(&table.final_norm, &[d])?)?;
        let head = match &table.lm_head {
            None => None,
            Some(name) => {
                bytes += 2 * e * d;
                Some(upload_stacked(&dev, &[store.get_shaped(name, &[e, d])?])?)
            }
        };
        let w = Weights {
            wte: upload_stacked(&dev, &[wte])?,
            layers,
            ln_f,
            head,
            bytes,
        };
        let inv_freq = dev
            .stream
            .clone_htod(&rope_inv_freq(cfg.head_dim(), cfg.rope_theta))
            .map_err(|e| cuda_err("upload rope frequencies", e))?;
        let ew = Elementwise::new(&dev)?;
        // Every position a canvas can have (reserve() refuses longer ones), up to
        // ROPE_TABLE_POSITIONS (past it, rope_qkv rotates).
        let rope_table = if kernels.fused_rope {
            Some(RopeTable::new(
                &dev,
                &ew,
                &inv_freq.as_view(),
                cfg.max_seq_len.min(ROPE_TABLE_POSITIONS),
            )?)
        } else {
            None
        };
        Ok(CudaTransformer {
            ew,
            rope_table,
            kit,
            attn: Attention::load(&dev)?,
            graphs: AtomicBool::new(graphs_from_env()),
            graph_error: Mutex::new(None),
            profiler: OpProfiler::default(),
            moe: match moe_shape {
                Some(shape) => Some((Moe::load(&dev)?, shape)),
                None => None,
            },
            slot_misses: Default::default(),
            cache_slots: cache_slots_from_env(),
            packed_sessions: AtomicBool::new(packed_sessions_from_env()),
            session_graphs: AtomicBool::new(session_graphs_from_env()),
            dev,
            cfg: cfg.clone(),
            kernels,
            w,
            inv_freq,
            state: Mutex::new(None),
        })
    }

    /// The device this model runs on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Bytes of weights streamed by one forward (every layer matrix plus the LM head; the
    /// embedding rows read are negligible).
    pub fn weight_bytes(&self) -> usize {
        self.w.bytes
    }

    /// Which kernels run.
    pub fn kernels(&self) -> KernelChoice {
        self.kernels
    }

    /// [`super::switches`] as this model runs them: the environment's choices corrected for what
    /// the device loaded (the Ampere build has no stream or TMA GEMM and no PDL; attention
    /// variants limited to the device's shared memory), for the bench reports.
    pub fn effective_switches(&self) -> Vec<(&'static str, serde_json::Value)> {
        let mut v = super::switches();
        let hd = self.cfg.head_dim();
        for (name, value) in v.iter_mut() {
            let actual: Option<serde_json::Value> = match *name {
                "stream_gemm" => Some(self.kit.gemm.stream_active().into()),
                "stream_gemm_stages" => Some(self.kit.gemm.stream_stages().into()),
                "fused_mlp" => Some((self.kit.gemm.mlp_active() && self.moe.is_none()).into()),
                "tma_gemm" => Some(self.kit.gemm.tma_active().into()),
                "tma_quad_gemm" => Some(self.kit.gemm.tma4_active().into()),
                "cluster_split_gemm" => Some(self.kit.gemm.cluster_split_active().into()),
                "split_attention" => Some(self.attn.split_active(hd).into()),
                "key_group_attention" => Some(self.attn.keys_active(hd).into()),
                "attention_stages" => Some(
                    (if self.attn.plain_variant(hd) == AttnVariant::Mma2 {
                        2
                    } else {
                        3
                    })
                    .into(),
                ),
                "pdl" => Some(self.dev.pdl.into()),
                "fused_swiglu" => Some(self.kernels.fused_swiglu.into()),
                "l2_prefetch" => Some(self.kernels.l2_prefetch.into()),
                "fused_rope" => Some(self.kernels.fused_rope.into()),
                "norm_fold" => Some(self.kernels.norm_fold.into()),
                "query_last_layer" => Some(narrow::allowed(&self.kernels).into()),
                "layer_chain" => Some(self.chain_allowed(&self.kit.gemm, 1).into()),
                "kernel_build" => Some(self.dev.describe().into()),
                _ => None,
            };
            if let Some(a) = actual {
                *value = a;
            }
        }
        if let Some((_, shape)) = &self.moe {
            v.push((
                "mixture_of_experts",
                serde_json::json!({"experts": shape.experts, "per_token": shape.per_row}),
            ));
        }
        v
    }

    /// Enables or disables CUDA graphs for later steps (the default comes from
    /// `DLLM_CUDA_GRAPH`); disabling also drops the graphs captured so far.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
        if !on {
            if let Some(st) = self.lock().as_mut() {
                st.graph_sets.clear();
            }
        }
    }

    /// Whether steps may run as CUDA graphs.
    pub fn graphs_enabled(&self) -> bool {
        self.graphs.load(Ordering::Relaxed)
    }

    /// Number of block-step graphs captured so far (all shapes).
    pub fn graph_count(&self) -> usize {
        self.lock()
            .as_ref()
            .map_or(0, |st| st.graph_sets.values().map(|g| g.graphs.len()).sum())
    }

    fn kv_dim(&self) -> usize {
        self.cfg.n_kv_heads * self.cfg.head_dim()
    }

    fn qkv_dim(&self) -> usize {
        self.cfg.d_model + 2 * self.kv_dim()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The step buffers' element counts for `batch_cap` canvases of `seq_cap` tokens.
    fn step_buffers(&self, batch_cap: usize, seq_cap: usize) -> StepBuffers {
        StepBuffers::new(&self.cfg, batch_cap, seq_cap, self.kernels.fused_swiglu)
            .with_norm_fold(self.kernels.norm_fold)
    }

    fn alloc_state(&self, batch_cap: usize, seq_cap: usize) -> Result<State> {
        let dev = &*self.dev;
        let n = self.step_buffers(batch_cap, seq_cap);
        Ok(State {
            batch_cap,
            seq_cap,
            batch: 0,
            seq: 0,
            canvas: alloc(dev, n.rows, "canvas")?,
            x: alloc(dev, n.hidden, "residual")?,
            xn: alloc(dev, n.hidden, "normed activations")?,
            xa: alloc(dev, n.fold_x, "norm fold activations")?,
            sq_attn: alloc(dev, n.fold_sq, "norm fold partial sums")?,
            sq_ff: alloc(dev, n.fold_sq, "norm fold partial sums")?,
            qkv: alloc(dev, n.qkv, "qkv")?,
            attn: alloc(dev, n.hidden, "attention output")?,
            // The fused SwiGLU writes `act` directly: no gate|up buffer.
            gu: alloc(dev, n.gate_up, "gate|up")?,
            act: alloc(dev, n.act, "swiglu output")?,
            k_cache: Vec::new(),
            v_cache: Vec::new(),
            cache_valid: false,
            slots: Vec::new(),
            slot_clock: 0,
            canvas_kv: None,
            fwd_len: 0,
            padded: false,
            kv_len: alloc(dev, n.batch, "canvas lengths")?,
            q_idx: alloc(dev, n.rows, "query rows")?,
            q_pos: alloc(dev, n.rows, "query positions")?,
            q_host: (Vec::new(), Vec::new()),
            last_rows: LastLayerRows::All,
            hq: alloc(dev, n.head_hidden, "query hidden")?,
            hqn: alloc(dev, n.head_hidden, "query normed")?,
            logits: alloc(dev, n.logits, "logits")?,
            tokens: alloc(dev, n.rows, "tokens")?,
            conf: alloc(dev, n.rows, "confidences")?,
            record: alloc(dev, n.record, "commit record")?,
            moe: match n.moe {
                Some(sizes) => Some(MoeBuffers::alloc(dev, sizes)?),
                None => None,
            },
            graph_sets: HashMap::new(),
            layer_shapes_seen: HashSet::new(),
        })
    }

    /// Makes room for `batch` canvases of `seq` tokens (reallocates the step buffers and cache
    /// only when they are too small; the current canvases and the main cache are lost then,
    /// the Session caches' slots kept). A request that does
    /// not fit in the device's memory is refused first ([`Error::OutOfMemory`]), leaving the
    /// current buffers and canvases as they were.
    pub fn reserve(&self, batch: usize, seq: usize) -> Result<()> {
        let mut g = self.lock();
        self.reserve_locked(&mut g, batch, seq)
    }

    fn reserve_locked(&self, g: &mut Option<State>, batch: usize, seq: usize) -> Result<()> {
        if batch == 0 || seq == 0 {
            return Err(Error::invalid(format!(
                "batch ({batch}) and sequence length ({seq}) must be positive"
            )));
        }
        if seq > self.cfg.max_seq_len {
            return Err(Error::invalid(format!(
                "sequence of {seq} tokens exceeds max_seq_len {}",
                self.cfg.max_seq_len
            )));
        }
        let fits = g
            .as_ref()
            .is_some_and(|s| s.batch_cap >= batch && s.seq_cap >= seq);
        if !fits {
            let (b0, s0) = g.as_ref().map_or((0, 0), |s| (s.batch_cap, s.seq_cap));
            let (b, s) = (batch.max(b0), seq.max(s0));
            // Checked before the current buffers go (a refused request leaves them and the
            // canvases as they are), crediting what freeing them returns: the step buffers and
            // the main K/V cache.
            let held = g.as_ref().map_or(0, |st| {
                let kv = if st.k_cache.is_empty() {
                    0
                } else {
                    memory::kv_cache_bytes(&self.cfg, b0, s0)
                };
                self.step_buffers(b0, s0).bytes() + kv
            });
            self.dev.check_fits(
                &format!(
                    "the step buffers of {b} canvases × {s} tokens (beyond the {} held now)",
                    crate::memory::human_bytes(held)
                ),
                self.step_buffers(b, s).bytes().saturating_sub(held),
            )?;
            // The Session caches' slots are kept (their K/V stay valid; they were not
            // credited above), the rest is freed first.
            let (slots, clock) = g
                .take()
                .map_or((Vec::new(), 0), |st| (st.slots, st.slot_clock));
            let mut fresh = self.alloc_state(b, s)?;
            fresh.slots = slots;
            fresh.slot_clock = clock;
            *g = Some(fresh);
        }
        Ok(())
    }

    /// Uploads `batch` canvases of `seq` tokens (`ids.len() == batch·seq`) as the current canvases.
    pub fn set_canvases(&self, ids: &[u32], batch: usize, seq: usize) -> Result<()> {
        let mut g = self.lock();
        self.set_canvases_locked(&mut g, ids, batch, seq)
    }

    fn set_canvases_locked(
        &self,
        g: &mut Option<State>,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<()> {
        if ids.len() != batch * seq {
            return Err(Error::invalid(format!(
                "{} ids for {batch} canvases of {seq} tokens",
                ids.len()
            )));
        }
        self.check_embeddable(ids)?;
        self.reserve_locked(g, batch, seq)?;
        let st = g.as_mut().expect("reserved above");
        let host: Vec<i32> = ids.iter().map(|&v| v as i32).collect();
        let mut view = st.canvas.slice_mut(0..ids.len());
        self.dev
            .stream
            .memcpy_htod(&host, &mut view)
            .map_err(|e| cuda_err("upload canvases", e))?;
        st.batch = batch;
        st.seq = seq;
        st.cache_valid = false;
        st.fwd_len = 0;
        st.last_rows = LastLayerRows::Stale;
        st.padded = false;
        Ok(())
    }

    /// Replaces the ids of the single current canvas (same length) and keeps its K/V cache.
    fn update_canvas_ids(&self, st: &mut State, ids: &[u32]) -> Result<()> {
        self.check_embeddable(ids)?;
        if st.batch != 1 || st.seq != ids.len() {
            return Err(Error::State(format!(
                "the device holds {} canvases of {} tokens, not one of {}",
                st.batch,
                st.seq,
                ids.len()
            )));
        }
        let host: Vec<i32> = ids.iter().map(|&v| v as i32).collect();
        self.dev
            .stream
            .memcpy_htod(&host, &mut st.canvas.slice_mut(0..ids.len()))
            .map_err(|e| cuda_err("upload canvas", e))
    }

    /// Every id must have an embedding row (the embedding kernel reads row `id`).
    fn check_embeddable(&self, ids: &[u32]) -> Result<()> {
        match ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.cfg.embedding_size)
        {
            Some((pos, &id)) => Err(Error::invalid(format!(
                "token id {id} at position {pos} is outside the model's embedding ({} rows)",
                self.cfg.embedding_size
            ))),
            None => Ok(()),
        }
    }

    /// Downloads the current canvases (`[batch, seq]`).
    pub fn canvases(&self) -> Result<Vec<u32>> {
        let g = self.lock();
        let st = g
            .as_ref()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        let n = st.batch * st.seq;
        let v = self
            .dev
            .stream
            .clone_dtoh(&st.canvas.slice(0..n))
            .map_err(|e| cuda_err("download canvases", e))?;
        Ok(v.into_iter().map(|x| x as u32).collect())
    }

    /// Ends operation `op` for an open op profile (no-op otherwise).
    fn mark(&self, op: &'static str) -> Result<()> {
        self.profiler.mark(&self.dev.stream, op)
    }

    /// Starts timing every operation of the following eager steps (graphs are not used while
    /// a recording is open); [`CudaTransformer::profile_finish`] returns the times.
    pub fn profile_start(&self) -> Result<()> {
        self.profiler.start(&self.dev.stream)
    }

    /// Ends the recording opened by [`CudaTransformer::profile_start`]: each operation's total
    /// GPU time (ms), with the gap before it.
    pub fn profile_finish(&self) -> Result<Vec<OpTime>> {
        self.profiler.finish()
    }

    /// The GEMM of operation `op` (its profile label).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        kit: &Kit,
        op: &'static str,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm_fold(kit, op, a, w, out, NormFold::NONE, m, n, k)
    }

    /// [`CudaTransformer::gemm`] with the RMSNorm fold's prep and / or row scale
    /// ([`super::gemm_norm`]; the caller checked [`Gemm::norm_fold_serves`]).
    #[allow(clippy::too_many_arguments)]
    fn gemm_fold(
        &self,
        kit: &Kit,
        op: &'static str,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        fold: NormFold<'_, '_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        if fold.is_some() {
            kit.gemm.run_fold(&self.dev, a, w, out, fold, m, n, k)?;
        } else if self.kernels.naive_gemm {
            kit.gemm
                .run_variant(&self.dev, GemmVariant::Naive, a, w, out, m, n, k)?;
        } else {
            kit.gemm.run(&self.dev, a, w, out, m, n, k)?;
        }
        self.mark(op)
    }

    /// `out = rmsnorm(x; norm) · wᵀ` over `rows` rows of `d_model`: the normalised bf16 rows go
    /// through `xn` (the first `rows · d_model` elements). `op` labels the GEMM.
    #[allow(clippy::too_many_arguments)]
    fn norm_gemm(
        &self,
        kit: &Kit,
        op: &'static str,
        x: &CudaView<f32>,
        norm: &CudaView<f32>,
        xn: &mut CudaSlice<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let d = self.cfg.d_model;
        self.norm(x, norm, xn, rows)?;
        self.gemm(kit, op, &xn.slice(0..rows * d), w, out, rows, n, d)
    }

    /// `xn = rmsnorm(x; norm)` (bf16) over `rows` rows of `d_model`.
    fn norm(
        &self,
        x: &CudaView<f32>,
        norm: &CudaView<f32>,
        xn: &mut CudaSlice<u16>,
        rows: usize,
    ) -> Result<()> {
        let d = self.cfg.d_model;
        self.ew.rmsnorm_bf16(
            x,
            norm,
            &mut xn.slice_mut(0..rows * d),
            rows,
            d,
            self.cfg.rms_norm_eps,
        )?;
        self.mark("rmsnorm")
    }

    fn attention(
        &self,
        q: &CudaView<u16>,
        k: &CudaView<u16>,
        v: &CudaView<u16>,
        out: &mut CudaViewMut<u16>,
        kv_len: Option<&CudaView<i32>>,
        shape: &AttnShape,
    ) -> Result<()> {
        if self.kernels.naive_attention {
            self.attn
                .run_variant(AttnVariant::Naive, q, k, v, out, kv_len, shape)
        } else {
            self.attn.run(q, k, v, out, kv_len, shape)
        }
    }

    /// Runs every layer over rows `start..start + len` of each current canvas. `full` (len ==
    /// seq, start 0) attends within the rows themselves and, with `store_cache`, stores K/V; a
    /// block forward writes its K/V into the cache and attends to the whole cached sequence.
    /// `kv` picks the cache (a slot holds one canvas: `batch` must then be 1). `narrow` (a full
    /// forward's query rows per canvas, [`narrow::query_rows_per_canvas`] of the current query
    /// rows) runs the last layer's query side only for the query rows, leaving their final
    /// residual in `hq` ([`LastLayerRows::Queries`]).
    #[allow(clippy::too_many_arguments)]
    fn layers(
        &self,
        kit: &Kit,
        st: &mut State,
        start: usize,
        len: usize,
        full: bool,
        store_cache: bool,
        kv_sel: KvSel,
        narrow: Option<usize>,
    ) -> Result<()> {
        // No row is finished until this forward is (a failed one leaves nothing to predict from).
        st.last_rows = LastLayerRows::Stale;
        match kv_sel {
            KvSel::Slot(j)
                if st.batch != 1
                    || st
                        .slots
                        .get(j)
                        .is_none_or(|s| s.k.len() != self.w.layers.len()) =>
            {
                return Err(Error::State(format!(
                    "cache slot {j} of {} with {} canvases",
                    st.slots.len(),
                    st.batch
                )));
            }
            KvSel::Canvases
                if (full && !store_cache)
                    || st
                        .canvas_kv
                        .as_ref()
                        .is_none_or(|c| c.host().canvases() != st.batch) =>
            {
                return Err(Error::State(format!(
                    "per-canvas caches for {} canvases (a {} forward{})",
                    st.batch,
                    if full { "full" } else { "span" },
                    if store_cache { "" } else { " that stores none" }
                )));
            }
            KvSel::Main if (!full || store_cache) && st.k_cache.is_empty() => {
                self.dev.check_fits(
                    &format!(
                        "the K/V cache of {} canvases × {} tokens",
                        st.batch_cap, st.seq_cap
                    ),
                    memory::kv_cache_bytes(&self.cfg, st.batch_cap, st.seq_cap),
                )?;
                let elems = st.batch_cap * st.seq_cap * self.kv_dim();
                (st.k_cache, st.v_cache) = self.alloc_kv(elems, "cache")?;
            }
            _ => {}
        }
        let cfg = &self.cfg;
        let (b, s) = (st.batch, st.seq);
        let (d, h, hd) = (cfg.d_model, cfg.mlp_hidden, cfg.head_dim());
        let (kv, qkv_dim) = (self.kv_dim(), self.qkv_dim());
        let rows = b * len;
        // SAFETY: i32 and u32 have the same size; ids were validated non-negative on upload and
        // the commit kernel writes only ids < vocab_size.
        let ids = unsafe { st.canvas.transmute::<u32>(b * s) }
            .ok_or_else(|| Error::Backend("canvas view".into()))?;
        let layout = IdLayout {
            rows_per_seq: len,
            seq_stride: s,
            offset: start,
        };
        self.ew.embedding_strided(
            &self.w.wte.as_view(),
            &ids,
            &mut st.x.slice_mut(0..rows * d),
            rows,
            d,
            cfg.embedding_size,
            layout,
        )?;
        self.mark("embedding")?;
        let rope = RopeQkvShape {
            rows,
            row_stride: qkv_dim,
            q_heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            k_col: d,
            v_col: d + kv,
            head_dim: hd,
            pos_period: len,
            pos_offset: start,
            grouped: self.kernels.fused_rope,
        };
        let seq_cap = st.seq_cap;
        // RoPE and the cache write in the QKV GEMM's epilogue where its kernel has it.
        // Not with per-canvas caches: the epilogue writes one batch cache (so no layer chain
        // either).
        let rope_table = self.rope_table.as_ref().filter(|t| {
            kv_sel != KvSel::Canvases
                && start + len <= t.positions()
                && kit.gemm.rope_epilogue_serves(rows, qkv_dim, d)
        });
        // The whole MLP in one launch (DLLM_FUSED_MLP=1, batch-1 block steps): the same bits
        // as the two stream launches. And the folded norms. Both per row count: a narrowed
        // last layer runs its query side on fewer rows.
        let mlp_fused_at = |m| {
            self.kernels.fused_swiglu
                && !self.kernels.naive_gemm
                && self.moe.is_none()
                && kit.gemm.mlp_serves(m)
        };
        let fold_at = |m, mlp_fused| {
            FoldPlan::new(
                &self.kernels,
                (d, h, qkv_dim),
                mlp_fused,
                cfg.rms_norm_eps,
                |n, k| kit.gemm.norm_fold_serves(m, n, k),
            )
        };
        let (mlp_fused, n_layers) = (mlp_fused_at(rows), self.w.layers.len());
        let fold = fold_at(rows, mlp_fused);
        // The narrowed last layer's query side: `b · per` rows.
        let narrow = narrow.filter(|_| full);
        let query_side = narrow.map(|per| {
            let m = b * per;
            let mlp_fused = mlp_fused_at(m);
            (m, fold_at(m, mlp_fused), mlp_fused)
        });
        // Whether the layer before ran this layer's QKV projection (the layer chain).
        let mut qkv_done = false;
        for (li, lw) in self.w.layers.iter().enumerate() {
            if !std::mem::take(&mut qkv_done) {
                // RoPE on q and k, and (block forward, or a full forward that stores the cache)
                // the rotated K and the V rows written into the cache: in the GEMM's epilogue,
                // or in place after it.
                // Only a forward that writes the cache touches it (the main one may not exist).
                let mut views = (!full || store_cache)
                    .then(|| {
                        layer_cache(
                            (&mut st.k_cache, &mut st.v_cache, &mut st.slots),
                            kv_sel,
                            li,
                        )
                    })
                    .flatten();
                let dst = views.as_mut().map(|(kc, vc)| KvDst {
                    k: kc,
                    v: vc,
                    seq_rows: seq_cap,
                });
                // Per-canvas slots: this layer's addresses.
                let canvas_layer = match (kv_sel, st.canvas_kv.as_ref()) {
                    (KvSel::Canvases, Some(c)) => Some(c.layer(li)?),
                    _ => None,
                };
                let bias = lw.qkv_bias.as_ref().map(|b| b.as_view());
                // With the epilogue, the cache views go into its parameters; without, to
                // rope_qkv after the GEMM.
                let (out, rope_after) = match rope_table {
                    Some(table) => (
                        GemmOut::RopeQkv(
                            st.qkv.slice_mut(0..rows * qkv_dim),
                            RopeArgs::new(&self.dev, &rope, table, bias.as_ref(), dst)?,
                        ),
                        None,
                    ),
                    None => (
                        GemmOut::Bf16(st.qkv.slice_mut(0..rows * qkv_dim)),
                        Some(dst),
                    ),
                };
                if fold.attn && li > 0 {
                    // The previous layer's down projection wrote x ⊙ γ and the partial sums.
                    let sq = st.sq_attn.slice(0..rows * fold.parts);
                    self.gemm_fold(
                        kit,
                        "gemm.qkv",
                        &st.xa.slice(0..rows * d),
                        &lw.qkv.as_view(),
                        out,
                        fold.scale(&sq),
                        rows,
                        qkv_dim,
                        d,
                    )?;
                } else {
                    self.norm_gemm(
                        kit,
                        "gemm.qkv",
                        &st.x.slice(0..rows * d),
                        &lw.attn_norm.as_view(),
                        &mut st.xn,
                        &lw.qkv.as_view(),
                        out,
                        rows,
                        qkv_dim,
                    )?;
                }
                if let Some((qn, kn)) = &lw.qk_norm {
                    // Before RoPE (no RoPE epilogue with head norms: fused_rope is off).
                    if rope_after.is_none() {
                        return Err(Error::State("q/k head norms after a RoPE epilogue".into()));
                    }
                    self.ew.rmsnorm_heads(
                        &mut st.qkv.slice_mut(0..rows * qkv_dim),
                        (&qn.as_view(), &kn.as_view()),
                        &rope,
                        cfg.rms_norm_eps,
                    )?;
                    self.mark("qk_norm")?;
                }
                if let Some(dst) = rope_after {
                    // A block forward's GEMMs stream their weights; the attention-output ones
                    // can come from L2 if requested now.
                    let prefetch =
                        (!full && self.kernels.l2_prefetch).then(|| lw.attn_out.as_view());
                    let dst = match (&canvas_layer, dst) {
                        (Some(c), _) => RopeDst::Canvases(c),
                        (None, Some(d)) => RopeDst::Batch(d),
                        (None, None) => RopeDst::None,
                    };
                    self.ew.rope_qkv(
                        &mut st.qkv.slice_mut(0..rows * qkv_dim),
                        &self.inv_freq.as_view(),
                        bias.as_ref(),
                        rope,
                        dst,
                        prefetch.as_ref(),
                    )?;
                    self.mark("rope_kv")?;
                }
            }
            // The narrowed last layer: the query rows' q (into `xn`, free until the MLP norm)
            // and residual (into `hq`).
            let narrowed = narrow.filter(|_| li + 1 == n_layers);
            if let Some(per) = narrowed {
                let nq = b * per;
                self.ew.gather_rows_bf16(
                    &st.qkv.slice(0..rows * qkv_dim),
                    rows,
                    qkv_dim,
                    &st.q_idx.slice(0..nq),
                    &mut st.xn.slice_mut(0..nq * d),
                    d,
                )?;
                self.ew.gather_rows_f32(
                    &st.x.slice(0..rows * d),
                    &st.q_idx.slice(0..nq),
                    &mut st.hq.slice_mut(0..nq * d),
                    nq,
                    d,
                )?;
                self.mark("narrow.gather")?;
            }
            {
                // Query rows per canvas, and where their q sits.
                let sq = narrowed.unwrap_or(len);
                let (q, q_stride) = match narrowed {
                    Some(_) => (st.xn.slice(0..b * sq * d), d),
                    None => (st.qkv.slice(0..rows * qkv_dim), qkv_dim),
                };
                let mut out = st.attn.slice_mut(0..b * sq * d);
                if full {
                    let shape = AttnShape {
                        batch: b,
                        sq,
                        skv: len,
                        n_heads: cfg.n_heads,
                        n_kv_heads: cfg.n_kv_heads,
                        head_dim: hd,
                        q_stride,
                        o_stride: d,
                        kv_stride: qkv_dim,
                        kv_batch_stride: len,
                    };
                    let kview = st.qkv.slice(d..rows * qkv_dim);
                    let vview = st.qkv.slice(d + kv..rows * qkv_dim);
                    // A padded batch excludes each canvas's padding keys; every other full
                    // forward attends to all `len` keys, as without a length buffer.
                    let lens = st.padded.then(|| st.kv_len.slice(0..b));
                    self.attention(&q, &kview, &vview, &mut out, lens.as_ref(), &shape)?;
                } else {
                    let shape = AttnShape {
                        batch: b,
                        sq: len,
                        skv: s,
                        n_heads: cfg.n_heads,
                        n_kv_heads: cfg.n_kv_heads,
                        head_dim: hd,
                        q_stride: qkv_dim,
                        o_stride: d,
                        kv_stride: kv,
                        kv_batch_stride: st.seq_cap,
                    };
                    match (kv_sel, st.canvas_kv.as_ref()) {
                        (KvSel::Main, _) => {
                            let (kc, vc) = (st.k_cache[li].as_view(), st.v_cache[li].as_view());
                            self.attention(&q, &kc, &vc, &mut out, None, &shape)?;
                        }
                        (KvSel::Slot(j), _) => {
                            let slot = &st.slots[j];
                            let (kc, vc) = (slot.k[li].as_view(), slot.v[li].as_view());
                            self.attention(&q, &kc, &vc, &mut out, None, &shape)?;
                        }
                        (KvSel::Canvases, c) => {
                            // Each canvas against its own slot, up to its own length.
                            let c = c.ok_or_else(|| Error::State("no per-canvas caches".into()))?;
                            let shape = AttnShape {
                                skv: c.host().keys.iter().copied().max().unwrap_or(0),
                                kv_batch_stride: 0,
                                ..shape
                            };
                            let naive = self.kernels.naive_attention.then_some(AttnVariant::Naive);
                            let layer = c.layer(li)?;
                            self.attn
                                .run_canvases(naive, &q, &layer, &mut out, &shape)?;
                        }
                    }
                }
            }
            self.mark("attention")?;
            // From here on the narrowed layer runs on its query rows only, their residual in
            // `hq` (the LM head reads it there).
            let (rows, fold, mlp_fused) =
                narrowed.and(query_side).unwrap_or((rows, fold, mlp_fused));
            let x = if narrowed.is_some() {
                &mut st.hq
            } else {
                &mut st.x
            };
            // The layer tail: the attention-output projection as the fused MLP's first job.
            let tail = mlp_fused && fold.ff && kit.gemm.mlp_tail_serves(rows);
            if !tail {
                // With the fold, the MLP norm's x ⊙ γ and partial sums come out of this GEMM.
                let gamma = lw.ff_norm.as_view();
                let mut xg = st.xn.slice_mut(0..rows * d);
                let mut sq = st.sq_ff.slice_mut(0..rows * fold.parts);
                let prep = fold.ff.then_some(NormPrep {
                    gamma: &gamma,
                    xg: &mut xg,
                    sq: &mut sq,
                });
                self.gemm_fold(
                    kit,
                    "gemm.attn_out",
                    &st.attn.slice(0..rows * d),
                    &lw.attn_out.as_view(),
                    GemmOut::AddF32(x.slice_mut(0..rows * d)),
                    fold.prep(prep),
                    rows,
                    d,
                    d,
                )?;
            }
            let (gate_up, ff_out) = match &lw.ffn {
                LayerFfn::Dense { gate_up, ff_out } => (gate_up, ff_out),
                LayerFfn::Experts(experts) => {
                    // The mixture (never fused or folded): the MLP norm, the router, the
                    // experts and their weighted sum into the residual.
                    self.norm(
                        &x.slice(0..rows * d),
                        &lw.ff_norm.as_view(),
                        &mut st.xn,
                        rows,
                    )?;
                    let ((moe, shape), buf) =
                        self.moe.as_ref().zip(st.moe.as_mut()).ok_or_else(|| {
                            Error::State("a mixture layer without its kernels".into())
                        })?;
                    moe.run(
                        &self.dev,
                        &self.ew,
                        experts,
                        *shape,
                        (&st.xn.slice(0..rows * d), &mut x.slice_mut(0..rows * d)),
                        rows,
                        buf,
                        self.kernels.fused_swiglu,
                        |a, w, out| {
                            self.gemm(kit, "gemm.router", a, w, out, rows, shape.experts, d)
                        },
                    )?;
                    self.mark("moe")?;
                    continue;
                }
            };
            // The next layer's attention norm, folded into this layer's down projection.
            let next_norm = self
                .w
                .layers
                .get(li + 1)
                .filter(|_| fold.attn)
                .map(|l| l.attn_norm.as_view());
            // Fused: silu(gate) · up straight from the GEMM's accumulators (interleaved rows).
            let fused = self.kernels.fused_swiglu;
            // Empty views without the fold (its buffers are then one element).
            let (mut xa, mut sq_attn) = (
                st.xa.slice_mut(0..rows * fold.cols()),
                st.sq_attn.slice_mut(0..rows * fold.parts),
            );
            let down_prep = next_norm.as_ref().map(|gamma| NormPrep {
                gamma,
                xg: &mut xa,
                sq: &mut sq_attn,
            });
            if tail {
                // Attention output (with the MLP norm's prep), gate/up (its row scale), down
                // (the next norm's prep): one launch. With the layer chain (the fold of the next
                // attention norm and the RoPE epilogue available) the next layer's QKV
                // projection runs in it too, on the down job's prep, writing that layer's cache.
                let chain = self
                    .w
                    .layers
                    .get(li + 1)
                    .filter(|_| {
                        self.chain_allowed(&kit.gemm, rows)
                            && narrowed.is_none()
                            && down_prep.is_some()
                    })
                    .zip(rope_table);
                let w_next = chain.map(|(next, _)| next.qkv.as_view());
                let qkv_job = match (chain, &w_next) {
                    (Some((next, table)), Some(w)) => {
                        let bias = next.qkv_bias.as_ref().map(|b| b.as_view());
                        let mut views = (!full || store_cache)
                            .then(|| {
                                layer_cache(
                                    (&mut st.k_cache, &mut st.v_cache, &mut st.slots),
                                    kv_sel,
                                    li + 1,
                                )
                            })
                            .flatten();
                        let dst = views.as_mut().map(|(kc, vc)| KvDst {
                            k: kc,
                            v: vc,
                            seq_rows: seq_cap,
                        });
                        let args = RopeArgs::new(&self.dev, &rope, table, bias.as_ref(), dst)?;
                        Some(MlpQkvJob {
                            w,
                            out: GemmOut::RopeQkv(st.qkv.slice_mut(0..rows * qkv_dim), args),
                            n: qkv_dim,
                        })
                    }
                    _ => None,
                };
                qkv_done = qkv_job.is_some();
                let (o, w_o, gamma) = (
                    st.attn.slice(0..rows * d),
                    lw.attn_out.as_view(),
                    lw.ff_norm.as_view(),
                );
                let (mut xg, mut sq) = (
                    st.xn.slice_mut(0..rows * d),
                    st.sq_ff.slice_mut(0..rows * fold.parts),
                );
                let input = MlpInput::AfterOut(MlpOutJob {
                    o: &o,
                    w_o: &w_o,
                    prep: NormPrep {
                        gamma: &gamma,
                        xg: &mut xg,
                        sq: &mut sq,
                    },
                    eps: fold.eps,
                });
                kit.gemm.run_mlp(
                    &self.dev,
                    input,
                    &gate_up.as_view(),
                    &mut st.act.slice_mut(0..rows * h),
                    &ff_out.as_view(),
                    &mut x.slice_mut(0..rows * d),
                    (rows, d, h),
                    (fold.prep(None), fold.prep(down_prep)),
                    qkv_job,
                )?;
                self.mark(if qkv_done { "gemm.chain" } else { "gemm.tail" })?;
                continue;
            }
            if mlp_fused {
                // Without the fold the MLP norm is its own launch; with it (and no tail kernels)
                // the attention-output projection above wrote x ⊙ γ and the partial sums.
                if !fold.ff {
                    self.norm(
                        &x.slice(0..rows * d),
                        &lw.ff_norm.as_view(),
                        &mut st.xn,
                        rows,
                    )?;
                }
                let sq_ff = st.sq_ff.slice(0..rows * fold.parts);
                let fold_up = if fold.ff {
                    fold.scale(&sq_ff)
                } else {
                    fold.prep(None)
                };
                kit.gemm.run_mlp(
                    &self.dev,
                    MlpInput::Rows(&st.xn.slice(0..rows * d)),
                    &gate_up.as_view(),
                    &mut st.act.slice_mut(0..rows * h),
                    &ff_out.as_view(),
                    &mut x.slice_mut(0..rows * d),
                    (rows, d, h),
                    (fold_up, fold.prep(down_prep)),
                    None,
                )?;
                self.mark("gemm.mlp")?;
                continue;
            }
            let (op, out) = if fused {
                (
                    "gemm.gate_up+swiglu",
                    GemmOut::SwigluBf16(st.act.slice_mut(0..rows * h)),
                )
            } else {
                (
                    "gemm.gate_up",
                    GemmOut::Bf16(st.gu.slice_mut(0..rows * 2 * h)),
                )
            };
            if fold.ff {
                let sq = st.sq_ff.slice(0..rows * fold.parts);
                self.gemm_fold(
                    kit,
                    op,
                    &st.xn.slice(0..rows * d),
                    &gate_up.as_view(),
                    out,
                    fold.scale(&sq),
                    rows,
                    2 * h,
                    d,
                )?;
            } else {
                self.norm_gemm(
                    kit,
                    op,
                    &x.slice(0..rows * d),
                    &lw.ff_norm.as_view(),
                    &mut st.xn,
                    &gate_up.as_view(),
                    out,
                    rows,
                    2 * h,
                )?;
            }
            if !fused {
                self.ew.swiglu(
                    &st.gu.slice(0..rows * 2 * h),
                    &mut st.act.slice_mut(0..rows * h),
                    rows,
                    h,
                )?;
                self.mark("swiglu")?;
            }
            self.gemm_fold(
                kit,
                "gemm.down",
                &st.act.slice(0..rows * h),
                &ff_out.as_view(),
                GemmOut::AddF32(x.slice_mut(0..rows * d)),
                fold.prep(down_prep),
                rows,
                d,
                h,
            )?;
        }
        st.last_rows = LastLayerRows::finished(narrow.is_some());
        st.fwd_len = len;
        Ok(())
    }

    /// Full forward over every current canvas (all `seq` positions); with `store_cache` every
    /// layer's K/V are kept for later [`CudaTransformer::forward_block`] calls. Asynchronous.
    pub fn forward_full(&self, store_cache: bool) -> Result<()> {
        let mut g = self.lock();
        let st = g
            .as_mut()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        let seq = st.seq;
        self.layers(&self.kit, st, 0, seq, true, store_cache, KvSel::Main, None)?;
        Self::full_forward_done(st, StepKind::Full { store_cache });
        Ok(())
    }

    /// Block forward over positions `start..start + len` of every canvas against the cache
    /// filled by a previous `forward_full(true)` (its K/V at those positions are refreshed).
    pub fn forward_block(&self, start: usize, len: usize) -> Result<()> {
        let mut g = self.lock();
        let st = g
            .as_mut()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        Self::check_block(st, start, len)?;
        self.layers(&self.kit, st, start, len, false, true, KvSel::Main, None)
    }

    fn check_block(st: &State, start: usize, len: usize) -> Result<()> {
        if st.padded {
            return Err(Error::State(
                "the current canvases are a padded batch of predict_batch: upload canvases with set_canvases before a block forward".into(),
            ));
        }
        if !st.cache_valid {
            return Err(Error::State(
                "forward_block needs a cache: run forward_full(store_cache = true) first".into(),
            ));
        }
        if len == 0 || start + len > st.seq {
            return Err(Error::invalid(format!(
                "block {start}..{} outside canvases of {}",
                start + len,
                st.seq
            )));
        }
        Ok(())
    }

    /// Uploads the query rows (indices into the last forward's rows) and their positions when
    /// they differ from the previous ones.
    fn set_queries(&self, st: &mut State, idx: Vec<i32>, pos: Vec<i32>) -> Result<()> {
        if st.q_host.0 != idx || st.q_host.1 != pos {
            if idx.len() > st.q_idx.len() {
                return Err(Error::invalid(format!(
                    "{} query rows exceed capacity {}",
                    idx.len(),
                    st.q_idx.len()
                )));
            }
            let n = idx.len();
            self.dev
                .stream
                .memcpy_htod(&idx, &mut st.q_idx.slice_mut(0..n))
                .map_err(|e| cuda_err("upload query rows", e))?;
            self.dev
                .stream
                .memcpy_htod(&pos, &mut st.q_pos.slice_mut(0..n))
                .map_err(|e| cuda_err("upload query positions", e))?;
            st.q_host = (idx, pos);
            st.last_rows = st.last_rows.after_query_change();
            self.mark("upload")?;
        }
        Ok(())
    }

    /// [`ModelConfig::source_position`] of this model.
    fn source_position(&self, p: usize) -> usize {
        self.cfg.source_position(p)
    }

    /// The positions a block forward must cover to predict `span`: the span itself, plus the
    /// position before it for shifted-logit architectures (its output predicts `span.start`).
    fn block_forward_range(&self, span: &Range<usize>) -> Range<usize> {
        self.source_position(span.start).min(span.start)..span.end
    }

    /// Query rows for positions `span` of every canvas in the row order of a forward over
    /// positions `fwd` of each canvas (the row of [`Self::source_position`] of each position).
    fn span_queries(
        &self,
        st: &State,
        span: &Range<usize>,
        fwd: Range<usize>,
    ) -> Result<(Vec<i32>, Vec<i32>)> {
        let (fwd_start, len) = (fwd.start, fwd.len());
        if span.is_empty()
            || self.source_position(span.start) < fwd_start
            || span.end > fwd_start + len
        {
            return Err(Error::invalid(format!(
                "query span {span:?} is not predicted by the last forward's positions {fwd_start}..{}",
                fwd_start + len
            )));
        }
        let mut idx = Vec::with_capacity(st.batch * span.len());
        let mut pos = Vec::with_capacity(st.batch * span.len());
        for b in 0..st.batch {
            for p in span.clone() {
                let row = b * len + self.source_position(p) - fwd_start;
                idx.push(i32_of("query row", row)?);
                pos.push(i32_of("query position", p)?);
            }
        }
        Ok((idx, pos))
    }

    /// Runs `ln_f` + LM head over the current query rows in chunks; `each(chunk_start, rows)`
    /// consumes `st.logits[..rows·width]` after each chunk.
    fn head(
        &self,
        kit: &Kit,
        st: &mut State,
        mut each: impl FnMut(&mut State, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let d = self.cfg.d_model;
        let width = self.cfg.logits_width();
        let n = st.q_host.0.len();
        let chunk = HEAD_CHUNK_ROWS.min(st.hq.len() / d);
        let head_w = self.w.head.as_ref().unwrap_or(&self.w.wte);
        // After a narrowed forward `hq` already holds every query row's final residual.
        let gathered = st.last_rows.head_reads_narrowed(n, chunk)?;
        let mut c0 = 0;
        while c0 < n {
            let rows = chunk.min(n - c0);
            if !gathered {
                self.ew.gather_rows_f32(
                    &st.x.as_view(),
                    &st.q_idx.slice(c0..c0 + rows),
                    &mut st.hq.slice_mut(0..rows * d),
                    rows,
                    d,
                )?;
                self.mark("head.gather")?;
            }
            self.norm_gemm(
                kit,
                "gemm.lm_head",
                &st.hq.slice(0..rows * d),
                &self.w.ln_f.as_view(),
                &mut st.hqn,
                &head_w.as_view(),
                GemmOut::F32(st.logits.slice_mut(0..rows * width)),
                rows,
                width,
            )?;
            each(st, c0, rows)?;
            c0 += rows;
        }
        Ok(())
    }

    /// Predicts (token, confidence) on the GPU for positions `span` of every canvas from the last
    /// forward (`fwd_start` = first position that forward covered: 0 for a full forward).
    /// Results stay on the device for [`CudaTransformer::commit`]. Asynchronous.
    pub fn predict_span(
        &self,
        span: Range<usize>,
        fwd_start: usize,
        rule: &PredictRule,
    ) -> Result<()> {
        let mut g = self.lock();
        let st = g
            .as_mut()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        let (idx, pos) = self.span_queries(st, &span, fwd_start..fwd_start + st.fwd_len)?;
        self.set_queries(st, idx, pos)?;
        self.predict_queries(&self.kit, st, rule)
    }

    /// Downloads the fp32 logits of positions `span` of every canvas from the last forward
    /// (`[batch · span.len(), logits_width]`, canvas-major). For checks.
    pub fn span_logits(&self, span: Range<usize>, fwd_start: usize) -> Result<Vec<f32>> {
        let mut g = self.lock();
        let st = g
            .as_mut()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        let (idx, pos) = self.span_queries(st, &span, fwd_start..fwd_start + st.fwd_len)?;
        self.set_queries(st, idx, pos)?;
        self.download_query_logits(st)
    }

    fn predict_queries(&self, kit: &Kit, st: &mut State, rule: &PredictRule) -> Result<()> {
        let n = st.q_host.0.len();
        self.predict_query_ranges(kit, st, &[(0..n, rule)])
    }

    /// [`CudaTransformer::predict_queries`] with a rule per range of query rows (`ranges` cover
    /// the current query rows in order): one LM-head pass, then per head chunk one sampler
    /// launch for each range's rows in it.
    fn predict_query_ranges(
        &self,
        kit: &Kit,
        st: &mut State,
        ranges: &[(Range<usize>, &PredictRule)],
    ) -> Result<()> {
        let width = self.cfg.logits_width();
        let sampler = &kit.sampler;
        self.head(kit, st, |st, c0, rows| {
            for (range, rule) in ranges {
                let (lo, hi) = (range.start.max(c0), range.end.min(c0 + rows));
                if lo >= hi {
                    continue;
                }
                sampler.predict(
                    &st.logits.slice((lo - c0) * width..(hi - c0) * width),
                    hi - lo,
                    width,
                    &st.q_pos.slice(lo..hi),
                    rule,
                    &mut st.tokens.slice_mut(lo..hi),
                    &mut st.conf.slice_mut(lo..hi),
                )?;
                self.mark("sample")?;
            }
            Ok(())
        })
    }

    /// Commits the `k` most confident still-masked predictions of each canvas (from the last
    /// [`CudaTransformer::predict_span`]) into the device canvases. Asynchronous; the commit record
    /// is left on the device ([`CudaTransformer::last_commits`] downloads it).
    pub fn commit(&self, k: usize) -> Result<()> {
        let mut g = self.lock();
        let st = g
            .as_mut()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        self.commit_locked(&self.kit, st, k)
    }

    fn commit_locked(&self, kit: &Kit, st: &mut State, k: usize) -> Result<()> {
        let n = st.q_host.0.len();
        if n == 0 || st.batch == 0 || !n.is_multiple_of(st.batch) {
            return Err(Error::State(
                "commit needs a prediction over the same span of every canvas".into(),
            ));
        }
        let per = n / st.batch;
        let (batch, seq) = (st.batch, st.seq);
        kit.sampler.commit(
            &mut st.canvas.slice_mut(0..batch * seq),
            seq,
            batch,
            &st.tokens.slice(0..n),
            &st.conf.slice(0..n),
            &st.q_pos.slice(0..n),
            per,
            self.cfg.mask_token_id,
            CommitRule::TopK(k),
            &mut st.record.slice_mut(0..commit_record_len(batch, per)),
        )?;
        self.mark("commit")
    }

    /// The `(position, token)` pairs each canvas committed in the last [`CudaTransformer::commit`].
    pub fn last_commits(&self) -> Result<Vec<Vec<(usize, u32)>>> {
        let g = self.lock();
        let st = g
            .as_ref()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        let per = st.q_host.0.len() / st.batch.max(1);
        let len = commit_record_len(st.batch, per);
        let rec = self
            .dev
            .stream
            .clone_dtoh(&st.record.slice(0..len))
            .map_err(|e| cuda_err("download commit record", e))?;
        parse_commit_record(&rec, st.batch, per)
    }

    /// One denoising step over block `span` of every canvas: a full forward (refreshing the
    /// cache when `store_cache`) or, with `use_cache`, a block forward over `span` only; then
    /// predict and commit `k` tokens per canvas. Asynchronous. The step runs as a CUDA graph
    /// when graphs are enabled, `rule` does not depend on the step index and no op profile is
    /// recording (module docs).
    pub fn step(
        &self,
        span: Range<usize>,
        use_cache: bool,
        store_cache: bool,
        rule: &PredictRule,
        k: usize,
    ) -> Result<()> {
        let kind = if use_cache {
            StepKind::Block
        } else {
            StepKind::Full { store_cache }
        };
        // A refresh (a full forward storing the cache) runs once per block: capturing it would
        // cost more than replaying saves in one generation, so it stays eager.
        let graph = (use_cache || !store_cache)
            && self.graphs_enabled()
            && rule_is_step_free(rule)
            && !self.profiler.recording();
        let mut g = self.lock();
        let st = g
            .as_mut()
            .ok_or_else(|| Error::State("no canvases uploaded".into()))?;
        let fwd = match kind {
            StepKind::Block => {
                let fwd = self.block_forward_range(&span);
                Self::check_block(st, fwd.start, fwd.len())?;
                fwd
            }
            StepKind::Full { .. } => 0..st.seq,
        };
        // The query rows go up before the forward: a graph reads them as device data, and a
        // narrowed last layer runs only for them.
        let (idx, pos) = self.span_queries(st, &span, fwd.clone())?;
        self.set_queries(st, idx, pos)?;
        st.fwd_len = fwd.len();
        // A padded batch (left by predict_batch; check_block refuses it for block steps) masks
        // its padding keys through per-canvas lengths, which graphs do not key on: its full
        // step runs eagerly.
        if graph && !st.padded {
            // A failed replay, or a capture whose launch fails after its host code recorded the
            // rows, leaves no row to predict from.
            if let Err(e) = self.step_graphed(st, &span, fwd.len(), kind, rule, k) {
                st.last_rows = LastLayerRows::Stale;
                return Err(e);
            }
            // A replay runs no host code: the last layer's rows are what its capture left.
            let full = matches!(kind, StepKind::Full { .. });
            st.last_rows = LastLayerRows::finished(self.narrowing(st, full).is_some());
        } else {
            self.step_launches(&self.kit, st, &span, kind, rule, k)?;
        }
        Self::full_forward_done(st, kind);
        Ok(())
    }

    /// Whether the switches and `gemm`'s kernels allow the layer chain on `m` rows
    /// ([`KernelChoice::layer_chain`]: it rides on the layer tail, the fold and the RoPE
    /// epilogue); a layer also needs a next layer whose norm is folded and a RoPE table.
    fn chain_allowed(&self, gemm: &Gemm, m: usize) -> bool {
        let k = &self.kernels;
        k.layer_chain
            && k.fused_rope
            && k.norm_fold
            && k.fused_swiglu
            && !k.naive_gemm
            && gemm.mlp_chain_serves(m)
    }

    /// The query rows per canvas the last layer of a full forward (`full`) runs for
    /// ([`narrow`]: the current query rows, when the switch is on and they fit); `None` for
    /// block forwards.
    fn narrowing(&self, st: &State, full: bool) -> Option<usize> {
        if !full || !narrow::allowed(&self.kernels) {
            return None;
        }
        let cap = st.hq.len() / self.cfg.d_model;
        narrow::query_rows_per_canvas(&st.q_host.0, st.batch, st.seq, cap)
    }

    /// Everything of a step after the query rows are uploaded: layers, head, sampling, commit,
    /// all launched with `kit` (no host synchronisation, no allocation once warm).
    fn step_launches(
        &self,
        kit: &Kit,
        st: &mut State,
        span: &Range<usize>,
        kind: StepKind,
        rule: &PredictRule,
        k: usize,
    ) -> Result<()> {
        match kind {
            StepKind::Block => {
                let fwd = self.block_forward_range(span);
                self.layers(
                    kit,
                    st,
                    fwd.start,
                    fwd.len(),
                    false,
                    true,
                    KvSel::Main,
                    None,
                )?;
            }
            StepKind::Full { store_cache } => {
                let seq = st.seq;
                let narrow = self.narrowing(st, true);
                self.layers(kit, st, 0, seq, true, store_cache, KvSel::Main, narrow)?;
            }
        }
        self.predict_queries(kit, st, rule)?;
        self.commit_locked(kit, st, k)
    }

    /// The cache bookkeeping of [`CudaTransformer::forward_full`] after a full step of `kind`:
    /// K/V stored by it belong to the device canvases.
    fn full_forward_done(st: &mut State, kind: StepKind) {
        if let StepKind::Full { store_cache } = kind {
            st.cache_valid = store_cache || st.cache_valid;
        }
    }
}
