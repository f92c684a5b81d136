//! `dllm fill`, `generate`, `infill` and `edit`: build a canvas, denoise it, print the text.
//!
//! `fill --canvas` takes the canvas syntax (`text [MASK:n] text [ONEOF:a|b] …`); `generate`
//! (prompt then `[MASK:gen_len]`) and `infill` (prefix, gap, suffix) are sugar over it; `edit`
//! re-masks a byte span of a file (widened to token boundaries) and denoises it with the rest
//! fixed.

use super::visual::{Mode, View};
use super::{out, ModelArgs};
use clap::{Args, ValueEnum};
use dllm::chat::{answer_ids, stop_ids, strip_trailing, ChatTemplate, Message};
use dllm::config::ModelConfig;
use dllm::denoise::canvas::span_tokens;
use dllm::denoise::predict::{Remasking, SampleFilter};
use dllm::denoise::{
    build_canvas, parse_canvas, BuiltCanvas, CacheMode, CanvasPart, CommitPolicy, CreditParams,
    Decoding, GenerationParams, ScheduleKind, Session,
};
use dllm::error::{Error, Result};
use dllm::tokenizer::{SpecialText, Tokenizer};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// `--schedule`: how many tokens each step commits.
#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum ScheduleArg {
    /// LLaDA: blocks of --block-len, steps split evenly over the blocks.
    Llada,
    /// Dream: no blocks; step i commits n_mask·(1 − t[i+1]/t[i]) of the masks left.
    Dream,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum CacheArg {
    None,
    Prefix,
    Dual,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum RemaskingArg {
    LowConfidence,
    Random,
    Margin,
    Entropy,
}

/// Denoising options shared by `generate` and `infill`.
#[derive(Args, Clone)]
pub struct DenoiseArgs {
    /// Number of tokens to generate (default 128; not for `fill` and `edit`, whose gaps set it).
    #[arg(long, allow_negative_numbers = true)]
    pub gen_len: Option<usize>,
    /// Total refinement steps (a multiple of the number of blocks).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub steps: usize,
    /// Masked positions per semi-autoregressive block.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    pub block_len: usize,
    /// Gumbel-noise temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// How confidence is scored when choosing positions to commit.
    #[arg(long, value_enum, default_value_t = RemaskingArg::LowConfidence)]
    pub remasking: RemaskingArg,
    /// Random seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Step schedule: llada (blocks, steps a multiple of the block count) or dream (no blocks,
    /// Dream's timesteps).
    #[arg(long, value_enum, default_value_t = ScheduleArg::Llada)]
    pub schedule: ScheduleArg,
    /// Parallel decoding (Fast-dLLM): commit every masked position of the block with confidence
    /// ≥ T, at least one; --steps becomes an upper bound.
    #[arg(long, conflicts_with = "factor", allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Parallel decoding (Fast-dLLM factor rule): commit the largest n with c_i ≥ 1 − F/(i+1);
    /// --steps becomes an upper bound.
    #[arg(long, allow_negative_numbers = true)]
    pub factor: Option<f64>,
    /// Hierarchical parallel decoding (dInfer): each run of adjacent masked positions commits
    /// its most confident if above L, plus every position above --threshold (if given), at
    /// least one; --steps becomes an upper bound.
    #[arg(
        long,
        value_name = "L",
        conflicts_with = "factor",
        allow_negative_numbers = true
    )]
    pub hierarchy: Option<f64>,
    /// Sample only among the k most likely tokens (0 = off; temperature > 0 only).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Sample only among the most likely tokens of cumulative probability ≥ p (applied before
    /// --top-k; temperature > 0 only).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Classifier-free guidance scale (0 = off; two forwards per step).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub cfg_scale: f64,
    /// Stop once an EOS is committed with every generated position before it committed; the
    /// rest becomes EOS.
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Block K/V cache (Fast-dLLM): none = full forward every step; prefix = later steps of a
    /// block compute block start..end against the cached prefix; dual = only the block, against
    /// the cached prefix and suffix. prefix/dual are approximations (see docs/decoding.md).
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,
    /// With --cache prefix|dual: each cached step also recomputes the N positions before its
    /// block (and, dual, the N after it), refreshing their K/V every step (dInfer's vicinity
    /// cache update): closer to the uncached loop, N more rows a side per step.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub vicinity: usize,
    /// Self-correction: after each step, re-mask tokens committed earlier in the current block
    /// whose probability under the new logits fell below R (0 < R < 1; each position at most
    /// twice; never prompt or fixed positions; --steps still bounds the step count).
    #[arg(long, allow_negative_numbers = true)]
    pub revise: Option<f64>,
    /// Trace credit (CreditDecoding, as dInfer): a masked position's earlier predictions in its
    /// block lift the tokens it kept predicting, so steady tokens pass --threshold, --factor or
    /// --hierarchy sooner (fewer steps). Every step then reads its block's logits on the host.
    #[arg(long)]
    pub credit: bool,
    /// --credit: weight of the credit in the logits, `logits + A·ln(1 + credit)` (> 0).
    #[arg(long, value_name = "A", requires = "credit",
          default_value_t = CreditParams::default().alpha, allow_negative_numbers = true)]
    pub credit_alpha: f64,
    /// --credit: each forward adds `p^G` to its top token's credit (≥ 0).
    #[arg(long, value_name = "G", requires = "credit",
          default_value_t = CreditParams::default().gamma, allow_negative_numbers = true)]
    pub credit_gamma: f64,
    /// --credit: the credit is multiplied by D before each forward adds to it (0 ≤ D ≤ 1).
    #[arg(long, value_name = "D", requires = "credit",
          default_value_t = CreditParams::default().decay, allow_negative_numbers = true)]
    pub credit_decay: f64,
    /// Redraw the canvas every step (masks as ░, fresh tokens highlighted); when stdout is not
    /// a terminal, one plain line per step instead.
    #[arg(long, conflicts_with_all = ["json", "stream"])]
    pub visual: bool,
    /// Print the text as blocks complete (the final prefix), then the rest at the end.
    #[arg(long, conflicts_with = "json")]
    pub stream: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// `--gen-len` when not given.
