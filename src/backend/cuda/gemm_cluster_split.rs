//! Host pieces of the cluster-split wgmma kernels (`gemm_wgmma_wg{2,3}_cs{2,3}` in
//! `cuda/gemm_wgmma.cu`): `gemm_wgmma`'s split-K plans with the splits of each output tile
//! launched as one thread-block cluster along z, whose blocks sum their partial tiles through
//! distributed shared memory instead of the global workspace.
//!
//! Why: at M = 384 the two 4096-column projections fill the GPU only by splitting K (44 or 66
//! output tiles for 132 SMs), and the workspace reduction costs them most of their gap to a full
//! wave: on an H200 (session 9 sweep) the attention-output projection (384 × 4096 × 4096) took
//! 0.0410 ms with 2 splits against the ~0.021 ms its 66 tiles × 32 K tiles need at the rate
//! the same blocks reach on the QKV shape; each split writes its 96–144 KB partial to L2, the
//! last block of a tile reads all of them back alone and then does the whole epilogue. Here
//! every block keeps its partial in its own (drained) shared-memory ring, and block r of the
//! cluster sums the r-th share of the tile's columns over the cluster's ring slots and stores
//! it: no L2 round trip, no serial last block, the epilogue spread evenly over the split blocks.
//! The sums run in split order from zero, as the workspace path's, so both give the same bits
//! (`dllm-gpu-check` compares them bit for bit).
//!
//! Only the kernels of [`KERNELS`] are compiled: 2 or 3 splits (the 24 column blocks of 8 of a
//! tile in even shares) at both block heights. Opt-in with
//! `DLLM_GEMM_CLUSTER_SPLIT=1` until a GPU run has checked and timed it; then the plan search
//! ([`super::gemm::WgmmaPlan::launch_for`]) costs such a split at 1 K tile per split instead of
//! the workspace's 3 (an estimate), so that at M = 384 the attention-output projection (2
//! splits) and at M = 256 (b8's block steps) its 3-split plan run as clusters, and
//! [`super::gemm::Gemm::wgmma_plan`] takes that choice where the clusters fit as many waves as
//! the blocks alone.

use super::check::{self, BenchResult, CheckResult};
use super::gemm::{
    download, load_wgmma_function, upload, wgmma_smem_bytes, BenchBuffers, Epilogue, Gemm, GemmOut,
    GemmPlan, WgmmaPlan, WGMMA_BK,
};
use super::CudaDevice;
use crate::error::Result;
use cudarc::driver::{CudaFunction, CudaSlice};

/// The compiled (block height in warpgroups, splits per cluster) pairs, in the order of
/// [`ClusterSplit`]'s functions.
pub const KERNELS: [(usize, usize); 4] = [(2, 2), (2, 3), (3, 2), (3, 3)];

/// Whether the cluster-split kernels are wanted: only with `DLLM_GEMM_CLUSTER_SPLIT=1` (written
/// in session 10 without a GPU; not yet run on one).
pub fn requested_by_env() -> bool {
    super::env_switch::flag("DLLM_GEMM_CLUSTER_SPLIT", false)
}

/// The index into [`KERNELS`] of the kernel that runs `plan` as clusters, if one is compiled.
pub fn kernel_index(plan: &WgmmaPlan) -> Option<usize> {
    if plan.paired {
        return None;
    }
    KERNELS
        .iter()
        .position(|&(wg, cs)| wg == plan.wg && cs == plan.splits)
}

/// Whether `blocks` blocks launched as clusters of `cluster` take no more waves than as single
/// blocks on `sms` multiprocessors, with `resident` clusters held at once (clusters must fit in
/// one GPC, so GPCs whose SM count the cluster size does not divide leave SMs idle). An unknown
/// count objects to clusters of more than two blocks only.
pub fn keeps_waves(blocks: usize, cluster: usize, resident: Option<usize>, sms: usize) -> bool {
    let cluster = cluster.max(1);
    match resident {
        Some(r) => (blocks / cluster).div_ceil(r.max(1)) <= blocks.div_ceil(sms.max(1)),
        None => cluster <= 2,
    }
}

/// The loaded cluster-split kernels and how many of each cluster the device holds at once.
pub struct ClusterSplit {
    funcs: Vec<CudaFunction>,
    resident: Vec<Option<usize>>,
}

