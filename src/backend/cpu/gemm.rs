//! Matrix products: [`linear`] (fp32 activations × checkpoint weights in bf16/f16/f32) and [`matmul`].
//!
//! `linear` never inflates a whole weight matrix: it decodes `W` in panels of a few dozen rows into
//! a thread-local f32 buffer and multiplies each panel with the `gemm` crate, panels spread over
//! the rayon pool. For `m ≤ GEMV_MAX_M` rows it streams the weight bytes instead (a GEMV that
//! decodes and multiplies in registers), which reads each weight once and allocates nothing.
//! (A cached span's products take `skinny` instead where the CPU has AVX-512; the model picks.)

use std::cell::RefCell;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::simd;
use crate::weights::view::TensorView;

/// Row counts up to this use the streaming GEMV path in [`linear`].
pub const GEMV_MAX_M: usize = 4;

/// Default panel height (rows of `W` decoded at once) for [`linear`]'s GEMM path.
pub const DEFAULT_PANEL_ROWS: usize = 64;

/// Default depth of one decoded block along `k` in [`linear`]'s GEMM path: a panel of
/// `DEFAULT_PANEL_ROWS × DEFAULT_K_BLOCK` f32 is 128 KiB, resident in L2 while it is multiplied.
pub const DEFAULT_K_BLOCK: usize = 512;

/// A raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only to hand disjoint output regions to rayon tasks; see each use.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer advanced by `offset` elements. Taking `self` makes closures capture the whole
    /// (Send) wrapper rather than its raw-pointer field.
    ///
    /// # Safety
    /// The result must stay inside the allocation the pointer came from.
    #[inline]
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

