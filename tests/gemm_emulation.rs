//! The GEMM kernels on the CPU: `cuda/emu/gemm_harness.cpp` runs the plain kernels of
//! `cuda/gemm.cu` (`gemm_naive`, the skinny kernels, `gemm_wide` with its cp.async ring, ldmatrix
//! and split-K) on their plans' grids ([`SkinnyPlan`], [`WidePlan`]), and the Hopper weight-streaming
//! kernels of `cuda/gemm_stream.cu`: `gemm_stream_mg<G>` and the persistent multi-job kernels of the
//! opt-ins `DLLM_FUSED_MLP` (`gemm_stream_mlp_mg`), `DLLM_NORM_FOLD` (`gemm_stream_tail_mg`) and
//! `DLLM_LAYER_CHAIN` (`gemm_stream_chain_mg`), through the emulation in `cuda/emu/` (TMA boxes with
//! the 128-byte swizzle, mbarriers, a producer warp and four consumer warps, every block of the grid
//! at once in its own process, the stream-K reductions across blocks and the grid barriers between
//! jobs), on the grids their Rust launchers plan ([`StreamPlan`], [`MlpPlan`]).
//!
//! Each epilogue (bf16, fp32, residual add, SwiGLU, the RMSNorm fold's prep and row scale, RoPE
//! with the K/V cache write) is checked against f64 host products, the RoPE epilogue against the
//! GEMM then `rope_qkv_bf16` (the path it replaces), and each fused launch against the same jobs
//! as single stream launches, bit for bit (what the kernels promise). This checks their logic and
//! protocols without a GPU; the device's speed, rounding and memory model still need one
//! (`dllm-gpu-check`'s `gemm.*` checks).

use dllm::backend::cpu::rope_inv_freq;
use dllm::backend::cuda::check::{from_bf16_bits, random_f32, rel_l2, round_bf16, to_bf16_bits};
use dllm::backend::cuda::gemm::{reference, SkinnyPlan, WgmmaPlan, WidePlan};
use dllm::backend::cuda::gemm_mlp::{MlpJobs, MlpPlan};
use dllm::backend::cuda::gemm_stream::StreamPlan;
use dllm::backend::cuda::swiglu_layout;
use half::bf16;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::emulation::{self, Run, Sanitizer};

/// The RMSNorm epsilon the harness folds with (`kEps`).
const EPS: f64 = 1e-5;
/// What the harness fills outputs with before a launch.
const POISON: u16 = 0x7fbf;

/// The compiled `cuda/emu/gemm_harness.cpp`, or `None` (skipped) without a C++ compiler.
fn harness() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    emulation::harness(&BUILT, "gemm_harness.cpp")
}

/// The harness built with ThreadSanitizer.
fn race_harness() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    emulation::harness_with(&BUILT, "gemm_harness.cpp", Sanitizer::Thread)
}

/// `n` bf16 values in [-s, s], as f32.
fn bf16_values(seed: u64, n: usize, s: f32) -> Vec<f32> {
    round_bf16(&random_f32(seed, n, -s, s))
}

/// `a · wᵀ` in f64 (`a` m × k, `w` n × k, both bf16 values): the GPU checks' reference.
fn product(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let cols: Vec<usize> = (0..n).collect();
    reference(&to_bf16_bits(a), &to_bf16_bits(w), m, k, &cols)
}

/// The norm fold's row scales from `[m, parts]` partial sums of squares over width `d`.
fn row_scales(sq: &[f32], m: usize, d: usize) -> Vec<f64> {
    let parts = sq.len() / m;
    (0..m)
        .map(|i| {
            let total: f64 = sq[i * parts..(i + 1) * parts]
                .iter()
                .map(|&v| v as f64)
                .sum();
            1.0 / (total / d as f64 + EPS).sqrt()
        })
        .collect()
}

/// Rows of `p` (`n` wide) scaled by `s`.
fn scaled(p: &[f64], s: &[f64], n: usize) -> Vec<f64> {
    p.iter().enumerate().map(|(i, &v)| v * s[i / n]).collect()
}

