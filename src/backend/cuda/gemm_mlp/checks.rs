//! `dllm-gpu-check`'s checks and benches of the fused MLP, the layer tail and the layer chain:
//! each fused launch against the separate stream launches of the same plans, bit for bit.

use super::super::check::{self, BenchResult, CheckResult};
use super::super::elementwise::{Elementwise, KvDst, RopeQkvShape};
use super::super::gemm::{
    download, upload, Gemm, GemmOut, GemmPlan, MlpInput, MlpOutJob, MlpQkvJob,
};
use super::super::gemm_norm::{NormFold, NormPrep, GROUP_COLS};
use super::super::gemm_rope::{RopeArgs, RopeTable};
use super::super::CudaDevice;
use super::{MlpJobs, MlpPlan};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// One check case: `m` rows, hidden width, MLP width. The folded modes (tail, chain) run on
/// every 8-row group count (1 to 4: m = 1, 13, 20, 28, 32) since the narrowed last layer's
/// tail can have any row count up to 32.
const CASES: [(usize, usize, usize); 7] = [
    // The tiny test model's block step (3 down tiles of 8 chunks: 24 blocks).
    (28, 384, 1024),
    // Odd rows, a partial stream tile in both jobs, tiles cut between blocks.
    (17, 520, 1392),
    (1, 256, 512),
    // Two and three 8-row groups with the fold.
    (13, 384, 1024),
    (20, 256, 512),
    // The fold, tail and chain over a partial 128-row stream tile (448 = 3.5 tiles, 7 heads of
    // 64) and a K tail (1392 = 10.875 chunks of 128).
    (17, 448, 1392),
    // LLaDA-8B's batch-1 block step (also timed against the two launches).
    (32, 4096, 12_288),
];

/// What one check case runs: the MLP alone, with the RMSNorm fold (the gate/up job's row scale
/// from given partial sums, the down job's prep), as the layer tail (the attention-output
/// projection first, its prep feeding the gate/up job's row scale; the down job's prep too), or
/// as the layer chain (the tail, then the next layer's QKV projection on the down job's prep,
/// with the RoPE epilogue writing a K/V cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Fold,
    Tail,
    Chain,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Plain, Mode::Fold, Mode::Tail, Mode::Chain];

    fn suffix(self) -> &'static str {
        match self {
            Mode::Plain => "",
            Mode::Fold => " + norm fold",
            Mode::Tail => " layer tail (attention output first) + norm fold",
            Mode::Chain => " layer chain (tail, then the next QKV with RoPE) + norm fold",
        }
    }

    /// Whether the RMSNorm fold runs (every mode but the plain MLP).
    fn folded(self) -> bool {
        self != Mode::Plain
    }

    /// Whether the attention-output projection runs first.
    fn after_out(self) -> bool {
        matches!(self, Mode::Tail | Mode::Chain)
    }

    /// How many stream launches the fused one replaces.
    fn launches(self) -> &'static str {
        match self {
            Mode::Plain | Mode::Fold => "two",
            Mode::Tail => "three",
            Mode::Chain => "four",
        }
    }

    /// Whether the mode applies to `shape`: the fold needs whole 32-column groups, the chain's
    /// QKV heads of 64 or 128 a hidden width of whole 64-column heads.
    fn applies(self, (_, hidden, _): (usize, usize, usize)) -> bool {
        match self {
            Mode::Plain => true,
            Mode::Fold | Mode::Tail => hidden % GROUP_COLS == 0,
            Mode::Chain => hidden % 64 == 0,
        }
    }
}

