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
use super::gemm::{
    download, load_stream_family, upload, Gemm, GemmOut, GemmPlan, MlpInput, MlpOutJob,
};
use super::gemm_norm::{EpiParams, NormFold, NormPrep};
use super::gemm_stream::{self, StreamPlan, STREAM_THREADS};
use super::launch::Launch;
use super::scratch::ReductionScratch;
use super::{cuda_err, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUtensorMap;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::sync::Mutex;

/// Whether the fused MLP is wanted: only with `DLLM_FUSED_MLP=1`.
pub fn requested_by_env() -> bool {
    super::env_switch::flag("DLLM_FUSED_MLP", false)
}

/// The loaded kernels (`gemm_stream_mlp_mg*`, and `gemm_stream_tail_mg*`: the attention-output
/// projection as a first job), their ring depth, how many of their blocks an SM holds at once, and
/// their grid barriers (two words each, zero between launches).
pub struct FusedMlp {
    mlp: Vec<CudaFunction>,
    /// The layer tail's kernels; None (with the reason) where they do not load, e.g. from a
    /// `DLLM_KERNEL_DIR` module built before them: the plain fused MLP still runs.
    tail: std::result::Result<Vec<CudaFunction>, String>,
    stages: usize,
    blocks_per_sm: usize,
    grid_bar: Mutex<CudaSlice<u32>>,
}

/// The jobs of one launch on one grid: with `out`, the attention-output projection (`m ×
/// hidden`, depth `hidden`) first; then gate/up (`m × 2·inter`, depth `hidden`) and down (`m ×
/// hidden`, depth `inter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpPlan {
    pub out: Option<StreamPlan>,
    pub up: StreamPlan,
    pub down: StreamPlan,
}

impl MlpPlan {
    /// Every job on `blocks` blocks, fewer where a job has fewer (tile, chunk) pairs (each job's
    /// workspace is sized by its plan's block count, which the grid must equal); the
    /// attention-output job first when `with_out`. Its `hidden²` weights can have the fewest
    /// pairs: 9 on the tiny model (the MLP jobs alone run on 24), while every job of LLaDA-8B has
    /// more than an H100 or H200 has SMs.
    pub fn new(
        m: usize,
        hidden: usize,
        inter: usize,
        blocks: usize,
        with_out: bool,
    ) -> Result<MlpPlan> {
        let shapes = |b| -> Result<MlpPlan> {
            Ok(MlpPlan {
                out: if with_out {
                    Some(StreamPlan::with_blocks(m, hidden, hidden, b)?)
                } else {
                    None
                },
                up: StreamPlan::with_blocks(m, 2 * inter, hidden, b)?,
                down: StreamPlan::with_blocks(m, hidden, inter, b)?,
            })
        };
        let first = shapes(blocks)?;
        let fewest = first
            .jobs()
            .iter()
            .map(|j| j.blocks)
            .min()
            .unwrap_or(blocks);
        shapes(fewest)
    }

    /// The jobs in launch order.
    pub fn jobs(&self) -> Vec<StreamPlan> {
        self.out.into_iter().chain([self.up, self.down]).collect()
    }

    /// Workspace floats of each job, in launch order (laid out one after the other).
    pub fn workspace_floats(&self) -> Vec<usize> {
        self.jobs().iter().map(|j| j.workspace_floats()).collect()
    }

    /// Reduction counters of each job, in launch order (laid out one after the other).
    pub fn counters(&self) -> Vec<usize> {
        self.jobs().iter().map(|j| j.counters()).collect()
    }
}

