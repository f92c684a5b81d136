//! Model configuration: `config.json` parsed into one architecture-neutral [`ModelConfig`].
//!
//! Three architectures: LLaDA (`model_type: "llada"`, OLMo-style field names), Dream
//! (`model_type: "Dream"`, Qwen2-style field names) and LLaDA-MoE (OLMoE-style field names, a
//! mixture of experts in every layer; `model_type: "lladamoe"`, or `"llada"` as the released
//! configs say, with `architectures: ["LLaDAMoEModelLM"]`). Every field is validated; a
//! bad or missing field gives an [`Error::Config`] naming it with the spelling of that
//! architecture's config.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Architectures dllm can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LLaDA (GSAI-ML/LLaDA-8B-*): OLMo-style names under `model.transformer.*`.
    Llada,
    /// Dream (Dream-org/Dream-v0-*-7B): the Qwen2.5 layout under `model.layers.*`, q/k/v biases,
    /// shifted logits.
    Dream,
    /// LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*): the OLMoE layout under `model.layers.*`,
    /// per-head q/k RMSNorms, a softmax-routed mixture of SwiGLU experts in every layer,
    /// unshifted logits.
    LladaMoe,
}

impl Arch {
    /// The `model_type` strings accepted, for error messages.
    pub const SUPPORTED: &'static str = "llada, dream, lladamoe";

    /// The name printed by `dllm info`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llada => "llada",
            Arch::Dream => "dream",
            Arch::LladaMoe => "llada-moe",
        }
    }

    /// Whether the model is trained to predict the token at position `i` from the output at
    /// position `i − 1` (Dream, inherited from its autoregressive initialisation). Such models'
    /// [`Model::forward`](crate::model::Model::forward) returns the shifted rows
    /// `cat(raw[:1], raw[:-1])`, so that row `i` always predicts position `i`.
    pub fn shifted_logits(self) -> bool {
        match self {
            Arch::Llada | Arch::LladaMoe => false,
            Arch::Dream => true,
        }
    }

    /// The `config.json` spelling of a field, given its LLaDA spelling (the names
    /// [`ModelConfig::validate`] uses internally).
    pub fn config_key(self, llada_key: &'static str) -> &'static str {
        match self {
            Arch::Llada => llada_key,
            Arch::Dream | Arch::LladaMoe => match llada_key {
                "d_model" => "hidden_size",
                "n_heads" => "num_attention_heads",
                "n_kv_heads" => "num_key_value_heads",
                "n_layers" => "num_hidden_layers",
                "mlp_hidden_size" if self == Arch::LladaMoe => "expert_intermediate_size",
                "mlp_hidden_size" => "intermediate_size",
                "max_sequence_length" => "max_position_embeddings",
                // No separate embedding size: the embedding has vocab_size rows.
                "embedding_size" => "vocab_size",
                "weight_tying" => "tie_word_embeddings",
                other => other,
            },
        }
    }
}

/// LLaDA-8B's mask token id, used when `mask_token_id` is absent from the config.
pub const LLADA_DEFAULT_MASK_ID: u32 = 126336;
/// LLaDA-8B's end-of-text id (also its pad id), used when absent from the config.
pub const LLADA_DEFAULT_EOS_ID: u32 = 126081;
/// Dream-7B's mask token id (`<|mask|>`), used when `mask_token_id` is absent from the config.
pub const DREAM_DEFAULT_MASK_ID: u32 = 151666;
/// Dream-7B's end-of-text id (`<|endoftext|>`, also its pad id), used when absent.
pub const DREAM_DEFAULT_EOS_ID: u32 = 151643;
/// LLaDA-MoE-7B-A1B's mask token id (`<|mask|>`), used when `mask_token_id` is absent.
pub const LLADA_MOE_DEFAULT_MASK_ID: u32 = 156895;
/// LLaDA-MoE-7B-A1B's end-of-text id (`<|endoftext|>`, also its pad id), used when absent.
pub const LLADA_MOE_DEFAULT_EOS_ID: u32 = 156892;

/// The mixture of experts that replaces the SwiGLU of every layer (LLaDA-MoE): a router picks
/// each row's `experts_per_token` most probable experts (softmax over `n_experts` router
/// logits) and the layer's output is their SwiGLUs (hidden size
/// [`ModelConfig::mlp_hidden`]) weighted by those probabilities, not renormalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Experts {
    /// Experts per layer (`num_experts`).
    pub n_experts: usize,
    /// Experts each row runs (`num_experts_per_tok`).
    pub experts_per_token: usize,
}

