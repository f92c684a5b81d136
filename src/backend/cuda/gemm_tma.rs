//! Host pieces of `cuda/gemm_tma.cu`, the Hopper GEMM for `M > 64` fed by the tensor-memory
//! accelerator with the weight tile multicast to a cluster of two blocks: loading the kernels,
//! the tensor maps (TMA descriptors) of its operands, and its shared-memory size.
//! [`super::gemm::Gemm::run`] uses it in place of `gemm_wgmma` wherever `gemm_wgmma`'s plan has
//! an even number of M tiles (same tiles and split-K, M tiles in pairs: [`WgmmaPlan`]); on by
//! default since its H200 verification, off with `DLLM_GEMM_TMA=0`. Its quad form
//! `gemm_tma4_wg{2,3}` (clusters of 2 × 2 blocks that also share the A tile along N) is opt-in
//! with `DLLM_GEMM_TMA4=1` until a GPU run has checked and timed it. Design notes:
//! docs/gemm-notes.md ("tma").
//!
//! [`WgmmaPlan`]: super::gemm::WgmmaPlan

use super::{cuda_err, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::sys;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::CudaFunction;

/// K elements per TMA box / pipeline stage (128 bytes of bf16: one swizzle row); `TMA_BK`.
pub const TMA_BK: usize = 64;
/// Weight rows per block tile (`TMA_BN`); each block of a pair loads half of them.
pub const TMA_BN: usize = 192;

/// Whether the TMA kernel is wanted: on unless `DLLM_GEMM_TMA=0` (verified on an H200 on
/// 2026-11-27: every GEMM and model check, compute-sanitizer memcheck and racecheck clean, the 8B
/// benches' canvases identical to `gemm_wgmma`'s, 5–19 % faster where its pairs fit).
pub fn requested_by_env() -> bool {
    super::env_switch::flag("DLLM_GEMM_TMA", true)
}

/// Whether `DLLM_GEMM_TMA=1` asks for the TMA kernel explicitly (a device that cannot run it is
/// then reported as a failure rather than silently skipped).
pub fn explicitly_requested() -> bool {
    super::env_switch::explicitly_on("DLLM_GEMM_TMA")
}

/// Whether the quad kernels are wanted: only with `DLLM_GEMM_TMA4=1` (session 6; the protocol is
/// modelled in `pipeline_model`). Every check passes on an H200 (session 9), where they were
/// 1.2-1.7x slower than the pairs on every wide shape: kept for study, not for use.
pub fn quads_requested_by_env() -> bool {
    super::env_switch::flag("DLLM_GEMM_TMA4", false)
}

/// Threads of `gemm_tma_wg{wg}`: `wg` consumer warpgroups and one producer warp.
pub fn threads(wg: usize) -> u32 {
    (128 * wg + 32) as u32
}

/// Dynamic shared memory of `gemm_tma_wg{wg}` (`TmaCfg<WG>::SMEM_BYTES`): the ring of
/// [A tile 64·wg × 128 B | W tile 192 × 128 B] stages, plus 1 KB to align it to 1024 bytes.
pub fn smem_bytes(wg: usize) -> u32 {
    let stage = (64 * wg + TMA_BN) * 128;
    let stages = if wg == 2 { 5 } else { 4 };
    (stages * stage + 1024) as u32
}

/// Loads `{prefix}_wg2` / `{prefix}_wg3` (`gemm_tma`: pairs, `gemm_tma4`: quads; the same shared
/// memory) from the sm_90a cubin; the reason as text when this device cannot run them.
pub fn load(dev: &CudaDevice, prefix: &str) -> std::result::Result<[CudaFunction; 2], String> {
    if !dev.runs_sm90a() {
        return Err(format!(
            "the TMA kernel needs the sm_90a cubin (compute capability 9.0, Hopper build); this is {}",
            dev.describe()
        ));
    }
    let load = |wg: usize| -> Result<CudaFunction> {
        let name = format!("{prefix}_wg{wg}");
        let f = dev.function("gemm_tma", &name)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem_bytes(wg) as i32,
        )
        .map_err(|e| cuda_err(&format!("{name}: allow dynamic shared memory"), e))?;
        Ok(f)
    };
    match (load(2), load(3)) {
        (Ok(a), Ok(b)) => Ok([a, b]),
        (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
    }
}

/// Clusters of `func` (a kernel with its cluster shape `cluster` compiled in) that the device
/// holds at once with `threads` threads and `smem` bytes of dynamic shared memory per block
/// (`cuOccupancyMaxActiveClusters`); `None` when the driver does not say. Clusters must fit in
/// one GPC, so this can be less than the SM count over the cluster size.
pub fn resident_clusters(
    dev: &CudaDevice,
    func: &CudaFunction,
    (threads, smem): (u32, u32),
    cluster: (u32, u32, u32),
) -> Option<usize> {
    dev.stream.context().bind_to_thread().ok()?;
    let config = sys::CUlaunchConfig {
        gridDimX: cluster.0,
        gridDimY: cluster.1,
        gridDimZ: cluster.2,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: dev.stream.cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: `config` and `n` live across the call; the function handle is a loaded kernel of
    // this context (bound above). The query launches nothing.
    unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, func.cu_function(), &config) }
        .result()
        .ok()?;
    (n > 0).then_some(n as usize)
}

