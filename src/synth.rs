//! `dllm synth`: random-weight checkpoints with the exact layout of real ones.
//!
//! [`plan`] decides everything about a checkpoint without touching the disk: its `config.json`
//! text, which tensors go to which `model-0000K-of-0000N.safetensors` shard (names sorted,
//! packed greedily up to a shard size limit, as Hugging Face does), each shard's header, and
//! the index. [`synth_checkpoint`] then streams the tensors to disk in bf16, a few MB at a time,
//! generated in parallel; memory stays small even for the 16 GB LLaDA-8B layout. Presets cover
//! every architecture: LLaDA (`tiny`, `llada-8b`), Dream (`dream-tiny`, `dream-7b`) and
//! LLaDA-MoE (`llada-moe-tiny`, `llada-moe-7b`).
//!
//! Values are a pure function of `(seed, tensor name, element index)`: linear, bias and
//! embedding weights uniform with standard deviation 0.02, norm weights uniform in
//! `1 ± 0.1`. No tokenizer is written.

use crate::config::{Arch, ModelConfig};
use crate::denoise::rng;
use crate::error::{Error, Result};
use crate::model::tensor_table;
use crate::model::transformer::Role;
use crate::weights::{TensorSpec, INDEX_FILE};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

/// Which checkpoint layout to synthesise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The layout of the embedded `models/tiny-llada-code` (20M parameters, 4 shards).
    Tiny,
    /// The layout of GSAI-ML/LLaDA-8B-Instruct (8.0B parameters, 16 GB, 6 shards).
    Llada8b,
    /// A small Dream (Qwen2) layout for tests: hidden 256, 4 layers, 8 query heads over 2 KV
    /// heads, intermediate 512, vocabulary 1024, q/k/v biases, untied head (2.8M parameters).
    DreamTiny,
    /// The layout of Dream-org/Dream-v0-Instruct-7B (7.6B parameters, 15 GB, 4 shards).
    Dream7b,
    /// A small LLaDA-MoE layout for tests: hidden 128, 3 layers, 4 heads with q/k norms, 8
    /// experts of 64 (2 per token), vocabulary 512, untied head (0.9M parameters).
    LladaMoeTiny,
    /// The shape of inclusionAI/LLaDA-MoE-7B-A1B (hidden 2048, 16 layers of 16 heads, 64
    /// experts of 1024, 8 per token, vocabulary 157184: 7.36B parameters, 15 GB, 4 shards).
    LladaMoe7b,
}