/// The prep's outputs from the new residual `x` (`m × n`): bf16(x ⊙ γ) and the per-row, per-32-
/// column sums of squares.
fn prep_reference(x: &[f32], gamma: &[f32], n: usize) -> (Vec<u16>, Vec<f64>) {
    let xg = x
        .iter()
        .enumerate()
        .map(|(i, &v)| bf16::from_f32(v * gamma[i % n]).to_bits())
        .collect();
    let sq = x
        .chunks(32)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum())
        .collect();
    (xg, sq)
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Asserts rel-L2 `got` vs `want` ≤ `tol`.
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let err = rel_l2(got, want);
    assert!(err <= tol, "{what}: rel L2 {err:.3e} > {tol:.0e}");
}

/// A plain kernel of `cuda/gemm.cu` and its grid, workspace and counters.
#[derive(Debug, Clone, Copy)]
enum Plain {
    Naive,
    Skinny(SkinnyPlan),
    Wide(WidePlan),
}

/// Checks the result `run` holds for `m × n` with epilogue `epi` (0 bf16, 1 fp32, 2 add onto
/// `old`, 3 SwiGLU) against the f64 product `want`.
fn check_epilogue(
    run: &Run,
    what: &str,
    (m, n): (usize, usize),
    epi: usize,
    want: &[f64],
    old: &[f32],
) {
    match epi {
        0 => close(what, &from_bf16_bits(&run.get("c.u16")), &f32s(want), 1e-2),
        1 => close(what, &run.get::<f32>("c.f32"), &f32s(want), 1e-5),
        2 => {
            let got: Vec<f32> = run.get("c.f32");
            let delta: Vec<f32> = got.iter().zip(old).map(|(g, o)| g - o).collect();
            close(what, &delta, &f32s(want), 1e-5);
        }
        _ => {
            let want = swiglu_layout::swiglu_of_fused(want, m, n / 2);
            close(what, &from_bf16_bits(&run.get("c.u16")), &f32s(&want), 1e-2);
        }
    }
}

fn plain_case(h: &Path, shape: (usize, usize, usize), kernel: Plain, epi: usize) {
    plain_case_env(h, shape, kernel, epi, &[]);
}

/// [`plain_case`] with extra environment variables for the harness.
fn plain_case_env(
    h: &Path,
    (m, n, k): (usize, usize, usize),
    kernel: Plain,
    epi: usize,
    env: &[(&str, &str)],
) {
    let (code, per_split, grid, ws, counters) = match kernel {
        Plain::Naive => (0, 0, [n.div_ceil(256), m.min(65_535), 1], 0, 0),
        Plain::Skinny(p) => (
            p.version,
            p.chunks_per_split,
            [p.tiles, p.splits, 1],
            p.workspace_floats(),
            p.tiles,
        ),
        Plain::Wide(p) => (
            3,
            p.ktiles_per_split,
            [p.m_tiles, p.n_tiles, p.splits],
            p.workspace_floats(),
            p.tiles(),
        ),
    };
    let run = Run::new(&[
        m, n, k, epi, code, per_split, grid[0], grid[1], grid[2], ws, counters,
    ]);
    let what = format!("{kernel:?} {m}x{n}x{k}, epi {epi}");
    let seed = (m * 17 + n * 3 + k + epi) as u64;
    let a = bf16_values(seed, m * k, 1.0);
    let w = bf16_values(seed + 1, n * k, 0.5);
    let old = random_f32(seed + 2, m * n, -2.0, 2.0);
    run.put("a.u16", &to_bf16_bits(&a));
    run.put("w.u16", &to_bf16_bits(&w));
    run.put("c.f32", &old);
    run.exec_with(h, "gemm", env);
    check_epilogue(&run, &what, (m, n), epi, &product(&a, &w, m, n, k), &old);
}

