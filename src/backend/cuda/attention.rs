//! Host side of `cuda/attention.cu`: bidirectional bf16 attention (GQA, per-batch key lengths,
//! strided Q/K/V/out so a fused QKV buffer or a K/V cache can be read in place), its self-check
//! against the CPU reference [`crate::backend::cpu::attention`] and its benches.
//!
//! bf16 tensors are `u16` buffers holding bf16 bits. Five variants: [`AttnVariant::Mma`] (tensor
//! cores, head_dim 64 or 128, 16-byte aligned rows; [`AttnVariant::Mma2`] is the same with a
//! shallower K/V ring, for timing), [`AttnVariant::Split`] (the same kernel with
//! the keys split across blocks and the partial softmaxes merged in the kernel, for few query
//! rows against many keys: [`SplitPlan`]), [`AttnVariant::Keys`] (32 query rows per block, the
//! keys split among 4 warp groups of the block and merged in shared memory, for few query rows
//! against a short key range) and [`AttnVariant::Naive`] (fp32 reference, any head_dim).
//! [`Attention::run`] uses the tensor-core kernel whenever the shape allows it, split when
//! [`SplitPlan::new`] finds the grid too small to fill the GPU and the keys long enough (off with
//! `DLLM_ATTN_SPLIT=0`), else key groups where [`keys_suit`] says so (off with
//! `DLLM_ATTN_KEYS=0`).

use super::canvas_kv::CanvasKvLayer;
use super::check::{self, BenchResult, CheckResult, TOL_BF16};
use super::launch::Launch;
use super::scratch::ReductionScratch;
use super::{cuda_err, CudaDevice};
use crate::backend::cpu;
use crate::error::{Error, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Mutex};

/// Query rows per block of the tensor-core kernel (`BM` in the .cu file).
const MMA_ROWS: usize = 64;
/// Keys per tile of the tensor-core kernel (`BN` in the .cu file).
const MMA_KEYS: usize = 64;
/// Fewest key tiles a split of the split-KV kernel is given (below this the merge costs more
/// than the parallelism gains: see [`SplitPlan::new`]).
const SPLIT_MIN_TILES: usize = 4;
/// Threads per block of the tensor-core and split kernels.
const THREADS: u32 = 128;
/// Query rows per block of the key-group kernel (`ATTN_KEYS_ROWS`).
const KEYS_ROWS: usize = 32;
/// Key groups of the key-group kernel (`ATTN_KEY_GROUPS`); two warps each.
const KEY_GROUPS: usize = 4;
/// Threads per block of the key-group kernel.
const KEYS_THREADS: u32 = (2 * KEY_GROUPS * 32) as u32;
/// Launches per timed bench sample.
const BENCH_REPS: usize = 10;
/// Dynamic shared memory the naive kernel may use without an opt-in: 48 KiB less its own
/// static `red[32]` floats (static and dynamic shared memory share the 48 KiB).
const NAIVE_SMEM_LIMIT: usize = 48 * 1024 - 32 * 4;

/// Shape and memory layout of one attention call. Strides are in elements; 0 means "dense".
///
/// Q element `(b, s, h, d)` is at `q[(b·sq + s)·q_stride + h·head_dim + d]`; out likewise with
/// `o_stride`; K/V element `(b, j, g, d)` (g = kv head) at
/// `k[(b·kv_batch_stride + j)·kv_stride + g·head_dim + d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    /// Query rows per batch element.
    pub sq: usize,
    /// Keys per batch element (the valid part of a cache).
    pub skv: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Elements between consecutive query rows (0: `n_heads·head_dim`).
    pub q_stride: usize,
    /// Elements between consecutive output rows (0: `n_heads·head_dim`).
    pub o_stride: usize,
    /// Elements between consecutive key/value rows (0: `n_kv_heads·head_dim`).
    pub kv_stride: usize,
    /// Rows between batch elements of K/V, i.e. the cache capacity (0: `skv`).
    pub kv_batch_stride: usize,
}

impl AttnShape {
    /// A dense layout: Q/out `[batch·sq, n_heads·hd]`, K/V `[batch·skv, n_kv_heads·hd]`.
    pub fn dense(
        batch: usize,
        sq: usize,
        skv: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        AttnShape {
            batch,
            sq,
            skv,
            n_heads,
            n_kv_heads,
            head_dim,
            q_stride: 0,
            o_stride: 0,
            kv_stride: 0,
            kv_batch_stride: 0,
        }
    }

    fn q_stride(&self) -> usize {
        if self.q_stride == 0 {
            self.n_heads * self.head_dim
        } else {
            self.q_stride
        }
    }
    fn o_stride(&self) -> usize {
        if self.o_stride == 0 {
            self.n_heads * self.head_dim
        } else {
            self.o_stride
        }
    }
    fn kv_stride(&self) -> usize {
        if self.kv_stride == 0 {
            self.n_kv_heads * self.head_dim
        } else {
            self.kv_stride
        }
    }
    fn kv_batch_stride(&self) -> usize {
        if self.kv_batch_stride == 0 {
            self.skv
        } else {
            self.kv_batch_stride
        }
    }

    /// Elements the Q buffer must hold.
    pub fn q_len(&self) -> usize {
        rows_len(
            self.batch * self.sq,
            self.q_stride(),
            self.n_heads * self.head_dim,
        )
    }
    /// Elements the output buffer must hold.
    pub fn o_len(&self) -> usize {
        rows_len(
            self.batch * self.sq,
            self.o_stride(),
            self.n_heads * self.head_dim,
        )
    }
    /// Elements each of the K and V buffers must hold.
    pub fn kv_len(&self) -> usize {
        if self.batch == 0 || self.skv == 0 {
            return 0;
        }
        let rows = (self.batch - 1) * self.kv_batch_stride() + self.skv;
        rows_len(rows, self.kv_stride(), self.n_kv_heads * self.head_dim)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("attention shape {self:?}: {m}")));
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad("n_kv_heads must be positive and divide n_heads".into());
        }
        if self.head_dim == 0 {
            return bad("head_dim must be positive".into());
        }
        if self.q_stride() < self.n_heads * self.head_dim
            || self.o_stride() < self.n_heads * self.head_dim
        {
            return bad("q_stride/o_stride smaller than n_heads·head_dim".into());
        }
        if self.kv_stride() < self.n_kv_heads * self.head_dim {
            return bad("kv_stride smaller than n_kv_heads·head_dim".into());
        }
        if self.kv_batch_stride() < self.skv {
            return bad("kv_batch_stride (cache capacity) smaller than skv".into());
        }
        if self.n_heads > 65535 || self.batch > 65535 {
            return bad("n_heads and batch must be at most 65535".into());
        }
        if self.sq > i32::MAX as usize || self.skv > i32::MAX as usize {
            return bad("sequence lengths must fit in i32".into());
        }
        Ok(())
    }
}

fn rows_len(rows: usize, stride: usize, width: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * stride + width
    }
}