thread_local! {
    /// Per-thread scratch for decoded weight panels.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[m, n] = x[m, k] · Wᵀ` for a 2-D weight `W` of shape `[n, k]` (PyTorch `Linear` layout).
///
/// Contract (checked only in debug builds; the model layer validates shapes): `w.shape.len() == 2`,
/// `x.len() == m * k`, `out.len() == m * n`. `out` is overwritten. Multi-threaded on rayon's pool.
pub fn linear(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) {
    if m <= GEMV_MAX_M {
        linear_gemv(x, m, w, out);
    } else {
        linear_blocked(x, m, w, DEFAULT_PANEL_ROWS, DEFAULT_K_BLOCK, out);
    }
}

fn dims(x: &[f32], m: usize, w: &TensorView, out: &[f32]) -> (usize, usize) {
    debug_assert_eq!(w.shape.len(), 2, "linear: weight `{}` must be 2-D", w.name);
    let (n, k) = (w.shape[0], w.shape[1]);
    debug_assert_eq!(
        w.data.len(),
        n * k * w.dtype.size(),
        "linear: `{}` byte length",
        w.name
    );
    debug_assert_eq!(x.len(), m * k, "linear: x length for `{}`", w.name);
    debug_assert_eq!(out.len(), m * n, "linear: out length for `{}`", w.name);
    (n, k)
}

/// [`linear`] whose every output row has the same bits whatever `m` is: the GEMM path at any row
/// count ([`linear`]'s GEMV path for `m ≤ GEMV_MAX_M` rounds differently), and a single row
/// computed as two (the `gemm` crate has its own single-row kernel, which rounds differently
/// too). For rows whose count differs between a canvas run alone and packed with others (the
/// queried rows of the last layer and the LM head), so that a batch predicts exactly what each
/// canvas alone does. Not for output widths of one more than a multiple of 8, whose one-column
/// tail panel the `gemm` crate runs through kernels chosen by the row count (model widths are
/// multiples of 8).
pub fn linear_row_invariant(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) {
    if m == 1 {
        let mut twice = vec![0.0f32; 2 * out.len()];
        linear_panelled(&[x, x].concat(), 2, w, DEFAULT_PANEL_ROWS, &mut twice);
        out.copy_from_slice(&twice[..out.len()]);
    } else {
        linear_panelled(x, m, w, DEFAULT_PANEL_ROWS, out);
    }
}

/// [`linear`] through the GEMM path with an explicit panel height (rows of `W` per task) and the
/// default `k` block. Exposed for benchmarks and tests; [`linear`] picks the path itself.
pub fn linear_panelled(x: &[f32], m: usize, w: &TensorView, panel_rows: usize, out: &mut [f32]) {
    linear_blocked(x, m, w, panel_rows, DEFAULT_K_BLOCK, out);
}

/// [`linear`] through the GEMM path with explicit blocking: each task owns `≈ panel_rows` rows of
/// `W` (output columns) and walks `k` in blocks of `k_block`, decoding each `[panel, k_block]`
/// block (transposed) into a thread-local buffer and accumulating its product into `out`.
pub fn linear_blocked(
    x: &[f32],
    m: usize,
    w: &TensorView,
    panel_rows: usize,
    k_block: usize,
    out: &mut [f32],
) {
    let (n, k) = dims(x, m, w, out);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let panel = balanced_panel(n, panel_rows, rayon::current_num_threads());
    let es = w.dtype.size();
    let dst = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(panel)).into_par_iter().for_each(|p| {
        let n0 = p * panel;
        let pn = panel.min(n - n0);
        let kc_max = k_block.max(1).min(k);
        PANEL.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < pn * kc_max {
                buf.resize(pn * kc_max, 0.0);
            }
            for k0 in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - k0);
                let buf = &mut buf[..pn * kc];
                // Transposed ([kc, pn] row-major): the gemm kernels run ~1.6x faster on this
                // layout than on W's own [pn, k] rows.
                let first = (n0 * k + k0) * es;
                let last = ((n0 + pn - 1) * k + k0 + kc) * es;
                simd::decode_transposed(w.dtype, &w.data[first..last], pn, kc, k, buf);
                // SAFETY: dst points at `out` (m × n, row stride n); this task writes only
                // columns n0..n0+pn of every row, disjoint from every other task. lhs is x's
                // columns k0..k0+kc (m × kc, row stride k); rhs is the decoded block, kc × pn
                // with row stride pn. The first block overwrites, later ones accumulate.
                unsafe {
                    gemm(
                        m,
                        pn,
                        kc,
                        dst.at(n0),
                        1,
                        n as isize,
                        k0 > 0,
                        x.as_ptr().add(k0),
                        1,
                        k as isize,
                        buf.as_ptr(),
                        1,
                        pn as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            }
        });
    });
}

/// A panel height near `target` (a multiple of 8 when possible) that splits `n` rows into a
/// multiple of `threads` panels of nearly equal size, so no thread idles at the end.
fn balanced_panel(n: usize, target: usize, threads: usize) -> usize {
    let target = target.max(1);
    let threads = threads.max(1);
    let per_thread = n.div_ceil(threads * target).max(1);
    let panel = n.div_ceil(threads * per_thread);
    panel.next_multiple_of(8).min(n).max(1)
}

/// [`linear`] through the streaming GEMV path: each weight row is decoded in registers and dotted
/// with all `m` rows of `x`. Intended for `m ≤ 4`; larger `m` is handled in groups of 4.
pub fn linear_gemv(x: &[f32], m: usize, w: &TensorView, out: &mut [f32]) {
    let (n, k) = dims(x, m, w, out);
    if m == 0 || n == 0 {
        return;
    }
    let es = w.dtype.size();
    let rows_per_task = (n / (rayon::current_num_threads() * 8)).clamp(16, 1024);
    let dst = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each(|t| {
            let j0 = t * rows_per_task;
            let j1 = (j0 + rows_per_task).min(n);
            for r0 in (0..m).step_by(GEMV_MAX_M) {
                let mr = GEMV_MAX_M.min(m - r0);
                let xs = &x[r0 * k..(r0 + mr) * k];
                for j in j0..j1 {
                    let mut acc = [0f32; 4];
                    if k > 0 {
                        simd::dot_rows(
                            w.dtype,
                            &w.data[j * k * es..(j + 1) * k * es],
                            xs,
                            mr,
                            k,
                            &mut acc,
                        );
                    }
                    for (r, a) in acc.iter().enumerate().take(mr) {
                        // SAFETY: (r0 + r) < m and j < n, so the index is inside `out`; tasks own
                        // disjoint column ranges j0..j1.
                        unsafe { *dst.at((r0 + r) * n + j) = *a };
                    }
                }
            }
        });
}

