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
//!
//! Submodules: `plan` (launch plans, host logic), `selftest` (the load-time self-test), `checks`
//! (the GPU checks and the helpers other checks share), `bench` (the benches).

use super::check::{self, BenchResult, CheckResult, TOL_BF16, TOL_F32};
use super::gemm_cluster_split;
use super::gemm_mlp;
use super::gemm_norm::{EpiParams, NormFold};
use super::gemm_rope::{RopeArgs, RopeEpi};
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
/// Weight rows per skinny block (4 warps × 16); must match `SKINNY_ROWS` in gemm_skinny.cuh.
const SKINNY_ROWS: usize = 64;
/// Threads per skinny block; must match `SKINNY_THREADS` in gemm_skinny.cuh.
const SKINNY_THREADS: usize = 128;
/// K elements per skinny chunk (one 16-byte load per lane and row).
const SKINNY_CHUNK: usize = 32;
/// Chunks loaded per skinny loop iteration; must match `SKINNY_UNROLL` in gemm_skinny.cuh.
const SKINNY_UNROLL: usize = 4;
/// Largest `M` served by version 2 of the skinny kernel (`gemm_skinny2_mg{1..4}`).
pub const SKINNY2_MAX_M: usize = 32;
/// 16-row weight tiles per warp in version 2 (block = 4 warps × 32 rows); must match
/// `SKINNY2_RT` in gemm_skinny.cuh.
const SKINNY2_RT: usize = 2;
/// Chunks per register buffer in version 2; must match `SKINNY2_UNROLL` in gemm_skinny.cuh.
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
    /// order of [`super::rope_layout`]; the stream, wgmma, TMA and cluster-split kernels): [`super::gemm_rope`].
    RopeQkv,
}

impl Epilogue {
    /// The three plain epilogues, for checks (the fused SwiGLU has its own,
    /// [`super::gemm_swiglu::self_check`]).
    pub const ALL: [Epilogue; 3] = [Epilogue::StoreBf16, Epilogue::StoreF32, Epilogue::AddF32];