const DEFAULT_GEN_LEN: usize = 128;

impl DenoiseArgs {
    /// `--gen-len`, or its default.
    pub(super) fn gen_len(&self) -> usize {
        self.gen_len.unwrap_or(DEFAULT_GEN_LEN)
    }

    /// Refuses `--gen-len` for `command`, whose canvas sets the generated length itself.
    fn refuse_gen_len(&self, command: &str, instead: &str) -> Result<()> {
        match self.gen_len {
            Some(_) => Err(Error::invalid(format!(
                "--gen-len does not apply to {command}: {instead}"
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn params(&self) -> Result<GenerationParams> {
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
                RemaskingArg::Margin => Remasking::Margin,
                RemaskingArg::Entropy => Remasking::Entropy,
            },
            seed: self.seed,
            schedule: match self.schedule {
                ScheduleArg::Llada => ScheduleKind::Llada,
                ScheduleArg::Dream => ScheduleKind::Dream,
            },
        })
    }

    pub(super) fn decoding(&self) -> Result<Decoding> {
        let commit = match (self.hierarchy, self.threshold, self.factor) {
            (Some(low), high, _) => CommitPolicy::Hierarchy { high, low },
            (None, Some(t), _) => CommitPolicy::Threshold(t),
            (None, None, Some(f)) => CommitPolicy::Factor(f),
            (None, None, None) => CommitPolicy::Schedule,
        };
        let d = Decoding {
            commit,
            filter: SampleFilter {
                top_k: self.top_k,
                top_p: self.top_p,
            },
            cfg_scale: self.cfg_scale,
            stop_at_eos: self.stop_at_eos,
            cache: match self.cache {
                CacheArg::None => CacheMode::None,
                CacheArg::Prefix => CacheMode::Prefix,
                CacheArg::Dual => CacheMode::Dual,
            },
            vicinity: self.vicinity,
            revise: self.revise,
            constraints: Default::default(),
            credit: self.credit.then_some(CreditParams {
                alpha: self.credit_alpha,
                gamma: self.credit_gamma,
                decay: self.credit_decay,
            }),
        };
        d.validate().map_err(|e| e.context("decoding options"))?;
        Ok(d)
    }
}

#[derive(Args)]
pub struct FillArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The canvas: text with gaps `[MASK:n]` and one-token choices `[ONEOF:a|b|c]` (each
    /// choice one token; `|` and `]` cannot be part of one); `\n`, `\t` and `\\` are unescaped.
    #[arg(long, conflicts_with = "canvas_file")]
    pub canvas: Option<String>,
    /// Read the canvas from a file (taken literally, no unescaping).
    #[arg(long)]
    pub canvas_file: Option<PathBuf>,
    #[command(flatten)]
    pub denoise: DenoiseArgs,
}

#[derive(Args)]
pub struct EditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to edit.
    #[arg(long)]
    pub text_file: PathBuf,
    /// Byte range START..END of the file to regenerate (widened to token boundaries).
    #[arg(long)]
    pub span: String,
    #[command(flatten)]
    pub denoise: DenoiseArgs,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, conflicts_with_all = ["prompt_file", "batch_file"])]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, conflicts_with = "batch_file")]
    pub prompt_file: Option<PathBuf>,
    /// Generate for every line of this file (one prompt per line, `\n` escapes) as one batch:
    /// each step is one forward over all the canvases; one result per line.
    #[arg(long)]
    pub batch_file: Option<PathBuf>,
    /// Wrap the prompt as one user turn of the model's chat template (with the assistant
    /// header after it) and print only the answer.
    #[arg(long)]
    pub chat: bool,
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

