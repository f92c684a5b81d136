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
use super::gemm::{
    BenchBuffers, Epilogue, Gemm, GemmPlan, GemmVariant, SkinnyPlan, WgmmaPlan, SKINNY_MAX_M,
    WGMMA_BK,
};
use super::gemm_stream::{StreamPlan, STREAM_MAX_M};
use super::CudaDevice;
use crate::error::{Error, Result};

/// The candidate plans for `m × n × k` on `gemm`'s device, the default first.
pub fn candidates(gemm: &Gemm, m: usize, n: usize, k: usize) -> Result<Vec<GemmPlan>> {
    let stream = m <= STREAM_MAX_M && gemm.stream_active();
    let default = if m > SKINNY_MAX_M {
        if !gemm.is_enabled(GemmVariant::Wgmma) {
            return Err(Error::Unsupported(
                "gemm sweep: the wgmma kernel is not available on this device".into(),
            ));
        }
        gemm.wgmma_plan(m, n, k)
    } else if stream {
        GemmPlan::Stream(gemm.stream_plan(m, n, k)?)
    } else {
        GemmPlan::Skinny(gemm.skinny_plan(m, n, k))
    };
    let offer = Offer {
        sms: gemm.num_sms(),
        tma: gemm.tma_active(),
        tma4: gemm.tma4_active(),
        cluster_split: gemm.cluster_split_active(),
        stream,
        skinny: gemm.skinny_plan(m, n, k),
    };
    plan_list(default, (m, n, k), &offer)
}

/// What a device offers a sweep besides the default plan.
struct Offer {
    sms: usize,
    /// The paired TMA kernel is active (plans for m > 64).
    tma: bool,
    /// The quad TMA kernel is active too (`DLLM_GEMM_TMA4=1`).
    tma4: bool,
    /// The cluster-split kernels are active (`DLLM_GEMM_CLUSTER_SPLIT=1`).
    cluster_split: bool,
    /// The stream kernel serves this m.
    stream: bool,
    /// The skinny kernel's own plan (m ≤ 64).
    skinny: SkinnyPlan,
}

