//! Measures the block K/V caches (`--cache prefix|dual`, and the dual cache with a vicinity of
//! 4, 8 and 16 positions, `--vicinity N`) against the uncached loop on held-out
//! Python (`examples/heldout_python.txt`, 20 snippets written for this and used nowhere else):
//!
//! 1. teacher-forced step cross-entropy: each snippet's first 16 tokens are the prompt, the next
//!    (up to) 64 are masked; blocks of 16, 8 steps per block. Every step scores the true token
//!    of each still-masked position of the block (`−ln softmax(row)[true]` over the whole logits
//!    row) under that step's logits, then commits the *true* tokens of a seeded random order
//!    (2 per step). The canvases are therefore the same under every cache mode, and the
//!    cross-entropy differences come from the cache alone;
//! 2. free-generation token agreement with `none` (greedy, the same prompts, 64 tokens, blocks
//!    of 16 / 32, 2 tokens per step);
//! 3. speed of whole generations (`gen_len` 128 and 256, `steps = gen_len / 2`, blocks of 32).
//!
//! `cargo run --release --example cache_quality [-- MODEL_DIR]` (default: the tiny model).

use dllm::denoise::{transfer_counts, CacheMode, Decoding, GenerationParams, Session};
use dllm::model::{load_cpu, CacheStep, KvCache, Model};
use dllm::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// The cache variants measured: a mode and a vicinity.
const MODES: [(CacheMode, usize); 6] = [
    (CacheMode::None, 0),
    (CacheMode::Prefix, 0),
    (CacheMode::Dual, 0),
    (CacheMode::Dual, 4),
    (CacheMode::Dual, 8),
    (CacheMode::Dual, 16),
];

/// `dual+v8` for a vicinity of 8, else the mode's name.
fn label((mode, vicinity): (CacheMode, usize)) -> String {
    if vicinity == 0 {
        mode.name().to_string()
    } else {
        format!("{}+v{vicinity}", mode.name())
    }
}
const PROMPT: usize = 16;

fn main() -> dllm::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code")
        });
    let model = load_cpu(&dir)?;
    let tok = Tokenizer::from_model_dir(&dir)?;
    let text = include_str!("heldout_python.txt");
    let snippets: Vec<Vec<u32>> = text
        .split("\n# ----\n")
        .map(|s| tok.encode(s))
        .collect::<dllm::Result<_>>()?;
    println!(
        "{} snippets, {} tokens",
        snippets.len(),
        snippets.iter().map(Vec::len).sum::<usize>()
    );

    println!("\n## teacher-forced step cross-entropy (nats/token)");
    for mode in MODES {
        let (mut sum, mut n) = (0.0, 0usize);
        for (i, ids) in snippets.iter().enumerate() {
            let (s, c) = teacher_forced_ce(&*model, ids, mode, i as u64)?;
            sum += s;
            n += c;
        }
        println!(
            "{:>8}: {:.4} over {n} scored predictions",
            label(mode),
            sum / n as f64
        );
    }

    println!("\n## free generation: agreement with none");
    for block_len in [16, 32] {
        let params = GenerationParams {
            steps: 32,
            block_len,
            ..GenerationParams::default()
        };
        let mut outs: Vec<Vec<Vec<u32>>> = Vec::new();
        for mode in MODES {
            let mut per = Vec::new();
            for ids in &snippets {
                let mut canvas = ids[..PROMPT.min(ids.len())].to_vec();
                canvas.extend(std::iter::repeat_n(model.config().mask_token_id, 64));
                per.push(generate(&model, canvas, &params, mode)?.0);
            }
            outs.push(per);
        }
        for (m, mode) in MODES.iter().enumerate().skip(1) {
            let (same, total) = outs[m]
                .iter()
                .zip(&outs[0])
                .flat_map(|(a, b)| a.iter().zip(b))
                .fold((0, 0), |(s, t), (a, b)| (s + (a == b) as usize, t + 1));
            println!(
                "block {block_len}, {:>8}: {same}/{total} = {:.1}%",
                label(*mode),
                100.0 * same as f64 / total as f64
            );
        }
    }

    println!("\n## speed (one prompt, greedy, blocks of 32)");
    let prompt = &snippets[0][..PROMPT];
    for gen_len in [128usize, 256] {
        let params = GenerationParams {
            steps: gen_len / 2,
            block_len: 32,
            ..GenerationParams::default()
        };
        let mut canvas = prompt.to_vec();
        canvas.extend(std::iter::repeat_n(model.config().mask_token_id, gen_len));
        let mut base = 0.0;
        for mode in MODES {
            // Warm-up, then the best of three.
            generate(&model, canvas.clone(), &params, mode)?;
            let best = (0..3)
                .map(|_| generate(&model, canvas.clone(), &params, mode).map(|r| r.1))
                .collect::<dllm::Result<Vec<f64>>>()?
                .into_iter()
                .fold(f64::INFINITY, f64::min);
            if mode.0 == CacheMode::None {
                base = best;
            }
            println!(
                "gen {gen_len}, steps {}, {:>8}: {:.3} s, {:.1} tok/s, speed-up {:.2}x",
                params.steps,
                label(mode),
                best,
                gen_len as f64 / best,
                base / best
            );
        }
    }
    Ok(())
}

