//! The skinny product with bf16 activations (opt-in: `DLLM_CPU_BF16=1`, see
//! [`crate::model::transformer`]): `out[m, n] = bf16(x)[m, k] · Wᵀ` for bf16 weights, on CPUs
//! with AVX-512 BF16 (AMD Zen 4 and later, Intel Sapphire Rapids and later). `vdpbf16ps`
//! multiplies 32 bf16 pairs and adds them into 16 f32 lanes in one instruction, twice the
//! multiply-adds of an f32 FMA (measured on one Zen 4 core: 232 against 117 GFLOP/s), and the
//! weights need no widening. The price is the activations' rounding to bf16 (8 significant
//! bits, as on the CUDA backend, whose GEMMs take bf16 activations too); products and sums
//! stay f32.
//!
//! Same tiles, blocking and threads as [`super::skinny`] ([`super::skinny::for_each_tile`]),
//! and the same guarantee: every output element goes through the same operations in the same
//! order (`vdpbf16ps` over `k`'s multiples of 32, one fixed 16-lane reduction tree, the `k % 32`
//! tail in order), so a row has the same bits at any row count and thread count.

#[cfg(target_arch = "x86_64")]
use super::skinny::{check_contract, for_each_tile, MR};
use crate::weights::view::{DType, TensorView};

