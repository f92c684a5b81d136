//! `dllm generate --batch-file F`: one prompt per line, denoised together in chunks of
//! [`BATCH_CHUNK`] prompts (the sessions of a chunk step in lockstep and each step is one packed
//! forward over its canvases, see [`dllm::denoise::batch`]), one result per line, in the file's
//! order. Every prompt is checked before the first chunk runs, so a bad line writes nothing;
//! the chunks keep the memory of a step bounded whatever the file's length (every canvas at
//! once held `prompts × block_len × vocabulary` logits per step: 3 GB at 3000 prompts on the
//! tiny model).
//!
//! Lines are prompts with `\n`, `\t` and `\\` escapes (so a prompt can hold newlines); empty
//! lines are skipped. Output: one line per prompt, the generated text with the same escapes, or
//! with `--json` one object per prompt (`index`, `text`, `prompt_tokens`, `generated_tokens`,
//! `steps`, `forward_steps`), then a summary on stderr.

use super::generate::GenerateArgs;
use super::out;
use dllm::chat::{answer_ids, stop_ids, ChatTemplate, Message};
use dllm::denoise::batch::run_batch;
use dllm::denoise::{build_canvas, CanvasPart, Session};
use dllm::error::{Error, Result};
use std::path::Path;
use std::time::Instant;

/// Most prompts denoised together (one packed forward per step); a longer file runs in chunks
/// of this many, one after another. Each result is the prompt's alone-run result either way.
pub const BATCH_CHUNK: usize = 64;

/// A prompt line with its escapes resolved (`\n`, `\t`, `\\`; any other `\x` stays as is).
pub fn unescape(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// `text` on one line: backslashes, newlines and tabs escaped (the inverse of [`unescape`]).
pub fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\t', "\\t")
}

/// Runs every prompt of `file` as one batch with the options of `a`.
pub fn generate_batch(a: &GenerateArgs, file: &Path) -> Result<()> {
    let body = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    // (line number, prompt): errors name the file's line.
    let prompts: Vec<(usize, String)> = body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, unescape(l)))
        .collect();
    if prompts.is_empty() {
        return Err(Error::invalid(format!(
            "batch file {} holds no prompt (one prompt per non-empty line)",
            file.display()
        )));
    }
    let opts = &a.denoise;
    let (model, tok) = super::info::load(&a.model)?;
    let cfg = model.config().clone();
    let template = if a.chat {
        Some(ChatTemplate::for_model(&a.model.dir(), cfg.arch)?)
    } else {
        None
    };
    let (params, decoding) = (opts.params()?, opts.decoding()?);
    // Every canvas built and every session checked before anything runs or is written.
    let mut canvases = Vec::with_capacity(prompts.len());
    let mut prompt_tokens = Vec::with_capacity(prompts.len());
    for (line, p) in prompts {
        let at = || format!("{} line {line}", file.display());
        let p = match &template {
            Some(t) => t.render(&[Message::user(p)], true)?,
            None => p,
        };
        let mut parts = vec![CanvasPart::Text(p)];
        if opts.gen_len() > 0 {
            parts.push(CanvasPart::Masks(opts.gen_len()));
        }
        let canvas = build_canvas(
            &parts,
            |t| tok.encode(t),
            cfg.mask_token_id,
            cfg.max_seq_len,
        )
        .map_err(|e| e.context(at()))?
        .ids;
        prompt_tokens.push(canvas.len() - opts.gen_len());
        session(&model, &canvas, &params, &decoding).map_err(|e| e.context(at()))?;
        canvases.push(canvas);
    }
    let start = Instant::now();
    let stops = stop_ids(&cfg, &tok);
    let (mut rounds, mut generated_total) = (0, 0);
    for (c, chunk) in canvases.chunks(BATCH_CHUNK).enumerate() {
        let mut sessions = chunk
            .iter()
            .map(|canvas| session(&model, canvas, &params, &decoding))
            .collect::<Result<Vec<_>>>()?;
        rounds += run_batch(&mut sessions)?;
        for (j, s) in sessions.iter().enumerate() {
            let i = c * BATCH_CHUNK + j;
            let generated = s.generated_tokens();
            generated_total += generated.len();
            let kept = answer_ids(&generated, &stops, a.chat);
            let text = tok.decode(kept, true)?;
            if opts.json {
                let v = serde_json::json!({
                    "index": i,
                    "text": text,
                    "prompt_tokens": prompt_tokens[i],
                    "generated_tokens": generated.len(),
                    "steps": s.steps_taken(),
                    "forward_steps": s.forward_steps(),
                });
                out::line(&v)?;
            } else {
                out::line(format_args!("{}", escape(&text)))?;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if !opts.quiet {
        eprintln!(
            "{} prompts, {rounds} batched steps in {elapsed:.2} s ({:.1} tokens/s) on {}",
            canvases.len(),
            generated_total as f64 / elapsed.max(1e-9),
            model.backend_name()
        );
    }
    Ok(())
}

/// A session over `canvas` with the run's parameters and decoding options.
fn session(
    model: &std::sync::Arc<dyn dllm::model::Model>,
    canvas: &[u32],
    params: &dllm::denoise::GenerationParams,
    decoding: &dllm::denoise::Decoding,
) -> Result<Session> {
    let mut s = Session::new(model.clone(), canvas.to_vec(), params.clone())?;
    s.set_decoding(decoding.clone())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip_and_resolve_by_hand() {
        assert_eq!(unescape(r"def f():\n\treturn 1"), "def f():\n\treturn 1");
        assert_eq!(unescape(r"a\\n"), "a\\n");
        assert_eq!(unescape(r"x\q\"), "x\\q\\");
        for t in ["a\nb", "tab\there", "back\\slash\\n", ""] {
            assert_eq!(unescape(&escape(t)), t);
            assert!(!escape(t).contains('\n'));
        }
    }
}