impl ClusterSplit {
    /// Loads every kernel of [`KERNELS`] from the sm_90a cubin of `cuda/gemm_wgmma.cu` as
    /// `gemm_wgmma`'s are loaded (`gemm::load_wgmma_function`); the reason as text when
    /// this device cannot run them.
    pub fn load(dev: &CudaDevice) -> std::result::Result<ClusterSplit, String> {
        if !dev.runs_sm90a() {
            return Err(format!(
                "the cluster-split kernels need the sm_90a cubin (compute capability 9.0, Hopper build); this is {}",
                dev.describe()
            ));
        }
        let mut funcs = Vec::with_capacity(KERNELS.len());
        let mut resident = Vec::with_capacity(KERNELS.len());
        for (wg, cs) in KERNELS {
            let f = load_wgmma_function(dev, &format!("gemm_wgmma_wg{wg}_cs{cs}"), wg)
                .map_err(|e| e.to_string())?;
            let geometry = ((128 * wg) as u32, wgmma_smem_bytes(wg));
            resident.push(super::gemm_tma::resident_clusters(
                dev,
                &f,
                geometry,
                (1, 1, cs as u32),
            ));
            funcs.push(f);
        }
        Ok(ClusterSplit { funcs, resident })
    }

    /// The kernel that runs `plan` (a `gemm_wgmma` plan whose split count is its cluster size).
    pub fn function(&self, plan: &WgmmaPlan) -> Option<&CudaFunction> {
        kernel_index(plan).and_then(|i| self.funcs.get(i))
    }

    /// Whether `plan` has a kernel here and its clusters fit as many waves on `sms`
    /// multiprocessors as its blocks would alone ([`keeps_waves`]).
    pub fn serves(&self, plan: &WgmmaPlan, sms: usize) -> bool {
        kernel_index(plan).is_some_and(|i| {
            keeps_waves(
                plan.tiles() * plan.splits,
                plan.splits,
                self.resident[i],
                sms,
            )
        })
    }

    /// Clusters resident at once per kernel of [`KERNELS`] (for reports).
    pub fn resident(&self) -> &[Option<usize>] {
        &self.resident
    }
}

/// Shapes of the bit-for-bit checks: a partial M, N and K tile (N not a multiple of 16, so no
/// SwiGLU), a partial M tile with SwiGLU-able N, and LLaDA-8B's two 4096-column projections at
/// M = 384.
const CHECK_SHAPES: [(usize, usize, usize); 4] = [
    (133, 392, 776),
    (300, 784, 2048),
    (384, 4096, 4096),
    (384, 4096, 12_288),
];

/// The plan of kernel `(wg, cs)` on `m × n × k`: `gemm_wgmma`'s tiles with K cut into `cs`
/// splits (None when the K tiles do not give exactly `cs`).
pub(super) fn plan_for(
    (wg, cs): (usize, usize),
    (m, n, k): (usize, usize, usize),
) -> Option<WgmmaPlan> {
    let ktiles = k.div_ceil(WGMMA_BK).max(1);
    let p = WgmmaPlan::with_ktiles_per_split(wg, m, n, k, ktiles.div_ceil(cs));
    (p.splits == cs).then_some(p)
}

/// A GEMM instance with the cluster-split kernels loaded, or None where `gemm_wgmma` cannot run
/// (nothing to compare with).
fn checked_gemm(dev: &CudaDevice) -> Result<Option<Gemm>> {
    let gemm = Gemm::load(dev)?;
    if !gemm.is_enabled(super::gemm::GemmVariant::Wgmma) {
        return Ok(None);
    }
    Ok(Some(gemm.with_cluster_split(dev)?))
}

