//! The QKV projection's RoPE epilogue (`DLLM_FUSED_ROPE=1`, opt-in; session 10, not yet run on
//! a GPU): the kernel parameter of `DLLM_EPI_ROPE_QKV` (`cuda/gemm_common.cuh`), its (cos, sin)
//! table, and the checks that build it from a [`RopeQkvShape`].
//!
//! With the q and k rows uploaded in the grouped order of [`super::rope_layout`], the stream,
//! wgmma and TMA GEMMs rotate q and k in their epilogue and write k and v into the K/V cache, so
//! the separate `rope_qkv_bf16` launch and its bf16 round trip of the whole QKV activation go
//! (32 launches per step). The rotation reads (cos, sin) from a table computed once per model
//! with `rope_qkv_bf16`'s arithmetic instead of evaluating `cosf` / `sinf` per element.

use super::check::{self, BenchResult, CheckResult, TOL_BF16};
use super::elementwise::{Elementwise, KvDst, RopeQkvShape};
use super::gemm::{download, upload, Gemm, GemmOut, GemmPlan};
use super::gemm_cluster_split;
use super::gemm_norm::{NormFold, GROUP_COLS};
use super::memory;
use super::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr};

/// `DllmRopeEpi` of `cuda/gemm_common.cuh`, field for field (device addresses as u64).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RopeEpi {
    table: u64,
    bias: u64,
    k_cache: u64,
    v_cache: u64,
    q_cols: i32,
    v_col: i32,
    head_dim: i32,
    pos_period: i32,
    pos_offset: i32,
    cache_seq_rows: i32,
}

// SAFETY: plain data (four addresses and six i32, no padding: 32 + 24 bytes, 8-aligned), the
// layout of the kernels' `DllmRopeEpi` parameter.
unsafe impl DeviceRepr for RopeEpi {}

/// The RoPE epilogue's parameters with the product shape they were checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeArgs {
    pub(super) epi: RopeEpi,
    /// Rows and columns of the QKV product the parameters describe.
    pub rows: usize,
    pub cols: usize,
}

/// (cos, sin) of `pos · inv_freq[i]` for every position below `positions` and `i < half`.
pub struct RopeTable {
    buf: CudaSlice<f32>,
    positions: usize,
    half: usize,
}

impl RopeTable {
    /// Computes the table on the device (`rope_table_f32`) for `positions` positions of a head
    /// of `2 · inv_freq.len()` elements.
    pub fn new(
        dev: &CudaDevice,
        ew: &Elementwise,
        inv_freq: &CudaView<f32>,
        positions: usize,
    ) -> Result<RopeTable> {
        let half = inv_freq.len();
        let floats = positions
            .checked_mul(2 * half)
            .ok_or_else(|| Error::invalid("rope table: size overflows".to_string()))?;
        let mut buf = dev
            .stream
            .alloc_zeros::<f32>(floats.max(1))
            .map_err(|e| memory::alloc_err("the RoPE table", e))?;
        ew.rope_table(&mut buf, inv_freq, positions, half)?;
        Ok(RopeTable {
            buf,
            positions,
            half,
        })
    }

    /// Positions the table covers.
    pub fn positions(&self) -> usize {
        self.positions
    }
}

