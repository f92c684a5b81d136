//! Criterion benchmarks of the CPU backend.
//!
//! `linear` groups report throughput as elements = floating-point operations (2·m·n·k), so
//! criterion's "Gelem/s" reads as GFLOP/s. Run one group with e.g. `cargo bench --bench cpu -- linear/`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dllm::backend::cpu;
use dllm::denoise::rng::uniform;
use dllm::weights::view::{DType, TensorView};

/// A bf16 weight view of `bytes` with `shape`.
fn bf16_view<'a>(bytes: &'a [u8], shape: &'a [usize]) -> TensorView<'a> {
    TensorView {
        name: "w",
        dtype: DType::BF16,
        shape,
        data: bytes,
    }
}

/// Random bf16 weight bytes for an `[n, k]` matrix.
fn bf16_weight(n: usize, k: usize, seed: u64) -> Vec<u8> {
    (0..n * k)
        .flat_map(|i| {
            let v = (uniform(seed, 0, 0, i as u64) * 2.0 - 1.0) as f32;
            half::bf16::from_f32(v).to_bits().to_le_bytes()
        })
        .collect()
}

fn activations(len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| (uniform(seed, 1, 0, i as u64) * 2.0 - 1.0) as f32)
        .collect()
}

/// (label, m, k, n): the tiny model's projections at 192 tokens, and an 8B-like panel.
const LINEAR_SHAPES: [(&str, usize, usize, usize); 6] = [
    ("qkv_384x1152_m192", 192, 384, 1152),
    ("q_384x384_m192", 192, 384, 384),
    ("up_384x1024_m192", 192, 384, 1024),
    ("down_1024x384_m192", 192, 1024, 384),
    ("lmhead_384x8192_m192", 192, 384, 8192),
    ("8b_4096x4096_m32", 32, 4096, 4096),
];

/// `linear` at the shapes above (bf16 weights).
fn bench_linear(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear");
    for &(label, m, k, n) in &LINEAR_SHAPES {
        let bytes = bf16_weight(n, k, 1);
        let shape = [n, k];
        let w = bf16_view(&bytes, &shape);
        let x = activations(m * k, 2);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(label, |b| {
            b.iter(|| cpu::linear(black_box(&x), m, &w, &mut out))
        });
    }
    g.finish();
}

/// Panel-height sweep of the GEMM path, to pick `DEFAULT_PANEL_ROWS`.
fn bench_linear_panel(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear_panel");
    for &(label, m, k, n) in &LINEAR_SHAPES {
        let bytes = bf16_weight(n, k, 1);
        let shape = [n, k];
        let w = bf16_view(&bytes, &shape);
        let x = activations(m * k, 2);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for panel in [32usize, 64, 128, 256] {
            g.bench_with_input(BenchmarkId::new(label, panel), &panel, |b, &p| {
                b.iter(|| cpu::linear_panelled(black_box(&x), m, &w, p, &mut out))
            });
        }
    }
    g.finish();
}

/// GEMV versus GEMM path for a few rows (the dual-cache regime), 8B-like and tiny widths.
fn bench_linear_small_m(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear_small_m");
    for &(k, n) in &[(384usize, 8192usize), (4096, 4096)] {
        let bytes = bf16_weight(n, k, 3);
        let shape = [n, k];
        let w = bf16_view(&bytes, &shape);
        for m in [1usize, 4, 8] {
            let x = activations(m * k, 4);
            let mut out = vec![0f32; m * n];
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let id = format!("{k}x{n}_m{m}");
            g.bench_function(BenchmarkId::new("gemv", &id), |b| {
                b.iter(|| cpu::linear_gemv(black_box(&x), m, &w, &mut out))
            });
            g.bench_function(BenchmarkId::new("panelled", &id), |b| {
                b.iter(|| {
                    cpu::linear_panelled(black_box(&x), m, &w, cpu::DEFAULT_PANEL_ROWS, &mut out)
                })
            });
        }
    }
    g.finish();
}

