//! Device memory budgets: what a model's weights, a batch's step buffers and its K/V cache take
//! on the device, computed before anything is allocated and checked against the device's free
//! memory ([`crate::memory::check_fits`] through `CudaDevice::check_fits`), so a model or a
//! batch that does not fit fails at once with [`Error::OutOfMemory`] naming the sizes, instead
//! of half-way through an upload with a bare driver error. An allocation that still fails
//! (another process took the memory meanwhile) is reported as [`Error::OutOfMemory`] too
//! ([`alloc_err`]), so callers (and the C ABI's `DLLM_ERR_OUT_OF_MEMORY`) can tell "too big for
//! this device" from a broken device.

use crate::config::ModelConfig;
use crate::error::Error;
use crate::model::transformer::Role;
use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;

/// Bytes the weights of a model with `cfg` take on the device: the embedding and every matrix
/// (the LM head when untied) as bf16, norms and biases as f32 (`CudaTransformer::new` uploads
/// exactly these).
pub fn weight_bytes(cfg: &ModelConfig) -> u64 {
    crate::model::tensor_table(cfg)
        .roles(cfg)
        .iter()
        .map(|(spec, role)| {
            let numel: u64 = spec.shape.iter().map(|&n| n as u64).product();
            match role {
                Role::Embedding | Role::Linear => 2 * numel,
                Role::Bias | Role::Norm => 4 * numel,
            }
        })
        .sum()
}

/// Bytes of the K and V caches of `batch` canvases of `seq` tokens (bf16, every layer).
pub fn kv_cache_bytes(cfg: &ModelConfig, batch: usize, seq: usize) -> u64 {
    let kv_dim = (cfg.n_kv_heads * cfg.head_dim()) as u64;
    2 * 2 * cfg.n_layers as u64 * batch as u64 * seq as u64 * kv_dim
}

/// Element counts of the step buffers of `batch` canvases of `seq` tokens (the transformer's
/// `State`, allocated at once by `alloc_state`; the K/V caches come later, see
/// [`kv_cache_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBuffers {
    /// Canvas ids, query rows, query positions, sampled tokens (i32 each): one per row.
    pub rows: usize,
    /// Canvas lengths (i32): one per canvas.
    pub batch: usize,
    /// Residual (f32), normed activations and attention output (bf16): `rows · d_model` each.
    pub hidden: usize,
    /// Q|K|V (bf16).
    pub qkv: usize,
    /// Gate|up (bf16; one element when the fused SwiGLU writes the activations directly).
    pub gate_up: usize,
    /// SwiGLU output (bf16).
    pub act: usize,
    /// Gathered query rows (f32) and their normed copy (bf16), one LM-head chunk.
    pub head_hidden: usize,
    /// Logits of one LM-head chunk (f32).
    pub logits: usize,
    /// The commit record (i32).
    pub record: usize,
    /// The RMSNorm fold's second `x ⊙ γ` matrix (bf16; one element without the fold,
    /// [`StepBuffers::with_norm_fold`]).
    pub fold_x: usize,
    /// Each of the fold's two partial-sum buffers (f32, `rows · d_model / 32`; one element without).
    pub fold_sq: usize,
    /// A mixture's buffers (LLaDA-MoE; `gate_up` and `act` are then one element each).
    pub moe: Option<super::moe::MoeBufferSizes>,
}

impl StepBuffers {
    pub fn new(cfg: &ModelConfig, batch: usize, seq: usize, fused_swiglu: bool) -> StepBuffers {
        let rows = batch * seq;
        let (d, h) = (cfg.d_model, cfg.mlp_hidden);
        let chunk = super::transformer::HEAD_CHUNK_ROWS.min(rows);
        let moe = super::moe::MoeShape::of(cfg)
            .map(|shape| super::moe::MoeBufferSizes::new(shape, rows, fused_swiglu));
        let dense = moe.is_none();
        StepBuffers {
            rows,
            batch,
            hidden: rows * d,
            qkv: rows * (d + 2 * cfg.n_kv_heads * cfg.head_dim()),
            gate_up: if fused_swiglu || !dense {
                1
            } else {
                rows * 2 * h
            },
            act: if dense { rows * h } else { 1 },
            head_hidden: chunk * d,
            logits: chunk * cfg.logits_width(),
            record: super::sampling::commit_record_len(batch, seq),
            fold_x: 1,
            fold_sq: 1,
            moe,
        }
    }

    /// With the RMSNorm fold's buffers when `norm_fold` ([`super::gemm_norm`]).
    pub fn with_norm_fold(self, norm_fold: bool) -> StepBuffers {
        if !norm_fold {
            return self;
        }
        StepBuffers {
            fold_x: self.hidden,
            fold_sq: self.hidden.div_ceil(super::gemm_norm::GROUP_COLS).max(1),
            ..self
        }
    }

    /// Bytes the step buffers of canvases of `seq` tokens take (per canvas, shared by the
    /// batch): `B` canvases take `B · per canvas + shared` (the shared part is the LM-head chunk).
    pub fn per_canvas_and_shared(cfg: &ModelConfig, seq: usize, fused_swiglu: bool) -> (u64, u64) {
        let bytes = |b| StepBuffers::new(cfg, b, seq, fused_swiglu).bytes();
        let per_canvas = bytes(2) - bytes(1);
        (per_canvas, bytes(1) - per_canvas)
    }

