//! The RMSNorm fold (`DLLM_NORM_FOLD=1`, opt-in; session 11, not yet run on a GPU): the norm
//! inside each layer becomes part of the GEMMs around it, so its 64 launches per step go.
//!
//! `rmsnorm(x)·Wᵀ = inv_rms(x) ⊙ ((x ⊙ γ)·Wᵀ)`: the norm's per-column part (γ) commutes with the
//! next GEMM and its per-row part (`inv_rms`) with that GEMM's output. So
//! - the GEMM that adds into the residual (attention output, down: [`GemmOut::AddF32`]) also
//!   writes `xg = bf16(x_new ⊙ γ)` and, per row and 32-column group, the sum of squares of
//!   `x_new` ("prep", [`NormPrep`]);
//! - the next GEMM (QKV, gate/up) takes `xg` as its A operand and multiplies its output row `m` by
//!   `1 / sqrt(Σ partials[m] / d + eps)` before its own epilogue ("row scale").
//!
//! The rounding moves from `bf16(x · inv_rms · γ)` to `bf16(x · γ)`: the same relative size. The
//! stream, wgmma, TMA and cluster-split kernels have both halves (`DllmNormEpi` in
//! `cuda/gemm_common.cuh`); [`Gemm::norm_fold_serves`] says whether a shape runs on one of them,
//! and the model keeps its norm kernel wherever either GEMM of a pair would not.

use super::check::{self, BenchResult, CheckResult, TOL_BF16, TOL_F32};
use super::elementwise::Elementwise;
use super::gemm::{download, upload, Epilogue, Gemm, GemmOut};
use super::gemm_rope::RopeEpi;
use super::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};
use half::bf16;

/// Columns per partial sum of squares (one per row and 32-column group of the producer's output).
pub const GROUP_COLS: usize = 32;

/// `DllmNormEpi` of `cuda/gemm_common.cuh`, field for field (device addresses as u64; zero =
/// that half of the fold is off).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NormEpi {
    sq_in: u64,
    gamma: u64,
    xg: u64,
    sq_out: u64,
    parts: i32,
    d: i32,
    eps: f32,
    pad: i32,
}

/// `DllmEpiParams`: the kernel parameter of the stream, wgmma, TMA and cluster-split GEMMs.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpiParams {
    pub rope: RopeEpi,
    pub norm: NormEpi,
}

// SAFETY: plain data (four addresses, two i32, an f32 and an i32 pad: 48 bytes, 8-aligned), the
// layout of the kernels' `DllmNormEpi`.
unsafe impl DeviceRepr for NormEpi {}
// SAFETY: two plain-data structs of 56 and 48 bytes, both 8-aligned: no padding between them.
unsafe impl DeviceRepr for EpiParams {}

impl NormEpi {
    /// The row scale of a `k`-deep consumer reading the partial sums this prep writes (the
    /// fused layer tail, where one launch writes and then reads them): checked by the prep's
    /// [`NormFold::params`], whose `n` is the consumer's `k`.
    pub(super) fn row_scale_of_prep(&self, k: usize, eps: f32) -> Result<NormEpi> {
        if self.sq_out == 0 || !k.is_multiple_of(GROUP_COLS) || !eps.is_finite() || eps < 0.0 {
            return Err(Error::invalid(format!(
                "gemm norm fold: no row scale of k={k} eps={eps} from this prep"
            )));
        }
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::invalid(format!("gemm norm fold: {v} does not fit in i32")))
        };
        Ok(NormEpi {
            sq_in: self.sq_out,
            parts: int(k / GROUP_COLS)?,
            d: int(k)?,
            eps,
            ..NormEpi::default()
        })
    }
}

/// The prep half of the fold, on a residual-adding GEMM `m × n`: `gamma` (`[n]` fp32, the next
/// norm's weight), `xg` (`[m, n]` bf16 bits, written) and `sq` (`[m, n / 32]` fp32, written).
pub struct NormPrep<'a, 'b> {
    pub gamma: &'a CudaView<'b, f32>,
    pub xg: &'a mut CudaViewMut<'b, u16>,
    pub sq: &'a mut CudaViewMut<'b, f32>,
}

