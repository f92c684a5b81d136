//! `dllm bench`: times generation under a fixed schedule, so the work does not depend on the
//! weights (random checkpoints from `dllm synth` give representative numbers).
//!
//! Canvases are random prompt ids followed by `gen_len` masks. Each block of `block_len`
//! positions takes `block_len / tokens_per_step` steps; every step commits exactly
//! `tokens_per_step` still-masked positions of the block (the most confident, greedy). Cache
//! `none`: every step is a full forward (logits only for the block's rows). Cache `dual`
//! (Fast-dLLM): the first step of a block is a full forward that stores K/V, the others run
//! only the block against the cache. One warm-up generation runs first; then the whole
//! generation is timed with the device synchronised.
//!
//! `--session` times the same schedule through the [`Session`](crate::denoise::Session) API instead
//! (what `dllm generate` runs: per step the canvas goes to the model and the predictions come
//! back to the host, which commits), with `batch` sessions stepped together
//! ([`run_batch`](crate::denoise::batch::run_batch)); on a random checkpoint the commit counts
//! are the same, so the two numbers compare the paths.
//!
//! On CUDA the report also has the device's copy bandwidth (a 1 GiB device-to-device copy,
//! counting bytes read + written) and the roofline fraction: the time the weights take to
//! stream at that bandwidth divided by the measured time per step; whether the block steps ran
//! as CUDA graphs (`DLLM_CUDA_GRAPH=0` turns them off) and a hash of the final canvases (equal
//! hashes with graphs on and off show the replay is bit-identical); and, for the dual cache, an
//! untimed extra generation that synchronises after every step to split the time between the
//! full-forward steps and the block steps.

use crate::config::ModelConfig;
use crate::denoise::commit::{top_k, Candidate};
use crate::denoise::predict::PredictRule;
use crate::denoise::rng;
use crate::error::{Error, Result};
use crate::model::kv_cache::{
    span_with_vicinity, CacheMode::Dual as DualCache, CacheStep, KvCache,
};
use crate::model::{BatchQuery, CachedQuery, Model};
use serde::Serialize;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

/// KV cache mode of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Every step is a full forward.
    None,
    /// Fast-dLLM dual cache: full forward at block start, block forwards after.
    Dual,
}

/// Where the bench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchBackend {
    /// CUDA when available, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    pub model_dir: PathBuf,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub block_len: usize,
    pub tokens_per_step: usize,
    pub cache: CacheMode,
    /// Untimed generations before the timed one.
    pub warmup: usize,
    pub backend: BenchBackend,
    /// Keys the random prompt ids.
    pub seed: u64,
    /// After the timed run, one more untimed run with every operation timed by CUDA events
    /// ([`BenchReport::profile`]; CUDA only).
    pub profile: bool,
    /// Time the [`Session`](crate::denoise::Session) path (`dllm generate`) instead of the
    /// device-resident step API.
    pub session: bool,
    /// bf16 activations on the CPU backend ([`CpuOptions`](crate::model::CpuOptions); `None`:
    /// the `DLLM_CPU_BF16` switch).
    pub cpu_bf16: Option<bool>,
    /// The vicinity cache update of the dual cache's span steps (0 = off;
    /// [`crate::model::kv_cache::span_with_vicinity`]): the CPU runs and `--session` runs; the
    /// device-resident CUDA step API has none.
    pub vicinity: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            model_dir: PathBuf::from("models/tiny-llada-code"),
            batch: 1,
            prompt_len: 128,
            gen_len: 256,
            block_len: 32,
            tokens_per_step: 1,
            cache: CacheMode::None,
            warmup: 1,
            backend: BenchBackend::Auto,
            seed: 0,
            profile: false,
            session: false,
            cpu_bf16: None,
            vicinity: 0,
        }
    }
}

/// What one step of the fixed schedule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchStep {
    pub block: usize,
    /// Canvas positions of the block.
    pub span: Range<usize>,
    /// Tokens committed per canvas.
    pub k: usize,
    /// Run only the block against the cache (dual cache, not the block's first step).
    pub use_cache: bool,
    /// Full forward that stores K/V (dual cache, block's first step).
    pub store_cache: bool,
}

/// The measured result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub device: String,
    pub model_dir: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub block_len: usize,
    pub tokens_per_step: usize,
    pub cache: CacheMode,
    /// The vicinity of the dual cache's span steps (0 = off).
    pub vicinity: usize,
    pub steps: usize,
    pub seconds: f64,
    pub tok_per_s: f64,
    pub ms_per_step: f64,
    pub warmup_seconds: f64,
    pub load_seconds: f64,
    /// Bytes of weights one forward streams.
    pub weight_bytes: Option<usize>,
    /// Device-to-device copy bandwidth (GB/s, read + written), CUDA only.
    pub copy_gbps: Option<f64>,
    /// (weight_bytes / copy bandwidth) / ms_per_step, CUDA only.
    pub roofline_fraction: Option<f64>,
    /// Masks left in the canvases after the timed generation (0 when the schedule ran fully).
    pub masks_left: usize,
    /// Whether the block steps could run as CUDA graphs (CUDA only).
    pub graphs: Option<bool>,
    /// Block-step graphs captured by the end of the run (CUDA only).
    pub graph_count: Option<usize>,
    /// Why graph capture failed and the run fell back to eager steps (CUDA only).
    pub graph_error: Option<String>,
    /// FNV-1a 64 of the final canvases (little-endian u32 ids), hex.
    pub canvas_hash: String,
    /// Mean ms of a full-forward step, measured with a sync after every step (dual, CUDA only).
    pub full_step_ms: Option<f64>,
    /// Mean ms of a block step, measured the same way (dual, CUDA only).
    pub block_step_ms: Option<f64>,
    /// Per-operation GPU time of an eager run (`--profile`, CUDA only).
    pub profile: Option<Vec<ProfileRow>>,
    /// The `DLLM_*` kernel and launch switches in effect (CUDA only; `backend::cuda::switches`).
    pub switches: Option<std::collections::BTreeMap<&'static str, serde_json::Value>>,
}

