//! `dllm info`: describe and validate a model directory; also the shared model loader of the CLI.

use super::{out, BackendChoice, ModelArgs};
use clap::Args;
use dllm::config::ModelConfig;
use dllm::error::Result;
use dllm::model::{load_model_with, Backend, CpuOptions, Model};
use dllm::tokenizer::Tokenizer;
use dllm::weights::WeightStore;
use std::sync::Arc;

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Loads the model and tokenizer named by `args`, printing backend fallbacks on stderr.
pub fn load(args: &ModelArgs) -> Result<(Arc<dyn Model>, Tokenizer)> {
    let model = load_only(args)?;
    let tok = Tokenizer::from_model_dir(&args.dir())?;
    Ok((model, tok))
}

/// Loads only the model (no tokenizer needed).
pub fn load_only(args: &ModelArgs) -> Result<Arc<dyn Model>> {
    args.apply_threads()?;
    let backend = match args.backend {
        BackendChoice::Auto => Backend::Auto,
        BackendChoice::Cpu => Backend::Cpu,
        BackendChoice::Cuda => Backend::Cuda,
    };
    let cpu = CpuOptions {
        bf16_activations: args.cpu_bf16.then_some(true),
    };
    if args.cpu_bf16 && !dllm::backend::cpu::skinny_bf16_available() {
        eprintln!("note: --cpu-bf16: this CPU has no AVX-512 BF16, the CPU backend keeps f32");
    }
    let loaded = load_model_with(&args.dir(), backend, cpu)?;
    if let Some(note) = &loaded.note {
        eprintln!("note: {note}");
    }
    Ok(loaded.model)
}