/// What a GEMM does of the fold: nothing ([`NormFold::NONE`]), the row scale (`scale`: the
/// `[m, k / 32]` partial sums a prep wrote, `k` the normalised width), the prep, or both.
pub struct NormFold<'a, 'b> {
    pub scale: Option<&'a CudaView<'b, f32>>,
    pub prep: Option<NormPrep<'a, 'b>>,
    /// The norm's epsilon (row scale).
    pub eps: f32,
}

impl NormFold<'_, '_> {
    /// No fold: the GEMM as without it.
    pub const NONE: NormFold<'static, 'static> = NormFold {
        scale: None,
        prep: None,
        eps: 0.0,
    };

    /// Whether any part of the fold is asked for.
    pub fn is_some(&self) -> bool {
        self.scale.is_some() || self.prep.is_some()
    }

    /// The kernel parameter for a GEMM `m × n × k` with epilogue `epi`, after checking every
    /// buffer the kernels will index and every shape rule: the prep only with the residual add,
    /// `n` a multiple of 32 (whole column groups), `gamma` 8-byte aligned (pairs are read), `xg`
    /// 4-byte aligned (pairs are written); the row scale with `k` a multiple of 32 and partials
    /// for every row; eps finite and not negative.
    pub fn params(
        &mut self,
        dev: &CudaDevice,
        epi: Epilogue,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<NormEpi> {
        let mut p = NormEpi::default();
        if !self.is_some() {
            return Ok(p);
        }
        let lens = Lens {
            scale: self.scale.map(|s| s.len()),
            prep: self
                .prep
                .as_ref()
                .map(|q| (q.gamma.len(), q.xg.len(), q.sq.len())),
        };
        validate(&lens, epi, self.eps, m, n, k)?;
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| Error::invalid(format!("gemm norm fold: {v} does not fit in i32")))
        };
        if let Some(s) = self.scale {
            p.sq_in = s.device_ptr(&dev.stream).0;
            p.parts = int(k / GROUP_COLS)?;
            p.d = int(k)?;
            p.eps = self.eps;
        }
        if let Some(q) = self.prep.as_mut() {
            p.gamma = q.gamma.device_ptr(&dev.stream).0;
            p.xg = q.xg.device_ptr_mut(&dev.stream).0;
            p.sq_out = q.sq.device_ptr_mut(&dev.stream).0;
            for (what, addr, align) in [("gamma", p.gamma, 8), ("xg", p.xg, 4), ("sq", p.sq_out, 4)]
            {
                if addr % align != 0 {
                    return Err(Error::invalid(format!(
                        "gemm norm fold: {what} at {addr:#x} is not {align}-byte aligned"
                    )));
                }
            }
        }
        Ok(p)
    }
}

/// Buffer lengths of a fold request: the partial sums read, and (γ, xg, partial sums written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lens {
    scale: Option<usize>,
    prep: Option<(usize, usize, usize)>,
}

/// The shape rules of [`NormFold::params`] (host-testable: lengths only).
fn validate(l: &Lens, epi: Epilogue, eps: f32, m: usize, n: usize, k: usize) -> Result<()> {
    let bad = |why: String| {
        Err(Error::invalid(format!(
            "gemm norm fold ({m}×{n}×{k}): {why}"
        )))
    };
    if let Some(len) = l.scale {
        if !k.is_multiple_of(GROUP_COLS) {
            return bad(format!("the row scale needs k a multiple of {GROUP_COLS}"));
        }
        if len < m.saturating_mul(k / GROUP_COLS) {
            return bad(format!(
                "{len} partial sums for {m} rows of {}",
                k / GROUP_COLS
            ));
        }
        if !eps.is_finite() || eps < 0.0 {
            return bad(format!("eps {eps}"));
        }
    }
    if let Some((gamma, xg, sq)) = l.prep {
        if epi != Epilogue::AddF32 {
            return bad(format!(
                "the prep runs with the residual add, not the {} epilogue",
                epi.name()
            ));
        }
        if !n.is_multiple_of(GROUP_COLS) {
            return bad(format!("the prep needs n a multiple of {GROUP_COLS}"));
        }
        if gamma < n {
            return bad(format!("gamma of {gamma} values"));
        }
        if xg < m.saturating_mul(n) {
            return bad(format!("xg of {xg} values"));
        }
        if sq < m.saturating_mul(n / GROUP_COLS) {
            return bad(format!("{sq} partial sums written"));
        }
    }
    Ok(())
}

