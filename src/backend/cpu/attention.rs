//! Bidirectional scaled-dot-product attention with grouped-query heads and an optional key mask.
//!
//! Work is split into (head, block of query rows) tasks on the rayon pool. Each task computes
//! `S = Q_blk · K_hᵀ · scale` into a thread-local `rows × skv` buffer with the `gemm` crate, applies
//! the key mask and a max-subtracted row softmax, then writes `S · V_h` straight into its slice of
//! `out`. Memory: O(block · skv) per thread plus one transposed copy of K (the size of K).

use std::cell::RefCell;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::activation::exp_approx;
use super::gemm::SendPtr;
use super::simd::{decode_transposed, has_avx2};
use crate::weights::view::DType;

/// Query rows per task.
const Q_BLOCK: usize = 64;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Non-causal SDPA. `q` is `[sq, n_heads·hd]`, `k`/`v` are `[skv, n_kv_heads·hd]`, `out` is
/// `[sq, n_heads·hd]` (overwritten). Query head `h` reads KV head `h / (n_heads / n_kv_heads)`;
/// scores are scaled by `1/sqrt(hd)`. Keys with `key_valid[j] == false` get zero weight; a query
/// row whose keys are all masked yields zeros (PyTorch would give NaN).
///
/// Contract (debug-checked): `n_kv_heads` divides `n_heads`, slice lengths as above,
/// `key_valid.len() == skv`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sq: usize,
    skv: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    key_valid: Option<&[bool]>,
    out: &mut [f32],
) {
    debug_assert!(n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads));
    debug_assert_eq!(q.len(), sq * n_heads * head_dim);
    debug_assert_eq!(k.len(), skv * n_kv_heads * head_dim);
    debug_assert_eq!(v.len(), skv * n_kv_heads * head_dim);
    debug_assert_eq!(out.len(), sq * n_heads * head_dim);
    debug_assert!(key_valid.is_none_or(|m| m.len() == skv));
    if sq == 0 || n_heads == 0 || head_dim == 0 {
        return;
    }
    if skv == 0 {
        out.fill(0.0);
        return;
    }
    let group = n_heads / n_kv_heads;
    let qs = n_heads * head_dim; // q / out row stride
    let kvs = n_kv_heads * head_dim; // k / v row stride
    let scale = 1.0 / (head_dim as f32).sqrt();
    let blocks = sq.div_ceil(Q_BLOCK);
    // Kᵀ per KV head, [n_kv_heads][hd][skv]: the gemm kernels are much faster with a row-major
    // right-hand side than with K's strided rows. O(skv · n_kv_heads · hd), like K itself.
    let mut kt_all = vec![0f32; skv * kvs];
    kt_all
        .par_chunks_mut(head_dim * skv)
        .enumerate()
        .for_each(|(kvh, kt)| {
            // Row j of this head's keys starts at element j · kvs of k's bytes from kvh · hd.
            let bytes: &[u8] = bytemuck::cast_slice(&k[kvh * head_dim..]);
            let used = ((skv - 1) * kvs + head_dim) * 4;
            decode_transposed(DType::F32, &bytes[..used], skv, head_dim, kvs, kt);
        });
    let dst = SendPtr(out.as_mut_ptr());
    (0..n_heads * blocks).into_par_iter().for_each(|t| {
        let (h, b) = (t / blocks, t % blocks);
        let kvh = h / group;
        let r0 = b * Q_BLOCK;
        let rows = Q_BLOCK.min(sq - r0);
        SCORES.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < rows * skv {
                buf.resize(rows * skv, 0.0);
            }
            let s = &mut buf[..rows * skv];
            let kt = &kt_all[kvh * head_dim * skv..(kvh + 1) * head_dim * skv];
            // SAFETY: s is rows × skv (row stride skv). lhs = q rows r0.., columns h·hd.. with row
            // stride qs; rhs = kt, hd × skv with row stride skv — all in bounds by the contract.
            unsafe {
                gemm(
                    rows,
                    skv,
                    head_dim,
                    s.as_mut_ptr(),
                    1,
                    skv as isize,
                    false,
                    q.as_ptr().add(r0 * qs + h * head_dim),
                    1,
                    qs as isize,
                    kt.as_ptr(),
                    1,
                    skv as isize,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            };
            for row in s.chunks_exact_mut(skv) {
                if let Some(mask) = key_valid {
                    for (x, &ok) in row.iter_mut().zip(mask) {
                        if !ok {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                softmax_row(row);
            }
            // SAFETY: dst is `out`; this task writes rows r0..r0+rows, columns h·hd..(h+1)·hd
            // (row stride qs), disjoint from every other task. rhs(j, d) = v[j·kvs + kvh·hd + d].
            unsafe {
                gemm(
                    rows,
                    head_dim,
                    skv,
                    dst.at(r0 * qs + h * head_dim),
                    1,
                    qs as isize,
                    false,
                    s.as_ptr(),
                    1,
                    skv as isize,
                    v.as_ptr().add(kvh * head_dim),
                    1,
                    kvs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            };
        });
    });
}

/// In-place softmax of one row (max-subtracted); an all `-inf` row becomes all zeros.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are available (checked at run time).
        unsafe { exp_normalise_avx2(row, max) };
        return;
    }
    exp_normalise(row, max);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_normalise_avx2(row: &mut [f32], max: f32) {
    exp_normalise(row, max);
}

#[inline(always)]
fn exp_normalise(row: &mut [f32], max: f32) {
    // Separate simple loops so each vectorises (a fused loop with lane accumulators does not).
    for x in row.iter_mut() {
        *x = exp_approx(*x - max);
    }
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for x in chunks.remainder() {
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{rand_vec, rel_l2};

    /// Naive per-element SDPA in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sq: usize,
        skv: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
        valid: Option<&[bool]>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; sq * nh * hd];
        let scale = 1.0 / (hd as f64).sqrt();
        for h in 0..nh {
            let kh = h / (nh / nkv);
            for i in 0..sq {
                let mut scores = Vec::new();
                for j in 0..skv {
                    if valid.is_some_and(|m| !m[j]) {
                        continue;
                    }
                    let mut s = 0f64;
                    for d in 0..hd {
                        s += q[i * nh * hd + h * hd + d] as f64
                            * k[j * nkv * hd + kh * hd + d] as f64;
                    }
                    scores.push((j, s * scale));
                }
                let mx = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s.1 - mx).exp()).sum();
                for &(j, s) in &scores {
                    let p = (s - mx).exp() / z;
                    for d in 0..hd {
                        out[i * nh * hd + h * hd + d] += p * v[j * nkv * hd + kh * hd + d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive() {
        // (sq, skv, n_heads, n_kv_heads, head_dim, masked)
        let cases = [
            (1usize, 1usize, 1usize, 1usize, 64usize, false),
            (7, 7, 2, 2, 64, false),
            (33, 33, 4, 2, 128, false),
            (65, 130, 6, 6, 64, true),
            (130, 65, 8, 2, 128, true),
            (5, 257, 3, 1, 64, true),
        ];
        for &(sq, skv, nh, nkv, hd, masked) in &cases {
            let seed = (sq * 1000 + skv * 10 + nh) as u64;
            // Spread scores so the softmax is far from uniform.
            let q = rand_vec(seed, sq * nh * hd, -1.0, 1.0);
            let k = rand_vec(seed + 1, skv * nkv * hd, -1.0, 1.0);
            let v = rand_vec(seed + 2, skv * nkv * hd, -1.0, 1.0);
            let q: Vec<f32> = q.iter().map(|x| x * 3.0).collect();
            let mask: Vec<bool> = (0..skv).map(|j| j % 3 != 1 || j == 0).collect();
            let valid = masked.then_some(mask.as_slice());
            let mut out = vec![f32::NAN; sq * nh * hd];
            attention(&q, &k, &v, sq, skv, nh, nkv, hd, valid, &mut out);
            let want = naive(&q, &k, &v, sq, skv, nh, nkv, hd, valid);
            let e = rel_l2(&out, &want);
            assert!(
                e <= 1e-5,
                "sq {sq} skv {skv} nh {nh} nkv {nkv} hd {hd} masked {masked}: rel L2 {e}"
            );
        }
    }

    #[test]
    fn masked_keys_have_no_influence_and_all_masked_rows_are_zero() {
        let (sq, skv, nh, hd) = (3, 4, 2, 64);
        let q = rand_vec(1, sq * nh * hd, -1.0, 1.0);
        let k = rand_vec(2, skv * nh * hd, -1.0, 1.0);
        let mut v = rand_vec(3, skv * nh * hd, -1.0, 1.0);
        let valid = [true, false, true, false];
        let mut a = vec![0f32; sq * nh * hd];
        attention(&q, &k, &v, sq, skv, nh, nh, hd, Some(&valid), &mut a);
        // Changing masked keys' values must not change the output.
        for j in [1, 3] {
            for x in &mut v[j * nh * hd..(j + 1) * nh * hd] {
                *x = 1e6;
            }
        }
        let mut b = vec![0f32; sq * nh * hd];
        attention(&q, &k, &v, sq, skv, nh, nh, hd, Some(&valid), &mut b);
        assert_eq!(a, b);
        attention(&q, &k, &v, sq, skv, nh, nh, hd, Some(&[false; 4]), &mut b);
        assert!(b.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn single_key_returns_its_value() {
        // One key: softmax weight 1, so every query row gets v exactly.
        let (sq, nh, hd) = (5, 2, 64);
        let q = rand_vec(4, sq * nh * hd, -1.0, 1.0);
        let k = rand_vec(5, nh * hd, -1.0, 1.0);
        let v = rand_vec(6, nh * hd, -1.0, 1.0);
        let mut out = vec![0f32; sq * nh * hd];
        attention(&q, &k, &v, sq, 1, nh, nh, hd, None, &mut out);
        for row in out.chunks(nh * hd) {
            assert_eq!(row, v.as_slice());
        }
    }
}
