//! GPU checks of the element-wise kernels against the CPU reference ops ([`super::self_check`]:
//! RMSNorm, RoPE and the fused RoPE + K/V cache write, SwiGLU, embedding, bf16↔f32 conversion,
//! the row gathers and the strided copy, on odd and model-sized shapes) and their bandwidth
//! benches ([`super::bench`]).

use super::*;
use crate::backend::cuda::check::{download, upload};

fn check_rmsnorm(
    dev: &CudaDevice,
    ew: &Elementwise,
    rows: usize,
    d: usize,
    bf16_out: bool,
) -> Result<(f64, String)> {
    let x = check::random_f32(11 + d as u64, rows * d, -3.0, 3.0);
    let w = check::random_f32(12 + d as u64, d, 0.5, 1.5);
    let eps = 1e-5f32;
    let mut want = vec![0f32; rows * d];
    cpu::rms_norm(&x, &w, eps, &mut want);
    let (xd, wd) = (upload(dev, &x)?, upload(dev, &w)?);
    let got = if bf16_out {
        let mut out = upload(dev, &vec![check::POISON_BF16_BITS; rows * d])?;
        ew.rmsnorm_bf16(
            &xd.as_view(),
            &wd.as_view(),
            &mut out.as_view_mut(),
            rows,
            d,
            eps,
        )?;
        check::from_bf16_bits(&download(dev, &out)?)
    } else {
        let mut out = upload(dev, &vec![f32::from_bits(check::POISON_F32_BITS); rows * d])?;
        ew.rmsnorm_f32(
            &xd.as_view(),
            &wd.as_view(),
            &mut out.as_view_mut(),
            rows,
            d,
            eps,
        )?;
        download(dev, &out)?
    };
    let path = if rmsnorm_vec_fits(d) {
        "float4"
    } else {
        "scalar"
    };
    Ok((
        check::rel_l2(&got, &want),
        format!("rows {rows} d {d}, {path} path"),
    ))
}

#[allow(clippy::too_many_arguments)]
fn check_rope(
    dev: &CudaDevice,
    ew: &Elementwise,
    seqs: usize,
    len: usize,
    q_heads: usize,
    k_heads: usize,
    hd: usize,
    offset: usize,
) -> Result<(f64, String)> {
    let theta = 500_000f32;
    let stride = (q_heads + 2 * k_heads) * hd; // q | k | v, like the fused QKV output
    let rows = seqs * len;
    let x = check::round_bf16(&check::random_f32(21 + hd as u64, rows * stride, -2.0, 2.0));
    // CPU reference on the q and k parts separately.
    let positions: Vec<usize> = (0..rows).map(|r| offset + r % len).collect();
    let mut q: Vec<f32> = Vec::with_capacity(rows * q_heads * hd);
    let mut k: Vec<f32> = Vec::with_capacity(rows * k_heads * hd);
    for r in 0..rows {
        let row = &x[r * stride..(r + 1) * stride];
        q.extend_from_slice(&row[..q_heads * hd]);
        k.extend_from_slice(&row[q_heads * hd..(q_heads + k_heads) * hd]);
    }
    cpu::rope(&mut q, &positions, q_heads, hd, theta);
    cpu::rope(&mut k, &positions, k_heads, hd, theta);
    let mut want = check::round_bf16(&x);
    for r in 0..rows {
        let row = &mut want[r * stride..(r + 1) * stride];
        row[..q_heads * hd].copy_from_slice(&q[r * q_heads * hd..(r + 1) * q_heads * hd]);
        row[q_heads * hd..(q_heads + k_heads) * hd]
            .copy_from_slice(&k[r * k_heads * hd..(r + 1) * k_heads * hd]);
    }
    let inv = upload(dev, &cpu::rope_inv_freq(hd, theta))?;
    let mut buf = upload(dev, &check::to_bf16_bits(&x))?;
    let shape = RopeShape {
        rows,
        row_stride: stride,
        q_heads,
        k_heads,
        k_col: q_heads * hd,
        head_dim: hd,
        pos_period: len,
        pos_offset: offset,
    };
    ew.rope(&mut buf.as_view_mut(), &inv.as_view(), shape)?;
    let got = check::from_bf16_bits(&download(dev, &buf)?);
    // V columns must be untouched (exactly).
    let v_ok = (0..rows).all(|r| {
        let a = (q_heads + k_heads) * hd + r * stride;
        got[a..a + k_heads * hd] == x[a..a + k_heads * hd]
    });
    let e = if v_ok {
        check::rel_l2(&got, &want)
    } else {
        f64::INFINITY
    };
    Ok((
        e,
        format!("{seqs}x{len} rows, {q_heads}q+{k_heads}k heads of {hd}, pos from {offset}, v untouched {v_ok}"),
    ))
}

