//! Which RMSNorms of a forward are folded into the GEMMs around them ([`KernelChoice::norm_fold`],
//! [`super::super::gemm_norm`]), decided once per forward from the shapes and the kernels the
//! GEMMs will run on: a norm is folded only when both its producer (the residual-adding GEMM
//! before it) and its consumer (the GEMM after it) have the fold; otherwise it stays a kernel.
//! The decision is host logic, unit-tested here.

use super::KernelChoice;
use crate::backend::cuda::gemm_norm::{NormFold, NormPrep, GROUP_COLS};
use cudarc::driver::CudaView;

/// The folded norms of one forward and the fold's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct FoldPlan {
    /// The attention norm of layers 1..: the prep in the down projection before it (or the
    /// fused MLP's down job), the row scale in the QKV projection.
    pub attn: bool,
    /// The MLP norm: the prep in the attention-output projection, the row scale in gate/up (or
    /// the fused MLP's gate/up job).
    pub ff: bool,
    /// Partial sums per row (`d_model / 32`; 0 when nothing is folded).
    pub parts: usize,
    /// The norms' epsilon.
    pub eps: f32,
}

impl FoldPlan {
    /// The plan for a forward of `rows` rows with model widths `(d_model, mlp_hidden, qkv)`,
    /// the whole MLP in one launch when `mlp_fused` (the stream kernel, which has the fold), and
    /// `serves(n, k)`: whether the GEMM `rows × n × k` runs on a kernel with the fold
    /// ([`crate::backend::cuda::gemm::Gemm::norm_fold_serves`]).
    pub fn new(
        kernels: &KernelChoice,
        (d, h, qkv): (usize, usize, usize),
        mlp_fused: bool,
        eps: f32,
        serves: impl Fn(usize, usize) -> bool,
    ) -> FoldPlan {
        let on = kernels.norm_fold && !kernels.naive_gemm && d % GROUP_COLS == 0;
        // Producer and consumer of each norm: attention output → gate/up; down → QKV.
        let ff = on && serves(d, d) && (mlp_fused || serves(2 * h, d));
        let attn = on && (mlp_fused || serves(d, h)) && serves(qkv, d);
        FoldPlan {
            attn,
            ff,
            parts: if attn || ff { d / GROUP_COLS } else { 0 },
            eps,
        }
    }

    /// Columns per row of the `x ⊙ γ` buffers (`d_model`; 0 when nothing is folded: the fold's
    /// buffers are then one element, so views of them must be empty).
    pub fn cols(&self) -> usize {
        self.parts * GROUP_COLS
    }

    /// The row scale of a consumer reading the partial sums `sq`.
    pub fn scale<'a, 'b>(&self, sq: &'a CudaView<'b, f32>) -> NormFold<'a, 'b> {
        NormFold {
            scale: Some(sq),
            prep: None,
            eps: self.eps,
        }
    }

    /// A producer's prep (none for `None`).
    pub fn prep<'a, 'b>(&self, prep: Option<NormPrep<'a, 'b>>) -> NormFold<'a, 'b> {
        NormFold {
            scale: None,
            prep,
            eps: self.eps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLADA_8B: (usize, usize, usize) = (4096, 12_288, 12_288);

    fn kernels(norm_fold: bool) -> KernelChoice {
        KernelChoice {
            naive_gemm: false,
            norm_fold,
            ..KernelChoice::reference()
        }
    }

    #[test]
    fn both_norms_fold_where_every_gemm_has_the_fold() {
        let p = FoldPlan::new(&kernels(true), LLADA_8B, false, 1e-5, |_, _| true);
        assert!(p.attn && p.ff);
        assert_eq!(p.parts, 128);
        // Off by default, and never with the reference GEMM.
        let off = FoldPlan::new(&kernels(false), LLADA_8B, false, 1e-5, |_, _| true);
        assert!(!off.attn && !off.ff);
        // Without the fold its buffers are one element: every view of them is empty.
        assert_eq!((off.parts, off.cols()), (0, 0));
        assert_eq!(p.cols(), 4096);
        let naive = KernelChoice {
            norm_fold: true,
            ..KernelChoice::reference()
        };
        let p = FoldPlan::new(&naive, LLADA_8B, false, 1e-5, |_, _| true);
        assert!(!p.attn && !p.ff);
    }

    #[test]
    fn a_norm_stays_a_kernel_when_its_producer_or_consumer_cannot_fold() {
        let (d, h, qkv) = LLADA_8B;
        let k = kernels(true);
        // gate/up (n = 2h, k = d) without the fold: the MLP norm stays, the attention norm folds.
        let p = FoldPlan::new(&k, LLADA_8B, false, 1e-5, |n, kk| (n, kk) != (2 * h, d));
        assert!(!p.ff && p.attn);
        // ... unless the fused MLP runs gate/up (it has the fold).
        let p = FoldPlan::new(&k, LLADA_8B, true, 1e-5, |n, kk| (n, kk) != (2 * h, d));
        assert!(p.ff && p.attn);
        // The down projection (n = d, k = h) without it: the attention norm stays.
        let p = FoldPlan::new(&k, LLADA_8B, false, 1e-5, |n, kk| (n, kk) != (d, h));
        assert!(p.ff && !p.attn);
        // QKV without it: the attention norm stays even with the fused MLP.
        let p = FoldPlan::new(&k, LLADA_8B, true, 1e-5, |n, _| n != qkv);
        assert!(p.ff && !p.attn);
        // The attention output (n = k = d) without it: the MLP norm stays.
        let p = FoldPlan::new(&k, LLADA_8B, true, 1e-5, |n, kk| (n, kk) != (d, d));
        assert!(!p.ff && p.attn);
        // A width that is not whole 32-column groups folds nothing.
        let p = FoldPlan::new(&k, (4100, h, 12_300), false, 1e-5, |_, _| true);
        assert!(!p.ff && !p.attn);
    }
}