/// The AVX-512 skinny kernel (f32 activations, and bf16 activations where the CPU has AVX-512
/// BF16) against the GEMM path over the row counts of cached span steps, packed LM heads and
/// full steps (tiny widths and an 8B-like panel); skipped without AVX-512.
fn bench_linear_skinny(c: &mut Criterion) {
    if !cpu::skinny_available() {
        return;
    }
    let mut g = c.benchmark_group("linear_skinny");
    for &(k, n) in &[
        (384usize, 1152usize),
        (1024, 384),
        (384, 8192),
        (4096, 4096),
    ] {
        let bytes = bf16_weight(n, k, 5);
        let shape = [n, k];
        let w = bf16_view(&bytes, &shape);
        for m in [4usize, 8, 32, 64, 192, 384] {
            if k * n * m > 4096 * 4096 * 64 {
                continue;
            }
            let x = activations(m * k, 6);
            let mut out = vec![0f32; m * n];
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let id = format!("{k}x{n}_m{m}");
            g.bench_function(BenchmarkId::new("skinny", &id), |b| {
                b.iter(|| cpu::linear_skinny(black_box(&x), m, &w, &mut out))
            });
            if cpu::skinny_bf16_available() {
                g.bench_function(BenchmarkId::new("skinny_bf16", &id), |b| {
                    b.iter(|| cpu::linear_skinny_bf16(black_box(&x), m, &w, &mut out))
                });
            }
            if m <= cpu::GEMV_MAX_M {
                g.bench_function(BenchmarkId::new("gemv", &id), |b| {
                    b.iter(|| cpu::linear_gemv(black_box(&x), m, &w, &mut out))
                });
            } else {
                g.bench_function(BenchmarkId::new("panelled", &id), |b| {
                    b.iter(|| {
                        cpu::linear_panelled(
                            black_box(&x),
                            m,
                            &w,
                            cpu::DEFAULT_PANEL_ROWS,
                            &mut out,
                        )
                    })
                });
            }
        }
    }
    g.finish();
}

/// Attention at the tiny model's shape (192 tokens, 6 heads × 64) and the other element-wise ops.
fn bench_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("ops");
    let (s, nh, hd) = (192usize, 6usize, 64usize);
    let q = activations(s * nh * hd, 5);
    let k = activations(s * nh * hd, 6);
    let v = activations(s * nh * hd, 7);
    let mut out = vec![0f32; s * nh * hd];
    g.bench_function("attention_s192_h6_d64", |b| {
        b.iter(|| cpu::attention(black_box(&q), &k, &v, s, s, nh, nh, hd, None, &mut out))
    });
    let gate = activations(s * 1024, 8);
    let up = activations(s * 1024, 9);
    let mut act = vec![0f32; s * 1024];
    g.bench_function("silu_mul_192x1024", |b| {
        b.iter(|| cpu::silu_mul(black_box(&gate), &up, &mut act))
    });
    let w = activations(384, 10);
    let x = activations(s * 384, 11);
    let mut normed = vec![0f32; s * 384];
    g.bench_function("rms_norm_192x384", |b| {
        b.iter(|| cpu::rms_norm(black_box(&x), &w, 1e-5, &mut normed))
    });
    let positions: Vec<usize> = (0..s).collect();
    let mut qr = q.clone();
    g.bench_function("rope_192x6x64", |b| {
        b.iter(|| cpu::rope(black_box(&mut qr), &positions, nh, hd, 10_000.0))
    });
    g.finish();
}

/// One full forward of the embedded tiny model over 192 tokens (target ≤ 120 ms on 2 cores),
/// and the cheaper `predict` step that runs the LM head only on a 32-token block.
fn bench_forward(c: &mut Criterion) {
    use dllm::denoise::predict::{PredictRule, Remasking};
    use dllm::model::{llada::Llada, Model};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code");
    let model = Llada::load(&dir).expect("embedded model");
    let cfg = model.config().clone();
    let ids: Vec<u32> = (0..192)
        .map(|i| {
            if i < 64 {
                100 + i * 7
            } else {
                cfg.mask_token_id
            }
        })
        .collect();
    let mut g = c.benchmark_group("forward_tiny");
    g.sample_size(10);
    g.bench_function("forward_192", |b| {
        b.iter(|| black_box(model.forward(black_box(&ids)).unwrap()))
    });
    let queries: Vec<usize> = (64..96).collect();
    let rule = PredictRule {
        temperature: 0.0,
        remasking: Remasking::LowConfidence,
        seed: 0,
        step: 0,
        mask_token: cfg.mask_token_id,
        vocab_size: cfg.vocab_size,
    };
    g.bench_function("predict_192_block32", |b| {
        b.iter(|| black_box(model.predict(black_box(&ids), &queries, &rule).unwrap()))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_linear,
    bench_linear_panel,
    bench_linear_small_m,
    bench_linear_skinny,
    bench_ops,
    bench_forward
);
criterion_main!(benches);