#[test]
fn the_plain_gemm_kernels_match_f64_products() {
    let Some(h) = harness() else { return };
    for epi in 0..3 {
        plain_case(h, (5, 40, 24), Plain::Naive, epi);
    }
    // Skinny: 5 row groups, two weight tiles (the second partial), K in 4 splits of 2 chunks
    // (the last partial); version 2 (128 rows a block) in 3 splits.
    for epi in 0..4 {
        let p = SkinnyPlan::with_version_chunks(1, 37, 96, 200, 2);
        plain_case(h, (37, 96, 200), Plain::Skinny(p), epi);
    }
    let p = SkinnyPlan::with_version_chunks(2, 20, 208, 96, 1);
    plain_case(h, (20, 208, 96), Plain::Skinny(p), 1);
    // Wide: 13 K tiles through the 4-slot ring (it wraps three times).
    let p = WidePlan::with_ktiles_per_split(150, 144, 416, 16);
    plain_case(h, (150, 144, 416), Plain::Wide(p), 1);
    // Wide: 2 x 2 output tiles (both partial), 4 K tiles (the last partial) whole and in 2 splits.
    for (epi, ktiles) in [(1, 8), (1, 2), (0, 2), (2, 3), (3, 2)] {
        let p = WidePlan::with_ktiles_per_split(150, 144, 104, ktiles);
        plain_case(h, (150, 144, 104), Plain::Wide(p), epi);
    }
}

/// A kernel with the epilogue parameters: `gemm_stream_mg` on its plan for `blocks` blocks, or
/// `gemm_wgmma_wg{wg}` on its plan with `ktiles_per_split` 64-wide K tiles per split.
#[derive(Debug, Clone, Copy)]
enum Tiled {
    Stream {
        blocks: usize,
    },
    Wgmma {
        wg: usize,
        ktiles_per_split: usize,
    },
    /// `gemm_wgmma_wg{wg}_cs{cs}` (`DLLM_GEMM_CLUSTER_SPLIT`): K in `cs` splits, one cluster.
    ClusterSplit {
        wg: usize,
        cs: usize,
    },
}

impl Tiled {
    /// The harness's `tiled` dims for `m × n × k` with epilogue `epi`, the fold's `scale` and
    /// `prep`, the RoPE layout `rope` and a bias.
    fn dims(
        self,
        (m, n, k): (usize, usize, usize),
        epi: usize,
        (scale, prep): (bool, bool),
        rope: [usize; 6],
        bias: bool,
    ) -> Vec<usize> {
        let (blocks, kernel) = match self {
            Tiled::Stream { blocks } => {
                let plan = StreamPlan::with_blocks(m, n, k, blocks).unwrap();
                (plan.blocks, [0; 8])
            }
            Tiled::Wgmma {
                wg,
                ktiles_per_split,
            } => {
                let p = WgmmaPlan::with_ktiles_per_split(wg, m, n, k, ktiles_per_split);
                (
                    0,
                    [
                        1,
                        p.wg,
                        p.ktiles_per_split,
                        p.m_tiles,
                        p.n_tiles,
                        p.splits,
                        p.workspace_floats(),
                        p.tiles(),
                    ],
                )
            }
            Tiled::ClusterSplit { wg, cs } => {
                // gemm_cluster_split's plan: the K tiles in exactly `cs` splits.
                let ktiles = k.div_ceil(64);
                let p = WgmmaPlan::with_ktiles_per_split(wg, m, n, k, ktiles.div_ceil(cs));
                assert_eq!(p.splits, cs, "{m}x{n}x{k} has no {cs}-way split");
                (
                    0,
                    [2, p.wg, p.ktiles_per_split, p.m_tiles, p.n_tiles, cs, 0, 0],
                )
            }
        };
        let mut d = vec![m, n, k, epi, blocks, scale as usize, prep as usize];
        d.extend(rope);
        d.push(bias as usize);
        d.extend(kernel);
        d
    }
}

/// One case of a tiled kernel: `m × n × k`, epilogue `epi` (0 bf16, 1 fp32, 2 add, 3 SwiGLU),
/// rows scaled by the norm fold (`scale`), the add's prep written (`prep`); the run, for
/// comparisons between kernels (the inputs depend on the shape and epilogue only).
fn tiled_case(
    h: &Path,
    kernel: Tiled,
    shape: (usize, usize, usize),
    epi: usize,
    scale: bool,
    prep: bool,
) -> Run {
    tiled_case_env(h, kernel, shape, epi, scale, prep, &[])
}

