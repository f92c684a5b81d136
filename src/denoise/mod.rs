//! The canvas denoiser: schedule, commit rule and the [`Session`] that owns a canvas.

pub mod predict;
pub mod rng;