/// One operation's mean time per step of one kind, from an eager run with an event after every
/// operation (each time includes the launch gap before the operation's kernel).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileRow {
    /// "full" (full forwards: every step without a cache, each block's first with the dual
    /// cache) or "block" (block steps against the cache).
    pub step: &'static str,
    pub op: &'static str,
    pub ms_per_step: f64,
    pub calls_per_step: f64,
    /// Fraction of the profiled step time of this kind.
    pub share: f64,
}

/// Mean per-step rows of `kind` from the totals over `steps` steps of that kind.
pub fn profile_rows(
    kind: &'static str,
    totals: &[crate::backend::cuda::profile::OpTime],
    steps: usize,
) -> Vec<ProfileRow> {
    let n = steps.max(1) as f64;
    let all: f64 = totals.iter().map(|o| o.ms).sum();
    totals
        .iter()
        .map(|o| ProfileRow {
            step: kind,
            op: o.op,
            ms_per_step: o.ms / n,
            calls_per_step: o.calls as f64 / n,
            share: if all > 0.0 { o.ms / all } else { 0.0 },
        })
        .collect()
}

/// FNV-1a 64 over the little-endian bytes of `ids`, as 16 hex digits.
pub fn canvas_hash(ids: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ids.iter().flat_map(|x| x.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl BenchReport {
    /// The report as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Most canvases one bench run may batch (the CPU path holds `batch × block_len` logits rows
/// per step; the CUDA path sizes its buffers by the batch).
pub const MAX_BATCH: usize = 1024;

impl BenchOptions {
    /// Checks the shape of the run (independent of the model).
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::invalid("bench: --batch must be at least 1"));
        }
        if self.batch > MAX_BATCH {
            return Err(Error::invalid(format!(
                "bench: --batch {} exceeds the most supported, {MAX_BATCH}",
                self.batch
            )));
        }
        if self.prompt_len.checked_add(self.gen_len).is_none() {
            return Err(Error::invalid(format!(
                "bench: --prompt-len {} + --gen-len {} overflows",
                self.prompt_len, self.gen_len
            )));
        }
        if self.gen_len == 0 || self.block_len == 0 || self.tokens_per_step == 0 {
            return Err(Error::invalid(
                "bench: --gen-len, --block-len and --tokens-per-step must be at least 1",
            ));
        }
        if !self.gen_len.is_multiple_of(self.block_len) {
            return Err(Error::invalid(format!(
                "bench: --gen-len {} is not a multiple of --block-len {}",
                self.gen_len, self.block_len
            )));
        }
        if self.vicinity > 0 && self.cache != CacheMode::Dual {
            return Err(Error::invalid(format!(
                "bench: --vicinity {} widens the dual cache's span steps: add --cache dual",
                self.vicinity
            )));
        }
        if !self.block_len.is_multiple_of(self.tokens_per_step) {
            return Err(Error::invalid(format!(
                "bench: --block-len {} is not a multiple of --tokens-per-step {}",
                self.block_len, self.tokens_per_step
            )));
        }
        Ok(())
    }

    /// Canvas length (saturating: [`BenchOptions::validate`] refuses an overflow).
    pub fn seq_len(&self) -> usize {
        self.prompt_len.saturating_add(self.gen_len)
    }
}

/// The fixed schedule: per block, `block_len / tokens_per_step` steps of `tokens_per_step`.
pub fn schedule(o: &BenchOptions) -> Result<Vec<BenchStep>> {
    o.validate()?;
    let per_block = o.block_len / o.tokens_per_step;
    let mut steps = Vec::with_capacity(o.gen_len / o.tokens_per_step);
    for block in 0..o.gen_len / o.block_len {
        let start = o.prompt_len + block * o.block_len;
        for i in 0..per_block {
            let dual = o.cache == CacheMode::Dual;
            steps.push(BenchStep {
                block,
                span: start..start + o.block_len,
                k: o.tokens_per_step,
                use_cache: dual && i > 0,
                store_cache: dual && i == 0,
            });
        }
    }
    Ok(steps)
}

/// `batch` canvases of random prompt ids (never the mask id, below `vocab_size`) and masks.
pub fn canvases(o: &BenchOptions, cfg: &ModelConfig) -> Vec<u32> {
    let mut out = Vec::with_capacity(o.batch * o.seq_len());
    let vocab = cfg.vocab_size.min(cfg.embedding_size) as f64;
    for b in 0..o.batch {
        for p in 0..o.prompt_len {
            let mut id = (rng::uniform(o.seed, 0x62656E6368, b as u64, p as u64) * vocab) as u32;
            if id == cfg.mask_token_id || id as usize >= cfg.vocab_size {
                id = if cfg.mask_token_id == 0 { 1 } else { 0 };
            }
            out.push(id);
        }
        out.resize(out.len() + o.gen_len, cfg.mask_token_id);
    }
    out
}

/// Whether the bench runs on CUDA: asked for, or `auto` with a device and compiled kernels.
fn uses_cuda(o: &BenchOptions) -> bool {
    match o.backend {
        BenchBackend::Cpu => false,
        BenchBackend::Cuda => true,
        BenchBackend::Auto => crate::backend::cuda::unavailable_reason().is_none(),
    }
}