/// [`tiled_case`] with extra environment variables for the harness.
fn tiled_case_env(
    h: &Path,
    kernel: Tiled,
    (m, n, k): (usize, usize, usize),
    epi: usize,
    scale: bool,
    prep: bool,
    env: &[(&str, &str)],
) -> Run {
    let run = Run::new(&kernel.dims((m, n, k), epi, (scale, prep), [0; 6], false));
    let what = format!("{kernel:?} {m}x{n}x{k}, epi {epi}, scale {scale}, prep {prep}");
    let seed = (m * 131 + n * 7 + k + epi) as u64;
    let a = bf16_values(seed, m * k, 1.0);
    let w = bf16_values(seed + 1, n * k, 0.5);
    run.put("a.u16", &to_bf16_bits(&a));
    run.put("w.u16", &to_bf16_bits(&w));
    let mut want = product(&a, &w, m, n, k);
    if scale {
        let sq = random_f32(seed + 2, m * k / 32, 0.5, 4.0);
        run.put("sq_in.f32", &sq);
        want = scaled(&want, &row_scales(&sq, m, k), n);
    }
    let old = random_f32(seed + 3, m * n, -2.0, 2.0);
    let gamma = random_f32(seed + 4, n, 0.5, 1.5);
    if epi == 2 {
        run.put("c.f32", &old);
    }
    if prep {
        run.put("gamma.f32", &gamma);
    }
    run.exec_with(h, "tiled", env);
    check_epilogue(&run, &what, (m, n), epi, &want, &old);
    if prep {
        let got: Vec<f32> = run.get("c.f32");
        let (xg, sq) = prep_reference(&got, &gamma, n);
        assert_eq!(run.get::<u16>("xg.u16"), xg, "{what}: xg");
        close(
            &format!("{what}: sq_out"),
            &run.get::<f32>("sq_out.f32"),
            &f32s(&sq),
            1e-5,
        );
    }
    run
}

#[test]
fn the_stream_gemm_matches_f64_products_in_every_epilogue() {
    let Some(h) = harness() else { return };
    let stream = |blocks| Tiled::Stream { blocks };
    // Tiles cut between blocks (6 pairs on 4 blocks), a part chunk (K 200) and a part tile (N 136),
    // one block alone, 1..4 row groups.
    for epi in 0..2 {
        tiled_case(h, stream(4), (5, 200, 384), epi, false, false);
        tiled_case(h, stream(3), (17, 136, 200), epi, false, false);
    }
    tiled_case(h, stream(1), (32, 128, 128), 1, false, false);
    // 16 chunks on one block: the 5-stage ring wraps three times.
    tiled_case(h, stream(1), (9, 256, 1024), 1, false, false);
    tiled_case(h, stream(3), (9, 256, 256), 2, false, false);
    // The SwiGLU on interleaved rows, with the fold's row scale.
    tiled_case(h, stream(5), (12, 288, 160), 3, true, false);
    // The add with the fold's prep (N % 32 == 0), and the row scale on a plain store.
    tiled_case(h, stream(4), (26, 224, 288), 2, false, true);
    tiled_case(h, stream(3), (8, 160, 256), 0, true, false);
}

#[test]
fn the_wgmma_gemm_matches_f64_products_in_every_epilogue() {
    let Some(h) = harness() else { return };
    let wgmma = |wg, ktiles_per_split| Tiled::Wgmma {
        wg,
        ktiles_per_split,
    };
    // Ten K tiles through the 5-slot ring (it wraps twice).
    tiled_case(h, wgmma(2, 16), (70, 224, 640), 1, false, false);
    // Two 192-column tiles (the second partial), a part M tile, K in 3 splits of one 64-wide tile
    // (the last partial) and unsplit, both block heights.
    for epi in 0..2 {
        tiled_case(h, wgmma(2, 1), (70, 200, 160), epi, false, false);
        tiled_case(h, wgmma(3, 4), (200, 136, 128), epi, false, false);
    }
    tiled_case(h, wgmma(2, 2), (130, 192, 256), 2, false, false);
    // The SwiGLU, the fold's row scale, the add with the prep.
    tiled_case(h, wgmma(2, 1), (40, 224, 128), 3, true, false);
    tiled_case(h, wgmma(3, 1), (50, 224, 192), 2, false, true);
    tiled_case(h, wgmma(2, 4), (9, 160, 256), 0, true, false);
}

