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

use crate::config::Arch;
use crate::model::transformer::{delegate_model, CpuTransformer};

/// A Dream model on the CPU.
pub struct Dream(CpuTransformer);

delegate_model!(Dream, Arch::Dream);
