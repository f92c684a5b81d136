//! A deliberately naive scalar reference of the Hugging Face (Qwen2 / OLMoE) layer layout under
//! `model.layers.*`, in f64 with plain loops: Dream (q/k/v biases, grouped-query attention) and
//! LLaDA-MoE (per-head q/k RMSNorms, a softmax-routed mixture of SwiGLU experts). It reads a
//! checkpoint through the tests' own safetensors reader ([`super::checkpoint`]); the config
//! decides the parts: q/k/v biases for Dream (`model_type` "Dream"), q/k head norms with
//! `qk_layernorm`, experts with `num_experts`. A part whose tensor is missing panics.

use super::checkpoint::{read_checkpoint, read_config, Tensors};
use dllm::denoise::{generation_canvas, GenerationParams, Session};
use dllm::model::Model;
use serde_json::Value;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Deliberate mistakes, to show that the comparisons can tell them apart.
#[derive(Clone, Copy, Default)]
pub struct Faults {
    /// Query head `h` reads KV head `h % n_kv` instead of `h / group`.
    pub interleaved_gqa: bool,
    /// The q/k head norms are skipped.
    pub no_qk_norm: bool,
    /// The top-k expert weights are renormalised to sum to 1 (`norm_topk_prob`, which the
    /// reference LLaDA-MoE forward ignores).
    pub renormalised_experts: bool,
}

pub struct Naive {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    /// The SwiGLU's hidden size (each expert's, with experts).
    inter: usize,
    vocab: usize,
    eps: f64,
    theta: f64,
    tied: bool,
    /// `(num_experts, num_experts_per_tok)` of a mixture of experts.
    experts: Option<(usize, usize)>,
    /// q/k/v biases (Dream).
    qkv_bias: bool,
    /// Per-head q/k RMSNorms (`qk_layernorm`).
    qk_norm: bool,
    /// The smallest gap between a row's last chosen and first unchosen expert probability seen
    /// so far: a routing decision closer than rounding could go either way in the engine.
    pub min_route_gap: Cell<f64>,
    w: BTreeMap<String, Vec<f64>>,
}