/// `dllm info`.
pub fn info(a: InfoArgs) -> Result<()> {
    let dir = a.model.dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(&dir)?;
    let table = dllm::model::tensor_table(&cfg);
    let report = store.validate(&table.specs(&cfg))?;
    let layout = format!(
        "{} · {} blocks (first q: {}) · q/k/v bias {} · lm_head {} · logits {}",
        table.embedding,
        table.blocks.len(),
        table.blocks.first().map(|b| b.q.as_str()).unwrap_or("-"),
        if cfg.include_qkv_bias { "yes" } else { "no" },
        table.lm_head.as_deref().unwrap_or("tied to the embedding"),
        if cfg.shifted_logits() {
            "shifted (row i predicts token i + 1)"
        } else {
            "unshifted"
        }
    );
    let tokenizer = Tokenizer::from_model_dir(&dir).map(|t| t.vocab_size());
    let dtypes: Vec<String> = store
        .dtypes()
        .iter()
        .map(|(d, n)| format!("{} ×{}", d.name(), n))
        .collect();
    let shards: Vec<String> = store
        .shard_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let cpu_bf16 = cpu_bf16_line(a.model.cpu_bf16);
    // A mixture the CUDA kernels cannot run: no device figures to give.
    let cuda_model = cfg.has_cuda_model();
    let cuda = match dllm::backend::cuda::unavailable_reason() {
        _ if !cuda_model => format!("no CUDA model for {} (it runs on the CPU)", cfg.arch.name()),
        None => format!(
            "kernels compiled ({})",
            dllm::backend::cuda::module_names().join(", ")
        ),
        Some(why) => why,
    };
    // With --backend cuda: the device, and the kernels its self-tests turned off (or why there
    // is no device).
    let device = if a.model.backend == BackendChoice::Cuda && cuda_model {
        Some(dllm::backend::cuda::device_report(0).map_err(|e| e.to_string()))
    } else {
        None
    };
    // What a CUDA load would put on the device, and what each canvas of a full context adds.
    let (dev_weights, (dev_step, dev_step_shared), dev_kv) = {
        use dllm::backend::cuda::memory::{kv_cache_bytes, weight_bytes, StepBuffers};
        (
            weight_bytes(&cfg),
            StepBuffers::per_canvas_and_shared(&cfg, cfg.max_seq_len, false),
            kv_cache_bytes(&cfg, 1, cfg.max_seq_len),
        )
    };
    if a.json {
        let v = serde_json::json!({
            "dir": dir.display().to_string(),
            "architecture": cfg.arch.name(),
            "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim(), "mlp_hidden": cfg.mlp_hidden,
            "vocab_size": cfg.vocab_size, "embedding_size": cfg.embedding_size,
            "max_seq_len": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id,
            "qkv_bias": cfg.include_qkv_bias, "shifted_logits": cfg.shifted_logits(),
            "qk_norm": cfg.qk_norm,
            "experts": cfg.experts.map(|x| x.n_experts),
            "experts_per_token": cfg.experts.map(|x| x.experts_per_token),
            "embedding_tensor": table.embedding, "lm_head_tensor": table.lm_head,
            "parameters": cfg.parameter_count(), "tensor_bytes": store.total_bytes(),
            "dtypes": dtypes, "shards": shards,
            "unexpected_tensors": report.unexpected,
            "tokenizer_vocab": tokenizer.as_ref().ok(),
            "cpu_bf16_activations": cpu_bf16,
            "cuda": cuda,
            "cuda_device": device.as_ref().map(|d| match d {
                Ok((description, _)) => description.clone(),
                Err(e) => format!("none: {e}"),
            }),
            "cuda_kernels_not_in_use": device.as_ref().and_then(|d| d.as_ref().ok()).map(|d| &d.1),
            "device_weight_bytes": cuda_model.then_some(dev_weights),
            "device_step_bytes_per_canvas": cuda_model.then_some(dev_step),
            "device_step_bytes_shared": cuda_model.then_some(dev_step_shared),
            "device_kv_cache_bytes_per_canvas": cuda_model.then_some(dev_kv),
            "cuda_switches": dllm::backend::cuda::switches()
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
            "valid": true,
        });
        out::line(&v)?;
        return Ok(());
    }
    out::line(format_args!("model        {}", dir.display()))?;
    out::line(format_args!("architecture {}", cfg.arch.name()))?;
    out::line(format_args!("layout       {layout}"))?;
    out::line(format_args!(
        "dims         d_model {} · layers {} · heads {} (kv {}) · head_dim {} · mlp {}",
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim(),
        cfg.mlp_hidden
    ))?;
    if let Some(x) = cfg.experts {
        out::line(format_args!(
            "experts      {} per layer · {} per token · hidden {} each{}",
            x.n_experts,
            x.experts_per_token,
            cfg.mlp_hidden,
            if cfg.qk_norm {
                " · q/k head norms"
            } else {
                ""
            }
        ))?;
    }
    out::line(format_args!(
        "vocab        {} (embedding rows {}) · mask {} · eos {} · pad {}",
        cfg.vocab_size, cfg.embedding_size, cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id
    ))?;
    out::line(format_args!(
        "context      {} tokens · rope_theta {} · rms_norm_eps {}",
        cfg.max_seq_len, cfg.rope_theta, cfg.rms_norm_eps
    ))?;
    out::line(format_args!(
        "parameters   {} ({:.2} M) · {:.1} MB of tensors · {}",
        cfg.parameter_count(),
        cfg.parameter_count() as f64 / 1e6,
        store.total_bytes() as f64 / 1e6,
        dtypes.join(", ")
    ))?;
    out::line(format_args!("shards       {}", shards.len()))?;
    for s in &shards {
        out::line(format_args!("             {s}"))?;
    }
    match &tokenizer {
        Ok(n) => out::line(format_args!("tokenizer    {n} tokens"))?,
        Err(e) => out::line(format_args!("tokenizer    none ({e})"))?,
    }
    for name in &report.unexpected {
        out::line(format_args!("extra tensor {name} (ignored)"))?;
    }
    out::line(format_args!("cpu bf16     {cpu_bf16}"))?;
    out::line(format_args!("cuda         {cuda}"))?;
    out::line(format_args!(
        "cuda config  {}",
        dllm::backend::cuda::switches_line()
    ))?;
    if let Some(Err(e)) = &device {
        out::line(format_args!("cuda device  none: {e}"))?;
    }
    if let Some(Ok((description, inactive))) = &device {
        out::line(format_args!("cuda device  {description}"))?;
        if inactive.is_empty() {
            out::line(format_args!(
                "cuda kernels every kernel asked for is in use (load-time self-tests passed)"
            ))?;
        }
        for why in inactive {
            out::line(format_args!("cuda kernels not in use: {why}"))?;
        }
    }
    if cuda_model {
        use dllm::memory::human_bytes;
        out::line(format_args!(
            "cuda memory  weights {} · step buffers {} + {} per canvas of {} tokens · K/V cache {} \
             per canvas",
            human_bytes(dev_weights),
            human_bytes(dev_step_shared),
            human_bytes(dev_step),
            cfg.max_seq_len,
            human_bytes(dev_kv)
        ))?;
    }
    out::line(format_args!(
        "validation   ok: every tensor matches the config"
    ))?;
    Ok(())
}

/// Whether a CPU model would round its activations to bf16 (`--cpu-bf16` given as `flag`, or
/// `DLLM_CPU_BF16=1`), and whether this CPU can.
fn cpu_bf16_line(flag: bool) -> String {
    let asked = flag || dllm::model::transformer::bf16_activations_from_env();
    match (asked, dllm::backend::cpu::skinny_bf16_available()) {
        (true, true) => "on (AVX-512 BF16)".to_string(),
        (true, false) => "asked for, but this CPU has no AVX-512 BF16: f32".to_string(),
        (false, true) => "off (--cpu-bf16 or DLLM_CPU_BF16=1 turn it on)".to_string(),
        (false, false) => "off (this CPU has no AVX-512 BF16)".to_string(),
    }
}
