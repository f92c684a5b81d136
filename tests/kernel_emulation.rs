//! CUDA kernels run on the CPU: `cuda/emu/harness.cpp` compiles the `.cu`
//! sources as host C++ against `cuda/emu/cuda_emu.h` (one OS thread per CUDA thread, barriers
//! and warp collectives as on the device, `mma.sync` by its PTX fragment layout) and runs
//! `moe_route` / `moe_group`, the grouped expert GEMM, `moe_combine`, `rmsnorm_heads_bf16`,
//! `rope_qkv_bf16` and the parallel-sampling kernels (predict and commit) with their launchers' grids. Each result is compared with the CPU model's rule
//! ([`dllm::model::experts::route`]) and f64 host products: the kernels' logic checked in CI,
//! without a GPU (the device's own rounding, speed and memory model still need one:
//! `dllm-gpu-check`'s `moe.*` checks).
//!
//! Needs a C++20 compiler (tests/common/emulation.rs).

use dllm::backend::cpu;
use dllm::backend::cuda::check::{from_bf16_bits, random_f32, rel_l2, round_bf16, to_bf16_bits};
use dllm::backend::cuda::gemm_grouped::launch_grid;
use dllm::backend::cuda::moe::{
    grouped_reference, grouping_fault, host_mixture, special_logit_rows, stacked_gate_up, MoeShape,
    Routing,
};
use dllm::backend::cuda::sampling::{
    commit_case, host_commit, parse_commit_record, split_plan, CommitRule,
};
use dllm::backend::cuda::swiglu_layout;
use dllm::denoise::predict::{predict_row, PredictRule, Remasking};
use dllm::model::experts::route;
use half::bf16;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::emulation::{self, Run};

/// The compiled `cuda/emu/harness.cpp`, or `None` (skipped) without a C++ compiler.
fn harness() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    emulation::harness(&BUILT, "harness.cpp")
}

/// The routing buffers a run wrote.
fn routing(run: &Run) -> Routing {
    Routing {
        experts: run.get("sel_e.i32"),
        weights: run.get("sel_w.f32"),
        off: run.get("off.i32"),
        cnt: run.get("cnt.i32"),
        pair_pos: run.get("pair_pos.i32"),
        grouped_rows: run.get("grp_row.i32"),
    }
}

fn shape(experts: usize, per_row: usize) -> MoeShape {
    MoeShape {
        experts,
        per_row,
        d: 8,
        h: 8,
    }
}

/// Random logits, their first rows special ([`special_logit_rows`]).
fn logits(seed: u64, rows: usize, e: usize) -> Vec<f32> {
    let mut l = random_f32(seed, rows * e, -4.0, 4.0);
    special_logit_rows(&mut l, rows, e);
    l
}

#[test]
fn routing_picks_the_cpu_experts_and_groups_every_pair() {
    let Some(h) = harness() else { return };
    for (rows, e, k) in [
        (37usize, 64usize, 8usize),
        (9, 8, 8),
        (6, 128, 32),
        (1, 8, 1),
    ] {
        let run = Run::new(&[rows, e, k]);
        let l = logits(rows as u64 * 7 + e as u64, rows, e);
        run.put("logits.f32", &l);
        run.exec(h, "route");
        let r = routing(&run);
        assert_eq!(
            grouping_fault(&r, shape(e, k), rows),
            None,
            "{rows}x{e} k{k}"
        );
        for row in 0..rows {
            let mut want = route(&l[row * e..(row + 1) * e], k);
            want.sort_by_key(|p| p.0);
            let got = &r.experts[row * k..(row + 1) * k];
            let ids: Vec<i32> = want.iter().map(|p| p.0 as i32).collect();
            assert_eq!(got, &ids[..], "row {row} of {rows}x{e} k{k}");
            for (j, &(_, p)) in want.iter().enumerate() {
                let w = r.weights[row * k + j];
                assert!(
                    (w.is_nan() && p.is_nan()) || (w - p).abs() <= 1e-6 * p.abs().max(1e-30),
                    "row {row} weight {j}: {w} vs {p}"
                );
            }
        }
    }
}