/// Host twin of the row scale: `1 / sqrt(Σ_p partials[p] / d + eps)` in f64.
fn row_scale(partials: &[f32], d: usize, eps: f32) -> f64 {
    let s: f64 = partials.iter().map(|&v| v as f64).sum();
    1.0 / (s / d as f64 + eps as f64).sqrt()
}

/// One check shape: rows, the normalised width `d` (the producer's N, the consumer's K), the
/// producer's depth `k` and the consumer's width `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    m: usize,
    d: usize,
    k: usize,
    n: usize,
}

/// Block-step rows (stream kernel, whole and cut tiles), an odd M past the stream kernel's
/// (wgmma), the tiny model's full step and a split-K shape at M = 384 (the attention-output
/// projection's: TMA pairs or cluster split).
const CASES: [Case; 5] = [
    Case {
        m: 32,
        d: 384,
        k: 384,
        n: 1152,
    },
    Case {
        m: 17,
        d: 512,
        k: 1376,
        n: 2048,
    },
    Case {
        m: 133,
        d: 384,
        k: 1024,
        n: 768,
    },
    Case {
        m: 384,
        d: 384,
        k: 384,
        n: 2048,
    },
    Case {
        m: 384,
        d: 4096,
        k: 4096,
        n: 1024,
    },
];

/// `dllm-gpu-check`'s `gemm.norm_fold` checks, on each case the plan [`Gemm::run`] picks serves:
/// - prep: `x += a · w₁ᵀ` with γ, against an f64 host product (the residual, relative L2 within
///   the fp32 tolerance), `xg` bit for bit against `bf16(x_new · γ)` of the device's own `x_new`,
///   the partial sums against the host's sums of squares of it;
/// - row scale: `xg · w₂ᵀ` scaled by the partials, stored fp32 (fp32 tolerance), bf16 and through
///   the fused SwiGLU (bf16 tolerance), against the host's `s[m] · Σ xg · w₂`;
/// - the chain (prep then row scale) against the default path, `rmsnorm_bf16` then the plain
///   GEMM (bf16 tolerance).
///
/// Then, where `gemm_wgmma` runs and the cluster split is not already on, the same again with
/// the cluster-split kernels loaded ([`Gemm::with_cluster_split`]) on the cases whose plans become
/// cluster splits (checks named `… cluster`): the fold's prep and row scale on a rank's share of
/// the tile run only there. Cases a plan does not serve are reported as such. Never panics.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let kit = (|| -> Result<_> { Ok((Gemm::load(dev)?, Elementwise::new(dev)?)) })();
    let (gemm, ew) = match kit {
        Ok(k) => k,
        Err(e) => return vec![CheckResult::failed("gemm.norm_fold load", e)],
    };
    let mut out = check_cases(dev, &gemm, &ew, "", |_| true);
    if gemm.cluster_split_active() || !gemm.is_enabled(super::gemm::GemmVariant::Wgmma) {
        return out;
    }
    match Gemm::load(dev).and_then(|g| g.with_cluster_split(dev)) {
        Ok(cluster) => out.extend(check_cases(dev, &cluster, &ew, " cluster", |c| {
            cluster.runs_cluster_split(c.m, c.d, c.k) || cluster.runs_cluster_split(c.m, c.n, c.d)
        })),
        Err(e) => out.push(CheckResult::failed("gemm.norm_fold cluster load", e)),
    }
    out
}

