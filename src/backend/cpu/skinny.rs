//! Skinny matrix products on AVX-512: `out[m, n] = x[m, k] · Wᵀ` for a few dozen rows (the
//! layers of a cached span step), reading the checkpoint's weight bytes in place.
//!
//! The GEMM path of [`linear`](super::linear) decodes each weight block to f32, transposed, before
//! the `gemm` crate multiplies it: at a few dozen rows that decode costs about as much as the
//! product. Here every output is one dot product along `k`, computed in tiles of [`MR`] rows of
//! `x` by up to four weight rows (16 sixteen-lane accumulators), the weights widened to f32 in
//! registers as they are loaded (bf16: a shift; f16: `vcvtph2ps`), each block of weight rows read
//! from L2 by every row group of `x` in turn. AVX-512VL is required as well as AVX-512F: without
//! it the 256-bit steps of the final reduction cannot use registers 16–31 and LLVM spilled the
//! accumulators inside the loop.
//!
//! Every output element goes through the same operations in the same order whatever `m`, `n`, the
//! tile it falls in or the thread that computes it: lane-wise FMAs over `k`'s multiples of 16, one
//! fixed reduction tree over the 16 lanes, then the `k % 16` tail in order. A row therefore has
//! the same bits at any row count and thread count (tested below).

use rayon::prelude::*;

use super::gemm::SendPtr;
use crate::weights::view::TensorView;

/// Rows of `x` per tile; `x` is padded with zero rows to a multiple of it.
pub const MR: usize = 4;

/// Largest number of weight rows per tile.
pub(super) const NR: usize = 4;

/// Bytes of weights a task multiplies with every row group of `x` before moving on: a block
/// this size stays in L2 while the row groups pass over it.
const WEIGHT_BLOCK_BYTES: usize = 256 << 10;