impl Naive {
    pub fn new(config: &Value, tensors: &Tensors) -> Naive {
        let u = |k: &str| config[k].as_u64().unwrap() as usize;
        let experts = config["num_experts"]
            .as_u64()
            .map(|n| (n as usize, u("num_experts_per_tok")));
        Naive {
            hidden: u("hidden_size"),
            heads: u("num_attention_heads"),
            kv_heads: u("num_key_value_heads"),
            layers: u("num_hidden_layers"),
            inter: u(if experts.is_some() {
                "expert_intermediate_size"
            } else {
                "intermediate_size"
            }),
            experts,
            qkv_bias: config["model_type"].as_str() == Some("Dream"),
            qk_norm: config["qk_layernorm"].as_bool() == Some(true),
            min_route_gap: Cell::new(f64::INFINITY),
            vocab: u("vocab_size"),
            eps: config["rms_norm_eps"].as_f64().unwrap(),
            theta: config["rope_theta"].as_f64().unwrap(),
            tied: config["tie_word_embeddings"].as_bool().unwrap(),
            w: tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.values()))
                .collect(),
        }
    }

    pub fn from_dir(dir: &Path) -> Naive {
        Naive::new(&read_config(dir), &read_checkpoint(dir))
    }

    fn t(&self, name: &str) -> &[f64] {
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("reference: no tensor {name}"))
    }

    /// `w` is `[out, inp]` row-major: y[o] = Σ_i w[o·inp + i] x[i] (+ b[o] when the model has
    /// q/k/v biases).
    fn matvec(&self, name: &str, bias: Option<&str>, x: &[f64], out_dim: usize) -> Vec<f64> {
        let w = self.t(name);
        let inp = x.len();
        assert_eq!(w.len(), out_dim * inp, "{name}");
        let mut y = vec![0.0; out_dim];
        for o in 0..out_dim {
            let mut acc = 0.0;
            for i in 0..inp {
                acc += w[o * inp + i] * x[i];
            }
            if let Some(b) = bias.filter(|_| self.qkv_bias) {
                acc += self.t(b)[o];
            }
            y[o] = acc;
        }
        y
    }

    fn rms_norm(&self, x: &[f64], name: &str) -> Vec<f64> {
        let w = self.t(name);
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + self.eps).sqrt();
        x.iter().zip(w).map(|(v, g)| v * r * g).collect()
    }

    /// Rotate-half RoPE on one head vector at `pos`.
    fn rope(&self, v: &mut [f64], pos: usize) {
        let hd = v.len();
        let half = hd / 2;
        for j in 0..half {
            let freq = self.theta.powf(-(2.0 * j as f64) / hd as f64);
            let (s, c) = (pos as f64 * freq).sin_cos();
            let (a, b) = (v[j], v[j + half]);
            v[j] = a * c - b * s;
            v[j + half] = b * c + a * s;
        }
    }

    /// Greedy decoding's next commit on `canvas`: over masked positions `p`, the token
    /// maximising the softmax of raw row `p` (`p − 1` when `shifted`; the mask excluded), at the
    /// position where that probability is largest. `(position, token, probability)`.
    pub fn greedy_choice(&self, canvas: &[u32], mask: u32, shifted: bool) -> (usize, u32, f64) {
        let rows = self.raw_logits(canvas, Faults::default());
        let mut best = (0usize, 0u32, f64::NEG_INFINITY);
        for p in (0..canvas.len()).filter(|&p| canvas[p] == mask) {
            let row = &rows[if shifted { p.saturating_sub(1) } else { p }];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
            let (tok, l) = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != mask as usize)
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (j, &x)| if x > b.1 { (j, x) } else { b },
                );
            let conf = (l - max).exp() / z;
            if conf > best.2 {
                best = (p, tok as u32, conf);
            }
        }
        best
    }

    /// `down(silu(gate(m)) · up(m))` with the projections under `prefix`.
    fn swiglu(&self, prefix: &str, m: &[f64]) -> Vec<f64> {
        let w = |n: &str| format!("{prefix}.{n}.weight");
        let g = self.matvec(&w("gate_proj"), None, m, self.inter);
        let u = self.matvec(&w("up_proj"), None, m, self.inter);
        let a: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        self.matvec(&w("down_proj"), None, &a, self.hidden)
    }

    /// The mixture under `prefix`: softmax over the router's `n` logits, the `k` most probable
    /// experts, their SwiGLUs weighted by those probabilities.
    fn mixture(&self, prefix: &str, n: usize, k: usize, m: &[f64], faults: Faults) -> Vec<f64> {
        let logits = self.matvec(&format!("{prefix}.gate.weight"), None, m, n);
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let probs: Vec<f64> = logits.iter().map(|l| (l - max).exp() / z).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap());
        if k < n {
            let gap = probs[order[k - 1]] - probs[order[k]];
            self.min_route_gap.set(self.min_route_gap.get().min(gap));
        }
        let chosen = &order[..k];
        let total: f64 = chosen.iter().map(|&e| probs[e]).sum();
        let mut out = vec![0.0; self.hidden];
        for &e in chosen {
            let weight = if faults.renormalised_experts {
                probs[e] / total
            } else {
                probs[e]
            };
            let y = self.swiglu(&format!("{prefix}.experts.{e}"), m);
            for (o, v) in out.iter_mut().zip(&y) {
                *o += weight * v;
            }
        }
        out
    }

    /// Unshifted logits: one row per position, the LM head at that position.
    pub fn raw_logits(&self, ids: &[u32], faults: Faults) -> Vec<Vec<f64>> {
        let (d, nh, nkv) = (self.hidden, self.heads, self.kv_heads);
        let hd = d / nh;
        let s = ids.len();
        let emb = self.t("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .map(|&id| emb[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        for l in 0..self.layers {
            let p = |n: &str| format!("model.layers.{l}.{n}");
            let mut q = Vec::new();
            let mut k = Vec::new();
            let mut v = Vec::new();
            for xi in &x {
                let n = self.rms_norm(xi, &p("input_layernorm.weight"));
                q.push(self.matvec(
                    &p("self_attn.q_proj.weight"),
                    Some(&p("self_attn.q_proj.bias")),
                    &n,
                    nh * hd,
                ));
                k.push(self.matvec(
                    &p("self_attn.k_proj.weight"),
                    Some(&p("self_attn.k_proj.bias")),
                    &n,
                    nkv * hd,
                ));
                v.push(self.matvec(
                    &p("self_attn.v_proj.weight"),
                    Some(&p("self_attn.v_proj.bias")),
                    &n,
                    nkv * hd,
                ));
            }
            let (qn, kn) = (p("self_attn.q_norm.weight"), p("self_attn.k_norm.weight"));
            if self.qk_norm && !faults.no_qk_norm {
                for i in 0..s {
                    for h in 0..nh {
                        let head = self.rms_norm(&q[i][h * hd..(h + 1) * hd], &qn);
                        q[i][h * hd..(h + 1) * hd].copy_from_slice(&head);
                    }
                    for h in 0..nkv {
                        let head = self.rms_norm(&k[i][h * hd..(h + 1) * hd], &kn);
                        k[i][h * hd..(h + 1) * hd].copy_from_slice(&head);
                    }
                }
            }
            for i in 0..s {
                for h in 0..nh {
                    self.rope(&mut q[i][h * hd..(h + 1) * hd], i);
                }
                for h in 0..nkv {
                    self.rope(&mut k[i][h * hd..(h + 1) * hd], i);
                }
            }
            let group = nh / nkv;
            for i in 0..s {
                let mut attn = vec![0.0; nh * hd];
                for h in 0..nh {
                    let kvh = if faults.interleaved_gqa {
                        h % nkv
                    } else {
                        h / group
                    };
                    let mut scores = vec![0.0; s];
                    for (j, sc) in scores.iter_mut().enumerate() {
                        let mut dot = 0.0;
                        for t in 0..hd {
                            dot += q[i][h * hd + t] * k[j][kvh * hd + t];
                        }
                        *sc = dot / (hd as f64).sqrt();
                    }
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|sc| (sc - max).exp()).sum();
                    for (j, sc) in scores.iter().enumerate() {
                        let pj = (sc - max).exp() / z;
                        for t in 0..hd {
                            attn[h * hd + t] += pj * v[j][kvh * hd + t];
                        }
                    }
                }
                let o = self.matvec(&p("self_attn.o_proj.weight"), None, &attn, d);
                for t in 0..d {
                    x[i][t] += o[t];
                }
            }
            for xi in x.iter_mut() {
                let m = self.rms_norm(xi, &p("post_attention_layernorm.weight"));
                let out = match self.experts {
                    None => self.swiglu(&p("mlp"), &m),
                    Some((n, k)) => self.mixture(&p("mlp"), n, k, &m, faults),
                };
                for t in 0..d {
                    xi[t] += out[t];
                }
            }
        }
        let head = if self.tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        x.iter()
            .map(|xi| {
                let n = self.rms_norm(xi, "model.norm.weight");
                self.matvec(head, None, &n, self.vocab)
            })
            .collect()
    }
}