/// The checks of [`self_check`] through `gemm` on the cases `pick` selects, names suffixed with
/// `label`.
fn check_cases(
    dev: &CudaDevice,
    gemm: &Gemm,
    ew: &Elementwise,
    label: &str,
    pick: impl Fn(&Case) -> bool,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for (i, c) in CASES.iter().enumerate().filter(|(_, c)| pick(c)) {
        let name = |what: &str| {
            format!(
                "gemm.norm_fold {what} m{} d{} k{} n{}{label}",
                c.m, c.d, c.k, c.n
            )
        };
        let f = match Fixture::new(dev, i as u64, c) {
            Ok(f) => f,
            Err(e) => {
                out.push(CheckResult::failed(name("setup"), e));
                continue;
            }
        };
        if !gemm.norm_fold_serves(c.m, c.d, c.k) || !gemm.norm_fold_serves(c.m, c.n, c.d) {
            out.push(CheckResult::exact(
                name("(not served)"),
                true,
                "the GEMMs of this shape run without the fold on this device (the norm kernel runs)",
            ));
            continue;
        }
        out.push(CheckResult::from_result(
            name("prep"),
            TOL_F32,
            f.check_prep(gemm),
        ));
        match f.scale_ref() {
            Ok(r) => {
                for epi in [
                    Epilogue::StoreF32,
                    Epilogue::StoreBf16,
                    Epilogue::SwigluBf16,
                ] {
                    let tol = if epi.bf16_out() { TOL_BF16 } else { TOL_F32 };
                    out.push(CheckResult::from_result(
                        name(&format!("row scale {}", epi.name())),
                        tol,
                        f.check_scale(gemm, &r, epi),
                    ));
                }
            }
            Err(e) => out.push(CheckResult::failed(name("row scale setup"), e)),
        }
        out.push(CheckResult::from_result(
            name("chain vs rmsnorm + gemm"),
            TOL_BF16,
            f.check_chain(gemm, ew),
        ));
    }
    out
}

/// The operands of one case: the residual `x`, the producer's `a`, `w1`, γ, the consumer's `w2`.
struct Fixture<'d> {
    dev: &'d CudaDevice,
    c: Case,
    eps: f32,
    x0: Vec<f32>,
    a: CudaSlice<u16>,
    w1: CudaSlice<u16>,
    gamma: CudaSlice<f32>,
    w2: CudaSlice<u16>,
    a_h: Vec<u16>,
    w1_h: Vec<u16>,
    gamma_h: Vec<f32>,
    w2_h: Vec<u16>,
}

/// The row-scale checks' operands of one case ([`Fixture::scale_ref`]).
struct ScaleRef {
    sq: CudaSlice<f32>,
    xg: CudaSlice<u16>,
    /// The host's scaled product, `[m, n]`.
    scaled: Vec<f64>,
    /// The smallest and largest row scale.
    range: (f64, f64),
}

/// What a prep launch wrote: the residual, xg and the partial sums.
struct Prepped {
    x: CudaSlice<f32>,
    xg: CudaSlice<u16>,
    sq: CudaSlice<f32>,
}

impl<'d> Fixture<'d> {
    fn new(dev: &'d CudaDevice, seed: u64, c: &Case) -> Result<Self> {
        let bf = |s: u64, len: usize, r: f32| {
            check::to_bf16_bits(&check::random_f32(seed * 10 + s, len, -r, r))
        };
        let x0 = check::random_f32(seed * 10 + 1, c.m * c.d, -2.0, 2.0);
        let a_h = bf(2, c.m * c.k, 1.0);
        let w1_h = bf(3, c.d * c.k, 0.05);
        let gamma_h = check::random_f32(seed * 10 + 4, c.d, 0.5, 1.5);
        let w2_h = bf(5, c.n * c.d, 0.05);
        Ok(Fixture {
            dev,
            c: *c,
            eps: 1e-5,
            x0,
            a: upload(dev, &a_h)?,
            w1: upload(dev, &w1_h)?,
            gamma: upload(dev, &gamma_h)?,
            w2: upload(dev, &w2_h)?,
            a_h,
            w1_h,
            gamma_h,
            w2_h,
        })
    }

