//! GPU checks of the mixture kernels ([`super::self_check`]): the routing against the CPU's
//! [`crate::model::experts::route`] (ties, huge and non-finite logits included) and the
//! grouping's invariants; the grouped GEMM's three epilogues, gathered and in order, against an
//! f64 host product; the q/k head norm against the CPU RMSNorm; a whole mixture
//! ([`Moe::run`]) against a host reference; and a bench at LLaDA-MoE-7B's shapes.

use super::*;
use crate::backend::cpu;
use crate::backend::cuda::check::{self, download, upload, BenchResult, CheckResult, TOL_BF16};
use crate::backend::cuda::elementwise::RopeQkvShape;
use crate::backend::cuda::gemm::{tol_f32, Gemm};
use crate::backend::cuda::swiglu_layout;
use crate::model::experts::route;

/// A row's CPU routing with its experts in ascending order (the GPU's order).
fn cpu_routing(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut picks = route(logits, k);
    picks.sort_by_key(|p| p.0);
    picks
}

/// Why `r` (the routing of `rows` rows of `shape`) breaks the grouping's contract, if it does:
/// each row's experts distinct, ascending and below E; the counts partition the pairs in
/// expert order; each pair's grouped row inside its expert's range, pairs of one expert in pair
/// order, and the grouped row's source row the pair's row.
pub fn grouping_fault(r: &Routing, shape: MoeShape, rows: usize) -> Option<String> {
    let (e, k) = (shape.experts, shape.per_row);
    let pairs = rows * k;
    for row in 0..rows {
        let ex = &r.experts[row * k..(row + 1) * k];
        if ex.iter().any(|&x| x < 0 || x as usize >= e) || ex.windows(2).any(|w| w[0] >= w[1]) {
            return Some(format!("row {row} experts {ex:?}"));
        }
    }
    let mut first = 0i32;
    for x in 0..e {
        if r.off[x] != first {
            return Some(format!("expert {x} starts at {} not {first}", r.off[x]));
        }
        first += r.cnt[x];
    }
    if first as usize != pairs {
        return Some(format!("counts sum to {first}, not {pairs} pairs"));
    }
    let mut next = r.off.clone();
    for i in 0..pairs {
        let x = r.experts[i] as usize;
        if r.pair_pos[i] != next[x] {
            return Some(format!("pair {i} at {} not {}", r.pair_pos[i], next[x]));
        }
        next[x] += 1;
        if r.grouped_rows[r.pair_pos[i] as usize] as usize != i / k {
            return Some(format!("grouped row of pair {i} is not row {}", i / k));
        }
    }
    None
}

/// Makes the first rows of `l` (`[rows, e]` logits) special, as many as there are up to five:
/// all equal (ties), huge values, a NaN, −∞ everywhere (NaNs after the max), a +∞ (a NaN where
/// it meets the max). Returns how many rows it changed; of those, the rows from 2 on have
/// non-finite probabilities. The GPU checks and the CPU emulation (tests/kernel_emulation.rs)
/// route them.
pub fn special_logit_rows(l: &mut [f32], rows: usize, e: usize) -> usize {
    let special = rows.min(5);
    for row in 0..special {
        let r = &mut l[row * e..(row + 1) * e];
        match row {
            0 => r.fill(0.5),
            1 => r
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = if i % 3 == 1 { 1e30 } else { -1e30 }),
            2 => r[e / 2] = f32::NAN,
            3 => r.fill(f32::NEG_INFINITY),
            _ => r[e - 1] = f32::INFINITY,
        }
    }
    special
}

/// Random logits with [`special_logit_rows`]; returns them and how many leading rows are special.
fn routing_logits(seed: u64, rows: usize, e: usize) -> (Vec<f32>, usize) {
    let mut l = check::random_f32(seed, rows * e, -4.0, 4.0);
    let special = special_logit_rows(&mut l, rows, e);
    (l, special)
}

