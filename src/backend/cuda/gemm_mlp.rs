//! The batch-1 block step's MLP in one launch: `gemm_stream_mlp_mg{1..4}` (`cuda/gemm_stream.cu`),
//! opt-in with `DLLM_FUSED_MLP=1` (written in session 9 without a GPU to run it on).
//!
//! For `M ≤ 32` the block step's gate/up projection (with the SwiGLU in its epilogue) and the down
//! projection are two stream-GEMM launches. Each pays a ramp-up (its first weights requested
//! only once its blocks are resident) and a tail (the last chunks and the split-tile reductions,
//! while HBM idles). The fused kernel runs both jobs through one persistent ring with a grid-wide
//! barrier between them: while the gate/up job drains and the grid waits for its last tile, the
//! producer already streams the first ring's worth of the down projection's weights. Each job
//! computes exactly what a stream launch of the same block count computes, in the same order, so
//! the result equals the two launches bit for bit (`dllm-gpu-check`'s `gemm.fused_mlp` checks
//! that).
//!
//! The barrier needs every block resident at once: the grid is capped at the blocks the SMs hold
//! together (the occupancy query at load: one per SM with the default ring), and
//! programmatic dependent launch lets the next kernel start only once every block of this one
//! has started. A GPU shared under MPS with fewer SMs than the device reports could still leave a
//! block waiting for an SM: the barrier's watchdog then ends the launch with an error instead of
//! hanging.

use super::check::{self, BenchResult, CheckResult};
use super::gemm::{download, load_stream_family, upload, Gemm, GemmOut, GemmPlan};
use super::gemm_norm::{EpiParams, NormFold, NormPrep};
use super::gemm_stream::{self, StreamPlan, STREAM_THREADS};
use super::launch::Launch;
use super::scratch::ReductionScratch;
use super::{cuda_err, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUtensorMap;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::sync::Mutex;

/// Whether the fused MLP is wanted: only with `DLLM_FUSED_MLP=1`.
pub fn requested_by_env() -> bool {
    super::env_switch::flag("DLLM_FUSED_MLP", false)
}

/// The loaded kernels, their ring depth, how many of their blocks an SM holds at once, and their
/// grid barrier (two words, zero between launches).
pub struct FusedMlp {
    fs: Vec<CudaFunction>,
    stages: usize,
    blocks_per_sm: usize,
    grid_bar: Mutex<CudaSlice<u32>>,
}

/// The two jobs of one launch: gate/up (`m × 2·inter`, depth `hidden`) then down (`m × hidden`,
/// depth `inter`), on the same grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpPlan {
    pub up: StreamPlan,
    pub down: StreamPlan,
}

impl MlpPlan {
    /// Both jobs on `blocks` blocks, fewer where either job has fewer (tile, chunk) pairs (a
    /// block with no pair of a job would still have to pass the barrier).
    pub fn new(m: usize, hidden: usize, inter: usize, blocks: usize) -> Result<MlpPlan> {
        let up = StreamPlan::with_blocks(m, 2 * inter, hidden, blocks)?;
        let down = StreamPlan::with_blocks(m, hidden, inter, blocks)?;
        let blocks = up.blocks.min(down.blocks);
        Ok(MlpPlan {
            up: StreamPlan::with_blocks(m, 2 * inter, hidden, blocks)?,
            down: StreamPlan::with_blocks(m, hidden, inter, blocks)?,
        })
    }

    /// Workspace floats of the two jobs, one after the other.
    pub fn workspace_floats(&self) -> [usize; 2] {
        [self.up.workspace_floats(), self.down.workspace_floats()]
    }

    /// Reduction counters of the two jobs, one after the other.
    pub fn counters(&self) -> [usize; 2] {
        [self.up.counters(), self.down.counters()]
    }
}

