//! Two sessions of one request on two models (the CUDA backend and the CPU reference, say)
//! stepped in lockstep, with the leader's predictions applied to both ("teacher forcing").
//!
//! Comparing two free-running generations says little once they part: a single near-tie (two
//! candidates a rounding apart) sends the follower down another, equally valid trajectory, and
//! every later token differs with no error anywhere. That is worse with a K/V cache, whose
//! stale entries carry each step's choices into the next. Here both sessions see the same canvas
//! at every step, each through its own model (and its own cache, refreshed and spanned on the
//! same canvases), so every step is an independent comparison: a near-tie shows as one
//! disagreement between two almost equally confident candidates, a wrong result as many
//! disagreements or as disagreements far from a tie.

use super::predict::Prediction;
use super::session::{Session, StepPlan};
use crate::error::{Error, Result};

/// A position where the follower's candidate token differs from the leader's.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenMismatch {
    pub step: usize,
    pub position: usize,
    pub leader: Prediction,
    pub follower: Prediction,
}

impl TokenMismatch {
    /// How far the two were from a tie: each side's confidence in its own token. On two nearly
    /// equal distributions an argmax flips only between nearly equal candidates, so the two
    /// confidences are then close; a wrong result has no reason to keep them close.
    pub fn gap(&self) -> f64 {
        (self.leader.confidence - self.follower.confidence).abs()
    }
}

/// A step where the follower's commit rule would take other positions than the leader's.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitMismatch {
    pub step: usize,
    /// Positions the leader commits (sorted).
    pub leader: Vec<usize>,
    /// Positions the follower's own predictions would commit (sorted).
    pub follower: Vec<usize>,
    /// In the leader's confidences: the least confidence it commits minus the largest confidence
    /// of a position only the follower commits (0 when the follower adds none); small for a
    /// near-tie at the boundary of the commit rule.
    pub gap: f64,
}

/// What a lockstep run found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LockstepReport {
    /// Steps that ran a forward (compared).
    pub steps: usize,
    /// Predictions compared (one per queried position per step).
    pub predictions: usize,
    pub tokens: Vec<TokenMismatch>,
    pub commits: Vec<CommitMismatch>,
    /// Relative L2 distance of the follower's confidences from the leader's, over the
    /// predictions whose tokens agree.
    pub confidence_rel_l2: f64,
    /// The final canvas (the leader's generation, which both sessions hold).
    pub canvas: Vec<u32>,
}

impl LockstepReport {
    /// Fraction of predictions whose tokens agree (1 when nothing was compared).
    pub fn token_agreement(&self) -> f64 {
        if self.predictions == 0 {
            return 1.0;
        }
        1.0 - self.tokens.len() as f64 / self.predictions as f64
    }

    /// The largest [`TokenMismatch::gap`] (0 when there is none).
    pub fn widest_token_gap(&self) -> f64 {
        self.tokens
            .iter()
            .map(TokenMismatch::gap)
            .fold(0.0, f64::max)
    }

    /// The largest [`CommitMismatch::gap`] (0 when there is none).
    pub fn widest_commit_gap(&self) -> f64 {
        self.commits.iter().map(|c| c.gap).fold(0.0, f64::max)
    }
}

