//! Weights: memory-mapped safetensors (single file or sharded), validated, zero-copy.

pub mod view;

pub use view::{DType, TensorView};