#[test]
fn the_cluster_split_equals_the_workspace_split_bit_for_bit() {
    let Some(h) = harness() else { return };
    // Every compiled (wg, cs) kernel; 3 K tiles make both 2 and 3 splits; N = 224: a whole and a
    // part 192-column tile, each cluster block's share whole 32-column groups (the prep's).
    for (wg, cs, epi, scale, prep) in [
        (2, 2, 2, false, true),
        (2, 3, 3, true, false),
        (3, 2, 1, false, false),
        (3, 3, 2, true, true),
        (2, 3, 0, true, false),
    ] {
        let shape = (70, 224, 192);
        let split = Tiled::Wgmma {
            wg,
            ktiles_per_split: 3usize.div_ceil(cs),
        };
        let a = tiled_case(h, split, shape, epi, scale, prep);
        let b = tiled_case(h, Tiled::ClusterSplit { wg, cs }, shape, epi, scale, prep);
        let mut outputs = vec![if matches!(epi, 1 | 2) {
            "c.f32"
        } else {
            "c.u16"
        }];
        if prep {
            outputs.extend(["xg.u16", "sq_out.f32"]);
        }
        for name in outputs {
            assert!(
                a.get::<u8>(name) == b.get::<u8>(name),
                "wg{wg}_cs{cs} epi {epi}: {name} differs from the workspace split"
            );
        }
    }
}

/// The RoPE layout of a QKV product: (q heads, kv heads, head_dim, rows per canvas, position of
/// its first row, cache rows per canvas).
#[derive(Debug, Clone, Copy)]
struct RopeCase {
    heads: (usize, usize, usize),
    period: usize,
    offset: usize,
    seq_rows: usize,
}

impl RopeCase {
    fn cols(&self) -> usize {
        let (qh, kvh, hd) = self.heads;
        (qh + 2 * kvh) * hd
    }

    fn dims(&self) -> [usize; 6] {
        let (qh, kvh, hd) = self.heads;
        [qh, kvh, hd, self.period, self.offset, self.seq_rows]
    }

    /// Which cache rows `m` activation rows write (the others keep their poison).
    fn written(&self, m: usize) -> Vec<bool> {
        let mut w = vec![false; m / self.period * self.seq_rows];
        for r in 0..m {
            w[r / self.period * self.seq_rows + self.offset + r % self.period] = true;
        }
        w
    }

    /// The written rows of `got` and `want` (kv-wide rows) as values, after checking the
    /// unwritten rows of `got` kept their poison.
    fn cache_rows(&self, what: &str, m: usize, got: &[u16], want: &[u16]) -> (Vec<f32>, Vec<f32>) {
        let kvw = self.heads.1 * self.heads.2;
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for (row, used) in self.written(m).into_iter().enumerate() {
            let span = row * kvw..(row + 1) * kvw;
            if used {
                g.extend(from_bf16_bits(&got[span.clone()]));
                w.extend(from_bf16_bits(&want[span]));
            } else {
                assert!(
                    got[span].iter().all(|&b| b == POISON),
                    "{what}: cache row {row} written"
                );
            }
        }
        (g, w)
    }
}

#[test]
fn the_rope_epilogue_equals_the_gemm_then_rope_qkv() {
    let Some(h) = harness() else { return };
    for (m, k, blocks, rope, bias) in [
        (
            12,
            96,
            3,
            RopeCase {
                heads: (2, 1, 32),
                period: 6,
                offset: 3,
                seq_rows: 11,
            },
            true,
        ),
        (
            32,
            160,
            4,
            RopeCase {
                heads: (4, 2, 32),
                period: 16,
                offset: 0,
                seq_rows: 16,
            },
            false,
        ),
        (
            7,
            128,
            2,
            RopeCase {
                heads: (2, 2, 64),
                period: 7,
                offset: 20,
                seq_rows: 30,
            },
            true,
        ),
    ] {
        let n = rope.cols();
        for kernel in [
            Tiled::Stream { blocks },
            Tiled::Wgmma {
                wg: 2,
                ktiles_per_split: 1,
            },
            Tiled::ClusterSplit { wg: 2, cs: 2 },
        ] {
            rope_case(h, kernel, (m, n, k), rope, bias);
        }
    }
}