/// Which kernel computes the attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnVariant {
    /// One block per (query row, head, batch), fp32 CUDA cores: the reference.
    Naive,
    /// Flash-style tiles on tensor cores (`mma.sync` bf16), head_dim 64 or 128; a ring of
    /// 3 K/V tile slots (`MMA_STAGES`), so two key tiles are requested while one is computed.
    Mma,
    /// [`AttnVariant::Mma`] with 2 slots (one key tile ahead, the depth before session 6, in the
    /// new loop: one barrier per tile, unrolled copies): kept to time the ring's depth against
    /// (`DLLM_ATTN_STAGES=2` makes [`Attention::run`] use it).
    Mma2,
    /// [`AttnVariant::Mma`] with the key tiles split across blocks (flash-decoding), partial
    /// softmaxes merged by the last block of each (query tile, head, batch) in split order.
    Split,
    /// 32 query rows per block; the block's 4 key groups (2 warps each) take every 4th key tile,
    /// their partial softmaxes merged in shared memory in group order.
    Keys,
}

/// K/V slots of the plain and split kernels' ring (`DLLM_ATTN_STAGES` in attention.cu): at
/// head_dim 128, 64 query rows + 3 × (K + V) tiles of 64 keys = 112 KiB, two blocks per SM.
const MMA_STAGES: usize = 3;

/// Whether [`Attention::run`] takes the 2-slot plain kernel ([`AttnVariant::Mma2`]):
/// `DLLM_ATTN_STAGES=2`, for timing: the 3-slot ring (session 6) was 15-20 % faster per launch
/// at 384 queries x 384 keys on an H200 in session 9, within noise end to end.
pub fn two_stages_requested_by_env() -> bool {
    super::env_switch::count("DLLM_ATTN_STAGES", 2..=3) == Some(2)
}

/// Whether the key-group kernel may be used: on unless `DLLM_ATTN_KEYS=0`. Written in session 4
/// without a GPU; verified on an H200 in session 5: every attention and model check (its checks
/// run it on every case whatever the variable says), 10.5 µs against the plain kernel's 16.2 µs
/// on the b1 block step's 32 queries × 32 heads × 384 keys (30.7 vs 71.2 µs against 2048 keys),
/// b1 dual-cache 571.3 → 581.8 tok/s. At b8 (256 blocks) it is slower (27.0 vs 21.9 µs), which
/// [`keys_suit`] already rules out.
pub fn keys_requested_by_env() -> bool {
    super::env_switch::flag("DLLM_ATTN_KEYS", true)
}

/// Whether a call suits the key-group kernel: the plain kernel's grid (one block per 64 query
/// rows, head and batch element) has fewer than `max_units` blocks ([`keys_max_units`]: by
/// default the SM count, so the plain grid would leave SMs idle) and there are at least 2 key
/// tiles to share among the groups. The batch-1 dual-cache block step of LLaDA-8B (32 queries
/// × 32 heads against 384 keys) is such a call: 32 blocks each walking 6 key tiles in turn
/// (16.2 µs per layer on an H200, 10.5 µs with key groups).
pub fn keys_suit(shape: &AttnShape, max_units: usize) -> bool {
    plain_units(shape) < max_units && shape.skv.div_ceil(MMA_KEYS) >= 2
}

/// The plain-grid size below which [`keys_suit`] takes key groups: `DLLM_ATTN_KEYS_UNITS` (for
/// timing larger grids, e.g. 264 for the b1 full step's 192 blocks), else the SM count.
pub fn keys_max_units(num_sms: usize) -> usize {
    keys_units_override().unwrap_or(num_sms)
}

/// The grid size `DLLM_ATTN_KEYS_UNITS` sets, if any.
pub fn keys_units_override() -> Option<usize> {
    super::env_switch::count("DLLM_ATTN_KEYS_UNITS", 1..=1 << 20)
}

/// Blocks of the plain tensor-core kernel's grid: one per (64 query rows, head, batch element).
/// The split kernel computes the same units, each in several blocks.
fn plain_units(shape: &AttnShape) -> usize {
    shape.sq.div_ceil(MMA_ROWS) * shape.n_heads * shape.batch
}

/// Dynamic shared memory of the key-group kernel: the 32 query rows, then a K and a V tile of
/// 64 keys per key group (`AttnKeysCfg::SMEM_BYTES`; 136 KiB at head_dim 128).
fn keys_smem_bytes(head_dim: usize) -> usize {
    (KEYS_ROWS + KEY_GROUPS * 2 * MMA_KEYS) * head_dim * 2
}

/// Whether the split-KV kernel may be used: on unless `DLLM_ATTN_SPLIT=0` (verified on an H200
/// on 2026-11-27: every attention and model check, compute-sanitizer memcheck clean).
pub fn split_requested_by_env() -> bool {
    super::env_switch::flag("DLLM_ATTN_SPLIT", true)
}

/// Geometry of one split-KV launch: `units` = (query tile, head, batch) triples, each computed by
/// `splits` blocks of `tiles_per_split` 64-key tiles (the last may hold fewer, or none when a
/// per-batch key length is short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    pub units: usize,
    pub splits: usize,
    pub tiles_per_split: usize,
}

impl SplitPlan {
    /// The plan [`Attention::run`] uses: only when the plain grid (`units` blocks) is smaller than
    /// the GPU (`num_sms`); then as many splits as keep the grid within one wave of resident
    /// blocks (`blocks_per_sm` of the split kernel fit an SM, counted up to 2: an A100 holds one
    /// at head_dim 128), each of at least `SPLIT_MIN_TILES` key tiles, and at least 2 of them.
    /// `None` means "do not split". Measured on an H200 (2026-11-27): 32 queries × 32 heads against 384 keys took
    /// 0.0198 ms split vs 0.0160 ms plain (6 tiles: not worth a merge), against 2048 keys 0.0315
    /// vs 0.0711 ms (8 splits of 4 tiles).
    pub fn new(shape: &AttnShape, num_sms: usize, blocks_per_sm: usize) -> Option<SplitPlan> {
        let units = plain_units(shape);
        let key_tiles = shape.skv.div_ceil(MMA_KEYS);
        if units == 0 || units >= num_sms || key_tiles < 2 * SPLIT_MIN_TILES {
            return None;
        }
        let want = ((blocks_per_sm.clamp(1, 2) * num_sms) / units).min(key_tiles);
        let tiles = key_tiles.div_ceil(want.max(1)).max(SPLIT_MIN_TILES);
        let plan = SplitPlan::with_tiles_per_split(shape, tiles);
        (plan.splits >= 2).then_some(plan)
    }

    /// A plan with `tiles_per_split` key tiles per block (≥ 1); checks use it to force splits.
    pub fn with_tiles_per_split(shape: &AttnShape, tiles_per_split: usize) -> SplitPlan {
        let tps = tiles_per_split.max(1);
        SplitPlan {
            units: plain_units(shape),
            splits: shape.skv.div_ceil(MMA_KEYS).div_ceil(tps).max(1),
            tiles_per_split: tps,
        }
    }