fn check_routing(
    dev: &CudaDevice,
    moe: &Moe,
    rows: usize,
    experts: usize,
    k: usize,
) -> Result<Vec<CheckResult>> {
    let shape = MoeShape {
        experts,
        per_row: k,
        d: 8,
        h: 8,
    };
    let name = format!("moe.route {rows} rows E{experts} k{k}");
    let (logits, special) = routing_logits(rows as u64 * 31 + experts as u64, rows, experts);
    let mut buf = MoeBuffers::alloc(dev, MoeBufferSizes::new(shape, rows, true))?;
    buf.set_logits(dev, &logits)?;
    moe.route(dev, shape, &mut buf, rows)?;
    let r = buf.routing(dev, shape, rows)?;
    let mut out = vec![CheckResult::exact(
        format!("{name} grouping"),
        grouping_fault(&r, shape, rows).is_none(),
        grouping_fault(&r, shape, rows).unwrap_or_else(|| format!("{} pairs", rows * k)),
    )];
    // Every finite row (the tie and huge rows too) picks the CPU's experts with its weights;
    // the NaN, −∞ and +∞ rows only have to be valid (checked above), and a random row whose k-th
    // and next probabilities are within 1e-5 of each other may go either way (the GPU's expf
    // and the host's exp differ by an ulp or two), so it is not compared.
    let (mut same, mut compared, mut got_w, mut want_w) = (0, 0, Vec::new(), Vec::new());
    let mut near_ties = 0;
    for row in 0..rows {
        if row >= 2 && row < special {
            continue;
        }
        let l = &logits[row * experts..(row + 1) * experts];
        if row >= special && k < experts {
            let next = route(l, k + 1);
            if next[k - 1].1 - next[k].1 <= 1e-5 * next[k - 1].1 {
                near_ties += 1;
                continue;
            }
        }
        let want = cpu_routing(l, k);
        let got = &r.experts[row * k..(row + 1) * k];
        compared += 1;
        if want.iter().map(|p| p.0 as i32).eq(got.iter().copied()) {
            same += 1;
            want_w.extend(want.iter().map(|p| p.1));
            got_w.extend_from_slice(&r.weights[row * k..(row + 1) * k]);
        }
    }
    out.push(CheckResult::exact(
        format!("{name} experts == cpu"),
        same == compared,
        format!("{same}/{compared} finite rows pick the CPU's experts ({near_ties} near ties not compared)"),
    ));
    out.push(CheckResult::new(
        format!("{name} weights vs cpu"),
        check::rel_l2(&got_w, &want_w),
        1e-5,
        format!("{} weights", got_w.len()),
    ));
    Ok(out)
}

/// Which expert owns grouped row `pos`.
fn owner(r: &Routing, pos: usize) -> usize {
    r.off.partition_point(|&o| o as usize <= pos) - 1
}

/// `a[rows[i]] · W_{owner(i)}ᵀ` in f64 for every grouped row `i` (`rows`: `None` = `i`), the
/// owner read from `r`'s offsets.
pub fn grouped_reference(
    r: &Routing,
    a: &[f32],
    rows: Option<&[i32]>,
    w: &[f32],
    (n, k): (usize, usize),
) -> Vec<f64> {
    let pairs = r.pair_pos.len();
    let mut out = vec![0f64; pairs * n];
    for pos in 0..pairs {
        let src = rows.map_or(pos, |m| m[pos] as usize);
        let e = owner(r, pos);
        let x = &a[src * k..(src + 1) * k];
        for c in 0..n {
            let wr = &w[(e * n + c) * k..(e * n + c + 1) * k];
            out[pos * n + c] = x.iter().zip(wr).map(|(&p, &q)| p as f64 * q as f64).sum();
        }
    }
    out
}