/// `dllm-gpu-check`'s fused-MLP checks: on each case the fused launch against the stream
/// launches of the same plans (`Gemm::run_plan_fold`), bit for bit in `h` and in the residual;
/// where the hidden width is whole 32-column groups, again with the RMSNorm fold, as the layer
/// tail (three jobs) and as the layer chain (four), bit for bit in the fold's outputs, the QKV
/// activation and the K/V cache too. Nothing to check where the stream kernel is not in use
/// (the Ampere build). Never panics.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let gemm = match checked_gemm(dev) {
        Ok(Some(g)) => g,
        Ok(None) => return vec![],
        Err(e) => return vec![CheckResult::failed("gemm.fused_mlp load", e)],
    };
    CASES
        .iter()
        .enumerate()
        .flat_map(|(ci, &shape)| Mode::ALL.map(|md| (ci, shape, md)))
        .filter(|&(_, shape, md)| md.applies(shape))
        .map(|(ci, shape, md)| {
            let name = format!("{}{}", case_name(shape), md.suffix());
            match check_case(dev, &gemm, ci as u64, shape, md, false) {
                Ok((mismatch, _)) => CheckResult::exact(
                    name,
                    mismatch.is_none(),
                    mismatch.unwrap_or_else(|| {
                        "every output identical to the separate stream launches".to_string()
                    }),
                ),
                Err(e) => CheckResult::failed(name, e),
            }
        })
        .collect()
}

/// The LLaDA-8B block step's MLP timed as one launch and as the two stream launches.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let shape = CASES[CASES.len() - 1];
    time_shape(dev, shape).unwrap_or_else(|e| vec![BenchResult::failed(case_name(shape), e)])
}

/// `(m, hidden, inter)` timed as one launch and as the two stream launches, and (where the fold
/// applies) the layer tail as one launch and as three, the layer chain as one and as four
/// (`dllm-gpu-check --mlp-shape`, which compute-sanitizer runs; empty where the stream kernel
/// is not in use); an error when a fused launch differs from its separate launches, with or
/// without the RMSNorm fold.
pub fn time_shape(dev: &CudaDevice, shape: (usize, usize, usize)) -> Result<Vec<BenchResult>> {
    let name = case_name(shape);
    let Some(gemm) = checked_gemm(dev)? else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    for md in Mode::ALL.into_iter().filter(|md| md.applies(shape)) {
        let timed = md != Mode::Fold;
        let label = format!("{name}{}", md.suffix());
        match check_case(dev, &gemm, 99, shape, md, timed)? {
            (Some(mismatch), _) => return Err(Error::Backend(format!("{label}: {mismatch}"))),
            (None, Some((fused, apart, bytes))) => {
                let launches = md.launches();
                out.push(BenchResult::new(
                    format!("{label} fused"),
                    fused,
                    Some(bytes),
                    None,
                    format!("one launch, identical results; {launches} launches {apart:.4} ms"),
                ));
                out.push(BenchResult::new(
                    format!("{label} {launches} launches"),
                    apart,
                    Some(bytes),
                    None,
                    "the separate stream launches",
                ));
            }
            (None, None) => {}
        }
    }
    Ok(out)
}

fn case_name((m, hidden, inter): (usize, usize, usize)) -> String {
    format!("gemm.fused_mlp m{m} d{hidden} h{inter}")
}

/// A GEMM instance with the fused MLP loaded, or None where the stream kernel is not in use.
fn checked_gemm(dev: &CudaDevice) -> Result<Option<Gemm>> {
    let gemm = Gemm::load(dev)?;
    if !gemm.stream_active() {
        return Ok(None);
    }
    Ok(Some(gemm.with_mlp(dev)?))
}

/// Mismatch description (None when identical) and, when `time`, (fused ms, separate launches
/// ms, weight bytes).
type CaseOutcome = (Option<String>, Option<(f64, f64, f64)>);