    /// Workspace floats: per block, 128 threads × (head_dim / 8 · 4 output values + 4).
    pub fn workspace_floats(&self, head_dim: usize) -> usize {
        self.units * self.splits * THREADS as usize * (head_dim / 8 * 4 + 4)
    }
}

/// The loaded attention kernels.
pub struct Attention {
    stream: Arc<CudaStream>,
    /// Launch with programmatic dependent launch ([`super::launch`]).
    pdl: bool,
    naive_fn: CudaFunction,
    mma64_fn: CudaFunction,
    mma128_fn: CudaFunction,
    mma2_64_fn: CudaFunction,
    mma2_128_fn: CudaFunction,
    split64_fn: CudaFunction,
    split128_fn: CudaFunction,
    keys64_fn: CudaFunction,
    keys128_fn: CudaFunction,
    num_sms: usize,
    /// Whether `run` may split the keys (unless `DLLM_ATTN_SPLIT=0`; where it fits).
    split_enabled: bool,
    /// Whether `run` may use the key-group kernel (unless `DLLM_ATTN_KEYS=0`; where it fits).
    keys_enabled: bool,
    /// Whether `run` takes [`AttnVariant::Mma2`] for [`AttnVariant::Mma`]
    /// ([`two_stages_requested_by_env`]; also wherever the 3-slot ring does not keep two blocks
    /// per SM: [`VariantsFit::prefer_three_slots`]).
    two_stages: bool,
    /// [`keys_max_units`].
    keys_max_units: usize,
    /// Which tensor-core variants fit in this device's shared memory ([`VariantsFit`]).
    fit: VariantsFit,
    scratch: Mutex<ReductionScratch>,
}

/// `DLLM_ATTN_SMEM_LIMIT=N`: attention treats the device as having at most N bytes of shared
/// memory per block and per SM (e.g. 101376, compute capability 8.6 / 8.9), to check that
/// selection on a larger GPU.
pub fn smem_limit_override() -> Option<usize> {
    super::env_switch::count("DLLM_ATTN_SMEM_LIMIT", 1..=usize::MAX)
}

/// Which tensor-core variants fit in a device's shared memory, per head_dim: at 128 all do on a
/// Hopper (227 KiB per block) or an A100 (163 KiB); on compute capability 8.6 / 8.9 (99 KiB)
/// only the 2-slot plain kernel, which `run` then takes for every plain call (at 64, whose
/// kernels need half, all fit there too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariantsFit {
    /// Shared memory per block (opt-in maximum), bytes.
    pub per_block: usize,
    /// Shared memory per multiprocessor, bytes.
    pub per_sm: usize,
}

impl VariantsFit {
    /// Dynamic shared memory of `variant` at `head_dim` (0 for the naive kernel, which needs
    /// none of it).
    pub fn bytes(variant: AttnVariant, head_dim: usize) -> usize {
        match variant {
            AttnVariant::Naive => 0,
            AttnVariant::Mma | AttnVariant::Split => mma_smem_bytes(head_dim, MMA_STAGES),
            AttnVariant::Mma2 => mma_smem_bytes(head_dim, 2),
            AttnVariant::Keys => keys_smem_bytes(head_dim),
        }
    }

    /// Whether `variant` fits at `head_dim`.
    pub fn allows(&self, variant: AttnVariant, head_dim: usize) -> bool {
        Self::bytes(variant, head_dim) <= self.per_block
    }

    /// Blocks of `variant` at `head_dim` that fit one multiprocessor's shared memory (each
    /// also reserves 1 KiB); at least 1.
    pub fn blocks_per_sm(&self, variant: AttnVariant, head_dim: usize) -> usize {
        (self.per_sm / (Self::bytes(variant, head_dim) + 1024)).max(1)
    }

    /// Whether the plain kernel at `head_dim` should be the 3-slot one: it fits, and two of its
    /// blocks fit an SM (with the 1 KiB each block reserves), as the 2-slot kernel's do where it
    /// matters (an A100's 164 KiB holds two 2-slot blocks at head_dim 128 but one 3-slot block:
    /// two tiles in flight per block do not make up for half the blocks).
    pub fn prefer_three_slots(&self, head_dim: usize) -> bool {
        self.allows(AttnVariant::Mma, head_dim)
            && self.blocks_per_sm(AttnVariant::Mma, head_dim) >= 2
    }
}

/// Dynamic shared memory of the plain / split kernels with `stages` K/V slots: the 64 query rows,
/// then `stages` K tiles and `stages` V tiles of 64 keys, bf16.
fn mma_smem_bytes(head_dim: usize, stages: usize) -> usize {
    (MMA_ROWS + 2 * stages * MMA_KEYS) * head_dim * 2
}

impl Attention {
    /// Loads the kernels of `cuda/attention.cu` and opts the tensor-core kernels into the
    /// shared memory they need (80 to 136 KiB at head_dim 128); those that need more than the
    /// device has are not used ([`VariantsFit`]).
    pub fn load(dev: &CudaDevice) -> Result<Self> {
        let f = |name: &str| dev.function("attention", name);
        let num_sms = dev.num_sms()?;
        // Shared memory per block and per SM; DLLM_ATTN_SMEM_LIMIT=N (bytes) lowers both: how a
        // Hopper checks the 99 KiB selection.
        let smem = |attr, what| -> Result<usize> {
            let v = dev.attribute(attr, what)?;
            Ok(smem_limit_override().map_or(v, |n| n.min(v)))
        };
        let smem_limit = smem(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "shared memory per block",
        )?;
        let per_sm = smem(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            "shared memory per multiprocessor",
        )?;
        let fit = VariantsFit {
            per_block: smem_limit,
            per_sm,
        };
        let split_enabled = split_requested_by_env();
        // The default split plans never exceed two blocks per SM at head_dim 128, so this
        // workspace is allocated once and never grows in `run` (CUDA-graph capture safe).
        let (ws_floats, n_counters) = if split_enabled {
            (
                2 * num_sms * THREADS as usize * (128 / 8 * 4 + 4),
                2 * num_sms,
            )
        } else {
            (1, 1)
        };
        let scratch = ReductionScratch::new(&dev.stream, ws_floats, n_counters, "attention")?;
        let a = Attention {
            stream: dev.stream.clone(),
            pdl: dev.pdl,
            naive_fn: f("attention_naive")?,
            mma64_fn: f("attention_mma_d64")?,
            mma128_fn: f("attention_mma_d128")?,
            mma2_64_fn: f("attention_mma2_d64")?,
            mma2_128_fn: f("attention_mma2_d128")?,
            split64_fn: f("attention_split_d64")?,
            split128_fn: f("attention_split_d128")?,
            keys64_fn: f("attention_keys_d64")?,
            keys128_fn: f("attention_keys_d128")?,
            num_sms,
            split_enabled,
            keys_enabled: keys_requested_by_env(),
            two_stages: two_stages_requested_by_env(),
            keys_max_units: keys_max_units(num_sms),
            fit,
            scratch: Mutex::new(scratch),
        };
        // Each tensor-core kernel opts into its shared memory; one that does not fit keeps the
        // default limit, and `run` never picks it.
        for variant in [
            AttnVariant::Mma,
            AttnVariant::Mma2,
            AttnVariant::Split,
            AttnVariant::Keys,
        ] {
            for hd in [64, 128] {
                if !fit.allows(variant, hd) {
                    continue;
                }
                a.kernel(variant, hd)
                    .set_attribute(
                        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        VariantsFit::bytes(variant, hd) as i32,
                    )
                    .map_err(|e| {
                        cuda_err(
                            &format!("attention {variant:?} d{hd}: set max dynamic shared memory"),
                            e,
                        )
                    })?;
            }
        }
        Ok(a)
    }

