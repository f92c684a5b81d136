//! Test helpers for the CPU ops: seeded random data, weight bytes in each dtype, error metrics.

use half::{bf16, f16};

use crate::denoise::rng::uniform;
use crate::weights::view::DType;

/// `n` values uniform in `[lo, hi)`, a pure function of `seed`.
pub(crate) fn rand_vec(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n)
        .map(|i| (lo + (hi - lo) * uniform(seed, 77, 0, i as u64)) as f32)
        .collect()
}

/// Relative L2 error of `got` against the f64 reference `want`.
pub(crate) fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Encodes `vals` as little-endian `dtype` bytes after `offset` junk bytes (to force misalignment).
/// Returns the buffer and the values actually stored (rounded to `dtype`), as f64.
pub(crate) fn encode(dtype: DType, vals: &[f32], offset: usize) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = vec![0xAAu8; offset];
    let mut stored = Vec::with_capacity(vals.len());
    for &v in vals {
        match dtype {
            DType::BF16 => {
                let h = bf16::from_f32(v);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                stored.push(h.to_f64());
            }
            DType::F16 => {
                let h = f16::from_f32(v);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                stored.push(h.to_f64());
            }
            DType::F32 => {
                bytes.extend_from_slice(&v.to_le_bytes());
                stored.push(v as f64);
            }
        }
    }
    (bytes, stored)
}