impl FusedMlp {
    /// Loads `gemm_stream_mlp_mg{1..4}` for a ring of `stages` (the stream module's own), finds
    /// how many of their blocks an SM holds at once (at least one, or an error), and allocates
    /// the grid barrier.
    pub fn load(dev: &CudaDevice, stages: usize) -> Result<FusedMlp> {
        let fs = load_stream_family(dev, "gemm_stream_mlp_mg", stages)?;
        let mut blocks_per_sm = usize::MAX;
        for (i, f) in fs.iter().enumerate() {
            let smem = gemm_stream::smem_bytes(i + 1, stages);
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(STREAM_THREADS, smem as usize, None)
                .map_err(|e| cuda_err(&format!("gemm_stream_mlp_mg{}: occupancy", i + 1), e))?;
            if per_sm < 1 {
                return Err(Error::Unsupported(format!(
                    "gemm_stream_mlp_mg{}: no block fits an SM ({smem} bytes of shared memory)",
                    i + 1
                )));
            }
            blocks_per_sm = blocks_per_sm.min(per_sm as usize);
        }
        let grid_bar = dev
            .stream
            .alloc_zeros::<u32>(2)
            .map_err(|e| cuda_err("fused MLP: allocate the grid barrier", e))?;
        Ok(FusedMlp {
            fs,
            stages,
            blocks_per_sm,
            grid_bar: Mutex::new(grid_bar),
        })
    }

    /// The most blocks of a launch that `num_sms` SMs hold at once: a larger grid would wait at
    /// the barrier for blocks that cannot start.
    pub fn resident_blocks(&self, num_sms: usize) -> usize {
        num_sms * self.blocks_per_sm
    }

    /// Launches `plan` on `dev.stream`: `h = swiglu(x · w_guᵀ)` then `r += h · w_dᵀ`. `maps` are
    /// the tensor maps of x, w_gu, h and w_d (boxes of `8·groups` activation rows and
    /// `STREAM_ROWS` weight rows); `scratch` holds both jobs' workspaces and zeroed counters
    /// ([`MlpPlan::workspace_floats`], [`MlpPlan::counters`]). The caller validated the shapes,
    /// the buffers' lengths and alignment.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        dev: &CudaDevice,
        plan: &MlpPlan,
        maps: &[CUtensorMap; 4],
        h: &mut CudaViewMut<u16>,
        r: &mut CudaViewMut<f32>,
        scratch: &mut ReductionScratch,
        (m, hidden, inter): (usize, usize, usize),
        params: &[EpiParams; 2],
    ) -> Result<()> {
        let groups = plan.up.groups;
        let f = &self.fs[groups - 1];
        let [ws_up, _] = plan.workspace_floats();
        let [counters_up, _] = plan.counters();
        let ws = scratch.ws.device_ptr(&dev.stream).0;
        let counters = scratch.counters.device_ptr(&dev.stream).0;
        let (ws_down, counters_down) = (ws + 4 * ws_up as u64, counters + 4 * counters_up as u64);
        let grid_bar = self.grid_bar.lock().unwrap_or_else(|p| p.into_inner());
        let (mi, hi, ii) = (m as i32, hidden as i32, inter as i32);
        let cfg = LaunchConfig {
            grid_dim: (plan.up.blocks as u32, 1, 1),
            block_dim: (STREAM_THREADS, 1, 1),
            shared_mem_bytes: gemm_stream::smem_bytes(groups, self.stages),
        };
        let mut b = Launch::new(&dev.stream, f, dev.pdl);
        b.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&maps[3]);
        b.arg(h).arg(r);
        b.arg(&ws).arg(&counters).arg(&ws_down).arg(&counters_down);
        b.arg(&*grid_bar).arg(&mi).arg(&hi).arg(&ii);
        b.arg(&params[0]).arg(&params[1]);
        // SAFETY: the tensor maps describe exactly x [m, hidden], w_gu [2·inter, hidden],
        // h [m, inter] and w_d [hidden, inter] (the caller validated their lengths and 16-byte
        // alignment) and TMA never reads outside them; stores are masked to the m rows and the
        // jobs' columns. The workspace holds both jobs' partial slots and the counters both jobs'
        // entries, zero between launches (each reducer resets its counter); the grid barrier is
        // two words the last block through resets. The fold's buffers in `params` were checked
        // against the jobs' shapes (NormFold::params). Every block resident at once
        // (`Gemm::mlp_plan` caps the grid at `resident_blocks`), all launches ordered on
        // dev.stream.
        unsafe { b.launch(cfg) }
            .map_err(|e| cuda_err(&format!("launch gemm_stream_mlp_mg{groups}"), e))
    }
}

