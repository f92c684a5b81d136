//! `dllm-gpu-check`: runs every CUDA kernel family's self-check and bench, then checks the GPU
//! LLaDA model on the tiny checkpoint against the reference logits, the CPU model, and greedy
//! generation, the GPU Dream model (biases, GQA, shifted logits) on a tiny synthetic Dream and
//! the GPU LLaDA-MoE model (q/k head norms, mixture of experts) on a tiny synthetic LLaDA-MoE
//! against the CPU model; each model's padded batched prediction (`predict_batch`) against
//! per-canvas `predict` and the CPU model. Prints a table, writes JSON, exits non-zero when any
//! check failed.
//!
//! Usage: `dllm-gpu-check [--model DIR] [--json PATH]` (default model: models/tiny-llada-code).
//! `dllm-gpu-check --compile-kernels DIR [-D NAME=VALUE]…` instead compiles the kernel sources
//! into a directory for `DLLM_KERNEL_DIR` (a kernel variant built and run without Rust).

use clap::Parser;
use dllm::backend::cuda::check::{self, argmax, argmax_agreement, BenchResult, CheckResult};
use dllm::backend::cuda::memory::StepBuffers;
use dllm::backend::cuda::nvcc::Image;
use dllm::backend::cuda::transformer::{
    packed_session_checks, query_last_layer_checks, CudaTransformer, KernelChoice,
};
use dllm::backend::cuda::{
    attention, elementwise, gemm, gemm_cluster_split, gemm_mlp, gemm_norm, gemm_rope, gemm_sweep,
    gemm_swiglu, kernel_dir, moe, sampling, CudaDevice,
};
use dllm::config::ModelConfig;
use dllm::denoise::predict::{PredictRule, Prediction, Remasking};
use dllm::denoise::session::{Decoding, GenerationParams, Session};
use dllm::denoise::{run_lockstep, CacheMode, CommitPolicy, CreditParams};
use dllm::error::{Error, ErrorKind, Result};
use dllm::model::kv_cache::span_for;
use dllm::model::{BatchQuery, Model};
use dllm::model::{CacheStep, KvCache};
use dllm::weights::WeightStore;
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Checks and benchmarks dllm's CUDA kernels and GPU model")]
struct Args {
    /// Tiny model used for the end-to-end checks.
    #[arg(long, default_value = "models/tiny-llada-code")]
    model: PathBuf,
    /// Write all results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the kernel benches.
    #[arg(long)]
    no_bench: bool,
    /// Run only these parts (comma-separated: elementwise, gemm, attention, sampling, model;
    /// `model` covers the LLaDA and Dream model checks). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Instead of the checks: time the GEMM `run` picks on one shape `M,N,K` (bf16 output) and
    /// exit; a short, focused workload for `ncu` / `compute-sanitizer`.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    gemm_shape: Option<Vec<usize>>,
    /// Instead of the checks: the fused batch-1 MLP (`DLLM_FUSED_MLP`) on one shape `M,D,H`
    /// (rows, hidden width, MLP width) against its two stream launches, both timed, and exit
    /// (status 1 when they differ); for `ncu` / `compute-sanitizer`.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    mlp_shape: Option<Vec<usize>>,
    /// Instead of the checks: time every launch plan of the GEMM kernels on one shape `M,N,K`
    /// (`backend::cuda::gemm_sweep`), the one `run` picks marked `default`, and exit.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    gemm_sweep: Option<Vec<usize>>,
    /// Epilogue of `--gemm-sweep`: bf16, f32, add_f32 (the residual add of the attention-output
    /// and down projections) or swiglu_bf16 (the fused gate/up projection, N = 2 × MLP width).
    #[arg(long, default_value = "bf16")]
    epilogue: String,
    /// Timed launches for `--gemm-shape` and per plan of `--gemm-sweep`.
    #[arg(long, default_value_t = 20)]
    repeat: usize,
    /// Instead of the checks: compile the kernel sources (`--cuda-src`) into this directory with
    /// build.rs's targets and flags plus `--define`s, for `DLLM_KERNEL_DIR` (needs nvcc: `NVCC`,
    /// `CUDA_HOME`, /usr/local/cuda or `PATH`), and exit.
    #[arg(long, value_name = "DIR")]
    compile_kernels: Option<PathBuf>,
    /// With `--compile-kernels`: a preprocessor definition `NAME` or `NAME=VALUE` (repeatable).
    #[arg(long = "define", short = 'D', value_name = "NAME[=VALUE]")]
    defines: Vec<String>,
    /// With `--compile-kernels`: the kernel sources.
    #[arg(long, default_value = "cuda")]
    cuda_src: PathBuf,
    /// With `--compile-kernels`: which images (ptx, sm90a, sm80; comma-separated). Default: all
    /// that apply to each file.
    #[arg(long, value_delimiter = ',')]
    images: Vec<String>,
}

/// Which parts `--only` selects.
/// `norm_fold` (the RMSNorm fold's checks and benches alone, for compute-sanitizer) runs only when
/// named: `gemm` includes it.
const PARTS: [&str; 7] = [
    "elementwise",
    "moe",
    "gemm",
    "attention",
    "sampling",
    "model",
    "norm_fold",
];

/// The CPU reference's options: f32 activations whatever `DLLM_CPU_BF16` says.
const F32_REFERENCE: dllm::model::CpuOptions = dllm::model::CpuOptions {
    bf16_activations: Some(false),
};