    /// The `epi` code the kernels take (`DLLM_EPI_*` in gemm.cu).
    pub(super) fn code(self) -> i32 {
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
    pub(super) fn covers(&self) -> usize {
        match self {
            GemmOut::Bf16(v) | GemmOut::RopeQkv(v, _) => v.len(),
            GemmOut::SwigluBf16(v) => v.len().saturating_mul(2),
            GemmOut::F32(v) | GemmOut::AddF32(v) => v.len(),
        }
    }

    /// Device address and the alignment the kernels need for it (element pairs are stored).
    pub(super) fn addr_and_align(&self, dev: &CudaDevice) -> (u64, u64) {
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

/// The next layer's QKV projection as the layer tail's fourth job (the layer chain,
/// [`Gemm::run_mlp`]): `w` `[n, hidden]` and `out`, its bf16 output ([`GemmOut::Bf16`], or
/// [`GemmOut::RopeQkv`] writing the next layer's K/V cache rows too). Its input is the down job's
/// prep (`x ⊙ γ` of the next attention norm), its row scale that prep's partial sums.
pub struct MlpQkvJob<'a, 'b> {
    pub w: &'a CudaView<'b, u16>,
    pub out: GemmOut<'a>,
    pub n: usize,
}

/// The RoPE epilogue's parameters of `out` on `job` (`m × n`), None for the other outputs; an
/// error when they were made for another shape or the kernel has no such epilogue.
fn rope_params(out: &GemmOut, job: GemmPlan, m: usize, n: usize) -> Result<Option<RopeEpi>> {
    let GemmOut::RopeQkv(_, args) = out else {
        return Ok(None);
    };
    if (args.rows, args.cols) != (m, n) || !n.is_multiple_of(16) {
        return Err(Error::invalid(format!(
            "gemm: RoPE parameters for {}×{} used on m={m} n={n} (n must be a multiple of 16)",
            args.rows, args.cols
        )));
    }
    if !job.has_rope_epilogue() {
        return Err(Error::invalid(format!(
            "gemm: the RoPE epilogue runs on the stream, wgmma, TMA and cluster-split kernels, not {job:?}"
        )));
    }
    Ok(Some(args.epi))
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
    if !k.is_multiple_of(8) {
        return Err(Error::invalid(format!(
            "gemm: k={k} is not a multiple of 8 (16-byte rows are required)"
        )));
    }
    if !n.is_multiple_of(8) {
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

pub(super) fn check_align(what: &str, addr: u64, align: u64) -> Result<()> {
    if !addr.is_multiple_of(align) {
        return Err(Error::invalid(format!(
            "gemm: {what} device address {addr:#x} is not {align}-byte aligned (offset views by whole rows)"
        )));
    }
    Ok(())
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

    /// Whether [`Gemm::run_mlp`] runs the layer chain (the tail and the next layer's QKV
    /// projection, [`MlpQkvJob`]) on `m` rows: the tail serves and the chain's kernels loaded.
    pub fn mlp_chain_serves(&self, m: usize) -> bool {
        self.mlp_tail_serves(m)
            && self
                .mlp
                .as_ref()
                .is_some_and(|f| f.chain_failure().is_none())
    }

    /// The plan of [`Gemm::run_mlp`] for `jobs`: the stream kernel's block count, capped at the
    /// blocks the device holds at once (its grid barrier needs every block resident).
    pub fn mlp_plan(
        &self,
        m: usize,
        hidden: usize,
        inter: usize,
        jobs: gemm_mlp::MlpJobs,
    ) -> Result<gemm_mlp::MlpPlan> {
        let Some(mlp) = &self.mlp else {
            return Err(not_loaded("fused MLP", &self.mlp_failure, "DLLM_FUSED_MLP"));
        };
        // One grid serves every job: the count of the largest one.
        let mut blocks = (self.stream_blocks.for_shape(2 * inter, hidden))
            .max(self.stream_blocks.for_shape(hidden, inter));
        if jobs != gemm_mlp::MlpJobs::Mlp {
            blocks = blocks.max(self.stream_blocks.for_shape(hidden, hidden));
        }
        if let gemm_mlp::MlpJobs::Chain { qkv_cols } = jobs {
            blocks = blocks.max(self.stream_blocks.for_shape(qkv_cols, hidden));
        }
        let blocks = blocks.min(mlp.resident_blocks(self.num_sms));
        gemm_mlp::MlpPlan::new(m, hidden, inter, blocks, jobs)
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
    /// With `qkv` (the layer chain: after [`MlpInput::AfterOut`], with the down job's prep) the
    /// next layer's QKV projection runs last, on that prep's output and row scale.
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
        qkv: Option<MlpQkvJob<'_, '_>>,
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
        let jobs =
            match (&input, &qkv) {
                (MlpInput::Rows(_), None) => gemm_mlp::MlpJobs::Mlp,
                (MlpInput::AfterOut(_), None) => gemm_mlp::MlpJobs::Tail,
                (MlpInput::AfterOut(_), Some(q)) if fold_down.prep.is_some() => {
                    gemm_mlp::MlpJobs::Chain { qkv_cols: q.n }
                }
                _ => return Err(Error::invalid(
                    "gemm: the fused MLP runs the next QKV projection only after the attention \
                     output and on the down job's prep"
                        .to_string(),
                )),
            };
        let plan = self.mlp_plan(m, hidden, inter, jobs)?;
        let rows = 8 * plan.up.groups;
        let mut maps = Vec::with_capacity(8);
        let mut params = Vec::with_capacity(4);
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
        let down = fold_down.params(dev, Epilogue::AddF32, m, hidden, inter)?;
        params.push(EpiParams {
            norm: down,
            ..EpiParams::default()
        });
        let mut qkv_out = None;
        if let (Some(job), Some(MlpQkvJob { w, out, n })) = (plan.qkv, qkv) {
            let (epi, covers, (addr, align)) =
                (out.epilogue(), out.covers(), out.addr_and_align(dev));
            let rope = rope_params(&out, GemmPlan::Stream(job), m, n)?;
            let (GemmOut::Bf16(c) | GemmOut::RopeQkv(c, _)) = out else {
                return Err(Error::invalid(format!(
                    "gemm: the chained QKV projection stores bf16 (with or without RoPE), not {}",
                    epi.name()
                )));
            };
            // Its input: the down job's prep output (`x ⊙ γ`, m × hidden).
            let xa = fold_down
                .prep
                .as_ref()
                .map(|p| p.xg.as_view())
                .ok_or_else(|| {
                    Error::invalid("gemm: the chained QKV projection needs the down job's prep")
                })?;
            validate(m, n, hidden, xa.len(), w.len(), covers)?;
            check_align("w_qkv", w.device_ptr(&dev.stream).0, 16)?;
            check_align("qkv", addr, align)?;
            let (map_xa, map_w) = operand_maps(
                dev,
                &xa,
                w,
                (m, rows),
                (n, gemm_stream::STREAM_ROWS),
                hidden,
            )?;
            maps.extend([map_xa, map_w]);
            params.push(EpiParams {
                rope: rope.unwrap_or_default(),
                norm: down.row_scale_of_prep(hidden, fold_down.eps)?,
            });
            qkv_out = Some(gemm_mlp::QkvOut { c, epi, cols: n });
        }
        let ws: usize = plan.workspace_floats().iter().sum();
        let counters: usize = plan.counters().iter().sum();
        let mut scratch = self.scratch(dev, ws, counters)?;
        mlp.launch(
            dev,
            &plan,
            &maps,
            h,
            r,
            qkv_out.as_mut(),
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

    /// Every kernel that was asked for (by default or by a switch) but is not in use on `dev`,
    /// each with the reason: a variant the load-time self-test disabled (but wgmma in the Ampere
    /// build, which has none), or an opt-in that failed to load or its self-test. Empty when all
    /// run as asked.
    pub fn inactive_reasons(&self, dev: &CudaDevice) -> Vec<String> {
        let ampere = dev.arch == super::KernelArch::Ampere;
        let mut why: Vec<String> = self
            .disabled
            .iter()
            .filter(|(v, _)| !(ampere && *v == GemmVariant::Wgmma))
            .map(|(v, why)| format!("{} disabled: {why}", v.name()))
            .collect();
        let requested = [
            (
                "skinny version 2 disabled (version 1 used)",
                self.skinny_v2_failure(),
            ),
            (
                "stream kernel requested but not used",
                self.stream_failure(),
            ),
            ("TMA kernel requested but not used", self.tma_failure()),
            (
                "TMA quad kernel requested but not used",
                self.tma4_failure(),
            ),
            ("fused MLP requested but not used", self.mlp_failure()),
            (
                "cluster-split kernels requested but not used",
                self.cluster_split_failure(),
            ),
        ];
        why.extend(
            requested
                .into_iter()
                .filter_map(|(what, f)| f.map(|f| format!("{what}: {f}"))),
        );
        why
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
        n.is_multiple_of(super::gemm_norm::GROUP_COLS)
            && k.is_multiple_of(super::gemm_norm::GROUP_COLS)
            && self.run_plan_for(m, n, k).is_ok_and(|p| p.has_norm_fold())
    }

    /// Whether [`Gemm::run`] would run `m × n × k` on a kernel with the RoPE epilogue
    /// ([`GemmOut::RopeQkv`]: the stream, wgmma, TMA and cluster-split kernels).
    pub fn rope_epilogue_serves(&self, m: usize, n: usize, k: usize) -> bool {
        n.is_multiple_of(16)
            && self
                .run_plan_for(m, n, k)
                .is_ok_and(|p| p.has_rope_epilogue())
    }

    /// Whether [`Gemm::run`] launches `m × n × k` as a cluster split (checks use it to know
    /// which of their cases exercise the cluster kernels).
    pub fn runs_cluster_split(&self, m: usize, n: usize, k: usize) -> bool {
        matches!(self.run_plan_for(m, n, k), Ok(GemmPlan::ClusterSplit(_)))
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
            if !n.is_multiple_of(2 * super::swiglu_layout::GROUP) {
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
        if let Some(rope) = rope_params(&out, job, m, n)? {
            params.rope = rope;
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
mod plan;
mod selftest;
pub(in crate::backend::cuda) use super::check::{download, upload};
pub(in crate::backend::cuda) use bench::BenchBuffers;
pub use bench::{bench, time_shape};
pub use checks::reference;
use checks::{random_bf16, GUARD};
pub use checks::{self_check, tol_f32};
pub use plan::{GemmPlan, SkinnyPlan, WgmmaPlan, WidePlan};

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