impl RopeArgs {
    /// The parameters that make the QKV GEMM do what [`Elementwise::rope_qkv`] does for `s` in
    /// the grouped layout: the product is `s.rows × s.row_stride` with q heads at column 0, k
    /// heads right after them and v heads right after those (the fused projection's layout),
    /// `bias` (fp32, one per column) added first, and with `cache` the k and v columns written
    /// to the cache rows [`RopeQkvShape::cache_row`]. Everything the kernels will index is
    /// checked here.
    pub fn new(
        dev: &CudaDevice,
        s: &RopeQkvShape,
        table: &RopeTable,
        bias: Option<&CudaView<f32>>,
        cache: Option<KvDst<'_, '_>>,
    ) -> Result<RopeArgs> {
        validate(s, (table.positions, table.half), bias.map(|b| b.len()))?;
        let bad = |why: String| Error::invalid(format!("gemm rope epilogue: {why} in {s:?}"));
        let int = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit in i32")))
        };
        let q_cols = s.q_heads * s.head_dim;
        let mut epi = RopeEpi {
            table: table.buf.device_ptr(&dev.stream).0,
            bias: bias.map_or(0, |b| b.device_ptr(&dev.stream).0),
            k_cache: 0,
            v_cache: 0,
            q_cols: int("q columns", q_cols)?,
            v_col: int("v column", s.v_col)?,
            head_dim: int("head_dim", s.head_dim)?,
            pos_period: int("pos_period", s.pos_period)?,
            pos_offset: int("pos_offset", s.pos_offset)?,
            cache_seq_rows: 0,
        };
        int("rows × columns", s.rows.saturating_mul(s.row_stride))?;
        if let Some(c) = cache {
            s.check_cache(c.k.len(), c.v.len(), c.seq_rows)?;
            epi.k_cache = c.k.device_ptr_mut(&dev.stream).0;
            epi.v_cache = c.v.device_ptr_mut(&dev.stream).0;
            // Cache offsets are computed in 64 bits by the kernels; the row count fits in i32.
            epi.cache_seq_rows = int("cache rows", c.seq_rows)?;
        }
        Ok(RopeArgs {
            epi,
            rows: s.rows,
            cols: s.row_stride,
        })
    }
}

/// Checks what the epilogue assumes of `s` with a table of `(positions, half)` and a bias of
/// `bias_len` values: the grouped layout, a head size in whole groups matching the table, q, k
/// and v heads back to back filling the row, every position in the table, a bias per column.
fn validate(
    s: &RopeQkvShape,
    (positions, half): (usize, usize),
    bias_len: Option<usize>,
) -> Result<()> {
    let bad = |why: String| {
        Err(Error::invalid(format!(
            "gemm rope epilogue: {why} in {s:?}"
        )))
    };
    if !s.grouped {
        return bad("the q and k rows must be in the grouped layout".into());
    }
    if !super::rope_layout::supported(s.head_dim) || half * 2 != s.head_dim {
        return bad(format!(
            "head_dim must be a multiple of 16 and match the table's {}",
            2 * half
        ));
    }
    let (q_cols, kvw) = (s.q_heads * s.head_dim, s.kv_width());
    if s.k_col != q_cols || s.v_col != q_cols + kvw || s.row_stride != q_cols + 2 * kvw {
        return bad(
            "q, k and v must be consecutive and fill the row (the fused projection)".into(),
        );
    }
    if s.pos_period == 0 || s.pos_offset + s.pos_period.min(s.rows) > positions {
        return bad(format!(
            "positions beyond the table's {positions} (or pos_period 0)"
        ));
    }
    match bias_len {
        Some(b) if b < s.row_stride => bad(format!("bias of {b} values")),
        _ => Ok(()),
    }
}

/// One check (or bench) case: `seqs` sequences of `period` rows at positions from `offset`, heads
/// `(q, kv, head_dim)`, K = `k`, with or without bias and cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    seqs: usize,
    period: usize,
    offset: usize,
    heads: (usize, usize, usize),
    k: usize,
    bias: bool,
    cache: bool,
}

/// The block steps' row counts (stream kernel, M ≤ 32, one or two sequences), an odd M past the
/// stream kernel's (wgmma), a full forward at M = 384 (TMA pairs), and four block steps at once
/// with K deep enough to split ([`SPLIT_CASE`]), with LLaDA-like and tiny-model head shapes;
/// biases as Dream's.
const CASES: [Case; 6] = [
    Case {
        seqs: 1,
        period: 32,
        offset: 352,
        heads: (6, 2, 64),
        k: 384,
        bias: false,
        cache: true,
    },
    Case {
        seqs: 1,
        period: 25,
        offset: 7,
        heads: (4, 4, 128),
        k: 512,
        bias: true,
        cache: true,
    },
    Case {
        seqs: 2,
        period: 16,
        offset: 48,
        heads: (4, 1, 128),
        k: 256,
        bias: true,
        cache: true,
    },
    Case {
        seqs: 1,
        period: 133,
        offset: 3,
        heads: (4, 4, 64),
        k: 256,
        bias: false,
        cache: true,
    },
    Case {
        seqs: 1,
        period: 384,
        offset: 0,
        heads: (8, 2, 128),
        k: 1024,
        bias: true,
        cache: false,
    },
    SPLIT_CASE,
];

