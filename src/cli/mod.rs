//! Command-line interface of the `dllm` binary: argument definitions and dispatch.

mod batch;
mod chat;
mod generate;
mod info;
mod logits;
pub mod out;
mod tools;
mod visual;

use clap::{Parser, Subcommand, ValueEnum};
use dllm::error::Result;
use std::path::PathBuf;

/// The model used when neither `--model` nor `DLLM_MODEL` is given.
pub const DEFAULT_MODEL: &str = "models/tiny-llada-code";

#[derive(Parser)]
#[command(
    name = "dllm",
    version,
    about = "Inference engine for masked-diffusion language models (LLaDA, Dream)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate text after a prompt by denoising a canvas of mask tokens.
    Generate(generate::GenerateArgs),
    /// Chat on stdin/stdout with the model's chat template (/reset, /quit).
    Chat(chat::ChatArgs),
    /// Fill a gap between a prefix and a suffix.
    Infill(generate::InfillArgs),
    /// Fill every `[MASK:n]` gap and `[ONEOF:a|b|c]` choice of a canvas.
    Fill(generate::FillArgs),
    /// Regenerate a byte span of a file with the rest fixed.
    Edit(generate::EditArgs),
    /// Describe and validate a model directory.
    Info(info::InfoArgs),
    /// Print the raw per-position logits of one forward pass.
    Logits(logits::LogitsArgs),
    /// Write a random-weight checkpoint with the exact layout of a real one.
    Synth(tools::SynthArgs),
    /// Time the denoising loop on a fixed schedule.
    Bench(tools::BenchArgs),
}

/// Options shared by every command that loads a model.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json, tokenizer.json, *.safetensors). Default: $DLLM_MODEL, else the embedded
    /// models/tiny-llada-code.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// CPU threads (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// On the CPU backend, round activations to bf16 for the AVX-512 BF16 dot product (faster
    /// products, CUDA-like precision; where the CPU lacks it, f32 with a note). Also
    /// DLLM_CPU_BF16=1.
    #[arg(long)]
    pub cpu_bf16: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum BackendChoice {
    Auto,
    Cpu,
    Cuda,
}

impl ModelArgs {
    /// The model directory: `--model`, else `$DLLM_MODEL`, else the embedded model.
    pub fn dir(&self) -> PathBuf {
        if let Some(p) = &self.model {
            return p.clone();
        }
        // An empty DLLM_MODEL (`DLLM_MODEL= dllm …`) counts as unset.
        if let Some(p) = std::env::var_os("DLLM_MODEL").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let local = PathBuf::from(DEFAULT_MODEL);
        if local.exists() {
            return local;
        }
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL)
    }

    /// Applies `--threads` to the global thread pool.
    pub fn apply_threads(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(dllm::Error::invalid("--threads must be at least 1"));
            }
            let max = dllm::backend::cpu::MAX_THREADS;
            if n > max {
                return Err(dllm::Error::invalid(format!(
                    "--threads {n} exceeds the most supported, {max}"
                )));
            }
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            if n > cores {
                eprintln!(
                    "note: --threads {n} is more than the {cores} cores here: threads beyond the \
                     cores wait on each other at every product and slow each step down"
                );
            }
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .map_err(|e| dllm::Error::invalid(format!("--threads: {e}")))?;
        }
        Ok(())
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::generate(a),
        Command::Chat(a) => chat::chat(a),
        Command::Infill(a) => generate::infill(a),
        Command::Fill(a) => generate::fill(a),
        Command::Edit(a) => generate::edit(a),
        Command::Info(a) => info::info(a),
        Command::Logits(a) => logits::logits(a),
        Command::Synth(a) => tools::synth(a),
        Command::Bench(a) => tools::bench(a),
    }
}
