//! The LLaDA forward pass on the CPU backend.
//!
//! Follows the block of the reference modelling code (`LLaDALlamaBlock`), top-down:
//! ```text
//! x  = wte[ids]
//! per block:  h = x + attn_out(SDPA(rope(q_proj(n)), rope(k_proj(n)), v_proj(n), non-causal)), n = attn_norm(x)
//!             x = h + ff_out(silu(ff_proj(m)) * up_proj(m)),                                   m = ff_norm(h)
//! logits = lm_head(ln_f(x))      (lm_head = wte when weight_tying)
//! ```
//! Weights stay bf16 in the memory mapping; every op computes in fp32 (`backend::cpu`).
//! [`Model::predict`] runs the LM head only on the query rows.

use super::layout;
use crate::backend::cpu;
use crate::config::ModelConfig;
use crate::denoise::predict::{predict_rows, Prediction, PredictRule};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::weights::{TensorView, WeightStore};
use std::path::Path;

/// Norm weights of one block, converted to fp32 once at load (they are tiny).
struct BlockNorms {
    attn: Vec<f32>,
    ff: Vec<f32>,
}

/// A LLaDA model on the CPU.
pub struct Llada {
    cfg: ModelConfig,
    store: WeightStore,
    names: Vec<layout::BlockNames>,
    norms: Vec<BlockNorms>,
    ln_f: Vec<f32>,
}

/// Scratch buffers of one forward pass.
struct Scratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

impl Scratch {
    fn new(cfg: &ModelConfig, s: usize) -> Scratch {
        let d = cfg.d_model;
        let kv = cfg.n_kv_heads * cfg.head_dim();
        let h = cfg.mlp_hidden;
        Scratch {
            x: vec![0.0; s * d],
            normed: vec![0.0; s * d],
            q: vec![0.0; s * d],
            k: vec![0.0; s * kv],
            v: vec![0.0; s * kv],
            attn: vec![0.0; s * d],
            proj: vec![0.0; s * d],
            gate: vec![0.0; s * h],
            up: vec![0.0; s * h],
            act: vec![0.0; s * h],
        }
    }
}