/// 128 rows (four canvases' block steps) × 1536 columns × K = 2048: 32 K tiles, so the planner
/// splits K (`gemm_wgmma` with 2 splits: the RoPE epilogue runs in the last block of each tile,
/// on the workspace's sums), and both cluster-split kernel heights have a plan of 2 and of 3
/// splits for it (the cluster checks, [`cluster_split_checks`]).
const SPLIT_CASE: Case = Case {
    seqs: 4,
    period: 32,
    offset: 352,
    heads: (8, 2, 128),
    k: 2048,
    bias: true,
    cache: true,
};

/// `dllm-gpu-check`'s `gemm.rope_epilogue` checks: the QKV GEMM with the RoPE epilogue against
/// the same GEMM stored as bf16 followed by `rope_qkv_bf16` on the grouped layout (the path it
/// replaces), on the QKV activation and the K/V cache (relative L2 within the bf16 tolerance:
/// the separate path rounds the product once more; cache rows no row maps to must stay
/// poisoned). Cases whose GEMM would not run the epilogue on this device are reported as such.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let kit = (|| -> Result<_> { Ok((Gemm::load(dev)?, Elementwise::new(dev)?)) })();
    let (gemm, ew) = match kit {
        Ok(k) => k,
        Err(e) => return vec![CheckResult::failed("gemm.rope_epilogue load", e)],
    };
    let mut out: Vec<CheckResult> = CASES
        .iter()
        .enumerate()
        .map(|(i, c)| {
            CheckResult::from_result(
                case_name(c),
                TOL_BF16,
                check_case(dev, &gemm, &ew, i as u64, c),
            )
        })
        .collect();
    out.extend(cluster_split_checks(dev, &ew));
    out
}

fn case_name(c: &Case) -> String {
    format!(
        "gemm.rope_epilogue m{} ({}×{} from {}) heads {:?} k{} bias {} cache {}",
        c.seqs * c.period,
        c.seqs,
        c.period,
        c.offset,
        c.heads,
        c.k,
        c.bias,
        c.cache
    )
}

/// The RoPE epilogue in the cluster-split kernels (`gemm_store_pairs` on each rank's share of a
/// tile) against `gemm_wgmma`'s workspace reduction of the same plan, bit for bit in the QKV
/// activation and both caches, for every compiled kernel with a plan of its split count on
/// [`SPLIT_CASE`]; empty where the cluster-split kernels cannot run (no sm_90a).
fn cluster_split_checks(dev: &CudaDevice, ew: &Elementwise) -> Vec<CheckResult> {
    let gemm = match Gemm::load(dev).and_then(|g| g.with_cluster_split(dev)) {
        Ok(g) if g.is_enabled(super::gemm::GemmVariant::Wgmma) => g,
        Ok(_) | Err(Error::Unsupported(_)) => return vec![],
        Err(e) => {
            return vec![CheckResult::failed(
                "gemm.rope_epilogue cluster split load",
                e,
            )]
        }
    };
    let c = SPLIT_CASE;
    let f = match Fixture::new(dev, &gemm, ew, 77, &c) {
        Ok(f) => f,
        Err(e) => return vec![CheckResult::failed("gemm.rope_epilogue cluster split", e)],
    };
    let shape = (f.shape.rows, f.shape.row_stride, c.k);
    // The norm fold's partial sums for the row-scaled runs (positive, as a prep writes them).
    let partials = check::random_f32(78, shape.0 * (c.k / GROUP_COLS), 0.5, 40.0);
    let partials = match upload(dev, &partials) {
        Ok(p) => p,
        Err(e) => return vec![CheckResult::failed("gemm.rope_epilogue cluster split", e)],
    };
    let runs = gemm_cluster_split::KERNELS
        .iter()
        .flat_map(|&kernel| [(kernel, None), (kernel, Some(&partials))]);
    runs.filter_map(|(kernel, scale)| {
        let plan = gemm_cluster_split::plan_for(kernel, shape)?;
        let name = format!(
            "{} cluster split wg{}_cs{}{}",
            case_name(&c),
            kernel.0,
            kernel.1,
            if scale.is_some() { " row-scaled" } else { "" }
        );
        let outcome = (|| -> Result<Option<String>> {
            let (mut want, mut got) = (f.outputs()?, f.outputs()?);
            f.run_plan(&mut want, GemmPlan::Wgmma(plan), scale)?;
            f.run_plan(&mut got, GemmPlan::ClusterSplit(plan), scale)?;
            dev.sync()?;
            for (what, g, w) in [
                ("qkv", &got.qkv, &want.qkv),
                ("k cache", &got.k, &want.k),
                ("v cache", &got.v, &want.v),
            ] {
                let (g, w) = (download(dev, g)?, download(dev, w)?);
                if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
                    return Ok(Some(format!(
                        "{what}[{i}] is {:#06x}, the workspace reduction gives {:#06x}",
                        g[i], w[i]
                    )));
                }
            }
            Ok(None)
        })();
        Some(match outcome {
            Ok(diff) => CheckResult::exact(
                name,
                diff.is_none(),
                diff.unwrap_or_else(|| "identical to the workspace reduction".to_string()),
            ),
            Err(e) => CheckResult::failed(name, e),
        })
    })
    .collect()
}