/// The hyper-parameters of a model, independent of the checkpoint's naming.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Hidden size.
    pub d_model: usize,
    pub n_heads: usize,
    /// Number of key/value heads (equal to `n_heads` unless grouped-query attention).
    pub n_kv_heads: usize,
    pub n_layers: usize,
    /// Hidden size of the SwiGLU feed-forward (of each expert's, with [`ModelConfig::experts`]).
    pub mlp_hidden: usize,
    /// Number of real tokens; ids at or above it are never produced.
    pub vocab_size: usize,
    /// Rows of the embedding and of the LM head (may be padded beyond `vocab_size`).
    pub embedding_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub max_seq_len: usize,
    pub mask_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    /// LM head shares the embedding matrix.
    pub weight_tying: bool,
    /// Biases on every linear layer (unsupported for now; rejected at load).
    pub include_bias: bool,
    /// Biases on q/k/v projections.
    pub include_qkv_bias: bool,
    /// An RMSNorm over each query and key head (weights of `head_dim`) after the projections,
    /// before RoPE (LLaDA-MoE's `qk_layernorm`).
    pub qk_norm: bool,
    /// A mixture of experts in every layer instead of one SwiGLU (LLaDA-MoE).
    pub experts: Option<Experts>,
}

impl ModelConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Width of one logits row (the LM head's output size).
    pub fn logits_width(&self) -> usize {
        self.embedding_size
    }

    /// Whether the CUDA backend has a model for this config: every dense one, and a mixture of
    /// experts within the CUDA kernels' limits ([`crate::backend::cuda::moe::unsupported`]).
    pub fn has_cuda_model(&self) -> bool {
        crate::backend::cuda::moe::unsupported(self).is_none()
    }

    /// Whether row `i` of the raw LM-head output predicts position `i + 1` (see
    /// [`Arch::shifted_logits`]).
    pub fn shifted_logits(&self) -> bool {
        self.arch.shifted_logits()
    }

    /// The hidden-state position whose LM-head output predicts position `p`: `p` itself, or
    /// `max(p − 1, 0)` for architectures with shifted logits (Dream). Every backend uses it.
    pub fn source_position(&self, p: usize) -> usize {
        if self.shifted_logits() {
            p.saturating_sub(1)
        } else {
            p
        }
    }

    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        Self::from_json(&v)
    }

    /// Parses and validates a config from JSON.
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config("<root>", "config.json must be a JSON object"))?;
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config("model_type", "missing or not a string"))?;
        match model_type.to_ascii_lowercase().as_str() {
            // The released LLaDA-MoE configs keep LLaDA's model_type (their config class says
            // "llada"); the architecture and the OLMoE field names tell them apart.
            "llada" if is_llada_moe(v) => Self::llada_moe(v),
            "llada" => Self::llada(v),
            "dream" => Self::dream(v),
            "lladamoe" | "llada_moe" | "llada-moe" => Self::llada_moe(v),
            other => Err(Error::Unsupported(format!(
                "unsupported architecture `{other}` (supported: {})",
                Arch::SUPPORTED
            ))),
        }
    }

    fn llada(v: &Value) -> Result<Self> {
        check_llada_options(v)?;
        let d_model = req_usize(v, "d_model")?;
        let n_heads = req_usize(v, "n_heads")?;
        let n_kv_heads = opt_usize(v, "n_kv_heads")?.unwrap_or(n_heads);
        let n_layers = req_usize(v, "n_layers")?;
        let mlp_hidden = match opt_usize(v, "mlp_hidden_size")? {
            Some(h) => h,
            None => {
                let ratio = opt_f64(v, "mlp_ratio")?.ok_or_else(|| {
                    Error::config("mlp_hidden_size", "missing (and no mlp_ratio to derive it)")
                })?;
                (ratio * d_model as f64).round() as usize
            }
        };
        let vocab_size = req_usize(v, "vocab_size")?;
        let embedding_size = opt_usize(v, "embedding_size")?.unwrap_or(vocab_size);
        let cfg = ModelConfig {
            arch: Arch::Llada,
            d_model,
            n_heads,
            n_kv_heads,
            n_layers,
            mlp_hidden,
            vocab_size,
            embedding_size,
            rope_theta: opt_f64(v, "rope_theta")?.unwrap_or(10000.0) as f32,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-5) as f32,
            max_seq_len: opt_usize(v, "max_sequence_length")?.unwrap_or(4096),
            mask_token_id: opt_u32(v, "mask_token_id")?.unwrap_or(LLADA_DEFAULT_MASK_ID),
            eos_token_id: opt_u32(v, "eos_token_id")?.unwrap_or(LLADA_DEFAULT_EOS_ID),
            pad_token_id: opt_u32(v, "pad_token_id")?.unwrap_or(LLADA_DEFAULT_EOS_ID),
            weight_tying: opt_bool(v, "weight_tying")?.unwrap_or(false),
            include_bias: opt_bool(v, "include_bias")?.unwrap_or(false),
            include_qkv_bias: opt_bool(v, "include_qkv_bias")?.unwrap_or(false),
            qk_norm: false,
            experts: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Dream's `config.json` (Qwen2 field names). q/k/v biases are part of the architecture
    /// (Qwen2 always has them); options Dream never uses are rejected rather than ignored.
    fn dream(v: &Value) -> Result<Self> {
        check_hf_options(v)?;
        if opt_bool(v, "use_sliding_window")?.unwrap_or(false) {
            return Err(Error::Unsupported(
                "config field `use_sliding_window`: sliding-window attention".into(),
            ));
        }
        let d_model = req_usize(v, "hidden_size")?;
        let n_heads = req_usize(v, "num_attention_heads")?;
        if let Some(hd) = opt_usize(v, "head_dim")? {
            if n_heads != 0 && hd * n_heads != d_model {
                return Err(Error::config(
                    "head_dim",
                    format!("{hd} × num_attention_heads {n_heads} is not hidden_size {d_model}"),
                ));
            }
        }
        let vocab_size = req_usize(v, "vocab_size")?;
        let eos = opt_u32(v, "eos_token_id")?.unwrap_or(DREAM_DEFAULT_EOS_ID);
        let cfg = ModelConfig {
            arch: Arch::Dream,
            d_model,
            n_heads,
            n_kv_heads: opt_usize(v, "num_key_value_heads")?.unwrap_or(n_heads),
            n_layers: req_usize(v, "num_hidden_layers")?,
            mlp_hidden: req_usize(v, "intermediate_size")?,
            vocab_size,
            embedding_size: vocab_size,
            rope_theta: opt_f64(v, "rope_theta")?.unwrap_or(1_000_000.0) as f32,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_seq_len: opt_usize(v, "max_position_embeddings")?.unwrap_or(32768),
            mask_token_id: opt_u32(v, "mask_token_id")?.unwrap_or(DREAM_DEFAULT_MASK_ID),
            eos_token_id: eos,
            pad_token_id: opt_u32(v, "pad_token_id")?.unwrap_or(eos),
            weight_tying: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
            include_bias: false,
            include_qkv_bias: true,
            qk_norm: false,
            experts: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// LLaDA-MoE's `config.json` (OLMoE field names, `LLaDAConfig` of the reference modelling
    /// code). Options that select something the engine does not implement (a shared expert,
    /// dense layers, partial RoPE, q/k/v clipping, attention biases) are refused. The router
    /// options the reference forward never reads are ignored as it ignores them:
    /// `norm_topk_prob` (the top-k weights are never renormalised), `routed_scaling_factor`,
    /// the router groups and `moe_router_score_function` (always a softmax). So is
    /// `moe_router_enable_expert_bias`, as dInfer's and llama.cpp's LLaDA-MoE ignore it (the
    /// reference adds a zero buffer unless the checkpoint carries `mlp.expert_bias` tensors,
    /// which `dllm info` would list as extra).
    fn llada_moe(v: &Value) -> Result<Self> {
        check_hf_options(v)?;
        check_llada_moe_options(v)?;
        let n_layers = req_usize(v, "num_hidden_layers")?;
        if let Some(freq) = field(v, "moe_layer_freq") {
            let every_layer_moe = freq.as_array().is_some_and(|f| {
                f.len() == n_layers && f.iter().all(|x| x.as_u64().is_some_and(|n| n > 0))
            });
            if !every_layer_moe {
                return Err(Error::Unsupported(format!(
                    "config field `moe_layer_freq`: {freq} (implemented: a non-zero entry for \
                     each of the {n_layers} layers, every layer a mixture of experts)"
                )));
            }
        }
        let d_model = req_usize(v, "hidden_size")?;
        let n_heads = req_usize(v, "num_attention_heads")?;
        let vocab_size = req_usize(v, "vocab_size")?;
        let eos = opt_u32(v, "eos_token_id")?.unwrap_or(LLADA_MOE_DEFAULT_EOS_ID);
        let cfg = ModelConfig {
            arch: Arch::LladaMoe,
            d_model,
            n_heads,
            n_kv_heads: opt_usize(v, "num_key_value_heads")?.unwrap_or(n_heads),
            n_layers,
            mlp_hidden: req_usize(v, "expert_intermediate_size")?,
            vocab_size,
            embedding_size: vocab_size,
            rope_theta: opt_f64(v, "rope_theta")?
                .ok_or_else(|| Error::config("rope_theta", "missing"))?
                as f32,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-5) as f32,
            max_seq_len: opt_usize(v, "max_position_embeddings")?.unwrap_or(4096),
            mask_token_id: opt_u32(v, "mask_token_id")?.unwrap_or(LLADA_MOE_DEFAULT_MASK_ID),
            eos_token_id: eos,
            pad_token_id: opt_u32(v, "pad_token_id")?.unwrap_or(eos),
            weight_tying: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
            include_bias: false,
            include_qkv_bias: false,
            qk_norm: opt_bool(v, "qk_layernorm")?.unwrap_or(false),
            experts: Some(Experts {
                n_experts: req_usize(v, "num_experts")?,
                experts_per_token: req_usize(v, "num_experts_per_tok")?,
            }),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between fields. Errors name fields with the spelling of this
    /// config's architecture ([`Arch::config_key`]).
    pub fn validate(&self) -> Result<()> {
        let key = |k: &'static str| self.arch.config_key(k);
        let positive = [
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("n_layers", self.n_layers),
            ("mlp_hidden_size", self.mlp_hidden),
            ("vocab_size", self.vocab_size),
            ("max_sequence_length", self.max_seq_len),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::config(key(field), "must be positive"));
            }
            if value > MAX_DIM {
                return Err(Error::config(
                    key(field),
                    format!("{value} exceeds the largest size supported, {MAX_DIM}"),
                ));
            }
        }
        if self.embedding_size > MAX_DIM {
            return Err(Error::config(
                key("embedding_size"),
                format!(
                    "{} exceeds the largest size supported, {MAX_DIM}",
                    self.embedding_size
                ),
            ));
        }
        if self.n_layers > MAX_LAYERS {
            return Err(Error::config(
                key("n_layers"),
                format!(
                    "{} layers exceed the most supported, {MAX_LAYERS}",
                    self.n_layers
                ),
            ));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                key("n_heads"),
                format!(
                    "{} {} is not divisible by {} {}",
                    key("d_model"),
                    self.d_model,
                    key("n_heads"),
                    self.n_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                key("n_heads"),
                format!("head dim {} must be even for RoPE", self.head_dim()),
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::config(
                key("n_kv_heads"),
                format!(
                    "{} {} is not a multiple of {} {}",
                    key("n_heads"),
                    self.n_heads,
                    key("n_kv_heads"),
                    self.n_kv_heads
                ),
            ));
        }
        if self.embedding_size < self.vocab_size {
            return Err(Error::config(
                key("embedding_size"),
                format!(
                    "{} is smaller than vocab_size {}",
                    self.embedding_size, self.vocab_size
                ),
            ));
        }
        for (field, id) in [
            ("mask_token_id", self.mask_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if id as usize >= self.embedding_size {
                return Err(Error::config(
                    field,
                    format!(
                        "{id} is outside the embedding ({} rows)",
                        self.embedding_size
                    ),
                ));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config("rope_theta", "must be a positive number"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::config("rms_norm_eps", "must be a positive number"));
        }
        if let Some(x) = self.experts {
            if x.n_experts == 0 || x.n_experts > MAX_EXPERTS {
                return Err(Error::config(
                    "num_experts",
                    format!("{} is not between 1 and {MAX_EXPERTS}", x.n_experts),
                ));
            }
            if x.experts_per_token == 0 || x.experts_per_token > x.n_experts {
                return Err(Error::config(
                    "num_experts_per_tok",
                    format!(
                        "{} is not between 1 and num_experts {}",
                        x.experts_per_token, x.n_experts
                    ),
                ));
            }
        }
        match self.checked_parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => {}
            _ => {
                return Err(Error::config(
                    key("d_model"),
                    format!(
                        "the dimensions imply more than {MAX_PARAMETERS} parameters (the most \
                         supported)"
                    ),
                ))
            }
        }
        if self.include_bias {
            return Err(Error::Unsupported(
                "config field `include_bias`: LLaDA checkpoints with biases on every linear layer"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Number of parameters implied by the config (what the checkpoint must hold); `usize::MAX`
    /// for a config too large to count (which [`ModelConfig::validate`] refuses).
    pub fn parameter_count(&self) -> usize {
        self.checked_parameter_count().unwrap_or(usize::MAX)
    }

    /// [`ModelConfig::parameter_count`], None when it overflows.
    fn checked_parameter_count(&self) -> Option<usize> {
        let d = self.d_model;
        let kv = self.n_kv_heads.checked_mul(self.head_dim())?;
        let dd = d.checked_mul(d)?;
        let bias = if self.include_qkv_bias {
            d.checked_add(kv.checked_mul(2)?)?
        } else {
            0
        };
        // One SwiGLU, or every expert's and the router.
        let mlp = d.checked_mul(self.mlp_hidden)?.checked_mul(3)?;
        let ffn = match self.experts {
            None => mlp,
            Some(x) => mlp
                .checked_mul(x.n_experts)?
                .checked_add(d.checked_mul(x.n_experts)?)?,
        };
        let qk_norm = if self.qk_norm { 2 * self.head_dim() } else { 0 };
        let per_layer = dd
            .checked_mul(2)?
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)?
            .checked_add(ffn)?
            .checked_add(d.checked_mul(2)?)?
            .checked_add(bias)?
            .checked_add(qk_norm)?;
        let embedding = self.embedding_size.checked_mul(d)?;
        let head = if self.weight_tying { 0 } else { embedding };
        embedding
            .checked_add(self.n_layers.checked_mul(per_layer)?)?
            .checked_add(d)?
            .checked_add(head)
    }
}

/// Largest size of one dimension (the CUDA kernels index with 32-bit integers).
pub const MAX_DIM: usize = i32::MAX as usize;

/// Most layers a config may declare (LLaDA-8B has 32, Dream-7B 28): a typo such as `1e9` is
/// refused before any per-layer table is built.
pub const MAX_LAYERS: usize = 4096;

/// Most experts a mixture-of-experts layer may declare (LLaDA-MoE has 64).
pub const MAX_EXPERTS: usize = 4096;

/// Most parameters a config may imply (2⁴⁰, about 1.1 trillion: 2 TB of bf16, beyond any
/// checkpoint this engine maps).
pub const MAX_PARAMETERS: usize = 1 << 40;

/// OLMo options a LLaDA `config.json` may carry that select another architecture than the one
/// implemented: each must be absent, null, or one of the values listed.
const LLADA_FIXED_STRINGS: [(&str, &[&str]); 3] = [
    ("activation_type", &["silu", "swiglu"]),
    ("block_type", &["llama"]),
    ("layer_norm_type", &["rms"]),
];

/// The same for yes/no options, with the value the implementation assumes: RoPE on; no ALiBi,
/// no q/k layer norms, no logit scaling, no embedding norm.
const LLADA_FIXED_BOOLS: [(&str, bool); 5] = [
    ("rope", true),
    ("alibi", false),
    ("attention_layer_norm", false),
    ("scale_logits", false),
    ("input_emb_norm", false),
];

/// Refuses a LLaDA config whose options ask for something the engine does not implement
/// (rather than silently running a different model).
fn check_llada_options(v: &Value) -> Result<()> {
    for (name, allowed) in LLADA_FIXED_STRINGS {
        if let Some(x) = field(v, name) {
            let s = x
                .as_str()
                .ok_or_else(|| Error::config(name, format!("expected a string, found {x}")))?;
            if !allowed.contains(&s.to_ascii_lowercase().as_str()) {
                return Err(Error::Unsupported(format!(
                    "config field `{name}`: \"{s}\" (implemented: {})",
                    allowed.join(", ")
                )));
            }
        }
    }
    for (name, want) in LLADA_FIXED_BOOLS {
        if let Some(b) = opt_bool(v, name)? {
            if b != want {
                return Err(Error::Unsupported(format!(
                    "config field `{name}`: {b} (only {want} is implemented)"
                )));
            }
        }
    }
    if let Some(x) = field(v, "clip_qkv") {
        return Err(Error::Unsupported(format!(
            "config field `clip_qkv`: {x} (q/k/v clipping is not implemented)"
        )));
    }
    Ok(())
}

/// Whether a config with `model_type: "llada"` is a LLaDA-MoE one: its `architectures` name
/// `LLaDAMoEModelLM` (or `LLaDAMoEModel`), or it has `num_experts` and no `d_model`.
fn is_llada_moe(v: &Value) -> bool {
    let named = field(v, "architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|x| matches!(x.as_str(), Some("LLaDAMoEModelLM" | "LLaDAMoEModel")))
        });
    named || (field(v, "num_experts").is_some() && field(v, "d_model").is_none())
}

/// Options of the Hugging Face (Qwen2, OLMoE) configs that select another model than the one
/// implemented: an activation other than SiLU, scaled RoPE.
fn check_hf_options(v: &Value) -> Result<()> {
    if let Some(act) = field(v, "hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(Error::config(
                "hidden_act",
                format!("expected \"silu\", found {act}"),
            ));
        }
    }
    if field(v, "rope_scaling").is_some() {
        return Err(Error::Unsupported(
            "config field `rope_scaling`: scaled RoPE (only plain RoPE is implemented)".into(),
        ));
    }
    Ok(())
}

/// Refuses a LLaDA-MoE config whose options ask for parts the engine does not implement (parts
/// with tensors of their own, or other layer arithmetic): each must be absent, null, or as
/// listed.
fn check_llada_moe_options(v: &Value) -> Result<()> {
    let unsupported = |name: &str, x: &Value, what: &str| {
        Err(Error::Unsupported(format!(
            "config field `{name}`: {x} ({what} is not implemented)"
        )))
    };
    // A positive size adds a shared expert (tensors of its own); null, 0 or the config class's
    // default -1 mean none.
    if let Some(x) = field(v, "shared_expert_intermediate_size") {
        if x.as_f64().is_none_or(|n| n > 0.0) {
            return unsupported("shared_expert_intermediate_size", x, "a shared expert");
        }
    }
    if let Some(x) = field(v, "clip_qkv") {
        return unsupported("clip_qkv", x, "q/k/v clipping");
    }
    if opt_bool(v, "attention_bias")? == Some(true) {
        return unsupported(
            "attention_bias",
            &Value::Bool(true),
            "biases on the attention projections",
        );
    }
    if let Some(f) = opt_f64(v, "partial_rotary_factor")? {
        if f != 1.0 {
            return unsupported(
                "partial_rotary_factor",
                &v["partial_rotary_factor"],
                "partial RoPE",
            );
        }
    }
    Ok(())
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name).filter(|x| !x.is_null())
}