/// The RoPE epilogue of `kernel` on `m × n × k` against the same GEMM stored as bf16, then
/// `rope_qkv_bf16`.
fn rope_case(
    h: &Path,
    kernel: Tiled,
    (m, n, k): (usize, usize, usize),
    rope: RopeCase,
    bias: bool,
) {
    let run = Run::new(&kernel.dims((m, n, k), 4, (false, false), rope.dims(), bias));
    let what = format!("rope {m}x{n}x{k} {rope:?} on {kernel:?}");
    run.put("a.u16", &to_bf16_bits(&bf16_values(m as u64, m * k, 1.0)));
    run.put("w.u16", &to_bf16_bits(&bf16_values(k as u64, n * k, 0.5)));
    run.put("inv_freq.f32", &rope_inv_freq(rope.heads.2, 10_000.0));
    run.put("bias.f32", &random_f32(n as u64, n, -0.5, 0.5));
    run.exec(h, "tiled");
    close(
        &what,
        &from_bf16_bits(&run.get("c.u16")),
        &from_bf16_bits(&run.get("qkv_ref.u16")),
        1e-2,
    );
    for which in ["k", "v"] {
        let got: Vec<u16> = run.get(&format!("{which}.u16"));
        let want: Vec<u16> = run.get(&format!("{which}_ref.u16"));
        let (g, w) = rope.cache_rows(&format!("{what} {which}"), m, &got, &want);
        close(&format!("{what}: {which} cache"), &g, &w, 1e-2);
    }
}