/// Whether [`linear_skinny`] can run here (x86-64 with AVX-512F and AVX-512VL, detected once).
#[inline]
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[m, n] = x[m, k] · Wᵀ` (see the module doc), multi-threaded over weight rows; `out` is
/// overwritten. Returns `false`, touching nothing, where [`available`] is false.
///
/// # Panics
/// Unless `W` is 2-D `[n, k]` with `n · k` elements of its dtype, `x.len() == m · k` and
/// `out.len() == m · n` (the kernel reads and writes through raw pointers, so the contract is
/// checked in every build).
pub fn linear_skinny(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() {
        run(x, m, w, out);
        return true;
    }
    let _ = (x, m, w, out);
    false
}

/// [`linear_skinny`] on a CPU that has the kernel.
#[cfg(target_arch = "x86_64")]
fn run(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) {
    let (n, k) = check_contract(x.len(), m, w, out.len());
    let padded;
    let xs = if m.is_multiple_of(MR) {
        x
    } else {
        padded = [x, &vec![0.0; (MR - m % MR) * k]].concat();
        &padded[..]
    };
    // SAFETY (of each call): AVX-512F and VL are present (the caller checked); the tile's
    // rows of `xs` and weight rows lie inside their buffers (`for_each_tile`).
    for_each_tile(xs, m, n, k, w, out, |x, wp, nr, sums| unsafe {
        x86::tile(w.dtype, x, k, wp, nr, sums)
    });
}

/// The size contract of a skinny product, asserted in every build (the kernels read and write
/// through raw pointers): `W` is 2-D `[n, k]` with `n · k` elements of its dtype, `x` holds
/// `m · k` values and `out` `m · n`. Returns `(n, k)`.
#[cfg(target_arch = "x86_64")]
pub(super) fn check_contract(
    x_len: usize,
    m: usize,
    w: &TensorView,
    out_len: usize,
) -> (usize, usize) {
    assert_eq!(w.shape.len(), 2, "skinny product: `{}` is not 2-D", w.name);
    let (n, k) = (w.shape[0], w.shape[1]);
    assert_eq!(
        w.data.len(),
        n * k * w.dtype.size(),
        "skinny product: `{}` bytes",
        w.name
    );
    assert_eq!(x_len, m * k, "skinny product: x length for `{}`", w.name);
    assert_eq!(
        out_len,
        m * n,
        "skinny product: out length for `{}`",
        w.name
    );
    (n, k)
}

/// The multi-threaded tile loop of the skinny kernels: tasks own ranges of weight rows, each
/// walks them in L2-sized blocks, and every row group of `xs` ([`MR`] rows, `xs` zero-padded to
/// a multiple of them, row stride `k`) meets every block of [`NR`] weight rows through `tile(x
/// rows, weight rows, nr, sums)`; the sums of the real rows are stored into `out[m, n]`. The
/// contract ([`check_contract`]) must hold.
#[cfg(target_arch = "x86_64")]
pub(super) fn for_each_tile<T: Sync>(
    xs: &[T],
    m: usize,
    n: usize,
    k: usize,
    w: &TensorView,
    out: &mut [f32],
    tile: impl Fn(*const T, *const u8, usize, &mut [[f32; NR]; MR]) + Sync,
) {
    assert!(
        xs.len() >= m.next_multiple_of(MR) * k,
        "skinny product: x not padded"
    );
    if m == 0 || n == 0 {
        return;
    }
    let es = w.dtype.size();
    let threads = rayon::current_num_threads().max(1);
    let per_task = n.div_ceil(threads * 4).next_multiple_of(NR).max(NR);
    let block_rows = (WEIGHT_BLOCK_BYTES / (k * es).max(1))
        .next_multiple_of(NR)
        .max(NR);
    let dst = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let (j0, j1) = (t * per_task, ((t + 1) * per_task).min(n));
        for b0 in (j0..j1).step_by(block_rows) {
            let b1 = (b0 + block_rows).min(j1);
            for r0 in (0..m).step_by(MR) {
                for j in (b0..b1).step_by(NR) {
                    let nr = NR.min(b1 - j);
                    let mut sums = [[0f32; NR]; MR];
                    // Rows r0..r0 + MR of `xs` exist (padded, asserted above), weight rows
                    // j..j + nr lie inside `w.data` (its length was asserted).
                    tile(
                        xs[r0 * k..].as_ptr(),
                        w.data[j * k * es..].as_ptr(),
                        nr,
                        &mut sums,
                    );
                    for (r, row) in sums.iter().enumerate().take(m - r0) {
                        for (c, v) in row.iter().enumerate().take(nr) {
                            // SAFETY: r0 + r < m and j + c < n, inside `out` (its length was
                            // asserted); tasks own disjoint weight-row (column) ranges j0..j1.
                            unsafe { *dst.at((r0 + r) * n + j + c) = *v };
                        }
                    }
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{MR, NR};
    use crate::weights::view::{convert_to_f32, DType};
    use std::arch::x86_64::*;

    /// Loads 16 weight elements at `p` as f32.
    trait Load16 {
        const DTYPE: DType;
        const SIZE: usize;
        unsafe fn load16(p: *const u8) -> __m512;
    }
    struct Bf16;
    struct F16;
    struct F32;
    impl Load16 for Bf16 {
        const DTYPE: DType = DType::BF16;
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> __m512 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
    impl Load16 for F16 {
        const DTYPE: DType = DType::F16;
        const SIZE: usize = 2;
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    }
    impl Load16 for F32 {
        const DTYPE: DType = DType::F32;
        const SIZE: usize = 4;
        #[inline(always)]
        unsafe fn load16(p: *const u8) -> __m512 {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    /// The lane sums of four accumulators as `[Σa, Σb, Σc, Σd]`. Each goes through the same
    /// tree in any position: lanes `i` and `i + 8`, then neighbours, then pairs, then halves.
    /// (Shared with `skinny_bf16`.)
    #[inline(always)]
    pub(in crate::backend::cpu) unsafe fn hsum4(
        a: __m512,
        b: __m512,
        c: __m512,
        d: __m512,
    ) -> __m128 {
        #[inline(always)]
        unsafe fn fold(v: __m512) -> __m256 {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            _mm256_add_ps(lo, hi)
        }
        let ab = _mm256_hadd_ps(fold(a), fold(b));
        let cd = _mm256_hadd_ps(fold(c), fold(d));
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    /// The lane sums of the first `C` weight rows' accumulators (`[c][r]`: weight row `c`, row
    /// `r` of `x`), four rows at a time through [`hsum4`] (MR is a multiple of 4). (Shared with
    /// `skinny_bf16`.)
    #[inline(always)]
    pub(in crate::backend::cpu) unsafe fn lane_sums<const C: usize>(
        accs: [[__m512; MR]; NR],
    ) -> [[f32; MR]; NR] {
        let mut out = [[0f32; MR]; NR];
        for (c, acc) in accs.iter().enumerate().take(C) {
            for g in (0..MR).step_by(4) {
                let s = hsum4(acc[g], acc[g + 1], acc[g + 2], acc[g + 3]);
                _mm_storeu_ps(out[c].as_mut_ptr().add(g), s);
            }
        }
        out
    }

    /// One tile: `sums[r][c] = x_r · w_c` for the [`MR`] rows of `x` at `x` (row stride `k`)
    /// and the `nr ≤ 4` weight rows of `dtype` at `w` (row stride `k` elements).
    ///
    /// # Safety
    /// AVX-512F and VL must be present; `MR · k` floats at `x` and `nr · k` elements at `w` readable.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) unsafe fn tile(
        dtype: DType,
        x: *const f32,
        k: usize,
        w: *const u8,
        nr: usize,
        sums: &mut [[f32; NR]; MR],
    ) {
        match (dtype, nr) {
            (DType::BF16, 1) => tile_t::<Bf16, 1>(x, k, w, sums),
            (DType::BF16, 2) => tile_t::<Bf16, 2>(x, k, w, sums),
            (DType::BF16, 3) => tile_t::<Bf16, 3>(x, k, w, sums),
            (DType::BF16, _) => tile_t::<Bf16, 4>(x, k, w, sums),
            (DType::F16, 1) => tile_t::<F16, 1>(x, k, w, sums),
            (DType::F16, 2) => tile_t::<F16, 2>(x, k, w, sums),
            (DType::F16, 3) => tile_t::<F16, 3>(x, k, w, sums),
            (DType::F16, _) => tile_t::<F16, 4>(x, k, w, sums),
            (DType::F32, 1) => tile_t::<F32, 1>(x, k, w, sums),
            (DType::F32, 2) => tile_t::<F32, 2>(x, k, w, sums),
            (DType::F32, 3) => tile_t::<F32, 3>(x, k, w, sums),
            (DType::F32, _) => tile_t::<F32, 4>(x, k, w, sums),
        }
    }

    #[inline(always)]
    unsafe fn tile_t<L: Load16, const C: usize>(
        x: *const f32,
        k: usize,
        w: *const u8,
        sums: &mut [[f32; NR]; MR],
    ) {
        let main = k - k % 16;
        // Named accumulators (one per row and weight row) rather than arrays: with arrays LLVM
        // spilled most of them to the stack on every iteration.
        macro_rules! accumulate {
            ($($r:literal: $a0:ident $a1:ident $a2:ident $a3:ident),*) => {{
                let z = _mm512_setzero_ps();
                $(let (mut $a0, mut $a1, mut $a2, mut $a3) = (z, z, z, z);)*
                let mut i = 0;
                while i < main {
                    let w0 = L::load16(w.add(i * L::SIZE));
                    let w1 = if C > 1 { L::load16(w.add((k + i) * L::SIZE)) } else { z };
                    let w2 = if C > 2 { L::load16(w.add((2 * k + i) * L::SIZE)) } else { z };
                    let w3 = if C > 3 { L::load16(w.add((3 * k + i) * L::SIZE)) } else { z };
                    $(
                        let xv = _mm512_loadu_ps(x.add($r * k + i));
                        $a0 = _mm512_fmadd_ps(xv, w0, $a0);
                        if C > 1 {
                            $a1 = _mm512_fmadd_ps(xv, w1, $a1);
                        }
                        if C > 2 {
                            $a2 = _mm512_fmadd_ps(xv, w2, $a2);
                        }
                        if C > 3 {
                            $a3 = _mm512_fmadd_ps(xv, w3, $a3);
                        }
                    )*
                    i += 16;
                }
                ([$($a0),*], [$($a1),*], [$($a2),*], [$($a3),*])
            }};
        }
        type Acc = [__m512; MR];
        let (a0, a1, a2, a3): (Acc, Acc, Acc, Acc) = accumulate!(
            0: p0 q0 s0 t0, 1: p1 q1 s1 t1, 2: p2 q2 s2 t2, 3: p3 q3 s3 t3
        );
        let lane_sums = lane_sums::<C>([a0, a1, a2, a3]);
        let rem = k - main;
        let mut tail = [[0f32; 16]; NR];
        for (c, t) in tail
            .iter_mut()
            .enumerate()
            .take(if rem > 0 { C } else { 0 })
        {
            let bytes = std::slice::from_raw_parts(w.add((c * k + main) * L::SIZE), rem * L::SIZE);
            convert_to_f32(L::DTYPE, bytes, &mut t[..rem]);
        }
        for (r, row) in sums.iter_mut().enumerate() {
            for (c, out) in row.iter_mut().enumerate().take(C) {
                let mut s = lane_sums[c][r];
                for (j, wv) in tail[c][..rem].iter().enumerate() {
                    s += *x.add(r * k + main + j) * wv;
                }
                *out = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{encode, rand_vec, rel_l2};
    use crate::weights::view::DType;

    /// `x · Wᵀ` in f64 over the values the weight bytes hold.
    fn naive(x: &[f32], m: usize, w: &[f64], n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t]).sum();
            }
        }
        out
    }

    /// Runs the kernel on `x` (m rows) against `bytes` (`[n, k]` of `dtype`).
    fn run(x: &[f32], m: usize, bytes: &[u8], dtype: DType, n: usize, k: usize) -> Vec<f32> {
        let shape = [n, k];
        let w = TensorView {
            name: "w",
            dtype,
            shape: &shape,
            data: bytes,
        };
        let mut out = vec![f32::NAN; m * n];
        assert!(linear_skinny(x, m, &w, &mut out));
        out
    }

    #[test]
    fn products_match_f64_for_every_dtype_tail_and_tile_remainder() {
        if !available() {
            // Nothing to run the kernel on; the caller must then take another path.
            let (shape, mut out) = ([1usize, 1], [7f32]);
            let w = TensorView {
                name: "w",
                dtype: DType::F32,
                shape: &shape,
                data: &[0; 4],
            };
            assert!(!linear_skinny(&[1.0], 1, &w, &mut out));
            assert_eq!(out, [7.0]);
            return;
        }
        let shapes = [
            (1, 1, 1),
            (3, 15, 2),
            (4, 16, 4),
            (5, 17, 5),
            (8, 100, 7),
            (13, 33, 130),
            (33, 391, 9),
            (64, 64, 3),
        ];
        for (m, k, n) in shapes {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let seed = (m * 7919 + k * 31 + n) as u64;
                let x = rand_vec(seed, m * k, -1.0, 1.0);
                let (bytes, stored) = encode(dtype, &rand_vec(seed + 1, n * k, -1.0, 1.0), 3);
                let got = run(&x, m, &bytes[3..], dtype, n, k);
                let e = rel_l2(&got, &naive(&x, m, &stored, n, k));
                assert!(e <= 1e-6, "m {m} k {k} n {n} {dtype:?}: rel L2 {e}");
            }
        }
    }

    #[test]
    fn a_broken_size_contract_panics_instead_of_reading_past_a_buffer() {
        if !available() {
            return;
        }
        let (shape, bytes) = ([4usize, 16], vec![0u8; 4 * 16 * 2]);
        let w = TensorView {
            name: "w",
            dtype: DType::BF16,
            shape: &shape,
            data: &bytes,
        };
        let calls: [(usize, usize, usize); 3] = [(8, 8 * 15, 32), (8, 8 * 16, 31), (8, 8 * 16, 32)];
        for (i, (m, xlen, outlen)) in calls.into_iter().enumerate() {
            let (x, mut out) = (vec![0f32; xlen], vec![0f32; outlen]);
            let short_weight = TensorView {
                data: &bytes[..bytes.len() - 2],
                ..w
            };
            let view = if i == 2 { short_weight } else { w };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                linear_skinny(&x, m, &view, &mut out)
            }));
            assert!(r.is_err(), "call {i} did not panic");
        }
    }

    #[test]
    fn a_row_has_the_same_bits_at_any_row_count_and_thread_count() {
        if !available() {
            return;
        }
        let (m, k, n) = (37, 300, 41);
        let x = rand_vec(5, m * k, -1.0, 1.0);
        let (bytes, _) = encode(DType::BF16, &rand_vec(6, n * k, -1.0, 1.0), 1);
        let all = run(&x, m, &bytes[1..], DType::BF16, n, k);
        for rows in [0..1, 4..9, 10..37, 36..37] {
            let part = run(
                &x[rows.start * k..rows.end * k],
                rows.len(),
                &bytes[1..],
                DType::BF16,
                n,
                k,
            );
            assert_eq!(part, all[rows.start * n..rows.end * n], "rows {rows:?}");
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| run(&x, m, &bytes[1..], DType::BF16, n, k));
            assert_eq!(got, all, "{threads} threads");
        }
    }
}