    /// Whether the tensor-core kernel can run this call (head_dim 64/128, strides multiples of
    /// 8 elements, 16-byte aligned base pointers).
    pub fn mma_supported(
        &self,
        q: &CudaView<u16>,
        k: &CudaView<u16>,
        v: &CudaView<u16>,
        out: &CudaViewMut<u16>,
        shape: &AttnShape,
    ) -> bool {
        self.mma_fits(q, out, shape, self.kv_aligned(k, v))
    }

    /// Whether batch K and V buffers are 16-byte aligned.
    fn kv_aligned(&self, k: &CudaView<u16>, v: &CudaView<u16>) -> bool {
        let (kp, _g2) = k.device_ptr(&self.stream);
        let (vp, _g3) = v.device_ptr(&self.stream);
        kp.is_multiple_of(16) && vp.is_multiple_of(16)
    }

    /// [`Attention::mma_supported`] given whether the K/V rows are 16-byte aligned.
    fn mma_fits(
        &self,
        q: &CudaView<u16>,
        out: &CudaViewMut<u16>,
        shape: &AttnShape,
        kv_aligned: bool,
    ) -> bool {
        let aligned = |p: u64| p.is_multiple_of(16);
        let (qp, _g1) = q.device_ptr(&self.stream);
        let (op, _g4) = out.device_ptr(&self.stream);
        matches!(shape.head_dim, 64 | 128)
            && shape.q_stride().is_multiple_of(8)
            && shape.o_stride().is_multiple_of(8)
            && shape.kv_stride().is_multiple_of(8)
            && kv_aligned
            && aligned(qp)
            && aligned(op)
    }

    /// The variant [`Attention::run`] takes for `shape` (`mma_ok`: the tensor-core kernels can
    /// run the call).
    fn choose(&self, mma_ok: bool, shape: &AttnShape) -> AttnVariant {
        let hd = shape.head_dim;
        if !mma_ok || !self.fit.allows(AttnVariant::Mma2, hd) {
            AttnVariant::Naive
        } else if self.split_active(hd) && self.split_plan(shape).is_some() {
            AttnVariant::Split
        } else if self.keys_active(hd) && keys_suit(shape, self.keys_max_units) {
            AttnVariant::Keys
        } else {
            self.plain_variant(hd)
        }
    }

    /// Attention of a packed cached step: canvas `b`'s queries (rows `b·sq..`) against its own
    /// cache's first `kv.host.keys[b]` keys ([`CanvasKvLayer`]); `shape.skv` must be the
    /// largest key count, `shape.kv_stride` the row width (or 0), and `kv_batch_stride` is not
    /// used. The variant is `variant`, else chosen as [`Attention::run`] chooses it.
    pub fn run_canvases(
        &self,
        variant: Option<AttnVariant>,
        q: &CudaView<u16>,
        kv: &CanvasKvLayer<'_>,
        out: &mut CudaViewMut<u16>,
        shape: &AttnShape,
    ) -> Result<()> {
        let variant = variant
            .unwrap_or_else(|| self.choose(self.mma_fits(q, out, shape, kv.host.aligned), shape));
        let plan = self.plan_of(variant, shape);
        self.launch(variant, plan, q, KvSource::Canvases(kv), out, None, shape)
    }

