//! The LLaDA checkpoint layout: every tensor name and shape, spelled in this one place.
//!
//! LLaDA uses OLMo-style names under `model.transformer.*`. Linear weights are stored
//! `[out_features, in_features]` (PyTorch convention). `ff_proj` is the SwiGLU gate (silu is
//! applied to it), `up_proj` the value branch, `ff_out` the down projection.

use crate::config::ModelConfig;
use crate::model::transformer::{BlockTensors, FeedForward, SwiGluTensors, TensorTable};
use crate::weights::TensorSpec;

/// Token embedding, `[embedding_size, d_model]`.
pub const WTE: &str = "model.transformer.wte.weight";
/// Final RMSNorm weight, `[d_model]`.
pub const LN_F: &str = "model.transformer.ln_f.weight";
/// LM head, `[embedding_size, d_model]` (absent when `weight_tying`).
pub const LM_HEAD: &str = "model.transformer.ff_out.weight";

/// How a tensor is used (shared by every architecture; kept here under its old path).
pub use crate::model::transformer::Role;

/// The tensor names of block `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNames {
    pub q_proj: String,
    pub k_proj: String,
    pub v_proj: String,
    pub attn_out: String,
    /// SwiGLU gate (silu applied to it).
    pub ff_proj: String,
    pub up_proj: String,
    /// Down projection.
    pub ff_out: String,
    pub attn_norm: String,
    pub ff_norm: String,
    /// Only present with `include_qkv_bias`.
    pub q_bias: String,
    pub k_bias: String,
    pub v_bias: String,
}

/// The names of the tensors of block `i`.
pub fn block_names(i: usize) -> BlockNames {
    let n = |suffix: &str| format!("model.transformer.blocks.{i}.{suffix}");
    BlockNames {
        q_proj: n("q_proj.weight"),
        k_proj: n("k_proj.weight"),
        v_proj: n("v_proj.weight"),
        attn_out: n("attn_out.weight"),
        ff_proj: n("ff_proj.weight"),
        up_proj: n("up_proj.weight"),
        ff_out: n("ff_out.weight"),
        attn_norm: n("attn_norm.weight"),
        ff_norm: n("ff_norm.weight"),
        q_bias: n("q_proj.bias"),
        k_bias: n("k_proj.bias"),
        v_bias: n("v_proj.bias"),
    }
}

/// The LLaDA tensor table for `cfg`, as the shared transformer reads it.
pub fn table(cfg: &ModelConfig) -> TensorTable {
    TensorTable {
        embedding: WTE.to_string(),
        final_norm: LN_F.to_string(),
        lm_head: (!cfg.weight_tying).then(|| LM_HEAD.to_string()),
        blocks: (0..cfg.n_layers)
            .map(|i| {
                let n = block_names(i);
                BlockTensors {
                    q: n.q_proj,
                    k: n.k_proj,
                    v: n.v_proj,
                    o: n.attn_out,
                    ffn: FeedForward::Dense(SwiGluTensors {
                        gate: n.ff_proj,
                        up: n.up_proj,
                        down: n.ff_out,
                    }),
                    attn_norm: n.attn_norm,
                    mlp_norm: n.ff_norm,
                    qkv_bias: cfg
                        .include_qkv_bias
                        .then_some((n.q_bias, n.k_bias, n.v_bias)),
                    qk_norm: None,
                }
            })
            .collect(),
    }
}

/// Every tensor of a LLaDA checkpoint with `cfg`, with its role: embedding, blocks in order,
/// final norm, LM head.
pub fn llada_tensor_roles(cfg: &ModelConfig) -> Vec<(TensorSpec, Role)> {
    table(cfg).roles(cfg)
}

/// Every tensor a LLaDA checkpoint with `cfg` must hold.
pub fn llada_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    table(cfg).specs(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(tying: bool, qkv_bias: bool) -> ModelConfig {
        ModelConfig::from_json(&json!({"model_type": "llada", "d_model": 64, "n_heads": 4,
            "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 96, "vocab_size": 100,
            "embedding_size": 128, "mask_token_id": 1, "eos_token_id": 0, "pad_token_id": 2,
            "weight_tying": tying, "include_qkv_bias": qkv_bias}))
        .unwrap()
    }

    #[test]
    fn names_and_shapes_of_a_gqa_config() {
        let t = llada_tensors(&cfg(false, false));
        assert_eq!(t.len(), 1 + 2 * 9 + 2);
        let find = |n: &str| t.iter().find(|s| s.name == n).unwrap().shape.clone();
        assert_eq!(find("model.transformer.wte.weight"), vec![128, 64]);
        // kv = 2 heads * 16
        assert_eq!(
            find("model.transformer.blocks.1.k_proj.weight"),
            vec![32, 64]
        );
        assert_eq!(
            find("model.transformer.blocks.1.v_proj.weight"),
            vec![32, 64]
        );
        assert_eq!(
            find("model.transformer.blocks.0.q_proj.weight"),
            vec![64, 64]
        );
        assert_eq!(
            find("model.transformer.blocks.0.ff_proj.weight"),
            vec![96, 64]
        );
        assert_eq!(
            find("model.transformer.blocks.0.ff_out.weight"),
            vec![64, 96]
        );
        assert_eq!(find("model.transformer.blocks.0.ff_norm.weight"), vec![64]);
        assert_eq!(find("model.transformer.ff_out.weight"), vec![128, 64]);
        assert_eq!(find("model.transformer.ln_f.weight"), vec![64]);
        let params: usize = t.iter().map(TensorSpec::numel).sum();
        assert_eq!(params, cfg(false, false).parameter_count());
        let mut names: Vec<_> = t.iter().map(|s| &s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), t.len(), "names are unique");
    }

    #[test]
    fn tying_drops_the_head_and_qkv_bias_adds_three_per_block() {
        let c = cfg(true, true);
        let t = llada_tensors(&c);
        assert_eq!(t.len(), 1 + 2 * 12 + 1);
        assert!(!t.iter().any(|s| s.name == LM_HEAD));
        let kb = t
            .iter()
            .find(|s| s.name == "model.transformer.blocks.0.k_proj.bias")
            .unwrap();
        assert_eq!(kb.shape, vec![32]);
        let params: usize = t.iter().map(TensorSpec::numel).sum();
        assert_eq!(params, c.parameter_count());
    }
}