/// `--gemm-shape M,N,K` (one timed shape, the plan `run` picks, bf16 output) or `--gemm-sweep
/// M,N,K` (every candidate plan, with the epilogue named by `sweep`): one line per timing; exit
/// status 1 on an error or a failed plan, 2 on bad arguments.
fn gemm_shape(shape: &[usize], repeat: usize, sweep: Option<&str>) -> ExitCode {
    let flag = if sweep.is_some() {
        "--gemm-sweep"
    } else {
        "--gemm-shape"
    };
    let [m, n, k] = shape else {
        eprintln!("{flag} takes M,N,K (got {shape:?})");
        return ExitCode::from(2);
    };
    let epi = match sweep {
        None => None,
        Some(name) => match gemm::Epilogue::from_name(name) {
            Some(e) => Some(e),
            None => {
                eprintln!(
                    "--epilogue: unknown epilogue {name:?} (bf16, f32, add_f32, swiglu_bf16)"
                );
                return ExitCode::from(2);
            }
        },
    };
    let result = CudaDevice::open(0).and_then(|dev| {
        let r = if let Some(epi) = epi {
            gemm_sweep::sweep_shape(&dev, (*m, *n, *k), epi, repeat.max(1))?
        } else {
            vec![gemm::time_shape(&dev, *m, *n, *k, repeat.max(1))?]
        };
        dev.sync()?;
        Ok(r)
    });
    match result {
        Ok(rs) => {
            let mut failed = false;
            for r in rs {
                failed |= r.ms.is_nan();
                println!(
                    "{}: {:.4} ms, {:.0} GB/s of weights, {:.1} TFLOP/s ({})",
                    r.name,
                    r.ms,
                    r.gbps.unwrap_or(f64::NAN),
                    r.tflops.unwrap_or(f64::NAN),
                    r.detail
                );
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("{flag} {m},{n},{k}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--mlp-shape M,D,H`: the fused MLP against its two launches, one line per timing; exit status
/// 1 on an error or a mismatch, 2 on bad arguments.
fn mlp_shape(shape: &[usize]) -> ExitCode {
    let [m, d, h] = shape else {
        eprintln!("--mlp-shape takes M,D,H (got {shape:?})");
        return ExitCode::from(2);
    };
    let result = CudaDevice::open(0).and_then(|dev| gemm_mlp::time_shape(&dev, (*m, *d, *h)));
    match result {
        Ok(rs) if rs.is_empty() => {
            eprintln!("--mlp-shape: the stream kernel is not in use on this device");
            ExitCode::FAILURE
        }
        Ok(rs) => {
            for r in rs {
                println!(
                    "{}: {:.4} ms, {:.0} GB/s of weights ({})",
                    r.name,
                    r.ms,
                    r.gbps.unwrap_or(f64::NAN),
                    r.detail
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("--mlp-shape {m},{d},{h}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Relative L2 tolerance of whole-model logits (bf16 activations vs an fp32 reference).
const TOL_MODEL: f64 = 5e-2;
/// Largest fraction of rows whose argmax may differ from the reference.
const TOL_ARGMAX_MISS: f64 = 0.05;
/// Largest fraction of generated tokens that may differ between GPU and CPU greedy generation.
const TOL_GEN_MISS: f64 = 0.02;
/// The same for the random-weight tiny Dream and LLaDA-MoE: their near-flat distributions make
/// bf16-level differences flip more near-ties than the trained LLaDA model does.
const TOL_DREAM_GEN_MISS: f64 = 0.10;
/// Largest fraction of predicted tokens that may differ in a lockstep session with a block K/V
/// cache (see [`session_cache_checks`]).
const TOL_CACHED_GEN_MISS: f64 = 0.10;
/// Largest confidence gap at a lockstep disagreement (see [`session_cache_checks`]): logits
/// that differ by at most `e` per entry flip an argmax only between candidates whose
/// confidences differ by at most `exp(4e) - 1` (tests/lockstep.rs), 0.1 for `e` = 0.024; a
/// wrong result disagrees far from ties (0.8-0.9 for rows answered from the wrong position).
const TOL_LOCKSTEP_GAP: f64 = 0.10;
/// Relative L2 distance allowed between the confidences of a padded batch and of per-canvas
/// forwards with the reference kernels: every reduction is per row there, so only the
/// sampler's float64 split of a row (which depends on the number of rows) may differ.
const TOL_BATCH_EXACT_CONF: f64 = 1e-9;

fn guarded<T>(
    name: &str,
    f: impl FnOnce() -> Vec<T>,
    on_panic: impl FnOnce(String) -> T,
) -> Vec<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            vec![on_panic(format!("{name} panicked: {msg}"))]
        }
    }
}

fn miss_check(name: String, agree: usize, total: usize, tol: f64, what: &str) -> CheckResult {
    let miss = if total == 0 {
        1.0
    } else {
        1.0 - agree as f64 / total as f64
    };
    CheckResult::new(
        name,
        miss,
        tol,
        format!(
            "{agree}/{total} {what} identical ({} differ)",
            total - agree
        ),
    )
}

/// The numbers of a JSON array that `get` accepts, converted; empty when `v` is no array.
fn json_numbers<T>(v: &Value, get: impl Fn(&Value) -> Option<T>) -> Vec<T> {
    v.as_array()
        .map(|a| a.iter().filter_map(get).collect())
        .unwrap_or_default()
}

fn as_f32s(v: &Value) -> Vec<f32> {
    json_numbers(v, |x| x.as_f64().map(|x| x as f32))
}

fn as_usizes(v: &Value) -> Vec<usize> {
    json_numbers(v, |x| x.as_u64().map(|x| x as usize))
}

/// GPU forward vs `reference_logits.json`.
fn reference_checks(
    gpu: &CudaTransformer,
    dir: &Path,
    tag: &str,
    out: &mut Vec<CheckResult>,
) -> Result<()> {
    let path = dir.join("reference_logits.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let cases = v["cases"]
        .as_array()
        .ok_or_else(|| Error::format(&path, "no `cases` array"))?;
    let width = gpu.config().logits_width();
    for (ci, c) in cases.iter().enumerate() {
        let ids: Vec<u32> = as_usizes(&c["ids"]).into_iter().map(|x| x as u32).collect();
        let logits = gpu.forward(&ids)?;
        let (agree, total) = argmax_agreement(&logits, width, &as_usizes(&c["logits_argmax"]));
        out.push(miss_check(
            format!("model{tag}.ref case{ci} argmax"),
            agree,
            total,
            TOL_ARGMAX_MISS,
            "rows' argmax",
        ));
        let first = as_f32s(&c["logits_first_row"]);
        out.push(CheckResult::new(
            format!("model{tag}.ref case{ci} first row"),
            check::rel_l2(&logits[..width.min(logits.len())], &first),
            TOL_MODEL,
            format!("{} ids", ids.len()),
        ));
        let sums: Vec<f32> = logits
            .chunks(width)
            .map(|r| r.iter().map(|&x| x as f64).sum::<f64>() as f32)
            .collect();
        let want_sums = as_f32s(&c["logits_rowsum"]);
        let l2 = logits
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        let want_l2 = c["logits_l2"].as_f64().unwrap_or(f64::NAN);
        let l2_err = ((l2 - want_l2) / want_l2).abs();
        out.push(CheckResult::new(
            format!("model{tag}.ref case{ci} L2"),
            if l2_err.is_finite() {
                l2_err
            } else {
                f64::INFINITY
            },
            TOL_MODEL,
            format!(
                "L2 {l2:.3} vs {want_l2:.3}; row sums rel err {:.2e}",
                check::rel_l2(&sums, &want_sums)
            ),
        ));
    }
    Ok(())
}

fn greedy() -> GenerationParams {
    GenerationParams {
        steps: 128,
        block_len: 32,
        temperature: 0.0,
        remasking: Remasking::LowConfidence,
        seed: 0,
        ..Default::default()
    }
}

fn generate(model: Arc<dyn Model>, prompt: &[u32], gen: usize) -> Result<Vec<u32>> {
    generate_cached(model, prompt, gen, CacheMode::None)
}

/// Greedy generation through a `Session` with the block K/V cache `cache`.
fn generate_cached(
    model: Arc<dyn Model>,
    prompt: &[u32],
    gen: usize,
    cache: CacheMode,
) -> Result<Vec<u32>> {
    let mut s = cached_session(model, prompt, gen, cache)?;
    s.run()?;
    Ok(s.canvas()[prompt.len()..].to_vec())
}

/// A greedy session of `prompt` + `gen` masks with the block K/V cache `cache`.
fn cached_session(
    model: Arc<dyn Model>,
    prompt: &[u32],
    gen: usize,
    cache: CacheMode,
) -> Result<Session> {
    let cfg = model.config().clone();
    let mut canvas = prompt.to_vec();
    canvas.resize(prompt.len() + gen, cfg.mask_token_id);
    let mut s = Session::new(model, canvas, greedy())?;
    s.set_decoding(Decoding {
        cache,
        ..Decoding::default()
    })?;
    Ok(s)
}

/// The cached forward itself, GPU (device cache, bf16 K/V) vs CPU (host cache, f32 K/V): refresh
/// both caches on a canvas, commit a few tokens of the block, then run each mode's span step and
/// compare the block's logits (the step a session takes; stale K/V outside the span on both).
fn cached_logits_checks(
    prefix: &str,
    gpu: &dyn Model,
    cpu: &dyn Model,
    prompt: &[u32],
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let cfg = gpu.config().clone();
    let width = cfg.logits_width();
    for (name, mode) in [("prefix", CacheMode::Prefix), ("dual", CacheMode::Dual)] {
        let r = (|| -> Result<CheckResult> {
            let mut ids = prompt.to_vec();
            ids.resize(prompt.len() + 48, cfg.mask_token_id);
            let block = prompt.len() + 16..prompt.len() + 32;
            let queries: Vec<usize> = block.clone().collect();
            let (mut gk, mut ck) = (KvCache::new(&cfg, ids.len()), KvCache::new(&cfg, ids.len()));
            gpu.logits_cached(&ids, &queries, &mut gk, &CacheStep::Refresh)?;
            let first = cpu.logits_cached(&ids, &queries, &mut ck, &CacheStep::Refresh)?;
            // Commit the CPU's argmax at the block's first 5 positions, as a step would.
            for (i, row) in first.chunks(width).take(5).enumerate() {
                ids[block.start + i] = argmax(row) as u32;
            }
            let span = span_for(mode, block.clone(), ids.len(), cfg.shifted_logits())
                .ok_or_else(|| Error::invalid("no span for a cache mode"))?;
            let step = CacheStep::Span(span.clone());
            let g = gpu.logits_cached(&ids, &queries, &mut gk, &step)?;
            let c = cpu.logits_cached(&ids, &queries, &mut ck, &step)?;
            let want: Vec<usize> = c.chunks(width).map(argmax).collect();
            let (agree, total) = argmax_agreement(&g, width, &want);
            Ok(CheckResult::new(
                format!("{prefix}.cached logits {name} gpu vs cpu"),
                check::rel_l2(&g, &c),
                TOL_MODEL,
                format!("span {span:?}, block {block:?}; argmax {agree}/{total} rows identical"),
            ))
        })();
        out.push(
            r.unwrap_or_else(|e| CheckResult::failed(format!("{prefix}.cached logits {name}"), e)),
        );
    }
    out
}

/// Session generation without a cache and with each block K/V cache mode, GPU (device cache,
/// bf16 K/V) vs CPU (host cache, f32 K/V), in lockstep ([`run_lockstep`]): the CPU session
/// leads, and every step both predict on the leader's canvas, each through its own cache. A cached step reuses stale K/V,
/// so one near-tie flipped by rounding sends a free-running generation down another (equally
/// valid) path and every later token differs with no error anywhere: session 3's stream GEMM
/// gave 12/128 free-running tokens this way, with a coherent text one blank line shorter. In
/// lockstep each step is compared on its own: the fraction of predicted tokens that differ
/// (`tol`), how far from a tie the widest disagreement was ([`TOL_LOCKSTEP_GAP`]), and the
/// confidences where the tokens agree ([`TOL_MODEL`]). The free-running generations are still
/// run and recorded (details, and the tokens check's text); without a cache that is
/// `free_none`, the GPU's greedy generation of the same prompt and length that the caller ran.
#[allow(clippy::too_many_arguments)]
fn session_cache_checks(
    prefix: &str,
    gpu: Arc<dyn Model>,
    cpu: Arc<dyn Model>,
    prompt: &[u32],
    gen: usize,
    free_none: &[u32],
    tol: f64,
    details: &mut Value,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for (name, mode) in [
        ("none", CacheMode::None),
        ("prefix", CacheMode::Prefix),
        ("dual", CacheMode::Dual),
    ] {
        let label = format!("{prefix}.session lockstep {name} gpu vs cpu");
        let r = (|| -> Result<Vec<CheckResult>> {
            let mut leader = cached_session(cpu.clone(), prompt, gen, mode)?;
            let mut follower = cached_session(gpu.clone(), prompt, gen, mode)?;
            let report = run_lockstep(&mut leader, &mut follower)?;
            let g = match mode {
                CacheMode::None => free_none.to_vec(),
                _ => generate_cached(gpu.clone(), prompt, gen, mode)?,
            };
            let c = report.canvas[prompt.len()..].to_vec();
            let free = same_count(&g, &c);
            details[format!("{prefix}_session_{name}_gpu")] = json!(g);
            details[format!("{prefix}_session_{name}_cpu")] = json!(c);
            details[format!("{prefix}_lockstep_{name}")] = json!({
                "steps": report.steps,
                "predictions": report.predictions,
                "token_mismatches": report.tokens.iter().map(|m| json!({
                    "step": m.step, "position": m.position,
                    "cpu": [m.leader.token, m.leader.confidence],
                    "gpu": [m.follower.token, m.follower.confidence],
                })).collect::<Vec<_>>(),
                "commit_mismatches": report.commits.iter().map(|m| json!({
                    "step": m.step, "cpu": m.leader, "gpu": m.follower, "gap": m.gap,
                })).collect::<Vec<_>>(),
                "free_running_identical": free,
            });
            let agree = report.predictions - report.tokens.len();
            let mut tokens = miss_check(
                format!("{label} tokens"),
                agree,
                report.predictions,
                tol,
                "predicted tokens",
            );
            tokens.detail += &format!(
                " over {} steps; free-running generations {free}/{} identical (informational)",
                report.steps,
                g.len()
            );
            let gap = report.widest_token_gap().max(report.widest_commit_gap());
            Ok(vec![
                tokens,
                CheckResult::new(
                    format!("{label} tie gap"),
                    gap,
                    TOL_LOCKSTEP_GAP,
                    format!(
                        "widest confidence gap at a disagreement: tokens {:.2e} ({}), commit \
                         sets {:.2e} ({} steps differ)",
                        report.widest_token_gap(),
                        report.tokens.len(),
                        report.widest_commit_gap(),
                        report.commits.len()
                    ),
                ),
                CheckResult::new(
                    format!("{label} confidence"),
                    report.confidence_rel_l2,
                    TOL_MODEL,
                    "relative L2 over the predictions whose tokens agree",
                ),
            ])
        })();
        match r {
            Ok(v) => out.extend(v),
            Err(e) => out.push(CheckResult::failed(label, e)),
        }
    }
    out
}

/// Two dual-cache sessions stepped alternately on one GPU model must each end exactly as it
/// ends alone: each keeps its own device K/V cache slot (before slots, every span step of
/// either found the other's K/V and ran as a refresh).
fn alternating_sessions_check(cuda: &Arc<CudaTransformer>, prompt: &[u32]) -> CheckResult {
    let name = "model.alternating cached sessions == alone";
    let gpu: Arc<dyn Model> = cuda.clone();
    let r = (|| -> Result<(f64, String)> {
        let other: Vec<u32> = prompt.iter().rev().copied().collect();
        let mut a = cached_session(gpu.clone(), prompt, 64, CacheMode::Dual)?;
        let mut b = cached_session(gpu.clone(), &other, 64, CacheMode::Dual)?;
        let misses0 = cuda.cache_slot_misses();
        while !(a.is_done() && b.is_done()) {
            a.step()?;
            b.step()?;
        }
        let misses = cuda.cache_slot_misses() - misses0;
        let (ra, rb) = (a.cache_stats().refreshes, b.cache_stats().refreshes);
        let alone_a = generate_cached(gpu.clone(), prompt, 64, CacheMode::Dual)?;
        let alone_b = generate_cached(gpu.clone(), &other, 64, CacheMode::Dual)?;
        let sa = same_count(&a.canvas()[prompt.len()..], &alone_a);
        let sb = same_count(&b.canvas()[other.len()..], &alone_b);
        let ok = sa == alone_a.len() && sb == alone_b.len() && misses == 0;
        Ok((
            if ok { 0.0 } else { f64::INFINITY },
            format!(
                "{sa}/{} and {sb}/{} tokens as alone; {ra} and {rb} refreshes; {misses} span \
                 steps found their cache slot reassigned",
                alone_a.len(),
                alone_b.len()
            ),
        ))
    })();
    CheckResult::from_result(name, 0.0, r)
}

/// A batch whose step buffers exceed the device's memory is refused with an out-of-memory error
/// (the pre-flight check, before any allocation) that leaves the current canvases in place, and
/// the model generates as before afterwards.
fn oversized_batch_check(gpu: &CudaTransformer, prompt: &[u32]) -> CheckResult {
    let name = "model.oversized batch refused, then unaffected";
    let r = (|| -> Result<(f64, String)> {
        let before = engine_generate(gpu, prompt, 64, 32, false)?;
        let canvases = gpu.canvases()?;
        let total = gpu.device().memory()?.total;
        let seq = gpu.config().max_seq_len;
        // What each canvas adds (the LM-head chunk is shared by the batch).
        let (per_canvas, _) = StepBuffers::per_canvas_and_shared(gpu.config(), seq, false);
        let batch = (2 * total / per_canvas.max(1) + 1) as usize;
        let refused = gpu.reserve(batch, seq);
        let kept = gpu.canvases()? == canvases;
        let after = engine_generate(gpu, prompt, 64, 32, false)?;
        let kind_ok = matches!(&refused, Err(e) if e.kind() == ErrorKind::OutOfMemory);
        let same = same_count(&after, &before);
        Ok((
            if kind_ok && kept && same == before.len() {
                0.0
            } else {
                f64::INFINITY
            },
            format!(
                "{batch} canvases × {seq} tokens: {}; canvases kept: {kept}; then {same}/{} \
                 tokens as before",
                match &refused {
                    Ok(()) => "accepted".to_string(),
                    Err(e) => e.to_string(),
                },
                before.len()
            ),
        ))
    })();
    CheckResult::from_result(name, 0.0, r)
}

/// A greedy session with two constrained positions (one allowed a single id, one three), GPU
/// vs CPU: the steps that predict them take the host-logits path (`Model::logits_at`: on the
/// GPU the LM head and download of the queried rows only), the others the fused `predict`. The
/// GPU's constrained positions must hold allowed ids, and its tokens match the CPU's as greedy
/// generation does.
fn constrained_session_check(
    gpu: Arc<dyn Model>,
    cpu: Arc<dyn Model>,
    prompt: &[u32],
) -> CheckResult {
    let name = "model.constrained gen gpu vs cpu";
    let r = (|| -> Result<(f64, String)> {
        let (single, set) = (prompt.len() + 5, prompt.len() + 40);
        let allowed: [u32; 3] = [100, 200, 300];
        let run = |model: Arc<dyn Model>| -> Result<Vec<u32>> {
            let mut s = cached_session(model, prompt, 128, CacheMode::None)?;
            s.constrain(single, &[77])?;
            s.constrain(set, &allowed)?;
            s.run()?;
            Ok(s.canvas().to_vec())
        };
        let (g, c) = (run(gpu)?, run(cpu)?);
        if g[single] != 77 || !allowed.contains(&g[set]) {
            return Ok((
                1.0,
                format!(
                    "GPU broke a constraint: {} at {single} (allowed 77), {} at {set}",
                    g[single], g[set]
                ),
            ));
        }
        let gen = prompt.len()..g.len();
        let same = same_count(&g[gen.clone()], &c[gen.clone()]);
        let miss = 1.0 - same as f64 / gen.len() as f64;
        Ok((
            miss,
            format!("{same}/{} tokens identical; constraints held", gen.len()),
        ))
    })();
    CheckResult::from_result(name, TOL_GEN_MISS, r)
}

/// A greedy session with `decoding` (a dInfer rule: trace credit, which takes the host-logits
/// path every step, `Model::logits_at` or `logits_cached` of the block's masked rows with the
/// credit kept on the host; the hierarchical commit rule, which reads the fused `predict`'s
/// confidences; or the vicinity cache update, whose span steps are wider than the block),
/// GPU vs CPU. The tokens must match the CPU's as greedy generation does; the
/// forward counts are reported.
fn decoding_rule_check(
    name: String,
    gpu: Arc<dyn Model>,
    cpu: Arc<dyn Model>,
    prompt: &[u32],
    decoding: &Decoding,
) -> CheckResult {
    let r = (|| -> Result<(f64, String)> {
        let run = |model: Arc<dyn Model>| -> Result<(Vec<u32>, usize)> {
            let mut s = cached_session(model, prompt, 128, decoding.cache)?;
            s.set_decoding(decoding.clone())?;
            s.run()?;
            Ok((s.canvas().to_vec(), s.forward_steps()))
        };
        let ((g, gf), (c, cf)) = (run(gpu)?, run(cpu)?);
        let gen = prompt.len()..g.len();
        let same = same_count(&g[gen.clone()], &c[gen.clone()]);
        let miss = 1.0 - same as f64 / gen.len() as f64;
        Ok((
            miss,
            format!(
                "{same}/{} tokens identical; forwards GPU {gf}, CPU {cf}",
                gen.len()
            ),
        ))
    })();
    CheckResult::from_result(name, TOL_GEN_MISS, r)
}

fn same_count(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x == y).count()
}

/// The GPU engine path (device canvases, on-GPU commit) with one token per step, no cache:
/// the same schedule as a `Session` with steps == gen tokens.
fn engine_generate(
    gpu: &CudaTransformer,
    prompt: &[u32],
    gen: usize,
    block: usize,
    dual: bool,
) -> Result<Vec<u32>> {
    let cfg = gpu.config().clone();
    let mut canvas = prompt.to_vec();
    canvas.resize(prompt.len() + gen, cfg.mask_token_id);
    gpu.set_canvases(&canvas, 1, canvas.len())?;
    let mut step = 0u64;
    for b in 0..gen / block {
        let span = prompt.len() + b * block..prompt.len() + (b + 1) * block;
        for i in 0..block {
            let rule = PredictRule::greedy(&cfg, step);
            gpu.step(span.clone(), dual && i > 0, dual && i == 0, &rule, 1)?;
            step += 1;
        }
    }
    let out = gpu.canvases()?;
    Ok(out[prompt.len()..].to_vec())
}

/// Runs a fixed greedy schedule on the device canvases (`batch` canvases of `prompt_len` prompt
/// ids + `gen` masks, blocks of `block`, `k` tokens per step, dual cache or none) and returns the
/// final canvases.
#[allow(clippy::too_many_arguments)]
fn engine_schedule(
    gpu: &CudaTransformer,
    canvases: &[u32],
    batch: usize,
    prompt_len: usize,
    gen: usize,
    block: usize,
    k: usize,
    dual: bool,
) -> Result<Vec<u32>> {
    let cfg = gpu.config().clone();
    let seq = prompt_len + gen;
    gpu.set_canvases(canvases, batch, seq)?;
    let mut step = 0u64;
    for b in 0..gen / block {
        let span = prompt_len + b * block..prompt_len + (b + 1) * block;
        for i in 0..block / k {
            let rule = PredictRule::greedy(&cfg, step);
            gpu.step(span.clone(), dual && i > 0, dual && i == 0, &rule, k)?;
            step += 1;
        }
    }
    gpu.canvases()
}

/// CUDA-graph replay must give bit-identical canvases to the eager path: the dual-cache block
/// step at batch 1 (one token per step) and batch 3 (two per step), and the no-cache full step
/// at batch 2 (two per step), on the tiny model.
fn graph_checks(gpu: &CudaTransformer, prompt: &[u32], details: &mut Value) -> Vec<CheckResult> {
    let cfg = gpu.config().clone();
    let mut out = Vec::new();
    let was = gpu.graphs_enabled();
    for &(batch, gen, block, k, dual) in &[
        (1usize, 128usize, 32usize, 1usize, true),
        (3, 64, 32, 2, true),
        (2, 64, 32, 2, false),
    ] {
        let mode = if dual { "" } else { " no cache" };
        let name = format!("model.graph replay == eager b{batch} k{k}{mode}");
        let r = (|| -> Result<(f64, String)> {
            let mut canv = Vec::new();
            for b in 0..batch {
                let mut c: Vec<u32> = prompt
                    .iter()
                    .map(|&t| {
                        let v = (t as usize + 101 * b) % cfg.vocab_size;
                        if v as u32 == cfg.mask_token_id {
                            0
                        } else {
                            v as u32
                        }
                    })
                    .collect();
                c.resize(prompt.len() + gen, cfg.mask_token_id);
                canv.extend(c);
            }
            gpu.set_graphs(false);
            let eager = engine_schedule(gpu, &canv, batch, prompt.len(), gen, block, k, dual)?;
            gpu.set_graphs(true);
            let graphed = engine_schedule(gpu, &canv, batch, prompt.len(), gen, block, k, dual)?;
            let graphs = gpu.graph_count();
            // A second graphed run replays every captured step.
            let replayed = engine_schedule(gpu, &canv, batch, prompt.len(), gen, block, k, dual)?;
            let masks = graphed.iter().filter(|&&t| t == cfg.mask_token_id).count();
            let same = same_count(&eager, &graphed);
            let same2 = same_count(&eager, &replayed);
            details[format!(
                "graph_b{batch}_k{k}{}_count",
                if dual { "" } else { "_none" }
            )] = json!(graphs);
            let err = gpu.graph_error();
            let ok = same == eager.len()
                && same2 == eager.len()
                && graphs > 0
                && masks == 0
                && err.is_none();
            Ok((
                if ok { 0.0 } else { f64::INFINITY },
                format!(
                    "{same}/{n} then {same2}/{n} canvas ids identical; {graphs} graphs captured; {masks} masks left; capture error: {}",
                    err.as_deref().unwrap_or("none"),
                    n = eager.len()
                ),
            ))
        })();
        out.push(CheckResult::from_result(name, 0.0, r));
    }
    // Graphs outlive a generation: a no-cache run with blocks of 16 then one with blocks of 32
    // (same shape, same first block start) must neither replay the first run's graphs nor
    // capture the longer spans without their own warm-up (their head and sampler need more
    // scratch).
    let name = "model.graph replay no cache, block 16 then 32";
    let r = (|| -> Result<(f64, String)> {
        let mut canv = prompt.to_vec();
        canv.resize(prompt.len() + 64, cfg.mask_token_id);
        gpu.set_graphs(false);
        let eager = engine_schedule(gpu, &canv, 1, prompt.len(), 64, 32, 2, false)?;
        gpu.set_graphs(true);
        engine_schedule(gpu, &canv, 1, prompt.len(), 64, 16, 2, false)?;
        let graphed = engine_schedule(gpu, &canv, 1, prompt.len(), 64, 32, 2, false)?;
        let replayed = engine_schedule(gpu, &canv, 1, prompt.len(), 64, 32, 2, false)?;
        let (same, same2) = (same_count(&eager, &graphed), same_count(&eager, &replayed));
        let ok = same == eager.len() && same2 == eager.len() && gpu.graph_error().is_none();
        Ok((
            if ok { 0.0 } else { f64::INFINITY },
            format!(
                "{same}/{n} then {same2}/{n} canvas ids identical to eager blocks of 32; {} graphs; capture error: {}",
                gpu.graph_count(),
                gpu.graph_error().as_deref().unwrap_or("none"),
                n = eager.len()
            ),
        ))
    })();
    out.push(CheckResult::from_result(name, 0.0, r));
    gpu.set_graphs(was);
    out
}

/// With `DLLM_SESSION_GRAPHS=1`: the Session path's graphed layers must give the canvases of its
/// eager path, bit for bit, without a cache and with the dual cache (a first graphed run
/// captures, a second replays). Nothing is checked without the variable (the path is eager).
fn session_graph_checks(gpu: &Arc<CudaTransformer>, prompt: &[u32]) -> Vec<CheckResult> {
    if !dllm::backend::cuda::transformer::session_graphs_from_env() {
        return Vec::new();
    }
    let was = gpu.graphs_enabled();
    let mut out = Vec::new();
    for (name, mode) in [("none", CacheMode::None), ("dual", CacheMode::Dual)] {
        let label = format!("model.session graphs == eager {name}");
        let r = (|| -> Result<(f64, String)> {
            let model: Arc<dyn Model> = gpu.clone();
            gpu.set_graphs(false);
            let eager = generate_cached(model.clone(), prompt, 64, mode)?;
            gpu.set_graphs(true);
            let first = generate_cached(model.clone(), prompt, 64, mode)?;
            let graphs = gpu.graph_count();
            let second = generate_cached(model, prompt, 64, mode)?;
            let (s1, s2) = (same_count(&eager, &first), same_count(&eager, &second));
            let ok =
                s1 == eager.len() && s2 == eager.len() && graphs > 0 && gpu.graph_error().is_none();
            Ok((
                if ok { 0.0 } else { f64::INFINITY },
                format!(
                    "{s1}/{n} then {s2}/{n} tokens identical; {graphs} graphs; capture error: {}",
                    gpu.graph_error().as_deref().unwrap_or("none"),
                    n = eager.len()
                ),
            ))
        })();
        out.push(CheckResult::from_result(label, 0.0, r));
    }
    gpu.set_graphs(was);
    out
}

fn model_checks(dev: &Arc<CudaDevice>, dir: &Path, details: &mut Value) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let t0 = Instant::now();
    let loaded = (|| -> Result<(ModelConfig, WeightStore)> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        Ok((cfg, WeightStore::open(dir)?))
    })();
    let (cfg, store) = match loaded {
        Ok(x) => x,
        Err(e) => return vec![CheckResult::failed("model.load", e)],
    };
    let fast = match CudaTransformer::new(dev.clone(), &store, &cfg, KernelChoice::fast()) {
        Ok(m) => Arc::new(m),
        Err(e) => return vec![CheckResult::failed("model.load gpu", e)],
    };
    details["load_seconds"] = json!(t0.elapsed().as_secs_f64());
    if let Err(e) = reference_checks(&fast, dir, "", &mut out) {
        out.push(CheckResult::failed("model.ref", e));
    }
    // The same with the reference kernels: tells a wrong fast kernel from a wrong model.
    let naive = match CudaTransformer::new(dev.clone(), &store, &cfg, KernelChoice::reference()) {
        Ok(naive) => {
            if let Err(e) = reference_checks(&naive, dir, "[naive kernels]", &mut out) {
                out.push(CheckResult::failed("model[naive kernels].ref", e));
            }
            Some(naive)
        }
        Err(e) => {
            out.push(CheckResult::failed("model[naive kernels].load", e));
            None
        }
    };
    let width = cfg.logits_width();
    // Prompt: a fixed ramp of ids (never the mask id).
    let prompt: Vec<u32> = (0..64u32)
        .map(|i| (i * 37 + 11) % cfg.vocab_size as u32)
        .filter(|&t| t != cfg.mask_token_id)
        .collect();
    // Dual cache consistency: full-forward logits of a block vs the block forward's.
    let dual = (|| -> Result<(f64, String)> {
        let mut canvas = prompt.clone();
        canvas.resize(prompt.len() + 64, cfg.mask_token_id);
        let s0 = prompt.len() + 32;
        fast.set_canvases(&canvas, 1, canvas.len())?;
        fast.forward_full(true)?;
        let full = fast.span_logits(s0..s0 + 32, 0)?;
        fast.forward_block(s0, 32)?;
        let block = fast.span_logits(s0..s0 + 32, s0)?;
        Ok((
            check::rel_l2(&block, &full),
            format!("block {s0}..{} of {}", s0 + 32, canvas.len()),
        ))
    })();
    out.push(CheckResult::from_result(
        "model.dual cache block == full",
        2e-2,
        dual,
    ));
    // CPU model comparisons (f32 activations, the reference, whatever DLLM_CPU_BF16 says).
    let cpu = dllm::model::load_cpu_with(dir, F32_REFERENCE);
    match &cpu {
        Err(e) => out.push(CheckResult::failed("model.cpu load", e)),
        Ok(cpu) => {
            let r = (|| -> Result<()> {
                let mut ids = prompt.clone();
                ids.resize(prompt.len() + 40, cfg.mask_token_id);
                let g = fast.forward(&ids)?;
                let c = cpu.forward(&ids)?;
                let want: Vec<usize> = c.chunks(width).map(argmax).collect();
                let (agree, total) = argmax_agreement(&g, width, &want);
                out.push(CheckResult::new(
                    "model.gpu vs cpu logits",
                    check::rel_l2(&g, &c),
                    TOL_MODEL,
                    format!("{} ids", ids.len()),
                ));
                out.push(miss_check(
                    "model.gpu vs cpu argmax".into(),
                    agree,
                    total,
                    TOL_ARGMAX_MISS,
                    "rows' argmax",
                ));
                let t = Instant::now();
                let gg = generate(fast.clone(), &prompt, 128)?;
                let gpu_s = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let cg = generate(cpu.clone(), &prompt, 128)?;
                let cpu_s = t.elapsed().as_secs_f64();
                details["generate_gpu_seconds"] = json!(gpu_s);
                details["generate_cpu_seconds"] = json!(cpu_s);
                details["generated_gpu"] = json!(gg);
                details["generated_cpu"] = json!(cg);
                out.push(miss_check(
                    "model.greedy gen gpu vs cpu".into(),
                    same_count(&gg, &cg),
                    gg.len(),
                    TOL_GEN_MISS,
                    "tokens",
                ));
                out.extend(cached_logits_checks("model", &*fast, &**cpu, &prompt));
                out.push(alternating_sessions_check(&fast, &prompt));
                out.push(constrained_session_check(
                    fast.clone(),
                    cpu.clone(),
                    &prompt,
                ));
                for cache in [CacheMode::None, CacheMode::Dual] {
                    let credited = Decoding {
                        cache,
                        commit: CommitPolicy::Threshold(0.9),
                        credit: Some(CreditParams::default()),
                        ..Decoding::default()
                    };
                    out.push(decoding_rule_check(
                        format!("model.credit gen gpu vs cpu cache {}", cache.name()),
                        fast.clone(),
                        cpu.clone(),
                        &prompt,
                        &credited,
                    ));
                }
                let hierarchical = Decoding {
                    commit: CommitPolicy::Hierarchy {
                        high: Some(0.9),
                        low: 0.3,
                    },
                    ..Decoding::default()
                };
                out.push(decoding_rule_check(
                    "model.hierarchy gen gpu vs cpu".into(),
                    fast.clone(),
                    cpu.clone(),
                    &prompt,
                    &hierarchical,
                ));
                let vicinity = Decoding {
                    cache: CacheMode::Dual,
                    vicinity: 8,
                    ..Decoding::default()
                };
                out.push(decoding_rule_check(
                    "model.vicinity gen gpu vs cpu cache dual".into(),
                    fast.clone(),
                    cpu.clone(),
                    &prompt,
                    &vicinity,
                ));
                out.extend(packed_session_checks(
                    "model",
                    &fast,
                    &prompt,
                    TOL_ARGMAX_MISS,
                    TOL_CACHED_GEN_MISS,
                ));
                out.push(oversized_batch_check(&fast, &prompt));
                out.extend(session_cache_checks(
                    "model",
                    fast.clone(),
                    cpu.clone(),
                    &prompt,
                    128,
                    &gg,
                    TOL_CACHED_GEN_MISS,
                    details,
                ));
                Ok(())
            })();
            if let Err(e) = r {
                out.push(CheckResult::failed("model.gpu vs cpu", e));
            }
        }
    }
    // Engine path (device canvas + GPU commit) vs Session on the GPU model: same predictions,
    // same rule, so the tokens match unless a kernel is non-deterministic (split-K sums).
    let eng = (|| -> Result<(f64, String)> {
        let via_session = generate(fast.clone(), &prompt, 128)?;
        let via_engine = engine_generate(&fast, &prompt, 128, 32, false)?;
        let same = same_count(&via_session, &via_engine);
        let dual = engine_generate(&fast, &prompt, 128, 32, true)?;
        let same_dual = same_count(&via_session, &dual);
        details["generated_engine_dual"] = json!(dual);
        let miss = 1.0 - same as f64 / via_session.len() as f64;
        Ok((
            miss,
            format!("{same}/128 identical; dual cache (informational): {same_dual}/128"),
        ))
    })();
    out.push(CheckResult::from_result(
        "model.engine commit vs session",
        TOL_GEN_MISS,
        eng,
    ));
    out.extend(graph_checks(&fast, &prompt, details));
    out.extend(query_last_layer_checks(
        dev,
        &store,
        &cfg,
        &prompt,
        TOL_GEN_MISS,
    ));
    out.extend(session_graph_checks(&fast, &prompt));
    out.extend(batch_checks(
        "model",
        BatchModels {
            fast: &*fast,
            naive: naive.as_ref().map(|m| m as &dyn Model),
            cpu: cpu.as_ref().ok().map(|m| &**m),
        },
        TOL_ARGMAX_MISS,
        TOL_ARGMAX_MISS,
        details,
    ));
    out
}

/// One canvas of the `predict_batch` checks.
struct BatchCase {
    ids: Vec<u32>,
    queries: Vec<usize>,
    rule: PredictRule,
}

/// Canvases of lengths 7, 33, 64, 100, 128 and 20: ramps of ids with the second half and
/// every fifth position (offset per canvas) masked; the queries are the masked positions plus
/// the first and last (position 0 checks the shifted architectures' clamp). Rules: greedy
/// low-confidence (canvases 0 and 2), sampled at T = 0.8 (1 and 3: one rule, so the noise of
/// both comes from one sampling launch), greedy with random confidence (4: the confidence is
/// the RNG draw of the position alone); canvas 5 has no queries.
fn batch_cases(cfg: &ModelConfig) -> Vec<BatchCase> {
    let rule = |temperature: f64, remasking: Remasking, seed: u64, step: u64| PredictRule {
        temperature,
        remasking,
        seed,
        step,
        mask_token: cfg.mask_token_id,
        vocab_size: cfg.vocab_size,
    };
    let greedy = rule(0.0, Remasking::LowConfidence, 0, 2);
    let sampled = rule(0.8, Remasking::LowConfidence, 11, 3);
    let random = rule(0.0, Remasking::Random, 5, 7);
    let plan = [
        (7, greedy.clone()),
        (33, sampled.clone()),
        (64, greedy.clone()),
        (100, sampled),
        (128, random),
        (20, greedy),
    ];
    plan.into_iter()
        .enumerate()
        .map(|(i, (n, rule))| {
            let masked = |p: usize| p >= n / 2 || (p * 7 + i).is_multiple_of(5);
            let ids: Vec<u32> = (0..n)
                .map(|p| {
                    if masked(p) {
                        return cfg.mask_token_id;
                    }
                    let v = ((p * 37 + 11 + 101 * i) % cfg.vocab_size) as u32;
                    if v == cfg.mask_token_id {
                        0
                    } else {
                        v
                    }
                })
                .collect();
            let queries: Vec<usize> = if i == 5 {
                Vec::new()
            } else {
                (0..n)
                    .filter(|&p| masked(p) || p == 0 || p == n - 1)
                    .collect()
            };
            BatchCase { ids, queries, rule }
        })
        .collect()
}

fn batch_items(cases: &[BatchCase]) -> Vec<BatchQuery<'_>> {
    cases
        .iter()
        .map(|c| BatchQuery {
            ids: &c.ids,
            queries: &c.queries,
            rule: &c.rule,
        })
        .collect()
}

/// Compares two sets of per-canvas predictions: `(identical tokens, total, relative L2
/// distance of the confidences over the rows whose tokens agree)`; an error when the shapes
/// differ (a canvas with another number of predictions).
fn compare_predictions(
    got: &[Vec<Prediction>],
    want: &[Vec<Prediction>],
) -> Result<(usize, usize, f64)> {
    if got.len() != want.len() {
        return Err(Error::Backend(format!(
            "{} canvases of predictions, expected {}",
            got.len(),
            want.len()
        )));
    }
    let (mut same, mut total, mut diff2, mut norm2) = (0, 0, 0.0f64, 0.0f64);
    for (b, (g, w)) in got.iter().zip(want).enumerate() {
        if g.len() != w.len() {
            return Err(Error::Backend(format!(
                "canvas {b}: {} predictions, expected {}",
                g.len(),
                w.len()
            )));
        }
        for (x, y) in g.iter().zip(w) {
            total += 1;
            if x.token == y.token {
                same += 1;
                diff2 += (x.confidence - y.confidence).powi(2);
                norm2 += y.confidence.powi(2);
            }
        }
    }
    let rel = if norm2 > 0.0 {
        (diff2 / norm2).sqrt()
    } else if diff2 == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    Ok((same, total, rel))
}

/// The models the `predict_batch` checks compare: the GPU model with the fast kernels, the
/// same checkpoint with the reference kernels, and the CPU model.
struct BatchModels<'a> {
    fast: &'a dyn Model,
    naive: Option<&'a dyn Model>,
    cpu: Option<&'a dyn Model>,
}

/// `predict_batch` on the GPU (one padded forward over canvases of different lengths, see
/// [`batch_cases`]) against:
/// - the same model's `predict` per canvas. With the reference kernels every reduction is per
///   row, so the tokens must be identical and the confidences equal to
///   [`TOL_BATCH_EXACT_CONF`]: this is the check of the padding, the key masking and the row
///   mapping. With the fast kernels the GEMM variant and split-K plan depend on the row count
///   (7 rows alone run the skinny kernel, the padded batch the wide one), which changes bf16
///   rounding: near-ties may flip (`tol_single` of the tokens) and the confidences of agreeing
///   rows are held to [`TOL_MODEL`] relative L2.
/// - the CPU model's `predict_batch` (token agreement, `tol_cpu`; the confidences' distance is
///   reported).
///
/// The token tolerances are per-row argmax tolerances ([`TOL_ARGMAX_MISS`] for LLaDA, as the
/// other per-row GPU-vs-CPU checks; [`TOL_DREAM_GEN_MISS`] for the near-flat random Dream): the
/// canvases are mostly masks after a ramp of ids, where near-ties are common. A padding or
/// row-mapping error changes far more rows than that, and the reference-kernel check is exact.
fn batch_checks(
    prefix: &str,
    models: BatchModels<'_>,
    tol_single: f64,
    tol_cpu: f64,
    details: &mut Value,
) -> Vec<CheckResult> {
    let cases = batch_cases(models.fast.config());
    let items = batch_items(&cases);
    let mut out = Vec::new();
    let vs_single = |name: String, model: &dyn Model, tok_tol: f64, conf_tol: f64| {
        let r = (|| -> Result<(usize, usize, f64)> {
            let batched = model.predict_batch(&items)?;
            let single = cases
                .iter()
                .map(|c| model.predict(&c.ids, &c.queries, &c.rule))
                .collect::<Result<Vec<_>>>()?;
            compare_predictions(&batched, &single)
        })();
        match r {
            Err(e) => vec![CheckResult::failed(name, e)],
            Ok((same, total, conf)) => vec![
                miss_check(name.clone(), same, total, tok_tol, "tokens"),
                CheckResult::new(
                    format!("{name} confidence"),
                    conf,
                    conf_tol,
                    format!("relative L2 over the {same} rows with equal tokens"),
                ),
            ],
        }
    };
    out.extend(vs_single(
        format!("{prefix}.predict_batch_vs_single"),
        models.fast,
        tol_single,
        TOL_MODEL,
    ));
    if let Some(naive) = models.naive {
        out.extend(vs_single(
            format!("{prefix}[naive kernels].predict_batch_vs_single"),
            naive,
            0.0,
            TOL_BATCH_EXACT_CONF,
        ));
        // Seven copies of the cases: 35 canvases with queries, at most 4096 / 128 = 32 per
        // padded forward, so two sub-batches (the second re-uploads, re-pads and re-masks).
        let name = format!("{prefix}[naive kernels].predict_batch_two_sub_batches_vs_single");
        let many: Vec<BatchCase> = (0..7).flat_map(|_| batch_cases(naive.config())).collect();
        let r = (|| -> Result<(usize, usize, f64)> {
            let batched = naive.predict_batch(&batch_items(&many))?;
            let single = many
                .iter()
                .map(|c| naive.predict(&c.ids, &c.queries, &c.rule))
                .collect::<Result<Vec<_>>>()?;
            compare_predictions(&batched, &single)
        })();
        out.push(match r {
            Err(e) => CheckResult::failed(name, e),
            Ok((same, total, _)) => miss_check(name, same, total, 0.0, "tokens"),
        });
    }
    if let Some(cpu) = models.cpu {
        let name = format!("{prefix}.predict_batch_vs_cpu");
        let r = (|| -> Result<CheckResult> {
            let g = models.fast.predict_batch(&items)?;
            let c = cpu.predict_batch(&items)?;
            let (same, total, conf) = compare_predictions(&g, &c)?;
            details[format!("{prefix}_predict_batch_vs_cpu_confidence_rel_l2")] = json!(conf);
            let mut res = miss_check(name.clone(), same, total, tol_cpu, "tokens");
            res.detail = format!("{}; confidences rel L2 {conf:.2e}", res.detail);
            Ok(res)
        })();
        out.push(r.unwrap_or_else(|e| CheckResult::failed(name, e)));
    }
    out
}

/// A tiny random checkpoint of another architecture, written by `dllm synth` into a temporary
/// folder, GPU vs the CPU model: Dream (q/k/v biases, grouped-query heads, shifted logits; the
/// shift's own checks too) or LLaDA-MoE (q/k head norms, the mixture of experts). Check names
/// start with `tag`.
fn synth_checks(
    dev: &Arc<CudaDevice>,
    preset: dllm::synth::Preset,
    tag: &str,
    details: &mut Value,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let dir = std::env::temp_dir().join(format!("dllm-gpu-check-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let r = (|| -> Result<()> {
        dllm::synth::synth_checkpoint(preset, &dir, 7)?;
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(&dir)?;
        let gpu = Arc::new(CudaTransformer::new(
            dev.clone(),
            &store,
            &cfg,
            KernelChoice::from_env(),
        )?);
        let cpu = dllm::model::load_cpu_with(&dir, F32_REFERENCE)?;
        let width = cfg.logits_width();
        let prompt: Vec<u32> = (0..48u32)
            .map(|i| (i * 131 + 7) % cfg.vocab_size as u32)
            .filter(|&t| t != cfg.mask_token_id)
            .collect();
        let mut ids = prompt.clone();
        ids.resize(prompt.len() + 40, cfg.mask_token_id);
        let shifted = cfg.shifted_logits();
        let forward = if shifted {
            "forward (shifted)"
        } else {
            "forward"
        };
        for (name, g, c) in [
            (forward, gpu.forward(&ids)?, cpu.forward(&ids)?),
            (
                "raw_forward",
                gpu.raw_forward(&ids)?,
                cpu.raw_forward(&ids)?,
            ),
        ] {
            let want: Vec<usize> = c.chunks(width).map(argmax).collect();
            let (agree, total) = argmax_agreement(&g, width, &want);
            out.push(CheckResult::new(
                format!("{tag}.gpu vs cpu {name} logits"),
                check::rel_l2(&g, &c),
                TOL_MODEL,
                format!("{} ids; argmax {agree}/{total} rows identical", ids.len()),
            ));
        }
        // The shift itself: GPU row i of forward == GPU raw row max(i - 1, 0).
        let (f, raw) = (gpu.forward(&ids)?, gpu.raw_forward(&ids)?);
        if shifted {
            let rows: Vec<f32> = (0..ids.len())
                .flat_map(|i| {
                    raw[i.saturating_sub(1) * width..(i.saturating_sub(1) + 1) * width].to_vec()
                })
                .collect();
            out.push(CheckResult::new(
                format!("{tag}.forward == shifted raw_forward"),
                check::rel_l2(&f, &rows),
                1e-6,
                format!("{} rows", ids.len()),
            ));
        }
        // Model::logits_at (the host-logits path: filters, guidance, constraints, revise): the
        // forward's rows of the positions asked, in their order, repeats too; and the CPU's.
        let positions = [
            ids.len() - 1,
            0,
            prompt.len(),
            prompt.len() + 3,
            prompt.len(),
        ];
        let at = gpu.logits_at(&ids, &positions)?;
        let rows: Vec<f32> = positions
            .iter()
            .flat_map(|&p| f[p * width..(p + 1) * width].to_vec())
            .collect();
        out.push(CheckResult::new(
            format!("{tag}.logits_at == forward rows"),
            check::rel_l2(&at, &rows),
            1e-2,
            format!(
                "{} positions (LM head over those rows only)",
                positions.len()
            ),
        ));
        out.push(CheckResult::new(
            format!("{tag}.gpu vs cpu logits_at"),
            check::rel_l2(&at, &cpu.logits_at(&ids, &positions)?),
            TOL_MODEL,
            format!("{} positions", positions.len()),
        ));
        // Dual cache (with the shift: a block forward starting one position early): the
        // block's rows get the same logits as the full forward.
        let s0 = prompt.len() + 8;
        let early = usize::from(shifted);
        gpu.set_canvases(&ids, 1, ids.len())?;
        gpu.forward_full(true)?;
        let full = gpu.span_logits(s0..s0 + 16, 0)?;
        gpu.forward_block(s0 - early, 16 + early)?;
        let block = gpu.span_logits(s0..s0 + 16, s0 - early)?;
        out.push(CheckResult::new(
            format!("{tag}.dual cache block == full"),
            check::rel_l2(&block, &full),
            2e-2,
            format!("block {s0}..{} of {}", s0 + 16, ids.len()),
        ));
        let gg = generate(gpu.clone(), &prompt, 64)?;
        let cg = generate(cpu.clone(), &prompt, 64)?;
        details[format!("{tag}_generated_gpu")] = json!(gg);
        details[format!("{tag}_generated_cpu")] = json!(cg);
        out.push(miss_check(
            format!("{tag}.greedy gen gpu vs cpu"),
            same_count(&gg, &cg),
            gg.len(),
            TOL_DREAM_GEN_MISS,
            "tokens",
        ));
        out.extend(cached_logits_checks(tag, &*gpu, &*cpu, &prompt));
        out.extend(packed_session_checks(
            tag,
            &gpu,
            &prompt,
            TOL_ARGMAX_MISS,
            TOL_DREAM_GEN_MISS,
        ));
        out.extend(session_cache_checks(
            tag,
            gpu.clone(),
            cpu.clone(),
            &prompt,
            64,
            &gg,
            TOL_CACHED_GEN_MISS,
            details,
        ));
        let naive = CudaTransformer::new(dev.clone(), &store, &cfg, KernelChoice::reference());
        if let Err(e) = &naive {
            out.push(CheckResult::failed(format!("{tag}[naive kernels].load"), e));
        }
        out.extend(batch_checks(
            tag,
            BatchModels {
                fast: &*gpu,
                naive: naive.as_ref().ok().map(|m| m as &dyn Model),
                cpu: Some(&*cpu),
            },
            TOL_DREAM_GEN_MISS,
            TOL_DREAM_GEN_MISS,
            details,
        ));
        Ok(())
    })();
    if let Err(e) = r {
        out.push(CheckResult::failed(tag, e));
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The GEMM checks: every kernel × plain epilogue, the fused SwiGLU epilogue, the fused MLP, the
/// cluster-split reduction, the RoPE epilogue, the RMSNorm fold.
fn gemm_checks(dev: &CudaDevice) -> Vec<CheckResult> {
    let mut out = gemm::self_check(dev);
    out.extend(gemm_swiglu::self_check(dev));
    out.extend(gemm_mlp::self_check(dev));
    out.extend(gemm_cluster_split::self_check(dev));
    out.extend(gemm_rope::self_check(dev));
    out.extend(gemm_norm::self_check(dev));
    out
}

/// The GEMM benches, then the fused MLP against its two launches, the cluster-split reduction
/// against the workspace, the RoPE epilogue against GEMM + rope_qkv, and the RMSNorm fold
/// against the norm kernel.
fn gemm_benches(dev: &CudaDevice) -> Vec<BenchResult> {
    let mut out = gemm::bench(dev);
    out.extend(gemm_mlp::bench(dev));
    out.extend(gemm_cluster_split::bench(dev));
    out.extend(gemm_rope::bench(dev));
    out.extend(gemm_norm::bench(dev));
    out
}

/// `--compile-kernels DIR`: one line per image written; exit status 1 when nvcc fails, 2 on bad
/// arguments.
fn compile_kernels(args: &Args, out: &Path) -> ExitCode {
    let mut images = Vec::new();
    for name in &args.images {
        match Image::from_name(name) {
            Some(i) => images.push(i),
            None => {
                eprintln!("--images: unknown image {name:?} (ptx, sm90a, sm80)");
                return ExitCode::from(2);
            }
        }
    }
    if images.is_empty() {
        images = Image::ALL.to_vec();
    }
    let t = Instant::now();
    match kernel_dir::compile(&args.cuda_src, out, &args.defines, &images) {
        Ok(written) => {
            for p in &written {
                println!("{}", p.display());
            }
            eprintln!(
                "[gpu-check] {} kernel images compiled into {} in {:.1} s (defines: {})",
                written.len(),
                out.display(),
                t.elapsed().as_secs_f64(),
                if args.defines.is_empty() {
                    "none".to_string()
                } else {
                    args.defines.join(" ")
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("--compile-kernels {}: {e}", out.display());
            if e.kind() == ErrorKind::InvalidArgument {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.compile_kernels {
        return compile_kernels(&args, dir);
    }
    if let Some(shape) = &args.mlp_shape {
        return mlp_shape(shape);
    }
    if let Some(shape) = &args.gemm_shape {
        return gemm_shape(shape, args.repeat, None);
    }
    if let Some(shape) = &args.gemm_sweep {
        return gemm_shape(shape, args.repeat, Some(&args.epilogue));
    }
    if let Some(bad) = args.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
        eprintln!("--only: unknown part {bad:?} (parts: {})", PARTS.join(", "));
        return ExitCode::from(2);
    }
    let named = |part: &str| args.only.iter().any(|p| p == part);
    let wanted = |part: &str| (args.only.is_empty() && part != "norm_fold") || named(part);
    let mut checks: Vec<CheckResult> = Vec::new();
    let mut benches: Vec<BenchResult> = Vec::new();
    let mut details = json!({});
    let started = Instant::now();
    // Every launch's parameters against the kernel's own list (unless DLLM_CHECK_PARAMS=0): a
    // host/kernel signature mismatch fails the check that launches it, with a message.
    let param_checks = dllm::backend::cuda::env_switch::flag("DLLM_CHECK_PARAMS", true);
    dllm::backend::cuda::launch::set_param_checks(param_checks);
    details["param_checks"] = json!(param_checks);
    match CudaDevice::open(0) {
        Err(e) => checks.push(CheckResult::failed("device.open", e)),
        Ok(dev) => {
            details["device"] = json!(dev.name);
            details["capability"] = json!(format!("{}.{}", dev.capability.0, dev.capability.1));
            type Family = (
                &'static str,
                fn(&CudaDevice) -> Vec<CheckResult>,
                fn(&CudaDevice) -> Vec<BenchResult>,
            );
            let families: [Family; 6] = [
                ("elementwise", elementwise::self_check, elementwise::bench),
                ("moe", moe::self_check, moe::bench),
                ("gemm", gemm_checks, gemm_benches),
                ("attention", attention::self_check, attention::bench),
                ("sampling", sampling::self_check, sampling::bench),
                ("norm_fold", gemm_norm::self_check, gemm_norm::bench),
            ];
            for (name, sc, bn) in families {
                if !wanted(name) {
                    continue;
                }
                let t = Instant::now();
                checks.extend(guarded(
                    name,
                    || sc(&dev),
                    |m| CheckResult::failed(format!("{name}.self_check"), m),
                ));
                eprintln!(
                    "[gpu-check] {name} self-check done in {:.1} s",
                    t.elapsed().as_secs_f64()
                );
                if !args.no_bench {
                    let t = Instant::now();
                    benches.extend(guarded(
                        name,
                        || bn(&dev),
                        |m| BenchResult::failed(format!("{name}.bench"), m),
                    ));
                    eprintln!(
                        "[gpu-check] {name} bench done in {:.1} s",
                        t.elapsed().as_secs_f64()
                    );
                }
            }
            if wanted("model") {
                let t = Instant::now();
                let mut md = json!({});
                checks.extend(guarded(
                    "model",
                    || model_checks(&dev, &args.model, &mut md),
                    |m| CheckResult::failed("model", m),
                ));
                details["model"] = md;
                for (tag, preset) in [
                    ("dream", dllm::synth::Preset::DreamTiny),
                    ("llada-moe", dllm::synth::Preset::LladaMoeTiny),
                ] {
                    let mut dd = json!({});
                    checks.extend(guarded(
                        tag,
                        || synth_checks(&dev, preset, tag, &mut dd),
                        |m| CheckResult::failed(tag, m),
                    ));
                    details[tag] = dd;
                }
                eprintln!(
                    "[gpu-check] model checks done in {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    details["seconds"] = json!(started.elapsed().as_secs_f64());
    let report = json!({
        "passed": failed == 0,
        "failed": failed,
        "checks": checks,
        "benches": benches,
        "details": details,
    });
    if let Some(p) = &args.json {
        if let Err(e) = std::fs::write(p, serde_json::to_string_pretty(&report).unwrap_or_default())
        {
            eprintln!("cannot write {}: {e}", p.display());
        }
    }
    println!("{}", check::format_tables(&checks, &benches));
    println!("{} checks, {} failed", checks.len(), failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