fn check_grouped(
    dev: &CudaDevice,
    moe: &Moe,
    rows: usize,
    (experts, k): (usize, usize),
    (n, kd): (usize, usize),
) -> Result<Vec<CheckResult>> {
    let shape = MoeShape {
        experts,
        per_row: k,
        d: 8,
        h: 8,
    };
    let pairs = rows * k;
    let name = format!("moe.grouped_gemm {rows}x{k} of E{experts} n{n} k{kd}");
    let (logits, _) = routing_logits(7 + rows as u64, rows, experts);
    // Finite logits only: every row routes as the CPU would.
    let logits: Vec<f32> = logits
        .iter()
        .map(|&v| {
            if v.is_finite() {
                v.clamp(-8.0, 8.0)
            } else {
                0.0
            }
        })
        .collect();
    let mut buf = MoeBuffers::alloc(dev, MoeBufferSizes::new(shape, rows, true))?;
    buf.set_logits(dev, &logits)?;
    moe.route(dev, shape, &mut buf, rows)?;
    let r = buf.routing(dev, shape, rows)?;
    if let Some(fault) = grouping_fault(&r, shape, rows) {
        return Err(Error::Backend(format!(
            "{name}: the grouping breaks its contract: {fault}"
        )));
    }
    let a = check::round_bf16(&check::random_f32(3 + n as u64, rows * kd, -1.0, 1.0));
    let ordered = check::round_bf16(&check::random_f32(4 + n as u64, pairs * kd, -1.0, 1.0));
    let w = check::round_bf16(&check::random_f32(
        5 + kd as u64,
        experts * n * kd,
        -0.5,
        0.5,
    ));
    let (ad, od, wd) = (
        upload(dev, &check::to_bf16_bits(&a))?,
        upload(dev, &check::to_bf16_bits(&ordered))?,
        upload(dev, &check::to_bf16_bits(&w))?,
    );
    let gs = GroupedShape {
        experts,
        n,
        k: kd,
        a_rows: rows,
    };
    let (a_rows, off, cnt) = (
        buf.grp_row.slice(0..pairs),
        buf.off.as_view(),
        buf.cnt.as_view(),
    );
    let groups = Groups {
        a_rows: Some(&a_rows),
        off: &off,
        cnt: &cnt,
        pairs,
        max_rows: rows,
    };
    let want = grouped_reference(&r, &a, Some(&r.grouped_rows), &w, (n, kd));
    let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    let poison = f32::from_bits(check::POISON_F32_BITS);
    let mut out = Vec::new();
    // fp32, gathered.
    let mut c = upload(dev, &vec![poison; pairs * n])?;
    let cv = GemmOut::F32(c.slice_mut(0..pairs * n));
    moe.grouped
        .run(dev, &ad.as_view(), &wd.as_view(), cv, &groups, gs)?;
    out.push(CheckResult::new(
        format!("{name} f32 gathered"),
        check::rel_l2(&download(dev, &c)?, &want32),
        tol_f32(kd),
        format!("{pairs} grouped rows, G{}", groups_for(rows)),
    ));
    // The bf16 epilogues, gathered: plain, and the fused SwiGLU (W's rows read as interleaved
    // gate/up rows).
    let bf16_out = |swiglu: bool| -> Result<Vec<f32>> {
        let len = if swiglu { pairs * n / 2 } else { pairs * n };
        let mut c = upload(dev, &vec![check::POISON_BF16_BITS; len])?;
        let cv = if swiglu {
            GemmOut::SwigluBf16(c.slice_mut(0..len))
        } else {
            GemmOut::Bf16(c.slice_mut(0..len))
        };
        moe.grouped
            .run(dev, &ad.as_view(), &wd.as_view(), cv, &groups, gs)?;
        Ok(check::from_bf16_bits(&download(dev, &c)?))
    };
    out.push(CheckResult::new(
        format!("{name} bf16 gathered"),
        check::rel_l2(&bf16_out(false)?, &want32),
        TOL_BF16,
        "",
    ));
    if swiglu_layout::supported(n / 2) && n.is_multiple_of(16) {
        let want_act: Vec<f32> = swiglu_layout::swiglu_of_fused(&want, pairs, n / 2)
            .iter()
            .map(|&v| v as f32)
            .collect();
        out.push(CheckResult::new(
            format!("{name} swiglu gathered"),
            check::rel_l2(&bf16_out(true)?, &want_act),
            TOL_BF16,
            "",
        ));
    }
    // fp32, the input already in grouped order.
    let want: Vec<f32> = grouped_reference(&r, &ordered, None, &w, (n, kd))
        .iter()
        .map(|&v| v as f32)
        .collect();
    let in_order = Groups {
        a_rows: None,
        ..groups
    };
    let mut c = upload(dev, &vec![poison; pairs * n])?;
    let cv = GemmOut::F32(c.slice_mut(0..pairs * n));
    let gs = GroupedShape {
        a_rows: pairs,
        ..gs
    };
    moe.grouped
        .run(dev, &od.as_view(), &wd.as_view(), cv, &in_order, gs)?;
    out.push(CheckResult::new(
        format!("{name} f32 in order"),
        check::rel_l2(&download(dev, &c)?, &want),
        tol_f32(kd),
        "",
    ));
    Ok(out)
}