/// The three workloads the CUDA issue's targets name (prompt 128, 256 generated, blocks of 32):
/// `b1_dual_k4` (batch 1, dual cache, 4 tokens per step), `b8_dual_k4` (batch 8, the same) and
/// `b1_none_k1` (batch 1, no cache, 1 token per step), each with `base`'s model, backend, seed,
/// warm-up and report options.
pub fn suite(base: &BenchOptions) -> Vec<(&'static str, BenchOptions)> {
    let w = |batch, tokens_per_step, cache| BenchOptions {
        batch,
        prompt_len: 128,
        gen_len: 256,
        block_len: 32,
        tokens_per_step,
        cache,
        ..base.clone()
    };
    vec![
        ("b1_dual_k4", w(1, 4, CacheMode::Dual)),
        ("b8_dual_k4", w(8, 4, CacheMode::Dual)),
        ("b1_none_k1", w(1, 1, CacheMode::None)),
    ]
}

/// Runs `runs` in order, calling `done(name, report)` after each. On CUDA (and not `session`)
/// the model is loaded once for all of them (each report's `load_seconds` is that one load);
/// otherwise each run loads its own. All runs must share the model, backend and `session`.
pub fn run_suite(
    runs: &[(&str, BenchOptions)],
    mut done: impl FnMut(&str, &BenchReport) -> Result<()>,
) -> Result<()> {
    let Some((_, first)) = runs.first() else {
        return Ok(());
    };
    if runs.iter().any(|(_, o)| {
        o.model_dir != first.model_dir || o.backend != first.backend || o.session != first.session
    }) {
        return Err(Error::invalid(
            "bench suite: every run must use the same model, backend and path",
        ));
    }
    // Schedules first: a bad one is refused before anything loads.
    let schedules = runs
        .iter()
        .map(|(_, o)| schedule(o))
        .collect::<Result<Vec<_>>>()?;
    if first.session || !uses_cuda(first) {
        for (name, o) in runs {
            done(name, &run_bench(o)?)?;
        }
        return Ok(());
    }
    let t0 = Instant::now();
    let model = crate::backend::cuda::transformer::CudaTransformer::load(&first.model_dir)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    for ((name, o), steps) in runs.iter().zip(&schedules) {
        done(name, &run_cuda_on(&model, load_seconds, o, steps)?)?;
    }
    Ok(())
}

/// Runs the bench described by `o`.
pub fn run_bench(o: &BenchOptions) -> Result<BenchReport> {
    let steps = schedule(o)?;
    if o.session {
        return run_session(o, steps.len());
    }
    if uses_cuda(o) {
        run_cuda(o, &steps)
    } else {
        run_cpu(o, &steps)
    }
}

fn report(
    o: &BenchOptions,
    backend: &str,
    device: String,
    n_steps: usize,
    seconds: f64,
) -> BenchReport {
    BenchReport {
        backend: backend.into(),
        device,
        model_dir: o.model_dir.display().to_string(),
        batch: o.batch,
        prompt_len: o.prompt_len,
        gen_len: o.gen_len,
        block_len: o.block_len,
        tokens_per_step: o.tokens_per_step,
        cache: o.cache,
        vicinity: o.vicinity,
        steps: n_steps,
        seconds,
        tok_per_s: (o.batch * o.gen_len) as f64 / seconds,
        ms_per_step: seconds * 1e3 / n_steps.max(1) as f64,
        warmup_seconds: 0.0,
        load_seconds: 0.0,
        weight_bytes: None,
        copy_gbps: None,
        roofline_fraction: None,
        masks_left: 0,
        graphs: None,
        graph_count: None,
        graph_error: None,
        canvas_hash: String::new(),
        full_step_ms: None,
        block_step_ms: None,
        profile: None,
        switches: None,
    }
}

/// `--session`: `batch` greedy sessions of the bench canvases with `gen_len / tokens_per_step`
/// steps (the LLaDA schedule then commits exactly `tokens_per_step` per step): one session runs
/// alone ([`Session::run`](crate::denoise::Session::run), as `dllm generate` does), several are
/// stepped together by [`run_batch`](crate::denoise::batch::run_batch) (as a batch file is:
/// without a cache in packed rounds, with one each session after the other unless the model
/// packs cached steps: the CPU backend, CUDA with `DLLM_PACKED_SESSIONS=1`).
/// Warm-up runs first (their time is the report's `warmup_seconds`: a cold run, graph captures
/// included), then one timed run.
fn run_session(o: &BenchOptions, n_steps: usize) -> Result<BenchReport> {
    use crate::denoise::{batch::run_batch, Decoding, GenerationParams, Session};
    if o.profile {
        return Err(Error::invalid(
            "--profile times the device-resident step API: drop --session",
        ));
    }
    let t0 = Instant::now();
    let (model, cuda) = session_model(o)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let init = canvases(o, &cfg);
    let seq = o.seq_len();
    let params = GenerationParams {
        steps: n_steps,
        block_len: o.block_len,
        ..GenerationParams::default()
    };
    let decoding = Decoding {
        cache: match o.cache {
            CacheMode::None => crate::model::CacheMode::None,
            CacheMode::Dual => crate::model::CacheMode::Dual,
        },
        vicinity: o.vicinity,
        ..Decoding::default()
    };
    let run = || -> Result<Vec<u32>> {
        let mut sessions = init
            .chunks(seq)
            .map(|c| {
                let mut s = Session::new(model.clone(), c.to_vec(), params.clone())?;
                s.set_decoding(decoding.clone())?;
                Ok(s)
            })
            .collect::<Result<Vec<Session>>>()?;
        match sessions.as_mut_slice() {
            [one] => one.run()?,
            many => {
                run_batch(many)?;
            }
        }
        Ok(sessions.iter().flat_map(|s| s.canvas().to_vec()).collect())
    };
    let t1 = Instant::now();
    for _ in 0..o.warmup {
        run()?;
    }
    let warmup_seconds = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let fin = run()?;
    let secs = t2.elapsed().as_secs_f64();
    let device = cuda
        .as_ref()
        .map_or_else(|| cpu_device(o), |m| m.device().name.clone());
    let mut r = report(
        o,
        &format!("{} session", model.backend_name()),
        device,
        n_steps,
        secs,
    );
    r.load_seconds = load_seconds;
    r.warmup_seconds = warmup_seconds;
    r.masks_left = fin.iter().filter(|&&t| t == cfg.mask_token_id).count();
    r.canvas_hash = canvas_hash(&fin);
    if let Some(m) = cuda {
        r.switches = Some(m.effective_switches().into_iter().collect());
        r.graphs = Some(m.graphs_enabled());
        r.graph_count = Some(m.graph_count());
        r.graph_error = m.graph_error();
    }
    Ok(r)
}

