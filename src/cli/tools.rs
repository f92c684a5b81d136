//! `dllm synth` (random-weight checkpoints) and `dllm bench` (fixed-schedule timing).

use super::{out, ModelArgs};
use clap::{Args, ValueEnum};
use dllm::error::Result;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum ArchArg {
    Llada,
    Dream,
    LladaMoe,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum PresetArg {
    /// Small shapes for tests: tiny-llada-code's (20 M parameters) with --arch llada; hidden 256,
    /// 4 layers, 8 heads over 2 KV heads (2.8 M parameters) with --arch dream; hidden 128,
    /// 3 layers, 8 experts of 64, 2 per token (0.9 M parameters) with --arch llada-moe.
    Tiny,
    /// LLaDA-8B-Instruct shapes (16 GB of bf16); --arch llada only.
    #[value(name = "8b")]
    B8,
    /// Dream-v0-7B shapes (15 GB of bf16) with --arch dream; LLaDA-MoE-7B-A1B shapes (15 GB)
    /// with --arch llada-moe.
    #[value(name = "7b")]
    B7,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Architecture.
    #[arg(long, value_enum, default_value_t = ArchArg::Llada)]
    pub arch: ArchArg,
    /// Size preset.
    #[arg(long, value_enum)]
    pub preset: PresetArg,
    /// Output directory (created; must not already hold a checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
}

/// `dllm synth`.
pub fn synth(a: SynthArgs) -> Result<()> {
    use dllm::synth::Preset;
    let preset = match (a.arch, a.preset) {
        (ArchArg::Llada, PresetArg::Tiny) => Preset::Tiny,
        (ArchArg::Llada, PresetArg::B8) => Preset::Llada8b,
        (ArchArg::Dream, PresetArg::Tiny) => Preset::DreamTiny,
        (ArchArg::Dream, PresetArg::B7) => Preset::Dream7b,
        (ArchArg::LladaMoe, PresetArg::Tiny) => Preset::LladaMoeTiny,
        (ArchArg::LladaMoe, PresetArg::B7) => Preset::LladaMoe7b,
        (ArchArg::Llada, PresetArg::B7) => {
            return Err(dllm::Error::invalid(
                "--preset 7b is a Dream size: use --arch dream, or --preset 8b for LLaDA",
            ))
        }
        (ArchArg::Dream | ArchArg::LladaMoe, PresetArg::B8) => {
            return Err(dllm::Error::invalid(
                "--preset 8b is a LLaDA size: use --arch llada, or --preset 7b for Dream and \
                 LLaDA-MoE",
            ))
        }
    };
    let start = std::time::Instant::now();
    let summary = dllm::synth::synth_checkpoint(preset, &a.out, a.seed)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({} tensors, {} parameters, {:.2} GB) in {:.1} s",
        a.out.display(),
        summary.tensors,
        summary.parameters,
        summary.bytes as f64 / 1e9,
        secs
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Canvases denoised together.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub batch: usize,
    /// Prompt tokens (random ids).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub prompt_len: usize,
    /// Generated tokens per canvas.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub gen_len: usize,
    /// Block length.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    pub block_len: usize,
    /// Tokens committed per step (fixed schedule).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub tokens_per_step: usize,
    /// KV cache mode.
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,
    /// With --cache dual: each span step also recomputes N positions on each side of its block
    /// (as `generate --vicinity`). The CPU backend and --session only.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub vicinity: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// After the timed run, one more run (untimed, eager) with every operation timed by CUDA
    /// events: mean ms per step of each (embedding, norms, each GEMM, RoPE, attention, SwiGLU,
    /// LM head, sampling, commit), full-forward and block steps apart. CUDA only.
    #[arg(long)]
    pub profile: bool,
    /// Time the Session path (what `dllm generate` runs: canvas to the model and predictions
    /// back to the host every step) instead of the device-resident step API.
    #[arg(long)]
    pub session: bool,
    /// Run the three target workloads instead (prompt 128, 256 generated, blocks of 32: batch 1
    /// dual cache 4 tokens/step, batch 8 the same, batch 1 no cache 1 token/step), the model
    /// loaded once, and write each report as JSON to DIR/bench_<workload><suffix>.json (also
    /// printed, one line each).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["batch", "prompt_len", "gen_len", "block_len", "tokens_per_step", "cache", "vicinity"]
    )]
    pub suite: Option<std::path::PathBuf>,
    /// With --suite: appended to each report's file name (e.g. `_csplit`).
    #[arg(long, requires = "suite")]
    pub suffix: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum CacheArg {
    None,
    Dual,
}

