//! Element-wise ops: the SwiGLU combine [`silu_mul`], residual [`add_assign`], and a vectorisable
//! single-precision [`exp_approx`] shared with the attention softmax.

use rayon::prelude::*;

use super::simd::has_avx2;

/// Elements per rayon task for element-wise ops (smaller inputs run on the calling thread).
const CHUNK: usize = 1 << 15;

/// `e^x` in f32 without a libm call, so loops over it vectorise: Cody–Waite range reduction
/// `x = n·ln2 + r` and a degree-6 polynomial for `e^r` (Cephes `expf` coefficients); relative error
/// ≈ 2e-7 over the normal range. Returns 0 for `x < -87.3` (including `-inf`) and saturates at
/// `e^88.3` above; NaN propagates.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const HI: f32 = 88.3;
    const LO: f32 = -87.3;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln 2 split: C1 exact in few bits, C2 the remainder
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer in the low bits
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = e * scale;
    if x < LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// SwiGLU combine: `out[i] = silu(gate[i]) · up[i]` with `silu(x) = x / (1 + e^{-x})`.
///
/// Contract (debug-checked): all three slices have the same length.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert_eq!(gate.len(), up.len());
    debug_assert_eq!(gate.len(), out.len());
    if out.len() <= CHUNK {
        silu_mul_dispatch(gate, up, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| silu_mul_dispatch(g, u, o));
    }
}

fn silu_mul_dispatch(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are available (checked at run time).
        unsafe { silu_mul_avx2(gate, up, out) };
        return;
    }
    silu_mul_body(gate, up, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_body(gate, up, out);
}

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_approx(-g)) * u;
    }
}

/// In-place residual add: `dst[i] += src[i]`. Contract (debug-checked): equal lengths.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    debug_assert_eq!(dst.len(), src.len());
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoise::rng::uniform;

    fn rand_vec(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|i| (lo + (hi - lo) * uniform(seed, 0, 0, i as u64)) as f32)
            .collect()
    }

    fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).powi(2))
            .sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den.max(1e-300)).sqrt()
    }

    #[test]
    fn exp_approx_matches_f64_exp_over_the_range() {
        let mut worst = 0f64;
        for i in 0..200_001 {
            let x = -87.0 + 175.0 * (i as f64 / 200_000.0);
            let x = x as f32;
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-1000.0), 0.0);
        assert!(exp_approx(f32::NAN).is_nan());
        assert!(exp_approx(1000.0).is_finite());
    }

    #[test]
    fn silu_mul_matches_naive_reference() {
        for &n in &[1usize, 7, 33, 130, 257, 70_001] {
            let g = rand_vec(1, n, -12.0, 12.0);
            let u = rand_vec(2, n, -3.0, 3.0);
            let mut out = vec![0f32; n];
            silu_mul(&g, &u, &mut out);
            let want: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    let g = g as f64;
                    g / (1.0 + (-g).exp()) * u as f64
                })
                .collect();
            let e = rel_l2(&out, &want);
            assert!(e <= 1e-6, "n {n}: rel L2 {e}");
        }
        // Hand values: silu(0) = 0, silu(x) → x for large x, → 0 for very negative x.
        let mut out = [0f32; 3];
        silu_mul(&[0.0, 30.0, -200.0], &[5.0, 2.0, 1.0], &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 60.0).abs() < 1e-4);
        assert!(out[2].abs() < 1e-30);
    }

    #[test]
    fn add_assign_adds_elementwise() {
        let mut d = vec![1.0f32, 2.0, -3.5];
        add_assign(&mut d, &[0.5, -2.0, 1.0]);
        assert_eq!(d, vec![1.5, 0.0, -2.5]);
    }
}