    /// Attention with the fastest variant the call allows (see [`Attention::mma_supported`]).
    /// `kv_len`, when given, holds one key count per batch element (keys at or past it are
    /// excluded; values above `skv` mean `skv`); a row with no valid key is written as zeros.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        q: &CudaView<u16>,
        k: &CudaView<u16>,
        v: &CudaView<u16>,
        out: &mut CudaViewMut<u16>,
        kv_len: Option<&CudaView<i32>>,
        shape: &AttnShape,
    ) -> Result<()> {
        let variant = self.choose(self.mma_supported(q, k, v, out, shape), shape);
        self.run_variant(variant, q, k, v, out, kv_len, shape)
    }

    /// The split workspace, grown (outside the default plans, which fit the one allocated at
    /// load) to hold `plan` at `head_dim`.
    fn split_scratch(
        &self,
        plan: &SplitPlan,
        head_dim: usize,
    ) -> Result<std::sync::MutexGuard<'_, ReductionScratch>> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        scratch.ensure(&self.stream, plan.workspace_floats(head_dim), plan.units)?;
        Ok(scratch)
    }

    /// Whether split-KV attention is on (unless `DLLM_ATTN_SPLIT=0`), where it fits or not.
    pub fn split_enabled(&self) -> bool {
        self.split_enabled
    }

    /// Whether `run` splits the keys of small grids at `head_dim` (on, and the kernel fits).
    pub fn split_active(&self, head_dim: usize) -> bool {
        self.split_enabled && self.fit.allows(AttnVariant::Split, head_dim)
    }

    /// Whether `run` uses the key-group kernel where [`keys_suit`] at `head_dim` (unless
    /// `DLLM_ATTN_KEYS=0`; where the kernel fits).
    pub fn keys_active(&self, head_dim: usize) -> bool {
        self.keys_enabled && self.fit.allows(AttnVariant::Keys, head_dim)
    }

    /// The plain kernel `run` takes at `head_dim`: the 3-slot ring unless `DLLM_ATTN_STAGES=2`
    /// or it does not keep two blocks per SM ([`VariantsFit::prefer_three_slots`]).
    pub fn plain_variant(&self, head_dim: usize) -> AttnVariant {
        if self.two_stages || !self.fit.prefer_three_slots(head_dim) {
            AttnVariant::Mma2
        } else {
            AttnVariant::Mma
        }
    }

    /// Which variants fit in this device's shared memory.
    pub fn fit(&self) -> VariantsFit {
        self.fit
    }

    /// The kernel of tensor-core `variant` at `head_dim` (64, else 128; the naive kernel is
    /// not among them and reads as the plain one).
    fn kernel(&self, variant: AttnVariant, head_dim: usize) -> &CudaFunction {
        let d64 = head_dim == 64;
        match variant {
            AttnVariant::Keys if d64 => &self.keys64_fn,
            AttnVariant::Keys => &self.keys128_fn,
            AttnVariant::Split if d64 => &self.split64_fn,
            AttnVariant::Split => &self.split128_fn,
            AttnVariant::Mma2 if d64 => &self.mma2_64_fn,
            AttnVariant::Mma2 => &self.mma2_128_fn,
            _ if d64 => &self.mma64_fn,
            _ => &self.mma128_fn,
        }
    }

    /// Multiprocessors of the device (what [`SplitPlan::new`] fills).
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// [`SplitPlan::new`] on this device: its SMs, and as many split blocks per SM as fit.
    pub fn split_plan(&self, shape: &AttnShape) -> Option<SplitPlan> {
        let per_sm = self.fit.blocks_per_sm(AttnVariant::Split, shape.head_dim);
        SplitPlan::new(shape, self.num_sms, per_sm)
    }

    /// The split-KV kernel with an explicit plan (checks force splits with it); the plan must be
    /// [`SplitPlan::with_tiles_per_split`] of this shape.
    #[allow(clippy::too_many_arguments)]
    pub fn run_split(
        &self,
        plan: SplitPlan,
        q: &CudaView<u16>,
        k: &CudaView<u16>,
        v: &CudaView<u16>,
        out: &mut CudaViewMut<u16>,
        kv_len: Option<&CudaView<i32>>,
        shape: &AttnShape,
    ) -> Result<()> {
        if plan != SplitPlan::with_tiles_per_split(shape, plan.tiles_per_split) {
            return Err(Error::invalid(format!(
                "attention: split plan {plan:?} does not fit {shape:?}"
            )));
        }
        let kv = KvSource::Batch { k, v };
        self.launch(AttnVariant::Split, Some(plan), q, kv, out, kv_len, shape)
    }

    /// Attention with a chosen kernel; an error when the variant cannot handle the call.
    #[allow(clippy::too_many_arguments)]
    pub fn run_variant(
        &self,
        variant: AttnVariant,
        q: &CudaView<u16>,
        k: &CudaView<u16>,
        v: &CudaView<u16>,
        out: &mut CudaViewMut<u16>,
        kv_len: Option<&CudaView<i32>>,
        shape: &AttnShape,
    ) -> Result<()> {
        let plan = self.plan_of(variant, shape);
        self.launch(
            variant,
            plan,
            q,
            KvSource::Batch { k, v },
            out,
            kv_len,
            shape,
        )
    }

    /// The split plan a `variant` launch of `shape` runs: the device's plan for a split
    /// launch (one tile per split where it would not split), none for the others.
    fn plan_of(&self, variant: AttnVariant, shape: &AttnShape) -> Option<SplitPlan> {
        (variant == AttnVariant::Split).then(|| {
            self.split_plan(shape)
                .unwrap_or_else(|| SplitPlan::with_tiles_per_split(shape, 1))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        variant: AttnVariant,
        plan: Option<SplitPlan>,
        q: &CudaView<u16>,
        kv: KvSource<'_, '_>,
        out: &mut CudaViewMut<u16>,
        kv_len: Option<&CudaView<i32>>,
        shape: &AttnShape,
    ) -> Result<()> {
        shape.validate()?;
        if !self.fit.allows(variant, shape.head_dim) {
            return Err(Error::Unsupported(format!(
                "attention {variant:?} at head_dim {}: needs {} bytes of shared memory per block, \
                 this device allows {}",
                shape.head_dim,
                VariantsFit::bytes(variant, shape.head_dim),
                self.fit.per_block
            )));
        }
        let need = |what: &str, have: usize, want: usize| -> Result<()> {
            if have < want {
                return Err(Error::invalid(format!(
                    "attention {what}: buffer holds {have} elements, needs {want} for {shape:?}"
                )));
            }
            Ok(())
        };
        need("q", q.len(), shape.q_len())?;
        need("out", out.len(), shape.o_len())?;
        // The K/V arguments: batch buffers (checked against the shape), or each canvas's own
        // cache (the table's addresses, the keys counts as kv_len; checked on the host copy).
        let (k, v, kv_len, table, kv_aligned) = match kv {
            KvSource::Batch { k, v } => {
                need("k", k.len(), shape.kv_len())?;
                need("v", v.len(), shape.kv_len())?;
                (Some(k), Some(v), kv_len, None, self.kv_aligned(k, v))
            }
            KvSource::Canvases(c) => {
                let n = c.host.canvases();
                if n != shape.batch
                    || c.kv_width != shape.n_kv_heads * shape.head_dim
                    || shape.kv_stride() != c.kv_width
                    || c.host.keys.iter().any(|&keys| keys > shape.skv)
                {
                    return Err(Error::invalid(format!(
                        "attention: {n} canvas caches of rows {} wide with keys {:?} do not fit {shape:?}",
                        c.kv_width, c.host.keys
                    )));
                }
                need("canvas table", c.table.len(), 2 * n)?;
                need("canvas keys", c.keys.len(), n)?;
                c.host.check_rows(0)?;
                (None, None, Some(&c.keys), Some(&c.table), c.host.aligned)
            }
        };
        if let Some(kl) = kv_len {
            need("kv_len", kl.len(), shape.batch)?;
        }
        if shape.batch == 0 || shape.sq == 0 {
            return Ok(());
        }
        let (sq, skv) = (shape.sq as i32, shape.skv as i32);
        let (nh, nkv) = (shape.n_heads as i32, shape.n_kv_heads as i32);
        let qs = shape.q_stride() as i64;
        let os = shape.o_stride() as i64;
        let kvs = shape.kv_stride() as i64;
        let kvb = shape.kv_batch_stride() as i64;
        match variant {
            AttnVariant::Mma | AttnVariant::Mma2 | AttnVariant::Split | AttnVariant::Keys => {
                if !self.mma_fits(q, out, shape, kv_aligned) {
                    return Err(Error::invalid(format!(
                        "attention: the tensor-core kernels need head_dim 64 or 128, strides that are multiples of 8 and 16-byte aligned buffers ({shape:?})"
                    )));
                }
                let split = match (variant, plan) {
                    (AttnVariant::Split, Some(p)) => Some(p),
                    (AttnVariant::Split, None) => {
                        return Err(Error::invalid("attention: a split launch needs a plan"))
                    }
                    _ => None,
                };
                let keys = variant == AttnVariant::Keys;
                let func = self.kernel(variant, shape.head_dim);
                let splits = split.map_or(1, |p| p.splits);
                let rows_per_block = if keys { KEYS_ROWS } else { MMA_ROWS };
                let grid_x = shape.sq.div_ceil(rows_per_block) * splits;
                if grid_x > u32::MAX as usize
                    || split.is_some_and(|p| p.tiles_per_split > i32::MAX as usize)
                {
                    return Err(Error::invalid(format!(
                        "attention: split plan {split:?} exceeds the grid limits"
                    )));
                }
                let scale_log2 = std::f32::consts::LOG2_E / (shape.head_dim as f32).sqrt();
                let cfg = LaunchConfig {
                    grid_dim: (grid_x as u32, shape.n_heads as u32, shape.batch as u32),
                    block_dim: (if keys { KEYS_THREADS } else { THREADS }, 1, 1),
                    shared_mem_bytes: VariantsFit::bytes(variant, shape.head_dim) as u32,
                };
                let mut scratch = match split {
                    Some(p) => Some(self.split_scratch(&p, shape.head_dim)?),
                    None => None,
                };
                let tps = split.map_or(0, |p| p.tiles_per_split as i32);
                let mut b = Launch::new(&self.stream, func, self.pdl);
                push_tensors(&mut b, q, k.zip(v), out, kv_len);
                b.arg(&sq)
                    .arg(&skv)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&qs)
                    .arg(&os)
                    .arg(&kvs)
                    .arg(&kvb)
                    .arg(&scale_log2);
                push_or_null(&mut b, table);
                if let Some(sc) = scratch.as_mut() {
                    let ReductionScratch { ws, counters, .. } = &mut **sc;
                    b.arg(ws).arg(counters).arg(&tps);
                }
                // SAFETY: argument order and types match `attention_mma_d{64,128}` and
                // `attention_keys_d{64,128}` (plus ws, counters, tiles_per_split for
                // `attention_split_d{64,128}`); the buffer lengths were checked against the shape
                // above, the strides and alignment by `mma_supported`, and the grid covers exactly
                // the (row tile [× split], head, batch) space (row tiles of 64 rows, 32 for the
                // key-group kernel; split: x = q tiles × plan.splits, the kernel's
                // ceil(ceil(skv / 64) / tiles_per_split)). The split workspace holds
                // units·splits·128·(hd/8·4 + 4) floats and the counters `units` zeroed entries
                // (reset by the merging block), ordered on this stream.
                unsafe { b.launch(cfg) }
                    .map_err(|e| cuda_err("launch attention_mma/split/keys", e))?;
            }
            AttnVariant::Naive => {
                let smem = (shape.head_dim + shape.skv) * 4;
                if smem > NAIVE_SMEM_LIMIT {
                    return Err(Error::invalid(format!(
                        "attention_naive: head_dim + skv = {} floats exceeds its {NAIVE_SMEM_LIMIT}-byte shared-memory budget",
                        shape.head_dim + shape.skv
                    )));
                }
                let hd = shape.head_dim as i32;
                let scale = 1.0f32 / (shape.head_dim as f32).sqrt();
                let cfg = LaunchConfig {
                    grid_dim: (shape.sq as u32, shape.n_heads as u32, shape.batch as u32),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                let mut b = Launch::new(&self.stream, &self.naive_fn, self.pdl);
                push_tensors(&mut b, q, k.zip(v), out, kv_len);
                b.arg(&sq)
                    .arg(&skv)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&hd)
                    .arg(&qs)
                    .arg(&os)
                    .arg(&kvs)
                    .arg(&kvb)
                    .arg(&scale);
                push_or_null(&mut b, table);
                // SAFETY: argument order and types match `attention_naive`; buffer lengths were
                // checked against the shape and the shared memory holds head_dim + skv floats.
                unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch attention_naive", e))?;
            }
        }
        Ok(())
    }
}