/// The model of a `--session` run behind the [`Model`] trait, and the CUDA model itself when the
/// backend is CUDA (for the report's graph fields).
#[allow(clippy::type_complexity)]
fn session_model(
    o: &BenchOptions,
) -> Result<(
    std::sync::Arc<dyn Model>,
    Option<std::sync::Arc<crate::backend::cuda::transformer::CudaTransformer>>,
)> {
    if uses_cuda(o) {
        let m = std::sync::Arc::new(crate::backend::cuda::transformer::CudaTransformer::load(
            &o.model_dir,
        )?);
        Ok((m.clone(), Some(m)))
    } else {
        Ok((load_cpu_model(o)?, None))
    }
}

/// Loads the CPU model of `o` (any architecture) behind the [`Model`] trait.
fn load_cpu_model(o: &BenchOptions) -> Result<std::sync::Arc<dyn Model>> {
    let options = crate::model::CpuOptions {
        bf16_activations: o.cpu_bf16,
    };
    crate::model::load_cpu_with(&o.model_dir, options)
}

/// Whether `o`'s CPU model rounds activations to bf16 (asked for, and the CPU can).
fn cpu_bf16_on(o: &BenchOptions) -> bool {
    crate::model::CpuOptions {
        bf16_activations: o.cpu_bf16,
    }
    .bf16_on()
}

/// CPU path through the [`Model`] trait, predictions committed on the host. Cache `none`: each
/// step predicts every canvas in one packed forward ([`Model::predict_batch`]: the weights are
/// read once for the batch). Cache `dual`: each canvas keeps its own [`KvCache`], refreshed by
/// the block's first step and read by the others, which compute only the block's rows (the
/// span of [`crate::model::kv_cache::span_for`], one row wider for shifted architectures,
/// widened by the vicinity), as `dllm generate --cache dual [--vicinity N]` does.
fn run_cpu(o: &BenchOptions, steps: &[BenchStep]) -> Result<BenchReport> {
    if o.profile {
        return Err(Error::invalid(
            "--profile times CUDA operations with CUDA events: the CPU backend has no op profile",
        ));
    }
    let t0 = Instant::now();
    let model = load_cpu_model(o)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    if o.seq_len() > cfg.max_seq_len {
        return Err(Error::invalid(format!(
            "bench: canvas of {} exceeds max_seq_len {}",
            o.seq_len(),
            cfg.max_seq_len
        )));
    }
    let run = |canv: &mut Vec<u32>| run_host_steps(model.as_ref(), o, steps, canv);
    let t1 = Instant::now();
    for _ in 0..o.warmup {
        run(&mut canvases(o, &cfg))?;
    }
    let warmup_seconds = t1.elapsed().as_secs_f64();
    let mut canv = canvases(o, &cfg);
    let t2 = Instant::now();
    run(&mut canv)?;
    let secs = t2.elapsed().as_secs_f64();
    let mut r = report(o, "cpu", cpu_device(o), steps.len(), secs);
    r.load_seconds = load_seconds;
    r.warmup_seconds = warmup_seconds;
    r.masks_left = canv.iter().filter(|&&t| t == cfg.mask_token_id).count();
    r.canvas_hash = canvas_hash(&canv);
    Ok(r)
}

/// The fixed schedule on `canv` (`o.batch` canvases of `o.seq_len()` ids, one after another)
/// through the [`Model`] trait, predictions committed on the host (see [`run_cpu`]).
fn run_host_steps(
    model: &dyn Model,
    o: &BenchOptions,
    steps: &[BenchStep],
    canv: &mut [u32],
) -> Result<()> {
    let cfg = model.config();
    let s = o.seq_len();
    let mut caches: Vec<KvCache> = match o.cache {
        CacheMode::Dual => (0..o.batch).map(|_| KvCache::new(cfg, s)).collect(),
        CacheMode::None => Vec::new(),
    };
    for (i, st) in steps.iter().enumerate() {
        let rule = PredictRule::greedy(cfg, i as u64);
        let queries: Vec<Vec<usize>> = canv
            .chunks(s)
            .map(|c| {
                st.span
                    .clone()
                    .filter(|&p| c[p] == cfg.mask_token_id)
                    .collect()
            })
            .collect();
        let preds = if caches.is_empty() {
            let items: Vec<BatchQuery> = canv
                .chunks(s)
                .zip(&queries)
                .map(|(ids, q)| BatchQuery {
                    ids,
                    queries: q,
                    rule: &rule,
                })
                .collect();
            model.predict_batch(&items)?
        } else {
            let span = span_with_vicinity(
                DualCache,
                st.span.clone(),
                s,
                cfg.shifted_logits(),
                o.vicinity,
            );
            let step = match span {
                Some(span) if st.use_cache => CacheStep::Span(span),
                _ => CacheStep::Refresh,
            };
            // One call for the batch: the CPU backend packs the canvases' span rows.
            let mut items: Vec<CachedQuery> = canv
                .chunks(s)
                .zip(&queries)
                .zip(caches.iter_mut())
                .map(|((ids, q), cache)| CachedQuery {
                    ids,
                    queries: q,
                    rule: &rule,
                    cache,
                    step: step.clone(),
                })
                .collect();
            model.predict_cached_batch(&mut items)?
        };
        for ((c, q), p) in canv.chunks_mut(s).zip(&queries).zip(&preds) {
            let cands: Vec<Candidate> = q
                .iter()
                .zip(p)
                .map(|(&position, p)| Candidate {
                    position,
                    confidence: p.confidence,
                })
                .collect();
            for j in top_k(&cands, st.k) {
                c[q[j]] = p[j].token;
            }
        }
    }
    Ok(())
}

