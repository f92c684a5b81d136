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
//! Dream's schedule ([`ScheduleKind::Dream`], `diffusion_generate` of Dream's reference
//! `generation_utils.py`) has no blocks: the whole generated region is one block, and step `i`
//! of `s` commits [`dream_count`] of the masks still left (`n · (1 − t[i+1]/t[i])`, truncated,
//! over the timesteps [`dream_timesteps`]); the last step commits every mask left.
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

/// Which rule splits the masked positions over the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    /// LLaDA `generate()`: blocks of `block_len`, [`transfer_counts`] within each block.
    #[default]
    Llada,
    /// Dream `diffusion_generate`: one block over the whole generated region, [`dream_count`]
    /// per step; `block_len` is not used.
    Dream,
}

/// Dream's final timestep (`eps` of `diffusion_generate`).
pub const DREAM_EPS: f32 = 1e-3;

/// Point `i` of `torch.linspace(start, end, n)` in float32, by torch's formula: with
/// `step = (end − start) / (n − 1)`, `start + step·i` for `i < n/2`, else
/// `end − step·(n − 1 − i)`. `n ≥ 2`, `i < n`.
fn linspace_f32(start: f32, end: f32, n: usize, i: usize) -> f32 {
    let step = (end - start) / (n - 1) as f32;
    if i < n / 2 {
        start + step * i as f32
    } else {
        end - step * (n - 1 - i) as f32
    }
}

/// Dream's timesteps for `steps` steps: `linspace(1, DREAM_EPS, steps + 1)` in float32.
pub fn dream_timesteps(steps: usize) -> Vec<f32> {
    (0..=steps)
        .map(|i| linspace_f32(1.0, DREAM_EPS, steps + 1, i))
        .collect()
}

/// Tokens Dream commits at step `step` of `steps` when `n_mask` masks are left:
/// `int(n_mask · (1 − s/t))` in float32 with `t = timesteps[step]`, `s = timesteps[step + 1]`;
/// the last step (and any step past it) takes all `n_mask`.
pub fn dream_count(n_mask: usize, step: usize, steps: usize) -> usize {
    if step + 1 >= steps {
        return n_mask;
    }
    let t = linspace_f32(1.0, DREAM_EPS, steps + 1, step);
    let s = linspace_f32(1.0, DREAM_EPS, steps + 1, step + 1);
    // Truncation toward zero, as Python's int(); the product is ≥ 0 and ≤ n_mask.
    ((n_mask as f32 * (1.0 - s / t)) as usize).min(n_mask)
}

/// Number of blocks `n_masked` masked positions form with blocks of `block_len`
/// (`ceil(n_masked / block_len)`; `block_len` must be positive).
pub fn num_blocks(n_masked: usize, block_len: usize) -> usize {
    n_masked.div_ceil(block_len)
}

