//! Results on stdout. Every write of a command's result goes through here, so a failed write (a
//! full disk, a closed pipe) is an error naming standard output, never a panic or a run that
//! reports success with nothing written. `main` ends quietly when the reader closed the pipe
//! (`dllm info | head -1`).

use dllm::error::{Error, Result};
use std::fmt::Display;
use std::io::Write;

/// The path a failed write to stdout is reported under.
pub const STDOUT: &str = "standard output";

/// The error of a failed write to stdout.
pub fn write_error(e: std::io::Error) -> Error {
    Error::io(STDOUT, e)
}

/// Whether `e` is a write to stdout whose reader had gone (a broken pipe).
pub fn is_closed_pipe(e: &Error) -> bool {
    matches!(e, Error::Io { path, source }
        if path.as_os_str() == STDOUT && source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Writes `text` to stdout and flushes it.
pub fn print(text: impl Display) -> Result<()> {
    let mut out = std::io::stdout().lock();
    write!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(write_error)
}

/// Writes `text` and a newline to stdout and flushes them.
pub fn line(text: impl Display) -> Result<()> {
    print(format_args!("{text}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_stdout_pipe_counts_as_a_closed_reader() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(is_closed_pipe(&write_error(pipe())));
        assert!(!is_closed_pipe(&Error::io("out.json", pipe())));
        let full = std::io::Error::from_raw_os_error(28);
        let e = write_error(full);
        assert!(!is_closed_pipe(&e));
        assert!(e.to_string().starts_with("standard output: "), "{e}");
    }
}
