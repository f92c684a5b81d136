//! Runtime-dispatched x86 SIMD helpers shared by the CPU ops: weight-row decoding and dot products.
//!
//! Each helper has a portable scalar version and, on x86-64 with AVX2 + FMA + F16C detected at run
//! time, an intrinsics version. Weight bytes may sit at any alignment, so every load is unaligned.

use crate::weights::view::{convert_to_f32, DType};

/// Whether the AVX2 + FMA + F16C paths may be used on this CPU (detected once).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Decodes `out.len()` little-endian elements of `dtype` from `bytes` into f32.
pub(crate) fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2/FMA/F16C (checked above); lengths agree (contract).
        unsafe { x86::decode(dtype, bytes, out) };
        return;
    }
    convert_to_f32(dtype, bytes, out);
}

/// Decodes a block of `rows` weight rows of `k` elements each into `out` transposed:
/// `out[kk * rows + j] = W[j][kk]` (row-major `[k, rows]`). Row `j` starts at byte
/// `j * stride * dtype.size()` of `bytes` (`stride ≥ k` elements, so a column slice of a wider
/// matrix can be decoded).
pub(crate) fn decode_transposed(
    dtype: DType,
    bytes: &[u8],
    rows: usize,
    k: usize,
    stride: usize,
    out: &mut [f32],
) {
    debug_assert!(stride >= k);
    debug_assert!(rows == 0 || bytes.len() >= ((rows - 1) * stride + k) * dtype.size());
    debug_assert_eq!(out.len(), rows * k);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2/FMA/F16C; lengths agree (contract).
        unsafe { x86::decode_transposed(dtype, bytes, rows, k, stride, out) };
        return;
    }
    decode_transposed_scalar(dtype, bytes, rows, k, stride, out);
}

/// The portable version of [`decode_transposed`].
fn decode_transposed_scalar(
    dtype: DType,
    bytes: &[u8],
    rows: usize,
    k: usize,
    stride: usize,
    out: &mut [f32],
) {
    let es = dtype.size();
    let mut row = vec![0f32; k];
    for j in 0..rows {
        convert_to_f32(
            dtype,
            &bytes[j * stride * es..(j * stride + k) * es],
            &mut row,
        );
        for (kk, v) in row.iter().enumerate() {
            out[kk * rows + j] = *v;
        }
    }
}

/// For each of the `m` rows `x_r` of `x` (`m × k`, row-major), `out[r] = x_r · w`,
/// where `w` is one weight row of `k` elements of `dtype` (`bytes`, any alignment). `m ≤ 4`.
pub(crate) fn dot_rows(
    dtype: DType,
    bytes: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32; 4],
) {
    debug_assert!((1..=4).contains(&m));
    debug_assert_eq!(bytes.len(), k * dtype.size());
    debug_assert!(x.len() >= m * k);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2/FMA/F16C; lengths agree (checked in debug builds).
        unsafe { x86::dot_rows(dtype, bytes, x, m, k, out) };
        return;
    }
    dot_rows_scalar(dtype, bytes, x, m, k, out);
}

/// The portable version of [`dot_rows`].
fn dot_rows_scalar(dtype: DType, bytes: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32; 4]) {
    let mut wrow = vec![0f32; k];
    convert_to_f32(dtype, bytes, &mut wrow);
    for (r, o) in out.iter_mut().enumerate().take(m) {
        *o = dot_scalar(&x[r * k..(r + 1) * k], &wrow);
    }
}