/// One path's outputs: h, the residual, the down job's prep (xa, its partial sums), the
/// attention-output job's (xn, its partial sums; the layer tail and chain only), and the QKV
/// job's activation and K/V cache (the layer chain only; one element each otherwise).
struct MlpOutputs {
    h: CudaSlice<u16>,
    r: CudaSlice<f32>,
    xa: CudaSlice<u16>,
    sq_attn: CudaSlice<f32>,
    xn: CudaSlice<u16>,
    sq_ff: CudaSlice<f32>,
    qkv: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

impl MlpOutputs {
    /// Every output downloaded as bits to compare (an f32 as its two halves), with its name and
    /// row width in those units, for `(hidden, inter, partial sums per row)` and the QKV
    /// activation's and cache's row widths.
    fn bits(
        &self,
        dev: &CudaDevice,
        (hidden, inter, parts): (usize, usize, usize),
        (qkv_cols, kv_cols): (usize, usize),
    ) -> Result<[(&'static str, Vec<u16>, usize); 9]> {
        let f32_bits = |s: &CudaSlice<f32>| -> Result<Vec<u16>> {
            Ok(download(dev, s)?
                .iter()
                .flat_map(|v| {
                    let b = v.to_bits();
                    [(b >> 16) as u16, b as u16]
                })
                .collect())
        };
        Ok([
            ("h", download(dev, &self.h)?, inter),
            ("residual", f32_bits(&self.r)?, 2 * hidden),
            ("xa", download(dev, &self.xa)?, hidden),
            ("sq_attn", f32_bits(&self.sq_attn)?, 2 * parts),
            ("xn", download(dev, &self.xn)?, hidden),
            ("sq_ff", f32_bits(&self.sq_ff)?, 2 * parts),
            ("qkv", download(dev, &self.qkv)?, qkv_cols.max(1)),
            ("k cache", download(dev, &self.k)?, kv_cols.max(1)),
            ("v cache", download(dev, &self.v)?, kv_cols.max(1)),
        ])
    }
}

/// The operands of one case.
struct MlpOperands {
    o: CudaSlice<u16>,
    w_o: CudaSlice<u16>,
    x: CudaSlice<u16>,
    w_gu: CudaSlice<u16>,
    w_d: CudaSlice<u16>,
    sq_in: CudaSlice<f32>,
    gamma_ff: CudaSlice<f32>,
    gamma: CudaSlice<f32>,
    /// The layer chain's QKV projection.
    qkv: Option<QkvOperands>,
}

/// The layer chain's next QKV projection: heads of 128 (64 where the hidden width is not whole
/// 128s), as many q heads as fill the hidden width and half as many K/V heads where that count
/// is even (GQA), Dream-like biases, the rows at positions `QKV_OFFSET..` of one sequence whose
/// cache has two spare rows (which must keep their poison).
struct QkvOperands {
    shape: RopeQkvShape,
    seq_rows: usize,
    w: CudaSlice<u16>,
    bias: CudaSlice<f32>,
    table: RopeTable,
}

/// First position of the layer chain's rows.
const QKV_OFFSET: usize = 352;

impl QkvOperands {
    /// The projection's shape for `m` rows of width `hidden`.
    fn shape(m: usize, hidden: usize) -> RopeQkvShape {
        let hd = if hidden.is_multiple_of(128) { 128 } else { 64 };
        let q_heads = hidden / hd;
        let kv_heads = if q_heads.is_multiple_of(2) {
            q_heads / 2
        } else {
            q_heads
        };
        RopeQkvShape {
            rows: m,
            row_stride: hidden + 2 * kv_heads * hd,
            q_heads,
            kv_heads,
            k_col: hidden,
            v_col: hidden + kv_heads * hd,
            head_dim: hd,
            pos_period: m,
            pos_offset: QKV_OFFSET,
            grouped: true,
        }
    }

    fn new(dev: &CudaDevice, seed: u64, m: usize, hidden: usize) -> Result<QkvOperands> {
        let shape = QkvOperands::shape(m, hidden);
        let (n, hd) = (shape.row_stride, shape.head_dim);
        let ew = Elementwise::new(dev)?;
        let inv = upload(dev, &crate::backend::cpu::rope_inv_freq(hd, 10_000.0))?;
        let w = check::random_f32(seed * 10 + 11, n * hidden, -0.05, 0.05);
        Ok(QkvOperands {
            shape,
            seq_rows: QKV_OFFSET + m + 2,
            w: upload(dev, &check::to_bf16_bits(&w))?,
            bias: upload(dev, &check::random_f32(seed * 10 + 12, n, -0.5, 0.5))?,
            table: RopeTable::new(dev, &ew, &inv.as_view(), QKV_OFFSET + m)?,
        })
    }

    /// The QKV columns and the cache's row width.
    fn widths(&self) -> (usize, usize) {
        (self.shape.row_stride, self.shape.kv_width())
    }

