//! Dream: the diffusion language model of "Dream 7B" (Ye et al., 2025), initialised from
//! Qwen2.5-7B.
//!
//! `layout` names every tensor of the checkpoint; `cpu` is the forward pass on the CPU backend
//! (the shared [`crate::model::transformer`] with q/k/v biases and shifted logits). On the GPU
//! Dream runs on [`crate::backend::cuda::transformer::CudaTransformer`] (biases added by the
//! fused RoPE kernel, shift applied when choosing the LM-head rows).

pub mod cpu;
pub mod layout;

pub use cpu::Dream;