/// A portable dot product with 8 independent accumulators (vectorisable).
pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::DType;
    use std::arch::x86_64::*;

    /// Loads 8 weight elements starting at `p` as f32.
    trait Load8 {
        const DTYPE: DType;
        const SIZE: usize;
        unsafe fn load8(p: *const u8) -> __m256;
        /// Loads one element at `p` as f32.
        #[inline(always)]
        unsafe fn load1(p: *const u8) -> f32 {
            let mut v = [0f32];
            super::convert_to_f32(
                Self::DTYPE,
                std::slice::from_raw_parts(p, Self::SIZE),
                &mut v,
            );
            v[0]
        }
    }
    struct Bf16;
    struct F16;
    struct F32;
    impl Load8 for Bf16 {
        const DTYPE: DType = DType::BF16;
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
    impl Load8 for F16 {
        const DTYPE: DType = DType::F16;
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }
    impl Load8 for F32 {
        const DTYPE: DType = DType::F32;
        const SIZE: usize = 4;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
        match dtype {
            DType::BF16 => decode_t::<Bf16>(bytes, out),
            DType::F16 => decode_t::<F16>(bytes, out),
            DType::F32 => decode_t::<F32>(bytes, out),
        }
    }

    #[inline(always)]
    unsafe fn decode_t<L: Load8>(bytes: &[u8], out: &mut [f32]) {
        let n = out.len();
        let main = n - n % 8;
        let src = bytes.as_ptr();
        let dst = out.as_mut_ptr();
        let mut i = 0;
        while i < main {
            _mm256_storeu_ps(dst.add(i), L::load8(src.add(i * L::SIZE)));
            i += 8;
        }
        if main < n {
            super::convert_to_f32(L::DTYPE, &bytes[main * L::SIZE..], &mut out[main..]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode_transposed(
        dtype: DType,
        bytes: &[u8],
        rows: usize,
        k: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        match dtype {
            DType::BF16 => decode_transposed_t::<Bf16>(bytes, rows, k, stride, out),
            DType::F16 => decode_transposed_t::<F16>(bytes, rows, k, stride, out),
            DType::F32 => decode_transposed_t::<F32>(bytes, rows, k, stride, out),
        }
    }

    /// In-register transpose of an 8 × 8 block held as 8 row vectors.
    #[inline(always)]
    unsafe fn transpose8(r: &mut [__m256; 8]) {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        r[0] = _mm256_permute2f128_ps::<0x20>(u0, u4);
        r[1] = _mm256_permute2f128_ps::<0x20>(u1, u5);
        r[2] = _mm256_permute2f128_ps::<0x20>(u2, u6);
        r[3] = _mm256_permute2f128_ps::<0x20>(u3, u7);
        r[4] = _mm256_permute2f128_ps::<0x31>(u0, u4);
        r[5] = _mm256_permute2f128_ps::<0x31>(u1, u5);
        r[6] = _mm256_permute2f128_ps::<0x31>(u2, u6);
        r[7] = _mm256_permute2f128_ps::<0x31>(u3, u7);
    }

    #[inline(always)]
    unsafe fn decode_transposed_t<L: Load8>(
        bytes: &[u8],
        rows: usize,
        k: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let src = bytes.as_ptr();
        let dst = out.as_mut_ptr();
        let (rows8, k8) = (rows - rows % 8, k - k % 8);
        let mut j0 = 0;
        while j0 < rows8 {
            let mut k0 = 0;
            while k0 < k8 {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, v) in r.iter_mut().enumerate() {
                    *v = L::load8(src.add(((j0 + i) * stride + k0) * L::SIZE));
                }
                transpose8(&mut r);
                for (c, v) in r.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((k0 + c) * rows + j0), *v);
                }
                k0 += 8;
            }
            for kk in k8..k {
                for i in 0..8 {
                    *dst.add(kk * rows + j0 + i) =
                        L::load1(src.add(((j0 + i) * stride + kk) * L::SIZE));
                }
            }
            j0 += 8;
        }
        for j in rows8..rows {
            for kk in 0..k {
                *dst.add(kk * rows + j) = L::load1(src.add((j * stride + kk) * L::SIZE));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(
        dtype: DType,
        bytes: &[u8],
        x: &[f32],
        m: usize,
        k: usize,
        out: &mut [f32; 4],
    ) {
        match (dtype, m) {
            (DType::BF16, 1) => dot_t::<Bf16, 1>(bytes, x, k, out),
            (DType::BF16, 2) => dot_t::<Bf16, 2>(bytes, x, k, out),
            (DType::BF16, 3) => dot_t::<Bf16, 3>(bytes, x, k, out),
            (DType::BF16, _) => dot_t::<Bf16, 4>(bytes, x, k, out),
            (DType::F16, 1) => dot_t::<F16, 1>(bytes, x, k, out),
            (DType::F16, 2) => dot_t::<F16, 2>(bytes, x, k, out),
            (DType::F16, 3) => dot_t::<F16, 3>(bytes, x, k, out),
            (DType::F16, _) => dot_t::<F16, 4>(bytes, x, k, out),
            (DType::F32, 1) => dot_t::<F32, 1>(bytes, x, k, out),
            (DType::F32, 2) => dot_t::<F32, 2>(bytes, x, k, out),
            (DType::F32, 3) => dot_t::<F32, 3>(bytes, x, k, out),
            (DType::F32, _) => dot_t::<F32, 4>(bytes, x, k, out),
        }
    }

    #[inline(always)]
    unsafe fn dot_t<L: Load8, const M: usize>(
        bytes: &[u8],
        x: &[f32],
        k: usize,
        out: &mut [f32; 4],
    ) {
        let w = bytes.as_ptr();
        let xp = x.as_ptr();
        let mut acc0 = [_mm256_setzero_ps(); M];
        let mut acc1 = [_mm256_setzero_ps(); M];
        let main = k - k % 16;
        let mut i = 0;
        while i < main {
            let w0 = L::load8(w.add(i * L::SIZE));
            let w1 = L::load8(w.add((i + 8) * L::SIZE));
            for r in 0..M {
                let xr = xp.add(r * k + i);
                acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, acc1[r]);
            }
            i += 16;
        }
        let mut tail = [0f32; 16];
        let rem = k - main;
        if rem > 0 {
            super::convert_to_f32(L::DTYPE, &bytes[main * L::SIZE..], &mut tail[..rem]);
        }
        for r in 0..M {
            let mut s = hsum(_mm256_add_ps(acc0[r], acc1[r]));
            for j in 0..rem {
                s += x[r * k + main + j] * tail[j];
            }
            out[r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{encode, rand_vec};

    #[test]
    fn dispatched_paths_match_the_portable_ones() {
        for k in [1usize, 7, 16, 33, 130, 257] {
            let x = rand_vec(k as u64, 4 * k, -1.0, 1.0);
            let wv = rand_vec(k as u64 + 100, k, -1.0, 1.0);
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let (bytes, stored) = encode(dtype, &wv, 1);
                let w = &bytes[1..];
                let mut dec = vec![0f32; k];
                decode(dtype, w, &mut dec);
                let want: Vec<f32> = stored.iter().map(|v| *v as f32).collect();
                assert_eq!(dec, want, "decode {dtype:?} k {k}");
                for rows in [1usize, 3, 8, 13, 16] {
                    let wv = rand_vec(k as u64 + rows as u64, rows * k, -1.0, 1.0);
                    let (bytes, stored) = encode(dtype, &wv, 3);
                    let mut t = vec![f32::NAN; rows * k];
                    let mut ts = vec![f32::NAN; rows * k];
                    decode_transposed(dtype, &bytes[3..], rows, k, k, &mut t);
                    decode_transposed_scalar(dtype, &bytes[3..], rows, k, k, &mut ts);
                    for j in 0..rows {
                        for kk in 0..k {
                            assert_eq!(
                                t[kk * rows + j] as f64,
                                stored[j * k + kk],
                                "{dtype:?} {rows}x{k}"
                            );
                        }
                    }
                    assert_eq!(t, ts);
                    // A column slice [2, 2 + kc) of the same rows (row stride k).
                    if k > 2 {
                        let kc = (k - 2).min(11);
                        let es = dtype.size();
                        let sub = &bytes[3 + 2 * es..];
                        let sub = &sub[..((rows - 1) * k + kc) * es];
                        let mut u = vec![f32::NAN; rows * kc];
                        let mut us = vec![f32::NAN; rows * kc];
                        decode_transposed(dtype, sub, rows, kc, k, &mut u);
                        decode_transposed_scalar(dtype, sub, rows, kc, k, &mut us);
                        for j in 0..rows {
                            for kk in 0..kc {
                                assert_eq!(u[kk * rows + j] as f64, stored[j * k + 2 + kk]);
                            }
                        }
                        assert_eq!(u, us);
                    }
                }
                for m in 1..=4 {
                    let (mut a, mut b) = ([0f32; 4], [0f32; 4]);
                    dot_rows(dtype, w, &x, m, k, &mut a);
                    dot_rows_scalar(dtype, w, &x, m, k, &mut b);
                    for r in 0..m {
                        let exact: f64 = (0..k).map(|i| x[r * k + i] as f64 * stored[i]).sum();
                        let scale: f64 = (0..k)
                            .map(|i| (x[r * k + i] as f64 * stored[i]).abs())
                            .sum();
                        assert!(
                            (a[r] as f64 - exact).abs() <= 1e-6 * scale,
                            "{dtype:?} k {k} m {m}"
                        );
                        assert!(
                            (b[r] as f64 - exact).abs() <= 1e-6 * scale,
                            "{dtype:?} k {k} m {m}"
                        );
                    }
                }
            }
        }
    }
}