/// Fused RoPE + cache write vs the CPU rope on q and k; the cache must hold exactly the rotated
/// K the kernel left in the matrix and exactly the input V, and rows outside the block stay
/// poisoned. `grouped`: the q and k heads (and their biases) in the grouped layout of
/// [`crate::backend::cuda::rope_layout`], compared with the permuted CPU result.
#[allow(clippy::too_many_arguments)]
fn check_rope_qkv(
    dev: &CudaDevice,
    ew: &Elementwise,
    seqs: usize,
    len: usize,
    heads: (usize, usize, usize),
    offset: usize,
    with_cache: bool,
    vec: bool,
    with_bias: bool,
    grouped: bool,
) -> Result<(f64, String)> {
    let (q_heads, kv_heads, hd) = heads;
    let theta = 10_000f32;
    let kvw = kv_heads * hd;
    // q | k | v with 8 spare columns at the end (row stride not equal to the used width).
    let stride = q_heads * hd + 2 * kvw + 8;
    let used = q_heads * hd + 2 * kvw;
    let rows = seqs * len;
    let input = check::round_bf16(&check::random_f32(71 + hd as u64, rows * stride, -2.0, 2.0));
    let bias: Vec<f32> = if with_bias {
        check::random_f32(5 + hd as u64, used, -1.0, 1.0)
    } else {
        vec![0.0; used]
    };
    // What the kernel computes from: the input plus the bias (fp32), v rounded back to bf16.
    let mut x = input.clone();
    for r in 0..rows {
        for c in 0..used {
            x[r * stride + c] += bias[c];
        }
    }
    let positions: Vec<usize> = (0..rows).map(|r| offset + r % len).collect();
    let (mut q, mut k) = (Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &x[r * stride..(r + 1) * stride];
        q.extend_from_slice(&row[..q_heads * hd]);
        k.extend_from_slice(&row[q_heads * hd..q_heads * hd + kvw]);
    }
    cpu::rope(&mut q, &positions, q_heads, hd, theta);
    cpu::rope(&mut k, &positions, kv_heads, hd, theta);
    let mut want = check::round_bf16(&x);
    for r in 0..rows {
        let row = &mut want[r * stride..(r + 1) * stride];
        row[..q_heads * hd].copy_from_slice(&q[r * q_heads * hd..(r + 1) * q_heads * hd]);
        row[q_heads * hd..q_heads * hd + kvw].copy_from_slice(&k[r * kvw..(r + 1) * kvw]);
    }
    // The grouped layout: every q and k head's columns permuted, in the input, the bias and the
    // expected result alike.
    let regroup = |v: &mut [f32]| {
        if grouped {
            for (start, heads) in [(0, q_heads), (q_heads * hd, kv_heads)] {
                let seg = &mut v[start..start + heads * hd];
                let p = crate::backend::cuda::rope_layout::permute_rows(seg, heads, hd, 1);
                seg.copy_from_slice(&p);
            }
        }
    };
    let mut input = input;
    let mut bias = bias;
    for r in 0..rows {
        regroup(&mut input[r * stride..(r + 1) * stride]);
        regroup(&mut want[r * stride..(r + 1) * stride]);
    }
    regroup(&mut bias);
    let shape = RopeQkvShape {
        rows,
        row_stride: stride,
        q_heads,
        kv_heads,
        k_col: q_heads * hd,
        v_col: q_heads * hd + kvw,
        head_dim: hd,
        pos_period: len,
        pos_offset: offset,
        grouped,
    };
    let seq_rows = offset + len + 3;
    let inv = upload(dev, &cpu::rope_inv_freq(hd, theta))?;
    let bias_dev = upload(dev, &bias)?;
    let mut buf = upload(dev, &check::to_bf16_bits(&input))?;
    let poison = vec![check::POISON_BF16_BITS; seqs * seq_rows * kvw];
    let mut kc = upload(dev, &poison)?;
    let mut vc = upload(dev, &poison)?;
    let prefetch_dev = upload(dev, &vec![0u16; 100_003])?;
    {
        let mut kv = kc.as_view_mut();
        let mut vv = vc.as_view_mut();
        let dst = with_cache.then_some(KvDst {
            k: &mut kv,
            v: &mut vv,
            seq_rows,
        });
        let bv = bias_dev.as_view();
        let b = with_bias.then_some(&bv);
        // With the cache, also an L2 prefetch of an unrelated buffer (a block step's use): the
        // results must not change, and the launch's extra arguments must line up.
        let pv = prefetch_dev.as_view();
        let pf = with_cache.then_some(&pv);
        ew.rope_qkv_variant(
            &mut buf.as_view_mut(),
            &inv.as_view(),
            b,
            shape,
            dst.into(),
            vec,
            pf,
        )?;
    }
    let got_bits = download(dev, &buf)?;
    let got = check::from_bf16_bits(&got_bits);
    let (kd, vd) = (download(dev, &kc)?, download(dev, &vc)?);
    // The v columns as the kernel must leave them (input + bias, rounded), and the spare columns.
    let in_bits = check::to_bf16_bits(&want);
    let mut cache_ok = true;
    let mut written = vec![false; seqs * seq_rows];
    if with_cache {
        for r in 0..rows {
            let c = shape.cache_row(r, seq_rows);
            written[c] = true;
            let kr = r * stride + shape.k_col;
            let vr = r * stride + shape.v_col;
            cache_ok &= kd[c * kvw..(c + 1) * kvw] == got_bits[kr..kr + kvw];
            cache_ok &= vd[c * kvw..(c + 1) * kvw] == in_bits[vr..vr + kvw];
        }
    }
    for (c, &w) in written.iter().enumerate() {
        if !w {
            let untouched = |d: &[u16]| {
                d[c * kvw..(c + 1) * kvw]
                    .iter()
                    .all(|&b| b == check::POISON_BF16_BITS)
            };
            cache_ok &= untouched(&kd) && untouched(&vd);
        }
    }
    // V (biased when a bias is given) and the spare columns of the matrix must be exact.
    let rest_ok = (0..rows).all(|r| {
        let a = r * stride + shape.v_col;
        got_bits[a..(r + 1) * stride] == in_bits[a..(r + 1) * stride]
    });
    let e = if cache_ok && rest_ok {
        check::rel_l2(&got, &want)
    } else {
        f64::INFINITY
    };
    Ok((
        e,
        format!(
            "{seqs}x{len} rows, {q_heads}q+{kv_heads}kv heads of {hd}, pos from {offset}, bias {with_bias}, grouped {grouped}; cache exact {cache_ok}, v exact {rest_ok}"
        ),
    ))
}

