//! The canvas denoiser: schedule, commit rule and the [`Session`] that owns a canvas.

pub mod canvas;
pub mod commit;
pub mod predict;
pub mod rng;
pub mod schedule;
pub mod session;

pub use canvas::{generation_canvas, infill_canvas};
pub use predict::Remasking;
pub use schedule::transfer_counts;
pub use session::{GenerationParams, Session, StepInfo, StepPlan};