/// One check case: `m` rows, hidden width, MLP width.
const CASES: [(usize, usize, usize); 4] = [
    // The tiny test model's block step (3 down tiles of 8 chunks: 24 blocks).
    (28, 384, 1024),
    // Odd rows, a partial stream tile in both jobs, tiles cut between blocks.
    (17, 520, 1392),
    (1, 256, 512),
    // LLaDA-8B's batch-1 block step (also timed against the two launches).
    (32, 4096, 12_288),
];

/// `dllm-gpu-check`'s fused-MLP checks: on each case the fused launch against the two stream
/// launches of the same plans (`Gemm::run_plan`), bit for bit in `h` and in the residual; where
/// the hidden width is whole 32-column groups, again with the RMSNorm fold (the gate/up job's
/// row scale, the down job's prep), bit for bit in its outputs too.
/// Nothing to check where the stream kernel is not in use (the Ampere build). Never panics.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let gemm = match checked_gemm(dev) {
        Ok(Some(g)) => g,
        Ok(None) => return vec![],
        Err(e) => return vec![CheckResult::failed("gemm.fused_mlp load", e)],
    };
    CASES
        .iter()
        .enumerate()
        .flat_map(|(ci, &shape)| [(ci, shape, false), (ci, shape, true)])
        .filter(|&(_, shape, fold)| !fold || folds(shape))
        .map(|(ci, shape, fold)| {
            let mut name = case_name(shape);
            if fold {
                name.push_str(" + norm fold");
            }
            match check_case(dev, &gemm, ci as u64, shape, fold, false) {
                Ok((mismatch, _)) => CheckResult::exact(
                    name,
                    mismatch.is_none(),
                    mismatch.unwrap_or_else(|| {
                        if fold {
                            "h, the residual, xg and the partial sums identical to the two stream \
                             launches"
                                .to_string()
                        } else {
                            "h and the residual identical to the two stream launches".to_string()
                        }
                    }),
                ),
                Err(e) => CheckResult::failed(name, e),
            }
        })
        .collect()
}

/// The LLaDA-8B block step's MLP timed as one launch and as the two stream launches.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let shape = CASES[CASES.len() - 1];
    time_shape(dev, shape).unwrap_or_else(|e| vec![BenchResult::failed(case_name(shape), e)])
}

/// `(m, hidden, inter)` timed as one launch and as the two stream launches (`dllm-gpu-check
/// --mlp-shape`, which compute-sanitizer runs; empty where the stream kernel is not in use); an
/// error when the two differ, with or without the RMSNorm fold.
pub fn time_shape(dev: &CudaDevice, shape: (usize, usize, usize)) -> Result<Vec<BenchResult>> {
    let name = case_name(shape);
    let Some(gemm) = checked_gemm(dev)? else {
        return Ok(vec![]);
    };
    if folds(shape) {
        if let (Some(mismatch), _) = check_case(dev, &gemm, 98, shape, true, false)? {
            return Err(Error::Backend(format!("{name} + norm fold: {mismatch}")));
        }
    }
    match check_case(dev, &gemm, 99, shape, false, true)? {
        (Some(mismatch), _) => Err(Error::Backend(format!("{name}: {mismatch}"))),
        (None, Some((fused, apart, bytes))) => Ok(vec![
            BenchResult::new(
                format!("{name} fused"),
                fused,
                Some(bytes),
                None,
                format!("one launch, identical results; two launches {apart:.4} ms"),
            ),
            BenchResult::new(
                format!("{name} two launches"),
                apart,
                Some(bytes),
                None,
                "gate/up + SwiGLU, then down: the default path",
            ),
        ]),
        (None, None) => Ok(vec![]),
    }
}