fn check_swiglu(
    dev: &CudaDevice,
    ew: &Elementwise,
    rows: usize,
    h: usize,
    vec: bool,
) -> Result<(f64, String)> {
    let gu = check::round_bf16(&check::random_f32(31 + h as u64, rows * 2 * h, -6.0, 6.0));
    let (mut g, mut u) = (Vec::new(), Vec::new());
    for r in 0..rows {
        g.extend_from_slice(&gu[r * 2 * h..r * 2 * h + h]);
        u.extend_from_slice(&gu[r * 2 * h + h..(r + 1) * 2 * h]);
    }
    let mut want = vec![0f32; rows * h];
    cpu::silu_mul(&g, &u, &mut want);
    let gud = upload(dev, &check::to_bf16_bits(&gu))?;
    let mut out = upload(dev, &vec![check::POISON_BF16_BITS; rows * h])?;
    ew.swiglu_variant(&gud.as_view(), &mut out.as_view_mut(), rows, h, vec)?;
    let got = check::from_bf16_bits(&download(dev, &out)?);
    Ok((
        check::rel_l2(&got, &want),
        format!("rows {rows} h {h}, 16-byte path allowed {vec}"),
    ))
}

fn check_embedding(
    dev: &CudaDevice,
    ew: &Elementwise,
    vocab: usize,
    d: usize,
    n: usize,
) -> Result<(f64, String)> {
    let table = check::round_bf16(&check::random_f32(41, vocab * d, -1.0, 1.0));
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7919 + 3) % vocab) as u32).collect();
    let bits = check::to_bf16_bits(&table);
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let shape = [vocab, d];
    let view = crate::weights::TensorView {
        name: "check.embedding",
        dtype: crate::weights::DType::BF16,
        shape: &shape,
        data: &bytes,
    };
    let mut want = vec![0f32; n * d];
    cpu::embedding(&view, &ids, &mut want)?;
    let (td, idd) = (upload(dev, &bits)?, upload(dev, &ids)?);
    let mut out = upload(dev, &vec![f32::from_bits(check::POISON_F32_BITS); n * d])?;
    ew.embedding(
        &td.as_view(),
        &idd.as_view(),
        &mut out.as_view_mut(),
        n,
        d,
        vocab,
    )?;
    let got = download(dev, &out)?;
    let e1 = check::rel_l2(&got, &want);
    // Strided: rows 3..7 of each of 3 canvases of 10 ids.
    let l = IdLayout {
        rows_per_seq: 4,
        seq_stride: 10,
        offset: 3,
    };
    let canvas: Vec<u32> = (0..30).map(|i| ((i * 31 + 5) % vocab) as u32).collect();
    let sel: Vec<u32> = (0..12).map(|r| canvas[l.index(r)]).collect();
    let mut want2 = vec![0f32; 12 * d];
    cpu::embedding(&view, &sel, &mut want2)?;
    let cd = upload(dev, &canvas)?;
    let mut out2 = upload(dev, &vec![f32::from_bits(check::POISON_F32_BITS); 12 * d])?;
    ew.embedding_strided(
        &td.as_view(),
        &cd.as_view(),
        &mut out2.as_view_mut(),
        12,
        d,
        vocab,
        l,
    )?;
    let e2 = check::rel_l2(&download(dev, &out2)?, &want2);
    Ok((
        e1.max(e2),
        format!("{n} ids, vocab {vocab} d {d}; strided 3x4 of 10: {e2:.1e}"),
    ))
}