    /// The RoPE epilogue into an activation and its caches.
    fn out<'o>(
        &self,
        dev: &CudaDevice,
        qkv: &'o mut CudaSlice<u16>,
        (k, v): (&mut CudaSlice<u16>, &mut CudaSlice<u16>),
    ) -> Result<GemmOut<'o>> {
        let (mut k, mut v) = (k.as_view_mut(), v.as_view_mut());
        let bias = self.bias.as_view();
        let dst = KvDst {
            k: &mut k,
            v: &mut v,
            seq_rows: self.seq_rows,
        };
        let args = RopeArgs::new(dev, &self.shape, &self.table, Some(&bias), Some(dst))?;
        Ok(GemmOut::RopeQkv(qkv.as_view_mut(), args))
    }
}

const EPS: f32 = 1e-5;

fn check_case(
    dev: &CudaDevice,
    gemm: &Gemm,
    seed: u64,
    (m, hidden, inter): (usize, usize, usize),
    md: Mode,
    time: bool,
) -> Result<CaseOutcome> {
    let bf = |s: u64, n: usize| {
        upload(
            dev,
            &check::to_bf16_bits(&check::random_f32(seed * 10 + s, n, -1.0, 1.0)),
        )
    };
    let f32s = |s: u64, n: usize, lo: f32, hi: f32| {
        upload(dev, &check::random_f32(seed * 10 + s, n, lo, hi))
    };
    let parts = hidden / GROUP_COLS;
    let ops = MlpOperands {
        o: bf(7, m * hidden)?,
        w_o: upload(
            dev,
            &check::to_bf16_bits(&check::random_f32(
                seed * 10 + 8,
                hidden * hidden,
                -0.05,
                0.05,
            )),
        )?,
        x: bf(1, m * hidden)?,
        w_gu: bf(2, 2 * inter * hidden)?,
        w_d: bf(3, hidden * inter)?,
        // The fold: given partial sums (random, positive) for the gate/up job's row scale
        // without the tail, and the norms' weights.
        sq_in: f32s(5, m * parts.max(1), 0.5, 40.0)?,
        gamma_ff: f32s(9, hidden, 0.5, 1.5)?,
        gamma: f32s(6, hidden, 0.5, 1.5)?,
        qkv: match md {
            Mode::Chain => Some(QkvOperands::new(dev, seed, m, hidden)?),
            _ => None,
        },
    };
    let (qkv_cols, kv_cols) = ops.qkv.as_ref().map_or((0, 0), QkvOperands::widths);
    let jobs = match md {
        Mode::Plain | Mode::Fold => MlpJobs::Mlp,
        Mode::Tail => MlpJobs::Tail,
        Mode::Chain => MlpJobs::Chain { qkv_cols },
    };
    let plan = gemm.mlp_plan(m, hidden, inter, jobs)?;
    let r0 = check::random_f32(seed * 10 + 4, m * hidden, -1.0, 1.0);
    let cache_len = ops.qkv.as_ref().map_or(1, |q| q.seq_rows * kv_cols);
    let outputs = || -> Result<MlpOutputs> {
        let sq = || {
            upload(
                dev,
                &vec![f32::from_bits(check::POISON_F32_BITS); m * parts.max(1)],
            )
        };
        let poison = |n: usize| upload(dev, &vec![check::POISON_BF16_BITS; n.max(1)]);
        Ok(MlpOutputs {
            h: poison(m * inter)?,
            r: upload(dev, &r0)?,
            xa: poison(m * hidden)?,
            sq_attn: sq()?,
            xn: poison(m * hidden)?,
            sq_ff: sq()?,
            qkv: poison(m * qkv_cols)?,
            k: poison(cache_len)?,
            v: poison(cache_len)?,
        })
    };
    let mut reference = outputs()?;
    let mut got = outputs()?;
    let apart =
        |o: &mut MlpOutputs| separate_launches(dev, gemm, &plan, &ops, o, md, (m, hidden, inter));
    let fused = |o: &mut MlpOutputs| one_launch(dev, gemm, &ops, o, md, (m, hidden, inter));
    apart(&mut reference)?;
    fused(&mut got)?;
    dev.sync()?;
    let dims = (hidden, inter, parts.max(1));
    let widths = (qkv_cols, kv_cols);
    let mut pairs = got
        .bits(dev, dims, widths)?
        .into_iter()
        .zip(reference.bits(dev, dims, widths)?);
    let mismatch = pairs.find_map(|((what, g, width), (_, r, _))| {
        (0..g.len()).find(|&i| g[i] != r[i]).map(|i| {
            format!(
                "{what}[{}, {}] differs from the separate launches' ({:#06x} vs {:#06x}; {plan:?})",
                i / width,
                i % width,
                g[i],
                r[i]
            )
        })
    });
    let timing = if time {
        // The residual keeps growing across the timed calls: harmless for a timing.
        let f = check::time_median_ms(dev, 3, 20, |_| fused(&mut got))?;
        let a = check::time_median_ms(dev, 3, 20, |_| apart(&mut reference))?;
        let out_weights = if md.after_out() { hidden * hidden } else { 0 };
        let weights = 3 * inter * hidden + out_weights + qkv_cols * hidden;
        Some((f, a, (2 * weights) as f64))
    } else {
        None
    };
    Ok((mismatch, timing))
}