/// `dllm generate`: sugar for `fill` with the canvas `PROMPT[MASK:gen_len]`.
pub fn generate(a: GenerateArgs) -> Result<()> {
    if let Some(file) = &a.batch_file {
        if a.denoise.visual || a.denoise.stream {
            return Err(Error::invalid(
                "--batch-file prints one result per prompt: --visual and --stream do not apply",
            ));
        }
        return super::batch::generate_batch(&a, file);
    }
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), None) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?,
        _ => {
            return Err(Error::invalid(
                "give the prompt with --prompt TEXT or --prompt-file FILE",
            ))
        }
    };
    let prompt = if a.chat {
        let dir = a.model.dir();
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        ChatTemplate::for_model(&dir, cfg.arch)?.render(&[Message::user(prompt)], true)?
    } else {
        prompt
    };
    if prompt.is_empty() && a.denoise.gen_len() == 0 {
        return Err(Error::invalid(
            "empty prompt and --gen-len 0: nothing to do",
        ));
    }
    let mut parts = vec![CanvasPart::Text(prompt)];
    if a.denoise.gen_len() > 0 {
        parts.push(CanvasPart::Masks(a.denoise.gen_len()));
    }
    // A prompt's special-token text is read as those tokens (as Hugging Face tokenizers and
    // vLLM do), so a hand-written template works; --chat's template needs it.
    fill_parts(&a.model, &parts, &a.denoise, a.chat, SpecialText::Token)
}

/// `dllm infill`: sugar for `fill` with the canvas `PREFIX[MASK:gen_len]SUFFIX`.
pub fn infill(a: InfillArgs) -> Result<()> {
    if a.denoise.gen_len() == 0 {
        return Err(Error::invalid("--gen-len must be at least 1 for infill"));
    }
    let parts = [
        CanvasPart::Text(a.prefix),
        CanvasPart::Masks(a.denoise.gen_len()),
        CanvasPart::Text(a.suffix),
    ];
    fill_parts(&a.model, &parts, &a.denoise, false, SpecialText::Literal)
}

/// `dllm fill`.
pub fn fill(a: FillArgs) -> Result<()> {
    a.denoise
        .refuse_gen_len("fill", "each [MASK:n] gap of the canvas generates n tokens")?;
    let spec = match (&a.canvas, &a.canvas_file) {
        (Some(c), None) => unescape(c),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?,
        _ => {
            return Err(Error::invalid(
                "give the canvas with --canvas TEXT or --canvas-file FILE",
            ))
        }
    };
    let parts = parse_canvas(&spec)?;
    if !parts
        .iter()
        .any(|p| matches!(p, CanvasPart::Masks(_) | CanvasPart::OneOf(_)))
    {
        return Err(Error::invalid(
            "the canvas has no gap: write [MASK:n] where n tokens are to be generated, or \
             [ONEOF:a|b|c] where one of those tokens is to be chosen",
        ));
    }
    fill_parts(&a.model, &parts, &a.denoise, false, SpecialText::Literal)
}