fn check_convert(dev: &CudaDevice, ew: &Elementwise, n: usize) -> Result<(f64, String)> {
    let x = check::random_f32(51, n, -100.0, 100.0);
    let want_bits = check::to_bf16_bits(&x);
    let xd = upload(dev, &x)?;
    let mut bd = upload(dev, &vec![check::POISON_BF16_BITS; n])?;
    ew.f32_to_bf16(&xd.as_view(), &mut bd.as_view_mut(), n)?;
    let got_bits = download(dev, &bd)?;
    let mismatches = got_bits
        .iter()
        .zip(&want_bits)
        .filter(|(a, b)| a != b)
        .count();
    let mut back = upload(dev, &vec![f32::from_bits(check::POISON_F32_BITS); n])?;
    ew.bf16_to_f32(&bd.as_view(), &mut back.as_view_mut(), n)?;
    let back = download(dev, &back)?;
    let e = check::rel_l2(&back, &check::from_bf16_bits(&want_bits));
    let e = if mismatches == 0 { e } else { f64::INFINITY };
    Ok((
        e,
        format!("{n} values, {mismatches} bf16 rounding mismatches"),
    ))
}

fn check_gather_copy(dev: &CudaDevice, ew: &Elementwise) -> Result<(f64, String)> {
    // gather: 5 of 13 rows of width 37
    let (rows, d) = (13usize, 37usize);
    let src = check::random_f32(61, rows * d, -1.0, 1.0);
    let idx: Vec<i32> = vec![12, 0, 5, 5, 7];
    let want: Vec<f32> = idx
        .iter()
        .flat_map(|&i| src[i as usize * d..(i as usize + 1) * d].to_vec())
        .collect();
    let (sd, id) = (upload(dev, &src)?, upload(dev, &idx)?);
    let mut out = upload(
        dev,
        &vec![f32::from_bits(check::POISON_F32_BITS); idx.len() * d],
    )?;
    ew.gather_rows_f32(
        &sd.as_view(),
        &id.as_view(),
        &mut out.as_view_mut(),
        idx.len(),
        d,
    )?;
    let e1 = check::rel_l2(&download(dev, &out)?, &want);
    // copy: 2 sequences of 3 rows, columns [5, 5+7) of stride 19 → cache [2, 10, 9] at col 1, offset 4
    let c = CopyRows {
        rows: 6,
        width: 7,
        src_stride: 19,
        src_col: 5,
        dst_stride: 9,
        dst_col: 1,
        rows_per_seq: 3,
        dst_seq_rows: 10,
        dst_row_offset: 4,
    };
    let s: Vec<u16> = (0..6 * 19).map(|i| i as u16).collect();
    let mut want2 = vec![0xFFFFu16; 2 * 10 * 9];
    for r in 0..c.rows {
        for j in 0..c.width {
            want2[c.dst_row(r) * c.dst_stride + c.dst_col + j] =
                s[r * c.src_stride + c.src_col + j];
        }
    }
    let sd2 = upload(dev, &s)?;
    let mut dd = upload(dev, &vec![0xFFFFu16; 2 * 10 * 9])?;
    ew.copy_rows_bf16(&sd2.as_view(), &mut dd.as_view_mut(), c)?;
    let ok2 = download(dev, &dd)? == want2;
    // bf16 gather: the same 5 rows out of 13 of stride 19, 7 columns (odd: one per thread) and
    // 8 columns of an even stride 20 (pairs).
    let mut ok3 = true;
    for (stride, width) in [(19usize, 7usize), (20, 8)] {
        let s3: Vec<u16> = (0..rows * stride).map(|i| (i * 7 + 3) as u16).collect();
        let want3: Vec<u16> = idx
            .iter()
            .flat_map(|&i| s3[i as usize * stride..i as usize * stride + width].to_vec())
            .collect();
        let sd3 = upload(dev, &s3)?;
        let mut out3 = upload(dev, &vec![0xFFFFu16; idx.len() * width])?;
        ew.gather_rows_bf16(
            &sd3.as_view(),
            rows,
            stride,
            &id.as_view(),
            &mut out3.as_view_mut(),
            width,
        )?;
        ok3 &= download(dev, &out3)? == want3;
    }
    let e = if ok2 && ok3 { e1 } else { f64::INFINITY };
    Ok((
        e,
        format!("gather 5 rows of 37, strided copy exact {ok2}, bf16 gathers exact {ok3}"),
    ))
}

