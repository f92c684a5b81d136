//! `dllm generate --batch-file F`: one prompt per line, all denoised together (the sessions step
//! in lockstep and each step is one packed forward over every canvas, see
//! [`dllm::denoise::batch`]), one result per line, in the file's order.
//!
//! Lines are prompts with `\n`, `\t` and `\\` escapes (so a prompt can hold newlines); empty
//! lines are skipped. Output: one line per prompt, the generated text with the same escapes, or
//! with `--json` one object per prompt (`index`, `text`, `prompt_tokens`, `generated_tokens`,
//! `steps`, `forward_steps`), then a summary on stderr.

use super::generate::GenerateArgs;
use dllm::chat::{answer_ids, stop_ids, ChatTemplate, Message};
use dllm::denoise::batch::run_batch;
use dllm::denoise::{build_canvas, CanvasPart, Session};
use dllm::error::{Error, Result};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

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
    let prompts: Vec<String> = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(unescape)
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
    let mut sessions = Vec::with_capacity(prompts.len());
    let mut prompt_tokens = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.into_iter().enumerate() {
        let p = match &template {
            Some(t) => t.render(&[Message::user(p)], true)?,
            None => p,
        };
        let mut parts = vec![CanvasPart::Text(p)];
        if opts.gen_len > 0 {
            parts.push(CanvasPart::Masks(opts.gen_len));
        }
        let canvas = build_canvas(
            &parts,
            |t| tok.encode(t),
            cfg.mask_token_id,
            cfg.max_seq_len,
        )
        .map_err(|e| Error::invalid(format!("batch prompt {}: {e}", i + 1)))?;
        prompt_tokens.push(canvas.len() - opts.gen_len);
        let mut s = Session::new(model.clone(), canvas, params.clone())
            .map_err(|e| Error::invalid(format!("batch prompt {}: {e}", i + 1)))?;
        s.set_decoding(decoding.clone())?;
        sessions.push(s);
    }
    let start = Instant::now();
    let rounds = run_batch(&mut sessions)?;
    let elapsed = start.elapsed().as_secs_f64();
    let stops = stop_ids(&cfg, &tok);
    let mut out = std::io::stdout().lock();
    let mut generated_total = 0;
    for (i, s) in sessions.iter().enumerate() {
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
            writeln!(out, "{v}").ok();
        } else {
            writeln!(out, "{}", escape(&text)).ok();
        }
    }
    out.flush().ok();
    if !opts.quiet {
        eprintln!(
            "{} prompts, {rounds} batched steps in {elapsed:.2} s ({:.1} tokens/s) on {}",
            sessions.len(),
            generated_total as f64 / elapsed.max(1e-9),
            model.backend_name()
        );
    }
    Ok(())
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
