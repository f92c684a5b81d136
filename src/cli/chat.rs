//! `dllm chat`: an interactive conversation on stdin / stdout.
//!
//! Each input line is a user turn; the whole history is rendered with the model's chat template
//! (see [`dllm::chat`]), followed by `--gen-len` masks, and denoised with the options of
//! `generate`; the answer (up to the model's first end-of-turn token) is printed and kept in the
//! history. `/reset` clears the history, `/quit` (or end of input) exits. Works with piped input:
//! the prompt marker and banner go to stderr, and only on a terminal.

use super::generate::DenoiseArgs;
use super::visual::{Mode, View};
use super::{out, ModelArgs};
use clap::Args;
use dllm::chat::{stop_ids, until_first, ChatTemplate, Message, Role};
use dllm::denoise::{generation_canvas, Session};
use dllm::error::{Error, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message opening the conversation (kept across /reset).
    #[arg(long)]
    pub system: Option<String>,
    /// Keep denoising after the first EOS (chat stops at it by default, so --stop-at-eos
    /// changes nothing here).
    #[arg(long, conflicts_with = "stop_at_eos")]
    pub no_stop_at_eos: bool,
    #[command(flatten)]
    pub denoise: DenoiseArgs,
}

/// The commands understood on an input line.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Quit,
    Reset,
    Empty,
    User(&'a str),
}

fn parse_line(line: &str) -> Line<'_> {
    let line = line.trim_end_matches(['\n', '\r']);
    match line.trim() {
        "/quit" | "/exit" => Line::Quit,
        "/reset" => Line::Reset,
        "" => Line::Empty,
        _ => Line::User(line),
    }
}

/// `dllm chat`.
pub fn chat(a: ChatArgs) -> Result<()> {
    let mut opts = a.denoise.clone();
    opts.stop_at_eos = !a.no_stop_at_eos;
    if opts.gen_len() == 0 {
        return Err(Error::invalid("--gen-len must be at least 1 for chat"));
    }
    if opts.stream {
        return Err(Error::invalid(
            "--stream is not available in chat (answers are printed whole; --visual shows the steps)",
        ));
    }
    let params = opts.params()?;
    let decoding = opts.decoding()?;
    let (model, tok) = super::info::load(&a.model)?;
    let cfg = model.config().clone();
    let template = ChatTemplate::for_model(&a.model.dir(), cfg.arch)?;
    let stops = stop_ids(&cfg, &tok);
    let fresh = || -> Vec<Message> { a.system.iter().map(Message::system).collect() };
    let mut history = fresh();

    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive && !opts.quiet {
        eprintln!(
            "dllm chat · {} · template: {} · /reset clears the history, /quit exits",
            a.model.dir().display(),
            template.origin()
        );
    }
    let mut input = stdin.lock();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        line.clear();
        if input
            .read_line(&mut line)
            .map_err(|e| Error::io("<stdin>", e))?
            == 0
        {
            break;
        }
        let text = match parse_line(&line) {
            Line::Quit => break,
            Line::Empty => continue,
            Line::Reset => {
                history = fresh();
                if !opts.quiet {
                    eprintln!("(history cleared)");
                }
                continue;
            }
            Line::User(text) => text,
        };
        history.push(Message::user(text));
        let prompt = tok.encode(&template.render(&history, true)?)?;
        // Checked before the canvas is built: a huge --gen-len must not allocate it.
        if prompt
            .len()
            .checked_add(opts.gen_len())
            .is_none_or(|n| n > cfg.max_seq_len)
        {
            history.pop();
            eprintln!(
                "error: the conversation ({} prompt tokens + --gen-len {}) exceeds the model's \
                 max_seq_len {}: /reset to start over",
                prompt.len(),
                opts.gen_len(),
                cfg.max_seq_len
            );
            continue;
        }
        let canvas = generation_canvas(&prompt, opts.gen_len(), cfg.mask_token_id);
        let start = Instant::now();
        let mut session = Session::new(model.clone(), canvas, params.clone())?;
        session.set_decoding(decoding.clone())?;
        // --visual: the canvas (conversation + answer) redrawn every step, as in generate.
        let mode = if opts.visual {
            Mode::Visual {
                tty: std::io::stdout().is_terminal(),
            }
        } else {
            Mode::Off
        };
        let mut view = View::new(mode, &tok, cfg.mask_token_id, session.total_steps());
        view.start(session.canvas(), session.final_prefix())?;
        let mut view_err = None;
        session.run_observed(|e| match view.step(e) {
            Ok(()) => true,
            Err(err) => {
                view_err = Some(err);
                false
            }
        })?;
        if let Some(err) = view_err {
            return Err(err);
        }
        let elapsed = start.elapsed().as_secs_f64();
        let generated: Vec<u32> = session.canvas()[prompt.len()..].to_vec();
        let answer = tok.decode(until_first(&generated, &stops), true)?;
        let user_turns = history.iter().filter(|m| m.role == Role::User).count();
        if opts.json {
            let v = serde_json::json!({
                "answer": answer,
                "turn": user_turns,
                "prompt_tokens": prompt.len(),
                "steps": session.steps_taken(),
                "forward_steps": session.forward_steps(),
                "elapsed_s": elapsed,
            });
            out::line(&v)?;
        } else {
            if opts.visual {
                view.finish(&answer)?;
            } else {
                out::line(&answer)?;
            }
            if interactive {
                out::line("")?;
            }
        }
        if !opts.quiet && interactive {
            eprintln!(
                "({} steps, {:.2} s, {})",
                session.forward_steps(),
                elapsed,
                session.model().backend_name()
            );
        }
        history.push(Message::assistant(answer));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_recognised() {
        assert_eq!(parse_line("/quit\n"), Line::Quit);
        assert_eq!(parse_line("  /reset \r\n"), Line::Reset);
        assert_eq!(parse_line("\n"), Line::Empty);
        assert_eq!(parse_line("hi there\n"), Line::User("hi there"));
        assert_eq!(parse_line("/quitting"), Line::User("/quitting"));
    }
}
