//! Compute backends: the CPU reference/fallback and CUDA.

pub mod cpu;
pub mod cuda;
