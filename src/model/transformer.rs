//! The pre-norm transformer shared by LLaDA, Dream and LLaDA-MoE: a per-architecture table of
//! tensor names ([`TensorTable`]) and the CPU forward pass over it ([`CpuTransformer`]).
//!
//! Every architecture runs the same math under different names:
//! ```text
//! x  = embed[ids]
//! per block:  n = attn_norm(x);  q, k, v = q(n) + q_bias, k(n) + k_bias, v(n) + v_bias   (biases optional)
//!             q, k = q_norm(q), k_norm(k)         (RMSNorm of each head; optional)
//!             x = x + o(SDPA(rope(q), rope(k), v, non-causal, grouped-query heads))
//!             m = mlp_norm(x);   x = x + ffn(m)   (one SwiGLU down(silu(gate(m)) * up(m)), or a
//!                                                   mixture of them: crate::model::experts)
//! raw logits = lm_head(final_norm(x))      (lm_head = embed when tied)
//! ```
//! Weights stay in the memory mapping (bf16/f16/f32); every op computes in fp32
//! (`backend::cpu`). Norm weights and biases are converted to fp32 once at load.
//!
//! Architectures with [`ModelConfig::shifted_logits`] (Dream) predict position `i` from the
//! output at `i − 1`: [`CpuTransformer::forward`] returns `cat(raw[:1], raw[:-1])` so that row
//! `i` predicts position `i` for every architecture, and [`CpuTransformer::predict`] runs the LM
//! head on hidden row `max(i − 1, 0)` for query `i`. [`CpuTransformer::raw_forward`] gives the
//! unshifted rows (what the reference PyTorch `model(ids).logits` returns).
//!
//! [`CpuTransformer::logits_cached`] runs the same layers through a block K/V cache
//! ([`crate::model::kv_cache`]): a refresh over the whole canvas that stores every layer's K/V, or
//! only a span of rows that writes its K/V into the cache and attends to all cached positions.
//! [`CpuTransformer::predict_cached_packed`] stacks several canvases' spans into one forward
//! (every product over all their rows, attention per canvas against its own cache).

use crate::backend::cpu;
use crate::config::{Arch, ModelConfig};
use crate::denoise::predict::{predict_query_rows, PredictRule, Prediction};
use crate::error::{Error, Result};
use crate::model::experts::{Mixture, MixtureBuffers, SwiGlu, SwiGluBuffers};
use crate::model::kv_cache::{CacheStep, KvCache};
use crate::model::{check_queries, BatchQuery, CachedQuery, Model};
use crate::weights::{TensorSpec, TensorView, WeightStore};
use std::ops::Range;

/// How a tensor is used, which decides how `dllm synth` initialises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Linear,
    Bias,
    Norm,
}

/// The checkpoint names of one SwiGLU's projections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwiGluTensors {
    /// SwiGLU gate (silu is applied to it), `[hidden, d_model]`.
    pub gate: String,
    /// SwiGLU value branch, `[hidden, d_model]`.
    pub up: String,
    /// Down projection, `[d_model, hidden]`.
    pub down: String,
}

/// A block's feed-forward: one SwiGLU, or a mixture of experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedForward {
    Dense(SwiGluTensors),
    /// The router, `[n_experts, d_model]`, and each expert's SwiGLU
    /// ([`crate::config::Experts`]).
    Experts {
        router: String,
        experts: Vec<SwiGluTensors>,
    },
}

/// The checkpoint names of one block's tensors, in architecture-neutral terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTensors {
    pub q: String,
    pub k: String,
    pub v: String,
    /// Attention output projection.
    pub o: String,
    /// The feed-forward after the attention.
    pub ffn: FeedForward,
    /// RMSNorm before attention.
    pub attn_norm: String,
    /// RMSNorm before the MLP.
    pub mlp_norm: String,
    /// q/k/v biases `(q, k, v)`, when the architecture has them.
    pub qkv_bias: Option<(String, String, String)>,
    /// The RMSNorms of each query and key head `(q, k)`, `[head_dim]`, when the architecture
    /// has them ([`ModelConfig::qk_norm`]).
    pub qk_norm: Option<(String, String)>,
}

/// Every tensor name of one checkpoint, for one architecture and config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorTable {
    /// Token embedding, `[embedding_size, d_model]`.
    pub embedding: String,
    /// Final RMSNorm, `[d_model]`.
    pub final_norm: String,
    /// LM head, `[embedding_size, d_model]`; `None` when tied to the embedding.
    pub lm_head: Option<String>,
    pub blocks: Vec<BlockTensors>,
}

