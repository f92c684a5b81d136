//! What a session's most recent step changed, as the C ABI reports it: the positions it filled
//! (`dllm_session_last_commits`) and the positions it sent back to the model
//! (`dllm_session_last_remasks`), both taken as the canvas diff across the step, so they hold
//! whatever path took the step (alone, in a batch, through `run`).

use crate::denoise::Session;

/// The canvas changes of a session's most recent step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct LastStep {
    /// `(position, token)` of every position the step filled, increasing.
    pub filled: Vec<(usize, i32)>,
    /// Positions the step turned back into masks (self-correction), increasing.
    pub remasked: Vec<usize>,
}

/// A session as it stood before a step: what the step's changes are measured against.
pub(super) struct BeforeStep {
    /// [`Session::steps_taken`]: every step taken moves it, a finished session's no-op does not.
    cursor: usize,
    canvas: Vec<u32>,
}

impl BeforeStep {
    pub fn of(session: &Session) -> Self {
        Self {
            cursor: session.steps_taken(),
            canvas: session.canvas().to_vec(),
        }
    }

    /// Whether `session` has taken a step since this snapshot.
    pub fn stepped(&self, session: &Session) -> bool {
        session.steps_taken() != self.cursor
    }

    /// Sets `last` to what changed between this snapshot and `session` now: a position that
    /// holds the mask token now was re-masked, any other changed position was filled.
    pub fn record(&self, session: &Session, last: &mut LastStep) {
        let mask = session.model().config().mask_token_id;
        last.filled.clear();
        last.remasked.clear();
        for (p, (&old, &new)) in self.canvas.iter().zip(session.canvas()).enumerate() {
            if old == new {
                continue;
            }
            if new == mask {
                last.remasked.push(p);
            } else {
                // Ids are below the embedding size, which Session::new checked fits an i32.
                last.filled.push((p, new as i32));
            }
        }
    }
}

/// Records the step of every session of `sessions` that took one since `before` (one snapshot
/// per session, same order) into its entry of `last`; the others keep their record. Called
/// after a batched round whether it succeeded or not: on a failure, the sessions that stepped
/// on their own before it keep their step, and their record describes it.
pub(super) fn record_stepped(
    before: &[BeforeStep],
    sessions: &[&mut Session],
    last: &mut [&mut LastStep],
) {
    for ((b, s), l) in before.iter().zip(sessions).zip(last.iter_mut()) {
        if b.stepped(s) {
            b.record(s, l);
        }
    }
}