fn run_cuda(o: &BenchOptions, steps: &[BenchStep]) -> Result<BenchReport> {
    use crate::backend::cuda::transformer::CudaTransformer;
    check_no_vicinity(o)?;
    let t0 = Instant::now();
    let model = CudaTransformer::load(&o.model_dir)?;
    run_cuda_on(&model, t0.elapsed().as_secs_f64(), o, steps)
}

/// The device-resident CUDA step API computes the block's rows only: a vicinity is refused
/// rather than ignored.
fn check_no_vicinity(o: &BenchOptions) -> Result<()> {
    if o.vicinity > 0 {
        return Err(Error::invalid(
            "bench: the device-resident CUDA step API has no --vicinity: add --session \
             (the Session path, as dllm generate) or use --backend cpu",
        ));
    }
    Ok(())
}

/// [`run_cuda`] on a loaded model (its load took `load_seconds`).
fn run_cuda_on(
    model: &crate::backend::cuda::transformer::CudaTransformer,
    load_seconds: f64,
    o: &BenchOptions,
    steps: &[BenchStep],
) -> Result<BenchReport> {
    check_no_vicinity(o)?;
    let cfg = model.config().clone();
    let dev = model.device().clone();
    let copy_gbps = copy_bandwidth_gbps(&dev)?;
    model.reserve(o.batch, o.seq_len())?;
    let init = canvases(o, &cfg);
    let run = || -> Result<()> {
        model.set_canvases(&init, o.batch, o.seq_len())?;
        for (i, st) in steps.iter().enumerate() {
            cuda_step(model, &cfg, i, st)?;
        }
        dev.sync()
    };
    let t1 = Instant::now();
    for _ in 0..o.warmup {
        run()?;
    }
    let warmup_seconds = t1.elapsed().as_secs_f64();
    dev.sync()?;
    let t2 = Instant::now();
    run()?;
    let secs = t2.elapsed().as_secs_f64();
    let mut r = report(o, "cuda", dev.name.clone(), steps.len(), secs);
    r.switches = Some(model.effective_switches().into_iter().collect());
    r.load_seconds = load_seconds;
    r.warmup_seconds = warmup_seconds;
    r.weight_bytes = Some(model.weight_bytes());
    r.copy_gbps = Some(copy_gbps);
    let floor_ms = model.weight_bytes() as f64 / (copy_gbps * 1e9) * 1e3;
    r.roofline_fraction = Some(floor_ms / r.ms_per_step);
    let fin = model.canvases()?;
    r.masks_left = fin.iter().filter(|&&t| t == cfg.mask_token_id).count();
    r.canvas_hash = canvas_hash(&fin);
    r.graphs = Some(model.graphs_enabled());
    r.graph_count = Some(model.graph_count());
    r.graph_error = model.graph_error();
    if o.cache == CacheMode::Dual {
        // Untimed breakdown: a sync after every step splits full-forward and block steps.
        model.set_canvases(&init, o.batch, o.seq_len())?;
        dev.sync()?;
        let (mut full, mut block) = ((0.0f64, 0usize), (0.0f64, 0usize));
        for (i, st) in steps.iter().enumerate() {
            let t = Instant::now();
            cuda_step(model, &cfg, i, st)?;
            dev.sync()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let acc = if st.use_cache { &mut block } else { &mut full };
            acc.0 += ms;
            acc.1 += 1;
        }
        let mean = |(t, n): (f64, usize)| (n > 0).then(|| t / n as f64);
        r.full_step_ms = mean(full);
        r.block_step_ms = mean(block);
    }
    if o.profile {
        r.profile = Some(profile_cuda(model, &init, o, steps)?);
    }
    Ok(r)
}

/// Step `i` of the schedule on the device canvases (greedy).
fn cuda_step(
    model: &crate::backend::cuda::transformer::CudaTransformer,
    cfg: &ModelConfig,
    i: usize,
    st: &BenchStep,
) -> Result<()> {
    model.step(
        st.span.clone(),
        st.use_cache,
        st.store_cache,
        &PredictRule::greedy(cfg, i as u64),
        st.k,
    )
}

/// One untimed eager run of `steps` with every operation timed ([`BenchReport::profile`]).
fn profile_cuda(
    model: &crate::backend::cuda::transformer::CudaTransformer,
    init: &[u32],
    o: &BenchOptions,
    steps: &[BenchStep],
) -> Result<Vec<ProfileRow>> {
    use crate::backend::cuda::profile::accumulate;
    let cfg = model.config().clone();
    model.set_canvases(init, o.batch, o.seq_len())?;
    let (mut full, mut block) = ((Vec::new(), 0usize), (Vec::new(), 0usize));
    for (i, st) in steps.iter().enumerate() {
        model.profile_start()?;
        let stepped = cuda_step(model, &cfg, i, st);
        // Close the recording whatever the step did; the step's error comes first.
        let times = model.profile_finish();
        stepped?;
        let times = times?;
        let acc = if st.use_cache { &mut block } else { &mut full };
        accumulate(&mut acc.0, &times);
        acc.1 += 1;
    }
    let mut rows = profile_rows("full", &full.0, full.1);
    if block.1 > 0 {
        rows.extend(profile_rows("block", &block.0, block.1));
    }
    Ok(rows)
}