fn check_head_norm(
    dev: &CudaDevice,
    rows: usize,
    (qh, kvh, hd): (usize, usize, usize),
) -> Result<CheckResult> {
    let ew = Elementwise::new(dev)?;
    let (q_cols, kv) = (qh * hd, kvh * hd);
    let stride = q_cols + 2 * kv;
    let x = check::round_bf16(&check::random_f32(21 + hd as u64, rows * stride, -2.0, 2.0));
    let (qw, kw) = (
        check::random_f32(22, hd, 0.5, 1.5),
        check::random_f32(23, hd, 0.5, 1.5),
    );
    let mut want = x.clone();
    let mut tmp = vec![0f32; hd];
    for row in want.chunks_exact_mut(stride) {
        for (h, head) in row[..q_cols + kv].chunks_exact_mut(hd).enumerate() {
            cpu::rms_norm(head, if h < qh { &qw } else { &kw }, 1e-6, &mut tmp);
            head.copy_from_slice(&tmp);
        }
    }
    let mut d = upload(dev, &check::to_bf16_bits(&x))?;
    let (qd, kd) = (upload(dev, &qw)?, upload(dev, &kw)?);
    let shape = RopeQkvShape {
        rows,
        row_stride: stride,
        q_heads: qh,
        kv_heads: kvh,
        k_col: q_cols,
        v_col: q_cols + kv,
        head_dim: hd,
        pos_period: rows,
        pos_offset: 0,
        grouped: false,
    };
    ew.rmsnorm_heads(
        &mut d.as_view_mut(),
        (&qd.as_view(), &kd.as_view()),
        &shape,
        1e-6,
    )?;
    Ok(CheckResult::new(
        format!("moe.rmsnorm_heads {rows} rows q{qh} kv{kvh} hd{hd}"),
        check::rel_l2(&check::from_bf16_bits(&download(dev, &d)?), &want),
        TOL_BF16,
        "v columns must come back unchanged (part of the comparison)",
    ))
}

/// The experts' gate/up matrices (`gate` and `up` `[E, h, d]` row-major) stacked as the upload
/// lays them out: `[E, 2h, d]`, each expert's rows interleaved for the fused SwiGLU when `fused`
/// ([`swiglu_layout::interleave`]), else its gate rows then its up rows.
pub fn stacked_gate_up<T: Copy>(gate: &[T], up: &[T], shape: MoeShape, fused: bool) -> Vec<T> {
    let per = shape.h * shape.d;
    let mut out = Vec::with_capacity(2 * gate.len());
    for (g, u) in gate.chunks_exact(per).zip(up.chunks_exact(per)) {
        if fused {
            out.extend(swiglu_layout::interleave(g, u, shape.h, shape.d));
        } else {
            out.extend_from_slice(g);
            out.extend_from_slice(u);
        }
    }
    out
}

/// The host reference of a mixture over `rows = x0.len() / d` rows: `x0 + Σ p · down(silu(gate ·
/// xn) · (up · xn))` per row in f64, each row routed from its `logits` (`[rows, E]`) by the CPU's
/// rule, the SwiGLU activations rounded to bf16 as the GPU stores them. `gate` and `up` are
/// `[E, h, d]`, `down` `[E, d, h]`, row-major.
pub fn host_mixture(
    x0: &[f32],
    xn: &[f32],
    logits: &[f32],
    (gate, up, down): (&[f32], &[f32], &[f32]),
    shape: MoeShape,
) -> Vec<f32> {
    let MoeShape {
        experts,
        per_row: k,
        d,
        h,
    } = shape;
    let mut want = x0.to_vec();
    for r in 0..x0.len() / d {
        let xr = &xn[r * d..(r + 1) * d];
        let dot = |w: &[f32]| {
            xr.iter()
                .zip(w)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
        };
        let mut acc = vec![0f64; d];
        for (e, p) in cpu_routing(&logits[r * experts..(r + 1) * experts], k) {
            let act: Vec<f64> = (0..h)
                .map(|j| {
                    let g = dot(&gate[(e * h + j) * d..(e * h + j + 1) * d]);
                    let u = dot(&up[(e * h + j) * d..(e * h + j + 1) * d]);
                    half::bf16::from_f64(swiglu_layout::silu_mul(g, u)).to_f64()
                })
                .collect();
            for (c, a) in acc.iter_mut().enumerate() {
                let wd = &down[(e * d + c) * h..(e * d + c + 1) * h];
                let y: f64 = act.iter().zip(wd).map(|(&a, &b)| a * b as f64).sum();
                *a += p as f64 * y;
            }
        }
        for (c, a) in acc.iter().enumerate() {
            want[r * d + c] += *a as f32;
        }
    }
    want
}

