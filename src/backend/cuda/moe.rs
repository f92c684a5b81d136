//! A mixture-of-experts feed-forward (LLaDA-MoE) on the GPU: the host side of cuda/moe.cu's
//! routing kernels, the expert weights' upload layout, the step buffers, and the sequence a
//! layer runs (the CPU reference: [`crate::model::experts`]):
//!
//! ```text
//! logits = xn · routerᵀ                      (router GEMM, fp32 [rows, E])
//! moe_route    softmax, each row's k most probable experts (ascending ids) and their weights
//! moe_group    per expert: its first grouped row and row count, each pair's grouped row
//! gate/up      grouped GEMM over the gathered rows of xn (SwiGLU epilogue, or bf16 + swiglu)
//! down         grouped GEMM, fp32 [pairs, d]
//! moe_combine  x[r] += Σ over r's experts (ascending) of weight · down output
//! ```
//!
//! Every launch's grid depends on the row count only, so a step that runs them is capturable
//! in a CUDA graph; no count leaves the device.

use super::elementwise::Elementwise;
use super::gemm::GemmOut;
use super::gemm_grouped::{groups_for, GroupedGemm, GroupedShape, Groups};
use super::launch::Launch;
use super::memory::alloc_err;
use super::{cuda_err, CudaDevice};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

/// Most experts a row may choose (`MOE_MAX_K` in cuda/moe.cu).
pub const MAX_PER_ROW: usize = 32;
/// Most experts per layer the CUDA model takes (the routing kernel's scans stay short).
pub const MAX_EXPERTS: usize = 1024;
/// Threads per block of `moe_route` / `moe_combine` and of `moe_group`.
const THREADS: u32 = 128;
const GROUP_THREADS: u32 = 256;

/// The shape of one layer's mixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    pub experts: usize,
    /// Experts each row runs (`k`).
    pub per_row: usize,
    pub d: usize,
    /// Each expert's hidden width.
    pub h: usize,
}

impl MoeShape {
    /// The mixture of `cfg`'s layers, if it has one.
    pub fn of(cfg: &ModelConfig) -> Option<MoeShape> {
        cfg.experts.map(|x| MoeShape {
            experts: x.n_experts,
            per_row: x.experts_per_token,
            d: cfg.d_model,
            h: cfg.mlp_hidden,
        })
    }

    /// Why the CUDA kernels cannot run this mixture, if they cannot: at most [`MAX_EXPERTS`]
    /// experts, a multiple of 8 (the router GEMM's output width), 1..=min(experts,
    /// [`MAX_PER_ROW`]) per row, widths multiples of 8.
    pub fn unsupported(&self) -> Option<String> {
        let MoeShape {
            experts,
            per_row,
            d,
            h,
        } = *self;
        if experts == 0 || experts > MAX_EXPERTS || !experts.is_multiple_of(8) {
            return Some(format!(
                "{experts} experts (the CUDA mixture takes multiples of 8 up to {MAX_EXPERTS})"
            ));
        }
        if per_row == 0 || per_row > experts.min(MAX_PER_ROW) {
            return Some(format!(
                "{per_row} experts per token (the CUDA mixture takes 1..={})",
                experts.min(MAX_PER_ROW)
            ));
        }
        if !d.is_multiple_of(8) || !h.is_multiple_of(8) || d == 0 || h == 0 {
            return Some(format!(
                "widths d={d}, expert hidden {h} (multiples of 8 on CUDA)"
            ));
        }
        None
    }
}

/// Why the CUDA model cannot run `cfg`'s mixture, if it cannot (`None` for dense models).
pub fn unsupported(cfg: &ModelConfig) -> Option<String> {
    MoeShape::of(cfg).and_then(|s| s.unsupported())
}

/// One layer's experts on the device.
pub struct ExpertWeights {
    /// `[E, d]` bf16.
    pub router: CudaSlice<u16>,
    /// `[E, 2h, d]` bf16: each expert's gate and up rows, interleaved for the fused SwiGLU
    /// ([`super::swiglu_layout`]) or gate then up.
    pub gate_up: CudaSlice<u16>,
    /// `[E, d, h]` bf16.
    pub down: CudaSlice<u16>,
}

