//! Rotary position embedding, half-split layout (GPT-NeoX / HF `rotate_half`), angles in fp32.

use rayon::prelude::*;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 32;

/// `inv_freq[i] = 1 / theta^(2i / head_dim)` for `i < head_dim / 2`, computed in f32 exactly as
/// HF does (`1.0 / (theta ** (arange(0, hd, 2).float() / hd))`).
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Applies RoPE in place to `x = [seq, n_heads * head_dim]`; `positions[s]` is the absolute
/// position of row `s`. With `h = head_dim / 2`, `angle = pos as f32 · inv_freq[i]` (f32) and
/// for `i < h`: `out[i] = x[i]·cos − x[i+h]·sin`, `out[i+h] = x[i+h]·cos + x[i]·sin`.
///
/// Contract (debug-checked): `head_dim` even, `x.len() == positions.len() * n_heads * head_dim`.
pub fn rope(x: &mut [f32], positions: &[usize], n_heads: usize, head_dim: usize, theta: f32) {
    debug_assert_eq!(head_dim % 2, 0, "rope: head_dim must be even");
    debug_assert_eq!(x.len(), positions.len() * n_heads * head_dim);
    let width = n_heads * head_dim;
    if width == 0 || positions.is_empty() {
        return;
    }
    let inv_freq = rope_inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let apply = |row: &mut [f32], pos: usize, cs: &mut Vec<(f32, f32)>| {
        cs.clear();
        cs.extend(inv_freq.iter().map(|&f| {
            let a = pos as f32 * f;
            (a.cos(), a.sin())
        }));
        for head in row.chunks_exact_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs.iter()) {
                let (x0, x1) = (*a, *b);
                *a = x0 * c - x1 * s;
                *b = x1 * c + x0 * s;
            }
        }
    };
    x.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(positions.par_chunks(ROWS_PER_TASK))
        .for_each(|(rows, pos)| {
            let mut cs = Vec::with_capacity(half);
            for (row, &p) in rows.chunks_exact_mut(width).zip(pos) {
                apply(row, p, &mut cs);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoise::rng::uniform;

    fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (uniform(seed, 2, 0, i as u64) * 2.0 - 1.0) as f32)
            .collect()
    }

    /// Naive reference: the rotation written out per element, trig in f64 on the same f32 angle.
    fn naive(x: &[f32], positions: &[usize], n_heads: usize, hd: usize, theta: f32) -> Vec<f64> {
        let mut out: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        let h = hd / 2;
        for (s, &p) in positions.iter().enumerate() {
            for head in 0..n_heads {
                let base = s * n_heads * hd + head * hd;
                for i in 0..h {
                    let inv = 1.0f32 / theta.powf((2 * i) as f32 / hd as f32);
                    let ang = (p as f32 * inv) as f64;
                    let (x0, x1) = (x[base + i] as f64, x[base + i + h] as f64);
                    out[base + i] = x0 * ang.cos() - x1 * ang.sin();
                    out[base + i + h] = x1 * ang.cos() + x0 * ang.sin();
                }
            }
        }
        out
    }

    #[test]
    fn rope_matches_naive_reference() {
        for &(seq, nh, hd, theta) in &[
            (1usize, 1usize, 2usize, 10_000f32),
            (7, 3, 64, 10_000.0),
            (33, 2, 128, 500_000.0),
            (65, 6, 64, 1e6),
        ] {
            let mut x = rand_vec(seq as u64 * 31 + hd as u64, seq * nh * hd);
            // Non-contiguous, large positions (as with a cached prefix).
            let positions: Vec<usize> = (0..seq).map(|s| 3 * s + 1000 * (s % 2)).collect();
            let want = naive(&x, &positions, nh, hd, theta);
            rope(&mut x, &positions, nh, hd, theta);
            let num: f64 = x
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).powi(2))
                .sum();
            let den: f64 = want.iter().map(|w| w * w).sum();
            let e = (num / den).sqrt();
            assert!(e <= 1e-6, "seq {seq} nh {nh} hd {hd}: rel L2 {e}");
        }
    }

    #[test]
    fn position_zero_is_identity() {
        let orig = rand_vec(5, 2 * 3 * 64);
        let mut x = orig.clone();
        rope(&mut x, &[0, 0], 3, 64, 10_000.0);
        assert_eq!(x, orig);
    }

    #[test]
    fn known_rotation() {
        // head_dim 4, theta 100: inv_freq = [1, 1/10]. Position 1 rotates pair (0, 2) by 1 rad
        // and pair (1, 3) by 0.1 rad.
        assert_eq!(rope_inv_freq(4, 100.0), vec![1.0, 0.1]);
        let mut x = vec![1.0f32, 1.0, 0.0, 0.0];
        rope(&mut x, &[1], 1, 4, 100.0);
        let want = [1f64.cos(), 0.1f64.cos(), 1f64.sin(), 0.1f64.sin()];
        for (g, w) in x.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{x:?} vs {want:?}");
        }
        // head_dim 2, theta 1: inv_freq = [1]; position 3 rotates (2, 3) by 3 rad.
        let mut y = vec![2.0f32, 3.0];
        rope(&mut y, &[3], 1, 2, 1.0);
        let (c, s3) = (3f64.cos(), 3f64.sin());
        assert!((y[0] as f64 - (2.0 * c - 3.0 * s3)).abs() < 1e-6);
        assert!((y[1] as f64 - (3.0 * c + 2.0 * s3)).abs() < 1e-6);
    }
}