impl TensorTable {
    /// Every tensor with its shape under `cfg` and its role, in checkpoint order: embedding,
    /// each block (q, k, v, (q/k/v biases), o, (router), gate, up, down (of each expert),
    /// attn_norm, mlp_norm, (q/k norms)), final norm, LM head.
    pub fn roles(&self, cfg: &ModelConfig) -> Vec<(TensorSpec, Role)> {
        let d = cfg.d_model;
        let kv = cfg.n_kv_heads * cfg.head_dim();
        let h = cfg.mlp_hidden;
        let e = cfg.embedding_size;
        let mut out = vec![(
            TensorSpec::new(&self.embedding, vec![e, d]),
            Role::Embedding,
        )];
        let swiglu = |t: &SwiGluTensors, out: &mut Vec<(TensorSpec, Role)>| {
            out.push((TensorSpec::new(&t.gate, vec![h, d]), Role::Linear));
            out.push((TensorSpec::new(&t.up, vec![h, d]), Role::Linear));
            out.push((TensorSpec::new(&t.down, vec![d, h]), Role::Linear));
        };
        for b in &self.blocks {
            out.push((TensorSpec::new(&b.q, vec![d, d]), Role::Linear));
            out.push((TensorSpec::new(&b.k, vec![kv, d]), Role::Linear));
            out.push((TensorSpec::new(&b.v, vec![kv, d]), Role::Linear));
            if let Some((qb, kb, vb)) = &b.qkv_bias {
                out.push((TensorSpec::new(qb, vec![d]), Role::Bias));
                out.push((TensorSpec::new(kb, vec![kv]), Role::Bias));
                out.push((TensorSpec::new(vb, vec![kv]), Role::Bias));
            }
            out.push((TensorSpec::new(&b.o, vec![d, d]), Role::Linear));
            match &b.ffn {
                FeedForward::Dense(t) => swiglu(t, &mut out),
                FeedForward::Experts { router, experts } => {
                    out.push((
                        TensorSpec::new(router, vec![experts.len(), d]),
                        Role::Linear,
                    ));
                    for t in experts {
                        swiglu(t, &mut out);
                    }
                }
            }
            out.push((TensorSpec::new(&b.attn_norm, vec![d]), Role::Norm));
            out.push((TensorSpec::new(&b.mlp_norm, vec![d]), Role::Norm));
            if let Some((qn, kn)) = &b.qk_norm {
                let hd = cfg.head_dim();
                out.push((TensorSpec::new(qn, vec![hd]), Role::Norm));
                out.push((TensorSpec::new(kn, vec![hd]), Role::Norm));
            }
        }
        out.push((TensorSpec::new(&self.final_norm, vec![d]), Role::Norm));
        if let Some(head) = &self.lm_head {
            out.push((TensorSpec::new(head, vec![e, d]), Role::Linear));
        }
        out
    }

    /// Every tensor the checkpoint must hold, with its shape.
    pub fn specs(&self, cfg: &ModelConfig) -> Vec<TensorSpec> {
        self.roles(cfg).into_iter().map(|(s, _)| s).collect()
    }
}

/// The fp32 copies of one block's small tensors.
struct BlockParams {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    /// `(q, k, v)` biases.
    qkv_bias: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    /// `(q, k)` per-head norms.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

/// A transformer of any supported architecture on the CPU.
pub struct CpuTransformer {
    cfg: ModelConfig,
    store: WeightStore,
    table: TensorTable,
    blocks: Vec<BlockParams>,
    final_norm: Vec<f32>,
    /// Whether products round their activations to bf16 for `vdpbf16ps`
    /// ([`CpuTransformer::set_bf16_activations`]).
    bf16_activations: bool,
}

/// The environment switch of [`CpuTransformer::set_bf16_activations`]: `DLLM_CPU_BF16=1` turns
/// bf16 activations on for every CPU model loaded afterwards.
pub const BF16_ACTIVATIONS_ENV: &str = "DLLM_CPU_BF16";

/// Whether [`BF16_ACTIVATIONS_ENV`] asks for bf16 activations (it is `1`).
pub fn bf16_activations_from_env() -> bool {
    crate::backend::cuda::env_switch::flag(BF16_ACTIVATIONS_ENV, false)
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
    /// Router logits of a mixture of experts (empty without one).
    router: Vec<f32>,
}

impl Scratch {
    /// The buffers of `s` rows; [`Error::OutOfMemory`] (nothing allocated) when they would not
    /// fit in the host's available memory.
    fn new(cfg: &ModelConfig, s: usize) -> Result<Scratch> {
        let d = cfg.d_model;
        let kv = cfg.n_kv_heads * cfg.head_dim();
        let h = cfg.mlp_hidden;
        let experts = cfg.experts.map_or(0, |x| x.n_experts);
        // Its eleven buffers, and the normed output `hidden_rows` allocates while they live.
        let floats = s as u64 * (6 * d + 2 * kv + 3 * h + experts) as u64;
        crate::memory::check_host_fits(&format!("the activations of {s} rows"), 4 * floats)?;
        Ok(Scratch {
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
            router: vec![0.0; s * experts],
        })
    }
}

/// A zeroed logits buffer of `rows` rows of `width`, after checking it fits in the host's memory.
fn logits_buffer(rows: usize, width: usize) -> Result<Vec<f32>> {
    crate::memory::check_host_fits(
        &format!("the logits of {rows} rows"),
        4 * rows as u64 * width as u64,
    )?;
    Ok(vec![0.0f32; rows * width])
}

/// Checks that `table` names the tensors `cfg` describes: its layers, LM head, q/k norms and
/// experts.
fn check_table_matches(cfg: &ModelConfig, table: &TensorTable) -> Result<()> {
    let key = |k| cfg.arch.config_key(k);
    if table.blocks.len() != cfg.n_layers {
        return Err(Error::config(
            key("n_layers"),
            format!(
                "{} layers, but the tensor table names {}",
                cfg.n_layers,
                table.blocks.len()
            ),
        ));
    }
    if table.lm_head.is_none() != cfg.weight_tying {
        return Err(Error::config(
            key("weight_tying"),
            "disagrees with the tensor table's LM head",
        ));
    }
    for b in &table.blocks {
        if b.qk_norm.is_some() != cfg.qk_norm {
            return Err(Error::config(
                "qk_layernorm",
                "disagrees with the tensor table's q/k norms",
            ));
        }
        let experts = match &b.ffn {
            FeedForward::Dense(_) => None,
            FeedForward::Experts { experts, .. } => Some(experts.len()),
        };
        if experts != cfg.experts.map(|x| x.n_experts) {
            return Err(Error::config(
                "num_experts",
                "disagrees with the tensor table's experts",
            ));
        }
    }
    Ok(())
}

/// RMSNorm of every head of `x` (rows of `weight.len()`) in place, through `tmp`.
fn norm_heads(x: &mut [f32], weight: &[f32], eps: f32, tmp: &mut [f32]) {
    let tmp = &mut tmp[..x.len()];
    cpu::rms_norm(x, weight, eps, tmp);
    x.copy_from_slice(tmp);
}

/// Adds `bias` to every row of `x`.
fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        cpu::add_assign(row, bias);
    }
}