/// Generated tokens and wall time of one session.
fn generate(
    model: &Arc<dyn Model>,
    canvas: Vec<u32>,
    params: &GenerationParams,
    (cache, vicinity): (CacheMode, usize),
) -> dllm::Result<(Vec<u32>, f64)> {
    let mut s = Session::new(model.clone(), canvas, params.clone())?;
    s.set_decoding(Decoding {
        cache,
        vicinity,
        ..Decoding::default()
    })?;
    let t = Instant::now();
    s.run()?;
    let dt = t.elapsed().as_secs_f64();
    let out = s
        .generated_positions()
        .iter()
        .map(|&p| s.canvas()[p])
        .collect();
    Ok((out, dt))
}

/// Sum of the step cross-entropies of one snippet and how many were scored (see the module
/// doc).
fn teacher_forced_ce(
    model: &dyn Model,
    ids: &[u32],
    (mode, vicinity): (CacheMode, usize),
    seed: u64,
) -> dllm::Result<(f64, usize)> {
    const MASKED: usize = 64;
    const BLOCK: usize = 16;
    const STEPS: usize = 8;
    let cfg = model.config();
    let end = ids.len().min(PROMPT + MASKED);
    if end <= PROMPT {
        return Ok((0.0, 0));
    }
    let mut canvas = ids.to_vec();
    for t in &mut canvas[PROMPT..end] {
        *t = cfg.mask_token_id;
    }
    let width = cfg.logits_width();
    let mut cache = KvCache::new(cfg, canvas.len());
    let (mut sum, mut n) = (0.0, 0);
    for start in (PROMPT..end).step_by(BLOCK) {
        let block = start..(start + BLOCK).min(end);
        // A seeded random commit order, the same for every mode.
        let mut order: Vec<usize> = block.clone().collect();
        order.sort_by_key(|&p| dllm::denoise::rng::bits(seed, 0, p as u64, 0));
        let mut next = 0;
        for (i, k) in transfer_counts(block.len(), STEPS).into_iter().enumerate() {
            if k == 0 {
                continue;
            }
            let queries: Vec<usize> = block
                .clone()
                .filter(|&p| canvas[p] == cfg.mask_token_id)
                .collect();
            let logits = match mode {
                CacheMode::None => {
                    let full = model.forward(&canvas)?;
                    queries
                        .iter()
                        .flat_map(|&q| full[q * width..(q + 1) * width].to_vec())
                        .collect()
                }
                _ => {
                    let step = if i == 0 {
                        CacheStep::Refresh
                    } else {
                        CacheStep::Span(
                            dllm::model::kv_cache::span_with_vicinity(
                                mode,
                                block.clone(),
                                canvas.len(),
                                cfg.shifted_logits(),
                                vicinity,
                            )
                            .expect("a cache mode"),
                        )
                    };
                    model.logits_cached(&canvas, &queries, &mut cache, &step)?
                }
            };
            for (r, &q) in queries.iter().enumerate() {
                let row = &logits[r * width..(r + 1) * width];
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let lse = max
                    + row
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                sum += lse - row[ids[q] as usize] as f64;
                n += 1;
            }
            for &p in &order[next..next + k] {
                canvas[p] = ids[p];
            }
            next += k;
        }
    }
    Ok((sum, n))
}
