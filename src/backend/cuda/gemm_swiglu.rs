//! GPU check of the fused SwiGLU epilogue ([`super::gemm::Epilogue::SwigluBf16`]): every GEMM kernel that
//! implements it (stream, skinny v1 and v2, wide, wgmma at both block heights, the paired TMA
//! kernel), with and without split-K, against the f64 host reference of
//! [`swiglu_layout::swiglu_of_fused`], on odd shapes and into NaN-poisoned outputs with guard
//! elements past the end. Run by `dllm-gpu-check` (part `gemm`); not part of the load-time
//! self-test, which compares every variant's plain epilogue with the naive kernel (the fused
//! epilogue, the default since session 9 unless `DLLM_FUSED_SWIGLU=0`, shares their main loops).

use super::check::{self, CheckResult, TOL_BF16};
use super::gemm::{
    self, Gemm, GemmOut, GemmPlan, GemmVariant, SkinnyPlan, WgmmaPlan, WidePlan, SKINNY2_MAX_M,
    SKINNY_MAX_M,
};
use super::gemm_stream::{StreamPlan, STREAM_MAX_M};
use super::swiglu_layout;
use super::{cuda_err, CudaDevice};
use crate::error::Result;

/// Guard elements past the output, which must keep their poison.
const GUARD: usize = 64;

/// One shape: `m` rows, MLP width `h` (the fused product has `2h` columns), depth `k`.
struct Case {
    m: usize,
    h: usize,
    k: usize,
    a: Vec<u16>,
    w: Vec<u16>,
    want: Vec<f64>,
}

impl Case {
    fn new(m: usize, h: usize, k: usize, seed: u64) -> Case {
        let a = check::to_bf16_bits(&check::random_f32(seed, m * k, -1.0, 1.0));
        let gate = check::to_bf16_bits(&check::random_f32(seed + 1, h * k, -0.5, 0.5));
        let up = check::to_bf16_bits(&check::random_f32(seed + 2, h * k, -0.5, 0.5));
        if !swiglu_layout::supported(h) {
            // A width the layout cannot take: the GEMM must refuse it, so no reference.
            let w = [gate, up].concat();
            return Case {
                m,
                h,
                k,
                a,
                w,
                want: Vec::new(),
            };
        }
        let w = swiglu_layout::interleave(&gate, &up, h, k);
        let cols: Vec<usize> = (0..2 * h).collect();
        let p = gemm::reference(&a, &w, m, k, &cols);
        let want = swiglu_layout::swiglu_of_fused(&p, m, h);
        Case {
            m,
            h,
            k,
            a,
            w,
            want,
        }
    }
}

/// Runs `plan` (or `run`'s own choice when `None`) on `case` into a poisoned output; returns
/// (relative L2 against the reference, detail).
fn check_plan(
    gemm: &Gemm,
    dev: &CudaDevice,
    case: &Case,
    plan: Option<GemmPlan>,
) -> Result<(f64, String)> {
    let (m, n, k, h) = (case.m, 2 * case.h, case.k, case.h);
    let s = &dev.stream;
    let a = s
        .clone_htod(&case.a)
        .map_err(|e| cuda_err("swiglu check: upload A", e))?;
    let w = s
        .clone_htod(&case.w)
        .map_err(|e| cuda_err("swiglu check: upload W", e))?;
    let mut c = s
        .clone_htod(&vec![check::POISON_BF16_BITS; m * h + GUARD])
        .map_err(|e| cuda_err("swiglu check: upload C", e))?;
    let out = GemmOut::SwigluBf16(c.slice_mut(0..m * h));
    match plan {
        Some(p) => gemm.run_plan(dev, p, &a.as_view(), &w.as_view(), out, m, n, k)?,
        None => gemm.run(dev, &a.as_view(), &w.as_view(), out, m, n, k)?,
    }
    let host = s
        .clone_dtoh(&c)
        .map_err(|e| cuda_err("swiglu check: download C", e))?;
    if host[m * h..].iter().any(|&b| b != check::POISON_BF16_BITS) {
        return Ok((f64::INFINITY, "wrote past the end of C".into()));
    }
    let got = check::from_bf16_bits(&host[..m * h]);
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        return Ok((
            f64::INFINITY,
            format!("C[{}, {}] not written (or not finite)", i / h, i % h),
        ));
    }
    let want: Vec<f32> = case.want.iter().map(|&v| v as f32).collect();
    // Per element too (one wrong lane barely moves the relative L2): the result's bf16 rounding
    // (2^-9 relative; 2^-7 allowed) plus 1 % of the RMS for values near zero.
    let rms = (case.want.iter().map(|v| v * v).sum::<f64>() / case.want.len() as f64).sqrt();
    let worst = got
        .iter()
        .zip(&case.want)
        .enumerate()
        .map(|(i, (&g, &w))| ((g as f64 - w).abs() / (w.abs() / 128.0 + 1e-2 * rms), i))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((ratio, i)) = worst.filter(|(r, _)| *r > 1.0) {
        return Ok((
            f64::INFINITY,
            format!(
                "C[{}, {}] = {} against {:.6} ({ratio:.1}× the per-element bound)",
                i / h,
                i % h,
                got[i],
                case.want[i]
            ),
        ));
    }
    Ok((
        check::rel_l2(&got, &want),
        format!(
            "m{m} h{h} k{k}, {}",
            plan.map_or("run's choice".into(), |p| format!("{p:?}"))
        ),
    ))
}

