//! `dllm synth` (random-weight checkpoints) and `dllm bench` (fixed-schedule timing).

use super::ModelArgs;
use clap::{Args, ValueEnum};
use dllm::error::Result;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum ArchArg {
    Llada,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum PresetArg {
    /// The tiny-llada-code shapes (20 M parameters).
    Tiny,
    /// LLaDA-8B-Instruct shapes (16 GB of bf16).
    #[value(name = "8b")]
    B8,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `dllm synth`.
pub fn synth(a: SynthArgs) -> Result<()> {
    let preset = match a.preset {
        PresetArg::Tiny => dllm::synth::Preset::Tiny,
        PresetArg::B8 => dllm::synth::Preset::Llada8b,
    };
    let ArchArg::Llada = a.arch;
    let start = std::time::Instant::now();
    let summary = dllm::synth::synth_llada(preset, &a.out, a.seed)?;
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
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Prompt tokens (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Generated tokens per canvas.
    #[arg(long, default_value_t = 256)]
    pub gen_len: usize,
    /// Block length.
    #[arg(long, default_value_t = 32)]
    pub block_len: usize,
    /// Tokens committed per step (fixed schedule).
    #[arg(long, default_value_t = 1)]
    pub tokens_per_step: usize,
    /// KV cache mode.
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum CacheArg {
    None,
    Dual,
}

/// `dllm bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
    let _ = (&a.model, a.batch, a.prompt_len, a.gen_len, a.block_len, a.tokens_per_step, a.cache, a.json);
    Err(dllm::Error::Unsupported("bench is not wired yet".into()))
}