// Comparisons.

/// ‖a − b‖ / ‖b‖ over rows of `a` (flat, `width` wide) against rows of `b`.
pub fn rel_l2(a: &[f32], b: &[Vec<f64>]) -> f64 {
    let width = b[0].len();
    assert_eq!(a.len(), b.len() * width);
    let (mut num, mut den) = (0.0, 0.0);
    for (ra, rb) in a.chunks_exact(width).zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            num += (*x as f64 - y).powi(2);
            den += y * y;
        }
    }
    (num / den).sqrt()
}

/// The largest per-row relative error (‖row error‖ / ‖row‖).
pub fn worst_row(a: &[f32], b: &[Vec<f64>]) -> f64 {
    let width = b[0].len();
    a.chunks_exact(width)
        .zip(b)
        .map(|(ra, rb)| rel_l2(ra, std::slice::from_ref(rb)))
        .fold(0.0, f64::max)
}

/// Greedy denoising of `prompt` + 6 masks on `model`, one commit per step: each step commits
/// `naive`'s choice ([`Naive::greedy_choice`], from row `p − 1` for position `p` when `shifted`).
pub fn assert_greedy_session_follows(
    model: Arc<dyn Model>,
    naive: &Naive,
    prompt: &[u32],
    shifted: bool,
) {
    let mask = model.config().mask_token_id;
    let gen = 6;
    let canvas = generation_canvas(prompt, gen, mask);
    let params = GenerationParams {
        steps: gen,
        block_len: gen,
        ..GenerationParams::default()
    };
    let mut session = Session::new(model, canvas.clone(), params).unwrap();
    let mut before = canvas;
    while !session.is_done() {
        let best = naive.greedy_choice(&before, mask, shifted);
        let info = session.step().unwrap();
        assert_eq!(info.committed, vec![best.0], "step {}", info.step);
        assert_eq!(session.canvas()[best.0], best.1, "step {}", info.step);
        before = session.canvas().to_vec();
    }
    assert_eq!(session.masks_left(), 0);
}
