//! Host side of `cuda/gemm.cu`: the engine's linear layers `C[M, N] = A[M, K] · Wᵀ` on tensor
//! cores (bf16 inputs, fp32 accumulation), their self-checks against an f64 host reference, and
//! their benches.
//!
//! `A` is bf16 row-major `[M, K]`, `W` is bf16 row-major `[N, K]` (PyTorch `Linear` layout, as
//! stored in the checkpoint), both as `u16` buffers of bf16 bits. The output is chosen with
//! [`GemmOut`]: store bf16, store fp32, or add into fp32 (`C += A·Wᵀ`, the fused residual add).
//! [`Gemm::run`] picks the kernel by `M` (see [`Gemm::variant_for_m`]): the weight-streaming
//! `skinny` kernel for `M ≤ 64` (split-K with a deterministic in-kernel reduction when `N` alone
//! cannot fill the GPU, see [`SkinnyPlan`]), otherwise the Hopper `wgmma` kernel
//! (`cuda/gemm_wgmma.cu`, sm_90a cubin, see [`WgmmaPlan`]) or the portable `wide` mma.sync
//! kernel. `naive` (one thread per output) is the always-correct fallback. [`Gemm::load`]
//! self-tests every fast kernel against `naive` on the device and stops `run` from using any
//! that disagrees ([`Gemm::disabled_variants`]). Design: docs/gemm-notes.md.

use super::check::{self, BenchResult, CheckResult, TOL_BF16, TOL_F32};
use super::gemm_cluster_split;
use super::gemm_mlp;
use super::gemm_norm::{EpiParams, NormFold};
use super::gemm_rope::RopeArgs;
use super::gemm_stream::{self, StreamPlan, STREAM_MAX_M, STREAM_THREADS};
use super::gemm_tma::{self, OperandBox};
use super::launch::Launch;
use super::scratch::ReductionScratch;
use super::{cuda_err, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use half::bf16;
use rayon::prelude::*;
use std::sync::Mutex;

/// Largest `M` served by the skinny kernel (8 tokens per mma group, at most 8 groups).
pub const SKINNY_MAX_M: usize = 64;
/// Weight rows per skinny block (4 warps × 16); must match `SKINNY_ROWS` in gemm.cu.
const SKINNY_ROWS: usize = 64;
/// Threads per skinny block; must match `SKINNY_THREADS` in gemm.cu.
const SKINNY_THREADS: usize = 128;
/// K elements per skinny chunk (one 16-byte load per lane and row).
const SKINNY_CHUNK: usize = 32;
/// Chunks loaded per skinny loop iteration; must match `SKINNY_UNROLL` in gemm.cu.
const SKINNY_UNROLL: usize = 4;
/// Largest `M` served by version 2 of the skinny kernel (`gemm_skinny2_mg{1..4}`).
pub const SKINNY2_MAX_M: usize = 32;
/// 16-row weight tiles per warp in version 2 (block = 4 warps × 32 rows); must match
/// `SKINNY2_RT` in gemm.cu.
const SKINNY2_RT: usize = 2;
/// Chunks per register buffer in version 2; must match `SKINNY2_UNROLL` in gemm.cu.
const SKINNY2_UNROLL: usize = 2;
/// Fewest K chunks a split is given (below this the reduction costs more than it saves).
const SKINNY_MIN_CHUNKS_PER_SPLIT: usize = 8;
/// Blocks per SM the split-K heuristic aims for (about 16 warps, ~64 KB of loads in flight).
const SKINNY_BLOCKS_PER_SM: usize = 4;
/// Wide kernel block tile and threads; must match `WIDE_*` in gemm.cu.
const WIDE_BM: usize = 128;
const WIDE_BN: usize = 128;
const WIDE_THREADS: u32 = 256;
const WIDE_SMEM_BYTES: u32 = 4 * 2 * 128 * 32 * 2;
/// K elements per wide pipeline stage.
const WIDE_BK: usize = 32;
/// Resident wide blocks per SM (64 KiB shared memory and ≤ 128 registers each).
const WIDE_BLOCKS_PER_SM: usize = 2;
/// Fewest K tiles a wide split is given (1024 K).
const WIDE_MIN_KTILES_PER_SPLIT: usize = 32;
/// Threads per naive block.
const NAIVE_THREADS: u32 = 256;
/// wgmma kernel: N columns per block tile (one m64n192k16 per warpgroup and k16 step), K per
/// pipeline stage; must match `WG_BN` / `WG_BK` in gemm_wgmma.cu.
const WGMMA_BN: usize = 192;
pub(super) const WGMMA_BK: usize = 64;
/// Fewest K tiles a wgmma split is given (1024 K).
const WGMMA_MIN_KTILES_PER_SPLIT: usize = 16;
/// Split-K overhead in K-tile units per split (partial tile written, read back, reduced).
const WGMMA_SPLIT_COST_KTILES: usize = 3;
/// The same for a split reduced through distributed shared memory ([`gemm_cluster_split`]):
/// the partial parked in shared memory and read once by a peer, no L2 round trip, the epilogue
/// shared. An estimate (session 10, no GPU) for the sweep to calibrate.
const CLUSTER_SPLIT_COST_KTILES: usize = 1;
/// Modelled time of a paired TMA plan relative to `gemm_wgmma` on the same tiles (9/10): the
/// pairs ran 10–12 % faster on every shape measured on an H200 (2026-11-27: M = 384 × 12288 ×
/// 4096 0.0639 vs 0.0710 ms, M = 3072 0.4583 vs 0.5150, the LM head at M = 384 0.5890 vs 0.6714).
const TMA_PAIR_COST: (usize, usize) = (9, 10);

/// Dynamic shared memory of `gemm_wgmma_wg{wg}` (`WgCfg<WG>::SMEM_BYTES` in gemm_wgmma.cu).
pub(super) fn wgmma_smem_bytes(wg: usize) -> u32 {
    let stage = (64 * wg + WGMMA_BN) * 128;
    let stages = if wg == 2 { 5 } else { 4 };
    (stages * stage + 1024) as u32
}

/// How the product is written to `C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `C = A·Wᵀ` rounded to bf16 (nearest even).
    StoreBf16,
    /// `C = A·Wᵀ` in fp32.
    StoreF32,
    /// `C += A·Wᵀ` in fp32 (residual add).
    AddF32,
    /// SwiGLU of the fused gate/up projection: W's rows interleaved as
    /// [`super::swiglu_layout`] lays them out, `C` bf16 `[M, N / 2]` = `silu(gate) · up` (every
    /// kernel but the naive one; `N` a multiple of 16).
    SwigluBf16,
    /// RoPE and the K/V cache write of the fused QKV projection (q and k rows in the grouped
    /// order of [`super::rope_layout`]; the stream, wgmma and TMA kernels): [`super::gemm_rope`].
    RopeQkv,
}

impl Epilogue {
    /// The three plain epilogues, for checks (the fused SwiGLU has its own,
    /// [`super::gemm_swiglu::self_check`]).
    pub const ALL: [Epilogue; 3] = [Epilogue::StoreBf16, Epilogue::StoreF32, Epilogue::AddF32];

    /// The `epi` code the kernels take (`DLLM_EPI_*` in gemm.cu).
    fn code(self) -> i32 {
        match self {
            Epilogue::StoreBf16 => 0,
            Epilogue::StoreF32 => 1,
            Epilogue::AddF32 => 2,
            Epilogue::SwigluBf16 => 3,
            Epilogue::RopeQkv => 4,
        }
    }

    /// The epilogue [`Epilogue::name`] calls `name`.
    pub fn from_name(name: &str) -> Option<Epilogue> {
        Epilogue::ALL
            .into_iter()
            .chain([Epilogue::SwigluBf16])
            .find(|e| e.name() == name)
    }

    /// Whether the output is bf16 (else fp32).
    pub fn bf16_out(self) -> bool {
        matches!(
            self,
            Epilogue::StoreBf16 | Epilogue::SwigluBf16 | Epilogue::RopeQkv
        )
    }

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Epilogue::StoreBf16 => "bf16",
            Epilogue::StoreF32 => "f32",
            Epilogue::AddF32 => "add_f32",
            Epilogue::SwigluBf16 => "swiglu_bf16",
            Epilogue::RopeQkv => "rope_qkv",
        }
    }
}

/// The output of a GEMM; the variant selects the [`Epilogue`]. Holds `M·N` elements (or more).
pub enum GemmOut<'a> {
    /// bf16 bits, overwritten.
    Bf16(CudaViewMut<'a, u16>),
    /// fp32, overwritten.
    F32(CudaViewMut<'a, f32>),
    /// fp32, accumulated into (`C += A·Wᵀ`).
    AddF32(CudaViewMut<'a, f32>),
    /// bf16 bits, `[M, N / 2]`: [`Epilogue::SwigluBf16`].
    SwigluBf16(CudaViewMut<'a, u16>),
    /// bf16 bits, `[M, N]`, with the caches and table the parameters name:
    /// [`Epilogue::RopeQkv`].
    RopeQkv(CudaViewMut<'a, u16>, RopeArgs),
}

impl GemmOut<'_> {
    /// The epilogue this output asks for.
    pub fn epilogue(&self) -> Epilogue {
        match self {
            GemmOut::Bf16(_) => Epilogue::StoreBf16,
            GemmOut::F32(_) => Epilogue::StoreF32,
            GemmOut::AddF32(_) => Epilogue::AddF32,
            GemmOut::SwigluBf16(_) => Epilogue::SwigluBf16,
            GemmOut::RopeQkv(..) => Epilogue::RopeQkv,
        }
    }

    /// Product elements (of the `M × N` product) the output covers: its length, or twice it
    /// for the fused SwiGLU, which writes one value per gate/up pair.
    fn covers(&self) -> usize {
        match self {
            GemmOut::Bf16(v) | GemmOut::RopeQkv(v, _) => v.len(),
            GemmOut::SwigluBf16(v) => v.len().saturating_mul(2),
            GemmOut::F32(v) | GemmOut::AddF32(v) => v.len(),
        }
    }

    /// Device address and the alignment the kernels need for it (element pairs are stored).
    fn addr_and_align(&self, dev: &CudaDevice) -> (u64, u64) {
        match self {
            GemmOut::Bf16(v) | GemmOut::SwigluBf16(v) | GemmOut::RopeQkv(v, _) => {
                (v.device_ptr(&dev.stream).0, 4)
            }
            GemmOut::F32(v) | GemmOut::AddF32(v) => (v.device_ptr(&dev.stream).0, 8),
        }
    }
}

/// The gate/up input of [`Gemm::run_mlp`]: its rows, or the attention-output projection that
/// writes them in the same launch (the layer tail).
pub enum MlpInput<'a, 'b> {
    /// `x`: `[m, hidden]` bf16, written before the launch.
    Rows(&'a CudaView<'b, u16>),
    /// `r += o · w_oᵀ` first, with the MLP norm folded: its prep writes `x ⊙ γ` (the gate/up
    /// input) and the partial sums of the gate/up job's row scale.
    AfterOut(MlpOutJob<'a, 'b>),
}

/// The attention-output job of the layer tail ([`MlpInput::AfterOut`]): `o` `[m, hidden]`, `w_o`
/// `[hidden, hidden]`, the MLP norm's prep and epsilon.
pub struct MlpOutJob<'a, 'b> {
    pub o: &'a CudaView<'b, u16>,
    pub w_o: &'a CudaView<'b, u16>,
    pub prep: super::gemm_norm::NormPrep<'a, 'b>,
    pub eps: f32,
}

/// Which kernel computes the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmVariant {
    /// One thread per output, fp32 FMA loop: slow, always correct.
    Naive,
    /// Weight streaming for `M ≤ SKINNY_MAX_M` (bandwidth bound).
    Skinny,
    /// Shared-memory tiled mma.sync GEMM for any `M` (portable fallback of `Wgmma`).
    Wide,
    /// Hopper warpgroup-MMA GEMM for any `M` (sm_90a only; compute bound at large `M`).
    Wgmma,
}

impl GemmVariant {
    /// The preferred variant for `m` rows when every kernel is available (see
    /// [`Gemm::variant_for_m`] for what `run` actually uses).
    pub fn for_m(m: usize) -> GemmVariant {
        if m <= SKINNY_MAX_M {
            GemmVariant::Skinny
        } else {
            GemmVariant::Wgmma
        }
    }

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            GemmVariant::Naive => "naive",
            GemmVariant::Skinny => "skinny",
            GemmVariant::Wide => "wide",
            GemmVariant::Wgmma => "wgmma",
        }
    }
}