/// A whole mixture on random weights against [`host_mixture`].
fn check_mixture(
    dev: &CudaDevice,
    moe: &Moe,
    rows: usize,
    shape: MoeShape,
    fused: bool,
) -> Result<CheckResult> {
    let MoeShape {
        experts,
        per_row: k,
        d,
        h,
    } = shape;
    let gemm = Gemm::load(dev)?;
    let ew = Elementwise::new(dev)?;
    let xn = check::round_bf16(&check::random_f32(31, rows * d, -1.0, 1.0));
    let x0 = check::random_f32(32, rows * d, -1.0, 1.0);
    let router = check::round_bf16(&check::random_f32(33, experts * d, -0.3, 0.3));
    let scale = 1.0 / (d as f32).sqrt();
    let gate = check::round_bf16(&check::random_f32(34, experts * h * d, -scale, scale));
    let up = check::round_bf16(&check::random_f32(35, experts * h * d, -scale, scale));
    let down = check::round_bf16(&check::random_f32(36, experts * d * h, -scale, scale));
    let mut logits = Vec::with_capacity(rows * experts);
    for xr in xn.chunks_exact(d) {
        for w in router.chunks_exact(d) {
            logits.push(
                xr.iter()
                    .zip(w)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>() as f32,
            );
        }
    }
    let want = host_mixture(&x0, &xn, &logits, (&gate, &up, &down), shape);
    // Device weights in the upload layout.
    let gu = stacked_gate_up(&gate, &up, shape, fused);
    let w = ExpertWeights {
        router: upload(dev, &check::to_bf16_bits(&router))?,
        gate_up: upload(dev, &check::to_bf16_bits(&gu))?,
        down: upload(dev, &check::to_bf16_bits(&down))?,
    };
    let xnd = upload(dev, &check::to_bf16_bits(&xn))?;
    let mut xd = upload(dev, &x0)?;
    let mut buf = MoeBuffers::alloc(dev, MoeBufferSizes::new(shape, rows, fused))?;
    moe.run(
        dev,
        &ew,
        &w,
        shape,
        (&xnd.as_view(), &mut xd.as_view_mut()),
        rows,
        &mut buf,
        fused,
        |a, wr, out| gemm.run(dev, a, wr, out, rows, experts, d),
    )?;
    let got = download(dev, &xd)?;
    // Compare the mixture's contribution (the residual would hide its errors).
    let delta = |v: &[f32]| v.iter().zip(&x0).map(|(a, b)| a - b).collect::<Vec<f32>>();
    Ok(CheckResult::new(
        format!(
            "moe.mixture {rows} rows E{experts} k{k} d{d} h{h}{}",
            if fused { " fused" } else { "" }
        ),
        check::rel_l2(&delta(&got), &delta(&want)),
        TOL_BF16,
        "x += Σ p·down(silu(gate)·up), the contribution compared",
    ))
}

fn one(name: String, r: Result<CheckResult>) -> CheckResult {
    r.unwrap_or_else(|e| CheckResult::failed(name, e))
}

