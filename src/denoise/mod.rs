//! The canvas denoiser: schedule, commit rule and the [`Session`] that owns a canvas.

pub mod batch;
pub mod cached;
pub mod canvas;
pub mod commit;
pub mod constraint;
pub mod credit;
pub mod lockstep;
pub mod observe;
pub mod predict;
pub mod revise;
pub mod rng;
pub mod schedule;
pub mod session;

pub use crate::model::CacheMode;
pub use cached::CacheStats;
pub use canvas::{
    build_canvas, generation_canvas, infill_canvas, parse_canvas, BuiltCanvas, CanvasPart,
};
pub use constraint::Constraints;
pub use credit::CreditParams;
pub use lockstep::{run_lockstep, LockstepReport};
pub use observe::{BlockDone, StepEvent, StepReport};
pub use predict::{Remasking, SampleFilter};
pub use schedule::{transfer_counts, ScheduleKind};
pub use session::{CommitPolicy, Decoding, GenerationParams, Session, StepInfo, StepPlan};