/// Checks every element-wise kernel against the CPU reference on odd and model-sized shapes.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let ew = match Elementwise::new(dev) {
        Ok(e) => e,
        Err(e) => return vec![CheckResult::failed("elementwise.load", e)],
    };
    let mut out = Vec::new();
    // Both paths: d not a multiple of 4 or too wide for the registers → scalar.
    for &(rows, d) in &[
        (1usize, 7usize),
        (37, 389),
        (37, 388),
        (32, 4096),
        (2, 8192),
        (3, 8196),
    ] {
        out.push(CheckResult::from_result(
            format!("elementwise.rmsnorm_bf16 {rows}x{d}"),
            TOL_BF16,
            check_rmsnorm(dev, &ew, rows, d, true),
        ));
        out.push(CheckResult::from_result(
            format!("elementwise.rmsnorm_f32 {rows}x{d}"),
            TOL_F32,
            check_rmsnorm(dev, &ew, rows, d, false),
        ));
    }
    for &(seqs, len, qh, kh, hd, off) in &[
        (1usize, 5usize, 2usize, 2usize, 8usize, 0usize),
        (3, 17, 6, 3, 64, 0),
        (2, 32, 4, 4, 128, 352),
    ] {
        out.push(CheckResult::from_result(
            format!("elementwise.rope hd{hd} q{qh}k{kh} off{off}"),
            TOL_BF16,
            check_rope(dev, &ew, seqs, len, qh, kh, hd, off),
        ));
    }
    for &(rows, h, vec) in &[
        (3usize, 37usize, true),
        (33, 1024, true),
        (33, 1024, false),
        (5, 12288, true),
    ] {
        out.push(CheckResult::from_result(
            format!("elementwise.swiglu {rows}x{h} vec {vec}"),
            TOL_BF16,
            check_swiglu(dev, &ew, rows, h, vec),
        ));
    }
    // The last flag: the grouped layout of the GEMM's RoPE epilogue (the kernel's fallback where
    // the epilogue does not run; head sizes in whole groups of 16).
    for &(seqs, len, qh, kvh, hd, off, cache, vec, bias, grouped) in &[
        (
            1usize, 5usize, 2usize, 2usize, 8usize, 0usize, false, true, false, false,
        ),
        (3, 17, 6, 3, 64, 5, true, true, false, false),
        (3, 17, 6, 3, 64, 5, true, false, false, false),
        (2, 32, 4, 4, 128, 352, true, true, false, false),
        (2, 32, 4, 4, 128, 352, false, true, false, false),
        (1, 7, 3, 1, 10, 2, true, true, false, false),
        (3, 17, 7, 1, 64, 5, true, true, true, false),
        (3, 17, 7, 1, 64, 5, true, false, true, false),
        (2, 9, 28, 4, 128, 11, false, true, true, false),
        (1, 7, 3, 1, 10, 2, true, true, true, false),
        (3, 17, 6, 3, 64, 5, true, true, false, true),
        (3, 17, 6, 3, 64, 5, true, false, true, true),
        (2, 32, 4, 4, 128, 352, true, true, true, true),
        (2, 9, 28, 4, 128, 11, false, false, true, true),
    ] {
        let layout = if grouped { " grouped" } else { "" };
        out.push(CheckResult::from_result(
            format!("elementwise.rope_qkv{layout} hd{hd} q{qh}kv{kvh} off{off} cache {cache} vec {vec} bias {bias}"),
            TOL_BF16,
            check_rope_qkv(dev, &ew, seqs, len, (qh, kvh, hd), off, cache, vec, bias, grouped),
        ));
    }
    out.push(CheckResult::from_result(
        "elementwise.embedding",
        TOL_F32,
        check_embedding(dev, &ew, 301, 67, 29),
    ));
    out.push(CheckResult::from_result(
        "elementwise.convert bf16<->f32",
        TOL_F32,
        check_convert(dev, &ew, 10_007),
    ));
    out.push(CheckResult::from_result(
        "elementwise.gather+copy_rows",
        TOL_F32,
        check_gather_copy(dev, &ew),
    ));
    out
}