impl Preset {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Llada8b => "llada-8b",
            Preset::DreamTiny => "dream-tiny",
            Preset::Dream7b => "dream-7b",
            Preset::LladaMoeTiny => "llada-moe-tiny",
            Preset::LladaMoe7b => "llada-moe-7b",
        }
    }

    /// The architecture of the preset's checkpoint.
    pub fn arch(self) -> Arch {
        match self {
            Preset::Tiny | Preset::Llada8b => Arch::Llada,
            Preset::DreamTiny | Preset::Dream7b => Arch::Dream,
            Preset::LladaMoeTiny | Preset::LladaMoe7b => Arch::LladaMoe,
        }
    }

    /// Parses a command-line preset name (`tiny`, `llada-8b`, `8b`, `dream-tiny`, `dream-7b`,
    /// `7b`, `llada-moe-tiny`, `llada-moe-7b`).
    pub fn from_name(s: &str) -> Result<Preset> {
        match s.to_ascii_lowercase().as_str() {
            "tiny" => Ok(Preset::Tiny),
            "llada-8b" | "llada8b" | "8b" => Ok(Preset::Llada8b),
            "dream-tiny" => Ok(Preset::DreamTiny),
            "dream-7b" | "dream7b" | "7b" => Ok(Preset::Dream7b),
            "llada-moe-tiny" => Ok(Preset::LladaMoeTiny),
            "llada-moe-7b" | "llada-moe-7b-a1b" => Ok(Preset::LladaMoe7b),
            _ => Err(Error::invalid(format!(
                "unknown synth preset `{s}` (expected tiny, llada-8b, dream-tiny, dream-7b, \
                 llada-moe-tiny or llada-moe-7b)"
            ))),
        }
    }

    /// Largest shard (tensor bytes) before a new one is started.
    pub fn max_shard_bytes(self) -> u64 {
        match self {
            Preset::Tiny | Preset::DreamTiny | Preset::LladaMoeTiny => 12 << 20,
            Preset::Llada8b => 3_000_000_000,
            Preset::Dream7b | Preset::LladaMoe7b => 4_000_000_000,
        }
    }

    /// The `config.json` fields, in the order real checkpoints write them.
    fn config_fields(self) -> Vec<(&'static str, Value)> {
        match self.arch() {
            Arch::Llada => self.llada_fields(),
            Arch::Dream => self.dream_fields(),
            Arch::LladaMoe => self.llada_moe_fields(),
        }
    }

    /// LLaDA-MoE's `config.json` (OLMoE names, alphabetical as `transformers` writes them).
    fn llada_moe_fields(self) -> Vec<(&'static str, Value)> {
        // (hidden, heads, layers, experts, per token, expert hidden, vocab, max positions,
        //  mask, eos = pad)
        let (d, h, l, n, k, inter, vocab, max_pos, mask, eos) = match self {
            Preset::LladaMoe7b => (2048, 16, 16, 64, 8, 1024, 157184, 8192, 156895, 156892),
            _ => (128, 4, 3, 8, 2, 64, 512, 1024, 511, 510),
        };
        vec![
            ("architectures", json!(["LLaDAMoEModelLM"])),
            ("attention_bias", json!(false)),
            ("attention_dropout", json!(0.0)),
            ("clip_qkv", Value::Null),
            ("eos_token_id", json!(eos)),
            ("expert_intermediate_size", json!(inter)),
            ("hidden_act", json!("silu")),
            ("hidden_size", json!(d)),
            ("initializer_range", json!(0.02)),
            ("mask_token_id", json!(mask)),
            ("max_position_embeddings", json!(max_pos)),
            // As the released configs: LLaDA's model_type, the MoE architecture.
            ("model_type", json!("llada")),
            ("moe_layer_freq", json!(vec![1; l])),
            ("norm_topk_prob", json!(false)),
            ("num_attention_heads", json!(h)),
            ("num_experts", json!(n)),
            ("num_experts_per_tok", json!(k)),
            ("num_hidden_layers", json!(l)),
            ("num_key_value_heads", json!(h)),
            ("pad_token_id", json!(eos)),
            ("partial_rotary_factor", json!(1.0)),
            ("qk_layernorm", json!(true)),
            ("rms_norm_eps", json!(1e-5)),
            ("rope_scaling", Value::Null),
            ("rope_theta", json!(50000.0)),
            ("shared_expert_intermediate_size", Value::Null),
            ("tie_word_embeddings", json!(false)),
            ("torch_dtype", json!("bfloat16")),
            ("use_cache", json!(false)),
            ("vocab_size", json!(vocab)),
        ]
    }

    /// Dream's `config.json` (Qwen2 names, alphabetical as `transformers` writes them).
    fn dream_fields(self) -> Vec<(&'static str, Value)> {
        // (hidden, heads, kv heads, layers, intermediate, vocab, max positions, mask, eos = pad = bos)
        let (d, h, kv, l, inter, vocab, max_pos, mask, eos) = match self {
            Preset::Dream7b => (3584, 28, 4, 28, 18944, 152064, 131072, 151666, 151643),
            _ => (256, 8, 2, 4, 512, 1024, 2048, 1023, 1022),
        };
        vec![
            ("architectures", json!(["DreamModel"])),
            ("attention_dropout", json!(0.0)),
            ("bos_token_id", json!(eos)),
            ("eos_token_id", json!(eos)),
            ("hidden_act", json!("silu")),
            ("hidden_size", json!(d)),
            ("initializer_range", json!(0.02)),
            ("intermediate_size", json!(inter)),
            ("mask_token_id", json!(mask)),
            ("max_position_embeddings", json!(max_pos)),
            ("max_window_layers", json!(l)),
            ("model_type", json!("Dream")),
            ("num_attention_heads", json!(h)),
            ("num_hidden_layers", json!(l)),
            ("num_key_value_heads", json!(kv)),
            ("pad_token_id", json!(eos)),
            ("rms_norm_eps", json!(1e-6)),
            ("rope_scaling", Value::Null),
            ("rope_theta", json!(1000000.0)),
            ("sliding_window", Value::Null),
            ("tie_word_embeddings", json!(false)),
            ("torch_dtype", json!("bfloat16")),
            ("use_cache", json!(false)),
            ("use_sliding_window", json!(false)),
            ("vocab_size", json!(vocab)),
        ]
    }

    /// LLaDA's `config.json` (OLMo names).
    fn llada_fields(self) -> Vec<(&'static str, Value)> {
        // (d_model, n_heads, n_layers, mlp_hidden, mlp_ratio, vocab, rope_theta, max_seq,
        //  mask, eos, pad)
        let (d, h, l, mlp, ratio, vocab, theta, max_seq, mask, eos, pad) = match self {
            Preset::Tiny => (
                384,
                6,
                8,
                1024,
                json!(2.6666666666666665),
                8192,
                10000.0,
                1024,
                1,
                0,
                2,
            ),
            // LLaDA-8B writes mlp_ratio 4 next to the mlp_hidden_size it actually uses.
            _ => (
                4096,
                32,
                32,
                12288,
                json!(4),
                126464,
                500000.0,
                4096,
                126336,
                126081,
                126081,
            ),
        };
        vec![
            ("architectures", json!(["LLaDAModelLM"])),
            ("model_type", json!("llada")),
            ("d_model", json!(d)),
            ("n_heads", json!(h)),
            ("n_kv_heads", json!(h)),
            ("n_layers", json!(l)),
            ("mlp_hidden_size", json!(mlp)),
            ("mlp_ratio", ratio),
            ("vocab_size", json!(vocab)),
            ("embedding_size", json!(vocab)),
            ("rope", json!(true)),
            ("rope_theta", json!(theta)),
            ("rms_norm_eps", json!(1e-5)),
            ("layer_norm_type", json!("rms")),
            ("activation_type", json!("silu")),
            ("block_type", json!("llama")),
            ("include_bias", json!(false)),
            ("include_qkv_bias", json!(false)),
            ("weight_tying", json!(false)),
            ("max_sequence_length", json!(max_seq)),
            ("mask_token_id", json!(mask)),
            ("eos_token_id", json!(eos)),
            ("pad_token_id", json!(pad)),
            ("torch_dtype", json!("bfloat16")),
        ]
    }
}