/// Whether [`linear_skinny_bf16`] can run here (x86-64 with AVX-512F, VL and BF16, detected
/// once).
#[inline]
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| super::skinny::available() && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[m, n] = bf16(x)[m, k] · Wᵀ` (see the module doc), multi-threaded over weight rows; `out`
/// is overwritten. Returns `false`, touching nothing, unless [`available`] and `W` is bf16.
///
/// # Panics
/// Unless the size contract of [`super::linear_skinny`] holds.
pub fn linear_skinny_bf16(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() && w.dtype == DType::BF16 {
        let (n, k) = check_contract(x.len(), m, w, out.len());
        // Rounded to nearest even, rows padded with zeros to a multiple of MR.
        let mut xs = vec![0u16; m.next_multiple_of(MR) * k];
        for (d, v) in xs.iter_mut().zip(x) {
            *d = half::bf16::from_f32(*v).to_bits();
        }
        // SAFETY (of each call): AVX-512F, VL and BF16 are present (checked above); the tile's
        // rows of `xs` and weight rows lie inside their buffers (`for_each_tile`).
        for_each_tile(&xs, m, n, k, w, out, |x, wp, nr, sums| unsafe {
            x86::tile(x, k, wp, nr, sums)
        });
        return true;
    }
    let _ = (x, m, w, out, DType::BF16);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::skinny::x86::lane_sums;
    use super::super::skinny::{MR, NR};
    use std::arch::x86_64::*;

    /// 32 bf16 values at `p` (no alignment needed).
    #[inline(always)]
    unsafe fn load32(p: *const u16) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
    }

    /// One tile: `sums[r][c] = x_r · w_c` for the [`MR`] bf16 rows at `x` (row stride `k`) and
    /// the `nr ≤ 4` bf16 weight rows at `w` (row stride `k`).
    ///
    /// # Safety
    /// AVX-512F, VL and BF16 must be present; `MR · k` values at `x` and `nr · k` at `w`
    /// readable.
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile(
        x: *const u16,
        k: usize,
        w: *const u8,
        nr: usize,
        sums: &mut [[f32; NR]; MR],
    ) {
        let w = w as *const u16;
        match nr {
            1 => tile_t::<1>(x, k, w, sums),
            2 => tile_t::<2>(x, k, w, sums),
            3 => tile_t::<3>(x, k, w, sums),
            _ => tile_t::<4>(x, k, w, sums),
        }
    }

    #[inline(always)]
    unsafe fn tile_t<const C: usize>(
        x: *const u16,
        k: usize,
        w: *const u16,
        sums: &mut [[f32; NR]; MR],
    ) {
        let main = k - k % 32;
        let bf = |v: u16| f32::from_bits((v as u32) << 16);
        // Named accumulators, as in `skinny` (arrays were spilled).
        macro_rules! accumulate {
            ($($r:literal: $a0:ident $a1:ident $a2:ident $a3:ident),*) => {{
                let z = _mm512_setzero_ps();
                let zb = std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512());
                $(let (mut $a0, mut $a1, mut $a2, mut $a3) = (z, z, z, z);)*
                let mut i = 0;
                while i < main {
                    let w0 = load32(w.add(i));
                    let w1 = if C > 1 { load32(w.add(k + i)) } else { zb };
                    let w2 = if C > 2 { load32(w.add(2 * k + i)) } else { zb };
                    let w3 = if C > 3 { load32(w.add(3 * k + i)) } else { zb };
                    $(
                        let xv = load32(x.add($r * k + i));
                        $a0 = _mm512_dpbf16_ps($a0, xv, w0);
                        if C > 1 {
                            $a1 = _mm512_dpbf16_ps($a1, xv, w1);
                        }
                        if C > 2 {
                            $a2 = _mm512_dpbf16_ps($a2, xv, w2);
                        }
                        if C > 3 {
                            $a3 = _mm512_dpbf16_ps($a3, xv, w3);
                        }
                    )*
                    i += 32;
                }
                ([$($a0),*], [$($a1),*], [$($a2),*], [$($a3),*])
            }};
        }
        type Acc = [__m512; MR];
        let (a0, a1, a2, a3): (Acc, Acc, Acc, Acc) = accumulate!(
            0: p0 q0 s0 t0, 1: p1 q1 s1 t1, 2: p2 q2 s2 t2, 3: p3 q3 s3 t3
        );
        let lane_sums = lane_sums::<C>([a0, a1, a2, a3]);
        for (r, row) in sums.iter_mut().enumerate() {
            for (c, out) in row.iter_mut().enumerate().take(C) {
                let mut s = lane_sums[c][r];
                for j in main..k {
                    // The weights may sit at any alignment (an odd offset in the file).
                    s += bf(*x.add(r * k + j)) * bf(w.add(c * k + j).read_unaligned());
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

    /// `bf16(x) · Wᵀ` in f64 over the values the bytes hold.
    fn naive(x: &[f32], m: usize, w: &[f64], n: usize, k: usize) -> Vec<f64> {
        let xb: Vec<f64> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f64())
            .collect();
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| xb[i * k + t] * w[j * k + t]).sum();
            }
        }
        out
    }

    fn run(
        x: &[f32],
        m: usize,
        bytes: &[u8],
        dtype: DType,
        n: usize,
        k: usize,
    ) -> Option<Vec<f32>> {
        let shape = [n, k];
        let w = TensorView {
            name: "w",
            dtype,
            shape: &shape,
            data: bytes,
        };
        let mut out = vec![f32::NAN; m * n];
        linear_skinny_bf16(x, m, &w, &mut out).then_some(out)
    }

    #[test]
    fn products_match_f64_of_the_rounded_activations_for_every_tail_and_tile_remainder() {
        if !available() {
            // The caller must take another path: nothing is touched.
            let (bytes, _) = encode(DType::BF16, &[0.5; 4], 0);
            assert_eq!(run(&[1.0; 4], 1, &bytes, DType::BF16, 1, 4), None);
            return;
        }
        let shapes = [
            (1, 1, 1),
            (3, 31, 2),
            (4, 32, 4),
            (5, 33, 5),
            (8, 100, 7),
            (13, 65, 130),
            (33, 391, 9),
            (64, 64, 3),
        ];
        for (m, k, n) in shapes {
            let seed = (m * 7919 + k * 31 + n) as u64;
            let x = rand_vec(seed, m * k, -1.0, 1.0);
            // An odd byte offset: weights need not be aligned in a checkpoint.
            let (bytes, stored) = encode(DType::BF16, &rand_vec(seed + 1, n * k, -1.0, 1.0), 3);
            let got = run(&x, m, &bytes[3..], DType::BF16, n, k).unwrap();
            let e = rel_l2(&got, &naive(&x, m, &stored, n, k));
            assert!(e <= 1e-6, "m {m} k {k} n {n}: rel L2 {e}");
            // Not the f32 activations' product: the rounding is real (and bounded).
            let exact: Vec<f64> = {
                let shape = [n, k];
                let w = TensorView {
                    name: "w",
                    dtype: DType::BF16,
                    shape: &shape,
                    data: &bytes[3..],
                };
                let mut o = vec![0f32; m * n];
                crate::backend::cpu::linear_row_invariant(&x, m, &w, &mut o);
                o.iter().map(|&v| v as f64).collect()
            };
            let e = rel_l2(&got, &exact);
            assert!(e < 1e-2, "m {m} k {k} n {n}: {e} from the f32 product");
        }
    }

    #[test]
    fn other_weight_dtypes_are_left_to_the_f32_kernels() {
        let (bytes, _) = encode(DType::F16, &[0.5; 64], 0);
        assert_eq!(run(&[1.0; 64], 2, &bytes, DType::F16, 1, 32), None);
        let (bytes, _) = encode(DType::F32, &[0.5; 64], 0);
        assert_eq!(run(&[1.0; 64], 2, &bytes, DType::F32, 1, 32), None);
    }

    #[test]
    fn a_row_has_the_same_bits_at_any_row_count_and_thread_count() {
        if !available() {
            return;
        }
        let (m, k, n) = (37, 300, 41);
        let x = rand_vec(5, m * k, -1.0, 1.0);
        let (bytes, _) = encode(DType::BF16, &rand_vec(6, n * k, -1.0, 1.0), 0);
        let all = run(&x, m, &bytes, DType::BF16, n, k).unwrap();
        for rows in [0..1, 4..9, 10..37, 36..37] {
            let part = run(
                &x[rows.start * k..rows.end * k],
                rows.len(),
                &bytes,
                DType::BF16,
                n,
                k,
            )
            .unwrap();
            assert_eq!(part, all[rows.start * n..rows.end * n], "rows {rows:?}");
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| run(&x, m, &bytes, DType::BF16, n, k).unwrap());
            assert_eq!(got, all, "{threads} threads");
        }
    }
}
