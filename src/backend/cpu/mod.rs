//! The CPU backend: multi-threaded fp32 ops over bf16/f16/f32 weights; the reference for CUDA.
//!
//! Every op takes plain row-major slices (activations fp32) plus, for weights, a
//! [`TensorView`](crate::weights::view::TensorView) over the memory-mapped checkpoint bytes.
//! Shapes are a documented contract checked with `debug_assert!` only: these are internal hot
//! paths and the model layer validates user-facing inputs. Work is spread over rayon's pool.

mod activation;
mod attention;
mod embedding;
mod gemm;
mod norm;
mod rope;
mod simd;
mod skinny;
mod skinny_bf16;

/// Most CPU worker threads a pool may be asked for (`--threads`, `dllm_model_params.threads`):
/// far above any core count this backend would use well, low enough that a typo (or `i32::MAX`)
/// is refused at once instead of spawning threads until the process stalls.
pub const MAX_THREADS: usize = 1024;

pub use activation::{add_assign, exp_approx, silu_mul};
pub use attention::attention;
pub use embedding::embedding;
pub use gemm::{
    linear, linear_blocked, linear_gemv, linear_panelled, linear_row_invariant, matmul,
    DEFAULT_K_BLOCK, DEFAULT_PANEL_ROWS, GEMV_MAX_M,
};
pub use norm::rms_norm;
pub use rope::{rope, rope_inv_freq};
pub use skinny::{available as skinny_available, linear_skinny};
pub use skinny_bf16::{available as skinny_bf16_available, linear_skinny_bf16};

#[cfg(test)]
mod testutil;