fn req_usize(v: &Value, name: &str) -> Result<usize> {
    opt_usize(v, name)?.ok_or_else(|| Error::config(name, "missing"))
}

fn opt_usize(v: &Value, name: &str) -> Result<Option<usize>> {
    match field(v, name) {
        None => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            Error::config(name, format!("expected a non-negative integer, found {x}"))
        }),
    }
}

fn opt_u32(v: &Value, name: &str) -> Result<Option<u32>> {
    match opt_usize(v, name)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| Error::config(name, format!("{n} does not fit a token id"))),
    }
}

fn opt_f64(v: &Value, name: &str) -> Result<Option<f64>> {
    match field(v, name) {
        None => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::config(name, format!("expected a number, found {x}"))),
    }
}

fn opt_bool(v: &Value, name: &str) -> Result<Option<bool>> {
    match field(v, name) {
        None => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::config(name, format!("expected true or false, found {x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny() -> Value {
        json!({"model_type": "llada", "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
               "mlp_hidden_size": 96, "vocab_size": 100, "embedding_size": 128, "rope_theta": 10000.0,
               "rms_norm_eps": 1e-5, "max_sequence_length": 256, "mask_token_id": 1,
               "eos_token_id": 0, "pad_token_id": 2})
    }

    #[test]
    fn parses_llada_fields() {
        let c = ModelConfig::from_json(&tiny()).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.logits_width(), 128);
        assert_eq!(c.mask_token_id, 1);
        // 128*64 emb + 2 layers * (4*64*64 + 3*64*96 + 2*64) + 64 + head 128*64
        assert_eq!(
            c.parameter_count(),
            128 * 64 * 2 + 2 * (4 * 4096 + 3 * 64 * 96 + 128) + 64
        );
    }

    #[test]
    fn mask_id_defaults_to_llada_8b() {
        let mut v = tiny();
        v.as_object_mut().unwrap().remove("mask_token_id");
        v["vocab_size"] = json!(126464);
        v["embedding_size"] = json!(126464);
        assert_eq!(ModelConfig::from_json(&v).unwrap().mask_token_id, 126336);
    }

    fn dream() -> Value {
        json!({"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": 64,
               "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "intermediate_size": 96, "vocab_size": 152064, "rms_norm_eps": 1e-6,
               "rope_theta": 1000000.0, "max_position_embeddings": 512, "rope_scaling": null,
               "hidden_act": "silu", "tie_word_embeddings": false})
    }

    #[test]
    fn parses_dream_fields_and_defaults() {
        let c = ModelConfig::from_json(&dream()).unwrap();
        assert_eq!(c.arch, Arch::Dream);
        assert!(c.shifted_logits() && c.include_qkv_bias && !c.weight_tying);
        assert!(!ModelConfig::from_json(&tiny()).unwrap().shifted_logits());
        assert_eq!(
            (c.d_model, c.n_heads, c.n_kv_heads, c.n_layers, c.head_dim()),
            (64, 8, 2, 2, 8)
        );
        assert_eq!(
            (c.mlp_hidden, c.vocab_size, c.embedding_size, c.max_seq_len),
            (96, 152064, 152064, 512)
        );
        assert_eq!(
            (c.mask_token_id, c.eos_token_id, c.pad_token_id),
            (151666, 151643, 151643)
        );
        assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6));
        // kv = 2 heads × 8; per layer: q, o 64²; k, v 16·64; biases 64 + 2·16; MLP 3·64·96; norms.
        let per_layer = 2 * 64 * 64 + 2 * 16 * 64 + 64 + 32 + 3 * 64 * 96 + 2 * 64;
        assert_eq!(c.parameter_count(), 2 * 152064 * 64 + 2 * per_layer + 64);
        let mut v = dream();
        v["tie_word_embeddings"] = json!(true);
        v["pad_token_id"] = json!(7);
        let t = ModelConfig::from_json(&v).unwrap();
        assert!(t.weight_tying);
        assert_eq!(t.pad_token_id, 7);
    }

    fn llada_moe() -> Value {
        json!({"model_type": "lladamoe", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "expert_intermediate_size": 32, "num_experts": 8,
            "num_experts_per_tok": 2, "vocab_size": 200, "rope_theta": 50000.0,
            "qk_layernorm": true, "moe_layer_freq": [1, 1], "mask_token_id": 199,
            "eos_token_id": 198, "norm_topk_prob": true, "routed_scaling_factor": 2.5,
            "shared_expert_intermediate_size": null, "partial_rotary_factor": 1.0,
            "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": true})
    }

    #[test]
    fn parses_llada_moe_fields_and_defaults() {
        let c = ModelConfig::from_json(&llada_moe()).unwrap();
        assert_eq!(c.arch, Arch::LladaMoe);
        assert!(!c.shifted_logits());
        assert_eq!(
            (c.d_model, c.n_heads, c.n_kv_heads, c.n_layers),
            (64, 4, 4, 2)
        );
        assert_eq!(
            (c.mlp_hidden, c.vocab_size, c.embedding_size),
            (32, 200, 200)
        );
        assert_eq!(
            c.experts,
            Some(Experts {
                n_experts: 8,
                experts_per_token: 2
            })
        );
        assert!(c.qk_norm && !c.include_qkv_bias && !c.weight_tying);
        assert_eq!(
            (c.mask_token_id, c.eos_token_id, c.pad_token_id),
            (199, 198, 198)
        );
        assert_eq!((c.rms_norm_eps, c.max_seq_len), (1e-5, 4096));
        // embedding + head + per layer: 4 · 64² attention, router 8 · 64, 8 experts of
        // 3 · 64 · 32, two norms of 64, two head norms of 16; final norm.
        let per_layer = 4 * 64 * 64 + 8 * 64 + 8 * 3 * 64 * 32 + 2 * 64 + 2 * 16;
        assert_eq!(c.parameter_count(), 2 * 200 * 64 + 2 * per_layer + 64);
        // The released checkpoints' defaults, and the spellings accepted.
        let mut v = llada_moe();
        for k in [
            "mask_token_id",
            "eos_token_id",
            "qk_layernorm",
            "moe_layer_freq",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        v["vocab_size"] = json!(157184);
        v["model_type"] = json!("LLaDA_MoE");
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!((c.mask_token_id, c.eos_token_id), (156895, 156892));
        assert!(!c.qk_norm);
        // The released configs say model_type "llada": their architecture, or the OLMoE fields
        // without LLaDA's d_model, select LLaDA-MoE.
        let mut v = llada_moe();
        v["model_type"] = json!("llada");
        v["architectures"] = json!(["LLaDAMoEModelLM"]);
        assert_eq!(ModelConfig::from_json(&v).unwrap().arch, Arch::LladaMoe);
        v.as_object_mut().unwrap().remove("architectures");
        assert_eq!(ModelConfig::from_json(&v).unwrap().arch, Arch::LladaMoe);
        // No shared expert: null, 0 or the config class's default -1.
        for none in [json!(0), json!(-1)] {
            v["shared_expert_intermediate_size"] = none;
            assert!(ModelConfig::from_json(&v).is_ok());
        }
    }

    #[test]
    fn llada_moe_errors_name_the_field() {
        for (field, value, needle) in [
            ("num_experts", json!(0), "num_experts"),
            ("num_experts", json!(5000), "num_experts"),
            ("num_experts_per_tok", json!(9), "num_experts_per_tok"),
            ("num_experts_per_tok", json!(0), "num_experts_per_tok"),
            (
                "expert_intermediate_size",
                json!(0),
                "expert_intermediate_size",
            ),
            ("moe_layer_freq", json!([1, 0]), "moe_layer_freq"),
            ("moe_layer_freq", json!([1]), "moe_layer_freq"),
            (
                "shared_expert_intermediate_size",
                json!(512),
                "shared_expert",
            ),
            ("partial_rotary_factor", json!(0.5), "partial_rotary_factor"),
            ("clip_qkv", json!(8), "clip_qkv"),
            ("attention_bias", json!(true), "attention_bias"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("rope_scaling", json!({"type": "yarn"}), "rope_scaling"),
            ("hidden_size", json!(66), "num_attention_heads"),
        ] {
            let mut v = llada_moe();
            v[field] = value;
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{field}: {e}");
        }
        for field in [
            "hidden_size",
            "num_experts",
            "num_experts_per_tok",
            "expert_intermediate_size",
            "rope_theta",
        ] {
            let mut v = llada_moe();
            v.as_object_mut().unwrap().remove(field);
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("missing"), "{field}: {e}");
        }
    }

    #[test]
    fn dream_errors_name_dream_fields() {
        for (field, value, needle) in [
            ("hidden_size", json!("big"), "hidden_size"),
            ("hidden_size", json!(60), "num_attention_heads"),
            ("num_attention_heads", json!(0), "num_attention_heads"),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
            ("intermediate_size", json!(0), "intermediate_size"),
            ("vocab_size", json!(1000), "mask_token_id"),
            (
                "max_position_embeddings",
                json!(-1),
                "max_position_embeddings",
            ),
            ("rope_theta", json!(0.0), "rope_theta"),
            ("tie_word_embeddings", json!("no"), "tie_word_embeddings"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            (
                "rope_scaling",
                json!({"type": "yarn", "factor": 4.0}),
                "rope_scaling",
            ),
            ("use_sliding_window", json!(true), "use_sliding_window"),
            ("head_dim", json!(16), "head_dim"),
        ] {
            let mut v = dream();
            v[field] = value;
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{field}: {e}");
        }
        for field in [
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "intermediate_size",
            "vocab_size",
        ] {
            let mut v = dream();
            v.as_object_mut().unwrap().remove(field);
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("missing"), "{field}: {e}");
        }
    }

    #[test]
    fn unknown_architecture_is_named() {
        let mut v = tiny();
        v["model_type"] = json!("gpt2");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("gpt2") && e.contains("supported: llada, dream"),
            "{e}"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        for (field, value, needle) in [
            ("d_model", json!("big"), "d_model"),
            ("n_heads", json!(5), "n_heads"),
            ("n_kv_heads", json!(3), "n_kv_heads"),
            ("embedding_size", json!(50), "embedding_size"),
            ("mask_token_id", json!(1000), "mask_token_id"),
            ("rope_theta", json!(-1.0), "rope_theta"),
        ] {
            let mut v = tiny();
            v[field] = value;
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{field}: {e}");
        }
        let mut v = tiny();
        v.as_object_mut().unwrap().remove("n_layers");
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("n_layers"));
    }

    #[test]
    fn sizes_past_the_engines_limits_are_refused_before_anything_is_built() {
        // Each of these once reached the loader (n_layers 2^32 aborted the process allocating
        // its per-layer tensor table).
        for (field, value, needle) in [
            ("n_layers", json!(4_294_967_296u64), "n_layers"),
            ("n_layers", json!(MAX_LAYERS + 1), "n_layers"),
            ("d_model", json!(1u64 << 32), "d_model"),
            ("mlp_hidden_size", json!(u64::MAX), "mlp_hidden_size"),
            ("vocab_size", json!(1u64 << 40), "vocab_size"),
            (
                "max_sequence_length",
                json!(1u64 << 33),
                "max_sequence_length",
            ),
        ] {
            let mut v = tiny();
            v[field] = value;
            let e = ModelConfig::from_json(&v).unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{field}: {e:?}");
            assert!(e.to_string().contains(needle), "{field}: {e}");
        }
        // Dimensions that each fit but together imply more than 2^40 parameters
        // (65 536² · 4 096 layers · 8 ≈ 1.4 · 10^14).
        let mut v = tiny();
        v["d_model"] = json!(65_536);
        v["n_heads"] = json!(512);
        v["n_kv_heads"] = json!(512);
        v["n_layers"] = json!(4096);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("parameters"), "{e}");
        // The largest allowed layer count itself is fine.
        let mut v = tiny();
        v["n_layers"] = json!(MAX_LAYERS);
        assert_eq!(ModelConfig::from_json(&v).unwrap().n_layers, MAX_LAYERS);
    }

    #[test]
    fn llada_options_selecting_another_architecture_are_refused() {
        for (field, value) in [
            ("activation_type", json!("gelu")),
            ("block_type", json!("sequential")),
            ("layer_norm_type", json!("default")),
            ("rope", json!(false)),
            ("alibi", json!(true)),
            ("attention_layer_norm", json!(true)),
            ("scale_logits", json!(true)),
            ("input_emb_norm", json!(true)),
            ("clip_qkv", json!(8.0)),
        ] {
            let mut v = tiny();
            v[field] = value.clone();
            let e = ModelConfig::from_json(&v).unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{field}: {e:?}");
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        // A wrong type is a config error naming the field.
        let mut v = tiny();
        v["activation_type"] = json!(3);
        let e = ModelConfig::from_json(&v).unwrap_err();
        assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("activation_type"));
        // LLaDA-8B's own values (and null, and absence) load.
        let mut v = tiny();
        for (field, value) in [
            ("activation_type", json!("silu")),
            ("block_type", json!("llama")),
            ("layer_norm_type", json!("rms")),
            ("rope", json!(true)),
            ("alibi", json!(false)),
            ("attention_layer_norm", json!(false)),
            ("scale_logits", json!(false)),
            ("input_emb_norm", json!(false)),
            ("clip_qkv", Value::Null),
        ] {
            v[field] = value;
        }
        ModelConfig::from_json(&v).unwrap();
        v["activation_type"] = json!("SwiGLU");
        ModelConfig::from_json(&v).unwrap();
    }
}
