//! The LLaDA forward pass on the CPU backend.
//!
//! Follows the block of the reference modelling code (`LLaDALlamaBlock`), top-down:
//! ```text
//! x  = wte[ids]
//! per block:  h = x + attn_out(SDPA(rope(q_proj(n)), rope(k_proj(n)), v_proj(n), non-causal)), n = attn_norm(x)
//!             x = h + ff_out(silu(ff_proj(m)) * up_proj(m)),                                   m = ff_norm(h)
//! logits = lm_head(ln_f(x))      (lm_head = wte when weight_tying)
//! ```
//! The math is the shared [`CpuTransformer`] run over the LLaDA tensor table
//! ([`super::layout::table`]); LLaDA's logits are not shifted. [`Model::predict`](crate::model::Model::predict)
//! runs the LM head only on the query rows. `Llada` dereferences to the [`CpuTransformer`]
//! (`hidden`, `check_ids`, `store`, ...).

use crate::config::Arch;
use crate::model::transformer::{delegate_model, CpuTransformer};

/// A LLaDA model on the CPU.
pub struct Llada(CpuTransformer);

delegate_model!(Llada, Arch::Llada);
