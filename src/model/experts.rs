//! The feed-forward of a block on the CPU: one SwiGLU ([`SwiGlu`]), or a mixture of SwiGLU
//! experts ([`Mixture`], LLaDA-MoE).
//!
//! The mixture follows the reference `LLaDAMoESparseMoeBlock` (OLMoE's):
//! ```text
//! p      = softmax(router(x))                    (fp32, over n_experts)
//! top    = the experts_per_token largest p       (their probabilities as weights, not renormalised)
//! out    = Σ_{e ∈ top} p_e · down_e(silu(gate_e(x)) · up_e(x))
//! ```
//! Every expert runs once per forward over the rows routed to it (gathered into one matrix), so
//! its weights are read once however many rows chose it. A row's sum adds its experts in
//! ascending expert order, and every product is row invariant (the caller's product), so a
//! row's output has the same bits whatever other rows share the forward (a batch, a narrowed
//! last layer).

use crate::backend::cpu;
use crate::error::Result;
use crate::model::transformer::{Product, SwiGluTensors};
use crate::weights::{TensorView, WeightStore};

/// The three weights of one SwiGLU: `down(silu(gate(x)) · up(x))`.
pub struct SwiGlu<'w> {
    gate: TensorView<'w>,
    up: TensorView<'w>,
    down: TensorView<'w>,
}

/// Work buffers of a SwiGLU over `m` rows, each at least `m × hidden` floats.
pub struct SwiGluBuffers<'b> {
    pub gate: &'b mut [f32],
    pub up: &'b mut [f32],
    pub act: &'b mut [f32],
}

/// Work buffers of a [`Mixture`] over `m` rows: its experts' SwiGLU buffers, `rows` and `y`
/// (`m × d_model` each) and `logits` (`m × n_experts`).
pub struct MixtureBuffers<'b> {
    pub swiglu: SwiGluBuffers<'b>,
    pub rows: &'b mut [f32],
    pub y: &'b mut [f32],
    pub logits: &'b mut [f32],
}

impl<'w> SwiGlu<'w> {
    /// The SwiGLU named by `t` in `store` (shapes were validated at load).
    pub fn open(store: &'w WeightStore, t: &SwiGluTensors) -> Result<SwiGlu<'w>> {
        Ok(SwiGlu {
            gate: store.get(&t.gate)?,
            up: store.get(&t.up)?,
            down: store.get(&t.down)?,
        })
    }

    /// `out = down(silu(gate(x)) · up(x))` for the `m` rows of `x` (`out`: `m × d_model`).
    pub fn run(
        &self,
        x: &[f32],
        m: usize,
        product: Product,
        buf: &mut SwiGluBuffers,
        out: &mut [f32],
    ) {
        let h = self.gate.shape[0];
        let (gate, up, act) = (
            &mut buf.gate[..m * h],
            &mut buf.up[..m * h],
            &mut buf.act[..m * h],
        );
        product(x, m, &self.gate, gate);
        product(x, m, &self.up, up);
        cpu::silu_mul(gate, up, act);
        product(act, m, &self.down, out);
    }
}

/// A mixture of SwiGLU experts with its router.
pub struct Mixture<'w> {
    router: TensorView<'w>,
    experts: Vec<SwiGlu<'w>>,
    /// Experts each row runs.
    per_row: usize,
}

impl<'w> Mixture<'w> {
    /// The router and experts named in `store`, each row running `per_row` of them.
    pub fn open(
        store: &'w WeightStore,
        router: &str,
        experts: &[SwiGluTensors],
        per_row: usize,
    ) -> Result<Mixture<'w>> {
        Ok(Mixture {
            router: store.get(router)?,
            experts: experts
                .iter()
                .map(|t| SwiGlu::open(store, t))
                .collect::<Result<_>>()?,
            per_row,
        })
    }

    /// The mixture's output for the `m` rows of `x` (`d` wide) into `out` (`m × d`).
    pub fn run(
        &self,
        x: &[f32],
        m: usize,
        d: usize,
        product: Product,
        buf: &mut MixtureBuffers,
        out: &mut [f32],
    ) {
        let n = self.experts.len();
        let logits = &mut buf.logits[..m * n];
        product(x, m, &self.router, logits);
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
        for (row, l) in logits.chunks_exact(n).enumerate() {
            for (e, p) in route(l, self.per_row) {
                routed[e].push((row, p));
            }
        }
        out[..m * d].fill(0.0);
        for (expert, rows) in self.experts.iter().zip(&routed) {
            let r = rows.len();
            if r == 0 {
                continue;
            }
            for (i, &(row, _)) in rows.iter().enumerate() {
                buf.rows[i * d..(i + 1) * d].copy_from_slice(&x[row * d..(row + 1) * d]);
            }
            let y = &mut buf.y[..r * d];
            expert.run(&buf.rows[..r * d], r, product, &mut buf.swiglu, y);
            for (i, &(row, p)) in rows.iter().enumerate() {
                let dst = &mut out[row * d..(row + 1) * d];
                for (o, v) in dst.iter_mut().zip(&y[i * d..(i + 1) * d]) {
                    *o += p * v;
                }
            }
        }
    }
}

/// One row's experts: the softmax of its router `logits` (fp32), then the `k` most probable
/// experts (ties to the lower index) with their probabilities, most probable first. Values
/// rank by `f32::total_cmp`, a NaN (a NaN logit, or `inf − inf`) as the positive NaN above every
/// number on every platform (x86 makes `inf − inf` a negative one; the CUDA routing kernel a
/// positive one): never a panic, and the same experts on both backends.
pub fn route(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits
        .iter()
        .map(|&l| match (l - max).exp() {
            e if e.is_nan() => f32::NAN,
            e => e,
        })
        .collect();
    let sum: f32 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
    order.truncate(k);
    order.into_iter().map(|e| (e, exp[e] / sum)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_takes_the_most_probable_with_softmax_weights() {
        // Softmax of [0, ln 2, ln 4, 0] = [1, 2, 4, 1] / 8.
        let logits = [0.0, 2f32.ln(), 4f32.ln(), 0.0];
        let top = route(&logits, 2);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0, top[1].0), (2, 1));
        assert!((top[0].1 - 0.5).abs() < 1e-6);
        assert!((top[1].1 - 0.25).abs() < 1e-6);
        // Ties go to the lower index; weights are not renormalised.
        let top = route(&logits, 3);
        assert_eq!(top[2].0, 0);
        assert!((top.iter().map(|t| t.1).sum::<f32>() - 0.875).abs() < 1e-6);
    }

    #[test]
    fn route_survives_huge_and_nan_logits() {
        // Both others underflow to probability 0: the tie goes to the lower index.
        let top = route(&[1e30, -1e30, 0.0], 2);
        assert_eq!((top[0].0, top[1].0), (0, 1));
        assert_eq!(top[0].1, 1.0);
        let top = route(&[0.0, f32::NAN, 1.0], 1);
        assert_eq!(top.len(), 1);
        // A NaN ranks first, whatever its sign: `-NaN` and `inf − inf` alike.
        assert_eq!(top[0].0, 1);
        assert_eq!(route(&[0.0, -f32::NAN, 1.0], 1)[0].0, 1);
        let top = route(&[1.0, f32::INFINITY, 0.0], 2);
        assert_eq!((top[0].0, top[1].0), (1, 0));
    }
}