/// The first five parameters of every attention kernel: q, k, v (null with per-canvas caches),
/// out, kv_len (null when absent).
fn push_tensors<'a, 'b: 'a>(
    b: &mut Launch<'a>,
    q: &'b CudaView<'_, u16>,
    kv: Option<(&'b CudaView<'_, u16>, &'b CudaView<'_, u16>)>,
    out: &'b mut CudaViewMut<'_, u16>,
    kv_len: Option<&'b CudaView<'_, i32>>,
) {
    b.arg(q);
    push_or_null(b, kv.map(|kv| kv.0));
    push_or_null(b, kv.map(|kv| kv.1));
    b.arg(out);
    push_or_null(b, kv_len);
}

/// A buffer parameter, or a null pointer in its place.
fn push_or_null<'a, 'b: 'a, T>(b: &mut Launch<'a>, buf: Option<&'b CudaView<'_, T>>) {
    static NULL: u64 = 0;
    match buf {
        Some(x) => b.arg(x),
        None => b.arg(&NULL),
    };
}

/// Where an attention call reads K and V.
enum KvSource<'a, 'b> {
    /// Batch buffers laid out as [`AttnShape`] says.
    Batch {
        k: &'a CudaView<'b, u16>,
        v: &'a CudaView<'b, u16>,
    },
    /// Each canvas's own cache.
    Canvases(&'a CanvasKvLayer<'b>),
}

