//! The denoising schedule as pure functions: how masked positions group into blocks and how
//! many tokens each step commits.
//!
//! Semantics follow LLaDA's reference `generate()`:
//! - the masked positions of a canvas, in position order, are chunked into blocks of
//!   `block_len` (the last block may be shorter); blocks are denoised one after the other;
//! - `steps` is split evenly over the blocks and must be a multiple of their number;
//! - within a block holding `n` masks at its start, step `i` of `s` commits
//!   [`transfer_counts`]`(n, s)[i]` tokens (`get_num_transfer_tokens`).
//!
//! Nothing here touches a model or a canvas; [`super::session::Session`] drives it.

use crate::error::{Error, Result};
use std::ops::Range;

/// Tokens committed at each of `steps` steps when `n` masks are to be filled: `n / steps`,
/// plus one on the first `n % steps` steps (LLaDA's `get_num_transfer_tokens`).
///
/// Steps beyond `n` get 0. `steps == 0` gives an empty schedule.
pub fn transfer_counts(n: usize, steps: usize) -> Vec<usize> {
    if steps == 0 {
        return Vec::new();
    }
    let (base, rem) = (n / steps, n % steps);
    (0..steps).map(|i| base + usize::from(i < rem)).collect()
}

/// Number of blocks `n_masked` masked positions form with blocks of `block_len`
/// (`ceil(n_masked / block_len)`; `block_len` must be positive).
pub fn num_blocks(n_masked: usize, block_len: usize) -> usize {
    n_masked.div_ceil(block_len)
}

/// The validated plan of a generation: block count and steps per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    n_masked: usize,
    block_len: usize,
    steps_per_block: usize,
}

impl Schedule {
    /// Plans `steps` denoising steps over `n_masked` masked positions in blocks of `block_len`.
    ///
    /// Errors (all [`Error::InvalidArgument`]): `block_len == 0`; `steps == 0` while masks are
    /// present; `steps` not a multiple of the number of blocks (the message lists valid values).
    /// With no masks the schedule is empty and any `steps` is accepted.
    pub fn new(n_masked: usize, block_len: usize, steps: usize) -> Result<Schedule> {
        if block_len == 0 {
            return Err(Error::invalid("block_len must be positive"));
        }
        let blocks = num_blocks(n_masked, block_len);
        if blocks == 0 {
            return Ok(Schedule {
                n_masked,
                block_len,
                steps_per_block: 0,
            });
        }
        if steps == 0 {
            return Err(Error::invalid(format!(
                "steps must be positive to fill {n_masked} masked positions \
                 ({blocks} block(s) of block_len {block_len}): use a multiple of {blocks}"
            )));
        }
        if steps % blocks != 0 {
            let lower = steps / blocks * blocks;
            let nearest = if lower == 0 {
                format!("{}", blocks)
            } else {
                format!("{lower} or {}", lower + blocks)
            };
            return Err(Error::invalid(format!(
                "steps {steps} is not a multiple of the {blocks} blocks \
                 ({n_masked} masked positions / block_len {block_len}): use {}, {}, {}, {}, … \
                 (nearest: {nearest})",
                blocks,
                2 * blocks,
                3 * blocks,
                4 * blocks
            )));
        }
        Ok(Schedule {
            n_masked,
            block_len,
            steps_per_block: steps / blocks,
        })
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        num_blocks(self.n_masked, self.block_len)
    }

    /// Steps spent on each block.
    pub fn steps_per_block(&self) -> usize {
        self.steps_per_block
    }

    /// Total number of steps (`num_blocks × steps_per_block`; 0 when nothing is masked).
    pub fn total_steps(&self) -> usize {
        self.num_blocks() * self.steps_per_block
    }

    /// Masked positions the schedule was planned for.
    pub fn n_masked(&self) -> usize {
        self.n_masked
    }

    /// Block length.
    pub fn block_len(&self) -> usize {
        self.block_len
    }

    /// Indices (into the list of masked positions) covered by block `b`.
    pub fn block_range(&self, b: usize) -> Range<usize> {
        let start = (b * self.block_len).min(self.n_masked);
        start..(start + self.block_len).min(self.n_masked)
    }

    /// `(block, step within the block)` of global step `step`; `None` past the end.
    pub fn locate(&self, step: usize) -> Option<(usize, usize)> {
        (step < self.total_steps())
            .then(|| (step / self.steps_per_block, step % self.steps_per_block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_counts_hand_cases() {
        assert_eq!(transfer_counts(32, 4), vec![8, 8, 8, 8]);
        assert_eq!(transfer_counts(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(transfer_counts(3, 5), vec![1, 1, 1, 0, 0]);
        assert_eq!(transfer_counts(0, 2), vec![0, 0]);
        assert_eq!(transfer_counts(7, 1), vec![7]);
        assert!(transfer_counts(5, 0).is_empty());
    }

    #[test]
    fn transfer_counts_sum_and_shape() {
        for n in 0..40 {
            for s in 1..12 {
                let c = transfer_counts(n, s);
                assert_eq!(c.len(), s);
                assert_eq!(c.iter().sum::<usize>(), n, "n={n} s={s}");
                assert!(
                    c.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1),
                    "{c:?}"
                );
            }
        }
    }

    #[test]
    fn blocks_and_steps() {
        let s = Schedule::new(96, 32, 12).unwrap();
        assert_eq!(
            (s.num_blocks(), s.steps_per_block(), s.total_steps()),
            (3, 4, 12)
        );
        assert_eq!(s.block_range(2), 64..96);
        assert_eq!(s.locate(5), Some((1, 1)));
        assert_eq!(s.locate(12), None);
        // Shorter last block: 70 masks / 32 = 3 blocks, the last holding 6.
        let s = Schedule::new(70, 32, 3).unwrap();
        assert_eq!(s.block_range(2), 64..70);
        // 6 masks with block_len 32 are one block.
        assert_eq!(Schedule::new(6, 32, 128).unwrap().num_blocks(), 1);
    }

    #[test]
    fn bad_schedules_are_explained() {
        let e = Schedule::new(96, 32, 10).unwrap_err().to_string();
        assert!(
            e.contains("steps 10") && e.contains("3 blocks") && e.contains("3, 6, 9, 12"),
            "{e}"
        );
        assert!(e.contains("9 or 12"), "{e}");
        let e = Schedule::new(96, 32, 2).unwrap_err().to_string();
        assert!(e.contains("nearest: 3"), "{e}");
        assert!(Schedule::new(96, 0, 12)
            .unwrap_err()
            .to_string()
            .contains("block_len"));
        assert!(Schedule::new(5, 32, 0)
            .unwrap_err()
            .to_string()
            .contains("steps"));
        // No masks: nothing to schedule, steps irrelevant.
        assert_eq!(Schedule::new(0, 32, 0).unwrap().total_steps(), 0);
    }
}