/// `dllm-gpu-check`'s `gemm.cluster_split` checks: every compiled kernel on every shape of
/// `CHECK_SHAPES` with every epilogue (the residual add over a random residual) against
/// `gemm_wgmma`'s workspace reduction of the same plan, bit for bit; empty where `gemm_wgmma`
/// cannot run.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let gemm = match checked_gemm(dev) {
        Ok(Some(g)) => g,
        Ok(None) => return vec![],
        Err(e) => return vec![CheckResult::failed("gemm.cluster_split load", e)],
    };
    let mut out = Vec::new();
    for (si, &shape) in CHECK_SHAPES.iter().enumerate() {
        let (m, n, k) = shape;
        let operands = (|| -> Result<_> {
            let bf = |seed: u64, len: usize| {
                check::to_bf16_bits(&check::random_f32(seed, len, -1.0, 1.0))
            };
            let a = upload(dev, &bf(0xC5 + 10 * si as u64, m * k))?;
            let w = upload(dev, &bf(0xC6 + 10 * si as u64, n * k))?;
            Ok((a, w))
        })();
        let (a, w) = match operands {
            Ok(x) => x,
            Err(e) => {
                out.push(CheckResult::failed(
                    format!("gemm.cluster_split m{m} n{n} k{k}: upload"),
                    e,
                ));
                continue;
            }
        };
        let residual = check::random_f32(0xC7 + si as u64, m * n, -4.0, 4.0);
        for kernel in KERNELS {
            let Some(plan) = plan_for(kernel, shape) else {
                continue;
            };
            for epi in Epilogue::ALL.into_iter().chain([Epilogue::SwigluBf16]) {
                if epi == Epilogue::SwigluBf16 && n % 16 != 0 {
                    continue;
                }
                let name = format!(
                    "gemm.cluster_split wg{}_cs{} m{m} n{n} k{k} {}",
                    kernel.0,
                    kernel.1,
                    epi.name()
                );
                let run = |p: GemmPlan| output_bits(&gemm, dev, p, epi, (&a, &w), &residual, shape);
                out.push(
                    match (
                        run(GemmPlan::Wgmma(plan)),
                        run(GemmPlan::ClusterSplit(plan)),
                    ) {
                        (Ok(want), Ok(got)) => {
                            let diff = (0..want.len()).find(|&i| want[i] != got[i]);
                            CheckResult::exact(
                                name,
                                diff.is_none(),
                                diff.map_or_else(
                                    || "identical to the workspace reduction".to_string(),
                                    |i| {
                                        format!(
                                            "element {i} (row {}) is {:#010x}, the workspace reduction gives {:#010x}",
                                            i / (want.len() / m),
                                            got[i],
                                            want[i]
                                        )
                                    },
                                ),
                            )
                        }
                        (Err(e), _) | (_, Err(e)) => CheckResult::failed(name, e),
                    },
                );
            }
        }
    }
    out
}

/// The output of `plan` with epilogue `epi` as raw bits (bf16 or f32), the fp32 ones starting
/// from `residual` (a residual add) or poison, the bf16 ones from poison.
fn output_bits(
    gemm: &Gemm,
    dev: &CudaDevice,
    plan: GemmPlan,
    epi: Epilogue,
    (a, w): (&CudaSlice<u16>, &CudaSlice<u16>),
    residual: &[f32],
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<u32>> {
    let (av, wv) = (a.as_view(), w.as_view());
    if epi.bf16_out() {
        let len = if epi == Epilogue::SwigluBf16 {
            m * n / 2
        } else {
            m * n
        };
        let mut c = upload(dev, &vec![check::POISON_BF16_BITS; len])?;
        let out = if epi == Epilogue::SwigluBf16 {
            GemmOut::SwigluBf16(c.as_view_mut())
        } else {
            GemmOut::Bf16(c.as_view_mut())
        };
        gemm.run_plan(dev, plan, &av, &wv, out, m, n, k)?;
        Ok(download(dev, &c)?.into_iter().map(u32::from).collect())
    } else {
        let init = if epi == Epilogue::AddF32 {
            residual.to_vec()
        } else {
            vec![f32::from_bits(check::POISON_F32_BITS); m * n]
        };
        let mut c = upload(dev, &init)?;
        let out = if epi == Epilogue::AddF32 {
            GemmOut::AddF32(c.as_view_mut())
        } else {
            GemmOut::F32(c.as_view_mut())
        };
        gemm.run_plan(dev, plan, &av, &wv, out, m, n, k)?;
        Ok(download(dev, &c)?.into_iter().map(f32::to_bits).collect())
    }
}

/// `dllm-gpu-check`'s `gemm.cluster_split` benches: LLaDA-8B's two 4096-column projections at
/// M = 384 and 256 with the residual add, each compiled kernel's plan through the workspace and
/// as clusters, and the plans [`Gemm::run`] picks without and with the cluster kernels, in one
/// process (rotating weight copies, as the other GEMM benches).
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let gemm = match checked_gemm(dev) {
        Ok(Some(g)) => g,
        Ok(None) => return vec![],
        Err(e) => return vec![BenchResult::failed("gemm.cluster_split load", e)],
    };
    let mut out = Vec::new();
    for shape in [
        (384, 4096, 4096),
        (384, 4096, 12_288),
        (256, 4096, 4096),
        (256, 4096, 12_288),
    ] {
        if let Err(e) = bench_shape(&gemm, dev, shape, &mut out) {
            let (m, n, k) = shape;
            out.push(BenchResult::failed(
                format!("gemm.cluster_split m{m} n{n} k{k}"),
                e,
            ));
        }
    }
    out
}