/// The fused-SwiGLU checks (see the module doc); never panics.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let gemm = match Gemm::load(dev) {
        Ok(g) => g,
        Err(e) => return vec![CheckResult::failed("gemm.swiglu load", e)],
    };
    let sms = gemm.num_sms();
    // h = 200: 400 fused rows (a partial 128-row stream tile, a partial 192-column wgmma tile);
    // k = 776: a partial K chunk / tile.
    let (h, k) = (200, 776);
    let mut out = Vec::new();
    // m = 61: the skinny v1 kernel's widest groups (stream and v2 take m ≤ 32).
    for (m, seed) in [(1usize, 11u64), (29, 12), (61, 15), (133, 13)] {
        let case = Case::new(m, h, k, seed);
        let n = 2 * h;
        let mut plans: Vec<Option<GemmPlan>> = vec![None];
        if m <= SKINNY_MAX_M {
            if m <= STREAM_MAX_M && gemm.stream_loaded() {
                for blocks in [sms, 5] {
                    if let Ok(p) = StreamPlan::with_blocks(m, n, k, blocks) {
                        plans.push(Some(GemmPlan::Stream(p)));
                    }
                }
            }
            for version in [1, 2].into_iter().filter(|&v| v == 1 || m <= SKINNY2_MAX_M) {
                plans.push(Some(GemmPlan::Skinny(SkinnyPlan::for_version(
                    version, m, n, k, sms,
                ))));
                plans.push(Some(GemmPlan::Skinny(SkinnyPlan::with_version_chunks(
                    version, m, n, k, 2,
                ))));
            }
        } else {
            plans.push(Some(GemmPlan::Wide(WidePlan::new(m, n, k, sms))));
            plans.push(Some(GemmPlan::Wide(WidePlan::with_ktiles_per_split(
                m, n, k, 8,
            ))));
            let wgmma = gemm.is_enabled(GemmVariant::Wgmma);
            for wg in [2, 3].into_iter().filter(|_| wgmma) {
                for kps in [k.div_ceil(64), 4] {
                    plans.push(Some(GemmPlan::Wgmma(WgmmaPlan::with_ktiles_per_split(
                        wg, m, n, k, kps,
                    ))));
                    if gemm.tma_loaded() {
                        let pairs = WgmmaPlan::paired_with_ktiles_per_split(wg, m, n, k, kps);
                        plans.push(Some(GemmPlan::Tma(pairs)));
                        // The 2 x 2 quads (DLLM_GEMM_TMA4=1) pair gate and up as the pairs do.
                        if gemm.tma4_loaded() {
                            plans.push(Some(GemmPlan::Tma(pairs.quad())));
                        }
                    }
                }
            }
        }
        for plan in plans {
            let name = format!(
                "gemm.swiglu m{m} {}",
                plan.map_or("default".to_string(), |p| plan_name(&p))
            );
            out.push(CheckResult::from_result(
                name,
                TOL_BF16,
                check_plan(&gemm, dev, &case, plan),
            ));
        }
    }
    // Refused with a clear error, nothing launched: the naive kernel (no fused epilogue), and
    // N = 24 (gate/up groups of 8 need N a multiple of 16).
    for (what, case, plan, says) in [
        (
            "naive refused",
            Case::new(3, 16, 8, 14),
            Some(GemmPlan::Naive),
            "no fused SwiGLU",
        ),
        (
            "n % 16 refused",
            Case::new(3, 12, 8, 16),
            None,
            "multiple of 16",
        ),
    ] {
        let refused = matches!(
            check_plan(&gemm, dev, &case, plan),
            Err(e) if e.to_string().contains(says)
        );
        out.push(CheckResult::exact(
            format!("gemm.swiglu {what}"),
            refused,
            format!("must fail with an error saying \"{says}\""),
        ));
    }
    out
}

fn plan_name(p: &GemmPlan) -> String {
    match p {
        GemmPlan::Stream(s) => format!("stream {} blocks", s.blocks),
        GemmPlan::Skinny(s) => format!("skinny v{} {} splits", s.version, s.splits),
        GemmPlan::Wide(w) => format!("wide {} splits", w.splits),
        GemmPlan::Wgmma(w) => format!("wgmma wg{} {} splits", w.wg, w.splits),
        GemmPlan::ClusterSplit(w) => format!("wgmma wg{} {} splits as clusters", w.wg, w.splits),
        GemmPlan::Tma(w) => format!("tma wg{} {} splits", w.wg, w.splits),
        GemmPlan::Naive => "naive".into(),
    }
}