/// The case as separate stream launches of the plan's jobs (`Gemm::run_plan_fold`).
fn separate_launches(
    dev: &CudaDevice,
    gemm: &Gemm,
    plan: &MlpPlan,
    ops: &MlpOperands,
    o: &mut MlpOutputs,
    md: Mode,
    (m, hidden, inter): (usize, usize, usize),
) -> Result<()> {
    let fold = md.folded();
    let (gamma_ff, gamma) = (ops.gamma_ff.as_view(), ops.gamma.as_view());
    if let Some(out_plan) = plan.out {
        let (mut xg, mut sq) = (o.xn.as_view_mut(), o.sq_ff.as_view_mut());
        gemm.run_plan_fold(
            dev,
            GemmPlan::Stream(out_plan),
            &ops.o.as_view(),
            &ops.w_o.as_view(),
            GemmOut::AddF32(o.r.as_view_mut()),
            NormFold {
                scale: None,
                prep: Some(NormPrep {
                    gamma: &gamma_ff,
                    xg: &mut xg,
                    sq: &mut sq,
                }),
                eps: EPS,
            },
            m,
            hidden,
            hidden,
        )?;
    }
    // The tail's gate/up reads what its first job wrote; otherwise the given rows and sums.
    let (x, sq_in) = if md.after_out() {
        (o.xn.as_view(), o.sq_ff.as_view())
    } else {
        (ops.x.as_view(), ops.sq_in.as_view())
    };
    gemm.run_plan_fold(
        dev,
        GemmPlan::Stream(plan.up),
        &x,
        &ops.w_gu.as_view(),
        GemmOut::SwigluBf16(o.h.as_view_mut()),
        NormFold {
            scale: fold.then_some(&sq_in),
            prep: None,
            eps: EPS,
        },
        m,
        2 * inter,
        hidden,
    )?;
    {
        let (mut xa, mut sq_attn) = (o.xa.as_view_mut(), o.sq_attn.as_view_mut());
        gemm.run_plan_fold(
            dev,
            GemmPlan::Stream(plan.down),
            &o.h.as_view(),
            &ops.w_d.as_view(),
            GemmOut::AddF32(o.r.as_view_mut()),
            down_fold(fold, &gamma, &mut xa, &mut sq_attn),
            m,
            hidden,
            inter,
        )?;
    }
    let (Some(q), Some(qkv_plan)) = (&ops.qkv, plan.qkv) else {
        return Ok(());
    };
    // The next layer's QKV projection: the down job's prep with its row scale.
    let (xa, sq_attn) = (o.xa.as_view(), o.sq_attn.as_view());
    let n = q.shape.row_stride;
    gemm.run_plan_fold(
        dev,
        GemmPlan::Stream(qkv_plan),
        &xa,
        &q.w.as_view(),
        q.out(dev, &mut o.qkv, (&mut o.k, &mut o.v))?,
        NormFold {
            scale: Some(&sq_attn),
            prep: None,
            eps: EPS,
        },
        m,
        n,
        hidden,
    )
}