    /// `x = x0 + a · w1ᵀ` with the prep (into poisoned xg and partials).
    fn prep(&self, gemm: &Gemm) -> Result<Prepped> {
        let Case { m, d, k, .. } = self.c;
        let mut p = Prepped {
            x: upload(self.dev, &self.x0)?,
            xg: upload(self.dev, &vec![check::POISON_BF16_BITS; m * d])?,
            sq: upload(
                self.dev,
                &vec![f32::from_bits(check::POISON_F32_BITS); m * d / GROUP_COLS],
            )?,
        };
        let gamma = self.gamma.as_view();
        let (mut xg, mut sq) = (p.xg.as_view_mut(), p.sq.as_view_mut());
        let fold = NormFold {
            scale: None,
            prep: Some(NormPrep {
                gamma: &gamma,
                xg: &mut xg,
                sq: &mut sq,
            }),
            eps: self.eps,
        };
        let out = GemmOut::AddF32(p.x.as_view_mut());
        gemm.run_fold(
            self.dev,
            &self.a.as_view(),
            &self.w1.as_view(),
            out,
            fold,
            m,
            d,
            k,
        )?;
        Ok(p)
    }

    fn check_prep(&self, gemm: &Gemm) -> Result<(f64, String)> {
        let Case { m, d, k, .. } = self.c;
        let p = self.prep(gemm)?;
        self.dev.sync()?;
        let x = download(self.dev, &p.x)?;
        let xg = download(self.dev, &p.xg)?;
        let sq = download(self.dev, &p.sq)?;
        let cols: Vec<usize> = (0..d).collect();
        let prod = super::gemm::reference(&self.a_h, &self.w1_h, m, k, &cols);
        let want: Vec<f32> = prod
            .iter()
            .zip(&self.x0)
            .map(|(p, x)| (*x as f64 + p) as f32)
            .collect();
        let x_err = check::rel_l2(&x, &want);
        let xg_wrong = (0..m * d)
            .filter(|&i| xg[i] != bf16::from_f32(x[i] * self.gamma_h[i % d]).to_bits())
            .count();
        let sq_want: Vec<f32> = x
            .chunks(GROUP_COLS)
            .map(|g| g.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32)
            .collect();
        let sq_err = check::rel_l2(&sq, &sq_want);
        let detail = format!(
            "x rel L2 {x_err:.2e}, partials {sq_err:.2e}, xg {xg_wrong} of {} differ",
            m * d
        );
        let err = if xg_wrong > 0 {
            f64::INFINITY
        } else {
            x_err.max(sq_err)
        };
        Ok((err, detail))
    }

    /// The row-scale checks' operands, once per case: random positive partial sums (as a prep
    /// of a `d`-wide residual would write), a bf16 A standing for xg, and the host's scaled
    /// product `s[m] · Σ xg · w2` (f64, `[m, n]`).
    fn scale_ref(&self) -> Result<ScaleRef> {
        let Case { m, d, n, .. } = self.c;
        let parts = d / GROUP_COLS;
        let sq_h = check::random_f32(self.c.m as u64 * 31 + 7, m * parts, 0.5, 40.0);
        let xg_h = check::to_bf16_bits(&check::random_f32(91, m * d, -1.5, 1.5));
        let cols: Vec<usize> = (0..n).collect();
        let prod = super::gemm::reference(&xg_h, &self.w2_h, m, d, &cols);
        let s: Vec<f64> = sq_h
            .chunks(parts)
            .map(|p| row_scale(p, d, self.eps))
            .collect();
        let scaled = (0..m * n).map(|i| s[i / n] * prod[i]).collect();
        Ok(ScaleRef {
            sq: upload(self.dev, &sq_h)?,
            xg: upload(self.dev, &xg_h)?,
            scaled,
            range: (min(&s), max(&s)),
        })
    }

