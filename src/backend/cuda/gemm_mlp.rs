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

use super::gemm::{load_stream_family, Epilogue};
use super::gemm_norm::EpiParams;
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

/// The loaded kernels (`gemm_stream_mlp_mg*`; `gemm_stream_tail_mg*`: the attention-output
/// projection as a first job; `gemm_stream_chain_mg*`: the tail and the next layer's QKV
/// projection), their ring depth, how many of their blocks an SM holds at once, and their grid
/// barriers (two words each, zero between launches).
pub struct FusedMlp {
    mlp: Vec<CudaFunction>,
    /// The layer tail's kernels; None (with the reason) where they do not load, e.g. from a
    /// `DLLM_KERNEL_DIR` module built before them: the plain fused MLP still runs.
    tail: std::result::Result<Vec<CudaFunction>, String>,
    /// The layer chain's kernels, likewise.
    chain: std::result::Result<Vec<CudaFunction>, String>,
    stages: usize,
    blocks_per_sm: usize,
    grid_bar: Mutex<CudaSlice<u32>>,
}

/// The QKV job's output in a layer chain launch: `c` (`[m, cols]` bf16) and its epilogue
/// ([`Epilogue::StoreBf16`] or [`Epilogue::RopeQkv`], whose parameters are the job's).
pub struct QkvOut<'a> {
    pub c: CudaViewMut<'a, u16>,
    pub epi: Epilogue,
    pub cols: usize,
}

/// Grid barriers of the longest launch (the chain's four jobs), two words each.
const GRID_BAR_WORDS: usize = 6;

/// Which jobs one fused launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpJobs {
    /// Gate/up and down (`gemm_stream_mlp_mg`).
    Mlp,
    /// The attention-output projection, then the MLP: the layer tail (`gemm_stream_tail_mg`).
    Tail,
    /// The layer tail, then the next layer's QKV projection of `qkv_cols` columns (depth
    /// `hidden`): the layer chain (`gemm_stream_chain_mg`).
    Chain { qkv_cols: usize },
}

/// The jobs of one launch on one grid: with `out`, the attention-output projection (`m ×
/// hidden`, depth `hidden`) first; then gate/up (`m × 2·inter`, depth `hidden`) and down (`m ×
/// hidden`, depth `inter`); with `qkv`, the next layer's QKV projection last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpPlan {
    pub out: Option<StreamPlan>,
    pub up: StreamPlan,
    pub down: StreamPlan,
    pub qkv: Option<StreamPlan>,
}

