//! The weight layout of the SwiGLU-fused gate/up projection (the default; `DLLM_FUSED_SWIGLU=0`
//! keeps gate and up apart and runs the separate SwiGLU kernel), and its
//! host reference.
//!
//! The fused GEMM (`GemmOut::SwigluBf16`, `DLLM_EPI_SWIGLU_BF16` in `cuda/gemm_common.cuh`)
//! writes `silu(gate) · up` straight from its accumulators instead of writing both halves and
//! running a separate SwiGLU kernel. For that, each gate value must meet its up value in the
//! same thread: the kernels' accumulator layouts hold output columns `16 b + i` and
//! `16 b + 8 + i` together (rows `g` and `g + 8` of an mma fragment, or two neighbouring 8-column
//! blocks of a wgmma tile). So the `2h` weight rows are uploaded in groups of 16: rows
//! `8 b .. 8 b + 8` of the gate matrix, then the same rows of the up matrix. The fused output
//! column `8 b + i` is then `silu(P[16 b + i]) · P[16 b + 8 + i]` of the product `P`.

/// Gate (or up) rows per group; a group of the fused matrix holds `GROUP` gate rows, then the
/// `GROUP` matching up rows.
pub const GROUP: usize = 8;

/// Which source matrix, and which of its rows, row `r` of the fused gate/up matrix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedRow {
    Gate(usize),
    Up(usize),
}

/// The source of fused row `r`.
pub fn fused_row(r: usize) -> FusedRow {
    let (b, w) = (r / (2 * GROUP), r % (2 * GROUP));
    if w < GROUP {
        FusedRow::Gate(GROUP * b + w)
    } else {
        FusedRow::Up(GROUP * b + w - GROUP)
    }
}

/// Whether an MLP of width `h` can use the fused layout (whole groups of rows).
pub fn supported(h: usize) -> bool {
    h > 0 && h.is_multiple_of(GROUP)
}

/// Calls `emit(source, first_row, rows)` for the runs of consecutive source rows that make up
/// the fused matrix, in order: `GROUP` gate rows, `GROUP` up rows, and so on (`h` rows each).
pub fn for_each_run(h: usize, mut emit: impl FnMut(FusedRow, usize)) {
    for b in 0..h / GROUP {
        emit(FusedRow::Gate(GROUP * b), GROUP);
        emit(FusedRow::Up(GROUP * b), GROUP);
    }
}

/// The fused `[2h, d]` matrix from row-major `gate` and `up` (`[h, d]` each).
pub fn interleave<T: Copy>(gate: &[T], up: &[T], h: usize, d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(2 * h * d);
    for_each_run(h, |src, rows| {
        let (m, r0) = match src {
            FusedRow::Gate(r) => (gate, r),
            FusedRow::Up(r) => (up, r),
        };
        out.extend_from_slice(&m[r0 * d..(r0 + rows) * d]);
    });
    out
}

/// `silu(g) · u` in f64.
pub fn silu_mul(g: f64, u: f64) -> f64 {
    g / (1.0 + (-g).exp()) * u
}

