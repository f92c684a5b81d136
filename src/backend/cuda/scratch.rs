//! The workspace of in-kernel reductions (split-K GEMMs, split-KV attention): fp32 partials plus
//! per-unit arrival counters that the kernels reset to zero after use, so both are zeroed once.
//! It only grows, and a buffer it replaces is kept alive until the owner is dropped: a CUDA graph
//! captured earlier still holds the old addresses (freeing them made such graphs read freed
//! memory).

use super::cuda_err;
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

/// Partials and counters of one kernel family.
pub struct ReductionScratch {
    pub ws: CudaSlice<f32>,
    pub counters: CudaSlice<u32>,
    retired: Vec<(CudaSlice<f32>, CudaSlice<u32>)>,
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
            retired: Vec::new(),
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
        if self.ws.len() >= ws_floats && self.counters.len() >= counters {
            return Ok(());
        }
        let ws = zeroed(stream, ws_floats.max(self.ws.len()), self.what, "workspace")?;
        let ctr = zeroed(
            stream,
            counters.max(self.counters.len()),
            self.what,
            "counters",
        )?;
        let old_ws = std::mem::replace(&mut self.ws, ws);
        let old_ctr = std::mem::replace(&mut self.counters, ctr);
        self.retired.push((old_ws, old_ctr));
        Ok(())
    }
}

fn zeroed<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    n: usize,
    what: &str,
    part: &str,
) -> Result<CudaSlice<T>> {
    stream
        .alloc_zeros::<T>(n)
        .map_err(|e| cuda_err(&format!("{what}: alloc reduction {part}"), e))
}