/// The grouped GEMM with output epilogue `epi` (1 fp32, 0 bf16, 3 SwiGLU), gathered or in order,
/// on its launcher's grid. `skew`: every row's logit for expert 0 raised by 10 (expert 0 gets
/// every row, the others few or none).
fn grouped_case(
    h: &Path,
    (rows, e, k): (usize, usize, usize),
    (n, kd): (usize, usize),
    (epi, gather, skew): (i32, bool, bool),
) {
    let pairs = rows * k;
    let grid = launch_grid(rows, n, e);
    let run = Run::new(&[
        rows,
        e,
        k,
        n,
        kd,
        epi as usize,
        gather as usize,
        grid.groups,
        grid.chunks,
        grid.tiles,
    ]);
    let mut l: Vec<f32> = random_f32(rows as u64 + 3, rows * e, -4.0, 4.0);
    if skew {
        l.iter_mut().step_by(e).for_each(|v| *v += 10.0);
    }
    run.put("logits.f32", &l);
    let a = round_bf16(&random_f32(
        n as u64,
        if gather { rows } else { pairs } * kd,
        -1.0,
        1.0,
    ));
    let w = round_bf16(&random_f32(kd as u64 + 1, e * n * kd, -0.5, 0.5));
    run.put("a.u16", &to_bf16_bits(&a));
    run.put("w.u16", &to_bf16_bits(&w));
    run.exec(h, "grouped");
    let r = routing(&run);
    assert_eq!(grouping_fault(&r, shape(e, k), rows), None);
    let map = gather.then_some(&r.grouped_rows[..]);
    let want = grouped_reference(&r, &a, map, &w, (n, kd));
    let what = format!("{rows} rows, E{e} k{k}, n{n} k{kd}, epi {epi}, gather {gather}");
    let (got, want, tol): (Vec<f32>, Vec<f32>, f64) = match epi {
        1 => (
            run.get("c.f32"),
            want.iter().map(|&v| v as f32).collect(),
            1e-5,
        ),
        0 => (
            from_bf16_bits(&run.get("c.u16")),
            want.iter().map(|&v| v as f32).collect(),
            1e-2,
        ),
        _ => (
            from_bf16_bits(&run.get("c.u16")),
            swiglu_layout::swiglu_of_fused(&want, pairs, n / 2)
                .iter()
                .map(|&v| v as f32)
                .collect(),
            1e-2,
        ),
    };
    let err = rel_l2(&got, &want);
    assert!(err <= tol, "{what}: rel err {err}");
}

#[test]
fn the_grouped_gemm_multiplies_each_experts_rows_by_its_weights() {
    let Some(h) = harness() else { return };
    // fp32 and bf16, odd n (a part tile) and k (a part chunk), 1..8 groups per chunk.
    grouped_case(h, (9, 8, 2), (64, 64), (1, true, false));
    grouped_case(h, (20, 4, 4), (48, 40), (0, true, false));
    grouped_case(h, (44, 8, 2), (16, 24), (1, true, false));
    // The SwiGLU epilogue (interleaved gate/up rows), and the input already in grouped order.
    grouped_case(h, (5, 8, 2), (32, 32), (3, true, false));
    grouped_case(h, (9, 8, 2), (64, 48), (1, false, false));
    // Every row picks both experts: 70 rows each, chunks of 64 and 6.
    grouped_case(h, (70, 2, 2), (16, 16), (1, true, false));
    // Three weight tiles (the last a part one) and 80 rows with expert 0 in every row: one expert
    // of two chunks, the others of a few rows (their second chunk's blocks return at once).
    grouped_case(h, (80, 8, 2), (144, 32), (1, true, true));
    grouped_case(h, (80, 8, 2), (144, 32), (3, true, true));
    grouped_case(h, (80, 8, 2), (144, 32), (1, false, true));
}

