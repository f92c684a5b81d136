//! RMSNorm over the rows of an fp32 activation matrix.

use rayon::prelude::*;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm per row of width `weight.len()`: `out = x / sqrt(mean(x²) + eps) · weight`, in fp32 as
/// LLaDA's `RMSLayerNorm` does (`(x · rsqrt(var + eps)) · weight`).
///
/// Contract (debug-checked): `x.len() == out.len()`, a multiple of `weight.len()` (> 0).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    debug_assert!(d > 0);
    debug_assert_eq!(x.len(), out.len());
    debug_assert_eq!(x.len() % d.max(1), 0);
    if d == 0 {
        return;
    }
    let rows = x.len() / d;
    if rows <= ROWS_PER_TASK {
        out.chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .for_each(|(o, xr)| norm_row(xr, weight, eps, o));
    } else {
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, xs)| {
                o.chunks_exact_mut(d)
                    .zip(xs.chunks_exact(d))
                    .for_each(|(o, xr)| norm_row(xr, weight, eps, o));
            });
    }
}

#[inline]
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut ss = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for v in chunks.remainder() {
        ss += v * v;
    }
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = (xv * inv) * wv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoise::rng::uniform;

    fn rand_vec(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|i| (lo + (hi - lo) * uniform(seed, 1, 0, i as u64)) as f32)
            .collect()
    }

    fn naive(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
        let d = w.len();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let ms: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            out.extend(row.iter().zip(w).map(|(v, w)| *v as f64 * inv * *w as f64));
        }
        out
    }

    #[test]
    fn rms_norm_matches_naive_reference() {
        for &(rows, d) in &[
            (1usize, 1usize),
            (1, 7),
            (3, 33),
            (17, 130),
            (40, 257),
            (192, 384),
        ] {
            let x = rand_vec(10 + d as u64, rows * d, -4.0, 4.0);
            let w = rand_vec(20 + d as u64, d, 0.5, 1.5);
            let mut out = vec![0f32; rows * d];
            rms_norm(&x, &w, 1e-5, &mut out);
            let want = naive(&x, &w, 1e-5);
            let num: f64 = out
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).powi(2))
                .sum();
            let den: f64 = want.iter().map(|w| w * w).sum();
            let e = (num / den).sqrt();
            assert!(e <= 1e-6, "rows {rows} d {d}: rel L2 {e}");
        }
    }

    #[test]
    fn rms_norm_hand_case() {
        // Row [3, 4]: mean square 12.5, 1/sqrt(12.5) = 0.28284271; weight [1, 2].
        let mut out = [0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        assert!((out[0] - 0.848_528_1).abs() < 1e-6);
        assert!((out[1] - 2.262_741_7).abs() < 1e-6);
        // eps keeps an all-zero row finite.
        rms_norm(&[0.0, 0.0], &[1.0, 1.0], 1e-5, &mut out);
        assert_eq!(out, [0.0, 0.0]);
    }
}