/// Element counts of a mixture's step buffers over up to `rows` rows (`pairs = rows · k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeBufferSizes {
    pub rows: usize,
    pub pairs: usize,
    /// Router logits (f32): `rows · E`.
    pub logits: usize,
    /// Gate|up (bf16): `pairs · 2h`, one element with the fused SwiGLU.
    pub gate_up: usize,
    /// SwiGLU output (bf16): `pairs · h`.
    pub act: usize,
    /// Down projections (f32): `pairs · d`.
    pub y: usize,
    pub experts: usize,
}

impl MoeBufferSizes {
    pub fn new(shape: MoeShape, rows: usize, fused_swiglu: bool) -> MoeBufferSizes {
        let pairs = rows * shape.per_row;
        MoeBufferSizes {
            rows,
            pairs,
            logits: rows * shape.experts,
            gate_up: if fused_swiglu { 1 } else { pairs * 2 * shape.h },
            act: pairs * shape.h,
            y: pairs * shape.d,
            experts: shape.experts,
        }
    }

    /// Their bytes: logits, four i32/f32 per pair (expert, weight, grouped row, gathered row),
    /// two i32 per expert, the bf16 activations, the f32 down outputs.
    pub fn bytes(&self) -> u64 {
        let n = |x: usize| x as u64;
        4 * n(self.logits)
            + 4 * 4 * n(self.pairs)
            + 4 * 2 * n(self.experts)
            + 2 * n(self.gate_up + self.act)
            + 4 * n(self.y)
    }
}

/// A mixture's device step buffers.
pub struct MoeBuffers {
    sizes: MoeBufferSizes,
    logits: CudaSlice<f32>,
    sel_e: CudaSlice<i32>,
    sel_w: CudaSlice<f32>,
    pair_pos: CudaSlice<i32>,
    grp_row: CudaSlice<i32>,
    off: CudaSlice<i32>,
    cnt: CudaSlice<i32>,
    gu: CudaSlice<u16>,
    act: CudaSlice<u16>,
    y: CudaSlice<f32>,
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    dev.stream
        .alloc_zeros::<T>(n.max(1))
        .map_err(|e| alloc_err(&format!("alloc {what} ({n} elements)"), e))
}

impl MoeBuffers {
    pub fn alloc(dev: &CudaDevice, sizes: MoeBufferSizes) -> Result<MoeBuffers> {
        Ok(MoeBuffers {
            sizes,
            logits: alloc(dev, sizes.logits, "router logits")?,
            sel_e: alloc(dev, sizes.pairs, "expert choices")?,
            sel_w: alloc(dev, sizes.pairs, "expert weights")?,
            pair_pos: alloc(dev, sizes.pairs, "grouped rows")?,
            grp_row: alloc(dev, sizes.pairs, "gathered rows")?,
            off: alloc(dev, sizes.experts, "expert offsets")?,
            cnt: alloc(dev, sizes.experts, "expert counts")?,
            gu: alloc(dev, sizes.gate_up, "expert gate|up")?,
            act: alloc(dev, sizes.act, "expert activations")?,
            y: alloc(dev, sizes.y, "expert outputs")?,
        })
    }

    /// Sets the router logits of the first `logits.len() / E` rows (the checks route given
    /// logits).
    pub fn set_logits(&mut self, dev: &CudaDevice, logits: &[f32]) -> Result<()> {
        if logits.len() > self.sizes.logits {
            return Err(Error::invalid(format!(
                "moe: {} logits for buffers of {}",
                logits.len(),
                self.sizes.logits
            )));
        }
        dev.stream
            .memcpy_htod(logits, &mut self.logits.slice_mut(0..logits.len()))
            .map_err(|e| cuda_err("upload router logits", e))
    }

