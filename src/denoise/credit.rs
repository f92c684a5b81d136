//! Trace credit (CreditDecoding, arXiv 2510.06133, in the form of dInfer's
//! `CreditThresholdParallelDecoder`): a masked position's earlier predictions raise the
//! confidence of the token it keeps predicting, so a correct but under-confident token is
//! committed steps earlier under a dynamic commit rule (`--threshold`, `--factor`).
//!
//! Every forward of a block, at each still-masked position of the block:
//! 1. `t` = the most likely candidate of the position's row (the mask and padding ids never are)
//!    and `p` its softmax probability over the row; the position's credit decays,
//!    `C ← decay · C`, and `C[t] += p^gamma`;
//! 2. the row used for the prediction is `logits + alpha · ln(1 + C)`: only the ids that were
//!    ever a position's top candidate in this block change.
//!
//! The candidate, its sampling and its confidence all come from that fused row (as dInfer does);
//! credit starts empty at each block. The row is the one prediction would read otherwise:
//! after guidance and after a position constraint narrows it ([`super::constraint`]), so credit
//! only ever goes to an allowed id.
//!
//! A position is credited at most one id per forward, so the credit is stored sparsely (the ids
//! with credit, at most one per forward of the block) instead of dInfer's dense
//! block × vocabulary matrix; the fused rows are the same. A step's credit is computed by the
//! prediction ([`CreditView::fuse`] gives the fused row and the step's [`Deposit`]) and stored when the
//! session applies that step ([`Trace::commit`]), so predicting twice changes nothing.

use super::predict::softmax_prob;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// The credit rule's constants (dInfer's defaults: alpha 0.7, gamma 0.2, decay 0.8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CreditParams {
    /// Weight of the credit in the fused logits, `> 0`.
    pub alpha: f64,
    /// Exponent on the top candidate's probability, `≥ 0` (0 counts every forward as 1; smaller
    /// values lift low probabilities more).
    pub gamma: f64,
    /// Factor applied to the credit before each forward's deposit, in `[0, 1]` (0 keeps only the
    /// current forward's).
    pub decay: f64,
}

impl Default for CreditParams {
    fn default() -> Self {
        CreditParams {
            alpha: 0.7,
            gamma: 0.2,
            decay: 0.8,
        }
    }
}

impl CreditParams {
    /// Checks the ranges; errors ([`Error::InvalidArgument`]) name the constant.
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::invalid(format!(
                "credit_alpha must be a finite number > 0, got {}",
                self.alpha
            )));
        }
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(Error::invalid(format!(
                "credit_gamma must be a finite number >= 0, got {}",
                self.gamma
            )));
        }
        if !(0.0..=1.0).contains(&self.decay) {
            return Err(Error::invalid(format!(
                "credit_decay must be in [0, 1], got {}",
                self.decay
            )));
        }
        Ok(())
    }
}

/// One forward's credit at one position: the position's top candidate and `p^gamma`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deposit {
    pub position: usize,
    pub token: u32,
    pub amount: f64,
}

/// The credit a session holds: per position of the block being denoised, the ids with credit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// The block the credit belongs to (`None`: no credit yet).
    block: Option<usize>,
    /// Position → (id, credit), in the order the ids were first credited.
    credit: HashMap<usize, Vec<(u32, f64)>>,
}

/// What a prediction needs from the trace: the trace, the constants and the block predicted.
#[derive(Debug, Clone, Copy)]
pub struct CreditView<'a> {
    pub trace: &'a Trace,
    pub params: &'a CreditParams,
    pub block: usize,
}

impl Trace {
    /// Drops every credit (a new decoding, or a canvas edited from outside).
    pub fn clear(&mut self) {
        self.block = None;
        self.credit.clear();
    }

    /// The credit of `pos` as a forward of `block` finds it: the stored credit decayed once, or
    /// nothing when the trace belongs to another block.
    fn carried(&self, block: usize, pos: usize, decay: f64) -> Vec<(u32, f64)> {
        if self.block != Some(block) {
            return Vec::new();
        }
        self.credit
            .get(&pos)
            .map(|c| c.iter().map(|&(t, v)| (t, v * decay)).collect())
            .unwrap_or_default()
    }

    /// Drops the credit of `pos` (a position self-correction re-masked: its credit favours the
    /// token just rejected).
    pub fn forget(&mut self, pos: usize) {
        self.credit.remove(&pos);
    }