/// One tensor in a shard: bytes `[offset, offset + bytes)` of the shard's data section.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub spec: TensorSpec,
    pub role: Role,
    pub offset: u64,
    pub bytes: u64,
}

/// One shard file: its tensors in data order and its padded header.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPlan {
    pub file_name: String,
    pub tensors: Vec<PlannedTensor>,
    /// The JSON header, padded with spaces to a multiple of 8 bytes.
    pub header: String,
    /// Bytes of tensor data.
    pub data_bytes: u64,
}

impl ShardPlan {
    /// Size of the shard file.
    pub fn file_bytes(&self) -> u64 {
        8 + self.header.len() as u64 + self.data_bytes
    }
}

/// Everything about a synthetic checkpoint except the weight values.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthPlan {
    pub preset: Preset,
    pub config: ModelConfig,
    /// The text of `config.json`.
    pub config_json: String,
    pub shards: Vec<ShardPlan>,
    /// The text of `model.safetensors.index.json`.
    pub index_json: String,
    /// Tensor bytes over all shards.
    pub total_bytes: u64,
    pub parameters: u64,
}

impl SynthPlan {
    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.shards.iter().map(|s| s.tensors.len()).sum()
    }
}

/// What [`synth_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub preset: Preset,
    pub dir: PathBuf,
    /// `config.json`, the index, then the shards.
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    pub parameters: u64,
    /// Tensor bytes.
    pub bytes: u64,
    /// Bytes of all files written.
    pub file_bytes: u64,
    pub seconds: f64,
}