    /// The routing of the first `rows` rows, copied to the host (synchronises).
    pub fn routing(&self, dev: &CudaDevice, shape: MoeShape, rows: usize) -> Result<Routing> {
        let pairs = rows * shape.per_row;
        if pairs > self.sizes.pairs || shape.experts != self.sizes.experts {
            return Err(Error::invalid(format!(
                "moe: the routing of {rows} rows of {shape:?} from buffers for {:?}",
                self.sizes
            )));
        }
        let get_i = |v: &CudaSlice<i32>, n: usize| {
            dev.stream
                .clone_dtoh(&v.slice(0..n))
                .map_err(|e| cuda_err("download routing", e))
        };
        let weights = dev
            .stream
            .clone_dtoh(&self.sel_w.slice(0..pairs))
            .map_err(|e| cuda_err("download routing", e))?;
        Ok(Routing {
            experts: get_i(&self.sel_e, pairs)?,
            weights,
            off: get_i(&self.off, shape.experts)?,
            cnt: get_i(&self.cnt, shape.experts)?,
            pair_pos: get_i(&self.pair_pos, pairs)?,
            grouped_rows: get_i(&self.grp_row, pairs)?,
        })
    }
}

/// The routing of `rows` rows, copied to the host (the checks compare it with the CPU's).
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// `[rows · k]`: each row's experts, ascending, and their weights.
    pub experts: Vec<i32>,
    pub weights: Vec<f32>,
    /// `[E]`: each expert's first grouped row and row count.
    pub off: Vec<i32>,
    pub cnt: Vec<i32>,
    /// `[rows · k]`: each pair's grouped row; `grouped_rows[pos]` = the row of grouped row `pos`.
    pub pair_pos: Vec<i32>,
    pub grouped_rows: Vec<i32>,
}

mod checks;
pub use checks::{
    bench, grouped_reference, grouping_fault, host_mixture, self_check, special_logit_rows,
    stacked_gate_up,
};

/// The loaded mixture kernels.
pub struct Moe {
    route_fn: CudaFunction,
    group_fn: CudaFunction,
    combine_fn: CudaFunction,
    grouped: GroupedGemm,
}

impl Moe {
    /// Loads cuda/moe.cu's kernels and the grouped GEMM.
    pub fn load(dev: &CudaDevice) -> Result<Moe> {
        let f = |name: &str| dev.function("moe", name);
        Ok(Moe {
            route_fn: f("moe_route")?,
            group_fn: f("moe_group")?,
            combine_fn: f("moe_combine")?,
            grouped: GroupedGemm::load(dev)?,
        })
    }

    fn check_rows(shape: MoeShape, buf: &MoeBuffers, rows: usize) -> Result<()> {
        if let Some(why) = shape.unsupported() {
            return Err(Error::invalid(format!("moe: {why}")));
        }
        if rows > buf.sizes.rows
            || buf.sizes.experts != shape.experts
            || buf.sizes.pairs != buf.sizes.rows * shape.per_row
            || rows
                .checked_mul(shape.per_row.max(shape.experts))
                .is_none_or(|x| x > i32::MAX as usize)
        {
            return Err(Error::invalid(format!(
                "moe: {rows} rows of {shape:?} in buffers for {:?}",
                buf.sizes
            )));
        }
        Ok(())
    }