fn bench_shape(
    gemm: &Gemm,
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    out: &mut Vec<BenchResult>,
) -> Result<()> {
    let mut bufs = BenchBuffers::new(dev, m, n, k, Epilogue::AddF32)?;
    let default = gemm.wgmma_plan_without_clusters(m, n, k);
    let chosen = gemm.wgmma_plan(m, n, k);
    out.push(bufs.bench_plan(
        gemm,
        dev,
        default,
        m,
        format!("gemm.cluster_split m{m} n{n} k{k} plan without clusters"),
        true,
        super::gemm_sweep::describe(&default),
    )?);
    if chosen != default {
        out.push(bufs.bench_plan(
            gemm,
            dev,
            chosen,
            m,
            format!("gemm.cluster_split m{m} n{n} k{k} plan with clusters"),
            false,
            super::gemm_sweep::describe(&chosen),
        )?);
    }
    for kernel in KERNELS {
        let Some(plan) = plan_for(kernel, (m, n, k)) else {
            continue;
        };
        for (how, p) in [
            ("workspace", GemmPlan::Wgmma(plan)),
            ("cluster", GemmPlan::ClusterSplit(plan)),
        ] {
            out.push(bufs.bench_plan(
                gemm,
                dev,
                p,
                m,
                format!(
                    "gemm.cluster_split m{m} n{n} k{k} wg{}_cs{} {how}",
                    kernel.0, kernel.1
                ),
                false,
                super::gemm_sweep::describe(&p),
            )?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_compiled_cluster_shapes_have_a_kernel() {
        // The attention-output projection at M = 384: 3 × 22 tiles of 128 rows × 2 splits.
        let p = WgmmaPlan::with_ktiles_per_split(2, 384, 4096, 4096, 32);
        assert_eq!((p.wg, p.splits), (2, 2));
        assert_eq!(kernel_index(&p), Some(0));
        let p3 = WgmmaPlan::with_ktiles_per_split(3, 384, 4096, 4096, 22);
        assert_eq!((p3.wg, p3.splits), (3, 3));
        assert_eq!(kernel_index(&p3), Some(3));
        // The attention-output projection of b8's block step (M = 256): wg2, 3 splits.
        let b8 = WgmmaPlan::with_ktiles_per_split(2, 256, 4096, 4096, 22);
        assert_eq!((b8.m_tiles, b8.splits), (2, 3));
        assert_eq!(kernel_index(&b8), Some(1));
        // No split, 4 splits, or a paired (TMA) plan: no kernel.
        let one = WgmmaPlan::with_ktiles_per_split(2, 384, 4096, 4096, 64);
        assert_eq!(kernel_index(&one), None);
        let four = WgmmaPlan::with_ktiles_per_split(2, 384, 4096, 4096, 16);
        assert_eq!(four.splits, 4);
        assert_eq!(kernel_index(&four), None);
        assert_eq!(kernel_index(&p.paired()), None);
    }

    #[test]
    fn every_kernel_is_checked_on_the_projection_shapes() {
        for kernel in KERNELS {
            for shape in [(384, 4096, 4096), (384, 4096, 12_288), (133, 392, 776)] {
                let p = plan_for(kernel, shape).unwrap();
                assert_eq!(kernel_index(&p), KERNELS.iter().position(|&k| k == kernel));
            }
        }
    }

    #[test]
    fn clusters_must_not_add_a_wave() {
        // 132 blocks as 66 pairs, all resident: one wave either way.
        assert!(keeps_waves(132, 2, Some(66), 132));
        // 132 blocks as 44 triples when GPCs of 16 or 18 SMs hold only 42 of them: two waves.
        assert!(!keeps_waves(132, 3, Some(42), 132));
        assert!(keeps_waves(132, 3, Some(44), 132));
        // Already two waves of single blocks: clusters may use them.
        assert!(keeps_waves(264, 3, Some(44), 132));
        // Unknown residency: pairs only.
        assert!(keeps_waves(132, 2, None, 132));
        assert!(!keeps_waves(132, 3, None, 132));
    }
}