/// Every check of the mixture kernels.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let moe = match Moe::load(dev) {
        Ok(m) => m,
        Err(e) => return vec![CheckResult::failed("moe.load", e)],
    };
    let mut out = Vec::new();
    let many = |name: String, r: Result<Vec<CheckResult>>| match r {
        Ok(v) => v,
        Err(e) => vec![CheckResult::failed(name, e)],
    };
    for &(rows, e, k) in &[
        (1usize, 8usize, 1usize),
        (5, 8, 8),
        (37, 64, 8),
        (256, 64, 8),
        (9, 1024, 32),
        (3072, 64, 8),
    ] {
        out.extend(many(
            format!("moe.route {rows} E{e} k{k}"),
            check_routing(dev, &moe, rows, e, k),
        ));
    }
    for &(rows, e, k, n, kd) in &[
        (1usize, 8usize, 2usize, 16usize, 8usize),
        (9, 8, 2, 40, 24),
        // Forwards of 20, 44 and 52 rows: chunks of 24, 48 and 56 rows (G = 3, 6, 7).
        (20, 8, 4, 64, 32),
        (44, 16, 8, 48, 40),
        (52, 8, 2, 64, 16),
        (32, 64, 8, 256, 128),
        (70, 16, 4, 64, 64),
        (384, 64, 8, 128, 64),
        // Every row chooses every expert: 200 rows each, four chunks of 64.
        (200, 8, 8, 64, 32),
    ] {
        out.extend(many(
            format!("moe.grouped_gemm {rows} E{e}"),
            check_grouped(dev, &moe, rows, (e, k), (n, kd)),
        ));
    }
    for &(rows, qh, kvh, hd) in &[
        (1usize, 2usize, 2usize, 32usize),
        (33, 16, 16, 128),
        (7, 8, 2, 64),
    ] {
        out.push(one(
            format!("moe.rmsnorm_heads {rows}"),
            check_head_norm(dev, rows, (qh, kvh, hd)),
        ));
    }
    for &(rows, experts, k, d, h, fused) in &[
        (3usize, 8usize, 2usize, 64usize, 32usize, true),
        (40, 16, 4, 128, 64, false),
        (40, 16, 4, 128, 64, true),
        // LLaDA-MoE's routing (64 experts, 8 per token) on a b1 block step's 32 rows.
        (32, 64, 8, 256, 128, true),
        (32, 64, 8, 256, 128, false),
    ] {
        let shape = MoeShape {
            experts,
            per_row: k,
            d,
            h,
        };
        out.push(one(
            format!("moe.mixture {rows}"),
            check_mixture(dev, &moe, rows, shape, fused),
        ));
    }
    out
}

/// The mixture at LLaDA-MoE-7B's shape (64 experts of 1024, 8 per token, hidden 2048): a b1
/// block step's 32 rows and a 384-row full forward, the whole [`Moe::run`] (router GEMM
/// included); GB/s counts the router and the experts the rows chose once each.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    match bench_inner(dev) {
        Ok(v) => v,
        Err(e) => vec![BenchResult::failed("moe", e)],
    }
}

fn bench_inner(dev: &CudaDevice) -> Result<Vec<BenchResult>> {
    let shape = MoeShape {
        experts: 64,
        per_row: 8,
        d: 2048,
        h: 1024,
    };
    let (d, h, e) = (shape.d, shape.h, shape.experts);
    let moe = Moe::load(dev)?;
    let gemm = Gemm::load(dev)?;
    let ew = Elementwise::new(dev)?;
    // Random router and rows (the routing spreads over the experts); zero expert weights (the
    // GEMMs' time does not depend on the values, and filling 400 M random values on the host
    // would cost the device session seconds).
    let zeros = |n: usize| {
        dev.stream
            .alloc_zeros::<u16>(n)
            .map_err(|e| cuda_err("alloc", e))
    };
    let w = ExpertWeights {
        router: upload(
            dev,
            &check::to_bf16_bits(&check::random_f32(41, e * d, -0.3, 0.3)),
        )?,
        gate_up: zeros(e * 2 * h * d)?,
        down: zeros(e * d * h)?,
    };
    let mut res = Vec::new();
    for rows in [32usize, 384] {
        let xn = upload(
            dev,
            &check::to_bf16_bits(&check::random_f32(44, rows * d, -1.0, 1.0)),
        )?;
        let mut x = upload(dev, &vec![0f32; rows * d])?;
        let mut buf = MoeBuffers::alloc(dev, MoeBufferSizes::new(shape, rows, true))?;
        let ms = check::time_median_ms(dev, 3, 20, |_| {
            moe.run(
                dev,
                &ew,
                &w,
                shape,
                (&xn.as_view(), &mut x.as_view_mut()),
                rows,
                &mut buf,
                true,
                |a, wr, out| gemm.run(dev, a, wr, out, rows, e, d),
            )
        })?;
        let used = buf
            .routing(dev, shape, rows)?
            .cnt
            .iter()
            .filter(|&&c| c > 0)
            .count();
        let bytes = 2 * (e * d + used * 3 * d * h);
        res.push(BenchResult::new(
            format!("moe.mixture 7B shape {rows} rows"),
            ms,
            Some(bytes as f64),
            Some((2 * rows * shape.per_row * 3 * d * h) as f64),
            format!("{used}/{e} experts touched"),
        ));
    }
    Ok(res)
}