impl fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "synthesised {} checkpoint in {}",
            self.preset.name(),
            self.dir.display()
        )?;
        writeln!(
            f,
            "  {} tensors, {} parameters, {:.3} GB of bf16 weights ({} files, {:.3} GB) in {:.1} s",
            self.tensors,
            self.parameters,
            self.bytes as f64 / 1e9,
            self.files.len(),
            self.file_bytes as f64 / 1e9,
            self.seconds
        )?;
        for p in &self.files {
            writeln!(f, "  {}", p.display())?;
        }
        write!(
            f,
            "  no tokenizer.json was written: copy the real model's tokenizer.json here to decode text"
        )
    }
}

/// Elements generated per work item (4 MB of bf16).
const CHUNK_ELEMS: usize = 2 << 20;
/// Work items generated in parallel at a time (128 MB; at most two batches exist).
const BATCH_CHUNKS: usize = 32;
/// Stream id separating synth draws from the denoiser's.
const SYNTH_STREAM: u64 = 0x5359_4E54_4845_5349; // "SYNTHESI"
/// Half-width of a uniform distribution with standard deviation 0.02 (0.02·√3).
const WEIGHT_HALF_WIDTH: f32 = 0.034_641_016;
/// Half-width of the noise on norm weights around 1.
const NORM_HALF_WIDTH: f32 = 0.1;

/// Plans the checkpoint of `preset`: config, shard assignment, headers and index.
pub fn plan(preset: Preset) -> Result<SynthPlan> {
    let fields = preset.config_fields();
    let config_json = ordered_json(&fields);
    let config = ModelConfig::from_json(&serde_json::from_str(&config_json).map_err(|e| {
        Error::invalid(format!("synth preset {}: bad config: {e}", preset.name()))
    })?)?;

    let mut tensors = tensor_table(&config).roles(&config);
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));

    // Greedy packing in name order: a new shard starts when the next tensor would overflow.
    let limit = preset.max_shard_bytes();
    let mut groups: Vec<Vec<(TensorSpec, Role)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (spec, role) in tensors {
        let bytes = 2 * spec.numel() as u64;
        let last = groups.last_mut().expect("non-empty");
        if !last.is_empty() && current + bytes > limit {
            groups.push(Vec::new());
            current = 0;
        }
        current += bytes;
        groups.last_mut().expect("non-empty").push((spec, role));
    }

    let n = groups.len();
    let mut shards = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    let mut total_bytes = 0u64;
    let mut parameters = 0u64;
    for (k, group) in groups.into_iter().enumerate() {
        let file_name = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let mut offset = 0u64;
        let mut planned = Vec::with_capacity(group.len());
        for (spec, role) in group {
            let bytes = 2 * spec.numel() as u64;
            weight_map.insert(spec.name.clone(), json!(file_name));
            parameters += spec.numel() as u64;
            planned.push(PlannedTensor {
                spec,
                role,
                offset,
                bytes,
            });
            offset += bytes;
        }
        total_bytes += offset;
        shards.push(ShardPlan {
            header: shard_header(&planned),
            file_name,
            tensors: planned,
            data_bytes: offset,
        });
    }
    let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
    let index_json = serde_json::to_string_pretty(&index)
        .map_err(|e| Error::invalid(format!("synth: cannot encode the index: {e}")))?;
    Ok(SynthPlan {
        preset,
        config,
        config_json,
        shards,
        index_json,
        total_bytes,
        parameters,
    })
}

/// The former name of [`synth_checkpoint`], from when every preset was LLaDA.
pub fn synth_llada(preset: Preset, out: &Path, seed: u64) -> Result<SynthSummary> {
    synth_checkpoint(preset, out, seed)
}