/// The operands of one case and the two ways to compute it.
struct Fixture<'g> {
    dev: &'g CudaDevice,
    gemm: &'g Gemm,
    ew: &'g Elementwise,
    c: Case,
    shape: RopeQkvShape,
    seq_rows: usize,
    a: CudaSlice<u16>,
    w: CudaSlice<u16>,
    bias: CudaSlice<f32>,
    inv: CudaSlice<f32>,
    table: RopeTable,
}

/// An output matrix and a K and a V cache.
struct Outputs {
    qkv: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

impl<'g> Fixture<'g> {
    fn new(
        dev: &'g CudaDevice,
        gemm: &'g Gemm,
        ew: &'g Elementwise,
        seed: u64,
        c: &Case,
    ) -> Result<Self> {
        let (qh, kvh, hd) = c.heads;
        let (m, kvw) = (c.seqs * c.period, kvh * hd);
        let n = qh * hd + 2 * kvw;
        let shape = RopeQkvShape {
            rows: m,
            row_stride: n,
            q_heads: qh,
            kv_heads: kvh,
            k_col: qh * hd,
            v_col: qh * hd + kvw,
            head_dim: hd,
            pos_period: c.period,
            pos_offset: c.offset,
            grouped: true,
        };
        let bf = |s: u64, len: usize| {
            check::to_bf16_bits(&check::random_f32(seed * 10 + s, len, -1.0, 1.0))
        };
        let inv = upload(dev, &crate::backend::cpu::rope_inv_freq(hd, 10_000.0))?;
        let table = RopeTable::new(dev, ew, &inv.as_view(), c.offset + c.period)?;
        Ok(Fixture {
            dev,
            gemm,
            ew,
            c: *c,
            shape,
            seq_rows: c.offset + c.period + 2,
            a: upload(dev, &bf(1, m * c.k))?,
            w: upload(dev, &bf(2, n * c.k))?,
            bias: upload(dev, &check::random_f32(seed * 10 + 3, n, -0.5, 0.5))?,
            inv,
            table,
        })
    }

    /// Poisoned outputs.
    fn outputs(&self) -> Result<Outputs> {
        let cache =
            vec![check::POISON_BF16_BITS; self.c.seqs * self.seq_rows * self.shape.kv_width()];
        Ok(Outputs {
            qkv: upload(
                self.dev,
                &vec![check::POISON_BF16_BITS; self.shape.rows * self.shape.row_stride],
            )?,
            k: upload(self.dev, &cache)?,
            v: upload(self.dev, &cache)?,
        })
    }