/// Launch geometry of the skinny kernel: `groups` 8-token mma groups, `tiles` blocks of
/// [`SkinnyPlan::rows`] weight rows along N, and `splits` blocks along K, each taking
/// `chunks_per_split` chunks of 32 K elements (the last split may take fewer). `version` 1 is
/// `gemm_skinny_mg{groups}` (16 weight rows per warp, 64 per block, any `m ≤ 64`); version 2 is
/// `gemm_skinny2_mg{groups}` (32 rows per warp, 128 per block, `m ≤ 32`): each activation
/// fragment serves twice as many weight rows, halving the activation re-reads per weight byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyPlan {
    pub groups: usize,
    pub tiles: usize,
    pub splits: usize,
    pub chunks_per_split: usize,
    pub version: usize,
}

impl SkinnyPlan {
    /// The plan [`Gemm::run`] uses on a GPU with `num_sms` multiprocessors: split K into the
    /// largest number of splits whose blocks still fit in one wave of `SKINNY_BLOCKS_PER_SM`
    /// blocks per SM (a grid slightly larger than one wave leaves a slow, nearly empty second
    /// wave: 192 tiles × 3 splits = 576 blocks on 528 slots was measured at ~55 % of copy
    /// bandwidth), never below `SKINNY_MIN_CHUNKS_PER_SPLIT` chunks per split, with a chunk
    /// count per split that is a multiple of the kernel's unroll. Requires `1 ≤ m ≤ 64`,
    /// `n ≥ 1`, `k ≥ 1`.
    /// The preferred version is 2 for `m ≤ SKINNY2_MAX_M`, else 1.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> SkinnyPlan {
        SkinnyPlan::for_version(SkinnyPlan::preferred_version(m), m, n, k, num_sms)
    }

    /// The kernel version [`SkinnyPlan::new`] picks for `m` rows.
    pub fn preferred_version(m: usize) -> usize {
        if m <= SKINNY2_MAX_M {
            2
        } else {
            1
        }
    }

    /// The version a request resolves to: 2 only when asked for and `m ≤ SKINNY2_MAX_M`.
    fn resolve_version(version: usize, m: usize) -> usize {
        if version == 2 && m <= SKINNY2_MAX_M {
            2
        } else {
            1
        }
    }

    /// [`SkinnyPlan::new`] for an explicit kernel version (2 falls back to 1 when `m > 32`).
    pub fn for_version(version: usize, m: usize, n: usize, k: usize, num_sms: usize) -> SkinnyPlan {
        let version = SkinnyPlan::resolve_version(version, m);
        let tiles = n.div_ceil(SkinnyPlan::rows_of(version));
        let chunks = k.div_ceil(SKINNY_CHUNK);
        let slots = num_sms.max(1) * SKINNY_BLOCKS_PER_SM;
        let max_splits = (chunks / SKINNY_MIN_CHUNKS_PER_SPLIT).max(1);
        let splits = (slots / tiles.max(1)).clamp(1, max_splits);
        let unroll = if version == 2 {
            SKINNY2_UNROLL
        } else {
            SKINNY_UNROLL
        };
        let per_split = chunks.div_ceil(splits).next_multiple_of(unroll);
        SkinnyPlan::with_version_chunks(version, m, n, k, per_split)
    }

    /// A version-1 plan with a given number of chunks per split (checks use it to force
    /// split-K on small shapes). `chunks_per_split` is raised to at least 1.
    pub fn with_chunks_per_split(
        m: usize,
        n: usize,
        k: usize,
        chunks_per_split: usize,
    ) -> SkinnyPlan {
        SkinnyPlan::with_version_chunks(1, m, n, k, chunks_per_split)
    }

    /// [`SkinnyPlan::with_chunks_per_split`] for an explicit kernel version (2 falls back to 1
    /// when `m > 32`).
    pub fn with_version_chunks(
        version: usize,
        m: usize,
        n: usize,
        k: usize,
        chunks_per_split: usize,
    ) -> SkinnyPlan {
        let version = SkinnyPlan::resolve_version(version, m);
        let chunks = k.div_ceil(SKINNY_CHUNK).max(1);
        let per_split = chunks_per_split.max(1);
        SkinnyPlan {
            groups: m.div_ceil(8).max(1),
            tiles: n.div_ceil(SkinnyPlan::rows_of(version)),
            splits: chunks.div_ceil(per_split),
            chunks_per_split: per_split,
            version,
        }
    }

    fn rows_of(version: usize) -> usize {
        if version == 2 {
            SKINNY_ROWS * SKINNY2_RT
        } else {
            SKINNY_ROWS
        }
    }

    /// Weight rows per block (64 for version 1, 128 for version 2).
    pub fn rows(&self) -> usize {
        SkinnyPlan::rows_of(self.version)
    }

    /// fp32 elements of split-K workspace the launch needs (0 without split-K).
    pub fn workspace_floats(&self) -> usize {
        let rt = if self.version == 2 { SKINNY2_RT } else { 1 };
        if self.splits > 1 {
            self.tiles * self.splits * rt * self.groups * SKINNY_THREADS * 4
        } else {
            0
        }
    }
}

/// Launch geometry of the wide kernel: `m_tiles × n_tiles` output tiles of 128×128, each split
/// along K into `splits` blocks of `ktiles_per_split` 32-wide K tiles (the last may take fewer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidePlan {
    pub m_tiles: usize,
    pub n_tiles: usize,
    pub splits: usize,
    pub ktiles_per_split: usize,
}

impl WidePlan {
    /// The plan [`Gemm::run`] uses: split K only when the output tiles cannot fill one wave of
    /// `WIDE_BLOCKS_PER_SM` blocks per SM, as far as still fits in that wave, never below
    /// `WIDE_MIN_KTILES_PER_SPLIT` K tiles per split. Requires `m, n, k ≥ 1`.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> WidePlan {
        let tiles = m.div_ceil(WIDE_BM) * n.div_ceil(WIDE_BN);
        let ktiles = k.div_ceil(WIDE_BK);
        let slots = num_sms.max(1) * WIDE_BLOCKS_PER_SM;
        let max_splits = (ktiles / WIDE_MIN_KTILES_PER_SPLIT).max(1);
        let splits = (slots / tiles.max(1)).clamp(1, max_splits);
        WidePlan::with_ktiles_per_split(m, n, k, ktiles.div_ceil(splits))
    }

    /// A plan with a given number of K tiles per split (checks use it to force split-K on
    /// small shapes). `ktiles_per_split` is raised to at least 1.
    pub fn with_ktiles_per_split(
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
    ) -> WidePlan {
        let per_split = ktiles_per_split.max(1);
        WidePlan {
            m_tiles: m.div_ceil(WIDE_BM),
            n_tiles: n.div_ceil(WIDE_BN),
            splits: k.div_ceil(WIDE_BK).max(1).div_ceil(per_split),
            ktiles_per_split: per_split,
        }
    }

    /// Output tiles (blocks per split).
    pub fn tiles(&self) -> usize {
        self.m_tiles * self.n_tiles
    }

    /// fp32 elements of split-K workspace the launch needs (0 without split-K).
    pub fn workspace_floats(&self) -> usize {
        if self.splits > 1 {
            self.tiles() * self.splits * WIDE_BM * WIDE_BN
        } else {
            0
        }
    }
}

/// Launch geometry of the wgmma kernel: `gemm_wgmma_wg{wg}` (block tile `64·wg × 192`),
/// `m_tiles × n_tiles` output tiles, each split along K into `splits` blocks of
/// `ktiles_per_split` 64-wide K tiles (the last may take fewer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgmmaPlan {
    pub wg: usize,
    pub m_tiles: usize,
    pub n_tiles: usize,
    pub splits: usize,
    pub ktiles_per_split: usize,
    /// For the cluster kernel `gemm_tma` (blocks in pairs along M): `m_tiles` is rounded up to
    /// an even count (a block past M loads zeros and stores nothing).
    pub paired: bool,
    /// Cluster blocks along N of a paired plan: 1 (pairs, `gemm_tma`) or 2 (2 × 2 quads that
    /// also share the A tile, `gemm_tma4`; `n_tiles` rounded up to even, a phantom N tile
    /// loading zeros and storing nothing).
    pub cluster_n: usize,
}

impl WgmmaPlan {
    /// The plan `gemm_wgmma` runs on `num_sms` multiprocessors (one block per SM): the block
    /// height (128 or 192 rows) and K split that minimise the modelled time
    /// `waves · BM · (K tiles per split + split overhead)`, ties (within 5 %) going to the
    /// taller tile (more work per shared-memory byte). Splits only while all blocks fit in
    /// one wave, never below `WGMMA_MIN_KTILES_PER_SPLIT` K tiles per split.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> WgmmaPlan {
        WgmmaPlan::search(m, n, k, num_sms, false, false).0
    }

    /// The plan [`Gemm::run`] uses when the TMA cluster kernel is active: [`WgmmaPlan::new`]'s
    /// search with the plans that pair without a phantom tile (even M tile count) costed at
    /// `TMA_PAIR_COST` of the others, as measured; returned [`WgmmaPlan::paired`] when such a
    /// plan wins. At M = 384 on the down projection (4096 × 12288) this picks 2 × 22 tiles of
    /// 192 rows × 3 splits in pairs over `gemm_wgmma`'s 3 × 22 of 128 rows × 2 splits.
    pub fn with_tma(m: usize, n: usize, k: usize, num_sms: usize) -> WgmmaPlan {
        WgmmaPlan::search(m, n, k, num_sms, true, false).0
    }

    /// The launch [`WgmmaPlan::with_tma`]'s search picks when the cluster-split kernels are
    /// active too: a split plan that one of them runs ([`gemm_cluster_split::KERNELS`]) is costed
    /// with `CLUSTER_SPLIT_COST_KTILES` per split instead of the workspace's
    /// `WGMMA_SPLIT_COST_KTILES` (and without the TMA pairs' discount), so it can win over the
    /// pairs: `GemmPlan::ClusterSplit`, `GemmPlan::Tma` (pairs, `tma` only) or `GemmPlan::Wgmma`.
    pub fn launch_for(m: usize, n: usize, k: usize, num_sms: usize, tma: bool) -> GemmPlan {
        match WgmmaPlan::search(m, n, k, num_sms, tma, true) {
            (p, true) => GemmPlan::ClusterSplit(p),
            (p, false) if p.paired => GemmPlan::Tma(p),
            (p, false) => GemmPlan::Wgmma(p),
        }
    }

    /// The cheapest plan (paired where the pairs win, with `tma`) and whether it runs as
    /// clusters (only with `cluster`).
    fn search(
        m: usize,
        n: usize,
        k: usize,
        num_sms: usize,
        tma: bool,
        cluster: bool,
    ) -> (WgmmaPlan, bool) {
        let sms = num_sms.max(1);
        let ktiles = k.div_ceil(WGMMA_BK).max(1);
        let max_splits = (ktiles / WGMMA_MIN_KTILES_PER_SPLIT).max(1);
        let mut best: Option<(usize, WgmmaPlan, bool)> = None;
        for wg in [3usize, 2] {
            let bm = 64 * wg;
            let tiles = WgmmaPlan::build(wg, m, n, k, ktiles, false).tiles();
            for splits in 1..=max_splits {
                if splits > 1 && tiles * splits > sms {
                    break;
                }
                let kps = ktiles.div_ceil(splits);
                let plan = WgmmaPlan::build(wg, m, n, k, kps, false);
                let waves = (tiles * plan.splits).div_ceil(sms);
                // ×20 for wg = 3, ×21 for wg = 2: the 5 % preference for taller tiles.
                let cost_with = |per_split: usize| {
                    let overhead = if plan.splits > 1 {
                        per_split * plan.splits
                    } else {
                        0
                    };
                    waves * bm * (kps + overhead) * if wg == 3 { 20 } else { 21 }
                };
                let plain = cost_with(WGMMA_SPLIT_COST_KTILES);
                let mut options = vec![(plain, plan, false)];
                if tma && plan.m_tiles % 2 == 0 {
                    let paired = plain * TMA_PAIR_COST.0 / TMA_PAIR_COST.1;
                    options.push((paired, plan.paired(), false));
                }
                if cluster && gemm_cluster_split::kernel_index(&plan).is_some() {
                    options.push((cost_with(CLUSTER_SPLIT_COST_KTILES), plan, true));
                }
                for option in options {
                    if best.as_ref().is_none_or(|b| option.0 < b.0) {
                        best = Some(option);
                    }
                }
            }
        }
        best.map_or_else(
            || (WgmmaPlan::build(3, m, n, k, ktiles, false), false),
            |(_, p, clusters)| (p, clusters),
        )
    }

    /// A plan with a given kernel (`wg` 2 or 3; other values are clamped) and number of K tiles
    /// per split (checks use it to force split-K). `ktiles_per_split` is raised to at least 1.
    pub fn with_ktiles_per_split(
        wg: usize,
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
    ) -> WgmmaPlan {
        WgmmaPlan::build(wg, m, n, k, ktiles_per_split, false)
    }

    /// This plan for the paired TMA kernel: the same tiles and split, the M tile count rounded
    /// up to even (a phantom tile, when added, loads zeros and stores nothing).
    pub fn paired(&self) -> WgmmaPlan {
        WgmmaPlan {
            m_tiles: self.m_tiles.next_multiple_of(2),
            paired: true,
            ..*self
        }
    }

    /// The kernel that runs this plan, for reports: `wgmma`, `tma` (pairs) or `tma4` (quads).
    pub fn kind(&self) -> &'static str {
        match (self.paired, self.cluster_n) {
            (false, _) => "wgmma",
            (true, 2) => "tma4",
            (true, _) => "tma",
        }
    }

    /// This plan for the quad TMA kernel `gemm_tma4`: [`WgmmaPlan::paired`] with the N tile
    /// count also rounded up to even.
    pub fn quad(&self) -> WgmmaPlan {
        let pairs = self.paired();
        WgmmaPlan {
            n_tiles: pairs.n_tiles.next_multiple_of(2),
            cluster_n: 2,
            ..pairs
        }
    }

    /// [`WgmmaPlan::with_ktiles_per_split`] for the paired TMA kernel (even `m_tiles`).
    pub fn paired_with_ktiles_per_split(
        wg: usize,
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
    ) -> WgmmaPlan {
        WgmmaPlan::build(wg, m, n, k, ktiles_per_split, true)
    }

    fn build(
        wg: usize,
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
        paired: bool,
    ) -> WgmmaPlan {
        let wg = wg.clamp(2, 3);
        let per_split = ktiles_per_split.max(1);
        let m_tiles = m.div_ceil(64 * wg);
        WgmmaPlan {
            wg,
            m_tiles: if paired {
                m_tiles.next_multiple_of(2)
            } else {
                m_tiles
            },
            n_tiles: n.div_ceil(WGMMA_BN),
            splits: k.div_ceil(WGMMA_BK).max(1).div_ceil(per_split),
            ktiles_per_split: per_split,
            paired,
            cluster_n: 1,
        }
    }

    /// Output tiles (blocks per split).
    pub fn tiles(&self) -> usize {
        self.m_tiles * self.n_tiles
    }

    /// Rows per block tile.
    pub fn bm(&self) -> usize {
        64 * self.wg
    }

    /// fp32 elements of split-K workspace the launch needs (0 without split-K).
    pub fn workspace_floats(&self) -> usize {
        if self.splits > 1 {
            self.tiles() * self.splits * self.bm() * WGMMA_BN
        } else {
            0
        }
    }
}

