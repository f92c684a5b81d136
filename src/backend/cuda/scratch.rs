//! Device scratch that kernels keep between launches: the workspace of in-kernel reductions
//! (split-K GEMMs, split-KV attention: fp32 partials plus per-unit arrival counters that the
//! kernels reset to zero after use, so both are zeroed once) and the sampler's partial records.
//!
//! Scratch only grows, and a buffer it replaces is kept alive until the owner is dropped: a CUDA
//! graph captured earlier still holds the old address (freeing it made such graphs read freed
//! memory). Growing is refused while the stream is capturing a graph: an allocation there would
//! be recorded into the graph (or fail the capture), so the caller's eager warm-up must have
//! sized the scratch already; the error makes the capture fall back to an eager step.

use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

/// Partials and counters of one kernel family.
pub struct ReductionScratch {
    pub ws: CudaSlice<f32>,
    pub counters: CudaSlice<u32>,
    retired_ws: Vec<CudaSlice<f32>>,
    retired_counters: Vec<CudaSlice<u32>>,
    /// Names the owner in allocation errors ("gemm", "attention").
    what: &'static str,
}

impl ReductionScratch {
    /// Zeroed buffers of `ws_floats` and `counters` elements (each at least 1).
    pub fn new(
        stream: &Arc<CudaStream>,
        ws_floats: usize,
        counters: usize,
        what: &'static str,
    ) -> Result<Self> {
        Ok(ReductionScratch {
            ws: zeroed(stream, ws_floats.max(1), what, "workspace")?,
            counters: zeroed(stream, counters.max(1), what, "counters")?,
            retired_ws: Vec::new(),
            retired_counters: Vec::new(),
            what,
        })
    }

    /// Grows to at least `ws_floats` workspace and `counters` counters (new buffers zeroed, in
    /// stream order; the old ones retired, not freed).
    pub fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        ws_floats: usize,
        counters: usize,
    ) -> Result<()> {
        let w = self.what;
        grow_retaining(
            stream,
            &mut self.ws,
            &mut self.retired_ws,
            ws_floats,
            w,
            "workspace",
        )?;
        grow_retaining(
            stream,
            &mut self.counters,
            &mut self.retired_counters,
            counters,
            w,
            "counters",
        )
    }
}

/// Replaces `buf` by a zeroed buffer of `n` elements when it holds fewer, keeping the old one in
/// `retired`. Refused (an error naming `what`'s `part`) while `stream` is capturing a graph.
pub fn grow_retaining<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<T>,
    retired: &mut Vec<CudaSlice<T>>,
    n: usize,
    what: &str,
    part: &str,
) -> Result<()> {
    if buf.len() >= n {
        return Ok(());
    }
    if super::stream_capturing(stream)? {
        return Err(Error::Backend(format!(
            "{what}: the {part} must grow from {} to {n} elements during a CUDA graph capture \
             (no eager warm-up sized it)",
            buf.len()
        )));
    }
    let new = zeroed(stream, n, what, part)?;
    retired.push(std::mem::replace(buf, new));
    Ok(())
}

/// A zeroed buffer of `n` elements.
pub fn zeroed<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    n: usize,
    what: &str,
    part: &str,
) -> Result<CudaSlice<T>> {
    stream
        .alloc_zeros::<T>(n)
        .map_err(|e| super::memory::alloc_err(&format!("{what}: alloc {part}"), e))
}