/// Most steps one generation may plan (2²⁰: every step is a forward pass, so this is far beyond
/// any useful schedule; the per-block step counts are materialised, so `steps` must stay small
/// enough to allocate).
pub const MAX_STEPS: usize = 1 << 20;

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
    /// Errors (all [`Error::InvalidArgument`]): `block_len == 0`; `steps >` [`MAX_STEPS`];
    /// `steps == 0` while masks are present; `steps` not a multiple of the number of blocks (the
    /// message lists valid values). With no masks the schedule is empty and any `steps` up to
    /// [`MAX_STEPS`] is accepted.
    pub fn new(n_masked: usize, block_len: usize, steps: usize) -> Result<Schedule> {
        if block_len == 0 {
            return Err(Error::invalid("block_len must be positive"));
        }
        // Checked with no masks too: `Session::remask` later schedules its new block with these
        // steps, and a huge count there once asked for a 16 GiB allocation (an abort).
        if steps > MAX_STEPS {
            return Err(Error::invalid(format!(
                "steps {steps} exceeds the most supported, {MAX_STEPS} (every step is a forward pass)"
            )));
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
        if !steps.is_multiple_of(blocks) {
            let lower = steps / blocks * blocks;
            let nearest = if lower == 0 {
                format!("{}", blocks)
            } else {
                format!("{lower} or {}", lower.saturating_add(blocks))
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

    /// Plans `steps` steps over `n_masked` masked positions under `kind`: [`Schedule::new`] for
    /// LLaDA; for Dream one block holding every masked position (`block_len` unused).
    ///
    /// Errors ([`Error::InvalidArgument`]): see [`Schedule::new`]; for Dream, `steps == 0`
    /// while masks are present.
    pub fn for_kind(
        kind: ScheduleKind,
        n_masked: usize,
        block_len: usize,
        steps: usize,
    ) -> Result<Schedule> {
        match kind {
            ScheduleKind::Llada => Schedule::new(n_masked, block_len, steps),
            ScheduleKind::Dream => {
                if n_masked > 0 && steps == 0 {
                    return Err(Error::invalid(format!(
                        "steps must be positive to fill {n_masked} masked positions \
                         (Dream schedule)"
                    )));
                }
                Schedule::new(n_masked, n_masked.max(1), steps)
            }
        }
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
        let start = b.saturating_mul(self.block_len).min(self.n_masked);
        start..start.saturating_add(self.block_len).min(self.n_masked)
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
    fn huge_step_counts_and_block_lengths_are_refused_or_handled_without_overflow() {
        // usize::MAX steps once overflowed the error message's arithmetic, and 2^40 would have
        // allocated a per-step count table the size of the address space.
        for steps in [MAX_STEPS + 1, 1 << 40, usize::MAX] {
            for kind in [ScheduleKind::Llada, ScheduleKind::Dream] {
                let e = Schedule::for_kind(kind, 10, 4, steps)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("exceeds the most supported"), "{e}");
            }
        }
        // Also with no masks (a session that remasks later schedules its new block with them).
        let e = Schedule::new(0, 8, 1 << 31).unwrap_err().to_string();
        assert!(e.contains("exceeds the most supported"), "{e}");
        assert!(Schedule::new(0, 8, 0).is_ok());
        // The largest step count itself is fine (one block here).
        assert_eq!(
            Schedule::new(5, 8, MAX_STEPS).unwrap().steps_per_block(),
            MAX_STEPS
        );
        // A block length of usize::MAX: one block holding every mask.
        let s = Schedule::new(7, usize::MAX, 7).unwrap();
        assert_eq!((s.num_blocks(), s.block_range(0)), (1, 0..7));
        assert_eq!(s.block_range(1), 7..7);
    }

    #[test]
    fn dream_timesteps_match_linspace() {
        let t = dream_timesteps(4);
        // linspace(1, 0.001, 5): step −0.24975.
        let want = [1.0, 0.75025, 0.5005, 0.25075, 0.001];
        assert_eq!(t.len(), 5);
        for (a, b) in t.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{t:?}");
        }
        assert_eq!((t[0], t[4]), (1.0, DREAM_EPS));
        assert!(dream_timesteps(7).windows(2).all(|w| w[0] > w[1]));
    }

    /// Runs Dream's rule to the end: the counts of each step, masks left updated as it goes.
    fn dream_run(n: usize, steps: usize) -> Vec<usize> {
        let mut left = n;
        (0..steps)
            .map(|i| {
                let k = dream_count(left, i, steps);
                left -= k;
                k
            })
            .collect()
    }

    #[test]
    fn dream_counts_hand_case() {
        // n = 10, 4 steps, t = [1, .75025, .5005, .25075, .001]:
        // 10·(1 − .75025) = 2.4975 → 2; 8·(1 − .5005/.75025) = 2.663 → 2;
        // 6·(1 − .25075/.5005) = 2.994 → 2; last step: the 4 left.
        assert_eq!(dream_run(10, 4), vec![2, 2, 2, 4]);
        // n = 256, 8 steps (float64 by hand, no product near an integer): 256·.124875 =
        // 31.97 → 31; then 225, 193, 161, 129, 97, 65 left give 32.11, 32.12, 32.15, 32.19,
        // 32.25, 32.37 → 32 each; the last step takes the 33 left.
        assert_eq!(dream_run(256, 8), vec![31, 32, 32, 32, 32, 32, 32, 33]);
        assert_eq!(dream_count(7, 0, 1), 7);
        assert_eq!(dream_count(0, 0, 4), 0);
    }

    #[test]
    fn dream_counts_sum_to_the_masks() {
        for n in 0..70 {
            for steps in 1..20 {
                let c = dream_run(n, steps);
                assert_eq!(c.iter().sum::<usize>(), n, "n={n} steps={steps} {c:?}");
            }
        }
    }

    #[test]
    fn dream_schedule_is_one_block() {
        let s = Schedule::for_kind(ScheduleKind::Dream, 70, 32, 7).unwrap();
        assert_eq!((s.num_blocks(), s.total_steps()), (1, 7));
        assert_eq!(s.block_range(0), 0..70);
        // LLaDA rejects 7 steps over 3 blocks; Dream takes any positive count.
        assert!(Schedule::for_kind(ScheduleKind::Llada, 70, 32, 7).is_err());
        let e = Schedule::for_kind(ScheduleKind::Dream, 5, 32, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps") && e.contains("Dream"), "{e}");
        assert_eq!(
            Schedule::for_kind(ScheduleKind::Dream, 0, 32, 0)
                .unwrap()
                .total_steps(),
            0
        );
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