/// Checks the shape contract: `m, n, k ≥ 1`, `k % 8 == 0`, `n % 8 == 0`, everything fits the
/// kernels' 32-bit sizes, and the buffers hold `m·k`, `n·k` and `m·n` elements.
pub fn validate(
    m: usize,
    n: usize,
    k: usize,
    a_len: usize,
    w_len: usize,
    out_len: usize,
) -> Result<()> {
    if m == 0 || n == 0 || k == 0 {
        return Err(Error::invalid(format!(
            "gemm: empty shape m={m} n={n} k={k} (all must be ≥ 1)"
        )));
    }
    if k % 8 != 0 {
        return Err(Error::invalid(format!(
            "gemm: k={k} is not a multiple of 8 (16-byte rows are required)"
        )));
    }
    if n % 8 != 0 {
        return Err(Error::invalid(format!(
            "gemm: n={n} is not a multiple of 8"
        )));
    }
    for (what, v) in [("m", m), ("n", n), ("k", k)] {
        if v > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "gemm: {what}={v} does not fit in i32"
            )));
        }
    }
    let need = |what: &str, have: usize, rows: usize, cols: usize| -> Result<()> {
        let want = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::invalid(format!("gemm: {what} size overflows")))?;
        if have < want {
            return Err(Error::invalid(format!(
                "gemm: {what} holds {have} elements, needs {rows}×{cols} = {want} (m={m} n={n} k={k})"
            )));
        }
        Ok(())
    };
    need("A", a_len, m, k)?;
    need("W", w_len, n, k)?;
    need("C", out_len, m, n)
}

fn check_align(what: &str, addr: u64, align: u64) -> Result<()> {
    if addr % align != 0 {
        return Err(Error::invalid(format!(
            "gemm: {what} device address {addr:#x} is not {align}-byte aligned (offset views by whole rows)"
        )));
    }
    Ok(())
}

/// The kernel and geometry of one launch ([`Gemm::run_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPlan {
    Naive,
    Skinny(SkinnyPlan),
    Wide(WidePlan),
    Wgmma(WgmmaPlan),
    Stream(StreamPlan),
    /// `gemm_tma` (clusters of two blocks along M; the plan has `paired` set), or `gemm_tma4`
    /// (2 × 2 quads) when the plan's `cluster_n` is 2.
    Tma(WgmmaPlan),
    /// A `gemm_wgmma` split-K plan run by `gemm_wgmma_wg{wg}_cs{splits}`: the splits of a tile
    /// are one cluster and reduce through distributed shared memory ([`gemm_cluster_split`]).
    ClusterSplit(WgmmaPlan),
}

impl GemmPlan {
    /// Whether the plan's kernel has the RoPE epilogue ([`GemmOut::RopeQkv`]): the stream,
    /// wgmma and TMA kernels.
    pub fn has_rope_epilogue(&self) -> bool {
        matches!(
            self,
            GemmPlan::Stream(_) | GemmPlan::Wgmma(_) | GemmPlan::Tma(_)
        )
    }

    /// Whether the plan's kernel has the RMSNorm fold's prep and row scale
    /// ([`super::gemm_norm`]): the stream, wgmma, TMA and cluster-split kernels.
    pub fn has_norm_fold(&self) -> bool {
        matches!(
            self,
            GemmPlan::Stream(_) | GemmPlan::Wgmma(_) | GemmPlan::Tma(_) | GemmPlan::ClusterSplit(_)
        )
    }

    /// Refuses a plan that is not what its constructor gives for `m × n × k` (a hand-made plan
    /// could otherwise launch a grid that does not cover the output, or overruns a buffer).
    pub(super) fn check_fits(&self, m: usize, n: usize, k: usize) -> Result<()> {
        let fits = match *self {
            GemmPlan::Naive => true,
            GemmPlan::Skinny(p) => {
                m <= SKINNY_MAX_M
                    && p == SkinnyPlan::with_version_chunks(p.version, m, n, k, p.chunks_per_split)
            }
            GemmPlan::Wide(p) => p == WidePlan::with_ktiles_per_split(m, n, k, p.ktiles_per_split),
            GemmPlan::Wgmma(p) => {
                p == WgmmaPlan::with_ktiles_per_split(p.wg, m, n, k, p.ktiles_per_split)
            }
            GemmPlan::ClusterSplit(p) => {
                p == WgmmaPlan::with_ktiles_per_split(p.wg, m, n, k, p.ktiles_per_split)
                    && gemm_cluster_split::kernel_index(&p).is_some()
            }
            GemmPlan::Stream(p) => StreamPlan::with_blocks(m, n, k, p.blocks).is_ok_and(|q| q == p),
            GemmPlan::Tma(p) => {
                let pairs =
                    WgmmaPlan::paired_with_ktiles_per_split(p.wg, m, n, k, p.ktiles_per_split);
                p == pairs || p == pairs.quad()
            }
        };
        if fits {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "gemm: plan {self:?} does not fit m={m} n={n} k={k}"
            )))
        }
    }
}

/// The loaded GEMM kernels of one device.
pub struct Gemm {
    naive: CudaFunction,
    skinny: Vec<CudaFunction>,
    /// `gemm_skinny2_mg{1..4}` (version 2 of the skinny kernel).
    skinny2: Vec<CudaFunction>,
    /// Why version 2 of the skinny kernel failed the load-time self-test; `run` then uses
    /// version 1 (which has its own self-test entry under [`GemmVariant::Skinny`]).
    skinny2_failure: Option<String>,
    /// `gemm_stream_mg{1..4}` (`cuda/gemm_stream.cu`, compute_90 PTX); not loaded with
    /// `DLLM_GEMM_STREAM=0` or in the Ampere build.
    stream: Option<Vec<CudaFunction>>,
    /// Why the stream kernel could not be loaded or failed the load-time self-test; `run` then
    /// keeps the skinny kernels.
    stream_failure: Option<String>,
    /// `gemm_tma_wg2`, `gemm_tma_wg3` (`cuda/gemm_tma.cu`); not loaded with `DLLM_GEMM_TMA=0`.
    tma: Option<[CudaFunction; 2]>,
    /// `gemm_tma4_wg2`, `gemm_tma4_wg3` (the quads); loaded only with `DLLM_GEMM_TMA4=1`.
    tma4: Option<[CudaFunction; 2]>,
    /// Why the requested quad kernel is not used (load error or self-test failure).
    tma4_failure: Option<String>,
    /// The cluster-split `gemm_wgmma` kernels ([`gemm_cluster_split`]); loaded only with
    /// `DLLM_GEMM_CLUSTER_SPLIT=1`.
    cluster_split: Option<gemm_cluster_split::ClusterSplit>,
    /// Why the requested cluster-split kernels are not used (load error or self-test failure).
    cluster_split_failure: Option<String>,
    /// Clusters resident at once ([`gemm_tma::resident_clusters`]) of the pairs and the quads,
    /// per block height (wg 2, wg 3), where loaded and known.
    resident_clusters: [[Option<usize>; 2]; 2],
    /// Why the requested TMA kernel is not used (cannot load, or failed the self-test).
    tma_failure: Option<String>,
    wide: CudaFunction,
    /// `gemm_wgmma_wg2`, `gemm_wgmma_wg3`; `None` when the device cannot run the sm_90a cubin.
    wgmma: Option<[CudaFunction; 2]>,
    num_sms: usize,
    /// Blocks of the stream kernel's plans ([`gemm_stream::StreamBlocks::from_env`]).
    stream_blocks: gemm_stream::StreamBlocks,
    /// Ring depth of the loaded stream kernel ([`gemm_stream::stages_of`]).
    stream_stages: usize,
    /// The fused batch-1 MLP ([`gemm_mlp`], `DLLM_FUSED_MLP=1` with the stream kernel loaded).
    mlp: Option<gemm_mlp::FusedMlp>,
    /// Why the requested fused MLP is not available.
    mlp_failure: Option<String>,
    scratch: Mutex<ReductionScratch>,
    /// Variants that failed the load-time self-test (or cannot run here), with the reason;
    /// [`Gemm::run`] never picks them.
    disabled: Vec<(GemmVariant, String)>,
}