/// `dllm edit`.
pub fn edit(a: EditArgs) -> Result<()> {
    a.denoise
        .refuse_gen_len("edit", "the tokens of --span are regenerated")?;
    let text = std::fs::read_to_string(&a.text_file).map_err(|e| Error::io(&a.text_file, e))?;
    let (start, end) = parse_span(&a.span, text.len())?;
    let (model, tok) = super::info::load(&a.model)?;
    // Literal: special-token text in the file (a "<|mask|>" string) is part of the fixed text.
    let ids = tok.encode_literal(&text)?;
    if ids.is_empty() {
        return Err(Error::invalid(format!(
            "{}: the file has no tokens",
            a.text_file.display()
        )));
    }
    // Byte offset where each token ends: the length of the decoded prefix.
    let mut ends = Vec::with_capacity(ids.len());
    for i in 1..=ids.len() {
        ends.push(tok.decode(&ids[..i], false)?.len());
    }
    if ends.last() != Some(&text.len()) {
        return Err(Error::invalid(format!(
            "{}: the tokenizer does not reproduce the file byte for byte, so byte offsets cannot be mapped to tokens",
            a.text_file.display()
        )));
    }
    let span = span_tokens(&ends, start, end);
    let mask = model.config().mask_token_id;
    let mut canvas = ids;
    for t in &mut canvas[span.clone()] {
        *t = mask;
    }
    if !a.denoise.quiet {
        let b0 = if span.start == 0 {
            0
        } else {
            ends[span.start - 1]
        };
        eprintln!(
            "editing bytes {b0}..{} (tokens {}..{}) of {}",
            ends[span.end - 1],
            span.start,
            span.end,
            a.text_file.display()
        );
    }
    let fixed = canvas.len() - span.len();
    let canvas = BuiltCanvas {
        ids: canvas,
        choices: Vec::new(),
    };
    run_canvas(model, &tok, canvas, fixed, &a.denoise, Shown::File)
}

/// Parses `START..END` (bytes, `START < END ≤ len`).
fn parse_span(s: &str, len: usize) -> Result<(usize, usize)> {
    let bad = || {
        Error::invalid(format!(
            "--span {s:?}: expected START..END, byte offsets with START < END <= {len} (the file size)"
        ))
    };
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let start: usize = a.trim().parse().map_err(|_| bad())?;
    let end: usize = b.trim().parse().map_err(|_| bad())?;
    if start == end && end <= len {
        return Err(Error::invalid(format!(
            "--span {s:?} is empty: it covers no byte, so there is nothing to regenerate"
        )));
    }
    if start > end || end > len {
        return Err(bad());
    }
    Ok((start, end))
}

/// Unescapes `\n`, `\t` and `\\`; any other backslash stays as it is.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.peek() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                _ => {
                    out.push('\\');
                    continue;
                }
            }
            it.next();
        } else {
            out.push(c);
        }
    }
    out
}

/// `chat`: print only the answer (up to the model's first end-of-turn token); `special`: how
/// the canvas's text reads special-token text.
fn fill_parts(
    model_args: &ModelArgs,
    parts: &[CanvasPart],
    opts: &DenoiseArgs,
    chat: bool,
    special: SpecialText,
) -> Result<()> {
    let (model, tok) = super::info::load(model_args)?;
    let (mask, max_len) = (model.config().mask_token_id, model.config().max_seq_len);
    let built = build_canvas(parts, |t| tok.encode_as(t, special), mask, max_len)?;
    let fixed = built.ids.iter().filter(|&&t| t != mask).count();
    let shown = if chat {
        Shown::ChatAnswer
    } else {
        Shown::Canvas
    };
    run_canvas(model, &tok, built, fixed, opts, shown)
}

/// What a run prints of its final canvas.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// The whole canvas as text, then a newline.
    Canvas,
    /// The answer after a chat prompt, up to the model's end of turn.
    ChatAnswer,
    /// The whole canvas, byte for byte the edited file (no newline added).
    File,
}

