//! dllm: an inference engine for masked-diffusion language models.
//!
//! Data flow (see DESIGN.md): files → [`weights`] (mmap + safetensors) + [`config`] →
//! [`model`] (tokens → logits on a [`backend`]) → [`denoise`] (schedule, commit rule, canvas)
//! → [`tokenizer`] → text.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod config;
pub mod denoise;
pub mod error;
pub mod ffi;
pub mod memory;
pub mod model;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