impl Gemm {
    /// Loads the kernels of `cuda/gemm.cu` and allocates a small split-K workspace.
    pub fn load(dev: &CudaDevice) -> Result<Gemm> {
        let naive = dev.function("gemm", "gemm_naive")?;
        let skinny = (1..=8)
            .map(|g| dev.function("gemm", &format!("gemm_skinny_mg{g}")))
            .collect::<Result<Vec<_>>>()?;
        let skinny2 = (1..=SKINNY2_MAX_M / 8)
            .map(|g| dev.function("gemm", &format!("gemm_skinny2_mg{g}")))
            .collect::<Result<Vec<_>>>()?;
        let wide = dev.function("gemm", "gemm_wide")?;
        wide.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            WIDE_SMEM_BYTES as i32,
        )
        .map_err(|e| cuda_err("gemm_wide: allow 64 KiB dynamic shared memory", e))?;
        wide.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .map_err(|e| cuda_err("gemm_wide: shared memory carveout", e))?;
        let num_sms = dev.num_sms()?;
        let scratch = ReductionScratch::new(&dev.stream, 1 << 20, 4096, "gemm")?;
        let mut disabled = Vec::new();
        // `DLLM_GEMM_WGMMA=0` keeps the Hopper kernel unloaded (a fault inside a kernel would
        // take the whole context down, which no self-test can catch).
        let wgmma_off = !super::env_switch::flag("DLLM_GEMM_WGMMA", true);
        let wgmma = if wgmma_off {
            disabled.push((
                GemmVariant::Wgmma,
                "disabled by DLLM_GEMM_WGMMA=0".to_string(),
            ));
            None
        } else {
            match load_wgmma(dev) {
                Ok(f) => Some(f),
                Err(why) => {
                    disabled.push((GemmVariant::Wgmma, why));
                    None
                }
            }
        };
        // The two TMA kernels are on by default: a device that cannot run them (not sm_90a) just
        // does without them, unless one was asked for explicitly with DLLM_GEMM_STREAM=1 /
        // DLLM_GEMM_TMA=1 (then the reason is reported).
        let (stream, stream_failure) = if gemm_stream::requested_by_env() {
            match load_stream(dev) {
                Ok(f) => (Some(f), None),
                Err(e) => (
                    None,
                    gemm_stream::explicitly_requested().then(|| format!("load: {e}")),
                ),
            }
        } else {
            (None, None)
        };
        let (stream, stream_stages) = match stream {
            Some((fs, stages)) => (Some(fs), stages),
            None => (None, gemm_stream::DEFAULT_STAGES),
        };
        let (mlp, mlp_failure) = match (gemm_mlp::requested_by_env(), &stream) {
            (false, _) => (None, None),
            (true, None) => (None, Some("the stream kernel is not loaded".to_string())),
            (true, Some(_)) => match gemm_mlp::FusedMlp::load(dev, stream_stages) {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(format!("load: {e}"))),
            },
        };
        let (tma, tma_failure) = if gemm_tma::requested_by_env() {
            match gemm_tma::load(dev, "gemm_tma") {
                Ok(f) => (Some(f), None),
                Err(e) => (
                    None,
                    gemm_tma::explicitly_requested().then(|| format!("load: {e}")),
                ),
            }
        } else {
            (None, None)
        };
        // The quads only when asked for (then a device that cannot run them is reported).
        let (tma4, tma4_failure) = if tma.is_some() && gemm_tma::quads_requested_by_env() {
            match gemm_tma::load(dev, "gemm_tma4") {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(format!("load: {e}"))),
            }
        } else if gemm_tma::quads_requested_by_env() {
            (None, Some("the pairs kernel is not loaded".to_string()))
        } else {
            (None, None)
        };
        let clusters = |fs: &Option<[CudaFunction; 2]>, cn: u32| -> [Option<usize>; 2] {
            let mut r = [None; 2];
            if let Some(fs) = fs {
                for (i, f) in fs.iter().enumerate() {
                    let wg = i + 2;
                    let geometry = (gemm_tma::threads(wg), gemm_tma::smem_bytes(wg));
                    r[i] = gemm_tma::resident_clusters(dev, f, geometry, (2, cn, 1));
                }
            }
            r
        };
        let resident_clusters = [clusters(&tma, 1), clusters(&tma4, 2)];
        let (cluster_split, cluster_split_failure) =
            match (gemm_cluster_split::requested_by_env(), &wgmma) {
                (false, _) => (None, None),
                (true, None) => (None, Some("the wgmma kernel is not loaded".to_string())),
                (true, Some(_)) => match gemm_cluster_split::ClusterSplit::load(dev) {
                    Ok(cs) => (Some(cs), None),
                    Err(e) => (None, Some(format!("load: {e}"))),
                },
            };
        let mut gemm = Gemm {
            naive,
            skinny,
            skinny2,
            skinny2_failure: None,
            stream,
            stream_failure,
            tma,
            tma_failure,
            tma4,
            tma4_failure,
            resident_clusters,
            cluster_split,
            cluster_split_failure,
            wide,
            wgmma,
            num_sms,
            stream_blocks: gemm_stream::StreamBlocks::from_env(num_sms),
            stream_stages,
            mlp,
            mlp_failure,
            scratch: Mutex::new(scratch),
            disabled,
        };
        let outcome = selftest::run(&gemm, dev)?;
        gemm.disabled.extend(outcome.disabled);
        gemm.skinny2_failure = outcome.skinny2_failure;
        if outcome.stream_failure.is_some() {
            gemm.stream_failure = outcome.stream_failure;
        }
        if outcome.tma_failure.is_some() {
            gemm.tma_failure = outcome.tma_failure;
        }
        if outcome.tma4_failure.is_some() {
            gemm.tma4_failure = outcome.tma4_failure;
        }
        if outcome.cluster_split_failure.is_some() {
            gemm.cluster_split_failure = outcome.cluster_split_failure;
        }
        Ok(gemm)
    }

    /// Whether [`Gemm::run`] uses the TMA cluster kernel in place of `gemm_wgmma`: requested
    /// (not turned off with `DLLM_GEMM_TMA=0`), loaded, and passed its load-time self-test.
    pub fn tma_active(&self) -> bool {
        self.tma.is_some() && self.tma_failure.is_none() && self.is_enabled(GemmVariant::Wgmma)
    }

    /// Whether the TMA kernel is loaded (requested), whatever its self-test said.
    pub fn tma_loaded(&self) -> bool {
        self.tma.is_some()
    }

    /// Why the requested TMA kernel is not used (load error or self-test failure).
    pub fn tma_failure(&self) -> Option<&str> {
        self.tma_failure.as_deref()
    }

    /// Whether [`Gemm::run`] runs the paired plans as quads (`gemm_tma4`): asked for with
    /// `DLLM_GEMM_TMA4=1`, loaded, passed its load-time self-test, and the pairs are active.
    pub fn tma4_active(&self) -> bool {
        self.tma4.is_some() && self.tma4_failure.is_none() && self.tma_active()
    }

    /// Whether the quad kernel is loaded (asked for), whatever its self-test said.
    pub fn tma4_loaded(&self) -> bool {
        self.tma4.is_some()
    }

    /// Why the requested quad kernel is not used (load error or self-test failure).
    pub fn tma4_failure(&self) -> Option<&str> {
        self.tma4_failure.as_deref()
    }

    /// Clusters of the pairs (`[0]`) and quads (`[1]`) kernels resident at once, per block
    /// height (wg 2, wg 3), where loaded and known.
    pub fn resident_clusters(&self) -> [[Option<usize>; 2]; 2] {
        self.resident_clusters
    }

    /// Whether [`Gemm::wgmma_plan`] may run split plans as clusters: asked for with
    /// `DLLM_GEMM_CLUSTER_SPLIT=1`, loaded, passed its load-time self-test, and `gemm_wgmma` in use.
    pub fn cluster_split_active(&self) -> bool {
        self.cluster_split.is_some()
            && self.cluster_split_failure.is_none()
            && self.is_enabled(GemmVariant::Wgmma)
    }

    /// This instance with the cluster-split kernels loaded whatever `DLLM_GEMM_CLUSTER_SPLIT` says
    /// (for checks and benches, which launch their plans explicitly).
    pub fn with_cluster_split(mut self, dev: &CudaDevice) -> Result<Gemm> {
        if self.cluster_split.is_none() {
            let cs = gemm_cluster_split::ClusterSplit::load(dev).map_err(Error::Unsupported)?;
            self.cluster_split = Some(cs);
            self.cluster_split_failure = None;
        }
        Ok(self)
    }

    /// Why the requested cluster-split kernels are not used (load error or self-test failure).
    pub fn cluster_split_failure(&self) -> Option<&str> {
        self.cluster_split_failure.as_deref()
    }

    /// Clusters of each cluster-split kernel ([`gemm_cluster_split::KERNELS`]) resident at once,
    /// where loaded and known.
    pub fn cluster_split_resident(&self) -> Vec<Option<usize>> {
        self.cluster_split
            .as_ref()
            .map_or_else(Vec::new, |cs| cs.resident().to_vec())
    }

    /// `p` (a `gemm_wgmma` plan) as [`Gemm::run`] launches it: as clusters when the cluster-split
    /// kernels are active, one of them runs its split count, and its clusters fit as many waves.
    fn unpaired(&self, p: WgmmaPlan, clusters: bool) -> GemmPlan {
        match &self.cluster_split {
            Some(cs) if clusters && cs.serves(&p, self.num_sms) => GemmPlan::ClusterSplit(p),
            _ => GemmPlan::Wgmma(p),
        }
    }

    /// The Hopper plan [`Gemm::run`] uses for `m > 64`: with the TMA cluster kernel active,
    /// [`WgmmaPlan::with_tma`], run in pairs when it has an even number of M tiles (no phantom
    /// tile) and by `gemm_wgmma` otherwise; else [`WgmmaPlan::new`] on `gemm_wgmma`. Measured
    /// on an H200 (2026-11-27): the pairs gain 10–12 % on the same tiles, while forcing pairs
    /// on an odd tile count (M = 384 on the 4096-column shapes, 3 tiles of 128 rows plus a
    /// phantom) was slower than `gemm_wgmma`'s own plan. With the cluster-split kernels active,
    /// first [`WgmmaPlan::launch_for`]: its cluster-split choice where the clusters keep the
    /// plan's waves (and any `gemm_wgmma` split plan chosen otherwise runs as clusters where one
    /// of them serves it).
    pub fn wgmma_plan(&self, m: usize, n: usize, k: usize) -> GemmPlan {
        self.wide_plan(m, n, k, self.cluster_split_active())
    }

    /// [`Gemm::wgmma_plan`] as it is with the cluster-split kernels off (benches compare).
    pub fn wgmma_plan_without_clusters(&self, m: usize, n: usize, k: usize) -> GemmPlan {
        self.wide_plan(m, n, k, false)
    }

    fn wide_plan(&self, m: usize, n: usize, k: usize, clusters: bool) -> GemmPlan {
        if let Some(cs) = self.cluster_split.as_ref().filter(|_| clusters) {
            let launch = WgmmaPlan::launch_for(m, n, k, self.num_sms, self.tma_active());
            if let GemmPlan::ClusterSplit(p) = launch {
                if cs.serves(&p, self.num_sms) {
                    return launch;
                }
            }
        }
        if !self.tma_active() {
            return self.unpaired(WgmmaPlan::new(m, n, k, self.num_sms), clusters);
        }
        let p = WgmmaPlan::with_tma(m, n, k, self.num_sms);
        let wgi = p.wg.clamp(2, 3) - 2;
        let quads_fit = || {
            gemm_tma::quads_keep_waves(
                p.tiles() * p.splits,
                p.quad().tiles() * p.splits,
                self.resident_clusters[0][wgi],
                self.resident_clusters[1][wgi],
            )
        };
        if p.paired && self.tma4_active() && quads_fit() {
            GemmPlan::Tma(p.quad())
        } else if p.paired {
            GemmPlan::Tma(p)
        } else {
            self.unpaired(p, clusters)
        }
    }

    /// Whether [`Gemm::run`] uses the stream kernel for `m ≤ 32`: requested (not turned off with
    /// `DLLM_GEMM_STREAM=0`), loaded, and passed its load-time self-test.
    pub fn stream_active(&self) -> bool {
        self.stream.is_some() && self.stream_failure.is_none()
    }

    /// This instance with the fused MLP loaded whatever `DLLM_FUSED_MLP` says (for checks).
    pub fn with_mlp(mut self, dev: &CudaDevice) -> Result<Gemm> {
        if self.mlp.is_none() {
            self.mlp = Some(gemm_mlp::FusedMlp::load(dev, self.stream_stages)?);
            self.mlp_failure = None;
        }
        Ok(self)
    }

    /// Whether [`Gemm::run_mlp`] can run: `DLLM_FUSED_MLP=1`, loaded, and the stream kernel in
    /// use.
    pub fn mlp_active(&self) -> bool {
        self.mlp.is_some() && self.stream_active()
    }

    /// Whether [`Gemm::run_mlp`] runs the layer tail ([`MlpInput::AfterOut`]) for `m` rows.
    pub fn mlp_tail_serves(&self, m: usize) -> bool {
        self.mlp_serves(m)
            && self
                .mlp
                .as_ref()
                .is_some_and(|f| f.tail_failure().is_none())
    }

    /// Whether [`Gemm::run_mlp`] serves `m` rows: active, and `m` within what [`Gemm::run`]
    /// gives the stream kernel (so the fused launch replaces two stream launches).
    pub fn mlp_serves(&self, m: usize) -> bool {
        self.mlp_active() && m <= gemm_stream::max_m_from_env()
    }

    /// The plan of [`Gemm::run_mlp`]: the stream kernel's block count, capped at the blocks the
    /// device holds at once (its grid barrier needs every block resident).
    /// With `with_out`, the layer tail's (the attention-output projection as a first job).
    pub fn mlp_plan(
        &self,
        m: usize,
        hidden: usize,
        inter: usize,
        with_out: bool,
    ) -> Result<gemm_mlp::MlpPlan> {
        let Some(mlp) = &self.mlp else {
            return Err(not_loaded("fused MLP", &self.mlp_failure, "DLLM_FUSED_MLP"));
        };
        // One grid serves every job: the count of the largest one.
        let mut blocks = (self.stream_blocks.for_shape(2 * inter, hidden))
            .max(self.stream_blocks.for_shape(hidden, inter));
        if with_out {
            blocks = blocks.max(self.stream_blocks.for_shape(hidden, hidden));
        }
        let blocks = blocks.min(mlp.resident_blocks(self.num_sms));
        gemm_mlp::MlpPlan::new(m, hidden, inter, blocks, with_out)
    }

    /// Why the requested fused MLP is not available (load error, or no stream kernel).
    pub fn mlp_failure(&self) -> Option<&str> {
        self.mlp_failure.as_deref()
    }

    /// The batch-1 MLP as one launch ([`gemm_mlp`]): `h = swiglu(x · w_guᵀ)` with `w_gu` the
    /// interleaved gate/up rows (`2·inter × hidden`), then `r += h · w_dᵀ` (`w_d`: `hidden ×
    /// inter`), for `m ≤ 32` rows; the same bits as the two stream launches of [`Gemm::run`].
    /// With [`MlpInput::AfterOut`] the attention-output projection runs first in the same launch
    /// (the layer tail, three jobs), its fold's prep writing x and the partial sums the gate/up
    /// job's row scale reads. `folds`: the RMSNorm fold of the gate/up job (its row scale, with
    /// [`MlpInput::Rows`] only) and of the down job (its prep); [`NormFold::NONE`] for none.
    /// Asynchronous on `dev.stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_mlp(
        &self,
        dev: &CudaDevice,
        input: MlpInput<'_, '_>,
        w_gu: &CudaView<u16>,
        h: &mut CudaViewMut<u16>,
        w_d: &CudaView<u16>,
        r: &mut CudaViewMut<f32>,
        (m, hidden, inter): (usize, usize, usize),
        folds: (NormFold<'_, '_>, NormFold<'_, '_>),
    ) -> Result<()> {
        let Some(mlp) = &self.mlp else {
            return Err(not_loaded("fused MLP", &self.mlp_failure, "DLLM_FUSED_MLP"));
        };
        if !self.stream_active() {
            return Err(Error::Unsupported(
                "gemm: the fused MLP needs the stream kernel, which is not in use".to_string(),
            ));
        }
        if inter % (2 * super::swiglu_layout::GROUP) != 0 {
            return Err(Error::invalid(format!(
                "gemm: the fused MLP needs an MLP width that is a multiple of 16, got {inter}"
            )));
        }
        let (mut fold_up, mut fold_down) = folds;
        if fold_up.prep.is_some() || fold_down.scale.is_some() {
            return Err(Error::invalid(
                "gemm: the fused MLP folds the row scale into gate/up and the prep into down only"
                    .to_string(),
            ));
        }
        let plan = self.mlp_plan(m, hidden, inter, matches!(input, MlpInput::AfterOut(_)))?;
        let rows = 8 * plan.up.groups;
        let mut maps = Vec::with_capacity(6);
        let mut params = Vec::with_capacity(3);
        let x_len = match input {
            MlpInput::Rows(x) => {
                check_align("x", x.device_ptr(&dev.stream).0, 16)?;
                let (map_x, map_gu) = operand_maps(
                    dev,
                    x,
                    w_gu,
                    (m, rows),
                    (2 * inter, gemm_stream::STREAM_ROWS),
                    hidden,
                )?;
                maps.extend([map_x, map_gu]);
                params.push(EpiParams {
                    norm: fold_up.params(dev, Epilogue::SwigluBf16, m, 2 * inter, hidden)?,
                    ..EpiParams::default()
                });
                x.len()
            }
            MlpInput::AfterOut(MlpOutJob { o, w_o, prep, eps }) => {
                if fold_up.is_some() {
                    return Err(Error::invalid(
                        "gemm: after the attention-output job the gate/up row scale is its prep's"
                            .to_string(),
                    ));
                }
                validate(m, hidden, hidden, o.len(), w_o.len(), r.len())?;
                check_align("o", o.device_ptr(&dev.stream).0, 16)?;
                check_align("w_o", w_o.device_ptr(&dev.stream).0, 16)?;
                let (map_o, map_wo) = operand_maps(
                    dev,
                    o,
                    w_o,
                    (m, rows),
                    (hidden, gemm_stream::STREAM_ROWS),
                    hidden,
                )?;
                let x_len = prep.xg.len();
                let x = prep.xg.as_view();
                check_align("x", x.device_ptr(&dev.stream).0, 16)?;
                let (map_x, map_gu) = operand_maps(
                    dev,
                    &x,
                    w_gu,
                    (m, rows),
                    (2 * inter, gemm_stream::STREAM_ROWS),
                    hidden,
                )?;
                maps.extend([map_o, map_wo, map_x, map_gu]);
                let mut fold_out = NormFold {
                    scale: None,
                    prep: Some(prep),
                    eps,
                };
                let out = fold_out.params(dev, Epilogue::AddF32, m, hidden, hidden)?;
                params.push(EpiParams {
                    norm: out,
                    ..EpiParams::default()
                });
                params.push(EpiParams {
                    norm: out.row_scale_of_prep(hidden, eps)?,
                    ..EpiParams::default()
                });
                x_len
            }
        };
        validate(m, 2 * inter, hidden, x_len, w_gu.len(), 2 * h.len())?;
        validate(m, hidden, inter, h.len(), w_d.len(), r.len())?;
        for (what, addr) in [
            ("w_gu", w_gu.device_ptr(&dev.stream).0),
            ("h", h.device_ptr(&dev.stream).0),
            ("w_d", w_d.device_ptr(&dev.stream).0),
        ] {
            check_align(what, addr, 16)?;
        }
        check_align("r", r.device_ptr(&dev.stream).0, 8)?;
        let (map_h, map_d) = operand_maps(
            dev,
            &h.as_view(),
            w_d,
            (m, rows),
            (hidden, gemm_stream::STREAM_ROWS),
            inter,
        )?;
        maps.extend([map_h, map_d]);
        params.push(EpiParams {
            norm: fold_down.params(dev, Epilogue::AddF32, m, hidden, inter)?,
            ..EpiParams::default()
        });
        let ws: usize = plan.workspace_floats().iter().sum();
        let counters: usize = plan.counters().iter().sum();
        let mut scratch = self.scratch(dev, ws, counters)?;
        mlp.launch(
            dev,
            &plan,
            &maps,
            h,
            r,
            &mut scratch,
            (m, hidden, inter),
            &params,
        )
    }

    /// Ring depth of the loaded stream kernel (read from its module; the embedded default when
    /// it is not loaded).
    pub fn stream_stages(&self) -> usize {
        self.stream_stages
    }

    /// Whether the stream kernel is loaded (requested), whatever its self-test said.
    pub fn stream_loaded(&self) -> bool {
        self.stream.is_some()
    }

    /// Why the stream kernel is not used: failed its self-test, or could not load when asked for
    /// explicitly (`DLLM_GEMM_STREAM=1`).
    pub fn stream_failure(&self) -> Option<&str> {
        self.stream_failure.as_deref()
    }

    /// Variants the load-time self-test disabled (or that cannot run on this device), each with
    /// the reason. [`Gemm::run`] falls back from a disabled `Wgmma` to `Wide` to `Naive`, and
    /// from a disabled `Skinny` to the wide kernels.
    pub fn disabled_variants(&self) -> &[(GemmVariant, String)] {
        &self.disabled
    }

    /// Why version 2 of the skinny kernel was disabled by the load-time self-test (`run` then
    /// uses version 1 for every `m ≤ 64`); `None` when it passed.
    pub fn skinny_v2_failure(&self) -> Option<&str> {
        self.skinny2_failure.as_deref()
    }

    /// The skinny plan [`Gemm::run`] uses for `m ≤ 64` rows: version 2 for `m ≤ 32` unless its
    /// self-test failed, else version 1.
    pub fn skinny_plan(&self, m: usize, n: usize, k: usize) -> SkinnyPlan {
        let version = if self.skinny2_failure.is_some() {
            1
        } else {
            SkinnyPlan::preferred_version(m)
        };
        SkinnyPlan::for_version(version, m, n, k, self.num_sms)
    }

    /// Whether `run` may use `variant` (it loaded and passed the self-test).
    pub fn is_enabled(&self, variant: GemmVariant) -> bool {
        !self.disabled.iter().any(|(v, _)| *v == variant)
    }

    /// The kernel [`Gemm::run`] uses for `m` rows: the preferred one ([`GemmVariant::for_m`])
    /// unless disabled, then `Wgmma`, `Wide`, `Naive` in that order.
    pub fn variant_for_m(&self, m: usize) -> GemmVariant {
        let preferred = GemmVariant::for_m(m);
        [
            preferred,
            GemmVariant::Wgmma,
            GemmVariant::Wide,
            GemmVariant::Naive,
        ]
        .into_iter()
        .find(|&v| v == GemmVariant::Naive || self.is_enabled(v))
        .unwrap_or(GemmVariant::Naive)
    }

    /// The stream kernel's plan for `m ≤ 32` rows: [`StreamPlan::with_blocks`] at one block per
    /// SM unless `DLLM_GEMM_STREAM_BLOCKS` sets another count or `auto`
    /// ([`gemm_stream::StreamBlocks`]).
    pub fn stream_plan(&self, m: usize, n: usize, k: usize) -> Result<StreamPlan> {
        StreamPlan::with_blocks(m, n, k, self.stream_blocks.for_shape(n, k))
    }

    /// Multiprocessors of the device (used by the split-K heuristic).
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// `out = a · wᵀ` (or `out += a · wᵀ` for [`GemmOut::AddF32`]) with the kernel chosen by `m`.
    /// `a`: `[m, k]` bf16 bits, `w`: `[n, k]` bf16 bits, `out`: `[m, n]`; see [`validate`] for the
    /// shape contract. `a` and `w` must be 16-byte aligned, `out` 4 (bf16) or 8 (f32) bytes.
    /// Asynchronous on `dev.stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        dev: &CudaDevice,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.run_variant(dev, self.variant_for_m(m), a, w, out, m, n, k)
    }

    /// [`Gemm::run`] with an explicit kernel (used even when the self-test disabled it, so
    /// checks can report it; `Wgmma` needs the sm_90a cubin); `Skinny` needs `m ≤ SKINNY_MAX_M`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_variant(
        &self,
        dev: &CudaDevice,
        variant: GemmVariant,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let job = self.variant_plan(variant, m, n, k)?;
        self.launch(dev, job, a, w, out, NormFold::NONE, m, n, k)
    }

    /// [`Gemm::run`] with the RMSNorm fold's prep and / or row scale ([`super::gemm_norm`]);
    /// an error where the kernel `run` picks has no fold ([`Gemm::norm_fold_serves`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run_fold(
        &self,
        dev: &CudaDevice,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        fold: NormFold<'_, '_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let job = self.run_plan_for(m, n, k)?;
        self.launch(dev, job, a, w, out, fold, m, n, k)
    }

    /// Whether [`Gemm::run`] would run `m × n × k` on a kernel with the RMSNorm fold, with `n`
    /// and `k` in whole 32-column groups (what the prep of an `n`-wide residual and the row scale
    /// of a `k`-deep product need).
    pub fn norm_fold_serves(&self, m: usize, n: usize, k: usize) -> bool {
        n % super::gemm_norm::GROUP_COLS == 0
            && k % super::gemm_norm::GROUP_COLS == 0
            && self.run_plan_for(m, n, k).is_ok_and(|p| p.has_norm_fold())
    }

    /// Whether [`Gemm::run`] would run `m × n × k` on a kernel with the RoPE epilogue
    /// ([`GemmOut::RopeQkv`]: the stream, wgmma and TMA kernels).
    pub fn rope_epilogue_serves(&self, m: usize, n: usize, k: usize) -> bool {
        n % 16 == 0
            && self
                .run_plan_for(m, n, k)
                .is_ok_and(|p| p.has_rope_epilogue())
    }

    /// The plan [`Gemm::run`] launches for `m × n × k`.
    fn run_plan_for(&self, m: usize, n: usize, k: usize) -> Result<GemmPlan> {
        self.variant_plan(self.variant_for_m(m), m, n, k)
    }

    /// The plan [`Gemm::run_variant`] launches for `variant`.
    fn variant_plan(&self, variant: GemmVariant, m: usize, n: usize, k: usize) -> Result<GemmPlan> {
        Ok(match variant {
            GemmVariant::Naive => GemmPlan::Naive,
            GemmVariant::Wide => GemmPlan::Wide(WidePlan::new(m, n, k, self.num_sms)),
            GemmVariant::Wgmma => self.wgmma_plan(m, n, k),
            GemmVariant::Skinny => {
                if m > SKINNY_MAX_M {
                    return Err(Error::invalid(format!(
                        "gemm: the skinny kernel takes m ≤ {SKINNY_MAX_M}, got m={m}"
                    )));
                }
                if m <= gemm_stream::max_m_from_env() && self.stream_active() {
                    GemmPlan::Stream(self.stream_plan(m, n, k)?)
                } else {
                    GemmPlan::Skinny(self.skinny_plan(m, n, k))
                }
            }
        })
    }

    /// One launch with an explicit plan (checks and benches use it to force split-K, block
    /// heights, block counts or a kernel version; a plan is launched even when the self-test
    /// disabled its kernel, so checks can report it). The plan must be the one its constructor
    /// gives for this shape.
    #[allow(clippy::too_many_arguments)]
    pub fn run_plan(
        &self,
        dev: &CudaDevice,
        plan: GemmPlan,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.run_plan_fold(dev, plan, a, w, out, NormFold::NONE, m, n, k)
    }

    /// [`Gemm::run_plan`] with the RMSNorm fold ([`Gemm::run_fold`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run_plan_fold(
        &self,
        dev: &CudaDevice,
        plan: GemmPlan,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        out: GemmOut<'_>,
        fold: NormFold<'_, '_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        plan.check_fits(m, n, k)?;
        self.launch(dev, plan, a, w, out, fold, m, n, k)
    }

    /// The split-K scratch, grown to at least `ws_floats` workspace and `tiles` counters
    /// ([`ReductionScratch::ensure`]).
    fn scratch(
        &self,
        dev: &CudaDevice,
        ws_floats: usize,
        tiles: usize,
    ) -> Result<std::sync::MutexGuard<'_, ReductionScratch>> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        scratch.ensure(&dev.stream, ws_floats, tiles)?;
        Ok(scratch)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        dev: &CudaDevice,
        job: GemmPlan,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        mut out: GemmOut<'_>,
        mut fold: NormFold<'_, '_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        validate(m, n, k, a.len(), w.len(), out.covers())?;
        if fold.is_some() && !job.has_norm_fold() {
            return Err(Error::invalid(format!(
                "gemm: the RMSNorm fold runs on the stream, wgmma, TMA and cluster-split kernels, not {job:?}"
            )));
        }
        // The fold's buffers are checked against m, n, k here (NormFold::params).
        let mut params = EpiParams {
            norm: fold.params(dev, out.epilogue(), m, n, k)?,
            ..EpiParams::default()
        };
        if out.epilogue() == Epilogue::SwigluBf16 {
            if n % (2 * super::swiglu_layout::GROUP) != 0 {
                return Err(Error::invalid(format!(
                    "gemm: the fused SwiGLU needs n a multiple of 16 (gate/up row groups), got n={n}"
                )));
            }
            if job == GemmPlan::Naive {
                return Err(Error::invalid(
                    "gemm: the naive kernel has no fused SwiGLU epilogue".to_string(),
                ));
            }
        }
        if let GemmOut::RopeQkv(_, args) = &out {
            if (args.rows, args.cols) != (m, n) || n % 16 != 0 {
                return Err(Error::invalid(format!(
                    "gemm: RoPE parameters for {}×{} used on m={m} n={n} (n must be a multiple of 16)",
                    args.rows, args.cols
                )));
            }
            if !job.has_rope_epilogue() {
                return Err(Error::invalid(format!(
                    "gemm: the RoPE epilogue runs on the stream, wgmma and TMA kernels, not {job:?}"
                )));
            }
            params.rope = args.epi;
        }
        check_align("A", a.device_ptr(&dev.stream).0, 16)?;
        check_align("W", w.device_ptr(&dev.stream).0, 16)?;
        let (addr, align) = out.addr_and_align(dev);
        check_align("C", addr, align)?;
        let epi = out.epilogue().code();
        match &mut out {
            GemmOut::Bf16(c) | GemmOut::SwigluBf16(c) | GemmOut::RopeQkv(c, _) => {
                self.launch_typed(dev, job, a, w, c, (epi, &params), m, n, k)
            }
            GemmOut::F32(c) | GemmOut::AddF32(c) => {
                self.launch_typed(dev, job, a, w, c, (epi, &params), m, n, k)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_typed<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        job: GemmPlan,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        c: &mut CudaViewMut<T>,
        (epi, params): (i32, &EpiParams),
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        // validate() bounded m, n, k by i32::MAX.
        let (mi, ni, ki) = (m as i32, n as i32, k as i32);
        match job {
            GemmPlan::Naive => {
                let cfg = LaunchConfig {
                    grid_dim: (
                        n.div_ceil(NAIVE_THREADS as usize) as u32,
                        m.min(65_535) as u32,
                        1,
                    ),
                    block_dim: (NAIVE_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = Launch::new(&dev.stream, &self.naive, dev.pdl);
                b.arg(a).arg(w).arg(c).arg(&mi).arg(&ni).arg(&ki).arg(&epi);
                // SAFETY: validate() checked a ≥ m·k, w ≥ n·k, c ≥ m·n elements; the kernel
                // touches only a[m'·k + k'], w[n'·k + k'], c[m'·n + n'] for m' < m, n' < n, k' < k.
                unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch gemm_naive", e))?;
            }
            GemmPlan::Wide(plan) => {
                if plan.n_tiles > 65_535 || plan.splits > 65_535 || plan.m_tiles > i32::MAX as usize
                {
                    return Err(Error::invalid(format!(
                        "gemm: wide plan {plan:?} exceeds the grid limits (n={n})"
                    )));
                }
                let kps = plan.ktiles_per_split as i32;
                let cfg = LaunchConfig {
                    grid_dim: (plan.m_tiles as u32, plan.n_tiles as u32, plan.splits as u32),
                    block_dim: (WIDE_THREADS, 1, 1),
                    shared_mem_bytes: WIDE_SMEM_BYTES,
                };
                let mut scratch = self.scratch(dev, plan.workspace_floats(), plan.tiles())?;
                let ReductionScratch { ws, counters, .. } = &mut *scratch;
                let mut b = Launch::new(&dev.stream, &self.wide, dev.pdl);
                b.arg(a).arg(w).arg(c).arg(ws).arg(counters);
                b.arg(&mi).arg(&ni).arg(&ki).arg(&epi).arg(&kps);
                // SAFETY: as for naive; loads outside [m, k] / [n, k] are zero-filled by cp.async
                // with a source size of 0 (no access), stores are masked to m' < m, n' < n; the
                // pointers are 16-byte (A, W) and pair (C) aligned, checked above. With split-K
                // the workspace holds tiles·splits·128·128 floats and the counters ≥ tiles
                // entries (grown by scratch()), zero between launches, ordered on dev.stream.
                unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch gemm_wide", e))?;
            }
            GemmPlan::Wgmma(plan) => {
                let Some(fs) = &self.wgmma else {
                    return Err(Error::Backend(format!(
                        "gemm: the wgmma kernel is not available on this device ({})",
                        self.disabled
                            .iter()
                            .find(|(v, _)| *v == GemmVariant::Wgmma)
                            .map_or("not loaded", |(_, why)| why.as_str())
                    )));
                };
                if plan.n_tiles > 65_535 || plan.splits > 65_535 || plan.m_tiles > i32::MAX as usize
                {
                    return Err(Error::invalid(format!(
                        "gemm: wgmma plan {plan:?} exceeds the grid limits (n={n})"
                    )));
                }
                let f = &fs[plan.wg.clamp(2, 3) - 2];
                let kps = plan.ktiles_per_split as i32;
                let cfg = LaunchConfig {
                    grid_dim: (plan.m_tiles as u32, plan.n_tiles as u32, plan.splits as u32),
                    block_dim: (128 * plan.wg.clamp(2, 3) as u32, 1, 1),
                    shared_mem_bytes: wgmma_smem_bytes(plan.wg.clamp(2, 3)),
                };
                let mut scratch = self.scratch(dev, plan.workspace_floats(), plan.tiles())?;
                let ReductionScratch { ws, counters, .. } = &mut *scratch;
                let mut b = Launch::new(&dev.stream, f, dev.pdl);
                b.arg(a).arg(w).arg(c).arg(ws).arg(counters);
                b.arg(&mi).arg(&ni).arg(&ki).arg(&epi).arg(&kps).arg(params);
                // SAFETY: as for wide: cp.async loads outside [m, k] / [n, k] have source size 0
                // (no access; the address is clamped to a valid row), stores are masked to
                // m' < m, n' < n with 16-byte (A, W) and pair (C) alignment checked above. With
                // split-K the workspace holds tiles·splits·BM·192 floats and the counters ≥ tiles
                // entries (grown by scratch()), zero between launches, ordered on dev.stream.
                unsafe { b.launch(cfg) }
                    .map_err(|e| cuda_err(&format!("launch gemm_wgmma_wg{}", plan.wg), e))?;
            }
            GemmPlan::ClusterSplit(plan) => {
                let Some(cs) = &self.cluster_split else {
                    return Err(not_loaded(
                        "cluster-split",
                        &self.cluster_split_failure,
                        "DLLM_GEMM_CLUSTER_SPLIT",
                    ));
                };
                let Some(f) = cs.function(&plan) else {
                    return Err(Error::invalid(format!(
                        "gemm: no cluster-split kernel runs {plan:?} (wg, splits) ∈ {:?}",
                        gemm_cluster_split::KERNELS
                    )));
                };
                if plan.n_tiles > 65_535 || plan.m_tiles > i32::MAX as usize {
                    return Err(Error::invalid(format!(
                        "gemm: cluster-split plan {plan:?} exceeds the grid limits (n={n})"
                    )));
                }
                let kps = plan.ktiles_per_split as i32;
                let cfg = LaunchConfig {
                    grid_dim: (plan.m_tiles as u32, plan.n_tiles as u32, plan.splits as u32),
                    block_dim: (128 * plan.wg as u32, 1, 1),
                    shared_mem_bytes: wgmma_smem_bytes(plan.wg),
                };
                let mut b = Launch::new(&dev.stream, f, dev.pdl);
                b.arg(a).arg(w).arg(c);
                b.arg(&mi).arg(&ni).arg(&ki).arg(&epi).arg(&kps).arg(params);
                // SAFETY: loads and stores as for gemm_wgmma (cp.async with source size 0 outside
                // [m, k] / [n, k], stores masked to m' < m, n' < n, alignment checked above); the
                // grid's z is the kernel's compiled cluster size (kernel_index matched wg and
                // splits), and the partials never leave the cluster's shared memory.
                unsafe { b.launch(cfg) }.map_err(|e| {
                    cuda_err(
                        &format!("launch gemm_wgmma_wg{}_cs{}", plan.wg, plan.splits),
                        e,
                    )
                })?;
            }
            GemmPlan::Skinny(plan) => {
                if plan.splits > 65_535 || plan.tiles > i32::MAX as usize {
                    return Err(Error::invalid(format!(
                        "gemm: skinny plan {plan:?} exceeds the grid limits"
                    )));
                }
                let f = if plan.version == 2 {
                    if plan.groups > SKINNY2_MAX_M / 8 {
                        return Err(Error::invalid(format!(
                            "gemm: skinny version 2 takes m ≤ {SKINNY2_MAX_M} ({plan:?})"
                        )));
                    }
                    &self.skinny2[plan.groups.clamp(1, SKINNY2_MAX_M / 8) - 1]
                } else {
                    &self.skinny[plan.groups.clamp(1, 8) - 1]
                };
                let kname = if plan.version == 2 {
                    "gemm_skinny2_mg"
                } else {
                    "gemm_skinny_mg"
                };
                let cps = plan.chunks_per_split as i32;
                let cfg = LaunchConfig {
                    grid_dim: (plan.tiles as u32, plan.splits as u32, 1),
                    block_dim: (SKINNY_THREADS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut scratch = self.scratch(dev, plan.workspace_floats(), plan.tiles)?;
                let ReductionScratch { ws, counters, .. } = &mut *scratch;
                let mut b = Launch::new(&dev.stream, f, dev.pdl);
                b.arg(a)
                    .arg(w)
                    .arg(c)
                    .arg(ws)
                    .arg(counters)
                    .arg(&mi)
                    .arg(&ni)
                    .arg(&ki)
                    .arg(&epi)
                    .arg(&cps);
                // SAFETY: shapes as for naive (loads predicated to rows < n, tokens < m, k < K);
                // the workspace holds tiles·splits·rt·groups·128 float4 and the counters `tiles`
                // entries (grown above); counters are zero between launches (the last block of a
                // tile resets its counter) and all launches are ordered on dev.stream.
                unsafe { b.launch(cfg) }
                    .map_err(|e| cuda_err(&format!("launch {kname}{}", plan.groups), e))?;
            }
            GemmPlan::Tma(plan) => {
                let quads = plan.cluster_n == 2;
                let (funcs, kname) = if quads {
                    (&self.tma4, "gemm_tma4")
                } else {
                    (&self.tma, "gemm_tma")
                };
                let Some(fs) = funcs else {
                    return Err(if quads {
                        not_loaded("TMA quad", &self.tma4_failure, "DLLM_GEMM_TMA4")
                    } else {
                        not_loaded("TMA", &self.tma_failure, "DLLM_GEMM_TMA")
                    });
                };
                if !plan.paired
                    || !matches!(plan.cluster_n, 1 | 2)
                    || plan.m_tiles % 2 != 0
                    || plan.n_tiles % plan.cluster_n != 0
                    || plan.n_tiles > 65_535
                    || plan.splits > 65_535
                    || plan.m_tiles > i32::MAX as usize
                {
                    return Err(Error::invalid(format!(
                        "gemm: TMA plan {plan:?} is not a paired plan within the grid limits"
                    )));
                }
                let wg = plan.wg.clamp(2, 3);
                // Each block of a quad loads half the A tile (multicast to its N peer).
                let (map_a, map_w) = operand_maps(
                    dev,
                    a,
                    w,
                    (m, 64 * wg / plan.cluster_n),
                    (n, gemm_tma::TMA_BN / 2),
                    k,
                )?;
                let kps = plan.ktiles_per_split as i32;
                let cfg = LaunchConfig {
                    grid_dim: (plan.m_tiles as u32, plan.n_tiles as u32, plan.splits as u32),
                    block_dim: (gemm_tma::threads(wg), 1, 1),
                    shared_mem_bytes: gemm_tma::smem_bytes(wg),
                };
                let mut scratch = self.scratch(dev, plan.workspace_floats(), plan.tiles())?;
                let ReductionScratch { ws, counters, .. } = &mut *scratch;
                let mut b = Launch::new(&dev.stream, &fs[wg - 2], dev.pdl);
                b.arg(&map_a).arg(&map_w).arg(c).arg(ws).arg(counters);
                b.arg(&mi).arg(&ni).arg(&ki).arg(&epi).arg(&kps).arg(params);
                // SAFETY: the tensor maps describe exactly A [m, k] and W [n, k] (validate()
                // checked their lengths; 16-byte alignment checked above), and TMA never reads
                // outside them (boxes past the edges are zero-filled). Stores are masked to
                // m' < m, n' < n. The grid's x is even and, for quads, its y too (the kernels'
                // clusters are 2 × 1 × 1 and 2 × 2 × 1). With split-K the workspace holds
                // tiles·splits·BM·192 floats and the counters ≥ tiles entries (grown by
                // scratch()), zero between launches, ordered on dev.stream.
                unsafe { b.launch(cfg) }
                    .map_err(|e| cuda_err(&format!("launch {kname}_wg{wg}"), e))?;
            }
            GemmPlan::Stream(plan) => {
                let Some(fs) = &self.stream else {
                    return Err(not_loaded(
                        "stream",
                        &self.stream_failure,
                        "DLLM_GEMM_STREAM",
                    ));
                };
                if plan.groups > STREAM_MAX_M / 8 || plan.groups * 8 < m {
                    return Err(Error::invalid(format!(
                        "gemm: stream plan {plan:?} does not serve m={m}"
                    )));
                }
                let f = &fs[plan.groups - 1];
                let cfg = LaunchConfig {
                    grid_dim: (plan.blocks as u32, 1, 1),
                    block_dim: (STREAM_THREADS, 1, 1),
                    shared_mem_bytes: gemm_stream::smem_bytes(plan.groups, self.stream_stages),
                };
                let (map_a, map_w) = operand_maps(
                    dev,
                    a,
                    w,
                    (m, 8 * plan.groups),
                    (n, gemm_stream::STREAM_ROWS),
                    k,
                )?;
                let mut scratch = self.scratch(dev, plan.workspace_floats(), plan.counters())?;
                let ReductionScratch { ws, counters, .. } = &mut *scratch;
                let mut b = Launch::new(&dev.stream, f, dev.pdl);
                b.arg(&map_a).arg(&map_w).arg(c).arg(ws).arg(counters);
                b.arg(&mi).arg(&ni).arg(&ki).arg(&epi).arg(params);
                // SAFETY: the tensor maps describe exactly A [m, k] and W [n, k] (validate()
                // checked their lengths; 16-byte alignment checked above) and TMA never reads
                // outside them (boxes past the edges are zero-filled); stores are masked to
                // m' < m, n' < n. The workspace holds blocks·2·4·2·groups·32 float4
                // (plan.workspace_floats, grown by scratch()) and the counters tiles·4 entries,
                // zero between launches (the reducing warp resets its counter); all launches are
                // ordered on dev.stream.
                unsafe { b.launch(cfg) }
                    .map_err(|e| cuda_err(&format!("launch gemm_stream_mg{}", plan.groups), e))?;
            }
        }
        Ok(())
    }
}

/// The error for a plan whose opt-in kernel is not loaded: why, or how to load it.
fn not_loaded(kernel: &str, failure: &Option<String>, var: &str) -> Error {
    Error::Backend(format!(
        "gemm: the {kernel} kernel is not loaded ({})",
        failure
            .clone()
            .unwrap_or_else(|| format!("set {var}=1 to load it"))
    ))
}

/// The tensor maps of A (`(rows, box rows)` = `a_rows`) and W (`w_rows`), both `k` wide.
fn operand_maps(
    dev: &CudaDevice,
    a: &CudaView<u16>,
    w: &CudaView<u16>,
    (m, a_box): (usize, usize),
    (n, w_box): (usize, usize),
    k: usize,
) -> Result<(
    cudarc::driver::sys::CUtensorMap,
    cudarc::driver::sys::CUtensorMap,
)> {
    let map = |addr: u64, rows: usize, box_rows: usize| {
        OperandBox {
            addr,
            rows,
            k,
            box_rows,
        }
        .encode()
    };
    Ok((
        map(a.device_ptr(&dev.stream).0, m, a_box)?,
        map(w.device_ptr(&dev.stream).0, n, w_box)?,
    ))
}

/// Loads `gemm_stream_mg{1..4}` and allows each its shared-memory ring; with the ring depth the
/// module was compiled with.
fn load_stream(dev: &CudaDevice) -> Result<(Vec<CudaFunction>, usize)> {
    if dev.arch != super::KernelArch::Hopper {
        return Err(Error::Unsupported(format!(
            "the stream GEMM needs TMA (sm_90, Hopper build); this is {}",
            dev.describe()
        )));
    }
    let stages = gemm_stream::stages_of(dev)?;
    Ok((load_stream_family(dev, "gemm_stream_mg", stages)?, stages))
}

/// Loads `{prefix}1` .. `{prefix}4` of the `gemm_stream` module (one per 8-row activation group)
/// and allows each the shared memory of a ring of `stages`.
pub(super) fn load_stream_family(
    dev: &CudaDevice,
    prefix: &str,
    stages: usize,
) -> Result<Vec<CudaFunction>> {
    (1..=STREAM_MAX_M / 8)
        .map(|g| {
            let name = format!("{prefix}{g}");
            let f = dev.function("gemm_stream", &name)?;
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                gemm_stream::smem_bytes(g, stages) as i32,
            )
            .map_err(|e| cuda_err(&format!("{name}: allow dynamic shared memory"), e))?;
            Ok(f)
        })
        .collect()
}

/// Loads `gemm_wgmma_wg2` / `gemm_wgmma_wg3` from the sm_90a cubin of `cuda/gemm_wgmma.cu`; the
/// reason as text when this device cannot run them.
fn load_wgmma(dev: &CudaDevice) -> std::result::Result<[CudaFunction; 2], String> {
    if !dev.runs_sm90a() {
        return Err(format!(
            "wgmma needs the sm_90a cubin (compute capability 9.0, Hopper build); this is {}",
            dev.describe()
        ));
    }
    let load = |wg: usize| load_wgmma_function(dev, &format!("gemm_wgmma_wg{wg}"), wg);
    match (load(2), load(3)) {
        (Ok(a), Ok(b)) => Ok([a, b]),
        (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
    }
}

/// Loads kernel `name` of `cuda/gemm_wgmma.cu` with `wg` consumer warpgroups (`gemm_wgmma_wg*`
/// and its cluster-split forms share the block and its shared memory): allows its dynamic
/// shared memory and prefers the largest carveout.
pub(super) fn load_wgmma_function(dev: &CudaDevice, name: &str, wg: usize) -> Result<CudaFunction> {
    let f = dev.function("gemm_wgmma", name)?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        wgmma_smem_bytes(wg) as i32,
    )
    .map_err(|e| cuda_err(&format!("{name}: allow dynamic shared memory"), e))?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
    .map_err(|e| cuda_err(&format!("{name}: shared memory carveout"), e))?;
    Ok(f)
}

mod bench;
mod checks;
mod selftest;
pub(in crate::backend::cuda) use bench::BenchBuffers;
pub use bench::{bench, time_shape};
pub(in crate::backend::cuda) use checks::{download, reference, upload};
use checks::{random_bf16, GUARD};
pub use checks::{self_check, tol_f32};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_by_m() {
        assert_eq!(GemmVariant::for_m(1), GemmVariant::Skinny);
        assert_eq!(GemmVariant::for_m(64), GemmVariant::Skinny);
        assert_eq!(GemmVariant::for_m(65), GemmVariant::Wgmma);
        assert_eq!(GemmVariant::for_m(3072), GemmVariant::Wgmma);
    }

    /// Every K chunk belongs to exactly one split and no split is empty.
    fn assert_covers(p: &SkinnyPlan, k: usize) {
        let chunks = k.div_ceil(32);
        assert!(p.splits >= 1);
        assert!((p.splits - 1) * p.chunks_per_split < chunks, "{p:?} k={k}");
        assert!(p.splits * p.chunks_per_split >= chunks, "{p:?} k={k}");
    }

    #[test]
    fn skinny_plans_for_llada_shapes_on_h100() {
        // Version 1, hand-derived: 132 SMs × 4 blocks = 528 slots; 192 tiles fit twice
        // (384 blocks), 64 tiles eight times (512 blocks).
        let p = SkinnyPlan::for_version(1, 32, 12288, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 192,
                splits: 2,
                chunks_per_split: 64,
                version: 1,
            }
        );
        let p = SkinnyPlan::for_version(1, 32, 4096, 12288, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 64,
                splits: 8,
                chunks_per_split: 48,
                version: 1,
            }
        );
        let p = SkinnyPlan::for_version(1, 32, 126_464, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 1976,
                splits: 1,
                chunks_per_split: 128,
                version: 1,
            }
        );
        assert_eq!(p.workspace_floats(), 0);
        // Version 2 (128 rows per block): 96 tiles fit 5 times (528 / 96 = 5.5): 128 chunks
        // in splits of 26 (rounded to the unroll of 2) = 5 splits, 480 blocks; 32 tiles fit
        // 16 times: 384 chunks / 16 = 24 per split, 512 blocks; the LM head is 988 tiles.
        let p = SkinnyPlan::new(32, 12288, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 96,
                splits: 5,
                chunks_per_split: 26,
                version: 2,
            }
        );
        assert_eq!(p.rows(), 128);
        assert_eq!(p.workspace_floats(), 96 * 5 * 2 * 4 * 128 * 4);
        let p = SkinnyPlan::new(32, 4096, 12288, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 32,
                splits: 16,
                chunks_per_split: 24,
                version: 2,
            }
        );
        let p = SkinnyPlan::new(32, 126_464, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 988,
                splits: 1,
                chunks_per_split: 128,
                version: 2,
            }
        );
        assert_eq!(p.workspace_floats(), 0);
        let p = SkinnyPlan::new(1, 12288, 4096, 132);
        assert_eq!((p.groups, p.version), (1, 2));
        // m > 32 is version 1 only, whatever is asked.
        let p = SkinnyPlan::new(64, 12288, 4096, 132);
        assert_eq!((p.groups, p.version, p.rows()), (8, 1, 64));
        assert_eq!(SkinnyPlan::for_version(2, 33, 8, 8, 132).version, 1);
        assert_eq!(SkinnyPlan::with_version_chunks(2, 40, 8, 8, 1).version, 1);
        assert_eq!(SkinnyPlan::new(33, 8, 8, 132).groups, 5);
        assert_eq!(SkinnyPlan::preferred_version(32), 2);
        assert_eq!(SkinnyPlan::preferred_version(33), 1);
    }

    #[test]
    fn skinny_plans_cover_k_exactly() {
        for k in [8, 328, 4096, 12288, 8 * 1001] {
            for n in [8, 296, 4096, 126_464] {
                for sms in [1, 78, 132] {
                    for (m, version, unroll) in [(32, 1, SKINNY_UNROLL), (32, 2, SKINNY2_UNROLL)] {
                        let p = SkinnyPlan::for_version(version, m, n, k, sms);
                        assert_eq!(p.version, version);
                        assert_eq!(p.tiles, n.div_ceil(p.rows()));
                        assert_covers(&p, k);
                        assert_eq!(p.chunks_per_split % unroll, 0);
                        // Split grids fit in one wave of 4 blocks per SM.
                        assert!(p.splits == 1 || p.tiles * p.splits <= 4 * sms, "{p:?}");
                        if p.splits > 1 {
                            assert!(p.chunks_per_split >= SKINNY_MIN_CHUNKS_PER_SPLIT);
                        }
                    }
                }
            }
            for cps in [1, 3, 4, 7, 1000] {
                assert_covers(&SkinnyPlan::with_chunks_per_split(5, 296, k, cps), k);
                assert_covers(&SkinnyPlan::with_version_chunks(2, 29, 296, k, cps), k);
            }
        }
        // Forced split on K = 328 (11 chunks): 4 + 4 + 3.
        let p = SkinnyPlan::with_chunks_per_split(3, 296, 328, 4);
        assert_eq!((p.splits, p.tiles, p.groups, p.version), (3, 5, 1, 1));
        assert_eq!(p.workspace_floats(), 5 * 3 * 128 * 4);
        // Version 2: 296 rows = 3 tiles of 128 (the last partial); two row tiles per warp.
        let p = SkinnyPlan::with_version_chunks(2, 3, 296, 328, 4);
        assert_eq!((p.splits, p.tiles, p.groups, p.version), (3, 3, 1, 2));
        assert_eq!(p.workspace_floats(), 3 * 3 * 2 * 128 * 4);
    }

    #[test]
    fn wide_plans() {
        // 132 SMs × 2 = 264 slots.
        let p = WidePlan::new(3072, 12288, 4096, 132);
        assert_eq!((p.m_tiles, p.n_tiles, p.splits), (24, 96, 1));
        assert_eq!(p.workspace_floats(), 0);
        // Down projection at batch 8 (M = 256): 2 × 32 = 64 tiles, 264 / 64 = 4 splits of 96.
        let p = WidePlan::new(256, 4096, 12288, 132);
        assert_eq!(
            p,
            WidePlan {
                m_tiles: 2,
                n_tiles: 32,
                splits: 4,
                ktiles_per_split: 96
            }
        );
        assert_eq!(p.workspace_floats(), 64 * 4 * 128 * 128);
        // M = 384, N = 4096, K = 4096: 96 tiles → 2 splits of 64.
        let p = WidePlan::new(384, 4096, 4096, 132);
        assert_eq!((p.splits, p.ktiles_per_split), (2, 64));
        // Short K never splits below 32 K tiles: K = 328 has 11.
        assert_eq!(WidePlan::new(65, 296, 328, 132).splits, 1);
        // Forced: 11 K tiles by 4 → 4 + 4 + 3.
        let p = WidePlan::with_ktiles_per_split(200, 296, 328, 4);
        assert_eq!((p.m_tiles, p.n_tiles, p.splits), (2, 3, 3));
        for k in [8, 328, 4096, 12288] {
            for (m, n) in [(1, 8), (256, 4096), (384, 12288), (3072, 126_464)] {
                let p = WidePlan::new(m, n, k, 132);
                let kt = k.div_ceil(32);
                assert!(
                    (p.splits - 1) * p.ktiles_per_split < kt && p.splits * p.ktiles_per_split >= kt
                );
                assert!(p.splits == 1 || p.tiles() * p.splits <= 264);
            }
        }
    }

    #[test]
    fn quad_plans_round_both_tile_counts_to_even() {
        // The LM head at M = 384: 2 × 659 tiles of 192 rows → quads of 2 × 660 (a phantom N
        // tile); the same split, and a plan `run_plan` accepts for the shape.
        let pairs = WgmmaPlan::with_tma(384, 126_464, 4096, 132).paired();
        let quads = pairs.quad();
        assert_eq!((pairs.m_tiles, pairs.n_tiles), (2, 659));
        assert_eq!((quads.m_tiles, quads.n_tiles, quads.cluster_n), (2, 660, 2));
        assert_eq!(
            (quads.splits, quads.ktiles_per_split),
            (pairs.splits, pairs.ktiles_per_split)
        );
        assert_eq!((pairs.kind(), quads.kind()), ("tma", "tma4"));
        GemmPlan::Tma(quads).check_fits(384, 126_464, 4096).unwrap();
        // An odd M tile count gains a phantom M tile too; quads of quads are the same quads.
        let odd = WgmmaPlan::with_ktiles_per_split(2, 384, 4096, 4096, 32).quad();
        assert_eq!((odd.m_tiles, odd.n_tiles, odd.splits), (4, 22, 2));
        assert_eq!(odd.quad(), odd);
        assert_eq!(WgmmaPlan::new(384, 4096, 4096, 132).kind(), "wgmma");
        // A quad with an N tile count that is not its constructor's is refused.
        let bad = WgmmaPlan { n_tiles: 24, ..odd };
        assert!(GemmPlan::Tma(bad).check_fits(384, 4096, 4096).is_err());
    }

    #[test]
    fn wgmma_plans() {
        // Hand-derived on 132 SMs (one block per SM).
        let p = |wg, mt, nt, s, kps| WgmmaPlan {
            wg,
            m_tiles: mt,
            n_tiles: nt,
            splits: s,
            ktiles_per_split: kps,
            paired: false,
            cluster_n: 1,
        };
        // M = 384: 192-row tiles give 2 × 64 = 128 blocks, one wave (128-row: 192 blocks).
        assert_eq!(WgmmaPlan::new(384, 12288, 4096, 132), p(3, 2, 64, 1, 64));
        // M = 256: 128-row tiles, 2 × 64 = 128 blocks, no padding rows.
        assert_eq!(WgmmaPlan::new(256, 12288, 4096, 132), p(2, 2, 64, 1, 64));
        // M = 3072: 8 waves of 192 rows = 12 waves of 128 rows; the tie goes to 192.
        assert_eq!(WgmmaPlan::new(3072, 12288, 4096, 132), p(3, 16, 64, 1, 64));
        // Down projection at M = 256: 2 × 22 tiles × 3 splits of 64 K tiles = 132 blocks.
        let d = WgmmaPlan::new(256, 4096, 12288, 132);
        assert_eq!(d, p(2, 2, 22, 3, 64));
        assert_eq!(d.workspace_floats(), 44 * 3 * 128 * 192);
        // M = 384, 4096 → 4096: 3 × 22 tiles × 2 splits (cost 128·38·21 < 192·31·20).
        assert_eq!(WgmmaPlan::new(384, 4096, 4096, 132), p(2, 3, 22, 2, 32));
        // Short K never splits: K = 328 has 6 K tiles.
        assert_eq!(WgmmaPlan::new(65, 296, 328, 132).splits, 1);
        // With the TMA pairs at 9/10: the down projection at M = 384 moves to 2 × 22 tiles of
        // 192 rows × 3 splits (192·(64 + 9)·20·0.9 = 252 288 < 128·(96 + 6)·21 = 274 176) ...
        assert_eq!(
            WgmmaPlan::with_tma(384, 4096, 12288, 132),
            p(3, 2, 22, 3, 64).paired()
        );
        // ... the output projection stays on 3 tiles without pairs (119 040·0.9 > 102 144) ...
        assert_eq!(
            WgmmaPlan::with_tma(384, 4096, 4096, 132),
            p(2, 3, 22, 2, 32)
        );
        // ... and plans that were even already only gain the pairing.
        for (m, n, k) in [(384, 12288, 4096), (256, 4096, 12288), (3072, 12288, 4096)] {
            assert_eq!(
                WgmmaPlan::with_tma(m, n, k, 132),
                WgmmaPlan::new(m, n, k, 132).paired()
            );
        }
        // With the cluster-split kernels (1 K tile per split instead of 3, no pairs' discount):
        // the output projection at M = 384 runs its 2 splits as pairs of blocks
        // (128·(32 + 2)·21 = 91 392 < 102 144) ...
        let cs = |m, n, k, tma| WgmmaPlan::launch_for(m, n, k, 132, tma);
        assert_eq!(
            cs(384, 4096, 4096, true),
            GemmPlan::ClusterSplit(p(2, 3, 22, 2, 32))
        );
        // ... and at M = 256 (b8's block step) its 3 splits as triples, over the TMA pairs
        // (128·(22 + 3)·21 = 67 200 < 128·(22 + 9)·21·0.9 = 74 995) ...
        assert_eq!(
            cs(256, 4096, 4096, true),
            GemmPlan::ClusterSplit(p(2, 2, 22, 3, 22))
        );
        // ... while the down projections keep their TMA pairs (252 288 < 257 280 at M = 384,
        // 176 601 < 180 096 at M = 256), and unsplit shapes their pairs ...
        assert_eq!(
            cs(384, 4096, 12288, true),
            GemmPlan::Tma(p(3, 2, 22, 3, 64).paired())
        );
        assert_eq!(
            cs(256, 4096, 12288, true),
            GemmPlan::Tma(p(2, 2, 22, 3, 64).paired())
        );
        assert_eq!(
            cs(384, 12288, 4096, true),
            GemmPlan::Tma(p(3, 2, 64, 1, 64).paired())
        );
        // ... which, without the TMA kernel, become triples of 192-row blocks.
        assert_eq!(
            cs(384, 4096, 12288, false),
            GemmPlan::ClusterSplit(p(3, 2, 22, 3, 64))
        );
        // Forced: 6 K tiles by 4 → 4 + 2; wg is clamped to 2..=3.
        assert_eq!(
            WgmmaPlan::with_ktiles_per_split(7, 200, 296, 328, 4),
            p(3, 2, 2, 2, 4)
        );
        assert_eq!(wgmma_smem_bytes(2), 5 * 320 * 128 + 1024);
        assert_eq!(wgmma_smem_bytes(3), 4 * 384 * 128 + 1024);
        for k in [8, 328, 4096, 12288] {
            for (m, n) in [
                (1, 8),
                (65, 296),
                (256, 4096),
                (384, 12288),
                (3072, 126_464),
            ] {
                for sms in [1, 78, 132] {
                    let p = WgmmaPlan::new(m, n, k, sms);
                    let kt = k.div_ceil(64);
                    assert!(
                        (p.splits - 1) * p.ktiles_per_split < kt
                            && p.splits * p.ktiles_per_split >= kt,
                        "{p:?}"
                    );
                    assert!(p.splits == 1 || p.tiles() * p.splits <= sms, "{p:?}");
                    assert!(p.m_tiles * p.bm() >= m && p.n_tiles * 192 >= n);
                }
            }
        }
    }

    #[test]
    fn validate_rejects_bad_shapes() {
        assert!(validate(3, 296, 328, 3 * 328, 296 * 328, 3 * 296).is_ok());
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert!(msg(validate(3, 296, 330, 10_000, 100_000, 1000)).contains("k=330"));
        assert!(msg(validate(3, 300, 328, 10_000, 100_000, 1000)).contains("n=300"));
        assert!(msg(validate(0, 8, 8, 64, 64, 64)).contains("empty"));
        assert!(msg(validate(3, 8, 8, 23, 64, 24)).contains("A holds 23"));
        assert!(msg(validate(3, 8, 8, 24, 63, 24)).contains("W holds 63"));
        assert!(msg(validate(3, 8, 8, 24, 64, 23)).contains("C holds 23"));
        assert!(validate(usize::MAX / 2, 8, 8, 0, 64, 0).is_err());
    }

    #[test]
    fn alignment_check() {
        assert!(check_align("A", 0x1000, 16).is_ok());
        assert!(check_align("A", 0x1008, 16)
            .unwrap_err()
            .to_string()
            .contains("16-byte"));
        assert!(check_align("C", 0x1004, 4).is_ok());
    }
}