/// Whether running a paired plan of `pair_blocks` blocks as quads (`quad_blocks`, the N tile
/// count rounded up to even) keeps it within as many waves of resident clusters as the pairs
/// take (`pair_clusters` / `quad_clusters` resident at once; unknown counts do not object).
pub fn quads_keep_waves(
    pair_blocks: usize,
    quad_blocks: usize,
    pair_clusters: Option<usize>,
    quad_clusters: Option<usize>,
) -> bool {
    match (pair_clusters, quad_clusters) {
        (Some(p), Some(q)) => {
            (quad_blocks / 4).div_ceil(q.max(1)) <= (pair_blocks / 2).div_ceil(p.max(1))
        }
        _ => true,
    }
}

/// The geometry of one operand's tensor map: a row-major bf16 matrix of `rows × k` at device
/// address `addr`, read in boxes of `box_rows` rows × [`TMA_BK`] K elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperandBox {
    pub addr: u64,
    pub rows: usize,
    pub k: usize,
    pub box_rows: usize,
}

impl OperandBox {
    /// Checks what `cuTensorMapEncodeTiled` requires of this use, so a bad call is an error
    /// naming the field rather than a driver code: 16-byte aligned address and row stride, at
    /// most 2³² rows / K elements, a box of 1..=256 rows.
    pub fn validate(&self) -> Result<()> {
        if !self.addr.is_multiple_of(16) {
            return Err(Error::invalid(format!(
                "gemm tma: operand address {:#x} is not 16-byte aligned",
                self.addr
            )));
        }
        if self.k == 0 || self.rows == 0 || !(self.k * 2).is_multiple_of(16) {
            return Err(Error::invalid(format!(
                "gemm tma: operand of {} rows × {} K needs k % 8 == 0 and both ≥ 1",
                self.rows, self.k
            )));
        }
        if self.rows > u32::MAX as usize || self.k > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "gemm tma: operand of {} rows × {} K exceeds the tensor-map limits",
                self.rows, self.k
            )));
        }
        if self.box_rows == 0 || self.box_rows > 256 {
            return Err(Error::invalid(format!(
                "gemm tma: box of {} rows (1..=256)",
                self.box_rows
            )));
        }
        Ok(())
    }

    /// The tensor map: dimensions (K, rows), row stride k·2 bytes, box (64, box_rows), 128-byte
    /// swizzle (the layout the wgmma descriptors read), zero fill outside the matrix, L2
    /// promotion of 256 bytes.
    pub fn encode(&self) -> Result<sys::CUtensorMap> {
        self.validate()?;
        let dims: [sys::cuuint64_t; 2] = [self.k as u64, self.rows as u64];
        let strides: [sys::cuuint64_t; 1] = [(self.k * 2) as u64];
        let boxes: [sys::cuuint32_t; 2] = [TMA_BK as u32, self.box_rows as u32];
        let elem: [sys::cuuint32_t; 2] = [1, 1];
        // SAFETY: CUtensorMap is plain bytes (an opaque array); all-zero is a valid value to
        // be overwritten by the encoder.
        let mut map: sys::CUtensorMap = unsafe { std::mem::zeroed() };
        // SAFETY: every pointer is to a live local array of the rank the call states (2, with
        // rank − 1 strides); the encoder only writes `map`. It runs on the host, no context needed.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                2,
                self.addr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        }
        .result()
        .map_err(|e| cuda_err(&format!("encode the tensor map of {self:?}"), e))?;
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernel_and_fits() {
        assert_eq!(smem_bytes(2), 5 * (128 + 192) * 128 + 1024);
        assert_eq!(smem_bytes(3), 4 * (192 + 192) * 128 + 1024);
        for wg in [2, 3] {
            // 227 KB opt-in per block on sm_90, minus the static barriers.
            assert!(smem_bytes(wg) <= 232_448 - 1024);
        }
        assert_eq!((threads(2), threads(3)), (288, 416));
    }

    #[test]
    fn quads_only_where_their_clusters_fit_as_many_waves() {
        // M = 384 QKV: 128 blocks = 64 pairs or 32 quads. With 66 pairs and 33 quads resident
        // (132 SMs in whole GPCs) both take one wave; if GPCs of 18 SMs held only 4 quads
        // each (say 30 quads), the quads would need two.
        assert!(quads_keep_waves(128, 128, Some(66), Some(33)));
        assert!(!quads_keep_waves(128, 128, Some(66), Some(30)));
        // A phantom N tile: 2 × 659 → 2 × 660 tiles, 659 pairs vs 330 quads.
        assert!(quads_keep_waves(1318, 1320, Some(66), Some(33)));
        assert!(quads_keep_waves(128, 128, None, Some(1)));
    }

    #[test]
    fn operand_boxes_are_validated_before_the_driver_sees_them() {
        let ok = OperandBox {
            addr: 0x1000,
            rows: 384,
            k: 4096,
            box_rows: 192,
        };
        assert!(ok.validate().is_ok());
        let bad = [
            OperandBox { addr: 0x1008, ..ok },
            OperandBox { k: 12, ..ok },
            OperandBox { rows: 0, ..ok },
            OperandBox {
                box_rows: 257,
                ..ok
            },
            OperandBox { box_rows: 0, ..ok },
        ];
        for b in bad {
            assert!(b.validate().is_err(), "{b:?}");
        }
    }
}