/// The down job's fold: with `fold`, the next attention norm's prep (`γ`, into `xa` and the
/// partial sums).
fn down_fold<'a, 'b>(
    fold: bool,
    gamma: &'a CudaView<'b, f32>,
    xa: &'a mut CudaViewMut<'b, u16>,
    sq: &'a mut CudaViewMut<'b, f32>,
) -> NormFold<'a, 'b> {
    NormFold {
        scale: None,
        prep: fold.then_some(NormPrep { gamma, xg: xa, sq }),
        eps: EPS,
    }
}

/// The case as one fused launch (`Gemm::run_mlp`).
fn one_launch(
    dev: &CudaDevice,
    gemm: &Gemm,
    ops: &MlpOperands,
    o: &mut MlpOutputs,
    md: Mode,
    dims: (usize, usize, usize),
) -> Result<()> {
    let fold = md.folded();
    let (gamma_ff, gamma) = (ops.gamma_ff.as_view(), ops.gamma.as_view());
    let (x, sq_in) = (ops.x.as_view(), ops.sq_in.as_view());
    let (ov, w_o) = (ops.o.as_view(), ops.w_o.as_view());
    // The chain's QKV output first (it borrows the activation and cache fields of `o`).
    let w_qkv = ops.qkv.as_ref().map(|q| q.w.as_view());
    let qkv_out = match &ops.qkv {
        Some(q) => Some((
            q.out(dev, &mut o.qkv, (&mut o.k, &mut o.v))?,
            q.shape.row_stride,
        )),
        None => None,
    };
    let (mut xn, mut sq_ff) = (o.xn.as_view_mut(), o.sq_ff.as_view_mut());
    let (input, fold_up) = if md.after_out() {
        (
            MlpInput::AfterOut(MlpOutJob {
                o: &ov,
                w_o: &w_o,
                prep: NormPrep {
                    gamma: &gamma_ff,
                    xg: &mut xn,
                    sq: &mut sq_ff,
                },
                eps: EPS,
            }),
            NormFold {
                scale: None,
                prep: None,
                eps: EPS,
            },
        )
    } else {
        (
            MlpInput::Rows(&x),
            NormFold {
                scale: fold.then_some(&sq_in),
                prep: None,
                eps: EPS,
            },
        )
    };
    let (mut xa, mut sq_attn) = (o.xa.as_view_mut(), o.sq_attn.as_view_mut());
    let fold_down = down_fold(fold, &gamma, &mut xa, &mut sq_attn);
    let qkv = match (&w_qkv, qkv_out) {
        (Some(w), Some((out, n))) => Some(MlpQkvJob { w, out, n }),
        _ => None,
    };
    gemm.run_mlp(
        dev,
        input,
        &ops.w_gu.as_view(),
        &mut o.h.as_view_mut(),
        &ops.w_d.as_view(),
        &mut o.r.as_view_mut(),
        dims,
        (fold_up, fold_down),
        qkv,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_has_a_plan_in_every_mode_it_applies_to() {
        // Planned here as on a 132-SM Hopper, so a case the kernels cannot take fails now and
        // not in a GPU session.
        for &(m, hidden, inter) in &CASES {
            for md in Mode::ALL
                .into_iter()
                .filter(|md| md.applies((m, hidden, inter)))
            {
                let jobs = match md {
                    Mode::Plain | Mode::Fold => MlpJobs::Mlp,
                    Mode::Tail => MlpJobs::Tail,
                    Mode::Chain => MlpJobs::Chain {
                        qkv_cols: QkvOperands::shape(m, hidden).row_stride,
                    },
                };
                let plan = MlpPlan::new(m, hidden, inter, 132, jobs);
                assert!(
                    plan.is_ok(),
                    "m{m} hidden{hidden} inter{inter} {md:?}: {plan:?}"
                );
            }
        }
        // The folded modes cover every 8-row group count of the stream kernel.
        let groups: std::collections::BTreeSet<usize> = CASES
            .iter()
            .filter(|&&c| Mode::Chain.applies(c))
            .map(|c| c.0.div_ceil(8))
            .collect();
        assert_eq!(groups.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    }
}