/// Where a layer's attention reads its keys and values.
enum Attend<'c> {
    /// The rows' own K/V (a full forward).
    Local,
    /// The rows' own K/V, also written into the cache (a refresh over the whole canvas).
    Store(&'c mut KvCache),
    /// Cached spans, one per canvas, packed one after another: each span's K/V are written into
    /// its canvas's cache at its positions, and its rows attend to that whole cached canvas.
    Spans(Vec<SpanRows<'c>>),
    /// Several canvases packed one after another (each range is one canvas's rows): positions
    /// restart at 0 in each, attention stays inside each; the linear layers run over all rows.
    Packed(&'c [Range<usize>]),
}

/// One canvas's span in [`Attend::Spans`].
struct SpanRows<'c> {
    cache: &'c mut KvCache,
    /// The span's rows in the packed forward.
    rows: Range<usize>,
    /// The span's first position in its canvas.
    start: usize,
    /// The canvas's length: the keys its rows attend to.
    keys: usize,
}

/// A validated cached step of one canvas ([`CpuTransformer::check_cached`]).
struct CachedPlan {
    /// The rows the step computes: the whole canvas for a refresh.
    span: Range<usize>,
    /// Each query's source row, relative to the span.
    sources: Vec<usize>,
}

impl CpuTransformer {
    /// Builds the model from an opened checkpoint, validating every tensor of `table` (presence,
    /// shape, dtype) against `cfg`; errors name the tensor.
    pub fn new(cfg: ModelConfig, store: WeightStore, table: TensorTable) -> Result<CpuTransformer> {
        check_table_matches(&cfg, &table)?;
        store.validate(&table.specs(&cfg))?;
        let f32s = |name: &str| Ok::<_, Error>(store.get(name)?.to_f32_vec());
        let blocks = table
            .blocks
            .iter()
            .map(|b| {
                Ok(BlockParams {
                    attn_norm: f32s(&b.attn_norm)?,
                    mlp_norm: f32s(&b.mlp_norm)?,
                    qkv_bias: match &b.qkv_bias {
                        Some((q, k, v)) => Some((f32s(q)?, f32s(k)?, f32s(v)?)),
                        None => None,
                    },
                    qk_norm: match &b.qk_norm {
                        Some((q, k)) => Some((f32s(q)?, f32s(k)?)),
                        None => None,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = f32s(&table.final_norm)?;
        let mut model = CpuTransformer {
            cfg,
            store,
            table,
            blocks,
            final_norm,
            bf16_activations: false,
        };
        model.set_bf16_activations(bf16_activations_from_env());
        Ok(model)
    }

    /// [`CpuTransformer::new`] over the tensor table of `cfg`'s architecture
    /// ([`crate::model::tensor_table`]), after checking that it is `want` (the caller's model
    /// type).
    pub fn of_arch(want: Arch, cfg: ModelConfig, store: WeightStore) -> Result<CpuTransformer> {
        if cfg.arch != want {
            return Err(Error::invalid(format!(
                "a {} config given to the {} model",
                cfg.arch.name(),
                want.name()
            )));
        }
        let table = crate::model::tensor_table(&cfg);
        CpuTransformer::new(cfg, store, table)
    }

    /// Rounds every product's activations to bf16 (`on`) or keeps them f32 (the default, the
    /// reference the CUDA kernels are tested against). With bf16 activations, products with
    /// bf16 weights run `vdpbf16ps` ([`cpu::linear_skinny_bf16`]: 1.3–1.6× the f32 products'
    /// rate on a Zen 4 core), like the CUDA backend's bf16 GEMMs; norms, attention, the
    /// residual and every sum stay f32. Only where the CPU has AVX-512 BF16: elsewhere this
    /// keeps f32 and returns false. A row still has the same bits alone, packed in a batch and
    /// narrowed, whatever the thread count.
    pub fn set_bf16_activations(&mut self, on: bool) -> bool {
        self.bf16_activations = on && cpu::skinny_bf16_available();
        self.bf16_activations
    }

    /// Whether products round their activations to bf16 ([`CpuTransformer::set_bf16_activations`]).
    pub fn bf16_activations(&self) -> bool {
        self.bf16_activations
    }

    /// The product of every layer and the LM head of a forward of `rows` rows attending as
    /// `attend` says: cached spans decide by their longest span ([`CpuTransformer::product`]).
    fn forward_product(&self, attend: &Attend, rows: usize) -> Product {
        match attend {
            Attend::Spans(segs) => {
                let longest = segs.iter().map(|g| g.rows.len()).max().unwrap_or(0);
                self.product(true, longest)
            }
            _ => self.product(false, rows),
        }
    }

    /// The product of a forward whose canvases contribute up to `rows` rows each, cached span
    /// or not ([`span_product`]; [`bf16_product`] with bf16 activations).
    fn product(&self, cached: bool, rows: usize) -> Product {
        if self.bf16_activations {
            bf16_product
        } else {
            span_product(cached, rows)
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The opened checkpoint.
    pub fn store(&self) -> &WeightStore {
        &self.store
    }

    /// The tensor names this model reads.
    pub fn table(&self) -> &TensorTable {
        &self.table
    }

    fn weight(&self, name: &str) -> Result<TensorView<'_>> {
        self.store.get(name)
    }

    fn lm_head(&self) -> Result<TensorView<'_>> {
        self.weight(
            self.table
                .lm_head
                .as_deref()
                .unwrap_or(&self.table.embedding),
        )
    }

    /// Checks a canvas before any compute ([`crate::model::check_ids`]).
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        crate::model::check_ids(&self.cfg, ids)
    }

    /// Runs every block and the final norm: returns `ids.len() × d_model` normalised hidden states
    /// (row `i` = position `i`, before any logits shift).
    pub fn hidden(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.hidden_rows(ids, 0..ids.len(), Attend::Local, None)
    }

    /// The normalised hidden states of the rows of `ids` (`span` is `0..ids.len()`), the keys
    /// and values of its rows as `attend` says: one canvas ([`Attend::Local`],
    /// [`Attend::Store`]), several canvases stacked ([`Attend::Packed`]), or cached spans of
    /// several canvases stacked ([`Attend::Spans`], whose segments carry their positions).
    /// `ids` is checked.
    ///
    /// `keep` (ascending, distinct, relative to `span`) names the rows whose hidden states the
    /// caller reads: then the last layer computes keys and values for every row (the cache and
    /// the attention need them) but its queries, attention output, MLP and the final norm only
    /// for those rows, and the result holds `keep.len()` rows in `keep`'s order. The kept rows'
    /// values are the same as without `keep` (every step after the keys and values is per row,
    /// and an uncached forward's products do not depend on the row count:
    /// [`cpu::linear_row_invariant`]).
    /// `None`: every row, `span.len() × d_model`.
    fn hidden_rows(
        &self,
        ids: &[u32],
        span: Range<usize>,
        mut attend: Attend,
        keep: Option<&[usize]>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (n, s) = (ids.len(), span.len());
        debug_assert!(span.end <= n);
        debug_assert!(span == (0..n));
        debug_assert!(
            !matches!(attend, Attend::Packed(segs) if segs.iter().map(|r| r.len()).sum::<usize>() != n)
        );
        debug_assert!(
            keep.is_none_or(|k| k.windows(2).all(|w| w[0] < w[1]) && k.iter().all(|&r| r < s))
        );
        let (d, hd) = (cfg.d_model, cfg.head_dim());
        let (qw, kw) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let positions: Vec<usize> = match &attend {
            Attend::Packed(segs) => segs.iter().flat_map(|r| 0..r.len()).collect(),
            Attend::Spans(segs) => segs
                .iter()
                .flat_map(|g| g.start..g.start + g.rows.len())
                .collect(),
            _ => span.clone().collect(),
        };
        // A canvas's rows are as many alone as they are a part of a packed batch, and the
        // narrowed rows fewer still: every product must not depend on its row count
        // (`span_product`).
        let linear = self.forward_product(&attend, s);
        let mut b = Scratch::new(cfg, s)?;
        cpu::embedding(
            &self.weight(&self.table.embedding)?,
            &ids[span.clone()],
            &mut b.x,
        )?;
        let per_canvas = matches!(attend, Attend::Packed(_) | Attend::Spans(_));
        let n_layers = self.blocks.len();
        // Attention of the query rows `q` (as many as `out` holds) over `keys` keys and values.
        let attend_rows = |q: &[f32], k: &[f32], v: &[f32], keys: usize, out: &mut [f32]| {
            let rows = q.len() / qw;
            cpu::attention(
                q,
                k,
                v,
                rows,
                keys,
                cfg.n_heads,
                cfg.n_kv_heads,
                hd,
                None,
                out,
            );
        };
        // Rows the query side (attention output onwards) runs on: all `s` until the last layer
        // narrows them to `keep`.
        let mut m = s;
        let mut q_positions = positions.clone();
        for (layer, (names, p)) in self.table.blocks.iter().zip(&self.blocks).enumerate() {
            let narrow = keep.filter(|k| layer + 1 == n_layers && k.len() < s);
            cpu::rms_norm(&b.x, &p.attn_norm, cfg.rms_norm_eps, &mut b.normed);
            linear(&b.normed, s, &self.weight(&names.k)?, &mut b.k);
            linear(&b.normed, s, &self.weight(&names.v)?, &mut b.v);
            if let Some(rows) = narrow {
                // The kept rows of the normed input (into `proj`, free until the output
                // projection) and of the residual (compacted in place: rows ascend).
                m = rows.len();
                for (i, &r) in rows.iter().enumerate() {
                    b.proj[i * d..(i + 1) * d].copy_from_slice(&b.normed[r * d..(r + 1) * d]);
                    b.x.copy_within(r * d..(r + 1) * d, i * d);
                }
                q_positions = rows.iter().map(|&r| positions[r]).collect();
                linear(
                    &b.proj[..m * d],
                    m,
                    &self.weight(&names.q)?,
                    &mut b.q[..m * qw],
                );
            } else {
                linear(&b.normed, s, &self.weight(&names.q)?, &mut b.q);
            }
            if let Some((qb, kb, vb)) = &p.qkv_bias {
                add_bias(&mut b.q[..m * qw], qb);
                add_bias(&mut b.k, kb);
                add_bias(&mut b.v, vb);
            }
            if let Some((qn, kn)) = &p.qk_norm {
                let eps = cfg.rms_norm_eps;
                norm_heads(&mut b.q[..m * qw], qn, eps, &mut b.attn);
                norm_heads(&mut b.k, kn, eps, &mut b.attn);
            }
            cpu::rope(
                &mut b.q[..m * qw],
                &q_positions,
                cfg.n_heads,
                hd,
                cfg.rope_theta,
            );
            cpu::rope(&mut b.k, &positions, cfg.n_kv_heads, hd, cfg.rope_theta);
            // The query rows of canvas rows `r` (all of them, or the kept ones among them).
            let query_rows = |r: &Range<usize>| match narrow {
                None => r.clone(),
                Some(rows) => {
                    rows.partition_point(|&x| x < r.start)..rows.partition_point(|&x| x < r.end)
                }
            };
            let (keys, values, skv) = match &mut attend {
                Attend::Packed(segs) => {
                    for r in segs.iter() {
                        let qr = query_rows(r);
                        attend_rows(
                            &b.q[qr.start * qw..qr.end * qw],
                            &b.k[r.start * kw..r.end * kw],
                            &b.v[r.start * kw..r.end * kw],
                            r.len(),
                            &mut b.attn[qr.start * qw..qr.end * qw],
                        );
                    }
                    (&b.k[..0], &b.v[..0], 0)
                }
                Attend::Local => (&b.k[..], &b.v[..], s),
                Attend::Store(cache) => {
                    cache.write(layer, 0, &b.k, &b.v);
                    (&b.k[..], &b.v[..], s)
                }
                Attend::Spans(segs) => {
                    for g in segs.iter_mut() {
                        let (r, qr) = (g.rows.clone(), query_rows(&g.rows));
                        g.cache.write(
                            layer,
                            g.start,
                            &b.k[r.start * kw..r.end * kw],
                            &b.v[r.start * kw..r.end * kw],
                        );
                        let (k, v) = g.cache.layer(layer);
                        attend_rows(
                            &b.q[qr.start * qw..qr.end * qw],
                            k,
                            v,
                            g.keys,
                            &mut b.attn[qr.start * qw..qr.end * qw],
                        );
                    }
                    (&b.k[..0], &b.v[..0], 0)
                }
            };
            if !per_canvas {
                attend_rows(&b.q[..m * qw], keys, values, skv, &mut b.attn[..m * qw]);
            }
            let (x, normed, proj) = (
                &mut b.x[..m * d],
                &mut b.normed[..m * d],
                &mut b.proj[..m * d],
            );
            linear(&b.attn[..m * qw], m, &self.weight(&names.o)?, proj);
            cpu::add_assign(x, proj);
            cpu::rms_norm(x, &p.mlp_norm, cfg.rms_norm_eps, normed);
            let mut swiglu = SwiGluBuffers {
                gate: &mut b.gate,
                up: &mut b.up,
                act: &mut b.act,
            };
            match &names.ffn {
                FeedForward::Dense(t) => {
                    SwiGlu::open(&self.store, t)?.run(normed, m, linear, &mut swiglu, proj)
                }
                FeedForward::Experts { router, experts } => {
                    let per_row = cfg.experts.map_or(0, |x| x.experts_per_token);
                    let mixture = Mixture::open(&self.store, router, experts, per_row)?;
                    // The attention's input and output buffers are free until the next layer.
                    let mut buf = MixtureBuffers {
                        swiglu,
                        rows: &mut b.attn,
                        y: &mut b.q,
                        logits: &mut b.router,
                    };
                    mixture.run(normed, m, d, linear, &mut buf, proj);
                }
            }
            cpu::add_assign(x, proj);
        }
        let mut out = vec![0.0f32; m * d];
        cpu::rms_norm(&b.x[..m * d], &self.final_norm, cfg.rms_norm_eps, &mut out);
        Ok(out)
    }

    /// The distinct rows of `sources`, ascending, and each source's index among them: the `keep`
    /// of [`CpuTransformer::hidden_rows`] and the rows of its result to read.
    fn kept_rows(sources: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let mut keep = sources.to_vec();
        keep.sort_unstable();
        keep.dedup();
        let index = sources
            .iter()
            .map(|r| keep.partition_point(|&x| x < *r))
            .collect();
        (keep, index)
    }

    /// The LM head over the hidden states of the span rows `sources` (relative to `span`, may
    /// repeat): one forward whose last layer runs only those rows ([`CpuTransformer::hidden_rows`]).
    fn logits_of_sources(
        &self,
        ids: &[u32],
        span: Range<usize>,
        attend: Attend,
        sources: &[usize],
    ) -> Result<Vec<f32>> {
        let (keep, index) = Self::kept_rows(sources);
        let head = self.forward_product(&attend, span.len());
        let hidden = self.hidden_rows(ids, span, attend, Some(&keep))?;
        self.logits_of_rows(&hidden, &index, head)
    }

    /// Logits of `queries` through `cache` (see [`crate::model::kv_cache`]): a refresh is the full
    /// forward of [`CpuTransformer::predict`] that also stores every layer's K/V; a span computes
    /// only its rows, writes their K/V into the cache and attends to the whole cached sequence.
    ///
    /// Errors ([`Error::InvalidArgument`]): bad ids, a cache that does not fit, a span outside
    /// the canvas or empty, a query whose source row ([`CpuTransformer::source_row`]) is outside
    /// the span; ([`Error::State`]) a span on a cache that was never refreshed.
    pub fn logits_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &mut KvCache,
        step: &CacheStep,
    ) -> Result<Vec<f32>> {
        let plan = self.check_cached(ids, queries, cache, step)?;
        match step {
            CacheStep::Refresh => self.refresh_logits(ids, &plan, cache),
            CacheStep::Span(_) => self.span_logits(&mut [(ids, &plan, cache)]),
        }
    }

    /// [`Model::predict_cached_batch`]: the refreshes and spans over 64 rows one by one (full
    /// forwards and prefix spans, already wide), then every other span step in one packed
    /// forward (`span_logits`). Each
    /// item's predictions follow its own rule. Every item is checked before any cache changes.
    pub fn predict_cached_packed(
        &self,
        items: &mut [CachedQuery<'_>],
    ) -> Result<Vec<Vec<Prediction>>> {
        let plans = items
            .iter()
            .map(|it| self.check_cached(it.ids, it.queries, it.cache, &it.step))
            .collect::<Result<Vec<_>>>()?;
        let width = self.cfg.logits_width();
        let mut out: Vec<Vec<Prediction>> = vec![Vec::new(); items.len()];
        let mut spans = Vec::new();
        let mut span_items = Vec::new();
        for (i, (it, plan)) in items.iter_mut().zip(&plans).enumerate() {
            // Spans longer than SKINNY_SPAN_ROWS (prefix mode's block-to-end) run alone: packed
            // with short ones, they would move those off the kernel they take alone
            // (`span_product` picks one product per forward), changing their bits.
            let packable = matches!(&it.step, CacheStep::Span(r) if r.len() <= SKINNY_SPAN_ROWS);
            if packable {
                spans.push((it.ids, plan, &mut *it.cache));
                span_items.push((i, it.queries, it.rule));
                continue;
            }
            let logits = match it.step {
                CacheStep::Refresh => self.refresh_logits(it.ids, plan, it.cache)?,
                CacheStep::Span(_) => self.span_logits(&mut [(it.ids, plan, &mut *it.cache)])?,
            };
            out[i] = predict_query_rows(&logits, width, it.queries, it.rule);
        }
        if spans.is_empty() {
            return Ok(out);
        }
        let logits = self.span_logits(&mut spans)?;
        let mut row = 0;
        for (i, queries, rule) in span_items {
            let rows = &logits[row * width..(row + queries.len()) * width];
            out[i] = predict_query_rows(rows, width, queries, rule);
            row += queries.len();
        }
        Ok(out)
    }

    /// Checks one cached step (ids, cache size, span, queries, a span on a filled cache, the
    /// host memory of a first refresh) and returns its span and its queries' source rows.
    fn check_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &KvCache,
        step: &CacheStep,
    ) -> Result<CachedPlan> {
        self.check_ids(ids)?;
        cache.check_fits(&self.cfg, ids.len())?;
        let n = ids.len();
        check_queries(queries, n)?;
        let span = match step {
            CacheStep::Refresh => 0..n,
            CacheStep::Span(r) => r.clone(),
        };
        if span.is_empty() || span.end > n {
            return Err(Error::invalid(format!(
                "cached span {}..{} is empty or outside the canvas of {n}",
                span.start, span.end
            )));
        }
        if let Some(&q) = queries
            .iter()
            .find(|&&q| !span.contains(&self.source_row(q)))
        {
            return Err(Error::invalid(format!(
                "query position {q} is predicted from hidden row {}, outside the cached span {}..{}",
                self.source_row(q),
                span.start,
                span.end
            )));
        }
        if matches!(step, CacheStep::Span(_)) && !cache.is_filled() {
            return Err(Error::State(
                "a span forward needs a refreshed K/V cache: run a refresh first".into(),
            ));
        }
        // The first refresh allocates every layer's K and V (f32): checked like the activations.
        if cache.layer(0).0.is_empty() {
            let floats = 2 * (cache.n_layers() * cache.len() * cache.width()) as u64;
            crate::memory::check_host_fits(
                &format!("the K/V cache of {} tokens", cache.len()),
                4 * floats,
            )?;
        }
        let sources = queries
            .iter()
            .map(|&q| self.source_row(q) - span.start)
            .collect();
        Ok(CachedPlan { span, sources })
    }

    /// A refresh ([`CpuTransformer::check_cached`]'s `plan`): the full forward, storing every
    /// layer's K/V in `cache`.
    fn refresh_logits(
        &self,
        ids: &[u32],
        plan: &CachedPlan,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        // A failed forward leaves a partly written cache: until this one succeeds, the next
        // cached forward must be a refresh.
        cache.invalidate();
        let attend = Attend::Store(cache);
        let logits = self.logits_of_sources(ids, plan.span.clone(), attend, &plan.sources)?;
        cache.mark_filled();
        Ok(logits)
    }

    /// The span steps of several canvases (ids, checked plan, cache) in one forward: their rows
    /// stacked, every product over all of them, each span's K/V written into its own cache and
    /// attending to its own canvas. Returns every item's query logits, in item order. A span
    /// of up to [`SKINNY_SPAN_ROWS`] rows gets the bits it gets alone (the skinny kernel is row
    /// invariant); longer ones agree to rounding.
    fn span_logits(&self, items: &mut [(&[u32], &CachedPlan, &mut KvCache)]) -> Result<Vec<f32>> {
        let mut ids = Vec::new();
        let mut sources = Vec::new();
        let mut segs = Vec::with_capacity(items.len());
        for (canvas, plan, cache) in items.iter_mut() {
            let rows = ids.len()..ids.len() + plan.span.len();
            ids.extend_from_slice(&canvas[plan.span.clone()]);
            sources.extend(plan.sources.iter().map(|r| rows.start + r));
            // Invalid until the forward succeeds (see refresh_logits).
            cache.invalidate();
            segs.push(SpanRows {
                cache,
                rows,
                start: plan.span.start,
                keys: canvas.len(),
            });
        }
        let total = ids.len();
        let logits = self.logits_of_sources(&ids, 0..total, Attend::Spans(segs), &sources)?;
        for (_, _, cache) in items.iter_mut() {
            cache.mark_filled();
        }
        Ok(logits)
    }

    /// [`CpuTransformer::predict`] for several canvases in one packed forward: the canvases'
    /// rows are stacked so every linear layer streams its weights once for all of them, while
    /// positions and attention stay per canvas. Each item's predictions follow its own rule.
    pub fn predict_packed(&self, items: &[BatchQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
        let mut ids = Vec::new();
        let mut segs = Vec::with_capacity(items.len());
        for it in items {
            self.check_ids(it.ids)?;
            check_queries(it.queries, it.ids.len())?;
            segs.push(ids.len()..ids.len() + it.ids.len());
            ids.extend_from_slice(it.ids);
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sources: Vec<usize> = items
            .iter()
            .zip(&segs)
            .flat_map(|(it, r)| {
                it.queries
                    .iter()
                    .map(move |&q| r.start + self.source_row(q))
            })
            .collect();
        let logits = self.logits_of_sources(&ids, 0..ids.len(), Attend::Packed(&segs), &sources)?;
        let width = self.cfg.logits_width();
        let mut out = Vec::with_capacity(items.len());
        let mut row = 0;
        for it in items {
            let n = it.queries.len();
            let slice = &logits[row * width..(row + n) * width];
            out.push(predict_query_rows(slice, width, it.queries, it.rule));
            row += n;
        }
        Ok(out)
    }

    /// LM head over the given rows of normalised hidden states (rows may repeat) through
    /// `product`, whose rows must have the same bits whatever the row count
    /// ([`cpu::linear_row_invariant`]: a packed batch's rows equal its canvases' alone).
    fn logits_of_rows(&self, hidden: &[f32], rows: &[usize], product: Product) -> Result<Vec<f32>> {
        let d = self.cfg.d_model;
        let mut logits = logits_buffer(rows.len(), self.cfg.logits_width())?;
        let mut gathered = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            gathered.extend_from_slice(&hidden[r * d..(r + 1) * d]);
        }
        product(&gathered, rows.len(), &self.lm_head()?, &mut logits);
        Ok(logits)
    }

    /// The hidden row whose LM-head output predicts position `i`
    /// ([`ModelConfig::source_position`]).
    pub fn source_row(&self, i: usize) -> usize {
        self.cfg.source_position(i)
    }

    /// Unshifted logits: row `i` is the LM head applied to hidden state `i`, with the bits
    /// [`CpuTransformer::predict`]'s LM head gives that row ([`cpu::linear_row_invariant`], or
    /// the bf16 product with bf16 activations).
    pub fn raw_forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let hidden = self.hidden(ids)?;
        let d = self.cfg.d_model;
        let mut logits = logits_buffer(ids.len(), self.cfg.logits_width())?;
        self.product(false, ids.len())(&hidden, hidden.len() / d, &self.lm_head()?, &mut logits);
        Ok(logits)
    }

    /// Logits whose row `i` predicts position `i` (shifted for Dream; the raw rows otherwise).
    pub fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if !self.cfg.shifted_logits() {
            return self.raw_forward(ids);
        }
        let hidden = self.hidden(ids)?;
        let rows: Vec<usize> = (0..ids.len()).map(|i| self.source_row(i)).collect();
        self.logits_of_rows(&hidden, &rows, self.product(false, ids.len()))
    }

    /// One forward with the last layer and the LM head only on the rows that predict
    /// `positions` ([`Model::logits_at`]); the rows [`CpuTransformer::predict`] samples from.
    pub fn logits_at(&self, ids: &[u32], positions: &[usize]) -> Result<Vec<f32>> {
        check_queries(positions, ids.len())?;
        self.check_ids(ids)?;
        let sources: Vec<usize> = positions.iter().map(|&q| self.source_row(q)).collect();
        self.logits_of_sources(ids, 0..ids.len(), Attend::Local, &sources)
    }

    /// One forward, then the LM head only on the rows that predict `queries`, then sampling.
    pub fn predict(
        &self,
        ids: &[u32],
        queries: &[usize],
        rule: &PredictRule,
    ) -> Result<Vec<Prediction>> {
        check_queries(queries, ids.len())?;
        self.check_ids(ids)?;
        let sources: Vec<usize> = queries.iter().map(|&q| self.source_row(q)).collect();
        let logits = self.logits_of_sources(ids, 0..ids.len(), Attend::Local, &sources)?;
        Ok(predict_query_rows(
            &logits,
            self.cfg.logits_width(),
            queries,
            rule,
        ))
    }
}

impl Model for CpuTransformer {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn backend_name(&self) -> &'static str {
        "cpu"
    }

    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        CpuTransformer::forward(self, ids)
    }

    fn raw_forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        CpuTransformer::raw_forward(self, ids)
    }

    fn logits_at(&self, ids: &[u32], positions: &[usize]) -> Result<Vec<f32>> {
        CpuTransformer::logits_at(self, ids, positions)
    }

    fn predict(
        &self,
        ids: &[u32],
        queries: &[usize],
        rule: &PredictRule,
    ) -> Result<Vec<Prediction>> {
        CpuTransformer::predict(self, ids, queries, rule)
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn logits_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &mut KvCache,
        step: &CacheStep,
    ) -> Result<Vec<f32>> {
        CpuTransformer::logits_cached(self, ids, queries, cache, step)
    }

    fn predict_batch(&self, items: &[BatchQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
        self.predict_packed(items)
    }

    fn packs_cached_batches(&self) -> bool {
        true
    }

    fn predict_cached_batch(&self, items: &mut [CachedQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
        self.predict_cached_packed(items)
    }
}

/// A product `out[m, n] = x[m, k] · Wᵀ` of the CPU backend.
/// A product `out = x · wᵀ` of `m` rows ([`cpu::linear`]'s contract).
pub(crate) type Product = fn(&[f32], usize, &TensorView, &mut [f32]);

/// Cached spans of up to this many rows (a dual-cache block of 32, 33 for shifted
/// architectures, blocks up to 64) run every product through the skinny kernel; longer ones
/// (prefix mode's block-to-end spans) keep the GEMM paths, which win at a few hundred rows.
/// `benches/cpu.rs` `linear_skinny` on one thread of an AMD EPYC (Zen 4), bf16 weights, GFLOP/s
/// of the skinny kernel against the path it replaces on 384 × 1152, 1024 × 384 and 4096 × 4096:
/// 4 rows 46 / 35, 49 / 40, 43 / 18 (the GEMV); 8 rows 58 / 46, 67 / 37, 60 / 33; 32 rows
/// 75 / 77, 83 / 72, 88 / 71; 64 rows 74 / 85, 87 / 88, 99 / 85 (the GEMM path); docs/perf.md,
/// session 14.
const SKINNY_SPAN_ROWS: usize = 64;

/// The product of a forward whose canvases contribute up to `rows` rows each. In a cached span
/// (`cached`) of up to [`SKINNY_SPAN_ROWS`] rows, the skinny kernel where the CPU has it;
/// otherwise [`cpu::linear_row_invariant`]. Both give each row the same bits whatever the row
/// count, so a canvas's rows are the same alone, packed with other canvases' rows, and narrowed
/// to the queried rows in the last layer. (On a CPU without the skinny kernel this gives up
/// [`cpu::linear`]'s GEMV for spans of at most [`cpu::GEMV_MAX_M`] rows.)
fn span_product(cached: bool, rows: usize) -> Product {
    if cached && rows <= SKINNY_SPAN_ROWS && cpu::skinny_available() {
        skinny_product
    } else {
        cpu::linear_row_invariant
    }
}

/// [`cpu::linear_skinny_bf16`] (bf16 activations), or for weights it does not take (f16, f32)
/// [`cpu::linear_row_invariant`]; row invariant either way.
fn bf16_product(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) {
    if !cpu::linear_skinny_bf16(x, m, w, out) {
        cpu::linear_row_invariant(x, m, w, out);
    }
}

fn skinny_product(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) {
    if !cpu::linear_skinny(x, m, w, out) {
        cpu::linear_row_invariant(x, m, w, out);
    }
}

/// Implements [`Model`] for a newtype around [`CpuTransformer`] by delegation, and its loading
/// (`load`, `from_store`) for architecture `$arch`.
macro_rules! delegate_model {
    ($t:ident, $arch:expr) => {
        impl $t {
            /// Loads `config.json` and the safetensors of `dir`, validating every tensor (name,
            /// shape, dtype) against the config. A config of another architecture is an error.
            pub fn load(dir: &std::path::Path) -> $crate::error::Result<$t> {
                let (cfg, store) = $crate::model::transformer::open_checked(dir, $arch)?;
                Self::from_store(cfg, store)
            }

            /// Builds the model from an opened checkpoint.
            pub fn from_store(
                cfg: $crate::config::ModelConfig,
                store: $crate::weights::WeightStore,
            ) -> $crate::error::Result<$t> {
                Ok($t($crate::model::transformer::CpuTransformer::of_arch(
                    $arch, cfg, store,
                )?))
            }
        }

        impl $crate::model::Model for $t {
            fn config(&self) -> &$crate::config::ModelConfig {
                self.0.config()
            }
            fn backend_name(&self) -> &'static str {
                "cpu"
            }
            fn forward(&self, ids: &[u32]) -> $crate::error::Result<Vec<f32>> {
                self.0.forward(ids)
            }
            fn raw_forward(&self, ids: &[u32]) -> $crate::error::Result<Vec<f32>> {
                self.0.raw_forward(ids)
            }
            fn logits_at(
                &self,
                ids: &[u32],
                positions: &[usize],
            ) -> $crate::error::Result<Vec<f32>> {
                self.0.logits_at(ids, positions)
            }
            fn predict(
                &self,
                ids: &[u32],
                queries: &[usize],
                rule: &$crate::denoise::predict::PredictRule,
            ) -> $crate::error::Result<Vec<$crate::denoise::predict::Prediction>> {
                self.0.predict(ids, queries, rule)
            }
            fn supports_kv_cache(&self) -> bool {
                true
            }
            fn predict_batch(
                &self,
                items: &[$crate::model::BatchQuery<'_>],
            ) -> $crate::error::Result<Vec<Vec<$crate::denoise::predict::Prediction>>> {
                self.0.predict_packed(items)
            }
            fn logits_cached(
                &self,
                ids: &[u32],
                queries: &[usize],
                cache: &mut $crate::model::KvCache,
                step: &$crate::model::CacheStep,
            ) -> $crate::error::Result<Vec<f32>> {
                self.0.logits_cached(ids, queries, cache, step)
            }
            fn packs_cached_batches(&self) -> bool {
                true
            }
            fn predict_cached_batch(
                &self,
                items: &mut [$crate::model::CachedQuery<'_>],
            ) -> $crate::error::Result<Vec<Vec<$crate::denoise::predict::Prediction>>> {
                self.0.predict_cached_packed(items)
            }
        }

        impl $t {
            /// See [`CpuTransformer::set_bf16_activations`].
            pub fn set_bf16_activations(&mut self, on: bool) -> bool {
                self.0.set_bf16_activations(on)
            }

            /// The model with bf16 activations set as `on` says (`None`: left as loaded).
            pub fn with_bf16_activations(mut self, on: Option<bool>) -> Self {
                if let Some(on) = on {
                    self.0.set_bf16_activations(on);
                }
                self
            }
        }

        impl std::ops::Deref for $t {
            type Target = $crate::model::transformer::CpuTransformer;
            fn deref(&self) -> &Self::Target {
                &self.0
            }
        }
    };
}
pub(crate) use delegate_model;

/// Opens `dir` (config + safetensors) and checks that its architecture is `want`.
pub(crate) fn open_checked(
    dir: &std::path::Path,
    want: crate::config::Arch,
) -> Result<(ModelConfig, WeightStore)> {
    let path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&path)?;
    if cfg.arch != want {
        return Err(Error::format(
            &path,
            format!(
                "this is a {} checkpoint, not {}",
                cfg.arch.name(),
                want.name()
            ),
        ));
    }
    let store = WeightStore::open(dir)?;
    Ok((cfg, store))
}