/// `default` first, then for m > 64 every `gemm_wgmma` plan at both block heights whose split
/// grid fits in two waves, each followed by its cluster-split twin where one is compiled and the
/// kernels are active, its paired TMA twin (an odd M tile count gains a
/// phantom tile there) and, with the quads active, its quad twin; for smaller m the stream kernel at
/// several block counts and the skinny plan; no plan twice.
fn plan_list(
    default: GemmPlan,
    (m, n, k): (usize, usize, usize),
    o: &Offer,
) -> Result<Vec<GemmPlan>> {
    let sms = o.sms.max(1);
    let mut plans = vec![default];
    if m > SKINNY_MAX_M {
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
                if o.cluster_split && super::gemm_cluster_split::kernel_index(&p).is_some() {
                    plans.push(GemmPlan::ClusterSplit(p));
                }
                if o.tma {
                    let pairs = WgmmaPlan::paired_with_ktiles_per_split(wg, m, n, k, kps);
                    plans.push(GemmPlan::Tma(pairs));
                    if o.tma4 {
                        plans.push(GemmPlan::Tma(pairs.quad()));
                    }
                }
            }
        }
    } else if o.stream {
        for blocks in [sms, sms / 2, 3 * sms / 4, 3 * sms / 2, 2 * sms] {
            plans.push(GemmPlan::Stream(StreamPlan::with_blocks(m, n, k, blocks)?));
        }
        plans.push(GemmPlan::Skinny(o.skinny));
    } else {
        plans.push(GemmPlan::Skinny(o.skinny));
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
        GemmPlan::Wgmma(p) | GemmPlan::Tma(p) | GemmPlan::ClusterSplit(p) => format!(
            "{}{} wg{} {}×{} tiles × {} splits of {} K tiles",
            p.kind(),
            if matches!(plan, GemmPlan::ClusterSplit(_)) {
                " (cluster split)"
            } else {
                ""
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

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(tma: bool, stream: bool, m: usize, n: usize, k: usize) -> Offer {
        Offer {
            sms: 132,
            tma,
            tma4: tma,
            cluster_split: tma,
            stream,
            skinny: SkinnyPlan::new(m.min(SKINNY_MAX_M), n, k, 132),
        }
    }

    /// Every candidate is a plan its constructor would build for the shape (so `run_plan`
    /// accepts it), the default comes first, none twice, split grids within two waves.
    #[test]
    fn wide_candidates_are_valid_unique_and_bounded() {
        for (m, n, k) in [
            (384, 4096, 4096),
            (384, 4096, 12288),
            (256, 24576, 4096),
            (133, 392, 776),
        ] {
            let default = GemmPlan::Wgmma(WgmmaPlan::new(m, n, k, 132));
            let plans = plan_list(default, (m, n, k), &offer(true, false, m, n, k)).unwrap();
            assert_eq!(plans[0], default);
            for (i, p) in plans.iter().enumerate() {
                p.check_fits(m, n, k).unwrap();
                assert!(!plans[..i].contains(p), "{p:?} twice");
                match p {
                    GemmPlan::Wgmma(w) => {
                        assert!(w.splits == 1 || w.tiles() * w.splits <= 2 * 132, "{w:?}")
                    }
                    // A cluster-split plan comes after its workspace twin (right after it,
                    // unless the twin is the default, listed first).
                    GemmPlan::ClusterSplit(w) => {
                        assert!(plans[..i].contains(&GemmPlan::Wgmma(*w)), "{w:?}");
                        assert!(matches!(w.splits, 2 | 3), "{w:?}");
                    }
                    // A paired plan is the twin of a listed one (its phantom M tile may take
                    // it past two waves).
                    GemmPlan::Tma(w) => assert!(plans.contains(&GemmPlan::Wgmma(
                        WgmmaPlan::with_ktiles_per_split(w.wg, m, n, k, w.ktiles_per_split)
                    ))),
                    _ => {}
                }
            }
            // Every quad follows its pairs twin.
            for (i, p) in plans.iter().enumerate() {
                if let GemmPlan::Tma(w) = p {
                    if w.cluster_n == 2 {
                        assert_eq!(w.n_tiles % 2, 0, "{w:?}");
                        assert!(matches!(plans[i - 1], GemmPlan::Tma(q) if q.quad() == *w));
                    }
                }
            }
            for wg in [2, 3] {
                for cn in [1, 2] {
                    assert!(plans
                        .iter()
                        .any(|p| matches!(p, GemmPlan::Tma(w) if w.wg == wg && w.cluster_n == cn)));
                }
                assert!(plans
                    .iter()
                    .any(|p| matches!(p, GemmPlan::Wgmma(w) if w.wg == wg && w.splits == 1)));
            }
        }
        // The attention-output projection's own plan has its cluster twin.
        let (m, n, k) = (384, 4096, 4096);
        let ws = WgmmaPlan::with_ktiles_per_split(2, m, n, k, 32);
        let default = GemmPlan::Wgmma(WgmmaPlan::new(m, n, k, 132));
        let plans = plan_list(default, (m, n, k), &offer(true, false, m, n, k)).unwrap();
        assert!(plans.contains(&GemmPlan::ClusterSplit(ws)));
        // Without the TMA kernel, no paired plans.
        let (m, n, k) = (384, 4096, 4096);
        let default = GemmPlan::Wgmma(WgmmaPlan::new(m, n, k, 132));
        let plans = plan_list(default, (m, n, k), &offer(false, false, m, n, k)).unwrap();
        assert!(plans.iter().all(|p| matches!(p, GemmPlan::Wgmma(_))));
    }

    #[test]
    fn skinny_candidates_sweep_stream_block_counts() {
        let (m, n, k) = (32, 12288, 4096);
        let default = GemmPlan::Stream(StreamPlan::with_blocks(m, n, k, 132).unwrap());
        let plans = plan_list(default, (m, n, k), &offer(true, true, m, n, k)).unwrap();
        let blocks: Vec<usize> = plans
            .iter()
            .filter_map(|p| match p {
                GemmPlan::Stream(s) => Some(s.blocks),
                _ => None,
            })
            .collect();
        assert_eq!(blocks, vec![132, 66, 99, 198, 264]);
        assert!(matches!(plans.last(), Some(GemmPlan::Skinny(_))));
        for p in &plans {
            p.check_fits(m, n, k).unwrap();
        }
        // Without the stream kernel: the skinny plan alone.
        let skinny = GemmPlan::Skinny(SkinnyPlan::new(m, n, k, 132));
        let plans = plan_list(skinny, (m, n, k), &offer(true, false, m, n, k)).unwrap();
        assert_eq!(plans, vec![skinny]);
    }
}