fn mixture_case(h: &Path, rows: usize, shape: MoeShape, fused: bool) {
    let MoeShape {
        experts: e,
        per_row: k,
        d,
        h: hid,
    } = shape;
    assert!(!fused || swiglu_layout::supported(hid));
    let (up_grid, down_grid) = (launch_grid(rows, 2 * hid, e), launch_grid(rows, d, e));
    let run = Run::new(&[
        rows,
        e,
        k,
        d,
        hid,
        fused as usize,
        up_grid.groups,
        up_grid.chunks,
        up_grid.tiles,
        down_grid.tiles,
    ]);
    let l = random_f32(11, rows * e, -3.0, 3.0);
    let xn = round_bf16(&random_f32(12, rows * d, -1.0, 1.0));
    let x0 = random_f32(13, rows * d, -1.0, 1.0);
    let s = 1.0 / (d as f32).sqrt();
    let gate = round_bf16(&random_f32(14, e * hid * d, -s, s));
    let up = round_bf16(&random_f32(15, e * hid * d, -s, s));
    let down = round_bf16(&random_f32(16, e * d * hid, -s, s));
    let gu = stacked_gate_up(&gate, &up, shape, fused);
    run.put("logits.f32", &l);
    run.put("xn.u16", &to_bf16_bits(&xn));
    run.put("x.f32", &x0);
    run.put("gate_up.u16", &to_bf16_bits(&gu));
    run.put("down.u16", &to_bf16_bits(&down));
    run.exec(h, "mixture");
    let got: Vec<f32> = run.get("x.f32");
    let want = host_mixture(&x0, &xn, &l, (&gate, &up, &down), shape);
    // The mixture's contribution (the residual would hide its errors).
    let delta = |v: &[f32]| v.iter().zip(&x0).map(|(a, b)| a - b).collect::<Vec<f32>>();
    let err = rel_l2(&delta(&got), &delta(&want));
    assert!(
        err <= 1e-2,
        "{rows} rows of {shape:?} fused {fused}: rel err {err}"
    );
}

#[test]
fn a_whole_mixture_adds_the_weighted_experts_to_the_residual() {
    let Some(h) = harness() else { return };
    let small = MoeShape {
        experts: 8,
        per_row: 2,
        d: 64,
        h: 32,
    };
    mixture_case(h, 6, small, true);
    mixture_case(h, 6, small, false);
    // LLaDA-MoE's routing: 64 experts, 8 per row.
    let wide = MoeShape {
        experts: 64,
        per_row: 8,
        d: 32,
        h: 16,
    };
    mixture_case(h, 4, wide, true);
    // Past one chunk (72 rows) and one weight tile (2h = 96, d = 80).
    let tall = MoeShape {
        experts: 4,
        per_row: 2,
        d: 80,
        h: 48,
    };
    mixture_case(h, 72, tall, true);
    mixture_case(h, 72, tall, false);
}

#[test]
fn head_norms_normalise_each_q_and_k_head_and_leave_v() {
    let Some(h) = harness() else { return };
    let (rows, qh, kvh, hd) = (3usize, 2usize, 1usize, 32usize);
    let (k_col, stride) = (qh * hd, (qh + 2 * kvh) * hd);
    let run = Run::new(&[rows, stride, qh, kvh, k_col, hd]);
    let x = round_bf16(&random_f32(21, rows * stride, -2.0, 2.0));
    let (qw, kw) = (random_f32(22, hd, 0.5, 1.5), random_f32(23, hd, 0.5, 1.5));
    run.put("qkv.u16", &to_bf16_bits(&x));
    run.put("qw.f32", &qw);
    run.put("kw.f32", &kw);
    run.exec(h, "heads");
    let got = from_bf16_bits(&run.get("qkv.u16"));
    let mut want = x.clone();
    let mut tmp = vec![0f32; hd];
    for row in want.chunks_exact_mut(stride) {
        for (i, head) in row[..k_col + kvh * hd].chunks_exact_mut(hd).enumerate() {
            cpu::rms_norm(head, if i < qh { &qw } else { &kw }, 1e-6, &mut tmp);
            head.copy_from_slice(&tmp);
        }
    }
    let err = rel_l2(&got, &want);
    assert!(err <= 1e-2, "rel err {err}");
    // v untouched, bit for bit.
    for r in 0..rows {
        let v = r * stride + k_col + kvh * hd..(r + 1) * stride;
        assert_eq!(got[v.clone()], x[v]);
    }
}

