//! `dllm generate` and `dllm infill`: build a canvas, denoise it, print the text.

use super::ModelArgs;
use clap::{Args, ValueEnum};
use dllm::denoise::predict::Remasking;
use dllm::denoise::{generation_canvas, infill_canvas, GenerationParams, Session};
use dllm::error::{Error, Result};
use dllm::tokenizer::Tokenizer;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum RemaskingArg {
    LowConfidence,
    Random,
}

/// Denoising options shared by `generate` and `infill`.
#[derive(Args, Clone)]
pub struct DenoiseArgs {
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Total refinement steps (a multiple of the number of blocks).
    #[arg(long, default_value_t = 128)]
    pub steps: usize,
    /// Masked positions per semi-autoregressive block.
    #[arg(long, default_value_t = 32)]
    pub block_len: usize,
    /// Gumbel-noise temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// How confidence is scored when choosing positions to commit.
    #[arg(long, value_enum, default_value_t = RemaskingArg::LowConfidence)]
    pub remasking: RemaskingArg,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl DenoiseArgs {
    fn params(&self) -> Result<GenerationParams> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(format!(
                "--temperature must be a finite number ≥ 0, got {}",
                self.temperature
            )));
        }
        Ok(GenerationParams {
            steps: self.steps,
            block_len: self.block_len,
            temperature: self.temperature,
            remasking: match self.remasking {
                RemaskingArg::LowConfidence => Remasking::LowConfidence,
                RemaskingArg::Random => Remasking::Random,
            },
            seed: self.seed,
        })
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    #[command(flatten)]
    pub denoise: DenoiseArgs,
}

#[derive(Args)]
pub struct InfillArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text before the gap.
    #[arg(long)]
    pub prefix: String,
    /// Text after the gap.
    #[arg(long)]
    pub suffix: String,
    #[command(flatten)]
    pub denoise: DenoiseArgs,
}

/// `dllm generate`.
pub fn generate(a: GenerateArgs) -> Result<()> {
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), None) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?,
        _ => return Err(Error::invalid("give the prompt with --prompt TEXT or --prompt-file FILE")),
    };
    let (model, tok) = super::info::load(&a.model)?;
    let ids = tok.encode(&prompt)?;
    if ids.is_empty() && a.denoise.gen_len == 0 {
        return Err(Error::invalid("empty prompt and --gen-len 0: nothing to do"));
    }
    let mask = model.config().mask_token_id;
    run_canvas(model, &tok, generation_canvas(&ids, a.denoise.gen_len, mask), ids.len(), &a.denoise)
}

/// `dllm infill`.
pub fn infill(a: InfillArgs) -> Result<()> {
    let (model, tok) = super::info::load(&a.model)?;
    let prefix = tok.encode(&a.prefix)?;
    let suffix = tok.encode(&a.suffix)?;
    if a.denoise.gen_len == 0 {
        return Err(Error::invalid("--gen-len must be at least 1 for infill"));
    }
    let mask = model.config().mask_token_id;
    let canvas = infill_canvas(&prefix, a.denoise.gen_len, &suffix, mask);
    run_canvas(model, &tok, canvas, prefix.len() + suffix.len(), &a.denoise)
}

fn run_canvas(
    model: std::sync::Arc<dyn dllm::model::Model>,
    tok: &Tokenizer,
    canvas: Vec<u32>,
    prompt_tokens: usize,
    opts: &DenoiseArgs,
) -> Result<()> {
    let mut session = Session::new(model, canvas, opts.params()?)?;
    let total = session.total_steps();
    let progress = !opts.quiet;
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    session.run_with(|info, _canvas| {
        if progress && tty {
            let rate = (info.step + 1) as f64 / start.elapsed().as_secs_f64().max(1e-9);
            eprint!("\rstep {}/{} ({:.1} steps/s, {} masks left)   ", info.step + 1, total, rate, info.masks_left);
        }
        true
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let steps = session.steps_taken();
    if progress {
        if tty {
            eprintln!();
        }
        eprintln!(
            "{} steps in {:.2} s ({:.1} steps/s, {:.1} tokens/s) on {}",
            steps,
            elapsed,
            steps as f64 / elapsed.max(1e-9),
            session.generated_positions().len() as f64 / elapsed.max(1e-9),
            session.model().backend_name()
        );
    }
    let final_canvas = session.canvas().to_vec();
    let generated: Vec<u32> = session.generated_positions().iter().map(|&p| final_canvas[p]).collect();
    let text = tok.decode(&generated, true)?;
    let mut out = std::io::stdout().lock();
    if opts.json {
        let v = serde_json::json!({
            "text": text,
            "canvas": final_canvas,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated.len(),
            "steps": steps,
            "elapsed_s": elapsed,
            "tokens_per_second": generated.len() as f64 / elapsed.max(1e-9),
            "backend": session.model().backend_name(),
        });
        writeln!(out, "{v}").ok();
    } else {
        writeln!(out, "{}", tok.decode(&final_canvas, true)?).ok();
    }
    Ok(())
}
