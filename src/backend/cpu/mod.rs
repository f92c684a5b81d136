//! The CPU backend: multi-threaded fp32 ops over bf16/f16/f32 weights; the reference for CUDA.