    /// The consumer's output with the row scale of `r` and epilogue `epi` (poisoned first)
    /// against the host's.
    fn check_scale(&self, gemm: &Gemm, r: &ScaleRef, epi: Epilogue) -> Result<(f64, String)> {
        let Case { m, d, n, .. } = self.c;
        let sq_v = r.sq.as_view();
        let fold = NormFold {
            scale: Some(&sq_v),
            prep: None,
            eps: self.eps,
        };
        let scaled = |row: usize, c: usize| r.scaled[row * n + c];
        // The consumer GEMM into `out` (one epilogue per call of check_scale).
        let run = |out: GemmOut<'_>| -> Result<()> {
            let (a, w) = (r.xg.as_view(), self.w2.as_view());
            gemm.run_fold(self.dev, &a, &w, out, fold, m, n, d)?;
            self.dev.sync()
        };
        let (got, want): (Vec<f32>, Vec<f32>) = match epi {
            Epilogue::StoreF32 => {
                let mut o = upload(
                    self.dev,
                    &vec![f32::from_bits(check::POISON_F32_BITS); m * n],
                )?;
                run(GemmOut::F32(o.as_view_mut()))?;
                let want = (0..m * n).map(|i| scaled(i / n, i % n) as f32).collect();
                (download(self.dev, &o)?, want)
            }
            Epilogue::StoreBf16 | Epilogue::SwigluBf16 => {
                let swiglu = epi == Epilogue::SwigluBf16;
                let width = if swiglu { n / 2 } else { n };
                let mut o = upload(self.dev, &vec![check::POISON_BF16_BITS; m * width])?;
                run(if swiglu {
                    GemmOut::SwigluBf16(o.as_view_mut())
                } else {
                    GemmOut::Bf16(o.as_view_mut())
                })?;
                let want = (0..m * width)
                    .map(|i| {
                        let (row, c) = (i / width, i % width);
                        if swiglu {
                            // Output column 8 b + i: gate row 16 b + i, up row 16 b + 8 + i.
                            let (b, j) = (c / 8, c % 8);
                            let g = scaled(row, 16 * b + j);
                            let u = scaled(row, 16 * b + 8 + j);
                            (g / (1.0 + (-g).exp()) * u) as f32
                        } else {
                            scaled(row, c) as f32
                        }
                    })
                    .collect();
                (check::from_bf16_bits(&download(self.dev, &o)?), want)
            }
            other => {
                return Err(Error::invalid(format!(
                    "norm fold check: no row-scale case for {}",
                    other.name()
                )))
            }
        };
        let e = check::rel_l2(&got, &want);
        let (lo, hi) = r.range;
        Ok((
            e,
            format!("rel L2 {e:.2e} ({m} rows scaled by {lo:.3}..{hi:.3})"),
        ))
    }

    /// The chain (prep, then the row-scaled GEMM on xg) against the default path on the same
    /// residual: `rmsnorm_bf16`, then the plain GEMM.
    fn check_chain(&self, gemm: &Gemm, ew: &Elementwise) -> Result<(f64, String)> {
        let Case { m, d, n, .. } = self.c;
        let p = self.prep(gemm)?;
        let (w2, gamma) = (self.w2.as_view(), self.gamma.as_view());
        let mut folded = upload(self.dev, &vec![check::POISON_BF16_BITS; m * n])?;
        let sq = p.sq.as_view();
        let fold = NormFold {
            scale: Some(&sq),
            prep: None,
            eps: self.eps,
        };
        let out = GemmOut::Bf16(folded.as_view_mut());
        gemm.run_fold(self.dev, &p.xg.as_view(), &w2, out, fold, m, n, d)?;
        let mut xn = upload(self.dev, &vec![check::POISON_BF16_BITS; m * d])?;
        ew.rmsnorm_bf16(
            &p.x.as_view(),
            &gamma,
            &mut xn.as_view_mut(),
            m,
            d,
            self.eps,
        )?;
        let mut plain = upload(self.dev, &vec![check::POISON_BF16_BITS; m * n])?;
        gemm.run(
            self.dev,
            &xn.as_view(),
            &w2,
            GemmOut::Bf16(plain.as_view_mut()),
            m,
            n,
            d,
        )?;
        self.dev.sync()?;
        let got = check::from_bf16_bits(&download(self.dev, &folded)?);
        let want = check::from_bf16_bits(&download(self.dev, &plain)?);
        let e = check::rel_l2(&got, &want);
        Ok((e, format!("rel L2 {e:.2e} against rmsnorm + gemm")))
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// `dllm-gpu-check`'s `gemm.norm_fold` benches at LLaDA-8B's shapes (d 4096, MLP 12288): the
/// attention-output projection, the norm and the gate/up projection (SwiGLU epilogue) of a b1
/// block step (M = 32) and of a b1 full step (M = 384), folded (prep + row scale: two launches)
/// against the default path (three), medians of 20 in one process; skipped where not served.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let kit = (|| -> Result<_> { Ok((Gemm::load(dev)?, Elementwise::new(dev)?)) })();
    let (gemm, ew) = match kit {
        Ok(k) => k,
        Err(e) => return vec![BenchResult::failed("gemm.norm_fold load", e)],
    };
    let mut out = Vec::new();
    for m in [32, 384] {
        let c = Case {
            m,
            d: 4096,
            k: 4096,
            n: 2 * 12_288,
        };
        let name = format!("gemm.norm_fold 8B attn_out+norm+gate_up m{m}");
        if !gemm.norm_fold_serves(m, c.d, c.k) || !gemm.norm_fold_serves(m, c.n, c.d) {
            continue;
        }
        match time_case(dev, &gemm, &ew, &c) {
            Ok((folded, apart)) => {
                let bytes = Some(((c.d * c.k + c.n * c.d) * 2) as f64);
                out.push(BenchResult::new(
                    format!("{name} folded"),
                    folded,
                    bytes,
                    None,
                    format!("with the norm kernel {apart:.4} ms"),
                ));
                out.push(BenchResult::new(
                    format!("{name} with the norm kernel"),
                    apart,
                    bytes,
                    None,
                    "the default path",
                ));
            }
            Err(e) => out.push(BenchResult::failed(name, e)),
        }
    }
    out
}