impl FusedMlp {
    /// Loads `gemm_stream_mlp_mg{1..4}` and `gemm_stream_tail_mg{1..4}` for a ring of `stages`
    /// (the stream module's own), finds how many of their blocks an SM holds at once (at least
    /// one, or an error), and allocates the grid barriers.
    pub fn load(dev: &CudaDevice, stages: usize) -> Result<FusedMlp> {
        let mlp = load_stream_family(dev, "gemm_stream_mlp_mg", stages)?;
        let tail =
            load_stream_family(dev, "gemm_stream_tail_mg", stages).map_err(|e| e.to_string());
        let mut blocks_per_sm = usize::MAX;
        let families = [
            Some(("gemm_stream_mlp_mg", &mlp)),
            tail.as_ref().ok().map(|t| ("gemm_stream_tail_mg", t)),
        ];
        for (prefix, fs) in families.into_iter().flatten() {
            for (i, f) in fs.iter().enumerate() {
                let smem = gemm_stream::smem_bytes(i + 1, stages);
                let per_sm = f
                    .occupancy_max_active_blocks_per_multiprocessor(
                        STREAM_THREADS,
                        smem as usize,
                        None,
                    )
                    .map_err(|e| cuda_err(&format!("{prefix}{}: occupancy", i + 1), e))?;
                if per_sm < 1 {
                    return Err(Error::Unsupported(format!(
                        "{prefix}{}: no block fits an SM ({smem} bytes of shared memory)",
                        i + 1
                    )));
                }
                blocks_per_sm = blocks_per_sm.min(per_sm as usize);
            }
        }
        let grid_bar = dev
            .stream
            .alloc_zeros::<u32>(4)
            .map_err(|e| cuda_err("fused MLP: allocate the grid barriers", e))?;
        Ok(FusedMlp {
            mlp,
            tail,
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

    /// Why the layer tail's kernels are not loaded (None when they are).
    pub fn tail_failure(&self) -> Option<&str> {
        self.tail.as_ref().err().map(String::as_str)
    }

    /// Launches `plan` on `dev.stream`: (with `plan.out`) `r += o · w_oᵀ`, then `h = swiglu(x ·
    /// w_guᵀ)` and `r += h · w_dᵀ`. `maps` are the tensor maps of (o, w_o,) x, w_gu, h and w_d
    /// (boxes of `8·groups` activation rows and `STREAM_ROWS` weight rows), `params` each job's
    /// epilogue parameters; `scratch` holds every job's workspace and zeroed counters
    /// ([`MlpPlan::workspace_floats`], [`MlpPlan::counters`]). The caller validated the shapes,
    /// the buffers' lengths and alignment, and the folds' buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        dev: &CudaDevice,
        plan: &MlpPlan,
        maps: &[CUtensorMap],
        h: &mut CudaViewMut<u16>,
        r: &mut CudaViewMut<f32>,
        scratch: &mut ReductionScratch,
        (m, hidden, inter): (usize, usize, usize),
        params: &[EpiParams],
    ) -> Result<()> {
        let jobs = plan.jobs().len();
        if maps.len() != 2 * jobs || params.len() != jobs {
            return Err(Error::invalid(format!(
                "fused MLP: {} maps and {} parameter sets for {jobs} jobs",
                maps.len(),
                params.len()
            )));
        }
        let groups = plan.up.groups;
        if plan
            .jobs()
            .iter()
            .any(|j| j.blocks != plan.up.blocks || j.groups != groups)
        {
            return Err(Error::invalid(format!(
                "fused MLP: every job of {plan:?} must run on one grid with one row-group count"
            )));
        }
        let (fs, kname) = if plan.out.is_some() {
            let tail = self.tail.as_ref().map_err(|why| {
                Error::Backend(format!("fused MLP: the layer tail is not loaded ({why})"))
            })?;
            (tail, "gemm_stream_tail_mg")
        } else {
            (&self.mlp, "gemm_stream_mlp_mg")
        };
        let f = &fs[groups - 1];
        let ws = scratch.ws.device_ptr(&dev.stream).0;
        let counters = scratch.counters.device_ptr(&dev.stream).0;
        // Each job's workspace and counters, one after the other (4-byte elements).
        let mut at = (ws, counters);
        let mut slots = Vec::with_capacity(jobs);
        for (w, c) in plan.workspace_floats().into_iter().zip(plan.counters()) {
            slots.push(at);
            at = (at.0 + 4 * w as u64, at.1 + 4 * c as u64);
        }
        let grid_bar = self.grid_bar.lock().unwrap_or_else(|p| p.into_inner());
        let (mi, hi, ii) = (m as i32, hidden as i32, inter as i32);
        let cfg = LaunchConfig {
            grid_dim: (plan.up.blocks as u32, 1, 1),
            block_dim: (STREAM_THREADS, 1, 1),
            shared_mem_bytes: gemm_stream::smem_bytes(groups, self.stages),
        };
        let mut b = Launch::new(&dev.stream, f, dev.pdl);
        for map in maps {
            b.arg(map);
        }
        b.arg(h).arg(r);
        for (w, c) in &slots {
            b.arg(w).arg(c);
        }
        b.arg(&*grid_bar).arg(&mi).arg(&hi).arg(&ii);
        for p in params {
            b.arg(p);
        }
        // SAFETY: the tensor maps describe exactly (o [m, hidden], w_o [hidden, hidden],)
        // x [m, hidden], w_gu [2·inter, hidden], h [m, inter] and w_d [hidden, inter] (the caller
        // validated their lengths and 16-byte alignment) and TMA never reads outside them; stores
        // are masked to the m rows and the jobs' columns. The workspace holds every job's partial
        // slots and the counters every job's entries, zero between launches (each reducer resets
        // its counter); the grid barriers are words the last block through resets. The fold's
        // buffers in `params` were checked against the jobs' shapes (NormFold::params). Every
        // block resident at once (`Gemm::mlp_plan` caps the grid at `resident_blocks`), all
        // launches ordered on dev.stream.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {kname}{groups}"), e))
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

/// What one check case runs: the MLP alone, with the RMSNorm fold (the gate/up job's row scale
/// from given partial sums, the down job's prep), or as the layer tail (the attention-output
/// projection first, its prep feeding the gate/up job's row scale; the down job's prep too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Fold,
    Tail,
}

impl Mode {
    fn suffix(self) -> &'static str {
        match self {
            Mode::Plain => "",
            Mode::Fold => " + norm fold",
            Mode::Tail => " layer tail (attention output first) + norm fold",
        }
    }
}

/// `dllm-gpu-check`'s fused-MLP checks: on each case the fused launch against the stream
/// launches of the same plans (`Gemm::run_plan_fold`), bit for bit in `h` and in the residual;
/// where the hidden width is whole 32-column groups, again with the RMSNorm fold and as the
/// layer tail (three jobs), bit for bit in the fold's outputs too. Nothing to check where the
/// stream kernel is not in use (the Ampere build). Never panics.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let gemm = match checked_gemm(dev) {
        Ok(Some(g)) => g,
        Ok(None) => return vec![],
        Err(e) => return vec![CheckResult::failed("gemm.fused_mlp load", e)],
    };
    CASES
        .iter()
        .enumerate()
        .flat_map(|(ci, &shape)| [Mode::Plain, Mode::Fold, Mode::Tail].map(|md| (ci, shape, md)))
        .filter(|&(_, shape, md)| md == Mode::Plain || folds(shape))
        .map(|(ci, shape, md)| {
            let name = format!("{}{}", case_name(shape), md.suffix());
            match check_case(dev, &gemm, ci as u64, shape, md, false) {
                Ok((mismatch, _)) => CheckResult::exact(
                    name,
                    mismatch.is_none(),
                    mismatch.unwrap_or_else(|| {
                        "every output identical to the separate stream launches".to_string()
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

/// `(m, hidden, inter)` timed as one launch and as the two stream launches, and (where the fold
/// applies) the layer tail as one launch and as three (`dllm-gpu-check --mlp-shape`, which
/// compute-sanitizer runs; empty where the stream kernel is not in use); an error when a fused
/// launch differs from its separate launches, with or without the RMSNorm fold.
pub fn time_shape(dev: &CudaDevice, shape: (usize, usize, usize)) -> Result<Vec<BenchResult>> {
    let name = case_name(shape);
    let Some(gemm) = checked_gemm(dev)? else {
        return Ok(vec![]);
    };
    let modes: &[Mode] = if folds(shape) {
        &[Mode::Plain, Mode::Fold, Mode::Tail]
    } else {
        &[Mode::Plain]
    };
    let mut out = Vec::new();
    for &md in modes {
        let timed = md != Mode::Fold;
        let label = format!("{name}{}", md.suffix());
        match check_case(dev, &gemm, 99, shape, md, timed)? {
            (Some(mismatch), _) => return Err(Error::Backend(format!("{label}: {mismatch}"))),
            (None, Some((fused, apart, bytes))) => {
                let launches = if md == Mode::Tail { "three" } else { "two" };
                out.push(BenchResult::new(
                    format!("{label} fused"),
                    fused,
                    Some(bytes),
                    None,
                    format!("one launch, identical results; {launches} launches {apart:.4} ms"),
                ));
                out.push(BenchResult::new(
                    format!("{label} {launches} launches"),
                    apart,
                    Some(bytes),
                    None,
                    "the separate stream launches",
                ));
            }
            (None, None) => {}
        }
    }
    Ok(out)
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

/// Mismatch description (None when identical) and, when `time`, (fused ms, separate launches
/// ms, weight bytes).
type CaseOutcome = (Option<String>, Option<(f64, f64, f64)>);

/// One path's outputs: h, the residual, the down job's prep (xa, its partial sums) and the
/// attention-output job's (xn, its partial sums; the layer tail only).
struct MlpOutputs {
    h: CudaSlice<u16>,
    r: CudaSlice<f32>,
    xa: CudaSlice<u16>,
    sq_attn: CudaSlice<f32>,
    xn: CudaSlice<u16>,
    sq_ff: CudaSlice<f32>,
}

impl MlpOutputs {
    /// Every output downloaded as bits to compare (an f32 as its two halves), with its name and
    /// row width in those units, for `(hidden, inter, partial sums per row)`.
    fn bits(
        &self,
        dev: &CudaDevice,
        (hidden, inter, parts): (usize, usize, usize),
    ) -> Result<[(&'static str, Vec<u16>, usize); 6]> {
        let f32_bits = |s: &CudaSlice<f32>| -> Result<Vec<u16>> {
            Ok(download(dev, s)?
                .iter()
                .flat_map(|v| {
                    let b = v.to_bits();
                    [(b >> 16) as u16, b as u16]
                })
                .collect())
        };
        Ok([
            ("h", download(dev, &self.h)?, inter),
            ("residual", f32_bits(&self.r)?, 2 * hidden),
            ("xa", download(dev, &self.xa)?, hidden),
            ("sq_attn", f32_bits(&self.sq_attn)?, 2 * parts),
            ("xn", download(dev, &self.xn)?, hidden),
            ("sq_ff", f32_bits(&self.sq_ff)?, 2 * parts),
        ])
    }
}

/// The operands of one case.
struct MlpOperands {
    o: CudaSlice<u16>,
    w_o: CudaSlice<u16>,
    x: CudaSlice<u16>,
    w_gu: CudaSlice<u16>,
    w_d: CudaSlice<u16>,
    sq_in: CudaSlice<f32>,
    gamma_ff: CudaSlice<f32>,
    gamma: CudaSlice<f32>,
}

const EPS: f32 = 1e-5;

fn check_case(
    dev: &CudaDevice,
    gemm: &Gemm,
    seed: u64,
    (m, hidden, inter): (usize, usize, usize),
    md: Mode,
    time: bool,
) -> Result<CaseOutcome> {
    let bf = |s: u64, n: usize| {
        upload(
            dev,
            &check::to_bf16_bits(&check::random_f32(seed * 10 + s, n, -1.0, 1.0)),
        )
    };
    let f32s = |s: u64, n: usize, lo: f32, hi: f32| {
        upload(dev, &check::random_f32(seed * 10 + s, n, lo, hi))
    };
    let parts = hidden / super::gemm_norm::GROUP_COLS;
    let ops = MlpOperands {
        o: bf(7, m * hidden)?,
        w_o: upload(
            dev,
            &check::to_bf16_bits(&check::random_f32(
                seed * 10 + 8,
                hidden * hidden,
                -0.05,
                0.05,
            )),
        )?,
        x: bf(1, m * hidden)?,
        w_gu: bf(2, 2 * inter * hidden)?,
        w_d: bf(3, hidden * inter)?,
        // The fold: given partial sums (random, positive) for the gate/up job's row scale
        // without the tail, and the norms' weights.
        sq_in: f32s(5, m * parts.max(1), 0.5, 40.0)?,
        gamma_ff: f32s(9, hidden, 0.5, 1.5)?,
        gamma: f32s(6, hidden, 0.5, 1.5)?,
    };
    let r0 = check::random_f32(seed * 10 + 4, m * hidden, -1.0, 1.0);
    let plan = gemm.mlp_plan(m, hidden, inter, md == Mode::Tail)?;
    let outputs = || -> Result<MlpOutputs> {
        let sq = || {
            upload(
                dev,
                &vec![f32::from_bits(check::POISON_F32_BITS); m * parts.max(1)],
            )
        };
        Ok(MlpOutputs {
            h: upload(dev, &vec![0u16; m * inter])?,
            r: upload(dev, &r0)?,
            xa: upload(dev, &vec![check::POISON_BF16_BITS; m * hidden])?,
            sq_attn: sq()?,
            xn: upload(dev, &vec![check::POISON_BF16_BITS; m * hidden])?,
            sq_ff: sq()?,
        })
    };
    let mut reference = outputs()?;
    let mut got = outputs()?;
    let apart =
        |o: &mut MlpOutputs| separate_launches(dev, gemm, &plan, &ops, o, md, (m, hidden, inter));
    let fused = |o: &mut MlpOutputs| one_launch(dev, gemm, &ops, o, md, (m, hidden, inter));
    apart(&mut reference)?;
    fused(&mut got)?;
    dev.sync()?;
    let dims = (hidden, inter, parts.max(1));
    let mut pairs = got
        .bits(dev, dims)?
        .into_iter()
        .zip(reference.bits(dev, dims)?);
    let mismatch = pairs.find_map(|((what, g, width), (_, r, _))| {
        (0..g.len()).find(|&i| g[i] != r[i]).map(|i| {
            format!(
                "{what}[{}, {}] differs from the separate launches' ({:#06x} vs {:#06x}; {plan:?})",
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
        let weights = 3 * inter * hidden + if md == Mode::Tail { hidden * hidden } else { 0 };
        Some((f, a, (2 * weights) as f64))
    } else {
        None
    };
    Ok((mismatch, timing))
}

/// The case as separate stream launches of the plan's jobs (`Gemm::run_plan_fold`).
fn separate_launches(
    dev: &CudaDevice,
    gemm: &Gemm,
    plan: &MlpPlan,
    ops: &MlpOperands,
    o: &mut MlpOutputs,
    md: Mode,
    (m, hidden, inter): (usize, usize, usize),
) -> Result<()> {
    let fold = md != Mode::Plain;
    let (gamma_ff, gamma) = (ops.gamma_ff.as_view(), ops.gamma.as_view());
    if let Some(out_plan) = plan.out {
        let (mut xg, mut sq) = (o.xn.as_view_mut(), o.sq_ff.as_view_mut());
        gemm.run_plan_fold(
            dev,
            GemmPlan::Stream(out_plan),
            &ops.o.as_view(),
            &ops.w_o.as_view(),
            GemmOut::AddF32(o.r.as_view_mut()),
            NormFold {
                scale: None,
                prep: Some(NormPrep {
                    gamma: &gamma_ff,
                    xg: &mut xg,
                    sq: &mut sq,
                }),
                eps: EPS,
            },
            m,
            hidden,
            hidden,
        )?;
    }
    // The tail's gate/up reads what its first job wrote; otherwise the given rows and sums.
    let (x, sq_in) = if md == Mode::Tail {
        (o.xn.as_view(), o.sq_ff.as_view())
    } else {
        (ops.x.as_view(), ops.sq_in.as_view())
    };
    gemm.run_plan_fold(
        dev,
        GemmPlan::Stream(plan.up),
        &x,
        &ops.w_gu.as_view(),
        GemmOut::SwigluBf16(o.h.as_view_mut()),
        NormFold {
            scale: fold.then_some(&sq_in),
            prep: None,
            eps: EPS,
        },
        m,
        2 * inter,
        hidden,
    )?;
    let (mut xa, mut sq_attn) = (o.xa.as_view_mut(), o.sq_attn.as_view_mut());
    gemm.run_plan_fold(
        dev,
        GemmPlan::Stream(plan.down),
        &o.h.as_view(),
        &ops.w_d.as_view(),
        GemmOut::AddF32(o.r.as_view_mut()),
        NormFold {
            scale: None,
            prep: fold.then_some(NormPrep {
                gamma: &gamma,
                xg: &mut xa,
                sq: &mut sq_attn,
            }),
            eps: EPS,
        },
        m,
        hidden,
        inter,
    )
}

/// The case as one fused launch (`Gemm::run_mlp`).
fn one_launch(
    dev: &CudaDevice,
    gemm: &Gemm,
    ops: &MlpOperands,
    o: &mut MlpOutputs,
    md: Mode,
    dims: (usize, usize, usize),
) -> Result<()> {
    let fold = md != Mode::Plain;
    let (gamma_ff, gamma) = (ops.gamma_ff.as_view(), ops.gamma.as_view());
    let (x, sq_in) = (ops.x.as_view(), ops.sq_in.as_view());
    let (ov, w_o) = (ops.o.as_view(), ops.w_o.as_view());
    let (mut xn, mut sq_ff) = (o.xn.as_view_mut(), o.sq_ff.as_view_mut());
    let (input, fold_up) = if md == Mode::Tail {
        (
            MlpInput::AfterOut(MlpOutJob {
                o: &ov,
                w_o: &w_o,
                prep: NormPrep {
                    gamma: &gamma_ff,
                    xg: &mut xn,
                    sq: &mut sq_ff,
                },
                eps: EPS,
            }),
            NormFold {
                scale: None,
                prep: None,
                eps: EPS,
            },
        )
    } else {
        (
            MlpInput::Rows(&x),
            NormFold {
                scale: fold.then_some(&sq_in),
                prep: None,
                eps: EPS,
            },
        )
    };
    let (mut xa, mut sq_attn) = (o.xa.as_view_mut(), o.sq_attn.as_view_mut());
    let fold_down = NormFold {
        scale: None,
        prep: fold.then_some(NormPrep {
            gamma: &gamma,
            xg: &mut xa,
            sq: &mut sq_attn,
        }),
        eps: EPS,
    };
    gemm.run_mlp(
        dev,
        input,
        &ops.w_gu.as_view(),
        &mut o.h.as_view_mut(),
        &ops.w_d.as_view(),
        &mut o.r.as_view_mut(),
        dims,
        (fold_up, fold_down),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_jobs_share_one_grid_no_larger_than_either_needs() {
        // LLaDA-8B's block step: 32 rows, hidden 4096, MLP width 12288.
        let p = MlpPlan::new(32, 4096, 12_288, 132, false).unwrap();
        assert_eq!(p.up.blocks, 132);
        assert_eq!(p.down.blocks, 132);
        assert_eq!((p.up.tiles, p.up.chunks_per_tile), (192, 32));
        assert_eq!((p.down.tiles, p.down.chunks_per_tile), (32, 96));
        // A tiny model: the down job has 3 tiles × 8 chunks = 24 pairs, so both run on 24.
        let t = MlpPlan::new(28, 384, 1024, 132, false).unwrap();
        assert_eq!(t.down.pairs(), 24);
        assert_eq!((t.up.blocks, t.down.blocks), (24, 24));
        assert_eq!(t.up.groups, 4);
        assert_eq!(t.out, None);
        assert_eq!(
            t.workspace_floats(),
            vec![t.up.workspace_floats(), t.down.workspace_floats()]
        );
        assert!(MlpPlan::new(33, 384, 1024, 132, false).is_err());
    }

    #[test]
    fn the_layer_tail_puts_the_attention_output_job_first_on_the_same_grid() {
        // LLaDA-8B: the attention-output job (32 tiles × 32 chunks) keeps all 132 blocks.
        let p = MlpPlan::new(32, 4096, 12_288, 132, true).unwrap();
        let out = p.out.unwrap();
        assert_eq!((out.tiles, out.chunks_per_tile, out.blocks), (32, 32, 132));
        assert_eq!(p.jobs(), vec![out, p.up, p.down]);
        assert_eq!(
            p.counters(),
            vec![out.counters(), p.up.counters(), p.down.counters()]
        );
        // The tiny model: 3 tiles × 3 chunks = 9 pairs, so every job runs on 9 blocks.
        let t = MlpPlan::new(28, 384, 1024, 132, true).unwrap();
        assert_eq!(t.out.unwrap().pairs(), 9);
        assert!(t.jobs().iter().all(|j| j.blocks == 9), "{t:?}");
    }
}
