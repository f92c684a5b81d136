//! The `dllm` command-line tool: `generate`, `infill`, `info`, `logits`, `synth`, `bench`.
//!
//! Results go to stdout, progress and errors to stderr. Any failure prints one line
//! `error: …` and exits with status 1 (argument errors: clap's usage message, status 2).

mod cli;

use clap::Parser;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (this is a bug in dllm): {info}");
    }));
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        if cli::out::is_closed_pipe(&e) {
            // The reader of stdout has gone (`dllm info | head -1`): nothing left to say.
            return;
        }
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
