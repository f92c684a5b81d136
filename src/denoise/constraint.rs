//! Per-position token constraints: the ids a generated position may take ("a digit here", "one
//! of these names"), which a masked diffusion model honours at any position of the canvas.
//!
//! A constrained position's logits row is narrowed to its allowed ids before prediction (every
//! other entry becomes `-inf`), so its candidate, its sampling (temperature, top-k, top-p) and
//! its confidence (low-confidence, margin, entropy) all come from the model's distribution
//! renormalised over the allowed ids: a position whose allowed set holds one id is certain
//! (confidence 1). This is the reading of constrained decoding in llama.cpp's grammars and
//! vLLM's guided decoding, which mask the logits before sampling. A step that predicts a
//! constrained position needs its logits on the host ([`super::Decoding::needs_logits_at`]);
//! self-correction scores a constrained position under the narrowed row too.

use crate::error::{Error, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The allowed ids of each constrained position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Position → allowed ids, sorted and distinct, never empty.
    allowed: BTreeMap<usize, Vec<u32>>,
}

impl Constraints {
    /// No position constrained.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    /// The allowed ids of `pos` (sorted, distinct), if it is constrained.
    pub fn get(&self, pos: usize) -> Option<&[u32]> {
        self.allowed.get(&pos).map(Vec::as_slice)
    }

    /// The constrained positions and their allowed ids, by position.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[u32])> {
        self.allowed.iter().map(|(&p, a)| (p, a.as_slice()))
    }

    /// Whether `pos` may hold `token`: it is unconstrained or `token` is allowed there.
    pub fn admits(&self, pos: usize, token: u32) -> bool {
        self.get(pos)
            .is_none_or(|a| a.binary_search(&token).is_ok())
    }

    /// Whether any of `positions` is constrained.
    pub fn constrains_any(&self, positions: &[usize]) -> bool {
        !self.allowed.is_empty() && positions.iter().any(|p| self.allowed.contains_key(p))
    }

    /// The logits row a prediction at `pos` reads: `row` itself, or narrowed to the allowed
    /// ids ([`narrow_row`]) when `pos` is constrained.
    pub fn row_for<'a>(&self, pos: usize, row: &'a [f32]) -> Cow<'a, [f32]> {
        match self.get(pos) {
            Some(allowed) => Cow::Owned(narrow_row(row, allowed)),
            None => Cow::Borrowed(row),
        }
    }

    /// Restricts `pos` to `ids` (any order, repeats allowed), replacing an earlier constraint;
    /// an empty `ids` lifts it. `ids` must be candidates of the model: below `vocab_size` and
    /// not the `mask` token. Errors ([`Error::InvalidArgument`], nothing changed) name the
    /// position or the id.
    pub fn set(
        &mut self,
        pos: usize,
        ids: &[u32],
        canvas_len: usize,
        vocab_size: usize,
        mask: u32,
    ) -> Result<()> {
        check(pos, ids, canvas_len, vocab_size, mask)?;
        if ids.is_empty() {
            self.allowed.remove(&pos);
            return Ok(());
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        self.allowed.insert(pos, sorted);
        Ok(())
    }

    /// Checks every constraint against a canvas of `canvas_len` positions and a vocabulary
    /// (for constraints built before the session, as with [`super::Decoding`]).
    pub fn validate(&self, canvas_len: usize, vocab_size: usize, mask: u32) -> Result<()> {
        self.iter()
            .try_for_each(|(pos, ids)| check(pos, ids, canvas_len, vocab_size, mask))
    }
}

/// Checks a constraint of `pos` to `ids` ([`Constraints::set`]'s rules).
fn check(pos: usize, ids: &[u32], canvas_len: usize, vocab_size: usize, mask: u32) -> Result<()> {
    if pos >= canvas_len {
        return Err(Error::invalid(format!(
            "position {pos} is outside the canvas of {canvas_len} tokens"
        )));
    }
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id == mask || id as usize >= vocab_size)
    {
        return Err(Error::invalid(format!(
            "allowed[{i}] = {id} for position {pos} is {}",
            if id == mask {
                "the mask token, which is never generated".to_string()
            } else {
                format!("outside the vocabulary ({vocab_size} tokens)")
            }
        )));
    }
    Ok(())
}

/// `row` with every entry outside `allowed` (sorted) set to `-inf`. An allowed entry that is
/// `-inf` or NaN (a degenerate row: guidance can overflow) becomes the lowest finite value, so
/// an allowed id always outranks every other one and the prediction stays inside `allowed`.
pub fn narrow_row(row: &[f32], allowed: &[u32]) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; row.len()];
    for &id in allowed {
        if let Some(&l) = row.get(id as usize) {
            out[id as usize] = if l.is_nan() || l == f32::NEG_INFINITY {
                f32::MIN
            } else {
                l
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_sorts_dedups_replaces_and_lifts() {
        let mut c = Constraints::default();
        c.set(3, &[9, 4, 9, 5], 10, 16, 1).unwrap();
        assert_eq!(c.get(3), Some(&[4u32, 5, 9][..]));
        c.set(3, &[7], 10, 16, 1).unwrap();
        assert_eq!(c.get(3), Some(&[7u32][..]));
        assert!(!c.is_empty());
        c.set(3, &[], 10, 16, 1).unwrap();
        assert!(c.is_empty() && c.get(3).is_none());
    }

    #[test]
    fn bad_constraints_name_the_problem_and_change_nothing() {
        let mut c = Constraints::default();
        c.set(2, &[4], 10, 16, 1).unwrap();
        let before = c.clone();
        for (pos, ids, needle) in [
            (10, &[4u32][..], "position 10"),
            (2, &[4, 1], "mask"),
            (2, &[16], "outside the vocabulary"),
        ] {
            let e = c.set(pos, ids, 10, 16, 1).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert_eq!(c, before);
        }
        assert!(before.validate(3, 16, 1).is_ok());
        assert!(before.validate(2, 16, 1).is_err());
    }

    #[test]
    fn narrow_row_keeps_only_the_allowed_entries() {
        let row = [0.5f32, 2.0, -1.0, 3.0];
        let n = narrow_row(&row, &[0, 2]);
        assert_eq!(n, vec![0.5, f32::NEG_INFINITY, -1.0, f32::NEG_INFINITY]);
        let mut c = Constraints::default();
        c.set(1, &[7, 2], 4, 16, 0).unwrap();
        assert!(c.admits(0, 7) && c.admits(1, 7) && !c.admits(1, 3));
    }

    /// Allowed entries that are -inf or NaN (guidance overflowing) still win over every other
    /// id, greedy and sampled, whatever the remasking score.
    #[test]
    fn degenerate_allowed_entries_still_win() {
        use super::super::predict::{predict_row, PredictRule, Remasking};
        let row = [5.0f32, f32::NAN, f32::NEG_INFINITY, 9.0, f32::NEG_INFINITY];
        for (t, rm) in [
            (0.0, Remasking::LowConfidence),
            (0.0, Remasking::Entropy),
            (1.0, Remasking::Margin),
        ] {
            let rule = PredictRule {
                temperature: t,
                remasking: rm,
                seed: 3,
                step: 0,
                mask_token: 4,
                vocab_size: 5,
            };
            for seed_pos in 0..8 {
                let p = predict_row(&narrow_row(&row, &[1, 2]), seed_pos, &rule);
                assert!(p.token == 1 || p.token == 2, "{rm:?} T={t}: {}", p.token);
                assert!(!p.confidence.is_nan(), "{rm:?}: {}", p.confidence);
            }
        }
    }
}