/// Whether the RMSNorm fold applies to a shape: a hidden width in whole 32-column groups.
fn folds((_, hidden, _): (usize, usize, usize)) -> bool {
    hidden % super::gemm_norm::GROUP_COLS == 0
}

fn case_name((m, hidden, inter): (usize, usize, usize)) -> String {
    format!("gemm.fused_mlp m{m} d{hidden} h{inter}")
}

/// A GEMM instance with the fused MLP loaded, or None where the stream kernel is not in use.
fn checked_gemm(dev: &CudaDevice) -> Result<Option<Gemm>> {
    let gemm = Gemm::load(dev)?;
    if !gemm.stream_active() {
        return Ok(None);
    }
    Ok(Some(gemm.with_mlp(dev)?))
}

/// Mismatch description (None when identical) and, when `time`, (fused ms, two-launch ms,
/// weight bytes).
type CaseOutcome = (Option<String>, Option<(f64, f64, f64)>);

/// One path's outputs: h, the residual, xg and the prep's partial sums.
type MlpOutputs = (
    CudaSlice<u16>,
    CudaSlice<f32>,
    CudaSlice<u16>,
    CudaSlice<f32>,
);

fn check_case(
    dev: &CudaDevice,
    gemm: &Gemm,
    seed: u64,
    (m, hidden, inter): (usize, usize, usize),
    fold: bool,
    time: bool,
) -> Result<CaseOutcome> {
    let bf =
        |s: u64, n: usize| check::to_bf16_bits(&check::random_f32(seed * 10 + s, n, -1.0, 1.0));
    let up = |v: &[u16]| upload(dev, v);
    let x = up(&bf(1, m * hidden))?;
    let w_gu = up(&bf(2, 2 * inter * hidden))?;
    let w_d = up(&bf(3, hidden * inter))?;
    let r0 = check::random_f32(seed * 10 + 4, m * hidden, -1.0, 1.0);
    // The norm fold: the gate/up job's row scale reads partial sums (random, positive), the
    // down job's prep writes xg and its own partial sums with γ.
    let parts = hidden / super::gemm_norm::GROUP_COLS;
    let sq_in = upload(dev, &check::random_f32(seed * 10 + 5, m * parts, 0.5, 40.0))?;
    let gamma = upload(dev, &check::random_f32(seed * 10 + 6, hidden, 0.5, 1.5))?;
    let plan = gemm.mlp_plan(m, hidden, inter)?;
    // Outputs of one path: h, the residual, xg, the prep's partial sums.
    let outputs = || -> Result<MlpOutputs> {
        Ok((
            up(&vec![0u16; m * inter])?,
            upload(dev, &r0)?,
            up(&vec![check::POISON_BF16_BITS; m * hidden])?,
            upload(
                dev,
                &vec![f32::from_bits(check::POISON_F32_BITS); m * parts],
            )?,
        ))
    };
    // The two launches of the same plans.
    let mut reference = outputs()?;
    let apart = |(h, r, xg, sq): &mut MlpOutputs| -> Result<()> {
        let (sv, gv) = (sq_in.as_view(), gamma.as_view());
        let (mut xgv, mut sqv) = (xg.as_view_mut(), sq.as_view_mut());
        let (f_up, f_down) = mlp_folds(fold, &sv, &gv, &mut xgv, &mut sqv);
        gemm.run_plan_fold(
            dev,
            GemmPlan::Stream(plan.up),
            &x.as_view(),
            &w_gu.as_view(),
            GemmOut::SwigluBf16(h.as_view_mut()),
            f_up,
            m,
            2 * inter,
            hidden,
        )?;
        gemm.run_plan_fold(
            dev,
            GemmPlan::Stream(plan.down),
            &h.as_view(),
            &w_d.as_view(),
            GemmOut::AddF32(r.as_view_mut()),
            f_down,
            m,
            hidden,
            inter,
        )
    };
    apart(&mut reference)?;
    let mut got = outputs()?;
    let fused = |(h, r, xg, sq): &mut MlpOutputs| -> Result<()> {
        let (sv, gv) = (sq_in.as_view(), gamma.as_view());
        let (mut xgv, mut sqv) = (xg.as_view_mut(), sq.as_view_mut());
        gemm.run_mlp(
            dev,
            &x.as_view(),
            &w_gu.as_view(),
            &mut h.as_view_mut(),
            &w_d.as_view(),
            &mut r.as_view_mut(),
            (m, hidden, inter),
            mlp_folds(fold, &sv, &gv, &mut xgv, &mut sqv),
        )
    };
    fused(&mut got)?;
    dev.sync()?;
    let f32_bits = |s: &CudaSlice<f32>| -> Result<Vec<u16>> {
        // Compared bit for bit: both halves of each f32.
        Ok(download(dev, s)?
            .iter()
            .flat_map(|v| {
                let b = v.to_bits();
                [(b >> 16) as u16, b as u16]
            })
            .collect())
    };
    let pairs = [
        (
            "h",
            download(dev, &got.0)?,
            download(dev, &reference.0)?,
            inter,
        ),
        (
            "residual",
            f32_bits(&got.1)?,
            f32_bits(&reference.1)?,
            2 * hidden,
        ),
        (
            "xg",
            download(dev, &got.2)?,
            download(dev, &reference.2)?,
            hidden,
        ),
        (
            "partials",
            f32_bits(&got.3)?,
            f32_bits(&reference.3)?,
            2 * parts,
        ),
    ];
    let mismatch = pairs.iter().find_map(|(what, g, r, width)| {
        (0..g.len()).find(|&i| g[i] != r[i]).map(|i| {
            format!(
                "{what}[{}, {}] differs from the two launches' ({:#06x} vs {:#06x}; {plan:?})",
                i / width,
                i % width,
                g[i],
                r[i]
            )
        })
    });
    let timing = if time {
        // The residual keeps growing across the timed calls: harmless for a timing.
        let f = check::time_median_ms(dev, 3, 20, |_| fused(&mut got))?;
        let a = check::time_median_ms(dev, 3, 20, |_| apart(&mut reference))?;
        Some((f, a, (3 * inter * hidden * 2) as f64))
    } else {
        None
    };
    Ok((mismatch, timing))
}