/// The CPU backend's "device": its thread count, and whether it rounds activations to bf16.
fn cpu_device(o: &BenchOptions) -> String {
    let bf16 = if cpu_bf16_on(o) {
        ", bf16 activations"
    } else {
        ""
    };
    format!("{} CPU threads{bf16}", rayon::current_num_threads())
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written) over a 1 GiB buffer,
/// median of 5 after one warm-up.
pub fn copy_bandwidth_gbps(dev: &crate::backend::cuda::CudaDevice) -> Result<f64> {
    use crate::backend::cuda::{check, cuda_err};
    let n = 1usize << 30;
    let src = dev
        .stream
        .alloc_zeros::<u8>(n)
        .map_err(|e| cuda_err("allocate copy source", e))?;
    let mut dst = dev
        .stream
        .alloc_zeros::<u8>(n)
        .map_err(|e| cuda_err("allocate copy destination", e))?;
    let ms = check::time_median_ms(dev, 1, 5, |_| {
        dev.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| cuda_err("device copy", e))
    })?;
    Ok(2.0 * n as f64 / (ms / 1e3) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoise::predict::Prediction;

    fn opts(cache: CacheMode, k: usize) -> BenchOptions {
        BenchOptions {
            cache,
            tokens_per_step: k,
            ..BenchOptions::default()
        }
    }

    #[test]
    fn dual_schedule_refreshes_the_cache_at_each_block_start() {
        let s = schedule(&opts(CacheMode::Dual, 4)).unwrap();
        // 256 / 32 = 8 blocks of 32 / 4 = 8 steps.
        assert_eq!(s.len(), 64);
        for (i, st) in s.iter().enumerate() {
            assert_eq!(st.block, i / 8);
            assert_eq!(st.span, 128 + 32 * (i / 8)..128 + 32 * (i / 8 + 1));
            assert_eq!(st.k, 4);
            assert_eq!(st.store_cache, i % 8 == 0);
            assert_eq!(st.use_cache, i % 8 != 0);
        }
        // Every generated position is covered by exactly block_len / k steps committing k.
        let committed: usize = s.iter().map(|st| st.k).sum();
        assert_eq!(committed, 256);
    }

    #[test]
    fn no_cache_schedule_is_all_full_forwards() {
        let s = schedule(&opts(CacheMode::None, 1)).unwrap();
        assert_eq!(s.len(), 256);
        assert!(s
            .iter()
            .all(|st| !st.use_cache && !st.store_cache && st.k == 1));
        assert_eq!(s[255].span, 352..384);
    }

    #[test]
    fn bad_shapes_are_named() {
        for (o, needle) in [
            (
                BenchOptions {
                    batch: 0,
                    ..BenchOptions::default()
                },
                "--batch",
            ),
            (
                BenchOptions {
                    gen_len: 100,
                    ..BenchOptions::default()
                },
                "--gen-len 100",
            ),
            (
                BenchOptions {
                    tokens_per_step: 5,
                    ..BenchOptions::default()
                },
                "--tokens-per-step 5",
            ),
            (
                BenchOptions {
                    block_len: 0,
                    ..BenchOptions::default()
                },
                "at least 1",
            ),
            (
                BenchOptions {
                    batch: MAX_BATCH + 1,
                    ..BenchOptions::default()
                },
                "--batch 1025 exceeds",
            ),
            (
                // Once wrapped around to a 255-token canvas that passed the length check.
                BenchOptions {
                    prompt_len: usize::MAX,
                    ..BenchOptions::default()
                },
                "overflows",
            ),
        ] {
            let e = schedule(&o).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn canvases_are_prompt_then_masks_without_mask_ids_in_the_prompt() {
        let cfg = ModelConfig::from_json(&serde_json::json!({"model_type": "llada", "d_model": 64,
            "n_heads": 4, "n_layers": 1, "mlp_hidden_size": 96, "vocab_size": 50, "embedding_size": 64,
            "mask_token_id": 7, "eos_token_id": 0, "pad_token_id": 2}))
        .unwrap();
        let o = BenchOptions {
            batch: 3,
            prompt_len: 200,
            gen_len: 64,
            ..BenchOptions::default()
        };
        let c = canvases(&o, &cfg);
        assert_eq!(c.len(), 3 * 264);
        for b in 0..3 {
            let row = &c[b * 264..(b + 1) * 264];
            assert!(row[..200].iter().all(|&t| t != 7 && t < 50));
            assert!(row[200..].iter().all(|&t| t == 7));
        }
        assert_ne!(c[..200], c[264..464], "canvases differ");
        assert_eq!(c, canvases(&o, &cfg), "deterministic");
    }

    #[test]
    fn the_suite_is_the_three_target_workloads() {
        let base = BenchOptions {
            warmup: 3,
            seed: 9,
            profile: true,
            ..BenchOptions::default()
        };
        let s = suite(&base);
        let names: Vec<&str> = s.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["b1_dual_k4", "b8_dual_k4", "b1_none_k1"]);
        let shape = |o: &BenchOptions| (o.batch, o.tokens_per_step, o.cache);
        assert_eq!(shape(&s[0].1), (1, 4, CacheMode::Dual));
        assert_eq!(shape(&s[1].1), (8, 4, CacheMode::Dual));
        assert_eq!(shape(&s[2].1), (1, 1, CacheMode::None));
        for (_, o) in &s {
            assert_eq!((o.prompt_len, o.gen_len, o.block_len), (128, 256, 32));
            // What the base asked for besides the shape is kept.
            assert_eq!((o.warmup, o.seed, o.profile), (3, 9, true));
        }
        let steps: Vec<usize> = s.iter().map(|(_, o)| schedule(o).unwrap().len()).collect();
        assert_eq!(steps, [64, 64, 256]);
    }

    #[test]
    fn a_suite_runs_in_order_and_refuses_mixed_models() {
        let tiny = |batch, cache| BenchOptions {
            batch,
            prompt_len: 8,
            gen_len: 16,
            block_len: 8,
            tokens_per_step: 4,
            cache,
            warmup: 0,
            backend: BenchBackend::Cpu,
            ..BenchOptions::default()
        };
        let runs = [
            ("a", tiny(1, CacheMode::Dual)),
            ("b", tiny(2, CacheMode::None)),
        ];
        let mut seen = Vec::new();
        run_suite(&runs, |name, r| {
            seen.push((name.to_string(), r.batch, r.cache, r.masks_left));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("a".to_string(), 1, CacheMode::Dual, 0),
                ("b".to_string(), 2, CacheMode::None, 0)
            ]
        );
        // A bad schedule anywhere is refused before anything runs.
        let bad = [
            ("a", tiny(1, CacheMode::Dual)),
            (
                "b",
                BenchOptions {
                    tokens_per_step: 3,
                    ..tiny(1, CacheMode::Dual)
                },
            ),
        ];
        let mut calls = 0;
        assert!(run_suite(&bad, |_, _| {
            calls += 1;
            Ok(())
        })
        .is_err());
        assert_eq!(calls, 0);
        let mixed = [
            ("a", tiny(1, CacheMode::Dual)),
            (
                "b",
                BenchOptions {
                    model_dir: PathBuf::from("elsewhere"),
                    ..tiny(1, CacheMode::Dual)
                },
            ),
        ];
        let e = run_suite(&mixed, |_, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains("same model"), "{e}");
    }

    #[test]
    fn cpu_bench_on_the_tiny_model_fills_every_mask() {
        let o = BenchOptions {
            batch: 2,
            prompt_len: 16,
            gen_len: 32,
            block_len: 16,
            tokens_per_step: 8,
            cache: CacheMode::Dual,
            warmup: 0,
            backend: BenchBackend::Cpu,
            ..BenchOptions::default()
        };
        let r = run_bench(&o).unwrap();
        assert_eq!(r.backend, "cpu");
        assert_eq!(r.steps, 4);
        assert_eq!(r.masks_left, 0);
        assert!(r.tok_per_s > 0.0 && r.seconds > 0.0);
        assert!(r.copy_gbps.is_none() && r.roofline_fraction.is_none());
    }

    #[test]
    fn profile_on_the_cpu_is_refused_and_rows_are_per_step_means() {
        let o = BenchOptions {
            profile: true,
            backend: BenchBackend::Cpu,
            gen_len: 32,
            prompt_len: 8,
            ..BenchOptions::default()
        };
        let e = run_bench(&o).unwrap_err().to_string();
        assert!(e.contains("--profile"), "{e}");
        use crate::backend::cuda::profile::OpTime;
        let totals = [
            OpTime {
                op: "gemm.qkv",
                ms: 6.0,
                calls: 64,
            },
            OpTime {
                op: "attention",
                ms: 2.0,
                calls: 64,
            },
        ];
        let rows = profile_rows("block", &totals, 2);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].op, rows[0].ms_per_step, rows[0].calls_per_step),
            ("gemm.qkv", 3.0, 32.0)
        );
        assert_eq!((rows[1].share, rows[0].share), (0.25, 0.75));
        assert!(rows.iter().all(|r| r.step == "block"));
    }

    #[test]
    fn session_bench_on_the_tiny_model_fills_every_mask_like_the_step_bench() {
        let o = BenchOptions {
            backend: BenchBackend::Cpu,
            gen_len: 32,
            prompt_len: 8,
            block_len: 16,
            tokens_per_step: 4,
            batch: 2,
            warmup: 0,
            session: true,
            ..BenchOptions::default()
        };
        let r = run_bench(&o).unwrap();
        assert_eq!((r.masks_left, r.steps, r.batch), (0, 8, 2));
        assert_eq!(r.backend, "cpu session");
        // On the trained model the sessions commit by confidence like the step bench does.
        let step = run_bench(&BenchOptions {
            session: false,
            ..o.clone()
        })
        .unwrap();
        assert_eq!(step.canvas_hash, r.canvas_hash);
        assert!(run_bench(&BenchOptions {
            profile: true,
            ..o.clone()
        })
        .unwrap_err()
        .to_string()
        .contains("--session"));
        // A cached batch runs its sessions one after another, each to completion.
        let cached = run_bench(&BenchOptions {
            cache: CacheMode::Dual,
            ..o.clone()
        })
        .unwrap();
        assert_eq!((cached.masks_left, cached.steps), (0, 8));
        // The step bench keeps a cache per canvas like the sessions do: the same canvases.
        let cached_steps = run_bench(&BenchOptions {
            cache: CacheMode::Dual,
            session: false,
            ..o.clone()
        })
        .unwrap();
        assert_eq!(cached_steps.canvas_hash, cached.canvas_hash);
        // One session runs alone (Session::run), with the same canvas as the step bench.
        let one = BenchOptions { batch: 1, ..o };
        assert_eq!(
            run_bench(&one).unwrap().canvas_hash,
            run_bench(&BenchOptions {
                session: false,
                ..one
            })
            .unwrap()
            .canvas_hash
        );
    }

    #[test]
    fn a_vicinity_over_the_whole_canvas_benches_the_uncached_schedule() {
        // 64 + 32 rows: past the skinny kernel's 64, a span over every row computes what the
        // full forward does, so the dual cache with that vicinity gives the uncached canvases.
        let o = BenchOptions {
            backend: BenchBackend::Cpu,
            prompt_len: 64,
            gen_len: 32,
            block_len: 16,
            tokens_per_step: 4,
            batch: 2,
            warmup: 0,
            ..BenchOptions::default()
        };
        let none = run_bench(&o).unwrap();
        let wide = BenchOptions {
            cache: CacheMode::Dual,
            vicinity: 96,
            ..o.clone()
        };
        let r = run_bench(&wide).unwrap();
        assert_eq!((r.vicinity, r.masks_left), (96, 0));
        assert_eq!(r.canvas_hash, none.canvas_hash);
        // The Session path widens its spans the same way.
        let sessions = run_bench(&BenchOptions {
            session: true,
            ..wide.clone()
        })
        .unwrap();
        assert_eq!(sessions.canvas_hash, none.canvas_hash);
        // While the plain dual cache does change them here (the comparison can fail).
        let plain = run_bench(&BenchOptions {
            vicinity: 0,
            ..wide.clone()
        })
        .unwrap();
        assert_ne!(plain.canvas_hash, none.canvas_hash);
        // A vicinity needs the dual cache, and the device-resident CUDA steps have none
        // (refused before the model is loaded).
        let e = |o: BenchOptions| run_bench(&o).unwrap_err().to_string();
        assert!(e(BenchOptions {
            vicinity: 4,
            ..o.clone()
        })
        .contains("--cache dual"));
        let cuda = e(BenchOptions {
            backend: BenchBackend::Cuda,
            ..wide
        });
        assert!(
            cuda.contains("--vicinity") && cuda.contains("--session"),
            "{cuda}"
        );
    }

    /// A model that records which [`Model`] entry each call of the step loop took.
    struct Recorder {
        inner: std::sync::Arc<dyn Model>,
        calls: std::sync::Mutex<Vec<String>>,
    }

    impl Model for Recorder {
        fn config(&self) -> &ModelConfig {
            self.inner.config()
        }
        fn backend_name(&self) -> &'static str {
            "recorder"
        }
        fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
            self.calls.lock().unwrap().push("forward".into());
            self.inner.forward(ids)
        }
        fn supports_kv_cache(&self) -> bool {
            true
        }
        fn predict_batch(&self, items: &[BatchQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("batch of {}", items.len()));
            self.inner.predict_batch(items)
        }
        fn logits_cached(
            &self,
            ids: &[u32],
            queries: &[usize],
            cache: &mut KvCache,
            step: &CacheStep,
        ) -> Result<Vec<f32>> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("cache {} {step:?}", cache.id()));
            self.inner.logits_cached(ids, queries, cache, step)
        }
    }

    #[test]
    fn host_steps_pack_uncached_canvases_and_keep_a_cache_per_canvas() {
        let inner = load_cpu_model(&BenchOptions::default()).unwrap();
        let o = BenchOptions {
            batch: 2,
            prompt_len: 8,
            gen_len: 32,
            block_len: 16,
            tokens_per_step: 8,
            ..BenchOptions::default()
        };
        let run = |cache| {
            let o = BenchOptions { cache, ..o.clone() };
            let m = Recorder {
                inner: inner.clone(),
                calls: Default::default(),
            };
            let mut canv = canvases(&o, inner.config());
            run_host_steps(&m, &o, &schedule(&o).unwrap(), &mut canv).unwrap();
            assert!(!canv.contains(&inner.config().mask_token_id));
            m.calls.into_inner().unwrap()
        };
        // No cache: every step is one packed forward of both canvases.
        assert_eq!(run(CacheMode::None), vec!["batch of 2"; 4]);
        // Dual: per block a refresh of each canvas's own cache, then the block's rows only.
        let calls = run(CacheMode::Dual);
        assert_eq!(calls.len(), 8, "{calls:?}");
        let ids: Vec<&str> = calls.iter().map(|c| c.split(' ').nth(1).unwrap()).collect();
        assert_ne!(ids[0], ids[1]);
        let expect = |step: &str| {
            vec![
                format!("cache {} {step}", ids[0]),
                format!("cache {} {step}", ids[1]),
            ]
        };
        let want = [
            expect("Refresh"),
            expect("Span(8..24)"),
            expect("Refresh"),
            expect("Span(24..40)"),
        ]
        .concat();
        assert_eq!(calls, want);
    }

    #[test]
    fn canvas_hash_is_fnv1a_of_the_le_bytes() {
        // FNV-1a 64 of the empty input is the offset basis; of the single byte 'a' (0x61) it is
        // the published test vector af63dc4c8601ec8c.
        assert_eq!(canvas_hash(&[]), "cbf29ce484222325");
        let one = {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            h ^= 0x61;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
            format!("{h:016x}")
        };
        assert_eq!(one, "af63dc4c8601ec8c");
        assert_ne!(canvas_hash(&[1, 2]), canvas_hash(&[2, 1]));
        assert_eq!(canvas_hash(&[7, 8, 9]), canvas_hash(&[7, 8, 9]));
    }

    #[test]
    fn report_rates() {
        let o = BenchOptions {
            batch: 8,
            ..BenchOptions::default()
        };
        let r = report(&o, "cpu", "x".into(), 64, 2.0);
        assert_eq!(r.tok_per_s, 8.0 * 256.0 / 2.0);
        assert_eq!(r.ms_per_step, 2000.0 / 64.0);
        assert_eq!(r.to_json()["cache"], "none");
    }
}