    /// The RoPE epilogue's output into `o` (its activation and caches).
    fn fused_out<'o>(&self, o: &'o mut Outputs) -> Result<GemmOut<'o>> {
        let bias = self.bias.as_view();
        let (mut kv, mut vv) = (o.k.as_view_mut(), o.v.as_view_mut());
        let dst = self.c.cache.then_some(KvDst {
            k: &mut kv,
            v: &mut vv,
            seq_rows: self.seq_rows,
        });
        let args = RopeArgs::new(
            self.dev,
            &self.shape,
            &self.table,
            self.c.bias.then_some(&bias),
            dst,
        )?;
        Ok(GemmOut::RopeQkv(o.qkv.as_view_mut(), args))
    }

    /// The GEMM with the RoPE epilogue on `plan` (a plan of this shape whose kernel has it), into
    /// `o`; with `scale` (the norm fold's `[m, k / 32]` partial sums) its rows scaled first.
    fn run_plan(
        &self,
        o: &mut Outputs,
        plan: GemmPlan,
        scale: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        let (m, n, k) = (self.shape.rows, self.shape.row_stride, self.c.k);
        let (a, w) = (self.a.as_view(), self.w.as_view());
        let out = self.fused_out(o)?;
        let sq = scale.map(|s| s.as_view());
        let fold = NormFold {
            scale: sq.as_ref(),
            prep: None,
            eps: 1e-5,
        };
        self.gemm
            .run_plan_fold(self.dev, plan, &a, &w, out, fold, m, n, k)
    }

    /// The GEMM with the RoPE epilogue (`fused`), or the GEMM then `rope_qkv` (the path the
    /// epilogue replaces), into `o`.
    fn run(&self, o: &mut Outputs, fused: bool) -> Result<()> {
        let (m, n, k) = (self.shape.rows, self.shape.row_stride, self.c.k);
        let (a, w) = (self.a.as_view(), self.w.as_view());
        if fused {
            let out = self.fused_out(o)?;
            return self.gemm.run(self.dev, &a, &w, out, m, n, k);
        }
        let out = GemmOut::Bf16(o.qkv.as_view_mut());
        self.gemm.run(self.dev, &a, &w, out, m, n, k)?;
        let (inv, bias) = (self.inv.as_view(), self.bias.as_view());
        let (mut kv, mut vv) = (o.k.as_view_mut(), o.v.as_view_mut());
        let dst = self.c.cache.then_some(KvDst {
            k: &mut kv,
            v: &mut vv,
            seq_rows: self.seq_rows,
        });
        self.ew.rope_qkv(
            &mut o.qkv.as_view_mut(),
            &inv,
            self.c.bias.then_some(&bias),
            self.shape,
            dst.into(),
            None,
        )
    }
}

fn check_case(
    dev: &CudaDevice,
    gemm: &Gemm,
    ew: &Elementwise,
    seed: u64,
    c: &Case,
) -> Result<(f64, String)> {
    let (_, kvh, hd) = c.heads;
    let kvw = kvh * hd;
    let f = Fixture::new(dev, gemm, ew, seed, c)?;
    let (m, n) = (f.shape.rows, f.shape.row_stride);
    if !gemm.rope_epilogue_serves(m, n, c.k) {
        // Nothing to compare: the model runs rope_qkv after the GEMM here (checked on its own).
        return Ok((
            0.0,
            "not served by this device's kernels (rope_qkv runs)".into(),
        ));
    }
    let (mut want, mut got) = (f.outputs()?, f.outputs()?);
    f.run(&mut want, false)?;
    f.run(&mut got, true)?;
    dev.sync()?;
    let bits = |s: &CudaSlice<u16>| download(dev, s);
    let (want_h, got_h) = (bits(&want.qkv)?, bits(&got.qkv)?);
    let mut err = check::rel_l2(
        &check::from_bf16_bits(&got_h),
        &check::from_bf16_bits(&want_h),
    );
    let mut detail = format!("qkv rel L2 {err:.2e}");
    if c.cache {
        // Rows some activation row writes, the others must keep their poison.
        let mut written = vec![false; c.seqs * f.seq_rows];
        for r in 0..m {
            written[f.shape.cache_row(r, f.seq_rows)] = true;
        }
        for (what, g, w) in [("k", &got.k, &want.k), ("v", &got.v, &want.v)] {
            let (g, w) = (bits(g)?, bits(w)?);
            let mut gv = Vec::new();
            let mut wv = Vec::new();
            for (row, &used) in written.iter().enumerate() {
                let span = row * kvw..(row + 1) * kvw;
                if used {
                    gv.extend(check::from_bf16_bits(&g[span.clone()]));
                    wv.extend(check::from_bf16_bits(&w[span]));
                } else if g[span].iter().any(|&b| b != check::POISON_BF16_BITS) {
                    return Ok((f64::INFINITY, format!("{what} cache row {row} written")));
                }
            }
            let e = check::rel_l2(&gv, &wv);
            detail.push_str(&format!(", {what} cache {e:.2e}"));
            err = err.max(e);
        }
    }
    Ok((err, detail))
}

