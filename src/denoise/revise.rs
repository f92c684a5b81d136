//! Self-correction (`--revise R`): which committed tokens a step may send back to the model.
//!
//! A [`Ledger`] remembers, for every canvas position, whether it holds a token the model
//! committed (never a prompt token, a locked token or an EOS fill) and how many times it has been
//! re-masked. After a step's forward, a revisable token whose probability under that forward's
//! logits fell below the threshold `R` is re-masked ([`Ledger::select`]), at most
//! [`MAX_REMASKS_PER_POSITION`] times per position. The session only offers positions of the
//! block being denoised and never on that block's last step, so every block still ends with no
//! masks and the total number of steps never exceeds the schedule's.

use super::constraint::Constraints;
use crate::error::{Error, Result};

/// How many times one position may be re-masked.
pub const MAX_REMASKS_PER_POSITION: u8 = 2;

/// Checks a revise threshold: `0 < r < 1`. Errors name the option and the value.
pub fn validate_threshold(r: f64) -> Result<()> {
    if r.is_finite() && r > 0.0 && r < 1.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "revise threshold must be a number with 0 < R < 1, got {r}"
        )))
    }
}

/// Per-position revision bookkeeping of one canvas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// The position holds a token committed by the model.
    revisable: Vec<bool>,
    /// Times the position has been re-masked.
    count: Vec<u8>,
    /// Re-maskings so far, all positions together.
    total: usize,
}

impl Ledger {
    /// A ledger for a canvas of `len` positions, none revisable.
    pub fn new(len: usize) -> Ledger {
        Ledger {
            revisable: vec![false; len],
            count: vec![0; len],
            total: 0,
        }
    }

    /// Position `p` now holds a token the model committed.
    pub fn committed(&mut self, p: usize) {
        self.revisable[p] = true;
    }

    /// Position `p` was set by someone other than the model (lock, EOS fill) or sent back to the
    /// model (remask): it is not revisable until the model commits it again.
    pub fn pinned(&mut self, p: usize) {
        self.revisable[p] = false;
    }

    /// Whether `p` holds a model-committed token that may still be re-masked.
    pub fn may_revise(&self, p: usize) -> bool {
        self.revisable[p] && self.count[p] < MAX_REMASKS_PER_POSITION
    }

    /// Withdraws one re-masking of `p` (the position was filled by someone other than the model
    /// in the same step, e.g. the EOS stop), so it neither counts nor uses up the cap.
    pub fn withdraw(&mut self, p: usize) {
        debug_assert!(self.count[p] > 0);
        self.count[p] -= 1;
        self.total -= 1;
    }

    /// Times `p` has been re-masked.
    pub fn remask_count(&self, p: usize) -> u8 {
        self.count[p]
    }

    /// Re-maskings so far.
    pub fn total_remasks(&self) -> usize {
        self.total
    }

    /// The positions of `candidates` whose probability (`probs[i]` for `candidates[i]`) is below
    /// `threshold` and which may still be revised; each is recorded as re-masked (no longer
    /// revisable, its count raised). Increasing order when `candidates` is. A NaN probability
    /// counts as below the threshold.
    pub fn select(&mut self, candidates: &[usize], probs: &[f64], threshold: f64) -> Vec<usize> {
        debug_assert_eq!(candidates.len(), probs.len());
        let mut out = Vec::new();
        for (&p, &prob) in candidates.iter().zip(probs) {
            if self.may_revise(p) && (prob < threshold || prob.is_nan()) {
                self.revisable[p] = false;
                self.count[p] += 1;
                self.total += 1;
                out.push(p);
            }
        }
        out
    }
}

/// Softmax probability, under the logits row of each position, of the token the canvas holds
/// there: `logits` is row-major with rows of `width`, row `i` predicting `positions[i]`. A
/// constrained position's row is narrowed to its allowed ids first (the distribution it was
/// generated from: a single allowed id has probability 1).
pub fn token_probs(
    logits: &[f32],
    width: usize,
    canvas: &[u32],
    positions: &[usize],
    constraints: &Constraints,
) -> Vec<f64> {
    positions
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let row = constraints.row_for(p, &logits[i * width..(i + 1) * width]);
            super::predict::softmax_prob(&row, canvas[p] as usize)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_checked() {
        for ok in [0.01, 0.5, 0.99] {
            validate_threshold(ok).unwrap();
        }
        for bad in [0.0, 1.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
            let e = validate_threshold(bad).unwrap_err().to_string();
            assert!(e.contains("revise") && e.contains("0 < R < 1"), "{e}");
        }
    }

    #[test]
    fn select_respects_threshold_pins_and_the_cap() {
        let mut l = Ledger::new(6);
        for p in [1, 2, 3, 5] {
            l.committed(p);
        }
        l.pinned(5);
        // 0 was never committed, 5 is pinned; 1 is sure, 2 and 3 fall below 0.5 (NaN too).
        let got = l.select(&[0, 1, 2, 3, 5], &[0.0, 0.9, 0.2, f64::NAN, 0.0], 0.5);
        assert_eq!(got, vec![2, 3]);
        assert_eq!(l.total_remasks(), 2);
        // Re-masked positions are not revisable until committed again.
        assert!(l.select(&[2, 3], &[0.0, 0.0], 0.5).is_empty());
        // Second commit and re-mask of 2: allowed; the third is refused by the cap.
        l.committed(2);
        assert_eq!(l.select(&[2], &[0.1], 0.5), vec![2]);
        l.committed(2);
        assert!(!l.may_revise(2));
        assert!(l.select(&[2], &[0.1], 0.5).is_empty());
        assert_eq!(l.remask_count(2), MAX_REMASKS_PER_POSITION);
        assert_eq!(l.total_remasks(), 3);
        l.withdraw(2);
        assert_eq!((l.remask_count(2), l.total_remasks()), (1, 2));
        // Exactly at the threshold is kept.
        l.committed(4);
        assert!(l.select(&[4], &[0.5], 0.5).is_empty());
    }

    #[test]
    fn token_probs_hand_case() {
        // Row 0: logits ln(0.2), ln(0.8) → p(token 1) = 0.8; row 1: uniform over 2 → 0.5.
        let logits = [0.2f32.ln(), 0.8f32.ln(), 3.0, 3.0];
        let none = Constraints::default();
        let p = token_probs(&logits, 2, &[1, 0], &[0, 1], &none);
        assert!(
            (p[0] - 0.8).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-12,
            "{p:?}"
        );
        // Rows follow `positions`, not the canvas order.
        let q = token_probs(&logits, 2, &[0, 1], &[1, 0], &none);
        assert!(
            (q[0] - 0.8).abs() < 1e-6 && (q[1] - 0.5).abs() < 1e-12,
            "{q:?}"
        );
        // A position constrained to its one token holds it with probability 1.
        let mut one = Constraints::default();
        one.set(0, &[1], 2, 2, 5).unwrap();
        let r = token_probs(&logits, 2, &[1, 0], &[0, 1], &one);
        assert!(r[0] == 1.0 && (r[1] - 0.5).abs() < 1e-12, "{r:?}");
    }
}