/// A fused launch of `jobs` (the MLP, the layer tail, the layer chain with a bf16 or RoPE QKV
/// store): run fused and as single stream launches on the same grid, compared bit for bit, and
/// each job of the single launches checked against f64 products of its own inputs.
fn layer_case(
    h: &Path,
    (m, hidden, inter): (usize, usize, usize),
    blocks: usize,
    jobs: MlpJobs,
    fold: bool,
    rope: Option<RopeCase>,
) {
    let n_qkv = match jobs {
        MlpJobs::Chain { qkv_cols } => qkv_cols,
        _ => 0,
    };
    let plan = MlpPlan::new(m, hidden, inter, blocks, jobs).unwrap();
    let n_jobs = plan.jobs().len();
    let mut dims = vec![
        m,
        hidden,
        inter,
        n_qkv,
        n_jobs,
        plan.up.blocks,
        fold as usize,
        if rope.is_some() { 4 } else { 0 },
    ];
    dims.extend(rope.map_or([0; 6], |r| r.dims()));
    let run = Run::new(&dims);
    let what = format!(
        "{jobs:?} {m}x{hidden}x{inter} fold {fold} on {} blocks",
        plan.up.blocks
    );
    let seed = (m + hidden + inter + n_jobs) as u64;
    let s = |d: usize| 1.0 / (d as f32).sqrt();
    let o = bf16_values(seed, m * hidden, 1.0);
    let w_o = bf16_values(seed + 1, hidden * hidden, s(hidden));
    let x = bf16_values(seed + 2, m * hidden, 1.0);
    let sq_x = random_f32(seed + 3, m * hidden / 32, 0.5, 4.0);
    let w_gu = bf16_values(seed + 4, 2 * inter * hidden, s(hidden));
    let w_d = bf16_values(seed + 5, hidden * inter, s(inter));
    let r = random_f32(seed + 6, m * hidden, -1.0, 1.0);
    let gamma_mlp = random_f32(seed + 7, hidden, 0.5, 1.5);
    let gamma_attn = random_f32(seed + 8, hidden, 0.5, 1.5);
    let w_qkv = bf16_values(seed + 9, n_qkv * hidden, s(hidden));
    for (name, v) in [
        ("o.u16", &o),
        ("w_o.u16", &w_o),
        ("x.u16", &x),
        ("w_gu.u16", &w_gu),
        ("w_d.u16", &w_d),
        ("w_qkv.u16", &w_qkv),
    ] {
        run.put(name, &to_bf16_bits(v));
    }
    for (name, v) in [
        ("sq_x.f32", &sq_x),
        ("r.f32", &r),
        ("gamma_mlp.f32", &gamma_mlp),
        ("gamma_attn.f32", &gamma_attn),
    ] {
        run.put(name, v);
    }
    if let Some(rc) = rope {
        run.put("inv_freq.f32", &rope_inv_freq(rc.heads.2, 10_000.0));
    }
    run.exec(h, "layer");

    // The fused launch: the single launches' bits, output for output.
    let mut outputs = vec!["h.u16", "r.f32"];
    if plan.out.is_some() {
        outputs.extend(["x.u16", "sq1.f32"]);
    }
    if fold {
        outputs.extend(["xa.u16", "sq2.f32"]);
    }
    if plan.qkv.is_some() {
        outputs.extend(["qkv.u16", "k.u16", "v.u16"]);
    }
    for name in &outputs {
        let fused: Vec<u8> = run.get(&format!("{name}.fused"));
        let split: Vec<u8> = run.get(&format!("{name}.split"));
        assert!(
            fused == split,
            "{what}: {name} of the fused launch differs from the single launches"
        );
    }

    // Each job of the single launches against f64 products of its inputs (the earlier jobs'
    // outputs as they came).
    let get16 = |name: &str| from_bf16_bits(&run.get(&format!("{name}.split")));
    let get32 = |name: &str| run.get::<f32>(&format!("{name}.split"));
    let (mlp_in, up_scale) = if plan.out.is_some() {
        let r0 = get32("r0.f32");
        let delta: Vec<f32> = r0.iter().zip(&r).map(|(a, b)| a - b).collect();
        close(
            &format!("{what}: out projection"),
            &delta,
            &f32s(&product(&o, &w_o, m, hidden, hidden)),
            1e-5,
        );
        let (xg, sq) = prep_reference(&r0, &gamma_mlp, hidden);
        assert_eq!(
            run.get::<u16>("x.u16.split"),
            xg,
            "{what}: the MLP norm's prep"
        );
        let sq1 = get32("sq1.f32");
        close(&format!("{what}: sq1"), &sq1, &f32s(&sq), 1e-5);
        (from_bf16_bits(&xg), Some(row_scales(&sq1, m, hidden)))
    } else {
        (x.clone(), fold.then(|| row_scales(&sq_x, m, hidden)))
    };
    let mut gu = product(&mlp_in, &w_gu, m, 2 * inter, hidden);
    if let Some(s) = up_scale {
        gu = scaled(&gu, &s, 2 * inter);
    }
    let act = get16("h.u16");
    close(
        &format!("{what}: gate/up"),
        &act,
        &f32s(&swiglu_layout::swiglu_of_fused(&gu, m, inter)),
        1e-2,
    );
    let r_before = if plan.out.is_some() {
        get32("r0.f32")
    } else {
        r.clone()
    };
    let r_after = get32("r.f32");
    let delta: Vec<f32> = r_after.iter().zip(&r_before).map(|(a, b)| a - b).collect();
    close(
        &format!("{what}: down"),
        &delta,
        &f32s(&product(&act, &w_d, m, hidden, inter)),
        1e-5,
    );
    if fold {
        let (xg, sq) = prep_reference(&r_after, &gamma_attn, hidden);
        assert_eq!(
            run.get::<u16>("xa.u16.split"),
            xg,
            "{what}: the next attention norm's prep"
        );
        close(&format!("{what}: sq2"), &get32("sq2.f32"), &f32s(&sq), 1e-5);
    }
    if plan.qkv.is_some() && rope.is_none() {
        let scale = row_scales(&get32("sq2.f32"), m, hidden);
        let want = scaled(
            &product(&get16("xa.u16"), &w_qkv, m, n_qkv, hidden),
            &scale,
            n_qkv,
        );
        close(
            &format!("{what}: qkv"),
            &get16("qkv.u16"),
            &f32s(&want),
            1e-2,
        );
    }
}