/// `dllm-gpu-check`'s `gemm.rope_epilogue` benches: LLaDA-8B's QKV projection (32 heads of 128,
/// K = 4096) in a b1 block step (32 rows at positions 352.., cache written) and a full step (384
/// rows, cache written), the GEMM with the RoPE epilogue against the GEMM then `rope_qkv`, in one
/// process; skipped where the epilogue does not run.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let kit = (|| -> Result<_> { Ok((Gemm::load(dev)?, Elementwise::new(dev)?)) })();
    let (gemm, ew) = match kit {
        Ok(k) => k,
        Err(e) => return vec![BenchResult::failed("gemm.rope_epilogue load", e)],
    };
    let case = |period, offset| Case {
        seqs: 1,
        period,
        offset,
        heads: (32, 32, 128),
        k: 4096,
        bias: false,
        cache: true,
    };
    let mut out = Vec::new();
    for (label, c) in [
        ("block step m32", case(32, 352)),
        ("full step m384", case(384, 0)),
    ] {
        let name = format!("gemm.rope_epilogue 8B {label}");
        match time_case(dev, &gemm, &ew, &c) {
            Ok(Some((fused, apart))) => {
                let bytes = Some((c.k * 3 * 4096 * 2) as f64);
                out.push(BenchResult::new(
                    format!("{name} fused"),
                    fused,
                    bytes,
                    None,
                    format!("GEMM + rope_qkv {apart:.4} ms"),
                ));
                out.push(BenchResult::new(
                    format!("{name} GEMM + rope_qkv"),
                    apart,
                    bytes,
                    None,
                    "the default path",
                ));
            }
            Ok(None) => {}
            Err(e) => out.push(BenchResult::failed(name, e)),
        }
    }
    out
}

/// (fused ms, GEMM + rope_qkv ms), medians of 20; None where the epilogue does not run.
fn time_case(
    dev: &CudaDevice,
    gemm: &Gemm,
    ew: &Elementwise,
    c: &Case,
) -> Result<Option<(f64, f64)>> {
    let f = Fixture::new(dev, gemm, ew, 77, c)?;
    if !gemm.rope_epilogue_serves(f.shape.rows, f.shape.row_stride, c.k) {
        return Ok(None);
    }
    let mut o = f.outputs()?;
    let fused = check::time_median_ms(dev, 3, 20, |_| f.run(&mut o, true))?;
    let apart = check::time_median_ms(dev, 3, 20, |_| f.run(&mut o, false))?;
    Ok(Some((fused, apart)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_the_epilogue_cannot_serve_are_refused() {
        // LLaDA-8B's block step: 32 q and 8 k/v heads of 128, rows 32 at positions 352..384.
        let ok = RopeQkvShape {
            rows: 32,
            row_stride: 4096 + 2 * 1024,
            q_heads: 32,
            kv_heads: 8,
            k_col: 4096,
            v_col: 5120,
            head_dim: 128,
            pos_period: 32,
            pos_offset: 352,
            grouped: true,
        };
        assert!(validate(&ok, (384, 64), Some(6144)).is_ok());
        assert!(validate(&ok, (384, 64), None).is_ok());
        let refused = [
            (
                RopeQkvShape {
                    grouped: false,
                    ..ok
                },
                (384, 64),
                None,
            ),
            (RopeQkvShape { head_dim: 72, ..ok }, (384, 36), None),
            (ok, (384, 32), None),
            (RopeQkvShape { v_col: 5128, ..ok }, (384, 64), None),
            (
                RopeQkvShape {
                    row_stride: 6152,
                    ..ok
                },
                (384, 64),
                None,
            ),
            (ok, (383, 64), None),
            (
                RopeQkvShape {
                    pos_period: 0,
                    ..ok
                },
                (384, 64),
                None,
            ),
            (ok, (384, 64), Some(6143)),
        ];
        for (s, table, bias) in refused {
            assert!(
                validate(&s, table, bias).is_err(),
                "{s:?} {table:?} {bias:?}"
            );
        }
    }

    #[test]
    fn the_parameter_has_the_kernels_layout() {
        // DllmRopeEpi: 4 pointers, 6 ints, 8-byte aligned, no padding.
        assert_eq!(std::mem::size_of::<RopeEpi>(), 4 * 8 + 6 * 4);
        assert_eq!(std::mem::align_of::<RopeEpi>(), 8);
    }
}