/// Runs `leader` and `follower` to completion in lockstep: each step plans both (the plans must
/// agree), predicts on each, records where the follower differs, then applies the leader's
/// predictions to both. The two sessions must start from the same canvas with the same
/// generation parameters and decoding options (checked first, before anything runs).
///
/// Errors: sessions that differ at the start or whose plans part ([`Error::State`]), and any
/// error of a step (both sessions are then left at the start of that step's apply).
pub fn run_lockstep(leader: &mut Session, follower: &mut Session) -> Result<LockstepReport> {
    check_same_start(leader, follower)?;
    let mut report = LockstepReport::default();
    let (mut diff2, mut norm2) = (0.0f64, 0.0f64);
    while let Some(plan) = leader.plan() {
        let Some(fplan) = follower.plan() else {
            return Err(Error::State(format!(
                "lockstep: the follower finished before the leader's step {}",
                plan.step
            )));
        };
        check_same_plan(&plan, &fplan)?;
        let (lp, probs) = leader.predict_step(&plan)?;
        let (fp, _) = follower.predict_step(&fplan)?;
        if fp.len() != lp.len() {
            return Err(Error::Backend(format!(
                "lockstep step {}: the follower gave {} predictions, the leader {}",
                plan.step,
                fp.len(),
                lp.len()
            )));
        }
        if !lp.is_empty() {
            report.steps += 1;
        }
        report.predictions += lp.len();
        for ((&position, l), f) in plan.queries.iter().zip(&lp).zip(&fp) {
            if l.token == f.token {
                diff2 += (f.confidence - l.confidence).powi(2);
                norm2 += l.confidence.powi(2);
            } else {
                report.tokens.push(TokenMismatch {
                    step: plan.step,
                    position,
                    leader: *l,
                    follower: *f,
                });
            }
        }
        if let Some(m) = commit_mismatch(leader, &plan, &lp, &fp) {
            report.commits.push(m);
        }
        leader.apply_scored(&plan, &lp, &probs)?;
        follower.apply_scored(&fplan, &lp, &probs)?;
    }
    if !follower.is_done() || follower.canvas() != leader.canvas() {
        return Err(Error::State(
            "lockstep: the follower's canvas left the leader's".into(),
        ));
    }
    report.confidence_rel_l2 = if norm2 > 0.0 {
        (diff2 / norm2).sqrt()
    } else {
        0.0
    };
    report.canvas = leader.canvas().to_vec();
    Ok(report)
}

fn check_same_start(a: &Session, b: &Session) -> Result<()> {
    let what = if a.canvas() != b.canvas() {
        "canvases"
    } else if a.params() != b.params() {
        "generation parameters"
    } else if a.decoding() != b.decoding() {
        "decoding options"
    } else if a.steps_taken() != b.steps_taken() {
        "steps taken"
    } else {
        return Ok(());
    };
    Err(Error::State(format!(
        "lockstep: the two sessions start with different {what}"
    )))
}

fn check_same_plan(a: &StepPlan, b: &StepPlan) -> Result<()> {
    if a == b {
        return Ok(());
    }
    Err(Error::State(format!(
        "lockstep step {}: the sessions plan different steps (block {} vs {}, {} vs {} queries, \
         k {} vs {})",
        a.step,
        a.block,
        b.block,
        a.queries.len(),
        b.queries.len(),
        a.k,
        b.k
    )))
}

/// The commit-rule disagreement of one step, if the follower's predictions commit other
/// positions than the leader's.
fn commit_mismatch(
    session: &Session,
    plan: &StepPlan,
    leader: &[Prediction],
    follower: &[Prediction],
) -> Option<CommitMismatch> {
    let positions = |chosen: &[usize]| {
        let mut p: Vec<usize> = chosen.iter().map(|&i| plan.queries[i]).collect();
        p.sort_unstable();
        p
    };
    let lc = session.chosen(plan, leader);
    let fc = session.chosen(plan, follower);
    let (lpos, fpos) = (positions(&lc), positions(&fc));
    if lpos == fpos {
        return None;
    }
    let least_committed = lc
        .iter()
        .map(|&i| leader[i].confidence)
        .fold(f64::INFINITY, f64::min);
    let best_extra = fc
        .iter()
        .filter(|i| !lc.contains(i))
        .map(|&i| leader[i].confidence)
        .fold(f64::NEG_INFINITY, f64::max);
    let gap = if best_extra.is_finite() && least_committed.is_finite() {
        (least_committed - best_extra).max(0.0)
    } else {
        0.0
    };
    Some(CommitMismatch {
        step: plan.step,
        leader: lpos,
        follower: fpos,
        gap,
    })
}
