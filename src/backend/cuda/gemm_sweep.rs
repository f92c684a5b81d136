//! `dllm-gpu-check --gemm-sweep M,N,K`: times every launch plan the GEMM kernels could run one
//! shape with, so that the plan search ([`WgmmaPlan::with_tma`], [`Gemm::stream_plan`]) can be
//! checked against measurement on the real shapes instead of its cost model.
//!
//! For M > 64 the candidates are `gemm_wgmma` and the paired TMA kernel at both block heights
//! (128 and 192 rows) and every K split whose grid fits in two waves; for M ≤ 32 the stream
//! kernel at several block counts and the skinny kernel's own plan. Each plan is timed like
//! `--gemm-shape` (median of `repeat` event-timed launches, rotating weight copies so the set
//! exceeds the L2), and its output compared with the first plan's (relative L2; the plans sum K
//! in different orders, so they agree to bf16 rounding, not bit for bit). The plan
//! [`Gemm::run`] picks is marked `default`.

use super::check::{self, BenchResult, TOL_BF16};
use super::gemm::{BenchBuffers, Epilogue, Gemm, GemmPlan, GemmVariant, WgmmaPlan};
use super::gemm_stream::{StreamPlan, STREAM_MAX_M};
use super::CudaDevice;
use crate::error::{Error, Result};

/// K elements per tile of the wgmma kernels (`WG_BK`).
const WGMMA_BK: usize = 64;

/// The candidate plans for `m × n × k` on `gemm`'s device, the default first.
pub fn candidates(gemm: &Gemm, m: usize, n: usize, k: usize) -> Result<Vec<GemmPlan>> {
    let sms = gemm.num_sms();
    let mut plans = Vec::new();
    if m > 64 {
        if !gemm.is_enabled(GemmVariant::Wgmma) {
            return Err(Error::Unsupported(
                "gemm sweep: the wgmma kernel is not available on this device".into(),
            ));
        }
        plans.push(gemm.wgmma_plan(m, n, k));
        let ktiles = k.div_ceil(WGMMA_BK).max(1);
        for wg in [2, 3] {
            for splits in 1..=ktiles {
                let kps = ktiles.div_ceil(splits);
                let p = WgmmaPlan::with_ktiles_per_split(wg, m, n, k, kps);
                if p.splits != splits {
                    continue; // the same plan as a smaller split count
                }
                if splits > 1 && p.tiles() * splits > 2 * sms {
                    break;
                }
                plans.push(GemmPlan::Wgmma(p));
                if gemm.tma_active() {
                    plans.push(GemmPlan::Tma(WgmmaPlan::paired_with_ktiles_per_split(
                        wg, m, n, k, kps,
                    )));
                }
            }
        }
    } else if m <= STREAM_MAX_M && gemm.stream_active() {
        plans.push(GemmPlan::Stream(gemm.stream_plan(m, n, k)?));
        plans.push(GemmPlan::Stream(StreamPlan::with_blocks(m, n, k, sms)?));
        for blocks in [sms / 2, 3 * sms / 4, 3 * sms / 2, 2 * sms] {
            plans.push(GemmPlan::Stream(StreamPlan::with_blocks(m, n, k, blocks)?));
        }
        plans.push(GemmPlan::Skinny(gemm.skinny_plan(m, n, k)));
    } else {
        plans.push(GemmPlan::Skinny(gemm.skinny_plan(m, n, k)));
    }
    let mut unique: Vec<GemmPlan> = Vec::with_capacity(plans.len());
    for p in plans {
        if !unique.contains(&p) {
            unique.push(p);
        }
    }
    Ok(unique)
}

/// A plan in a few words: kernel, tiles, splits or blocks.
pub fn describe(plan: &GemmPlan) -> String {
    match plan {
        GemmPlan::Wgmma(p) | GemmPlan::Tma(p) => format!(
            "{} wg{} {}×{} tiles × {} splits of {} K tiles",
            if matches!(plan, GemmPlan::Tma(_)) {
                "tma"
            } else {
                "wgmma"
            },
            p.wg,
            p.m_tiles,
            p.n_tiles,
            p.splits,
            p.ktiles_per_split
        ),
        GemmPlan::Stream(p) => format!("stream {} blocks over {} pairs", p.blocks, p.pairs()),
        GemmPlan::Skinny(p) => format!(
            "skinny v{} {} tiles × {} splits",
            p.version, p.tiles, p.splits
        ),
        other => format!("{other:?}"),
    }
}

/// Times every candidate plan of `m × n × k` with epilogue `epi` (the model's residual-adding
/// projections use [`Epilogue::AddF32`]), `repeat` launches each; a plan whose product strays
/// from the first plan's by more than the bf16 tolerance is reported as failed.
pub fn sweep_shape(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    epi: Epilogue,
    repeat: usize,
) -> Result<Vec<BenchResult>> {
    let gemm = Gemm::load(dev)?;
    let plans = candidates(&gemm, m, n, k)?;
    let mut bufs = BenchBuffers::new(dev, m, n, k, epi)?;
    let mut first: Option<Vec<f32>> = None;
    let mut res = Vec::with_capacity(plans.len());
    for (i, plan) in plans.iter().enumerate() {
        let name = format!("gemm.sweep m{m} n{n} k{k} {}", epi.name());
        let ms = bufs.time_n(dev, m, repeat.max(1), |a, w, out| {
            gemm.run_plan(dev, *plan, a, w, out, m, n, k)
        });
        let ms = match ms {
            Ok(ms) => ms,
            Err(e) => {
                res.push(BenchResult::failed(format!("{name} {}", describe(plan)), e));
                continue;
            }
        };
        let out = bufs.product(dev, m, |a, w, out| {
            gemm.run_plan(dev, *plan, a, w, out, m, n, k)
        })?;
        let err = first
            .as_deref()
            .map_or(0.0, |want| check::rel_l2(&out, want));
        if first.is_none() {
            first = Some(out);
        }
        let detail = format!(
            "{}{}, rel L2 vs first {err:.1e}",
            if i == 0 { "default, " } else { "" },
            describe(plan)
        );
        if err > TOL_BF16 {
            res.push(BenchResult::failed(
                name,
                format!("{detail}: output differs beyond {TOL_BF16:.0e}"),
            ));
        } else {
            res.push(BenchResult::new(
                name,
                ms,
                Some((n * k * 2) as f64),
                Some(2.0 * (m * n * k) as f64),
                detail,
            ));
        }
    }
    Ok(res)
}
