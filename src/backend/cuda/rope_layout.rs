//! The row order of the q and k projections for the QKV GEMM's RoPE epilogue
//! (`DLLM_FUSED_ROPE=1`, `DLLM_EPI_ROPE_QKV` in `cuda/gemm_common.cuh`), and its host reference.
//!
//! RoPE rotates element `i` of a head with element `i + head_dim / 2` (the half-split form). For
//! the GEMM to rotate in its epilogue, the two must meet in one thread: as for the fused SwiGLU
//! ([`super::swiglu_layout`]), the kernels' accumulators hold output columns `16 b + j` and
//! `16 b + 8 + j` together. So each q and k head's rows are uploaded in groups of 16: rows
//! `8 b .. 8 b + 8` of the head's first half, then rows `half + 8 b ..` of its second half. Output
//! column `c` of a head then holds the head's element [`source_of`]`(c)`, and rotation pair `i`
//! sits at columns [`pair_columns`]`(i)`. The same permutation applies to every q and k head (and
//! their biases), so `q · k`, a sum over the head dimension, is unchanged: attention reads the
//! permuted q and the permuted K cache as it read the original ones. v is not permuted.

/// Rows of one half of a head per group; a group holds `GROUP` first-half rows, then the
/// `GROUP` matching second-half rows.
pub const GROUP: usize = 8;

/// Whether a head of `head_dim` can be laid out in groups (whole groups of 16 rows).
pub fn supported(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(2 * GROUP)
}

/// The element of the original head that column `c` (< `head_dim`) of a permuted head holds.
pub fn source_of(c: usize, head_dim: usize) -> usize {
    let (b, w) = (c / (2 * GROUP), c % (2 * GROUP));
    if w < GROUP {
        GROUP * b + w
    } else {
        head_dim / 2 + GROUP * b + w - GROUP
    }
}

/// The two columns of a permuted head that hold rotation pair `i` (< `head_dim / 2`): the
/// original elements `i` and `i + head_dim / 2`.
pub fn pair_columns(i: usize) -> (usize, usize) {
    let c = 2 * GROUP * (i / GROUP) + i % GROUP;
    (c, c + GROUP)
}

/// Calls `emit(first_row, rows)` for the runs of consecutive source rows that make up `heads`
/// permuted heads of `head_dim` rows (head after head, starting at row 0).
pub fn for_each_run(heads: usize, head_dim: usize, mut emit: impl FnMut(usize, usize)) {
    let half = head_dim / 2;
    for h in 0..heads {
        for b in 0..half / GROUP {
            emit(h * head_dim + GROUP * b, GROUP);
            emit(h * head_dim + half + GROUP * b, GROUP);
        }
    }
}

/// `x` (`heads × head_dim` rows of `width` elements each) with every head's rows permuted.
pub fn permute_rows<T: Copy>(x: &[T], heads: usize, head_dim: usize, width: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for_each_run(heads, head_dim, |row, rows| {
        out.extend_from_slice(&x[row * width..(row + rows) * width]);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half-split RoPE of one head (`x[i]`, `x[i + half]` rotated by `angle · freq[i]`).
    fn rope_half_split(x: &[f64], pos: f64, freq: &[f64]) -> Vec<f64> {
        let half = x.len() / 2;
        let mut y = x.to_vec();
        for i in 0..half {
            let (c, s) = ((pos * freq[i]).cos(), (pos * freq[i]).sin());
            y[i] = x[i] * c - x[i + half] * s;
            y[i + half] = x[i + half] * c + x[i] * s;
        }
        y
    }

    /// The same rotation of a permuted head, each pair at its grouped columns.
    fn rope_grouped(x: &[f64], pos: f64, freq: &[f64]) -> Vec<f64> {
        let mut y = x.to_vec();
        for (i, f) in freq.iter().enumerate() {
            let (a, b) = pair_columns(i);
            let (c, s) = ((pos * f).cos(), (pos * f).sin());
            y[a] = x[a] * c - x[b] * s;
            y[b] = x[b] * c + x[a] * s;
        }
        y
    }

    fn noise(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f64 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn the_permutation_is_a_bijection_and_pairs_meet_in_groups() {
        for hd in [16, 64, 128] {
            let mut seen = vec![false; hd];
            for c in 0..hd {
                let s = source_of(c, hd);
                assert!(!seen[s], "head_dim {hd}: source {s} twice");
                seen[s] = true;
            }
            for i in 0..hd / 2 {
                let (a, b) = pair_columns(i);
                // The two columns of a pair are 8 apart in one group of 16, first half first.
                assert_eq!((a / 16, a % 16 < 8, b - a), (b / 16, true, 8));
                assert_eq!((source_of(a, hd), source_of(b, hd)), (i, i + hd / 2));
            }
        }
        assert!(supported(128) && supported(64) && !supported(8) && !supported(72));
    }

    #[test]
    fn rows_are_permuted_head_by_head() {
        // 3 heads of 32 rows, 2 elements wide: row r holds (r, -r).
        let (heads, hd, w) = (3, 32, 2);
        let x: Vec<i64> = (0..heads * hd)
            .flat_map(|r| [r as i64, -(r as i64)])
            .collect();
        let p = permute_rows(&x, heads, hd, w);
        assert_eq!(p.len(), x.len());
        for h in 0..heads {
            for c in 0..hd {
                let src = (h * hd + source_of(c, hd)) as i64;
                assert_eq!(&p[(h * hd + c) * w..][..w], &[src, -src]);
            }
        }
    }

    /// Rotating the permuted head pair by pair gives the permuted rotation of the original, and
    /// q·k of two permuted heads is q·k of the originals: what the epilogue relies on.
    #[test]
    fn grouped_rope_is_the_permuted_half_split_rope_and_keeps_scores() {
        let hd = 128;
        let freq: Vec<f64> = (0..hd / 2)
            .map(|i| 10_000f64.powf(-2.0 * i as f64 / hd as f64))
            .collect();
        let (q, k) = (noise(7, hd), noise(11, hd));
        for pos in [0.0, 1.0, 37.0, 383.0] {
            let want = rope_half_split(&q, pos, &freq);
            let pq = permute_rows(&q, 1, hd, 1);
            let got = rope_grouped(&pq, pos, &freq);
            let want_p = permute_rows(&want, 1, hd, 1);
            for c in 0..hd {
                assert!((got[c] - want_p[c]).abs() < 1e-12, "pos {pos} col {c}");
            }
            let rk = rope_half_split(&k, pos + 5.0, &freq);
            let gk = rope_grouped(&permute_rows(&k, 1, hd, 1), pos + 5.0, &freq);
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            assert!((dot(&want, &rk) - dot(&got, &gk)).abs() < 1e-9);
        }
    }
}