impl Llada {
    /// Loads `config.json` and the safetensors of `dir`, validating every tensor against the config.
    pub fn load(dir: &Path) -> Result<Llada> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir)?;
        Self::from_store(cfg, store)
    }

    /// Builds the model from an opened checkpoint.
    pub fn from_store(cfg: ModelConfig, store: WeightStore) -> Result<Llada> {
        store.validate(&layout::llada_tensors(&cfg))?;
        let names: Vec<layout::BlockNames> = (0..cfg.n_layers).map(layout::block_names).collect();
        let norms = names
            .iter()
            .map(|n| {
                Ok(BlockNorms {
                    attn: store.get(&n.attn_norm)?.to_f32_vec(),
                    ff: store.get(&n.ff_norm)?.to_f32_vec(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = store.get(layout::LN_F)?.to_f32_vec();
        Ok(Llada {
            cfg,
            store,
            names,
            norms,
            ln_f,
        })
    }

    /// The opened checkpoint.
    pub fn store(&self) -> &WeightStore {
        &self.store
    }

    fn weight(&self, name: &str) -> Result<TensorView<'_>> {
        self.store.get(name)
    }

    fn lm_head(&self) -> Result<TensorView<'_>> {
        if self.cfg.weight_tying {
            self.weight(layout::WTE)
        } else {
            self.weight(layout::LM_HEAD)
        }
    }

    /// Checks a canvas before any compute.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("empty token sequence"));
        }
        if ids.len() > self.cfg.max_seq_len {
            return Err(Error::invalid(format!(
                "sequence of {} tokens is longer than the model's max_sequence_length {}",
                ids.len(),
                self.cfg.max_seq_len
            )));
        }
        if let Some((pos, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.cfg.embedding_size)
        {
            return Err(Error::invalid(format!(
                "token id {id} at position {pos} is outside the embedding ({} rows)",
                self.cfg.embedding_size
            )));
        }
        Ok(())
    }

    /// Runs every block and the final norm: returns `ids.len() × d_model` normalised hidden states.
    pub fn hidden(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let cfg = &self.cfg;
        let s = ids.len();
        let (d, hd) = (cfg.d_model, cfg.head_dim());
        let positions: Vec<usize> = (0..s).collect();
        let mut b = Scratch::new(cfg, s);
        cpu::embedding(&self.weight(layout::WTE)?, ids, &mut b.x)?;
        for (names, norms) in self.names.iter().zip(&self.norms) {
            cpu::rms_norm(&b.x, &norms.attn, cfg.rms_norm_eps, &mut b.normed);
            cpu::linear(&b.normed, s, &self.weight(&names.q_proj)?, &mut b.q);
            cpu::linear(&b.normed, s, &self.weight(&names.k_proj)?, &mut b.k);
            cpu::linear(&b.normed, s, &self.weight(&names.v_proj)?, &mut b.v);
            if cfg.include_qkv_bias {
                self.add_bias(&mut b.q, &names.q_bias)?;
                self.add_bias(&mut b.k, &names.k_bias)?;
                self.add_bias(&mut b.v, &names.v_bias)?;
            }
            cpu::rope(&mut b.q, &positions, cfg.n_heads, hd, cfg.rope_theta);
            cpu::rope(&mut b.k, &positions, cfg.n_kv_heads, hd, cfg.rope_theta);
            cpu::attention(&b.q, &b.k, &b.v, s, s, cfg.n_heads, cfg.n_kv_heads, hd, None, &mut b.attn);
            cpu::linear(&b.attn, s, &self.weight(&names.attn_out)?, &mut b.proj);
            cpu::add_assign(&mut b.x, &b.proj);
            cpu::rms_norm(&b.x, &norms.ff, cfg.rms_norm_eps, &mut b.normed);
            cpu::linear(&b.normed, s, &self.weight(&names.ff_proj)?, &mut b.gate);
            cpu::linear(&b.normed, s, &self.weight(&names.up_proj)?, &mut b.up);
            cpu::silu_mul(&b.gate, &b.up, &mut b.act);
            cpu::linear(&b.act, s, &self.weight(&names.ff_out)?, &mut b.proj);
            cpu::add_assign(&mut b.x, &b.proj);
        }
        let mut out = vec![0.0f32; s * d];
        cpu::rms_norm(&b.x, &self.ln_f, cfg.rms_norm_eps, &mut out);
        Ok(out)
    }

    fn add_bias(&self, x: &mut [f32], name: &str) -> Result<()> {
        let bias = self.weight(name)?.to_f32_vec();
        for row in x.chunks_exact_mut(bias.len()) {
            cpu::add_assign(row, &bias);
        }
        Ok(())
    }

    /// LM head over the given rows of normalised hidden states.
    fn logits_of_rows(&self, hidden: &[f32], rows: &[usize]) -> Result<Vec<f32>> {
        let d = self.cfg.d_model;
        let mut gathered = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            gathered.extend_from_slice(&hidden[r * d..(r + 1) * d]);
        }
        let mut logits = vec![0.0f32; rows.len() * self.cfg.logits_width()];
        cpu::linear(&gathered, rows.len(), &self.lm_head()?, &mut logits);
        Ok(logits)
    }
}

impl Model for Llada {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn backend_name(&self) -> &'static str {
        "cpu"
    }

    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let hidden = self.hidden(ids)?;
        let d = self.cfg.d_model;
        let mut logits = vec![0.0f32; ids.len() * self.cfg.logits_width()];
        cpu::linear(&hidden, hidden.len() / d, &self.lm_head()?, &mut logits);
        Ok(logits)
    }

    fn predict(&self, ids: &[u32], queries: &[usize], rule: &PredictRule) -> Result<Vec<Prediction>> {
        if let Some(&q) = queries.iter().find(|&&q| q >= ids.len()) {
            return Err(Error::invalid(format!("query position {q} is outside the canvas of {}", ids.len())));
        }
        let hidden = self.hidden(ids)?;
        let logits = self.logits_of_rows(&hidden, queries)?;
        let rows: Vec<usize> = (0..queries.len()).collect();
        Ok(predict_rows(&logits, self.cfg.logits_width(), &rows, queries, rule))
    }
}