    /// The stored credit of `pos`, for tests and inspection: (id, credit) pairs.
    pub fn credit_of(&self, pos: usize) -> &[(u32, f64)] {
        self.credit.get(&pos).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Stores one forward of `block`: every credit decays by `params.decay` (all of it is dropped
    /// first when the trace belonged to another block), then each deposit is added.
    pub fn commit(&mut self, params: &CreditParams, block: usize, deposits: &[Deposit]) {
        if self.block != Some(block) {
            self.clear();
            self.block = Some(block);
        } else {
            for c in self.credit.values_mut() {
                for (_, v) in c.iter_mut() {
                    *v *= params.decay;
                }
            }
        }
        for d in deposits {
            add(
                self.credit.entry(d.position).or_default(),
                d.token,
                d.amount,
            );
        }
    }
}

impl CreditView<'_> {
    /// The row a prediction at `pos` reads with credit, and the forward's deposit there. `row`
    /// is the position's row as prediction would read it without credit (guided, narrowed);
    /// candidates are the ids below `vocab_size` other than `mask`.
    pub fn fuse(
        &self,
        pos: usize,
        row: &[f32],
        mask: u32,
        vocab_size: usize,
    ) -> (Vec<f32>, Deposit) {
        let top = top_candidate(row, mask, vocab_size);
        // A row without a finite top probability (guidance overflowing) deposits nothing
        // (checked before the power: NaN^0 is 1).
        let prob = softmax_prob(row, top);
        let amount = if prob.is_finite() {
            prob.powf(self.params.gamma)
        } else {
            0.0
        };
        let deposit = Deposit {
            position: pos,
            token: top as u32,
            amount,
        };
        let mut credit = self.trace.carried(self.block, pos, self.params.decay);
        add(&mut credit, deposit.token, amount);
        let mut fused = row.to_vec();
        for (t, c) in credit {
            let x = &mut fused[t as usize];
            // Kept finite: an enormous alpha must not turn the row into +inf (NaN softmax).
            *x = (*x as f64 + self.params.alpha * c.ln_1p()).min(f32::MAX as f64) as f32;
        }
        (fused, deposit)
    }
}

/// Adds `amount` to `token`'s entry of `credit`, creating it.
fn add(credit: &mut Vec<(u32, f64)>, token: u32, amount: f64) {
    match credit.iter_mut().find(|(t, _)| *t == token) {
        Some((_, v)) => *v += amount,
        None => credit.push((token, amount)),
    }
}

/// The candidate with the largest logit (ties to the lower id; NaN never wins over a number),
/// skipping `mask` and ids from `vocab_size` on; the first candidate when none is a number.
fn top_candidate(row: &[f32], mask: u32, vocab_size: usize) -> usize {
    let n = vocab_size.min(row.len());
    let mut best = usize::MAX;
    for (j, &l) in row[..n].iter().enumerate() {
        if j == mask as usize {
            continue;
        }
        if best == usize::MAX || l > row[best] || (row[best].is_nan() && !l.is_nan()) {
            best = j;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(trace: &'a Trace, params: &'a CreditParams, block: usize) -> CreditView<'a> {
        CreditView {
            trace,
            params,
            block,
        }
    }

    #[test]
    fn the_first_forward_credits_its_top_candidate_only() {
        let p = CreditParams::default();
        let t = Trace::default();
        // Mask id 1 has the largest logit and is skipped; id 3 is padding beyond vocab_size 3.
        let row = [2.0f32, 9.0, 1.0, 50.0];
        let (fused, d) = view(&t, &p, 0).fuse(7, &row, 1, 3);
        assert_eq!((d.position, d.token), (7, 0));
        let z = 2f64.exp() + 9f64.exp() + 1f64.exp() + 50f64.exp();
        let prob = 2f64.exp() / z;
        assert!((d.amount - prob.powf(0.2)).abs() < 1e-12);
        let want = 2.0 + 0.7 * (1.0 + prob.powf(0.2)).ln();
        assert!(
            (fused[0] as f64 - want).abs() < 1e-6,
            "{} vs {want}",
            fused[0]
        );
        assert_eq!(&fused[1..], &row[1..], "only the credited id changes");
    }

    #[test]
    fn credit_decays_accumulates_and_restarts_with_a_new_block() {
        let p = CreditParams {
            alpha: 1.0,
            gamma: 1.0,
            decay: 0.5,
        };
        let mut t = Trace::default();
        t.commit(
            &p,
            2,
            &[Deposit {
                position: 4,
                token: 9,
                amount: 0.6,
            }],
        );
        t.commit(
            &p,
            2,
            &[Deposit {
                position: 4,
                token: 3,
                amount: 0.2,
            }],
        );
        t.commit(
            &p,
            2,
            &[Deposit {
                position: 4,
                token: 9,
                amount: 0.4,
            }],
        );
        // 9: 0.6 · 0.5 · 0.5 + 0.4; 3: 0.2 · 0.5.
        let c = t.credit_of(4);
        assert_eq!(c.len(), 2);
        assert!((c[0].1 - 0.55).abs() < 1e-12 && c[0].0 == 9);
        assert!((c[1].1 - 0.1).abs() < 1e-12 && c[1].0 == 3);
        // A forward of the same block sees it decayed once more, plus its own deposit.
        let row = [0.0f32; 12];
        let (fused, d) = view(&t, &p, 2).fuse(4, &row, 11, 12);
        assert_eq!(d.token, 0, "a flat row's top candidate is the lowest id");
        assert!((fused[9] as f64 - (1.0 + 0.275f64).ln()).abs() < 1e-6);
        assert!((fused[3] as f64 - (1.0 + 0.05f64).ln()).abs() < 1e-6);
        assert!((fused[0] as f64 - (1.0 + 1.0 / 12.0f64).ln()).abs() < 1e-6);
        // Another block starts from nothing.
        let (fused, _) = view(&t, &p, 3).fuse(4, &row, 11, 12);
        assert_eq!(fused[9], 0.0);
        t.commit(&p, 3, &[]);
        assert!(t.credit_of(4).is_empty());
    }

    #[test]
    fn a_narrowed_row_credits_an_allowed_id_and_nan_never_wins() {
        let p = CreditParams::default();
        let t = Trace::default();
        let row = [f32::NAN, f32::MIN, 0.5, f32::NEG_INFINITY];
        let (_, d) = view(&t, &p, 0).fuse(0, &row, 9, 4);
        assert_eq!(d.token, 2);
        let all_nan = [f32::NAN; 3];
        assert_eq!(top_candidate(&all_nan, 0, 3), 1);
    }

    #[test]
    fn degenerate_rows_and_constants_stay_finite() {
        // gamma 0 makes every deposit 1, but a NaN row deposits nothing (NaN^0 would be 1).
        let p = CreditParams {
            alpha: 1e300,
            gamma: 0.0,
            decay: 1.0,
        };
        let t = Trace::default();
        let (_, d) = view(&t, &p, 0).fuse(0, &[f32::NAN; 4], 9, 4);
        assert_eq!(d.amount, 0.0);
        // An enormous alpha lifts the credited id to f32::MAX, not to +inf.
        let (fused, d) = view(&t, &p, 0).fuse(0, &[1.0, 0.0, 0.0], 9, 3);
        assert_eq!((d.token, d.amount), (0, 1.0));
        assert_eq!(fused[0], f32::MAX);
        assert!(softmax_prob(&fused, 0).is_finite());
        // forget drops one position only.
        let mut t = Trace::default();
        t.commit(
            &p,
            0,
            &[
                Deposit {
                    position: 1,
                    token: 2,
                    amount: 0.5,
                },
                Deposit {
                    position: 3,
                    token: 2,
                    amount: 0.5,
                },
            ],
        );
        t.forget(1);
        assert!(t.credit_of(1).is_empty());
        assert_eq!(t.credit_of(3), &[(2, 0.5)]);
    }

    #[test]
    fn bad_constants_are_refused_by_name() {
        for (p, name) in [
            (
                CreditParams {
                    alpha: 0.0,
                    ..Default::default()
                },
                "alpha",
            ),
            (
                CreditParams {
                    alpha: f64::NAN,
                    ..Default::default()
                },
                "alpha",
            ),
            (
                CreditParams {
                    gamma: -1.0,
                    ..Default::default()
                },
                "gamma",
            ),
            (
                CreditParams {
                    decay: 1.5,
                    ..Default::default()
                },
                "decay",
            ),
            (
                CreditParams {
                    decay: f64::NAN,
                    ..Default::default()
                },
                "decay",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        assert!(CreditParams::default().validate().is_ok());
    }
}
