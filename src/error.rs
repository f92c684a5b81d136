//! The one error type of the engine.
//!
//! Every fallible function returns [`Result`]. Each variant carries enough context (file, tensor,
//! field) for a one-line message that tells the user what is wrong; the C ABI maps variants to
//! status codes with [`Error::kind`].

use std::path::PathBuf;

/// Errors raised by dllm. Messages name the file, tensor or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are malformed (safetensors, JSON, tokenizer).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor is missing, duplicated, or has the wrong dtype or shape.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// A field of `config.json` is missing or has a bad value.
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    /// Something the engine does not support (architecture, dtype, option).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A caller-supplied value is invalid (prompt, steps, lengths, token ids).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A compute backend (CUDA) failed.
    #[error("backend: {0}")]
    Backend(String),
    /// Memory ran out, or would: the message names what needed how much and what was free.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// An operation was called in a state where it is not allowed.
    #[error("invalid state: {0}")]
    State(String),
}

/// Coarse classification of an [`Error`], used by the C ABI status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Io,
    Format,
    Unsupported,
    Backend,
    OutOfMemory,
    State,
}

impl Error {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Format { .. } | Error::Tensor { .. } | Error::Config { .. } => ErrorKind::Format,
            Error::Tokenizer(_) => ErrorKind::Format,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Backend(_) => ErrorKind::Backend,
            Error::OutOfMemory(_) => ErrorKind::OutOfMemory,
            Error::State(_) => ErrorKind::State,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::Tensor`].
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// The error with `what` (where it happened) in front of its message: `what: message`. A
    /// variant that carries a plain message keeps its kind; the others become
    /// [`Error::InvalidArgument`] with their whole message after `what`.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        let with = |m: String| format!("{what}: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(with(m)),
            Error::Unsupported(m) => Error::Unsupported(with(m)),
            Error::Tokenizer(m) => Error::Tokenizer(with(m)),
            Error::Backend(m) => Error::Backend(with(m)),
            Error::OutOfMemory(m) => Error::OutOfMemory(with(m)),
            Error::State(m) => Error::State(with(m)),
            other => Error::InvalidArgument(with(other.to_string())),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The result type used throughout dllm.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_prefixes_the_message_once_and_keeps_the_kind() {
        let e = Error::invalid("top_p must be in (0, 1]").context("decoding options");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "invalid argument: decoding options: top_p must be in (0, 1]"
        );
        let e = Error::State("no step".into()).context("batch prompt 2");
        assert_eq!(e.to_string(), "invalid state: batch prompt 2: no step");
        let e = Error::config("n_layers", "must be ≥ 1").context("batch prompt 3");
        assert_eq!(
            e.to_string(),
            "invalid argument: batch prompt 3: config field `n_layers`: must be ≥ 1"
        );
    }
}
