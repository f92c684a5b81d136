//! The Dream forward pass on the CPU backend.
//!
//! Qwen2 decoder layers run without a causal mask (Dream attends bidirectionally):
//! ```text
//! x  = embed_tokens[ids]
//! per layer:  n = input_layernorm(x);  q, k, v = q_proj(n) + b_q, k_proj(n) + b_k, v_proj(n) + b_v
//!             x = x + o_proj(SDPA(rope(q), rope(k), v, non-causal, 28 query heads over 4 KV heads))
//!             x = x + down_proj(silu(gate_proj(m)) * up_proj(m)),  m = post_attention_layernorm(x)
//! raw    = lm_head(norm(x))
//! logits = cat(raw[:1], raw[:-1])      (row i predicts token i from the output at i − 1)
//! ```
//! The math is the shared [`CpuTransformer`] over the Dream tensor table ([`super::layout::table`]).
//! [`Model::forward`](crate::model::Model::forward) returns the shifted rows, so the denoiser
//! needs no architecture knowledge; [`Model::raw_forward`](crate::model::Model::raw_forward)
//! returns the unshifted ones (what PyTorch's `model(ids).logits` gives).

use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::model::transformer::{delegate_model, open_checked, CpuTransformer};
use crate::weights::WeightStore;
use std::path::Path;

/// A Dream model on the CPU.
pub struct Dream(CpuTransformer);

impl Dream {
    /// Loads `config.json` and the safetensors of `dir`, validating every tensor (q/k/v biases
    /// included) against the config. A config of another architecture is an error.
    pub fn load(dir: &Path) -> Result<Dream> {
        let (cfg, store) = open_checked(dir, Arch::Dream)?;
        Self::from_store(cfg, store)
    }

    /// Builds the model from an opened checkpoint.
    pub fn from_store(cfg: ModelConfig, store: WeightStore) -> Result<Dream> {
        Ok(Dream(CpuTransformer::of_arch(Arch::Dream, cfg, store)?))
    }
}

delegate_model!(Dream);