/// Times the element-wise kernels at LLaDA-8B batch-8 full-canvas shapes (3072 rows).
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    match bench_inner(dev) {
        Ok(v) => v,
        Err(e) => vec![BenchResult::failed("elementwise", e)],
    }
}

fn bench_inner(dev: &CudaDevice) -> Result<Vec<BenchResult>> {
    let ew = Elementwise::new(dev)?;
    let alloc_f32 = |n: usize| {
        dev.stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| cuda_err("alloc", e))
    };
    let alloc_u16 = |n: usize| {
        dev.stream
            .alloc_zeros::<u16>(n)
            .map_err(|e| cuda_err("alloc", e))
    };
    let (rows, d, h, hd) = (3072usize, 4096usize, 12288usize, 128usize);
    let mut res = Vec::new();
    let x = alloc_f32(rows * d)?;
    let w = alloc_f32(d)?;
    let mut xb = alloc_u16(rows * d)?;
    let ms = check::time_median_ms(dev, 3, 20, |_| {
        ew.rmsnorm_bf16(
            &x.as_view(),
            &w.as_view(),
            &mut xb.as_view_mut(),
            rows,
            d,
            1e-5,
        )
    })?;
    res.push(BenchResult::new(
        "elementwise.rmsnorm_bf16 3072x4096",
        ms,
        Some((rows * d * 6) as f64),
        None,
        "",
    ));
    let mut qkv = alloc_u16(rows * 3 * d)?;
    let inv = upload(dev, &cpu::rope_inv_freq(hd, 500_000.0))?;
    let shape = RopeShape {
        rows,
        row_stride: 3 * d,
        q_heads: 32,
        k_heads: 32,
        k_col: d,
        head_dim: hd,
        pos_period: 384,
        pos_offset: 0,
    };
    let ms = check::time_median_ms(dev, 3, 20, |_| {
        ew.rope(&mut qkv.as_view_mut(), &inv.as_view(), shape)
    })?;
    res.push(BenchResult::new(
        "elementwise.rope 3072 rows q+k 4096",
        ms,
        Some((rows * 2 * d * 4) as f64),
        None,
        "",
    ));
    let mut kc = alloc_u16(rows * d)?;
    let mut vc = alloc_u16(rows * d)?;
    for (r, period, seq_rows) in [(rows, 384usize, 384usize), (32, 32, 384)] {
        let shape = RopeQkvShape {
            rows: r,
            row_stride: 3 * d,
            q_heads: 32,
            kv_heads: 32,
            k_col: d,
            v_col: 2 * d,
            head_dim: hd,
            pos_period: period,
            pos_offset: 384 - period,
            grouped: false,
        };
        let ms = check::time_median_ms(dev, 3, 20, |_| {
            let mut kv = kc.as_view_mut();
            let mut vv = vc.as_view_mut();
            let dst = KvDst {
                k: &mut kv,
                v: &mut vv,
                seq_rows,
            };
            ew.rope_qkv(
                &mut qkv.slice_mut(0..r * 3 * d),
                &inv.as_view(),
                None,
                shape,
                Some(dst).into(),
                None,
            )
        })?;
        // q + k read and written, v read, k + v written to the cache.
        res.push(BenchResult::new(
            format!("elementwise.rope_qkv+cache {r} rows q+k+v 4096"),
            ms,
            Some((r * d * 2 * 7) as f64),
            None,
            "replaces rope + 2 copy_rows",
        ));
    }
    let gu = alloc_u16(rows * 2 * h)?;
    let mut act = alloc_u16(rows * h)?;
    let ms = check::time_median_ms(dev, 3, 20, |_| {
        ew.swiglu(&gu.as_view(), &mut act.as_view_mut(), rows, h)
    })?;
    res.push(BenchResult::new(
        "elementwise.swiglu 3072x12288",
        ms,
        Some((rows * h * 6) as f64),
        None,
        "",
    ));
    let vocab = 126_464usize;
    let table = alloc_u16(vocab * d)?;
    let ids = upload(
        dev,
        &(0..rows as u32)
            .map(|i| i * 41 % vocab as u32)
            .collect::<Vec<_>>(),
    )?;
    let mut emb = alloc_f32(rows * d)?;
    let ms = check::time_median_ms(dev, 3, 20, |_| {
        ew.embedding(
            &table.as_view(),
            &ids.as_view(),
            &mut emb.as_view_mut(),
            rows,
            d,
            vocab,
        )
    })?;
    res.push(BenchResult::new(
        "elementwise.embedding 3072x4096",
        ms,
        Some((rows * d * 6) as f64),
        None,
        "",
    ));
    Ok(res)
}