    /// Routes and groups `rows` rows whose router logits are in `buf`'s logits: `moe_route`,
    /// then `moe_group`.
    pub fn route(
        &self,
        dev: &CudaDevice,
        shape: MoeShape,
        buf: &mut MoeBuffers,
        rows: usize,
    ) -> Result<()> {
        Self::check_rows(shape, buf, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (r, e, k) = (rows as i32, shape.experts as i32, shape.per_row as i32);
        let warps = (THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(warps) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = Launch::new(&dev.stream, &self.route_fn, dev.pdl);
        b.arg(&buf.logits)
            .arg(&r)
            .arg(&e)
            .arg(&k)
            .arg(&mut buf.sel_e)
            .arg(&mut buf.sel_w);
        // SAFETY: check_rows: rows ≤ the buffers' rows, so logits hold rows · E and sel_e /
        // sel_w rows · k; k ≤ min(E, MOE_MAX_K) (unsupported() is None).
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch moe_route", e))?;
        let pairs = (rows * shape.per_row) as i32;
        let cfg = LaunchConfig {
            grid_dim: (shape.experts as u32, 1, 1),
            block_dim: (GROUP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = Launch::new(&dev.stream, &self.group_fn, dev.pdl);
        b.arg(&buf.sel_e)
            .arg(&pairs)
            .arg(&k)
            .arg(&mut buf.off)
            .arg(&mut buf.cnt)
            .arg(&mut buf.pair_pos)
            .arg(&mut buf.grp_row);
        // SAFETY: sel_e, pair_pos and grp_row hold rows · k entries, off / cnt E; moe_route
        // wrote experts below E, so each pair lands in exactly one expert's range and the
        // grouped rows written are below rows · k.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch moe_group", e))?;
        Ok(())
    }

    /// `x[r] += Σ weight · y[pair_pos]` over each of the `rows` rows' experts.
    fn combine(
        &self,
        dev: &CudaDevice,
        shape: MoeShape,
        buf: &MoeBuffers,
        x: &mut CudaViewMut<f32>,
        rows: usize,
    ) -> Result<()> {
        if x.len() < rows * shape.d {
            return Err(Error::invalid(format!(
                "moe: the residual holds {} elements, needs {rows} rows of {}",
                x.len(),
                shape.d
            )));
        }
        let (k, d) = (shape.per_row as i32, shape.d as i32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = Launch::new(&dev.stream, &self.combine_fn, dev.pdl);
        b.arg(&buf.y)
            .arg(&buf.pair_pos)
            .arg(&buf.sel_w)
            .arg(&k)
            .arg(&d)
            .arg(x);
        // SAFETY: y holds rows · k rows of d (buffers checked by the caller's check_rows),
        // pair_pos entries are grouped rows below rows · k (moe_group), x rows · d (checked).
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch moe_combine", e))?;
        Ok(())
    }

    /// The mixture over `rows` rows: `x[r] += moe(xn[r])` (`xn` the MLP norm's bf16 output,
    /// `x` the fp32 residual). `router` runs the router GEMM (`xn · routerᵀ` into the fp32
    /// logits: the caller's GEMM instance). With `fused_swiglu` the gate/up weights are
    /// interleaved and the SwiGLU runs in the grouped GEMM's epilogue; otherwise `ew`'s kernel
    /// combines the stored gate|up rows.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        dev: &CudaDevice,
        ew: &Elementwise,
        w: &ExpertWeights,
        shape: MoeShape,
        (xn, x): (&CudaView<u16>, &mut CudaViewMut<f32>),
        rows: usize,
        buf: &mut MoeBuffers,
        fused_swiglu: bool,
        router: impl FnOnce(&CudaView<u16>, &CudaView<u16>, GemmOut<'_>) -> Result<()>,
    ) -> Result<()> {
        Self::check_rows(shape, buf, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let MoeShape {
            experts,
            per_row,
            d,
            h,
        } = shape;
        let pairs = rows * per_row;
        router(
            xn,
            &w.router.as_view(),
            GemmOut::F32(buf.logits.slice_mut(0..rows * experts)),
        )?;
        self.route(dev, shape, buf, rows)?;
        let (a_rows, off, cnt) = (
            buf.grp_row.slice(0..pairs),
            buf.off.as_view(),
            buf.cnt.as_view(),
        );
        let groups = Groups {
            a_rows: Some(&a_rows),
            off: &off,
            cnt: &cnt,
            pairs,
            max_rows: rows,
        };
        let up_shape = GroupedShape {
            experts,
            n: 2 * h,
            k: d,
            a_rows: rows,
        };
        if fused_swiglu {
            let out = GemmOut::SwigluBf16(buf.act.slice_mut(0..pairs * h));
            self.grouped
                .run(dev, xn, &w.gate_up.as_view(), out, &groups, up_shape)?;
        } else {
            let out = GemmOut::Bf16(buf.gu.slice_mut(0..pairs * 2 * h));
            self.grouped
                .run(dev, xn, &w.gate_up.as_view(), out, &groups, up_shape)?;
            ew.swiglu(
                &buf.gu.slice(0..pairs * 2 * h),
                &mut buf.act.slice_mut(0..pairs * h),
                pairs,
                h,
            )?;
        }
        // The down projection reads the activations in grouped order: its input row i is i.
        let down_shape = GroupedShape {
            experts,
            n: d,
            k: h,
            a_rows: pairs,
        };
        let in_order = Groups {
            a_rows: None,
            ..groups
        };
        self.grouped.run(
            dev,
            &buf.act.slice(0..pairs * h),
            &w.down.as_view(),
            GemmOut::F32(buf.y.slice_mut(0..pairs * d)),
            &in_order,
            down_shape,
        )?;
        self.combine(dev, shape, buf, x, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seven_b() -> MoeShape {
        MoeShape {
            experts: 64,
            per_row: 8,
            d: 2048,
            h: 1024,
        }
    }

    #[test]
    fn the_cuda_mixture_takes_llada_moe_and_names_what_it_refuses() {
        assert_eq!(seven_b().unsupported(), None);
        for (shape, named) in [
            (
                MoeShape {
                    experts: 12,
                    ..seven_b()
                },
                "12 experts",
            ),
            (
                MoeShape {
                    experts: 2048,
                    ..seven_b()
                },
                "2048 experts",
            ),
            (
                MoeShape {
                    per_row: 0,
                    ..seven_b()
                },
                "0 experts per token",
            ),
            (
                MoeShape {
                    per_row: 33,
                    ..seven_b()
                },
                "33 experts per token",
            ),
            (
                MoeShape {
                    experts: 8,
                    per_row: 9,
                    ..seven_b()
                },
                "9 experts per token",
            ),
            (
                MoeShape {
                    d: 100,
                    ..seven_b()
                },
                "d=100",
            ),
            (MoeShape { h: 0, ..seven_b() }, "expert hidden 0"),
        ] {
            let why = shape.unsupported().expect("refused");
            assert!(why.contains(named), "{why} should name {named}");
        }
    }

    #[test]
    fn buffer_sizes_of_a_7b_block_step() {
        // 32 rows, 8 experts each: 256 pairs.
        let s = MoeBufferSizes::new(seven_b(), 32, true);
        assert_eq!((s.pairs, s.logits, s.gate_up), (256, 32 * 64, 1));
        assert_eq!((s.act, s.y), (256 * 1024, 256 * 2048));
        // 4·2048 logits + 16·256 pair entries + 8·64 expert entries + 2·(1 + 262144)
        // activations + 4·524288 outputs.
        assert_eq!(s.bytes(), 8192 + 4096 + 512 + 524_290 + 2_097_152);
        let unfused = MoeBufferSizes::new(seven_b(), 32, false);
        assert_eq!(unfused.gate_up, 256 * 2048);
    }

    #[test]
    fn a_mixture_model_steps_on_its_own_buffers() {
        let cfg = crate::synth::plan(crate::synth::Preset::LladaMoeTiny)
            .unwrap()
            .config;
        assert!(unsupported(&cfg).is_none() && cfg.has_cuda_model());
        let n = super::super::memory::StepBuffers::new(&cfg, 2, 40, true);
        let moe = n.moe.expect("mixture buffers");
        assert_eq!(moe.rows, 80);
        assert_eq!(moe.pairs, 80 * cfg.experts.unwrap().experts_per_token);
        // The dense SwiGLU's buffers are not allocated.
        assert_eq!((n.act, n.gate_up), (1, 1));
        let dense = ModelConfig {
            experts: None,
            ..cfg
        };
        assert!(super::super::memory::StepBuffers::new(&dense, 2, 40, true)
            .moe
            .is_none());
    }
}