/// The check's folds of the two jobs (with `fold`; none without): the gate/up job's row scale of
/// `sq_in`, the down job's prep with `gamma` into `xg` and `sq`.
fn mlp_folds<'a, 'b>(
    fold: bool,
    sq_in: &'a CudaView<'b, f32>,
    gamma: &'a CudaView<'b, f32>,
    xg: &'a mut CudaViewMut<'b, u16>,
    sq: &'a mut CudaViewMut<'b, f32>,
) -> (NormFold<'a, 'b>, NormFold<'a, 'b>) {
    let eps = 1e-5;
    (
        NormFold {
            scale: fold.then_some(sq_in),
            prep: None,
            eps,
        },
        NormFold {
            scale: None,
            prep: fold.then_some(NormPrep { gamma, xg, sq }),
            eps,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_jobs_share_one_grid_no_larger_than_either_needs() {
        // LLaDA-8B's block step: 32 rows, hidden 4096, MLP width 12288.
        let p = MlpPlan::new(32, 4096, 12_288, 132).unwrap();
        assert_eq!(p.up.blocks, 132);
        assert_eq!(p.down.blocks, 132);
        assert_eq!((p.up.tiles, p.up.chunks_per_tile), (192, 32));
        assert_eq!((p.down.tiles, p.down.chunks_per_tile), (32, 96));
        // A tiny model: the down job has 3 tiles × 8 chunks = 24 pairs, so both run on 24.
        let t = MlpPlan::new(28, 384, 1024, 132).unwrap();
        assert_eq!(t.down.pairs(), 24);
        assert_eq!((t.up.blocks, t.down.blocks), (24, 24));
        assert_eq!(t.up.groups, 4);
        let [wu, wd] = t.workspace_floats();
        assert_eq!(
            (wu, wd),
            (t.up.workspace_floats(), t.down.workspace_floats())
        );
        assert!(MlpPlan::new(33, 384, 1024, 132).is_err());
    }
}