/// One `rope_qkv_bf16` launch: `rows` rows of `canvases = rows / period` canvases, each row's
/// position `start + r % period` (`start` the offset, or its canvas's own start with per-canvas
/// caches).
struct RopeCase {
    rows: usize,
    heads: (usize, usize),
    hd: usize,
    period: usize,
    offset: usize,
    grouped: bool,
    vec: bool,
    bias: bool,
    /// 0: no cache, 1: the batch cache, 2: each canvas's own (`starts`).
    cache: usize,
    seq_rows: usize,
    starts: Vec<i32>,
}

/// q and k columns of one row in the RoPE epilogue's grouped order (v as it is).
fn grouped_row(row: &[f32], (qh, kvh): (usize, usize), hd: usize) -> Vec<f32> {
    use dllm::backend::cuda::rope_layout::permute_rows;
    let (q, rest) = row.split_at(qh * hd);
    let (k, v) = rest.split_at(kvh * hd);
    let mut out = permute_rows(q, qh, hd, 1);
    out.extend(permute_rows(k, kvh, hd, 1));
    out.extend_from_slice(v);
    out
}

fn rope_case(h: &Path, c: &RopeCase) {
    let (qh, kvh) = c.heads;
    let (hd, kv) = (c.hd, kvh * c.hd);
    let stride = (qh + 2 * kvh) * hd;
    let canvases = c.rows / c.period;
    let theta = 10_000.0;
    let x = round_bf16(&random_f32(
        c.rows as u64 * 5 + hd as u64,
        c.rows * stride,
        -2.0,
        2.0,
    ));
    let bias = random_f32(31, stride, -0.5, 0.5);
    // The reference, natural layout: bias added, q and k rotated (the CPU's RoPE), rounded.
    // Row r's canvas and position.
    let place = |r: usize| {
        let canvas = r / c.period;
        let start = if c.cache == 2 {
            c.starts[canvas] as usize
        } else {
            c.offset
        };
        (canvas, start + r % c.period)
    };
    let mut want = Vec::with_capacity(x.len());
    for (r, row) in x.chunks_exact(stride).enumerate() {
        let pos = [place(r).1];
        let mut y: Vec<f32> = row
            .iter()
            .zip(&bias)
            .map(|(&a, &b)| if c.bias { a + b } else { a })
            .collect();
        cpu::rope(&mut y[..qh * hd], &pos, qh, hd, theta);
        cpu::rope(&mut y[qh * hd..(qh + kvh) * hd], &pos, kvh, hd, theta);
        want.extend(round_bf16(&y));
    }
    let layout = |rows: &[f32]| -> Vec<f32> {
        if c.grouped {
            rows.chunks_exact(stride)
                .flat_map(|r| grouped_row(r, c.heads, hd))
                .collect()
        } else {
            rows.to_vec()
        }
    };
    let (x_in, want, bias_in) = (layout(&x), layout(&want), layout(&bias));
    let run = Run::new(&[
        c.rows,
        qh,
        kvh,
        hd,
        c.period,
        c.offset,
        c.grouped as usize,
        c.vec as usize,
        c.bias as usize,
        c.cache,
        c.seq_rows,
    ]);
    run.put("qkv.u16", &to_bf16_bits(&x_in));
    run.put("inv_freq.f32", &cpu::rope_inv_freq(hd, theta));
    run.put("bias.f32", &bias_in);
    run.put("starts.i32", &c.starts);
    run.exec(h, "rope_qkv");
    let what = format!(
        "{} rows q{qh} kv{kvh} hd{hd} grouped {} vec {} bias {} cache {}",
        c.rows, c.grouped, c.vec, c.bias, c.cache
    );
    let got = from_bf16_bits(&run.get("qkv.u16"));
    let err = rel_l2(&got, &want);
    assert!(err <= 1e-2, "{what}: qkv rel err {err}");
    // The caches: each row's rotated K and its V at (canvas, position), every other row left.
    let poison = bf16::from_bits(0x7fbf).to_f32();
    let mut want_k = vec![poison; canvases * c.seq_rows * kv];
    let mut want_v = want_k.clone();
    if c.cache > 0 {
        for (r, row) in want.chunks_exact(stride).enumerate() {
            let (canvas, pos) = place(r);
            let at = (canvas * c.seq_rows + pos) * kv;
            want_k[at..at + kv].copy_from_slice(&row[qh * hd..qh * hd + kv]);
            want_v[at..at + kv].copy_from_slice(&row[qh * hd + kv..]);
        }
    }
    for (name, want) in [("k.u16", want_k), ("v.u16", want_v)] {
        let got = from_bf16_bits(&run.get(name));
        let written = |v: &f32| v.to_bits() != poison.to_bits();
        assert_eq!(
            got.iter().map(written).collect::<Vec<_>>(),
            want.iter().map(written).collect::<Vec<_>>(),
            "{what}: {name} rows written"
        );
        let (g, w): (Vec<f32>, Vec<f32>) = got
            .iter()
            .zip(&want)
            .filter(|(_, w)| written(w))
            .map(|(&g, &w)| (g, w))
            .unzip();
        let err = if w.is_empty() { 0.0 } else { rel_l2(&g, &w) };
        assert!(err <= 1e-2, "{what}: {name} rel err {err}");
    }
}