/// (folded ms, default path ms) of one case.
fn time_case(dev: &CudaDevice, gemm: &Gemm, ew: &Elementwise, c: &Case) -> Result<(f64, f64)> {
    let f = Fixture::new(dev, 5, c)?;
    let Case { m, d, k, n } = *c;
    let mut x = upload(dev, &f.x0)?;
    let mut xg = upload(dev, &vec![0u16; m * d])?;
    let mut sq = upload(dev, &vec![0f32; m * d / GROUP_COLS])?;
    let mut act = upload(dev, &vec![0u16; m * n / 2])?;
    let (a, w1, w2, gamma) = (
        f.a.as_view(),
        f.w1.as_view(),
        f.w2.as_view(),
        f.gamma.as_view(),
    );
    let folded = check::time_median_ms(dev, 3, 20, |_| {
        let (mut xgv, mut sqv) = (xg.as_view_mut(), sq.as_view_mut());
        let fold = NormFold {
            scale: None,
            prep: Some(NormPrep {
                gamma: &gamma,
                xg: &mut xgv,
                sq: &mut sqv,
            }),
            eps: f.eps,
        };
        gemm.run_fold(
            dev,
            &a,
            &w1,
            GemmOut::AddF32(x.as_view_mut()),
            fold,
            m,
            d,
            k,
        )?;
        let sqv = sq.as_view();
        let fold = NormFold {
            scale: Some(&sqv),
            prep: None,
            eps: f.eps,
        };
        let out = GemmOut::SwigluBf16(act.as_view_mut());
        gemm.run_fold(dev, &xg.as_view(), &w2, out, fold, m, n, d)
    })?;
    let apart = check::time_median_ms(dev, 3, 20, |_| {
        gemm.run(dev, &a, &w1, GemmOut::AddF32(x.as_view_mut()), m, d, k)?;
        ew.rmsnorm_bf16(&x.as_view(), &gamma, &mut xg.as_view_mut(), m, d, f.eps)?;
        let out = GemmOut::SwigluBf16(act.as_view_mut());
        gemm.run(dev, &xg.as_view(), &w2, out, m, n, d)
    })?;
    Ok((folded, apart))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameters_have_the_kernels_layout() {
        // DllmNormEpi: 4 pointers, 2 ints, a float and a pad; DllmEpiParams: rope then norm.
        assert_eq!(std::mem::size_of::<NormEpi>(), 4 * 8 + 4 * 4);
        assert_eq!(std::mem::align_of::<NormEpi>(), 8);
        assert_eq!(
            std::mem::size_of::<EpiParams>(),
            std::mem::size_of::<RopeEpi>() + std::mem::size_of::<NormEpi>()
        );
        assert_eq!(
            std::mem::offset_of!(EpiParams, norm),
            std::mem::size_of::<RopeEpi>()
        );
    }

    #[test]
    fn fold_requests_the_kernels_cannot_serve_are_refused() {
        // LLaDA-8B's attention-output projection (prep) and gate/up projection (row scale), b1.
        let (m, d) = (32, 4096);
        let prep = Lens {
            scale: None,
            prep: Some((d, m * d, m * d / 32)),
        };
        let scale = Lens {
            scale: Some(m * d / 32),
            prep: None,
        };
        assert!(validate(&prep, Epilogue::AddF32, 1e-5, m, d, d).is_ok());
        assert!(validate(&scale, Epilogue::SwigluBf16, 1e-5, m, 24_576, d).is_ok());
        assert!(validate(&scale, Epilogue::RopeQkv, 1e-5, m, 6144, d).is_ok());
        let refused = [
            // The prep writes the new residual: only with the residual add.
            (prep, Epilogue::StoreBf16, 1e-5, d, d),
            // Partial column groups.
            (prep, Epilogue::AddF32, 1e-5, d - 16, d),
            (scale, Epilogue::StoreF32, 1e-5, d, d - 16),
            // Short buffers.
            (
                Lens {
                    prep: Some((d - 1, m * d, m * d / 32)),
                    ..prep
                },
                Epilogue::AddF32,
                1e-5,
                d,
                d,
            ),
            (
                Lens {
                    prep: Some((d, m * d - 1, m * d / 32)),
                    ..prep
                },
                Epilogue::AddF32,
                1e-5,
                d,
                d,
            ),
            (
                Lens {
                    prep: Some((d, m * d, m * d / 32 - 1)),
                    ..prep
                },
                Epilogue::AddF32,
                1e-5,
                d,
                d,
            ),
            (
                Lens {
                    scale: Some(m * d / 32 - 1),
                    ..scale
                },
                Epilogue::StoreF32,
                1e-5,
                d,
                d,
            ),
            // A negative or NaN epsilon.
            (scale, Epilogue::StoreF32, -1e-5, d, d),
            (scale, Epilogue::StoreF32, f32::NAN, d, d),
        ];
        for (l, epi, eps, n, k) in refused {
            assert!(
                validate(&l, epi, eps, m, n, k).is_err(),
                "{l:?} {epi:?} {eps} n{n} k{k}"
            );
        }
    }

    #[test]
    fn a_case_plans_a_cluster_split_on_hopper() {
        // The cluster pass of `self_check` runs the cases whose plans become cluster splits; on
        // a 132-SM Hopper the 8B attention-output shape (M = 384, 4096 × 4096) must be one, or
        // that pass would check nothing.
        use super::super::gemm::{GemmPlan, WgmmaPlan};
        let c = CASES.iter().find(|c| c.m == 384 && c.k == 4096).unwrap();
        for tma in [false, true] {
            let plan = WgmmaPlan::launch_for(c.m, c.d, c.k, 132, tma);
            assert!(matches!(plan, GemmPlan::ClusterSplit(_)), "{plan:?}");
        }
    }

    #[test]
    fn the_fold_equals_the_norm_then_the_product() {
        // rmsnorm(x)·w against inv_rms(x) · ((x ⊙ γ)·w) in f64, on a hand-sized case, with the
        // partial sums in 32-column groups as the prep writes them and the host row scale.
        let d = 64;
        let x: Vec<f32> = (0..d).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3).collect();
        let gamma: Vec<f32> = (0..d).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
        let w: Vec<f32> = (0..d).map(|i| ((i * 3 % 11) as f32 - 5.0) * 0.1).collect();
        let eps = 1e-5f32;
        let ms: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        let want: f64 = (0..d)
            .map(|i| x[i] as f64 * inv * gamma[i] as f64 * w[i] as f64)
            .sum();
        let partials: Vec<f32> = x
            .chunks(GROUP_COLS)
            .map(|g| g.iter().map(|&v| v * v).sum())
            .collect();
        assert_eq!(partials.len(), 2);
        let folded: f64 = (0..d)
            .map(|i| x[i] as f64 * gamma[i] as f64 * w[i] as f64)
            .sum::<f64>()
            * row_scale(&partials, d, eps);
        assert!(
            (folded - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{folded} vs {want}"
        );
    }
}