mod checks;
pub use checks::{bench, self_check};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_fit_hopper_and_a100_but_only_two_slots_fit_99_kib() {
        use AttnVariant::*;
        let fit = |per_block: usize, per_sm: usize| VariantsFit { per_block, per_sm };
        let hopper = fit(227 * 1024, 228 * 1024);
        let a100 = fit(163 * 1024, 164 * 1024);
        let small = fit(99 * 1024, 100 * 1024); // compute capability 8.6 / 8.9
        for v in [Naive, Mma, Mma2, Split, Keys] {
            assert!(hopper.allows(v, 128) && a100.allows(v, 128), "{v:?}");
            // At head_dim 64 every kernel needs half: all fit 99 KiB.
            assert!(small.allows(v, 64), "{v:?}");
        }
        assert!(small.allows(Naive, 128) && small.allows(Mma2, 128));
        for v in [Mma, Split, Keys] {
            assert!(!small.allows(v, 128), "{v:?}");
        }
        // The boundaries are the kernels' byte counts at 128: 112 KiB (3 slots), 80 KiB (2),
        // 136 KiB (key groups).
        for (v, kib) in [(Mma, 112), (Split, 112), (Mma2, 80), (Keys, 136)] {
            assert!(fit(kib * 1024, 0).allows(v, 128), "{v:?}");
            assert!(!fit(kib * 1024 - 1, 0).allows(v, 128), "{v:?}");
        }
        // The plain kernel: 3 slots where two such blocks share an SM (Hopper), 2 slots on an
        // A100 (two 81 KiB blocks, but one 113 KiB block) and where 3 do not fit; at head_dim 64
        // (57 KiB with the reserve) the A100 keeps two 3-slot blocks per SM, 8.6 / 8.9 (100 KiB
        // per SM) does not.
        assert!(hopper.prefer_three_slots(128));
        assert!(!a100.prefer_three_slots(128) && !small.prefer_three_slots(128));
        assert!(a100.prefer_three_slots(64) && !small.prefer_three_slots(64));
        assert!(fit(usize::MAX, 2 * 113 * 1024).prefer_three_slots(128));
        assert!(!fit(usize::MAX, 2 * 113 * 1024 - 1).prefer_three_slots(128));
    }

    /// Runs the GPU self-check and bench (needs a CUDA device: `cargo test -- --ignored`).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_self_check_and_bench() {
        let dev = CudaDevice::open(0).expect("open CUDA device 0");
        let checks = self_check(&dev);
        let benches = bench(&dev);
        println!("{}", check::format_tables(&checks, &benches));
        assert!(checks.iter().all(|c| c.passed), "an attention check failed");
    }

    /// The K/V ring of `attention_mma_body` on the host, written from the kernel's schedule:
    /// the prologue requests tiles j0 .. j0 + STAGES − 2 (one cp.async group each, Q with the
    /// first, empty groups past the last tile); iteration j waits until at most the newest
    /// STAGES − 2 groups are pending, passes the block barrier, requests tile j + STAGES − 1
    /// into slot (j + STAGES − 1 − j0) % STAGES (a group, empty past the end) and computes
    /// tile j from slot (j − j0) % STAGES. Checked for every depth and tile count: tile j (and
    /// Q) has landed when it is read, no pending copy targets the slot being read, and a slot
    /// is refilled only after the barrier that follows every warp's last read of it.
    #[test]
    fn the_kv_ring_reads_only_landed_tiles_and_refills_only_finished_slots() {
        for stages in [2usize, 3, 4] {
            for j0 in [0usize, 5] {
                for n in 0..9usize {
                    let j1 = j0 + n;
                    // groups[g] = the tile group g copies (None: empty); done[g]: landed.
                    let mut groups: Vec<Option<usize>> = Vec::new();
                    let mut slot_tile: Vec<Option<usize>> = vec![None; stages];
                    // The last tile each slot was read for (all warps finish it before the
                    // next barrier).
                    let mut last_read: Vec<Option<usize>> = vec![None; stages];
                    let request =
                        |j: usize,
                         groups: &mut Vec<Option<usize>>,
                         slot_tile: &mut Vec<Option<usize>>,
                         read_done_before: usize,
                         last_read: &Vec<Option<usize>>| {
                            if j < j1 {
                                let slot = (j - j0) % stages;
                                // Everything read from this slot so far ended before the barrier.
                                if let Some(r) = last_read[slot] {
                                    assert!(
                                        r < read_done_before,
                                        "slot {slot} refilled for {j} while tile {r} may be read"
                                    );
                                }
                                slot_tile[slot] = Some(j);
                                groups.push(Some(j));
                            } else {
                                groups.push(None);
                            }
                        };
                    for p in 0..stages - 1 {
                        request(j0 + p, &mut groups, &mut slot_tile, j0, &last_read);
                    }
                    for j in j0..j1 {
                        // wait_group<STAGES - 2>: all but the newest STAGES - 2 groups landed.
                        let landed = groups.len() - (stages - 2);
                        let tile_group = groups.iter().position(|&g| g == Some(j)).unwrap();
                        assert!(tile_group < landed, "tile {j} read before it landed");
                        assert!(landed >= 1, "Q (group 0) landed");
                        // The barrier: every warp is done with tile j - 1.
                        request(j + stages - 1, &mut groups, &mut slot_tile, j, &last_read);
                        let slot = (j - j0) % stages;
                        assert_eq!(slot_tile[slot], Some(j), "slot {slot} holds tile {j}");
                        // No copy still pending targets the slot being read.
                        for g in groups.iter().skip(landed).flatten() {
                            assert_ne!(
                                (g - j0) % stages,
                                slot,
                                "tile {g} lands in slot {slot} during tile {j}"
                            );
                        }
                        last_read[slot] = Some(j);
                    }
                    // One group per prologue step and per iteration.
                    assert_eq!(groups.len(), stages - 1 + n);
                }
            }
        }
    }

    /// The split kernel's softmax arithmetic on the host, written from `attention_mma_body`:
    /// each split runs the online softmax over its 64-key tiles (log2 domain, running max `m`
    /// with base 0 while it is -inf, sum `l`, unnormalised `o`), then the merge takes the largest
    /// `m`, rescales every partial by exp2(m_s − m) and divides. Must equal one softmax over all
    /// valid keys, for any split, including splits whose keys are all masked and rows with no
    /// valid key (zeros). The key-group kernel (`attention_keys_body`) runs the same arithmetic
    /// with group `kg` of 4 taking tiles kg, kg + 4, …: checked here too, groups without a tile
    /// included.
    #[test]
    fn split_softmax_merge_equals_one_softmax() {
        let online = |scores: &[f32], vals: &[f32], valid: usize, tiles: &[usize]| {
            let (mut m, mut l, mut o) = (f32::NEG_INFINITY, 0f32, 0f32);
            for &j in tiles {
                let keys = j * 64..((j + 1) * 64).min(scores.len());
                let xs: Vec<f32> = keys
                    .clone()
                    .map(|i| {
                        if i < valid {
                            scores[i]
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let mx = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let nm = m.max(mx);
                let base = if nm == f32::NEG_INFINITY { 0.0 } else { nm };
                let alpha = (m - base).exp2();
                m = nm;
                l *= alpha;
                o *= alpha;
                for (x, i) in xs.iter().zip(keys) {
                    let p = (x - base).exp2();
                    l += p;
                    o += p * vals[i];
                }
            }
            (m, l, o)
        };
        let merge = |parts: &[(f32, f32, f32)]| {
            let gm = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
            let gb = if gm == f32::NEG_INFINITY { 0.0 } else { gm };
            let (mut l, mut o) = (0f32, 0f32);
            for &(m, ls, os) in parts {
                let w = (m - gb).exp2();
                l += ls * w;
                o += os * w;
            }
            if l > 0.0 {
                o / l
            } else {
                0.0
            }
        };
        let skv: usize = 300; // 5 tiles, the last partial
        let scores: Vec<f32> = (0..skv)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let vals: Vec<f32> = (0..skv)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0)
            .collect();
        let tiles = skv.div_ceil(64);
        for valid in [skv, 200, 65, 64, 1, 0] {
            let want = {
                let mx = scores[..valid]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let (mut l, mut o) = (0f64, 0f64);
                for i in 0..valid {
                    let p = ((scores[i] - mx) as f64).exp2();
                    l += p;
                    o += p * vals[i] as f64;
                }
                if valid == 0 {
                    0.0
                } else {
                    o / l
                }
            };
            let check = |parts: &[(f32, f32, f32)], what: String| {
                let got = merge(parts) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "valid {valid}, {what}: {got} vs {want}"
                );
                assert!(got.is_finite());
            };
            for tps in 1..=tiles {
                let parts: Vec<_> = (0..tiles.div_ceil(tps))
                    .map(|s| {
                        let t: Vec<usize> = (s * tps..((s + 1) * tps).min(tiles)).collect();
                        online(&scores, &vals, valid, &t)
                    })
                    .collect();
                check(&parts, format!("{tps} tiles per split"));
            }
            for n_tiles in [tiles, 3, 1] {
                let parts: Vec<_> = (0..KEY_GROUPS)
                    .map(|kg| {
                        let t: Vec<usize> = (kg..n_tiles).step_by(KEY_GROUPS).collect();
                        online(&scores, &vals, valid.min(n_tiles * 64), &t)
                    })
                    .collect();
                if valid <= n_tiles * 64 {
                    check(&parts, format!("key groups over {n_tiles} tiles"));
                }
            }
        }
    }

    #[test]
    fn key_groups_serve_small_grids_with_several_key_tiles() {
        // The b1 block step: 32 blocks for 132 SMs, 6 key tiles.
        assert!(keys_suit(&AttnShape::dense(1, 32, 384, 32, 32, 128), 132));
        // Batch 8 (256 blocks already), a full canvas (6 × 32 = 192), one key tile.
        assert!(!keys_suit(&AttnShape::dense(8, 32, 384, 32, 32, 128), 132));
        assert!(!keys_suit(&AttnShape::dense(1, 384, 384, 32, 32, 128), 132));
        assert!(!keys_suit(&AttnShape::dense(1, 32, 64, 32, 32, 128), 132));
        // The kernel's shared memory: 32 query rows + 4 × (K + V) tiles of 64 keys, bf16.
        assert_eq!(keys_smem_bytes(128), (32 + 4 * 128) * 128 * 2);
        assert!(keys_smem_bytes(128) <= 227 * 1024);
    }

    #[test]
    fn the_plain_kernels_ring_leaves_two_blocks_per_sm() {
        // 64 query rows + 3 × (K + V) tiles of 64 keys at head_dim 128: 112 KiB. Hopper has 228
        // KiB of shared memory per SM and reserves 1 KiB per block, so two blocks fit (the two
        // 80 KiB blocks of the 2-slot kernel did too); a 4th slot (144 KiB) would leave one.
        assert_eq!(mma_smem_bytes(128, MMA_STAGES), 112 * 1024);
        assert_eq!(mma_smem_bytes(128, 2), 80 * 1024);
        assert!(2 * (mma_smem_bytes(128, MMA_STAGES) + 1024) <= 228 * 1024);
        assert!(2 * (mma_smem_bytes(128, MMA_STAGES + 1) + 1024) > 228 * 1024);
    }

    #[test]
    fn split_plans_fill_small_grids_only() {
        // The b1 block step against 384 keys: 6 tiles, too few to split (measured slower).
        let block = AttnShape::dense(1, 32, 384, 32, 32, 128);
        assert_eq!(SplitPlan::new(&block, 132, 2), None);
        // A long prompt: 32 units on 132 SMs want 264 / 32 = 8 splits: 8 of 4 tiles.
        let long = AttnShape::dense(1, 32, 2048, 32, 32, 128);
        let p = SplitPlan::new(&long, 132, 2).unwrap();
        assert_eq!((p.units, p.splits, p.tiles_per_split), (32, 8, 4));
        assert_eq!(p.workspace_floats(128), 32 * 8 * 128 * 68);
        // 600 keys: 10 tiles, split 3 ways (4 + 4 + 2).
        let mid = AttnShape::dense(1, 32, 600, 32, 32, 128);
        assert_eq!(SplitPlan::new(&mid, 132, 2).map(|p| p.splits), Some(3));
        // Enough blocks already (batch 8: 256 units; a full canvas: 192), or one key tile.
        assert_eq!(
            SplitPlan::new(&AttnShape::dense(8, 32, 384, 32, 32, 128), 132, 2),
            None
        );
        assert_eq!(
            SplitPlan::new(&AttnShape::dense(1, 384, 384, 32, 32, 128), 132, 2),
            None
        );
        assert_eq!(
            SplitPlan::new(&AttnShape::dense(1, 32, 64, 32, 32, 128), 132, 2),
            None
        );
        // Every default plan stays within the workspace allocated at load (2 blocks per SM).
        for (b, sq, skv, h) in [
            (1, 1, 100_000, 1),
            (1, 32, 384, 32),
            (3, 7, 5000, 8),
            (2, 64, 130, 6),
        ] {
            let shape = AttnShape::dense(b, sq, skv, h, h, 128);
            if let Some(p) = SplitPlan::new(&shape, 132, 2) {
                assert!(p.units * p.splits <= 264, "{p:?}");
                assert!(p.splits * p.tiles_per_split >= skv.div_ceil(64));
                assert!((p.splits - 1) * p.tiles_per_split < skv.div_ceil(64));
            }
        }
        // One split block per SM (an A100 at head_dim 128: 113 of 164 KiB): the grid stays
        // within one wave, 132 / 32 = 4 splits of 8 tiles instead of 8 of 4.
        let a100 = VariantsFit {
            per_block: 166_912,
            per_sm: 167_936,
        };
        assert_eq!(a100.blocks_per_sm(AttnVariant::Split, 128), 1);
        assert_eq!(a100.blocks_per_sm(AttnVariant::Mma2, 128), 2);
        let p = SplitPlan::new(&long, 132, a100.blocks_per_sm(AttnVariant::Split, 128)).unwrap();
        assert_eq!((p.units, p.splits, p.tiles_per_split), (32, 4, 8));
        // A Hopper (228 KiB per SM) holds two at head_dim 128, four at 64 (counted as 2).
        let h100 = VariantsFit {
            per_block: 232_448,
            per_sm: 233_472,
        };
        assert_eq!(h100.blocks_per_sm(AttnVariant::Split, 128), 2);
        assert_eq!(h100.blocks_per_sm(AttnVariant::Split, 64), 4);
        assert_eq!(SplitPlan::new(&long, 132, 4), SplitPlan::new(&long, 132, 2));
        // Forced: 7 tiles by 2 → 4 splits (the last holds one tile).
        let p = SplitPlan::with_tiles_per_split(&AttnShape::dense(3, 100, 400, 6, 6, 64), 2);
        assert_eq!((p.units, p.splits), (2 * 6 * 3, 4));
    }

    #[test]
    fn shape_lengths_and_defaults() {
        let s = AttnShape::dense(2, 3, 5, 4, 2, 8);
        assert_eq!(s.q_len(), 2 * 3 * 4 * 8);
        assert_eq!(s.kv_len(), 2 * 5 * 2 * 8);
        // Cache of capacity 7 rows, keys in a fused row of 40 elements: the last batch element
        // needs only skv rows, and the last row only its own width.
        let c = AttnShape {
            kv_batch_stride: 7,
            kv_stride: 40,
            q_stride: 48,
            ..s
        };
        assert_eq!(c.kv_len(), (7 + 5 - 1) * 40 + 16);
        assert_eq!(c.q_len(), 5 * 48 + 32);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_shapes_are_explained() {
        let s = AttnShape::dense(1, 3, 5, 6, 4, 8);
        assert!(s.validate().unwrap_err().to_string().contains("divide"));
        let s = AttnShape {
            kv_batch_stride: 4,
            ..AttnShape::dense(1, 3, 5, 4, 4, 8)
        };
        assert!(s.validate().unwrap_err().to_string().contains("capacity"));
        let s = AttnShape {
            q_stride: 8,
            ..AttnShape::dense(1, 3, 5, 4, 4, 8)
        };
        assert!(s.validate().unwrap_err().to_string().contains("q_stride"));
    }
}
