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

use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::model::transformer::{delegate_model, open_checked, CpuTransformer};
use crate::weights::WeightStore;
use std::path::Path;

/// A LLaDA model on the CPU.
pub struct Llada(CpuTransformer);

impl Llada {
    /// Loads `config.json` and the safetensors of `dir`, validating every tensor against the config.
    /// A config of another architecture is an error.
    pub fn load(dir: &Path) -> Result<Llada> {
        let (cfg, store) = open_checked(dir, Arch::Llada)?;
        Self::from_store(cfg, store)
    }

    /// Builds the model from an opened checkpoint.
    pub fn from_store(cfg: ModelConfig, store: WeightStore) -> Result<Llada> {
        Ok(Llada(CpuTransformer::of_arch(Arch::Llada, cfg, store)?))
    }
}

delegate_model!(Llada);