/// `dllm bench --suite DIR`: the three target workloads, each report written to
/// DIR/bench_<workload><suffix>.json as soon as it is done (and printed).
fn bench_suite(
    base: &dllm::bench::BenchOptions,
    dir: &std::path::Path,
    suffix: &str,
) -> Result<()> {
    use dllm::error::Error;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    dllm::bench::run_suite(&dllm::bench::suite(base), |name, r| {
        let path = dir.join(format!("bench_{name}{suffix}.json"));
        let json = r.to_json();
        std::fs::write(&path, format!("{json}\n")).map_err(|e| Error::io(&path, e))?;
        out::line(&json)?;
        Ok(())
    })
}

/// `dllm bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
    use dllm::bench::{run_bench, BenchBackend, BenchOptions, CacheMode};
    a.model.apply_threads()?;
    let opts = BenchOptions {
        model_dir: a.model.dir(),
        batch: a.batch,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        block_len: a.block_len,
        tokens_per_step: a.tokens_per_step,
        cache: match a.cache {
            CacheArg::None => CacheMode::None,
            CacheArg::Dual => CacheMode::Dual,
        },
        backend: match a.model.backend {
            super::BackendChoice::Auto => BenchBackend::Auto,
            super::BackendChoice::Cpu => BenchBackend::Cpu,
            super::BackendChoice::Cuda => BenchBackend::Cuda,
        },
        profile: a.profile,
        session: a.session,
        cpu_bf16: a.model.cpu_bf16.then_some(true),
        vicinity: a.vicinity,
        ..BenchOptions::default()
    };
    if a.suffix.is_some() && a.suite.is_none() {
        // (clap's `requires` lets it through when other options conflict with --suite.)
        return Err(dllm::error::Error::invalid(
            "--suffix names the report files of --suite DIR: give --suite too",
        ));
    }
    if let Some(dir) = &a.suite {
        return bench_suite(&opts, dir, a.suffix.as_deref().unwrap_or(""));
    }
    let r = run_bench(&opts)?;
    if a.json {
        out::line(r.to_json())?;
    } else {
        out::line(format_args!(
            "{} on {}: batch {} · prompt {} · gen {} · block {} · {} tokens/step · cache {}",
            r.backend,
            r.device,
            r.batch,
            r.prompt_len,
            r.gen_len,
            r.block_len,
            r.tokens_per_step,
            format!("{:?}", r.cache).to_lowercase()
        ))?;
        out::line(format_args!(
            "{} steps in {:.3} s: {:.1} tok/s, {:.2} ms/step",
            r.steps, r.seconds, r.tok_per_s, r.ms_per_step
        ))?;
        if let (Some(frac), Some(bw)) = (r.roofline_fraction, r.copy_gbps) {
            out::line(format_args!(
                "roofline: {:.0}% of the weight-streaming floor (copy bandwidth {:.0} GB/s)",
                frac * 100.0,
                bw
            ))?;
        }
        if let Some(rows) = &r.profile {
            out::line("profile (eager run, mean per step; each op includes the gap before it):")?;
            out::line(format_args!(
                "  {:<6} {:<16} {:>9} {:>7} {:>6}",
                "step", "op", "ms", "calls", "share"
            ))?;
            for p in rows {
                out::line(format_args!(
                    "  {:<6} {:<16} {:>9.4} {:>7.1} {:>5.1}%",
                    p.step,
                    p.op,
                    p.ms_per_step,
                    p.calls_per_step,
                    p.share * 100.0
                ))?;
            }
        }
    }
    Ok(())
}
