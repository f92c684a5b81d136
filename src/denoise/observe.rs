//! The per-step event of the denoising loop: what a step changed, handed to the observer of
//! [`Session::run_observed`](super::Session::run_observed) (progress displays, streaming).

use super::session::StepInfo;
use std::ops::Range;

/// A block whose positions all hold tokens that no later step of the session changes (unless the
/// caller locks or remasks them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDone {
    /// Index of the block in denoising order (as in [`Session::blocks`](super::Session::blocks)).
    pub block: usize,
    /// Canvas positions from the block's first to its last position (`first..last + 1`); fixed
    /// positions between its generated ones (a canvas with several gaps) lie inside it.
    pub span: Range<usize>,
}

/// What one step did, without the canvas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// Global index of the step (0-based); on a finished session, the total step count.
    pub step: usize,
    /// The block the step worked on (`None` when the session was already finished).
    pub block: Option<usize>,
    /// Positions committed by the step, increasing.
    pub committed: Vec<usize>,
    /// Positions the step sent back to the model (self-correction, `Decoding::revise`),
    /// increasing; disjoint from `committed`.
    pub remasked: Vec<usize>,
    /// Blocks that became final with this step, in denoising order. Blocks are reported once,
    /// in order, so the concatenation over all steps lists every block.
    pub completed: Vec<BlockDone>,
    /// Length of the canvas prefix that is final: every position before it holds a token no
    /// later step changes. Never decreases during a run (only `Session::remask` can lower it).
    pub final_prefix: usize,
    /// Masked positions left after the step.
    pub masks_left: usize,
    /// The session is finished.
    pub done: bool,
}

impl StepReport {
    /// The summary [`StepInfo`] of the step.
    pub fn info(&self) -> StepInfo {
        StepInfo {
            step: self.step,
            committed: self.committed.clone(),
            masks_left: self.masks_left,
            done: self.done,
        }
    }
}

/// A step as the observer sees it: its [`StepReport`] and the canvas after it.
#[derive(Debug, Clone, Copy)]
pub struct StepEvent<'a> {
    pub report: &'a StepReport,
    /// The whole canvas after the step (masked positions hold the mask token).
    pub canvas: &'a [u32],
}

impl std::ops::Deref for StepEvent<'_> {
    type Target = StepReport;
    fn deref(&self) -> &StepReport {
        self.report
    }
}
