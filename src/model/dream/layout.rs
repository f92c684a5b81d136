//! The Dream checkpoint layout (Qwen2 names under `model.layers.*`), spelled in this one place.
//!
//! Linear weights are stored `[out_features, in_features]`. q/k/v projections carry biases
//! (`…proj.bias`); `o_proj` and the MLP do not. `gate_proj` is the SwiGLU gate (silu is applied
//! to it), `up_proj` the value branch, `down_proj` the down projection. The LM head is untied
//! unless `tie_word_embeddings`.

use crate::config::ModelConfig;
use crate::model::transformer::{BlockTensors, FeedForward, Role, SwiGluTensors, TensorTable};
use crate::weights::TensorSpec;

/// Token embedding, `[vocab_size, hidden_size]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final RMSNorm weight, `[hidden_size]`.
pub const NORM: &str = "model.norm.weight";
/// LM head, `[vocab_size, hidden_size]` (absent when `tie_word_embeddings`).
pub const LM_HEAD: &str = "lm_head.weight";

/// The tensor names of layer `i`.
pub fn block_tensors(i: usize) -> BlockTensors {
    let n = |suffix: &str| format!("model.layers.{i}.{suffix}");
    BlockTensors {
        q: n("self_attn.q_proj.weight"),
        k: n("self_attn.k_proj.weight"),
        v: n("self_attn.v_proj.weight"),
        o: n("self_attn.o_proj.weight"),
        ffn: FeedForward::Dense(mlp_tensors(&n("mlp"))),
        attn_norm: n("input_layernorm.weight"),
        mlp_norm: n("post_attention_layernorm.weight"),
        qkv_bias: Some((
            n("self_attn.q_proj.bias"),
            n("self_attn.k_proj.bias"),
            n("self_attn.v_proj.bias"),
        )),
        qk_norm: None,
    }
}

/// The SwiGLU projections under `prefix` (`{prefix}.gate_proj.weight`, `up_proj`, `down_proj`):
/// Qwen2's `mlp`, and each LLaDA-MoE expert.
pub fn mlp_tensors(prefix: &str) -> SwiGluTensors {
    SwiGluTensors {
        gate: format!("{prefix}.gate_proj.weight"),
        up: format!("{prefix}.up_proj.weight"),
        down: format!("{prefix}.down_proj.weight"),
    }
}

/// The Dream tensor table for `cfg`.
pub fn table(cfg: &ModelConfig) -> TensorTable {
    TensorTable {
        embedding: EMBED.to_string(),
        final_norm: NORM.to_string(),
        lm_head: (!cfg.weight_tying).then(|| LM_HEAD.to_string()),
        blocks: (0..cfg.n_layers).map(block_tensors).collect(),
    }
}

/// Every tensor of a Dream checkpoint with `cfg`, with its role.
pub fn dream_tensor_roles(cfg: &ModelConfig) -> Vec<(TensorSpec, Role)> {
    table(cfg).roles(cfg)
}

/// Every tensor a Dream checkpoint with `cfg` must hold.
pub fn dream_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    table(cfg).specs(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(tie: bool) -> ModelConfig {
        ModelConfig::from_json(&json!({"model_type": "Dream", "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": 128, "mask_token_id": 1, "eos_token_id": 0,
            "pad_token_id": 0, "tie_word_embeddings": tie}))
        .unwrap()
    }

    #[test]
    fn names_and_shapes_of_a_gqa_config() {
        let c = cfg(false);
        let t = dream_tensors(&c);
        // embedding + 2 × (q,k,v, 3 biases, o, gate, up, down, 2 norms) + norm + head
        assert_eq!(t.len(), 1 + 2 * 12 + 2);
        let find = |n: &str| t.iter().find(|s| s.name == n).unwrap().shape.clone();
        assert_eq!(find("model.embed_tokens.weight"), vec![128, 64]);
        assert_eq!(find("model.layers.1.self_attn.q_proj.weight"), vec![64, 64]);
        // kv = 2 heads × 16
        assert_eq!(find("model.layers.1.self_attn.k_proj.weight"), vec![32, 64]);
        assert_eq!(find("model.layers.0.self_attn.v_proj.weight"), vec![32, 64]);
        assert_eq!(find("model.layers.0.self_attn.q_proj.bias"), vec![64]);
        assert_eq!(find("model.layers.0.self_attn.k_proj.bias"), vec![32]);
        assert_eq!(find("model.layers.0.self_attn.v_proj.bias"), vec![32]);
        assert_eq!(find("model.layers.0.self_attn.o_proj.weight"), vec![64, 64]);
        assert_eq!(find("model.layers.0.mlp.gate_proj.weight"), vec![96, 64]);
        assert_eq!(find("model.layers.0.mlp.up_proj.weight"), vec![96, 64]);
        assert_eq!(find("model.layers.0.mlp.down_proj.weight"), vec![64, 96]);
        assert_eq!(find("model.layers.0.input_layernorm.weight"), vec![64]);
        assert_eq!(
            find("model.layers.0.post_attention_layernorm.weight"),
            vec![64]
        );
        assert_eq!(find("model.norm.weight"), vec![64]);
        assert_eq!(find("lm_head.weight"), vec![128, 64]);
        assert!(!t.iter().any(|s| s.name.contains("o_proj.bias")
            || s.name.contains("mlp") && s.name.ends_with("bias")));
        let params: usize = t.iter().map(TensorSpec::numel).sum();
        assert_eq!(params, c.parameter_count());
        let mut names: Vec<_> = t.iter().map(|s| &s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), t.len(), "names are unique");
    }

    #[test]
    fn tied_embeddings_drop_the_head() {
        let c = cfg(true);
        let t = dream_tensors(&c);
        assert_eq!(t.len(), 1 + 2 * 12 + 1);
        assert!(!t.iter().any(|s| s.name == LM_HEAD));
        let params: usize = t.iter().map(TensorSpec::numel).sum();
        assert_eq!(params, c.parameter_count());
    }
}