fn run_canvas(
    model: std::sync::Arc<dyn dllm::model::Model>,
    tok: &Tokenizer,
    canvas: BuiltCanvas,
    prompt_tokens: usize,
    opts: &DenoiseArgs,
    shown: Shown,
) -> Result<()> {
    let chat = shown == Shown::ChatAnswer;
    let decoding = opts.decoding()?;
    let mut session = Session::new(model, canvas.ids, opts.params()?)?;
    session.set_decoding(decoding)?;
    for (pos, allowed) in &canvas.choices {
        session.constrain(*pos, allowed)?;
    }
    let total = session.total_steps();
    let progress = !opts.quiet;
    let stdout_tty = std::io::stdout().is_terminal();
    let mode = if opts.visual {
        Mode::Visual { tty: stdout_tty }
    } else if opts.stream {
        Mode::Stream
    } else {
        Mode::Off
    };
    // The live line on stderr would tear a redrawn canvas or streamed text on the same terminal.
    let live_progress = progress
        && std::io::stderr().is_terminal()
        && !(stdout_tty && matches!(mode, Mode::Visual { .. } | Mode::Stream));
    let stops = stop_ids(session.model().config(), tok);
    let mut view = View::new(mode, tok, session.model().config().mask_token_id, total);
    match shown {
        // The answer alone, as printed without --stream.
        Shown::ChatAnswer => view = view.answer_only(prompt_tokens, &stops),
        Shown::File => view = view.without_final_newline(),
        Shown::Canvas => {}
    }
    view.start(session.canvas(), session.final_prefix())?;
    let start = Instant::now();
    let mut view_err = None;
    session.run_observed(|e| {
        if live_progress {
            let rate = (e.step + 1) as f64 / start.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\rstep {}/{} ({:.1} steps/s, {} masks left)   ",
                e.step + 1,
                total,
                rate,
                e.masks_left
            );
        }
        if let Err(err) = view.step(e) {
            view_err = Some(err);
            return false;
        }
        true
    })?;
    if let Some(err) = view_err {
        return Err(err);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if live_progress {
        eprintln!();
    }
    let steps = session.steps_taken();
    let forwards = session.forward_steps();
    let final_canvas = session.canvas().to_vec();
    let generated = session.generated_tokens();
    // Trailing EOS / pad / end-of-turn runs are padding, not text; a chat answer ends at the
    // model's first end-of-turn token.
    let answer = answer_ids(&generated, &stops, chat);
    let text = tok.decode(answer, true)?;
    let kept = strip_trailing(&final_canvas, &stops);
    if opts.json {
        let v = serde_json::json!({
            "text": text,
            "canvas": final_canvas,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated.len(),
            "steps": steps,
            "forward_steps": forwards,
            "tokens_per_step": generated.len() as f64 / forwards.max(1) as f64,
            "revisions": session.revisions(),
            "elapsed_s": elapsed,
            "tokens_per_second": generated.len() as f64 / elapsed.max(1e-9),
            "backend": session.model().backend_name(),
            "cache": session.decoding().cache.name(),
            "vicinity": session.decoding().vicinity,
            "cache_refreshes": session.cache_stats().refreshes,
            "cache_span_steps": session.cache_stats().span_steps,
        });
        out::line(&v)?;
    } else if chat {
        view.finish(&text)?;
    } else {
        view.finish(&tok.decode(kept, true)?)?;
    }
    // After the result, so that it never lands inside streamed text or the last frame.
    if progress {
        eprintln!(
            "{}",
            summary_line(
                steps,
                forwards,
                session.generated_positions().len(),
                elapsed,
                session.model().backend_name()
            )
        );
    }
    Ok(())
}

/// The closing line on stderr: the forwards that ran (a step that commits nothing runs none, so
/// parallel decoding and early stops run fewer than the schedule's steps), their rate and the
/// generated tokens' rate.
fn summary_line(
    steps: usize,
    forwards: usize,
    generated: usize,
    elapsed: f64,
    backend: &str,
) -> String {
    let secs = elapsed.max(1e-9);
    let scheduled = if steps == forwards {
        String::new()
    } else {
        format!(" (of {steps} scheduled)")
    };
    format!(
        "{forwards} steps{scheduled} in {elapsed:.2} s ({:.1} steps/s, {:.1} tokens/s) on {backend}",
        forwards as f64 / secs,
        generated as f64 / secs,
    )
}