    /// Their bytes in all (the confidences are f64, one per row).
    pub fn bytes(&self) -> u64 {
        let n = |x: usize| x as u64;
        4 * n(self.rows) * 4 // canvas, query rows, query positions, tokens
            + 8 * n(self.rows) // confidences
            + 4 * n(self.batch)
            + (4 + 2 + 2) * n(self.hidden)
            + 2 * n(self.qkv + self.gate_up + self.act)
            + (4 + 2) * n(self.head_hidden)
            + 4 * n(self.logits + self.record)
            + 2 * n(self.fold_x)
            + 4 * 2 * n(self.fold_sq)
            + self.moe.map_or(0, |m| m.bytes())
    }
}

/// A failed device allocation of `what` as an error: [`Error::OutOfMemory`] when the driver ran
/// out of memory, [`Error::Backend`] otherwise.
pub fn alloc_err(what: &str, e: DriverError) -> Error {
    if is_out_of_memory(&e) {
        Error::OutOfMemory(format!("CUDA {what}: the device is out of memory"))
    } else {
        super::cuda_err(what, e)
    }
}

/// Whether the driver's error says it ran out of device memory.
pub fn is_out_of_memory(e: &DriverError) -> bool {
    e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::weights::WeightStore;
    use std::path::Path;

    fn tiny() -> (ModelConfig, WeightStore) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        (cfg, WeightStore::open(&dir).unwrap())
    }

    #[test]
    fn weight_bytes_count_each_checkpoint_tensor_as_uploaded() {
        // Independent of the tensor table: every tensor the checkpoint's headers list, matrices
        // at 2 bytes an element (bf16), vectors at 4 (f32).
        let (cfg, store) = tiny();
        let from_headers: u64 = store
            .tensor_names()
            .into_iter()
            .map(|name| {
                let t = store.get(name).unwrap();
                let numel = t.numel() as u64;
                if t.shape.len() == 1 {
                    4 * numel
                } else {
                    2 * numel
                }
            })
            .sum();
        assert_eq!(weight_bytes(&cfg), from_headers);
    }

    #[test]
    fn llada_8b_weights_and_caches_have_their_known_sizes() {
        let plan = crate::synth::plan(crate::synth::Preset::Llada8b).unwrap();
        let cfg = plan.config;
        // 32 layers of (4096·(4096 + 2·4096) + 4096² + 3·4096·12288) bf16 + 2 norms of 4096 f32,
        // embedding and head 126464 × 4096 bf16, final norm.
        let layer: u64 = 2 * (4096 * 12288 + 4096 * 4096 + 3 * 4096 * 12288) + 2 * 4 * 4096;
        let expected = 32 * layer + 2 * 2 * 126464 * 4096 + 4 * 4096;
        assert_eq!(weight_bytes(&cfg), expected);
        // The checkpoint's bf16 bytes, with the 65 norms' 4096 values widened to f32.
        assert_eq!(weight_bytes(&cfg), plan.total_bytes + 2 * 65 * 4096);
        // K and V of 8 canvases × 384 tokens: 2 · 2 bytes · 32 layers · 3072 rows · 4096.
        assert_eq!(kv_cache_bytes(&cfg, 8, 384), 2 * 2 * 32 * 3072 * 4096);
    }

    #[test]
    fn llada_8b_step_buffers_of_8_canvases_have_their_known_size() {
        let cfg = crate::synth::plan(crate::synth::Preset::Llada8b)
            .unwrap()
            .config;
        let rows: u64 = 8 * 384;
        // Per row: 4 i32 + 1 f64, residual f32 + normed + attention bf16 (4096 each), qkv bf16
        // (12288), gate|up bf16 (24576), act bf16 (12288); one head chunk of 256 rows: f32 +
        // bf16 hidden (4096) and f32 logits (126464); the record 8 · (1 + 2 · 384) i32.
        let per_row = 4 * 4 + 8 + 8 * 4096 + 2 * (12288 + 24576 + 12288);
        // Without the norm fold its buffers are one element each: 1 bf16 and 2 f32.
        let expected =
            rows * per_row + 4 * 8 + 256 * (6 * 4096 + 4 * 126464) + 4 * 8 * 769 + 2 + 2 * 4;
        let b = StepBuffers::new(&cfg, 8, 384, false);
        assert_eq!(b.bytes(), expected);
        // The fold adds a bf16 row of 4096 and two f32 partial sums per 32 columns per row.
        let folded = b.with_norm_fold(true);
        assert_eq!(
            folded.bytes() - b.bytes(),
            rows * (2 * 4096 + 2 * 4 * 128) - 2 - 8
        );
        // The fused SwiGLU drops the gate|up buffer but for one element.
        let fused = StepBuffers::new(&cfg, 8, 384, true);
        assert_eq!(b.bytes() - fused.bytes(), 2 * (rows * 24576 - 1));
    }

    #[test]
    fn only_the_drivers_out_of_memory_is_classified_out_of_memory() {
        let oom = alloc_err(
            "allocate x",
            DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
        );
        assert_eq!(oom.kind(), ErrorKind::OutOfMemory);
        assert!(oom.to_string().contains("allocate x"), "{oom}");
        // (Formatting any other driver error asks libcuda for its text, which is not here.)
        assert!(!is_out_of_memory(&DriverError(
            CUresult::CUDA_ERROR_INVALID_VALUE
        )));
        assert!(!is_out_of_memory(&DriverError(
            CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
        )));
    }
}