/// Writes the checkpoint of `preset` (either architecture) with weights drawn from `seed` into
/// `out` (created if needed). Refuses to overwrite an existing config, index or safetensors file
/// in `out`.
pub fn synth_checkpoint(preset: Preset, out: &Path, seed: u64) -> Result<SynthSummary> {
    let t0 = Instant::now();
    let plan = plan(preset)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let path = entry.map_err(|e| Error::io(out, e))?.path();
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == "config.json" || name == INDEX_FILE || name.ends_with(".safetensors") {
            return Err(Error::invalid(format!(
                "{}: already holds model files ({name}); refusing to overwrite, choose an empty directory",
                out.display()
            )));
        }
    }

    let mut files = Vec::new();
    let mut file_bytes = 0u64;
    for (name, text) in [
        ("config.json", &plan.config_json),
        (INDEX_FILE, &plan.index_json),
    ] {
        let path = out.join(name);
        let mut f = create_new(&path)?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(&path, e))?;
        file_bytes += text.len() as u64;
        files.push(path);
    }

    for shard in &plan.shards {
        let path = out.join(&shard.file_name);
        write_shard(&path, shard, seed)?;
        file_bytes += shard.file_bytes();
        files.push(path);
    }

    Ok(SynthSummary {
        preset,
        dir: out.to_path_buf(),
        files,
        tensors: plan.tensor_count(),
        parameters: plan.parameters,
        bytes: plan.total_bytes,
        file_bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Writes one shard: the header, then every tensor, generated [`BATCH_CHUNKS`] chunks at a
/// time in parallel while a writer thread writes the previous batch. At most two batches of
/// buffers exist at once.
fn write_shard(path: &Path, shard: &ShardPlan, seed: u64) -> Result<()> {
    let mut f = create_new(path)?;
    let io = |e| Error::io(path, e);
    f.write_all(&(shard.header.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(shard.header.as_bytes()).map_err(io)?;

    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(2 * BATCH_CHUNKS);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> std::io::Result<()> {
            for buf in full_rx {
                f.write_all(&buf)?;
                // The generator may have stopped; a lost buffer is fine then.
                let _ = empty_tx.send(buf);
            }
            f.flush()
        });

        let mut allocated = 0;
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH_CHUNKS);
        'tensors: for t in &shard.tensors {
            let key = tensor_key(seed, &t.spec.name);
            let numel = t.spec.numel();
            let chunks = numel.div_ceil(CHUNK_ELEMS);
            let mut first = 0;
            while first < chunks {
                let count = (chunks - first).min(BATCH_CHUNKS);
                while batch.len() < count {
                    let buf = match empty_rx.try_recv() {
                        Ok(b) => b,
                        Err(_) if allocated < 2 * BATCH_CHUNKS => {
                            allocated += 1;
                            Vec::new()
                        }
                        // The writer returns every buffer unless it failed.
                        Err(_) => match empty_rx.recv() {
                            Ok(b) => b,
                            Err(_) => break 'tensors,
                        },
                    };
                    batch.push(buf);
                }
                batch.par_iter_mut().enumerate().for_each(|(i, buf)| {
                    let start = (first + i) * CHUNK_ELEMS;
                    let len = CHUNK_ELEMS.min(numel - start);
                    buf.resize(2 * len, 0);
                    fill_bf16(t.role, key, start, buf);
                });
                for buf in batch.drain(..) {
                    if full_tx.send(buf).is_err() {
                        break 'tensors; // writer failed; its error is reported below
                    }
                }
                first += count;
            }
        }
        drop(full_tx);
        match writer.join() {
            Ok(r) => r.map_err(io),
            Err(_) => Err(Error::invalid(format!(
                "{}: writer thread panicked",
                path.display()
            ))),
        }
    })
}

/// The random key of one tensor: a function of the seed and the tensor's name only.
fn tensor_key(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, then the shared counter-based mixer.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    rng::bits(seed, SYNTH_STREAM, h, 0)
}

/// Value of element `index` of a tensor with `key` and `role` (before bf16 rounding).
pub fn synth_value(role: Role, key: u64, index: usize) -> f32 {
    let word = rng::mix64(key.wrapping_add((index / 4) as u64));
    let bits = (word >> (16 * (index % 4))) & 0xFFFF;
    to_value(role, bits)
}

#[inline]
fn to_value(role: Role, bits16: u64) -> f32 {
    // Uniform in (-1, 1), symmetric, never 0.
    let u = ((bits16 as f32) + 0.5) * (2.0 / 65536.0) - 1.0;
    match role {
        Role::Norm => 1.0 + NORM_HALF_WIDTH * u,
        Role::Linear | Role::Bias | Role::Embedding => WEIGHT_HALF_WIDTH * u,
    }
}