#[test]
fn the_fused_mlp_equals_its_single_launches_and_the_products() {
    let Some(h) = harness() else { return };
    layer_case(h, (12, 256, 192), 5, MlpJobs::Mlp, false, None);
    layer_case(h, (30, 160, 96), 3, MlpJobs::Mlp, true, None);
}

#[test]
fn the_layer_tail_equals_its_single_launches_and_the_products() {
    let Some(h) = harness() else { return };
    layer_case(h, (12, 384, 256), 6, MlpJobs::Tail, true, None);
    layer_case(h, (5, 160, 96), 2, MlpJobs::Tail, true, None);
}

#[test]
fn the_layer_chain_equals_its_single_launches_and_the_products() {
    let Some(h) = harness() else { return };
    layer_case(
        h,
        (12, 256, 128),
        4,
        MlpJobs::Chain { qkv_cols: 192 },
        true,
        None,
    );
    let rope = RopeCase {
        heads: (2, 1, 64),
        period: 6,
        offset: 4,
        seq_rows: 12,
    };
    layer_case(
        h,
        (12, 256, 128),
        4,
        MlpJobs::Chain {
            qkv_cols: rope.cols(),
        },
        true,
        Some(rope),
    );
}

#[test]
fn the_gemm_kernels_have_no_data_races() {
    let Some(h) = race_harness() else { return };
    // Within each block: the shared-memory rings (cp.async for the wide and wgmma kernels, TMA
    // and mbarriers for the stream kernel), the epilogues' staging, the split-K reductions (blocks
    // one after another in one process), and the layer chain's gates. The stream kernels' blocks
    // are separate processes, which TSan does not see across: their hand-offs are checked by the
    // results (bit for bit against single launches), not here.
    plain_case(
        h,
        (150, 144, 104),
        Plain::Wide(WidePlan::with_ktiles_per_split(150, 144, 104, 2)),
        2,
    );
    plain_case(
        h,
        (37, 96, 200),
        Plain::Skinny(SkinnyPlan::with_version_chunks(1, 37, 96, 200, 2)),
        1,
    );
    let wgmma = Tiled::Wgmma {
        wg: 2,
        ktiles_per_split: 1,
    };
    tiled_case(h, wgmma, (70, 224, 192), 2, true, true);
    // The rings again with every cp.async landing at issue (the earliest): a slot refilled while
    // a wgmma group that reads it is still in flight races with that read.
    let early = [("DLLM_EMU_ASYNC", "early")];
    plain_case_env(
        h,
        (150, 144, 104),
        Plain::Wide(WidePlan::with_ktiles_per_split(150, 144, 104, 2)),
        2,
        &early,
    );
    tiled_case_env(h, wgmma, (70, 224, 192), 2, true, true, &early);
    // Long enough K for the rings to wrap (slots refilled), early and late.
    let wgmma_long = Tiled::Wgmma {
        wg: 2,
        ktiles_per_split: 16,
    };
    let wide_long = Plain::Wide(WidePlan::with_ktiles_per_split(150, 144, 416, 16));
    for env in [&early[..], &[]] {
        tiled_case_env(h, wgmma_long, (70, 224, 640), 1, false, false, env);
        plain_case_env(h, (150, 144, 416), wide_long, 1, env);
    }
    // And the wgmma operands read at issue with the copies landing at their wait: a tile used
    // before its copies were waited for reads the poison.
    let wgmma_early = [("DLLM_EMU_ASYNC", "wgmma-early")];
    tiled_case_env(h, wgmma_long, (70, 224, 640), 1, false, false, &wgmma_early);
    tiled_case(
        h,
        Tiled::Stream { blocks: 4 },
        (26, 224, 288),
        2,
        true,
        true,
    );
    layer_case(
        h,
        (12, 256, 128),
        4,
        MlpJobs::Chain { qkv_cols: 192 },
        true,
        None,
    );
}
