//! Counter-based random numbers shared by every backend.
//!
//! A draw is a pure function of `(seed, step, position, index)`, so the CPU and CUDA
//! backends produce the same Gumbel noise and the same random confidences without sharing
//! generator state, and a run is reproducible whatever order positions are visited in.
//! The mixer is SplitMix64's finaliser applied to a running 64-bit hash of the four keys; the
//! CUDA twin lives in `cuda/common.cuh` (`dllm_uniform`) and must stay bit-identical.

/// SplitMix64 finaliser: a bijective 64-bit mix.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 64 random bits for `(seed, step, position, index)`.
#[inline]
pub fn bits(seed: u64, step: u64, position: u64, index: u64) -> u64 {
    let h = mix64(seed);
    let h = mix64(h ^ step);
    let h = mix64(h ^ position);
    mix64(h ^ index)
}

/// A uniform number in the open interval (0, 1) with 53 random bits.
#[inline]
pub fn uniform(seed: u64, step: u64, position: u64, index: u64) -> f64 {
    let b = bits(seed, step, position, index) >> 11; // 53 bits
    (b as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Gumbel-max perturbation used by LLaDA's `add_gumbel_noise`, in log space and float64:
/// the reference ranks `exp(l) / (-ln u)^T`, which orders like `l - T·ln(-ln u)`.
#[inline]
pub fn gumbel_perturb(logit: f64, temperature: f64, u: f64) -> f64 {
    logit - temperature * (-u.ln()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_open_unit_interval_and_keyed() {
        let mut sum = 0.0;
        let n = 20000;
        for i in 0..n {
            let u = uniform(7, 3, 11, i);
            assert!(u > 0.0 && u < 1.0);
            sum += u;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert_ne!(uniform(7, 3, 11, 0), uniform(8, 3, 11, 0));
        assert_ne!(uniform(7, 3, 11, 0), uniform(7, 4, 11, 0));
        assert_ne!(uniform(7, 3, 11, 0), uniform(7, 3, 12, 0));
        assert_eq!(uniform(7, 3, 11, 5), uniform(7, 3, 11, 5));
    }

    #[test]
    fn mix64_matches_splitmix64_reference_value() {
        // First output of the SplitMix64 generator seeded with 0 (published test vector).
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn gumbel_perturb_orders_like_the_reference_ratio() {
        // exp(l)/(-ln u)^T versus l - T ln(-ln u): same order on a hand-made pair.
        let (l1, u1, l2, u2, t) = (1.0f64, 0.3f64, 1.2f64, 0.9f64, 0.7f64);
        let r1 = l1.exp() / (-u1.ln()).powf(t);
        let r2 = l2.exp() / (-u2.ln()).powf(t);
        let p1 = gumbel_perturb(l1, t, u1);
        let p2 = gumbel_perturb(l2, t, u2);
        assert_eq!(r1 > r2, p1 > p2);
    }
}