/// Fills `out` (little-endian bf16) with elements `start..start + out.len() / 2`.
/// `start` must be a multiple of 4.
fn fill_bf16(role: Role, key: u64, start: usize, out: &mut [u8]) {
    debug_assert_eq!(start % 4, 0);
    let base = key.wrapping_add((start / 4) as u64);
    let full = (out.len() / 8) as u64;
    let mut groups = out.chunks_exact_mut(8);
    for (g, group) in (&mut groups).enumerate() {
        let word = rng::mix64(base.wrapping_add(g as u64));
        let mut packed = 0u64;
        for j in 0..4 {
            let v = to_value(role, (word >> (16 * j)) & 0xFFFF);
            packed |= (bf16_bits(v) as u64) << (16 * j);
        }
        group.copy_from_slice(&packed.to_le_bytes());
    }
    let tail = groups.into_remainder();
    if !tail.is_empty() {
        let word = rng::mix64(base.wrapping_add(full));
        for (j, elem) in tail.chunks_exact_mut(2).enumerate() {
            let v = to_value(role, (word >> (16 * j)) & 0xFFFF);
            elem.copy_from_slice(&bf16_bits(v).to_le_bytes());
        }
    }
}

/// f32 → bf16 bits, round to nearest even (inputs are finite).
#[inline]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Pretty JSON object with the fields in the given order.
fn ordered_json(fields: &[(&str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("  {}: {}", Value::from(*k), v))
        .collect();
    format!("{{\n{}\n}}\n", body.join(",\n"))
}

/// The safetensors header of a shard, padded with spaces to a multiple of 8 bytes.
fn shard_header(tensors: &[PlannedTensor]) -> String {
    let mut h = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    for t in tensors {
        h.push_str(&format!(
            ",{}:{{\"dtype\":\"BF16\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            Value::from(t.spec.name.as_str()),
            json!(t.spec.shape),
            t.offset,
            t.offset + t.bytes
        ));
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llada_8b_plan_matches_the_real_layout() {
        let p = plan(Preset::Llada8b).unwrap();
        let c = &p.config;
        assert_eq!(
            (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads),
            (4096, 32, 32, 32)
        );
        assert_eq!(
            (c.mlp_hidden, c.vocab_size, c.embedding_size),
            (12288, 126464, 126464)
        );
        assert_eq!(
            (c.mask_token_id, c.eos_token_id, c.pad_token_id),
            (126336, 126081, 126081)
        );
        assert_eq!(
            (c.rope_theta, c.rms_norm_eps, c.max_seq_len),
            (500000.0, 1e-5, 4096)
        );
        assert!(!c.weight_tying && !c.include_qkv_bias);
        // Hand count: embedding and head 126464·4096 each, 32 blocks of
        // 4·4096² + 3·4096·12288 + 2·4096, final norm 4096.
        let per_block = 4 * 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096u64;
        let params = 2 * 126464 * 4096 + 32 * per_block + 4096;
        assert_eq!(params, 8_015_581_184);
        assert_eq!(p.parameters, params);
        assert_eq!(p.total_bytes, 2 * params); // ≈ 16.03 GB of bf16
        assert_eq!(p.tensor_count(), 32 * 9 + 3);
        assert_eq!(p.shards.len(), 6);
        let names: Vec<_> = p.shards.iter().map(|s| s.file_name.as_str()).collect();
        assert_eq!(names[0], "model-00001-of-00006.safetensors");
        assert_eq!(names[5], "model-00006-of-00006.safetensors");
        for s in &p.shards {
            assert!(
                s.data_bytes <= 3_000_000_000,
                "{} holds {}",
                s.file_name,
                s.data_bytes
            );
            assert_eq!(s.header.len() % 8, 0);
            // Offsets are contiguous from 0.
            let mut at = 0;
            for t in &s.tensors {
                assert_eq!(t.offset, at);
                at += t.bytes;
            }
            assert_eq!(at, s.data_bytes);
        }
        let index: Value = serde_json::from_str(&p.index_json).unwrap();
        assert_eq!(index["metadata"]["total_size"], json!(2 * params));
        assert_eq!(index["weight_map"].as_object().unwrap().len(), 291);
        assert_eq!(
            index["weight_map"]["model.transformer.wte.weight"],
            json!("model-00006-of-00006.safetensors")
        );
    }

    #[test]
    fn dream_7b_plan_matches_the_real_layout() {
        let p = plan(Preset::Dream7b).unwrap();
        let c = &p.config;
        assert_eq!(c.arch, Arch::Dream);
        assert!(c.shifted_logits() && c.include_qkv_bias && !c.weight_tying);
        assert_eq!(
            (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim()),
            (3584, 28, 28, 4, 128)
        );
        assert_eq!(
            (c.mlp_hidden, c.vocab_size, c.embedding_size),
            (18944, 152064, 152064)
        );
        assert_eq!(
            (c.mask_token_id, c.eos_token_id, c.pad_token_id),
            (151666, 151643, 151643)
        );
        assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6));
        // Hand count (Qwen2.5-7B's published 7,615,616,512): embedding and head 152064·3584
        // each; 28 layers of q, o 3584², k, v 512·3584, biases 3584 + 2·512, MLP 3·3584·18944,
        // two norms; the final norm.
        let per_layer =
            2 * 3584 * 3584 + 2 * 512 * 3584 + 3584 + 2 * 512 + 3 * 3584 * 18944 + 2 * 3584u64;
        let params = 2 * 152064 * 3584 + 28 * per_layer + 3584;
        assert_eq!(params, 7_615_616_512);
        assert_eq!(p.parameters, params);
        assert_eq!(p.total_bytes, 2 * params);
        assert_eq!(p.tensor_count(), 28 * 12 + 3);
        assert!(p.shards.len() >= 4 && p.shards.iter().all(|s| s.data_bytes <= 4_000_000_000));
        let index: Value = serde_json::from_str(&p.index_json).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), 339);
        for name in [
            "model.layers.27.self_attn.k_proj.bias",
            "lm_head.weight",
            "model.norm.weight",
        ] {
            assert!(map.contains_key(name), "{name}");
        }
        let config: Value = serde_json::from_str(&p.config_json).unwrap();
        assert_eq!(config["model_type"], json!("Dream"));
        assert_eq!(config["num_key_value_heads"], json!(4));
    }

    #[test]
    fn llada_moe_7b_plan_has_the_published_shape() {
        let p = plan(Preset::LladaMoe7b).unwrap();
        let c = &p.config;
        assert_eq!(c.arch, Arch::LladaMoe);
        assert!(!c.shifted_logits() && c.qk_norm && !c.include_qkv_bias && !c.weight_tying);
        assert_eq!(
            (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim()),
            (2048, 16, 16, 16, 128)
        );
        let x = c.experts.unwrap();
        assert_eq!(
            (x.n_experts, x.experts_per_token, c.mlp_hidden),
            (64, 8, 1024)
        );
        assert_eq!((c.mask_token_id, c.eos_token_id), (156895, 156892));
        assert_eq!(c.rope_theta, 50000.0);
        // Hand count (the model card's 7.36B total): embedding and head 157184·2048 each; 16
        // layers of q, k, v, o 2048², router 64·2048, 64 experts of 3·2048·1024, two norms,
        // two head norms of 128; the final norm.
        let per_layer = 4 * 2048 * 2048 + 64 * 2048 + 64 * 3 * 2048 * 1024 + 2 * 2048 + 2 * 128u64;
        let params = 2 * 157184 * 2048 + 16 * per_layer + 2048;
        assert_eq!(params, 7_356_880_896);
        assert_eq!(p.parameters, params);
        assert_eq!(p.tensor_count(), 16 * (4 + 1 + 64 * 3 + 2 + 2) + 3);
        assert!(p.shards.len() >= 4 && p.shards.iter().all(|s| s.data_bytes <= 4_000_000_000));
        let index: Value = serde_json::from_str(&p.index_json).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        for name in [
            "model.layers.15.mlp.experts.63.down_proj.weight",
            "model.layers.0.mlp.gate.weight",
            "model.layers.7.self_attn.k_norm.weight",
            "lm_head.weight",
        ] {
            assert!(map.contains_key(name), "{name}");
        }
        let config: Value = serde_json::from_str(&p.config_json).unwrap();
        assert_eq!(config["model_type"], json!("llada"));
        assert_eq!(config["architectures"], json!(["LLaDAMoEModelLM"]));
        assert_eq!(plan(Preset::LladaMoeTiny).unwrap().parameters, 921_664);
    }

    #[test]
    fn dream_tiny_plan_has_gqa_and_biases() {
        let p = plan(Preset::DreamTiny).unwrap();
        let c = &p.config;
        assert_eq!(
            (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads),
            (256, 4, 8, 2)
        );
        assert!(c.mask_token_id < c.vocab_size as u32 && c.eos_token_id < c.vocab_size as u32);
        assert_eq!(p.shards.len(), 1);
        let kb = p.shards[0]
            .tensors
            .iter()
            .find(|t| t.spec.name == "model.layers.3.self_attn.k_proj.bias")
            .unwrap();
        assert_eq!((kb.spec.shape.clone(), kb.role), (vec![64], Role::Bias));
    }

    #[test]
    fn values_are_chunking_independent_and_in_range() {
        let key = tensor_key(3, "w");
        let mut a = vec![0u8; 2 * 42];
        fill_bf16(Role::Linear, key, 0, &mut a);
        let mut b = vec![0u8; 2 * 22]; // 5 groups of 4 and a tail of 2
        fill_bf16(Role::Linear, key, 20, &mut b);
        assert_eq!(&a[40..], &b[..]);
        for i in 0..42 {
            let x = half::bf16::from_le_bytes([a[2 * i], a[2 * i + 1]]).to_f32();
            assert_eq!(
                x,
                half::bf16::from_f32(synth_value(Role::Linear, key, i)).to_f32()
            );
            assert!(x.abs() <= WEIGHT_HALF_WIDTH && x != 0.0);
        }
        let n = synth_value(Role::Norm, key, 5);
        assert!((0.9..=1.1).contains(&n));
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        for i in 0..100_000u64 {
            let u = rng::uniform(1, 2, 3, i) as f32;
            for x in [u * 0.07 - 0.035, 1.0 + (u - 0.5) * 0.2, u * 1e-30, -u * 3e5] {
                assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x}");
            }
        }
        // Ties round to even: 1 + 2^-8 sits halfway between two bf16 values.
        assert_eq!(
            bf16_bits(1.0 + 1.0 / 256.0),
            half::bf16::from_f32(1.0).to_bits()
        );
    }

    #[test]
    fn linear_weights_have_std_near_0_02() {
        let key = tensor_key(9, "model.transformer.blocks.0.q_proj.weight");
        let n = 100_000;
        let mean_sq: f64 = (0..n)
            .map(|i| (synth_value(Role::Linear, key, i) as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        let std = mean_sq.sqrt();
        assert!((std - 0.02).abs() < 0.0005, "std {std}");
    }

    #[test]
    fn preset_names() {
        assert_eq!(Preset::from_name("tiny").unwrap(), Preset::Tiny);
        assert_eq!(Preset::from_name("LLaDA-8B").unwrap(), Preset::Llada8b);
        assert_eq!(Preset::from_name("dream-7b").unwrap(), Preset::Dream7b);
        assert_eq!(Preset::from_name("dream-tiny").unwrap().arch(), Arch::Dream);
        assert!(Preset::from_name("huge")
            .unwrap_err()
            .to_string()
            .contains("huge"));
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "timing only"]
    fn fill_speed() {
        let mut buf = vec![0u8; 2 * CHUNK_ELEMS];
        let t = Instant::now();
        let n = 32;
        for i in 0..n {
            fill_bf16(Role::Linear, 5, i * CHUNK_ELEMS, &mut buf);
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / (n * CHUNK_ELEMS) as f64;
        eprintln!(
            "fill: {ns:.2} ns/element single-threaded, {:.2} GB/s",
            2.0 / ns
        );
    }
}