/// The fused epilogue on the host: from the product `p` (`[m, 2h]`, columns in the fused
/// order) to `[m, h]`.
pub fn swiglu_of_fused(p: &[f64], m: usize, h: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(m * h);
    for r in 0..m {
        let row = &p[r * 2 * h..(r + 1) * 2 * h];
        for c in 0..h {
            let (b, i) = (c / GROUP, c % GROUP);
            out.push(silu_mul(
                row[2 * GROUP * b + i],
                row[2 * GROUP * b + GROUP + i],
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul_t(a: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for c in 0..n {
                out[r * n + c] = (0..k).map(|i| a[r * k + i] * w[c * k + i]).sum();
            }
        }
        out
    }

    fn values(seed: u64, n: usize) -> Vec<f64> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((z >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn fused_rows_alternate_groups_of_gate_and_up() {
        assert_eq!(fused_row(0), FusedRow::Gate(0));
        assert_eq!(fused_row(7), FusedRow::Gate(7));
        assert_eq!(fused_row(8), FusedRow::Up(0));
        assert_eq!(fused_row(15), FusedRow::Up(7));
        assert_eq!(fused_row(16), FusedRow::Gate(8));
        assert_eq!(fused_row(2 * 12288 - 1), FusedRow::Up(12287));
        assert!(supported(12288) && supported(8));
        assert!(!supported(12) && !supported(0));
    }

    #[test]
    fn interleave_places_every_row_where_fused_row_says() {
        let (h, d) = (24, 3);
        let gate: Vec<usize> = (0..h * d).collect();
        let up: Vec<usize> = (1000..1000 + h * d).collect();
        let f = interleave(&gate, &up, h, d);
        assert_eq!(f.len(), 2 * h * d);
        for r in 0..2 * h {
            let want = match fused_row(r) {
                FusedRow::Gate(s) => &gate[s * d..(s + 1) * d],
                FusedRow::Up(s) => &up[s * d..(s + 1) * d],
            };
            assert_eq!(&f[r * d..(r + 1) * d], want, "fused row {r}");
        }
    }

    /// The fused route (interleaved weights, one product, `swiglu_of_fused`) equals the plain
    /// one (two products, `silu(gate) · up` column by column).
    #[test]
    fn fused_route_equals_separate_gate_and_up() {
        let (m, h, k) = (5, 32, 7);
        let a = values(1, m * k);
        let gate = values(2, h * k);
        let up = values(3, h * k);
        let g = matmul_t(&a, &gate, m, h, k);
        let u = matmul_t(&a, &up, m, h, k);
        let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| silu_mul(g, u)).collect();
        let p = matmul_t(&a, &interleave(&gate, &up, h, k), m, 2 * h, k);
        let got = swiglu_of_fused(&p, m, h);
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!((x - y).abs() < 1e-12, "element {i}: {x} vs {y}");
        }
    }

    /// The index arithmetic of the two CUDA store helpers, transcribed, against this module's
    /// layout: every output column is written once, from its own gate and up rows.
    /// `gemm_store_fragments` (skinny, stream): warp rows `rbase + 16 r + g` (gate) and `+ 8`
    /// (up) → column `(rbase + 16 r) / 2 + g`, with `rbase` a multiple of 16.
    /// `gemm_store_pairs` (wide, wgmma, TMA): thread columns `n = n0 + 8 j + 2 t (+1)` with
    /// the tile base `n0` a multiple of 16 and `j` even (gate), `n + 8` (up) → column
    /// `(n - 2 t) / 2 + 2 t (+1)`.
    #[test]
    fn kernel_store_indices_pair_each_gate_with_its_up() {
        let h = 200; // N = 400: partial tiles in both layouts
        let n = 2 * h;
        let check = |gate_col: usize, out_col: usize, seen: &mut Vec<u32>| {
            assert_eq!(
                fused_row(gate_col),
                FusedRow::Gate(out_col),
                "gate {gate_col}"
            );
            assert_eq!(
                fused_row(gate_col + 8),
                FusedRow::Up(out_col),
                "up {gate_col}"
            );
            seen[out_col] += 1;
        };
        // Fragments, (tile rows, rows per warp, RT): stream and skinny v2 (128, 32, 2: 4 warps of
        // two 16-row mma tiles), skinny v1 (64, 16, 1).
        for (tile_rows, warp_rows, rt) in [(128, 32, 2), (64, 16, 1)] {
            let mut seen = vec![0u32; h];
            for tile in 0..n.div_ceil(tile_rows) {
                for warp in 0..tile_rows / warp_rows {
                    let rbase = tile * tile_rows + warp * warp_rows;
                    assert_eq!(rbase % 16, 0);
                    for r in 0..rt {
                        for g in 0..8 {
                            let row = rbase + 16 * r + g;
                            if row < n {
                                check(row, (rbase + 16 * r) / 2 + g, &mut seen);
                            }
                        }
                    }
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "fragment coverage {tile_rows}"
            );
        }
        // Pairs, (tile columns, column offsets of the stores in a tile, blocks of 8 per store
        // call): wgmma / TMA (192, [0], 24), wide (128, 4 warps 32 columns apart, 4 blocks).
        for (tile_cols, offsets, blocks) in [(192, vec![0], 24), (128, vec![0, 32, 64, 96], 4)] {
            let mut seen = vec![0u32; h];
            for tile in 0..n.div_ceil(tile_cols) {
                for &off in &offsets {
                    let n0 = tile * tile_cols + off;
                    assert_eq!(n0 % 16, 0);
                    for j in (0..blocks).step_by(2) {
                        for t in 0..4 {
                            let col = n0 + 8 * j + 2 * t;
                            if col >= n {
                                continue;
                            }
                            let t2 = col & 7;
                            assert_eq!(t2, 2 * t);
                            for e in 0..2 {
                                check(col + e, (col - t2) / 2 + t2 + e, &mut seen);
                            }
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "pair coverage {tile_cols}");
        }
    }

    #[test]
    fn silu_mul_matches_hand_values() {
        assert_eq!(silu_mul(0.0, 3.0), 0.0);
        // silu(1) = 1 / (1 + e^-1) = 0.7310585786300049
        assert!((silu_mul(1.0, 2.0) - 1.4621171572600098).abs() < 1e-15);
        assert!((silu_mul(-2.0, 1.0) + 0.23840584404423515).abs() < 1e-15);
    }
}
