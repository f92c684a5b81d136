//! `dllm logits`: raw per-position logits of one forward pass, for parity checks.
//!
//! No shift is applied: row `i` is the LM-head output at position `i` ([`Model::raw_forward`]),
//! as PyTorch's `model(ids).logits` returns it. For Dream, which predicts token `i` from row
//! `i − 1`, the denoiser uses the shifted rows of [`Model::forward`] instead.
//!
//! [`Model::raw_forward`]: dllm::model::Model::raw_forward
//! [`Model::forward`]: dllm::model::Model::forward

use super::{out, ModelArgs};
use clap::Args;
use dllm::error::{Error, Result};
use dllm::tokenizer::Tokenizer;
use std::io::Write;

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, conflicts_with = "text")]
    pub ids: Option<String>,
    /// Text to tokenize.
    #[arg(long)]
    pub text: Option<String>,
    /// Print `{"ids": [...], "logits": [[...], ...]}`.
    #[arg(long)]
    pub json: bool,
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .map_err(|_| Error::invalid(format!("--ids: `{t}` is not a token id")))
        })
        .collect()
}

/// `dllm logits`.
pub fn logits(a: LogitsArgs) -> Result<()> {
    let ids = match (&a.ids, &a.text) {
        (Some(s), None) => parse_ids(s)?,
        (None, Some(t)) => Tokenizer::from_model_dir(&a.model.dir())?.encode(t)?,
        _ => return Err(Error::invalid("give --ids 1,2,3 or --text TEXT")),
    };
    if ids.is_empty() {
        return Err(Error::invalid("no tokens to run"));
    }
    let model = super::info::load_only(&a.model)?;
    let logits = model.raw_forward(&ids)?;
    let w = model.config().logits_width();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if a.json {
        let rows: Vec<&[f32]> = logits.chunks_exact(w).collect();
        serde_json::to_writer(&mut out, &serde_json::json!({"ids": ids, "logits": rows}))
            .map_err(|e| out::write_error(e.into()))?;
        writeln!(out).map_err(out::write_error)?;
    } else {
        for (i, row) in logits.chunks_exact(w).enumerate() {
            let (arg, max) = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (j, &x)| if x > b.1 { (j, x) } else { b },
                );
            let head: Vec<String> = row.iter().take(6).map(|x| format!("{x:.4}")).collect();
            writeln!(
                out,
                "pos {i:4} id {:6} argmax {arg:6} ({max:.4})  [{} …]",
                ids[i],
                head.join(", ")
            )
            .map_err(out::write_error)?;
        }
    }
    out.flush().map_err(out::write_error)
}