#[test]
fn rope_rotates_q_and_k_and_writes_the_caches_where_each_row_belongs() {
    let Some(h) = harness() else { return };
    let case = |rows, heads, hd, period, grouped, vec, bias, cache, starts: &[i32]| RopeCase {
        rows,
        heads,
        hd,
        period,
        offset: 5,
        grouped,
        vec,
        bias,
        cache,
        seq_rows: 16,
        starts: starts.to_vec(),
    };
    for c in [
        // The batch cache: half-split (scalar, with biases) and the grouped layout (16-byte path).
        case(6, (2, 1), 32, 6, false, false, true, 1, &[]),
        case(8, (4, 2), 64, 4, true, true, false, 1, &[]),
        // Each canvas's own cache at its own start (packed cached sessions).
        case(6, (2, 2), 32, 2, false, true, true, 2, &[0, 5, 9]),
        case(4, (2, 1), 32, 2, true, false, false, 2, &[3, 7]),
        // No cache: q, k and v in place only.
        case(3, (2, 1), 16, 3, false, false, true, 0, &[]),
    ] {
        rope_case(h, &c);
    }
}

/// `predict_partial` + `predict_finalize` (the parallel-sampling kernels) against the host's
/// `predict_row`: the same token, and the confidence within 1e-9, for every confidence mode,
/// greedy and sampled, on rows with ties, NaNs and −∞, split as the launcher splits them.
#[test]
fn sampling_predicts_what_the_host_predicts() {
    let Some(h) = harness() else { return };
    let modes = [
        Remasking::LowConfidence,
        Remasking::Random,
        Remasking::Margin,
        Remasking::Entropy,
    ];
    for (rows, width, mask) in [(5usize, 1000usize, 500u32), (4, 1024, 0), (3, 4099, 7)] {
        let mut l = random_f32(width as u64, rows * width, -6.0, 6.0);
        l[..width].fill(1.0); // ties everywhere: the lowest candidate id
        if rows > 2 {
            // A NaN beside a clear winner; then −∞ everywhere but one entry.
            l[width + 3] = f32::NAN;
            l[width + 9] = 40.0;
            l[2 * width..3 * width].fill(f32::NEG_INFINITY);
            l[2 * width + width / 3] = 0.0;
        }
        if rows > 3 {
            // Two candidates tie at the maximum, far apart (different blocks): the lower id.
            l[3 * width + 5] = 50.0;
            l[3 * width + width - 10] = 50.0;
        }
        let positions: Vec<i32> = (0..rows).map(|r| (r * 11 + 2) as i32).collect();
        for temperature in [0.0, 0.7] {
            for (mode, &remasking) in modes.iter().enumerate() {
                let rule = PredictRule {
                    temperature,
                    remasking,
                    seed: 99 + width as u64,
                    step: 5,
                    mask_token: mask,
                    vocab_size: width - 3,
                };
                let (splits, chunk) = split_plan(rows, width);
                let first = usize::from(mask == 0);
                let run = Run::new(&[
                    rows,
                    width,
                    rule.vocab_size.min(width),
                    mask as usize,
                    first,
                    mode,
                    splits,
                    chunk,
                    usize::from(width % 4 == 0),
                ]);
                run.put("logits.f32", &l);
                run.put("positions.i32", &positions);
                run.put("rule.u64", &[temperature.to_bits(), rule.seed, rule.step]);
                run.exec(h, "predict");
                let (tokens, conf): (Vec<i32>, Vec<f64>) =
                    (run.get("tokens.i32"), run.get("conf.f64"));
                for r in 0..rows {
                    let want =
                        predict_row(&l[r * width..(r + 1) * width], positions[r] as usize, &rule);
                    let what = format!("row {r} of {rows}x{width} T{temperature} {remasking:?}");
                    assert_eq!(tokens[r] as u32, want.token, "{what}");
                    let (g, w) = (conf[r], want.confidence);
                    assert!(
                        g == w
                            || (g - w).abs() <= 1e-9 * w.abs().max(1e-300)
                            || (g.is_nan() && w.is_nan()),
                        "{what}: confidence {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_commit_kernel_commits_what_the_host_rule_commits() {
    let Some(h) = harness() else { return };
    // Top-k below, at and past the candidates, the threshold rule, one row per canvas, and 40
    // rows (a partly idle second warp).
    for (seed, batch, n, rule) in [
        (1, 3, 32, CommitRule::TopK(4)),
        (2, 2, 40, CommitRule::TopK(1)),
        (3, 2, 24, CommitRule::TopK(100)),
        (4, 4, 32, CommitRule::Threshold(0.6)),
        (5, 3, 1, CommitRule::TopK(1)),
        (6, 2, 33, CommitRule::Threshold(2.0)),
    ] {
        let mut c = commit_case(seed, batch, n);
        let (k, threshold, use_threshold) = match rule {
            CommitRule::TopK(k) => (k, 0.0, 0),
            CommitRule::Threshold(t) => (0, t, 1),
        };
        let run = Run::new(&[batch, n, c.canvas_len, c.mask as usize, k, use_threshold]);
        run.put("canvas.i32", &c.canvas);
        run.put("tokens.i32", &c.tokens);
        run.put("conf.f64", &c.conf);
        run.put("positions.i32", &c.positions);
        run.put("threshold.f64", &[threshold]);
        run.exec(h, "commit");
        let record: Vec<i32> = run.get("record.i32");
        let got = parse_commit_record(&record, batch, n).unwrap();
        let want = host_commit(
            &mut c.canvas,
            c.canvas_len,
            &c.tokens,
            &c.conf,
            &c.positions,
            n,
            c.mask,
            rule,
        );
        assert!(
            want.iter().any(|w| !w.is_empty()),
            "{rule:?}: the case commits nothing"
        );
        assert_eq!(got, want, "{batch} canvases of {n} rows, {rule:?}");
        assert_eq!(run.get::<i32>("canvas.i32"), c.canvas, "{rule:?}: canvas");
    }
}