/// Plain fp32 GEMM: `out[m, n] = a[m, k] · b[k, n]`, all row-major; `out` is overwritten.
///
/// Contract (debug-checked): `a.len() == m * k`, `b.len() == k * n`, `out.len() == m * n`.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(b.len(), k * n);
    debug_assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: all three buffers have the lengths asserted above with the strides given.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{encode, rand_vec, rel_l2};
    use crate::weights::view::DType;

    /// Naive `x · Wᵀ` in f64 over the values actually stored in the weight bytes.
    fn naive_linear(x: &[f32], m: usize, w: &[f64], n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk];
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    type LinearFn = fn(&[f32], usize, &TensorView, &mut [f32]);

    fn check_linear(
        f: LinearFn,
        what: &str,
        m: usize,
        k: usize,
        n: usize,
        dtype: DType,
        offset: usize,
    ) {
        let seed = (m * 1_000_003 + k * 1009 + n) as u64;
        let x = rand_vec(seed, m * k, -1.0, 1.0);
        let wv = rand_vec(seed + 1, n * k, -1.0, 1.0);
        let (bytes, stored) = encode(dtype, &wv, offset);
        let shape = [n, k];
        let view = TensorView {
            name: "w",
            dtype,
            shape: &shape,
            data: &bytes[offset..],
        };
        let mut out = vec![f32::NAN; m * n];
        f(&x, m, &view, &mut out);
        let want = naive_linear(&x, m, &stored, n, k);
        let e = rel_l2(&out, &want);
        assert!(
            e <= 1e-5,
            "{what} m {m} k {k} n {n} {dtype:?} offset {offset}: rel L2 {e}"
        );
    }

    const SIZES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (1, 7, 33),
        (2, 33, 7),
        (3, 130, 257),
        (4, 257, 130),
        (5, 64, 96),
        (7, 33, 130),
        (33, 257, 7),
        (130, 130, 257),
    ];

    #[test]
    fn row_invariant_linear_gives_each_row_the_same_bits_at_any_row_count() {
        let (k, n) = (1024, 384);
        let rows = 37;
        let x = rand_vec(11, rows * k, -1.0, 1.0);
        let (bytes, stored) = encode(DType::BF16, &rand_vec(12, n * k, -1.0, 1.0), 0);
        let shape = [n, k];
        let w = TensorView {
            name: "w",
            dtype: DType::BF16,
            shape: &shape,
            data: &bytes,
        };
        let mut all = vec![f32::NAN; rows * n];
        linear_row_invariant(&x, rows, &w, &mut all);
        assert!(rel_l2(&all, &naive_linear(&x, rows, &stored, n, k)) <= 1e-5);
        // Any slice of rows, from one row (the `gemm` crate's own single-row kernel, which rounds
        // differently once K spans several blocks) up.
        for (start, m) in [
            (0, 1),
            (5, 1),
            (36, 1),
            (3, 2),
            (7, 3),
            (1, 4),
            (9, 5),
            (2, 17),
        ] {
            let mut part = vec![f32::NAN; m * n];
            linear_row_invariant(&x[start * k..(start + m) * k], m, &w, &mut part);
            let want = &all[start * n..(start + m) * n];
            assert!(
                part.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rows {start}..{}",
                start + m
            );
        }
    }

    #[test]
    fn linear_matches_naive_for_each_dtype_and_alignment() {
        for &(m, k, n) in &SIZES {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                for offset in [0, 1, 2] {
                    check_linear(linear, "linear", m, k, n, dtype, offset);
                }
            }
        }
    }

    #[test]
    fn both_paths_match_naive_at_any_m_and_panel() {
        for &(m, k, n) in &SIZES {
            check_linear(linear_gemv, "gemv", m, k, n, DType::BF16, 1);
            let blocked: LinearFn = |x, m, w, o| linear_blocked(x, m, w, 24, 40, o);
            check_linear(blocked, "blocked 24x40", m, k, n, DType::F16, 1);
            let blocked: LinearFn = |x, m, w, o| linear_blocked(x, m, w, 8, 1, o);
            check_linear(blocked, "blocked 8x1", m, k, n, DType::F32, 3);
            for panel in [1usize, 16, 64, 1000] {
                let f: LinearFn = match panel {
                    1 => |x, m, w, o| linear_panelled(x, m, w, 1, o),
                    16 => |x, m, w, o| linear_panelled(x, m, w, 16, o),
                    64 => |x, m, w, o| linear_panelled(x, m, w, 64, o),
                    _ => |x, m, w, o| linear_panelled(x, m, w, 1000, o),
                };
                check_linear(f, "panelled", m, k, n, DType::BF16, 1);
            }
        }
    }

    #[test]
    fn balanced_panel_splits_evenly() {
        assert_eq!(balanced_panel(384, 64, 2), 64); // 6 panels, 3 per thread
        assert_eq!(balanced_panel(8192, 128, 2), 128);
        assert_eq!(balanced_panel(1152, 128, 2), 120); // 10 panels
        assert_eq!(balanced_panel(5, 128, 2), 5);
        assert_eq!(balanced_panel(1, 0, 0), 1);
        for (n, t, th) in [(1000usize, 96usize, 3usize), (4096, 64, 16), (33, 7, 2)] {
            let p = balanced_panel(n, t, th);
            assert!(
                p >= 1 && p <= n && n.div_ceil(p) >= th.min(n / 8).max(1),
                "{n} {t} {th} -> {p}"
            );
        }
    }

    #[test]
    fn linear_with_empty_inner_dimension_writes_zeros() {
        let shape = [3, 0];
        let view = TensorView {
            name: "w",
            dtype: DType::BF16,
            shape: &shape,
            data: &[],
        };
        for m in [1, 8] {
            let mut out = vec![f32::NAN; m * 3];
            linear(&[], m, &view, &mut out);
            assert!(out.iter().all(|v| *v == 0.0));
        }
    }

    #[test]
    fn linear_hand_case() {
        // x = [1, 2], W = [[1, 0], [0, 1], [3, -1]] → [1, 2, 1].
        let (bytes, _) = encode(DType::BF16, &[1.0, 0.0, 0.0, 1.0, 3.0, -1.0], 0);
        let shape = [3, 2];
        let view = TensorView {
            name: "w",
            dtype: DType::BF16,
            shape: &shape,
            data: &bytes,
        };
        let mut out = [0f32; 3];
        linear(&[1.0, 2.0], 1, &view, &mut out);
        assert_eq!(out, [1.0, 2.0, 1.0]);
    }

    #[test]
    fn matmul_matches_naive() {
        for &(m, k, n) in &[
            (1usize, 1usize, 1usize),
            (7, 33, 130),
            (33, 7, 257),
            (130, 257, 33),
            (257, 130, 7),
        ] {
            let a = rand_vec(m as u64 + 5, m * k, -1.0, 1.0);
            let b = rand_vec(n as u64 + 6, k * n, -1.0, 1.0);
            let mut out = vec![f32::NAN; m * n];
            matmul(&a, &b, m, k, n, &mut out);
            let mut want = vec![0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|kk| a[i * k + kk] as f64 * b[kk * n + j] as f64)
                        .sum();
                }
            }
            let e = rel_l2(&out, &want);
            assert!(e <= 1e-5, "m {m} k {k} n {n}: rel L2 {e}");
        }
    }
}
