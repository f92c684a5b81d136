//! LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct): a masked-diffusion model whose
//! layers are OLMoE's (Zhu et al., 2025, arXiv 2509.24389): its checkpoint layout and its model
//! on the CPU backend.
//!
//! The reference modelling code (`modeling_lladamoe.py`, `LLaDAMoEDecoderLayer`), top-down:
//! ```text
//! x  = embed_tokens[ids]
//! per layer:  n = input_layernorm(x);  q, k, v = q_proj(n), k_proj(n), v_proj(n)
//!             q, k = q_norm(q), k_norm(k)          (RMSNorm over each head, with qk_layernorm)
//!             x = x + o_proj(SDPA(rope(q), rope(k), v, non-causal))
//!             x = x + moe(post_attention_layernorm(x))       (crate::model::experts)
//! logits = lm_head(norm(x))                      (not shifted)
//! ```
//! The attention and norms carry the Hugging Face (Qwen2) names of Dream's layout; the
//! mixture adds `mlp.gate.weight` (the router, `[num_experts, hidden_size]`) and
//! `mlp.experts.{e}.{gate,up,down}_proj.weight`. The CUDA backend runs it too
//! ([`crate::backend::cuda::moe`]: routing and grouped expert GEMMs on the device; written
//! without a GPU in session 21, its checks in `dllm-gpu-check` not yet run on one).

use crate::config::{Arch, ModelConfig};
use crate::model::dream::layout::{block_tensors as qwen_block, mlp_tensors};
use crate::model::transformer::{delegate_model, CpuTransformer, FeedForward, TensorTable};

/// Token embedding, `[vocab_size, hidden_size]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final RMSNorm weight, `[hidden_size]`.
pub const NORM: &str = "model.norm.weight";
/// LM head, `[vocab_size, hidden_size]` (absent when `tie_word_embeddings`).
pub const LM_HEAD: &str = "lm_head.weight";

/// The LLaDA-MoE tensor table for `cfg` (a LLaDA-MoE config: [`ModelConfig::experts`] set).
pub fn table(cfg: &ModelConfig) -> TensorTable {
    let n_experts = cfg.experts.map_or(0, |x| x.n_experts);
    let blocks = (0..cfg.n_layers)
        .map(|i| {
            let attn = |name: &str| format!("model.layers.{i}.self_attn.{name}.weight");
            let mlp = format!("model.layers.{i}.mlp");
            let mut b = qwen_block(i);
            b.qkv_bias = None;
            b.qk_norm = cfg.qk_norm.then(|| (attn("q_norm"), attn("k_norm")));
            b.ffn = FeedForward::Experts {
                router: format!("{mlp}.gate.weight"),
                experts: (0..n_experts)
                    .map(|e| mlp_tensors(&format!("{mlp}.experts.{e}")))
                    .collect(),
            };
            b
        })
        .collect();
    TensorTable {
        embedding: EMBED.to_string(),
        final_norm: NORM.to_string(),
        lm_head: (!cfg.weight_tying).then(|| LM_HEAD.to_string()),
        blocks,
    }
}

/// A LLaDA-MoE model on the CPU.
pub struct LladaMoe(CpuTransformer);

delegate_model!(LladaMoe, Arch::LladaMoe);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_names_the_router_every_expert_and_the_head_norms() {
        let cfg = ModelConfig::from_json(&json!({"model_type": "lladamoe", "hidden_size": 64,
            "num_attention_heads": 4, "num_hidden_layers": 2, "expert_intermediate_size": 32,
            "num_experts": 3, "num_experts_per_tok": 2, "vocab_size": 100, "rope_theta": 5e4,
            "qk_layernorm": true, "mask_token_id": 99, "eos_token_id": 98}))
        .unwrap();
        let roles = table(&cfg).roles(&cfg);
        let find = |name: &str| {
            roles
                .iter()
                .find(|(s, _)| s.name == name)
                .map(|(s, _)| s.shape.clone())
        };
        assert_eq!(find("model.layers.1.mlp.gate.weight"), Some(vec![3, 64]));
        assert_eq!(
            find("model.layers.1.mlp.experts.2.down_proj.weight"),
            Some(vec![64, 32])
        );
        assert_eq!(
            find("model.layers.0.mlp.experts.0.gate_proj.weight"),
            Some(vec![32, 64])
        );
        assert_eq!(
            find("model.layers.0.self_attn.q_norm.weight"),
            Some(vec![16])
        );
        assert_eq!(find("model.layers.0.self_attn.q_proj.bias"), None);
        assert_eq!(find("model.layers.0.mlp.gate_proj.weight"), None);
        // embedding + 2 × (q, k, v, o, router, 3 × 3 experts, 2 norms, 2 head norms) + norm + head
        assert_eq!(roles.len(), 1 + 2 * (4 + 1 + 9 + 2 + 2) + 2);
        let count: usize = roles
            .iter()
            .map(|(s, _)| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(count, cfg.parameter_count());
    }
}