impl MlpPlan {
    /// Every job of `jobs` on `blocks` blocks, fewer where a job has fewer (tile, chunk) pairs
    /// (each job's workspace is sized by its plan's block count, which the grid must equal). The
    /// attention-output job's `hidden²` weights can have the fewest pairs: 9 on the tiny model
    /// (the MLP jobs alone run on 24), while every job of LLaDA-8B has more than an H100 or H200
    /// has SMs.
    pub fn new(
        m: usize,
        hidden: usize,
        inter: usize,
        blocks: usize,
        jobs: MlpJobs,
    ) -> Result<MlpPlan> {
        let shapes = |b| -> Result<MlpPlan> {
            Ok(MlpPlan {
                out: match jobs {
                    MlpJobs::Mlp => None,
                    _ => Some(StreamPlan::with_blocks(m, hidden, hidden, b)?),
                },
                up: StreamPlan::with_blocks(m, 2 * inter, hidden, b)?,
                down: StreamPlan::with_blocks(m, hidden, inter, b)?,
                qkv: match jobs {
                    MlpJobs::Chain { qkv_cols } => {
                        Some(StreamPlan::with_blocks(m, qkv_cols, hidden, b)?)
                    }
                    _ => None,
                },
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
        self.out
            .into_iter()
            .chain([self.up, self.down])
            .chain(self.qkv)
            .collect()
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
    /// Loads `gemm_stream_mlp_mg{1..4}`, `gemm_stream_tail_mg{1..4}` and
    /// `gemm_stream_chain_mg{1..4}` for a ring of `stages` (the stream module's own), finds how
    /// many of their blocks an SM holds at once (at least one, or an error), and allocates the
    /// grid barriers.
    pub fn load(dev: &CudaDevice, stages: usize) -> Result<FusedMlp> {
        let mlp = load_stream_family(dev, "gemm_stream_mlp_mg", stages)?;
        let optional = |prefix| load_stream_family(dev, prefix, stages).map_err(|e| e.to_string());
        let (tail, chain) = (
            optional("gemm_stream_tail_mg"),
            optional("gemm_stream_chain_mg"),
        );
        let mut blocks_per_sm = usize::MAX;
        let families = [
            Some(("gemm_stream_mlp_mg", &mlp)),
            tail.as_ref().ok().map(|t| ("gemm_stream_tail_mg", t)),
            chain.as_ref().ok().map(|t| ("gemm_stream_chain_mg", t)),
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
            .alloc_zeros::<u32>(GRID_BAR_WORDS)
            .map_err(|e| cuda_err("fused MLP: allocate the grid barriers", e))?;
        Ok(FusedMlp {
            mlp,
            tail,
            chain,
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

    /// Why the layer chain's kernels are not loaded (None when they are).
    pub fn chain_failure(&self) -> Option<&str> {
        self.chain.as_ref().err().map(String::as_str)
    }

    /// Launches `plan` on `dev.stream`: (with `plan.out`) `r += o · w_oᵀ`, then `h = swiglu(x ·
    /// w_guᵀ)` and `r += h · w_dᵀ`, then (with `plan.qkv`) `qkv.c = xa · w_qkvᵀ` with epilogue
    /// `qkv.epi`. `maps` are the tensor maps of (o, w_o,) x, w_gu, h, w_d (, xa, w_qkv) (boxes of
    /// `8·groups` activation rows and `STREAM_ROWS` weight rows), `params` each job's epilogue
    /// parameters; `scratch` holds every job's workspace and zeroed counters
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
        qkv: Option<&mut QkvOut<'_>>,
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
        let (fs, kname) = match (plan.out, plan.qkv.is_some(), qkv.is_some()) {
            (None, false, false) => (&self.mlp, "gemm_stream_mlp_mg"),
            (Some(_), false, false) => (loaded(&self.tail, "tail")?, "gemm_stream_tail_mg"),
            (Some(_), true, true) => (loaded(&self.chain, "chain")?, "gemm_stream_chain_mg"),
            _ => {
                return Err(Error::invalid(format!(
                    "fused MLP: no kernel runs {plan:?} (a QKV job needs the tail before it and \
                     an output)"
                )))
            }
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
        let (qkv_cols, qkv_epi) = qkv
            .as_ref()
            .map_or((0, 0), |q| (q.cols as i32, q.epi.code()));
        if let Some(q) = qkv {
            b.arg(&mut q.c);
        }
        for (w, c) in &slots {
            b.arg(w).arg(c);
        }
        b.arg(&*grid_bar).arg(&mi).arg(&hi).arg(&ii);
        if plan.qkv.is_some() {
            b.arg(&qkv_cols).arg(&qkv_epi);
        }
        for p in params {
            b.arg(p);
        }
        // SAFETY: the tensor maps describe exactly (o [m, hidden], w_o [hidden, hidden],)
        // x [m, hidden], w_gu [2·inter, hidden], h [m, inter], w_d [hidden, inter] (, xa [m,
        // hidden], w_qkv [qkv_cols, hidden]) (the caller validated their lengths and 16-byte
        // alignment, and the QKV output's and RoPE parameters' shapes) and TMA never reads
        // outside them; stores are masked to the m rows and the jobs' columns. The workspace holds every job's partial
        // slots and the counters every job's entries, zero between launches (each reducer resets
        // its counter); the grid barriers are words the last block through resets. The fold's
        // buffers in `params` were checked against the jobs' shapes (NormFold::params). Every
        // block resident at once (`Gemm::mlp_plan` caps the grid at `resident_blocks`), all
        // launches ordered on dev.stream.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {kname}{groups}"), e))
    }
}

/// A kernel family that may have failed to load, or why it did.
fn loaded<'f>(
    fs: &'f std::result::Result<Vec<CudaFunction>, String>,
    what: &str,
) -> Result<&'f Vec<CudaFunction>> {
    fs.as_ref()
        .map_err(|why| Error::Backend(format!("fused MLP: the layer {what} is not loaded ({why})")))
}

mod checks;
pub use checks::{bench, self_check, time_shape};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_jobs_share_one_grid_no_larger_than_either_needs() {
        // LLaDA-8B's block step: 32 rows, hidden 4096, MLP width 12288.
        let p = MlpPlan::new(32, 4096, 12_288, 132, MlpJobs::Mlp).unwrap();
        assert_eq!(p.up.blocks, 132);
        assert_eq!(p.down.blocks, 132);
        assert_eq!((p.up.tiles, p.up.chunks_per_tile), (192, 32));
        assert_eq!((p.down.tiles, p.down.chunks_per_tile), (32, 96));
        // A tiny model: the down job has 3 tiles × 8 chunks = 24 pairs, so both run on 24.
        let t = MlpPlan::new(28, 384, 1024, 132, MlpJobs::Mlp).unwrap();
        assert_eq!(t.down.pairs(), 24);
        assert_eq!((t.up.blocks, t.down.blocks), (24, 24));
        assert_eq!(t.up.groups, 4);
        assert_eq!(t.out, None);
        assert_eq!(
            t.workspace_floats(),
            vec![t.up.workspace_floats(), t.down.workspace_floats()]
        );
        assert!(MlpPlan::new(33, 384, 1024, 132, MlpJobs::Mlp).is_err());
    }

    #[test]
    fn the_layer_tail_puts_the_attention_output_job_first_on_the_same_grid() {
        // LLaDA-8B: the attention-output job (32 tiles × 32 chunks) keeps all 132 blocks.
        let p = MlpPlan::new(32, 4096, 12_288, 132, MlpJobs::Tail).unwrap();
        let out = p.out.unwrap();
        assert_eq!((out.tiles, out.chunks_per_tile, out.blocks), (32, 32, 132));
        assert_eq!(p.jobs(), vec![out, p.up, p.down]);
        assert_eq!(
            p.counters(),
            vec![out.counters(), p.up.counters(), p.down.counters()]
        );
        // The tiny model: 3 tiles × 3 chunks = 9 pairs, so every job runs on 9 blocks.
        let t = MlpPlan::new(28, 384, 1024, 132, MlpJobs::Tail).unwrap();
        assert_eq!(t.out.unwrap().pairs(), 9);
        assert!(t.jobs().iter().all(|j| j.blocks == 9), "{t:?}");
        assert_eq!(t.qkv, None);
    }

    #[test]
    fn the_layer_chain_puts_the_next_qkv_job_last_on_the_same_grid() {
        // LLaDA-8B: the QKV projection (96 tiles × 32 chunks) keeps all 132 blocks.
        let p = MlpPlan::new(32, 4096, 12_288, 132, MlpJobs::Chain { qkv_cols: 12_288 }).unwrap();
        let qkv = p.qkv.unwrap();
        assert_eq!((qkv.tiles, qkv.chunks_per_tile, qkv.blocks), (96, 32, 132));
        assert_eq!(p.jobs(), vec![p.out.unwrap(), p.up, p.down, qkv]);
        assert_eq!(p.workspace_floats().len(), 4);
        // The tiny model (QKV 1152 × 384: 9 tiles × 3 chunks): the attention-output job's 9
        // pairs still set the grid.
        let t = MlpPlan::new(28, 384, 1024, 132, MlpJobs::Chain { qkv_cols: 1152 }).unwrap();
        assert_eq!(t.qkv.unwrap().pairs(), 27);
        assert!(t.jobs().iter().all(|j| j.blocks == 9), "{t:?}");
        // A QKV job with fewer pairs than the others sets it instead.
        let s = MlpPlan::new(8, 256, 512, 132, MlpJobs::Chain { qkv_cols: 128 }).unwrap();
        assert_eq!(s.qkv.unwrap().pairs(), 2);
        assert!(s.jobs().iter().all(|j| j.blocks == 2), "{s:?}");
    }
}
