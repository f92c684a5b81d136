//! LLaDA: the model of "Large Language Diffusion Models" (Nie et al., 2025).
//!
//! `layout` names every tensor of the checkpoint; `cpu` is the forward pass on the CPU backend
//! (the shared [`crate::model::transformer`] over LLaDA's names; the CUDA twin is
//! `backend::cuda::transformer`).

pub mod cpu;
pub mod layout;

pub use cpu::Llada;
