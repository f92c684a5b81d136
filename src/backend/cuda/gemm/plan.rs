//! Launch plans of the GEMM kernels, host logic only (unit-tested below): the skinny kernels'
//! tiles and K splits, the wide kernel's, and the wgmma / TMA kernels' block height, split count
//! and cluster choice by a cost model of waves and K tiles; [`GemmPlan`] is the launch
//! [`Gemm::run_plan`] takes.

use super::*;

/// Launch geometry of the skinny kernel: `groups` 8-token mma groups, `tiles` blocks of
/// [`SkinnyPlan::rows`] weight rows along N, and `splits` blocks along K, each taking
/// `chunks_per_split` chunks of 32 K elements (the last split may take fewer). `version` 1 is
/// `gemm_skinny_mg{groups}` (16 weight rows per warp, 64 per block, any `m ≤ 64`); version 2 is
/// `gemm_skinny2_mg{groups}` (32 rows per warp, 128 per block, `m ≤ 32`): each activation
/// fragment serves twice as many weight rows, halving the activation re-reads per weight byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyPlan {
    pub groups: usize,
    pub tiles: usize,
    pub splits: usize,
    pub chunks_per_split: usize,
    pub version: usize,
}

impl SkinnyPlan {
    /// The plan [`Gemm::run`] uses on a GPU with `num_sms` multiprocessors: split K into the
    /// largest number of splits whose blocks still fit in one wave of `SKINNY_BLOCKS_PER_SM`
    /// blocks per SM (a grid slightly larger than one wave leaves a slow, nearly empty second
    /// wave: 192 tiles × 3 splits = 576 blocks on 528 slots was measured at ~55 % of copy
    /// bandwidth), never below `SKINNY_MIN_CHUNKS_PER_SPLIT` chunks per split, with a chunk
    /// count per split that is a multiple of the kernel's unroll. Requires `1 ≤ m ≤ 64`,
    /// `n ≥ 1`, `k ≥ 1`.
    /// The preferred version is 2 for `m ≤ SKINNY2_MAX_M`, else 1.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> SkinnyPlan {
        SkinnyPlan::for_version(SkinnyPlan::preferred_version(m), m, n, k, num_sms)
    }

    /// The kernel version [`SkinnyPlan::new`] picks for `m` rows.
    pub fn preferred_version(m: usize) -> usize {
        if m <= SKINNY2_MAX_M {
            2
        } else {
            1
        }
    }

    /// The version a request resolves to: 2 only when asked for and `m ≤ SKINNY2_MAX_M`.
    fn resolve_version(version: usize, m: usize) -> usize {
        if version == 2 && m <= SKINNY2_MAX_M {
            2
        } else {
            1
        }
    }

    /// [`SkinnyPlan::new`] for an explicit kernel version (2 falls back to 1 when `m > 32`).
    pub fn for_version(version: usize, m: usize, n: usize, k: usize, num_sms: usize) -> SkinnyPlan {
        let version = SkinnyPlan::resolve_version(version, m);
        let tiles = n.div_ceil(SkinnyPlan::rows_of(version));
        let chunks = k.div_ceil(SKINNY_CHUNK);
        let slots = num_sms.max(1) * SKINNY_BLOCKS_PER_SM;
        let max_splits = (chunks / SKINNY_MIN_CHUNKS_PER_SPLIT).max(1);
        let splits = (slots / tiles.max(1)).clamp(1, max_splits);
        let unroll = if version == 2 {
            SKINNY2_UNROLL
        } else {
            SKINNY_UNROLL
        };
        let per_split = chunks.div_ceil(splits).next_multiple_of(unroll);
        SkinnyPlan::with_version_chunks(version, m, n, k, per_split)
    }

    /// A version-1 plan with a given number of chunks per split (checks use it to force
    /// split-K on small shapes). `chunks_per_split` is raised to at least 1.
    pub fn with_chunks_per_split(
        m: usize,
        n: usize,
        k: usize,
        chunks_per_split: usize,
    ) -> SkinnyPlan {
        SkinnyPlan::with_version_chunks(1, m, n, k, chunks_per_split)
    }

    /// [`SkinnyPlan::with_chunks_per_split`] for an explicit kernel version (2 falls back to 1
    /// when `m > 32`).
    pub fn with_version_chunks(
        version: usize,
        m: usize,
        n: usize,
        k: usize,
        chunks_per_split: usize,
    ) -> SkinnyPlan {
        let version = SkinnyPlan::resolve_version(version, m);
        let chunks = k.div_ceil(SKINNY_CHUNK).max(1);
        let per_split = chunks_per_split.max(1);
        SkinnyPlan {
            groups: m.div_ceil(8).max(1),
            tiles: n.div_ceil(SkinnyPlan::rows_of(version)),
            splits: chunks.div_ceil(per_split),
            chunks_per_split: per_split,
            version,
        }
    }

    fn rows_of(version: usize) -> usize {
        if version == 2 {
            SKINNY_ROWS * SKINNY2_RT
        } else {
            SKINNY_ROWS
        }
    }

    /// Weight rows per block (64 for version 1, 128 for version 2).
    pub fn rows(&self) -> usize {
        SkinnyPlan::rows_of(self.version)
    }

    /// fp32 elements of split-K workspace the launch needs (0 without split-K).
    pub fn workspace_floats(&self) -> usize {
        let rt = if self.version == 2 { SKINNY2_RT } else { 1 };
        if self.splits > 1 {
            self.tiles * self.splits * rt * self.groups * SKINNY_THREADS * 4
        } else {
            0
        }
    }
}

/// Launch geometry of the wide kernel: `m_tiles × n_tiles` output tiles of 128×128, each split
/// along K into `splits` blocks of `ktiles_per_split` 32-wide K tiles (the last may take fewer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidePlan {
    pub m_tiles: usize,
    pub n_tiles: usize,
    pub splits: usize,
    pub ktiles_per_split: usize,
}

impl WidePlan {
    /// The plan [`Gemm::run`] uses: split K only when the output tiles cannot fill one wave of
    /// `WIDE_BLOCKS_PER_SM` blocks per SM, as far as still fits in that wave, never below
    /// `WIDE_MIN_KTILES_PER_SPLIT` K tiles per split. Requires `m, n, k ≥ 1`.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> WidePlan {
        let tiles = m.div_ceil(WIDE_BM) * n.div_ceil(WIDE_BN);
        let ktiles = k.div_ceil(WIDE_BK);
        let slots = num_sms.max(1) * WIDE_BLOCKS_PER_SM;
        let max_splits = (ktiles / WIDE_MIN_KTILES_PER_SPLIT).max(1);
        let splits = (slots / tiles.max(1)).clamp(1, max_splits);
        WidePlan::with_ktiles_per_split(m, n, k, ktiles.div_ceil(splits))
    }

    /// A plan with a given number of K tiles per split (checks use it to force split-K on
    /// small shapes). `ktiles_per_split` is raised to at least 1.
    pub fn with_ktiles_per_split(
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
    ) -> WidePlan {
        let per_split = ktiles_per_split.max(1);
        WidePlan {
            m_tiles: m.div_ceil(WIDE_BM),
            n_tiles: n.div_ceil(WIDE_BN),
            splits: k.div_ceil(WIDE_BK).max(1).div_ceil(per_split),
            ktiles_per_split: per_split,
        }
    }

    /// Output tiles (blocks per split).
    pub fn tiles(&self) -> usize {
        self.m_tiles * self.n_tiles
    }

    /// fp32 elements of split-K workspace the launch needs (0 without split-K).
    pub fn workspace_floats(&self) -> usize {
        if self.splits > 1 {
            self.tiles() * self.splits * WIDE_BM * WIDE_BN
        } else {
            0
        }
    }
}

/// Launch geometry of the wgmma kernel: `gemm_wgmma_wg{wg}` (block tile `64·wg × 192`),
/// `m_tiles × n_tiles` output tiles, each split along K into `splits` blocks of
/// `ktiles_per_split` 64-wide K tiles (the last may take fewer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgmmaPlan {
    pub wg: usize,
    pub m_tiles: usize,
    pub n_tiles: usize,
    pub splits: usize,
    pub ktiles_per_split: usize,
    /// For the cluster kernel `gemm_tma` (blocks in pairs along M): `m_tiles` is rounded up to
    /// an even count (a block past M loads zeros and stores nothing).
    pub paired: bool,
    /// Cluster blocks along N of a paired plan: 1 (pairs, `gemm_tma`) or 2 (2 × 2 quads that
    /// also share the A tile, `gemm_tma4`; `n_tiles` rounded up to even, a phantom N tile
    /// loading zeros and storing nothing).
    pub cluster_n: usize,
}

impl WgmmaPlan {
    /// The plan `gemm_wgmma` runs on `num_sms` multiprocessors (one block per SM): the block
    /// height (128 or 192 rows) and K split that minimise the modelled time
    /// `waves · BM · (K tiles per split + split overhead)`, ties (within 5 %) going to the
    /// taller tile (more work per shared-memory byte). Splits only while all blocks fit in
    /// one wave, never below `WGMMA_MIN_KTILES_PER_SPLIT` K tiles per split.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> WgmmaPlan {
        WgmmaPlan::search(m, n, k, num_sms, false, false).0
    }

    /// The plan [`Gemm::run`] uses when the TMA cluster kernel is active: [`WgmmaPlan::new`]'s
    /// search with the plans that pair without a phantom tile (even M tile count) costed at
    /// `TMA_PAIR_COST` of the others, as measured; returned [`WgmmaPlan::paired`] when such a
    /// plan wins. At M = 384 on the down projection (4096 × 12288) this picks 2 × 22 tiles of
    /// 192 rows × 3 splits in pairs over `gemm_wgmma`'s 3 × 22 of 128 rows × 2 splits.
    pub fn with_tma(m: usize, n: usize, k: usize, num_sms: usize) -> WgmmaPlan {
        WgmmaPlan::search(m, n, k, num_sms, true, false).0
    }

    /// The launch [`WgmmaPlan::with_tma`]'s search picks when the cluster-split kernels are
    /// active too: a split plan that one of them runs ([`gemm_cluster_split::KERNELS`]) is costed
    /// with `CLUSTER_SPLIT_COST_KTILES` per split instead of the workspace's
    /// `WGMMA_SPLIT_COST_KTILES` (and without the TMA pairs' discount), so it can win over the
    /// pairs: `GemmPlan::ClusterSplit`, `GemmPlan::Tma` (pairs, `tma` only) or `GemmPlan::Wgmma`.
    pub fn launch_for(m: usize, n: usize, k: usize, num_sms: usize, tma: bool) -> GemmPlan {
        match WgmmaPlan::search(m, n, k, num_sms, tma, true) {
            (p, true) => GemmPlan::ClusterSplit(p),
            (p, false) if p.paired => GemmPlan::Tma(p),
            (p, false) => GemmPlan::Wgmma(p),
        }
    }

    /// The cheapest plan (paired where the pairs win, with `tma`) and whether it runs as
    /// clusters (only with `cluster`).
    fn search(
        m: usize,
        n: usize,
        k: usize,
        num_sms: usize,
        tma: bool,
        cluster: bool,
    ) -> (WgmmaPlan, bool) {
        let sms = num_sms.max(1);
        let ktiles = k.div_ceil(WGMMA_BK).max(1);
        let max_splits = (ktiles / WGMMA_MIN_KTILES_PER_SPLIT).max(1);
        let mut best: Option<(usize, WgmmaPlan, bool)> = None;
        for wg in [3usize, 2] {
            let bm = 64 * wg;
            let tiles = WgmmaPlan::build(wg, m, n, k, ktiles, false).tiles();
            for splits in 1..=max_splits {
                if splits > 1 && tiles * splits > sms {
                    break;
                }
                let kps = ktiles.div_ceil(splits);
                let plan = WgmmaPlan::build(wg, m, n, k, kps, false);
                let waves = (tiles * plan.splits).div_ceil(sms);
                // ×20 for wg = 3, ×21 for wg = 2: the 5 % preference for taller tiles.
                let cost_with = |per_split: usize| {
                    let overhead = if plan.splits > 1 {
                        per_split * plan.splits
                    } else {
                        0
                    };
                    waves * bm * (kps + overhead) * if wg == 3 { 20 } else { 21 }
                };
                let plain = cost_with(WGMMA_SPLIT_COST_KTILES);
                let mut options = vec![(plain, plan, false)];
                if tma && plan.m_tiles.is_multiple_of(2) {
                    let paired = plain * TMA_PAIR_COST.0 / TMA_PAIR_COST.1;
                    options.push((paired, plan.paired(), false));
                }
                if cluster && gemm_cluster_split::kernel_index(&plan).is_some() {
                    options.push((cost_with(CLUSTER_SPLIT_COST_KTILES), plan, true));
                }
                for option in options {
                    if best.as_ref().is_none_or(|b| option.0 < b.0) {
                        best = Some(option);
                    }
                }
            }
        }
        best.map_or_else(
            || (WgmmaPlan::build(3, m, n, k, ktiles, false), false),
            |(_, p, clusters)| (p, clusters),
        )
    }

    /// A plan with a given kernel (`wg` 2 or 3; other values are clamped) and number of K tiles
    /// per split (checks use it to force split-K). `ktiles_per_split` is raised to at least 1.
    pub fn with_ktiles_per_split(
        wg: usize,
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
    ) -> WgmmaPlan {
        WgmmaPlan::build(wg, m, n, k, ktiles_per_split, false)
    }

    /// This plan for the paired TMA kernel: the same tiles and split, the M tile count rounded
    /// up to even (a phantom tile, when added, loads zeros and stores nothing).
    pub fn paired(&self) -> WgmmaPlan {
        WgmmaPlan {
            m_tiles: self.m_tiles.next_multiple_of(2),
            paired: true,
            ..*self
        }
    }

    /// The kernel that runs this plan, for reports: `wgmma`, `tma` (pairs) or `tma4` (quads).
    pub fn kind(&self) -> &'static str {
        match (self.paired, self.cluster_n) {
            (false, _) => "wgmma",
            (true, 2) => "tma4",
            (true, _) => "tma",
        }
    }

    /// This plan for the quad TMA kernel `gemm_tma4`: [`WgmmaPlan::paired`] with the N tile
    /// count also rounded up to even.
    pub fn quad(&self) -> WgmmaPlan {
        let pairs = self.paired();
        WgmmaPlan {
            n_tiles: pairs.n_tiles.next_multiple_of(2),
            cluster_n: 2,
            ..pairs
        }
    }

    /// [`WgmmaPlan::with_ktiles_per_split`] for the paired TMA kernel (even `m_tiles`).
    pub fn paired_with_ktiles_per_split(
        wg: usize,
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
    ) -> WgmmaPlan {
        WgmmaPlan::build(wg, m, n, k, ktiles_per_split, true)
    }

    fn build(
        wg: usize,
        m: usize,
        n: usize,
        k: usize,
        ktiles_per_split: usize,
        paired: bool,
    ) -> WgmmaPlan {
        let wg = wg.clamp(2, 3);
        let per_split = ktiles_per_split.max(1);
        let m_tiles = m.div_ceil(64 * wg);
        WgmmaPlan {
            wg,
            m_tiles: if paired {
                m_tiles.next_multiple_of(2)
            } else {
                m_tiles
            },
            n_tiles: n.div_ceil(WGMMA_BN),
            splits: k.div_ceil(WGMMA_BK).max(1).div_ceil(per_split),
            ktiles_per_split: per_split,
            paired,
            cluster_n: 1,
        }
    }

    /// Output tiles (blocks per split).
    pub fn tiles(&self) -> usize {
        self.m_tiles * self.n_tiles
    }

    /// Rows per block tile.
    pub fn bm(&self) -> usize {
        64 * self.wg
    }

    /// fp32 elements of split-K workspace the launch needs (0 without split-K).
    pub fn workspace_floats(&self) -> usize {
        if self.splits > 1 {
            self.tiles() * self.splits * self.bm() * WGMMA_BN
        } else {
            0
        }
    }
}

/// The kernel and geometry of one launch ([`Gemm::run_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPlan {
    Naive,
    Skinny(SkinnyPlan),
    Wide(WidePlan),
    Wgmma(WgmmaPlan),
    Stream(StreamPlan),
    /// `gemm_tma` (clusters of two blocks along M; the plan has `paired` set), or `gemm_tma4`
    /// (2 × 2 quads) when the plan's `cluster_n` is 2.
    Tma(WgmmaPlan),
    /// A `gemm_wgmma` split-K plan run by `gemm_wgmma_wg{wg}_cs{splits}`: the splits of a tile
    /// are one cluster and reduce through distributed shared memory ([`gemm_cluster_split`]).
    ClusterSplit(WgmmaPlan),
}

impl GemmPlan {
    /// Whether the plan's kernel has the RoPE epilogue ([`GemmOut::RopeQkv`]): the stream,
    /// wgmma, TMA and cluster-split kernels.
    pub fn has_rope_epilogue(&self) -> bool {
        matches!(
            self,
            GemmPlan::Stream(_) | GemmPlan::Wgmma(_) | GemmPlan::Tma(_) | GemmPlan::ClusterSplit(_)
        )
    }

    /// Whether the plan's kernel has the RMSNorm fold's prep and row scale
    /// ([`crate::backend::cuda::gemm_norm`]): the stream, wgmma, TMA and cluster-split kernels.
    pub fn has_norm_fold(&self) -> bool {
        matches!(
            self,
            GemmPlan::Stream(_) | GemmPlan::Wgmma(_) | GemmPlan::Tma(_) | GemmPlan::ClusterSplit(_)
        )
    }

    /// Refuses a plan that is not what its constructor gives for `m × n × k` (a hand-made plan
    /// could otherwise launch a grid that does not cover the output, or overruns a buffer).
    pub(in crate::backend::cuda) fn check_fits(&self, m: usize, n: usize, k: usize) -> Result<()> {
        let fits = match *self {
            GemmPlan::Naive => true,
            GemmPlan::Skinny(p) => {
                m <= SKINNY_MAX_M
                    && p == SkinnyPlan::with_version_chunks(p.version, m, n, k, p.chunks_per_split)
            }
            GemmPlan::Wide(p) => p == WidePlan::with_ktiles_per_split(m, n, k, p.ktiles_per_split),
            GemmPlan::Wgmma(p) => {
                p == WgmmaPlan::with_ktiles_per_split(p.wg, m, n, k, p.ktiles_per_split)
            }
            GemmPlan::ClusterSplit(p) => {
                p == WgmmaPlan::with_ktiles_per_split(p.wg, m, n, k, p.ktiles_per_split)
                    && gemm_cluster_split::kernel_index(&p).is_some()
            }
            GemmPlan::Stream(p) => StreamPlan::with_blocks(m, n, k, p.blocks).is_ok_and(|q| q == p),
            GemmPlan::Tma(p) => {
                let pairs =
                    WgmmaPlan::paired_with_ktiles_per_split(p.wg, m, n, k, p.ktiles_per_split);
                p == pairs || p == pairs.quad()
            }
        };
        if fits {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "gemm: plan {self:?} does not fit m={m} n={n} k={k}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every K chunk belongs to exactly one split and no split is empty.
    fn assert_covers(p: &SkinnyPlan, k: usize) {
        let chunks = k.div_ceil(32);
        assert!(p.splits >= 1);
        assert!((p.splits - 1) * p.chunks_per_split < chunks, "{p:?} k={k}");
        assert!(p.splits * p.chunks_per_split >= chunks, "{p:?} k={k}");
    }

    #[test]
    fn skinny_plans_for_llada_shapes_on_h100() {
        // Version 1, hand-derived: 132 SMs × 4 blocks = 528 slots; 192 tiles fit twice
        // (384 blocks), 64 tiles eight times (512 blocks).
        let p = SkinnyPlan::for_version(1, 32, 12288, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 192,
                splits: 2,
                chunks_per_split: 64,
                version: 1,
            }
        );
        let p = SkinnyPlan::for_version(1, 32, 4096, 12288, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 64,
                splits: 8,
                chunks_per_split: 48,
                version: 1,
            }
        );
        let p = SkinnyPlan::for_version(1, 32, 126_464, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 1976,
                splits: 1,
                chunks_per_split: 128,
                version: 1,
            }
        );
        assert_eq!(p.workspace_floats(), 0);
        // Version 2 (128 rows per block): 96 tiles fit 5 times (528 / 96 = 5.5): 128 chunks
        // in splits of 26 (rounded to the unroll of 2) = 5 splits, 480 blocks; 32 tiles fit
        // 16 times: 384 chunks / 16 = 24 per split, 512 blocks; the LM head is 988 tiles.
        let p = SkinnyPlan::new(32, 12288, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 96,
                splits: 5,
                chunks_per_split: 26,
                version: 2,
            }
        );
        assert_eq!(p.rows(), 128);
        assert_eq!(p.workspace_floats(), 96 * 5 * 2 * 4 * 128 * 4);
        let p = SkinnyPlan::new(32, 4096, 12288, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 32,
                splits: 16,
                chunks_per_split: 24,
                version: 2,
            }
        );
        let p = SkinnyPlan::new(32, 126_464, 4096, 132);
        assert_eq!(
            p,
            SkinnyPlan {
                groups: 4,
                tiles: 988,
                splits: 1,
                chunks_per_split: 128,
                version: 2,
            }
        );
        assert_eq!(p.workspace_floats(), 0);
        let p = SkinnyPlan::new(1, 12288, 4096, 132);
        assert_eq!((p.groups, p.version), (1, 2));
        // m > 32 is version 1 only, whatever is asked.
        let p = SkinnyPlan::new(64, 12288, 4096, 132);
        assert_eq!((p.groups, p.version, p.rows()), (8, 1, 64));
        assert_eq!(SkinnyPlan::for_version(2, 33, 8, 8, 132).version, 1);
        assert_eq!(SkinnyPlan::with_version_chunks(2, 40, 8, 8, 1).version, 1);
        assert_eq!(SkinnyPlan::new(33, 8, 8, 132).groups, 5);
        assert_eq!(SkinnyPlan::preferred_version(32), 2);
        assert_eq!(SkinnyPlan::preferred_version(33), 1);
    }

    #[test]
    fn skinny_plans_cover_k_exactly() {
        for k in [8, 328, 4096, 12288, 8 * 1001] {
            for n in [8, 296, 4096, 126_464] {
                for sms in [1, 78, 132] {
                    for (m, version, unroll) in [(32, 1, SKINNY_UNROLL), (32, 2, SKINNY2_UNROLL)] {
                        let p = SkinnyPlan::for_version(version, m, n, k, sms);
                        assert_eq!(p.version, version);
                        assert_eq!(p.tiles, n.div_ceil(p.rows()));
                        assert_covers(&p, k);
                        assert_eq!(p.chunks_per_split % unroll, 0);
                        // Split grids fit in one wave of 4 blocks per SM.
                        assert!(p.splits == 1 || p.tiles * p.splits <= 4 * sms, "{p:?}");
                        if p.splits > 1 {
                            assert!(p.chunks_per_split >= SKINNY_MIN_CHUNKS_PER_SPLIT);
                        }
                    }
                }
            }
            for cps in [1, 3, 4, 7, 1000] {
                assert_covers(&SkinnyPlan::with_chunks_per_split(5, 296, k, cps), k);
                assert_covers(&SkinnyPlan::with_version_chunks(2, 29, 296, k, cps), k);
            }
        }
        // Forced split on K = 328 (11 chunks): 4 + 4 + 3.
        let p = SkinnyPlan::with_chunks_per_split(3, 296, 328, 4);
        assert_eq!((p.splits, p.tiles, p.groups, p.version), (3, 5, 1, 1));
        assert_eq!(p.workspace_floats(), 5 * 3 * 128 * 4);
        // Version 2: 296 rows = 3 tiles of 128 (the last partial); two row tiles per warp.
        let p = SkinnyPlan::with_version_chunks(2, 3, 296, 328, 4);
        assert_eq!((p.splits, p.tiles, p.groups, p.version), (3, 3, 1, 2));
        assert_eq!(p.workspace_floats(), 3 * 3 * 2 * 128 * 4);
    }

    #[test]
    fn wide_plans() {
        // 132 SMs × 2 = 264 slots.
        let p = WidePlan::new(3072, 12288, 4096, 132);
        assert_eq!((p.m_tiles, p.n_tiles, p.splits), (24, 96, 1));
        assert_eq!(p.workspace_floats(), 0);
        // Down projection at batch 8 (M = 256): 2 × 32 = 64 tiles, 264 / 64 = 4 splits of 96.
        let p = WidePlan::new(256, 4096, 12288, 132);
        assert_eq!(
            p,
            WidePlan {
                m_tiles: 2,
                n_tiles: 32,
                splits: 4,
                ktiles_per_split: 96
            }
        );
        assert_eq!(p.workspace_floats(), 64 * 4 * 128 * 128);
        // M = 384, N = 4096, K = 4096: 96 tiles → 2 splits of 64.
        let p = WidePlan::new(384, 4096, 4096, 132);
        assert_eq!((p.splits, p.ktiles_per_split), (2, 64));
        // Short K never splits below 32 K tiles: K = 328 has 11.
        assert_eq!(WidePlan::new(65, 296, 328, 132).splits, 1);
        // Forced: 11 K tiles by 4 → 4 + 4 + 3.
        let p = WidePlan::with_ktiles_per_split(200, 296, 328, 4);
        assert_eq!((p.m_tiles, p.n_tiles, p.splits), (2, 3, 3));
        for k in [8, 328, 4096, 12288] {
            for (m, n) in [(1, 8), (256, 4096), (384, 12288), (3072, 126_464)] {
                let p = WidePlan::new(m, n, k, 132);
                let kt = k.div_ceil(32);
                assert!(
                    (p.splits - 1) * p.ktiles_per_split < kt && p.splits * p.ktiles_per_split >= kt
                );
                assert!(p.splits == 1 || p.tiles() * p.splits <= 264);
            }
        }
    }

    #[test]
    fn quad_plans_round_both_tile_counts_to_even() {
        // The LM head at M = 384: 2 × 659 tiles of 192 rows → quads of 2 × 660 (a phantom N
        // tile); the same split, and a plan `run_plan` accepts for the shape.
        let pairs = WgmmaPlan::with_tma(384, 126_464, 4096, 132).paired();
        let quads = pairs.quad();
        assert_eq!((pairs.m_tiles, pairs.n_tiles), (2, 659));
        assert_eq!((quads.m_tiles, quads.n_tiles, quads.cluster_n), (2, 660, 2));
        assert_eq!(
            (quads.splits, quads.ktiles_per_split),
            (pairs.splits, pairs.ktiles_per_split)
        );
        assert_eq!((pairs.kind(), quads.kind()), ("tma", "tma4"));
        GemmPlan::Tma(quads).check_fits(384, 126_464, 4096).unwrap();
        // An odd M tile count gains a phantom M tile too; quads of quads are the same quads.
        let odd = WgmmaPlan::with_ktiles_per_split(2, 384, 4096, 4096, 32).quad();
        assert_eq!((odd.m_tiles, odd.n_tiles, odd.splits), (4, 22, 2));
        assert_eq!(odd.quad(), odd);
        assert_eq!(WgmmaPlan::new(384, 4096, 4096, 132).kind(), "wgmma");
        // A quad with an N tile count that is not its constructor's is refused.
        let bad = WgmmaPlan { n_tiles: 24, ..odd };
        assert!(GemmPlan::Tma(bad).check_fits(384, 4096, 4096).is_err());
    }

    #[test]
    fn wgmma_plans() {
        // Hand-derived on 132 SMs (one block per SM).
        let p = |wg, mt, nt, s, kps| WgmmaPlan {
            wg,
            m_tiles: mt,
            n_tiles: nt,
            splits: s,
            ktiles_per_split: kps,
            paired: false,
            cluster_n: 1,
        };
        // M = 384: 192-row tiles give 2 × 64 = 128 blocks, one wave (128-row: 192 blocks).
        assert_eq!(WgmmaPlan::new(384, 12288, 4096, 132), p(3, 2, 64, 1, 64));
        // M = 256: 128-row tiles, 2 × 64 = 128 blocks, no padding rows.
        assert_eq!(WgmmaPlan::new(256, 12288, 4096, 132), p(2, 2, 64, 1, 64));
        // M = 3072: 8 waves of 192 rows = 12 waves of 128 rows; the tie goes to 192.
        assert_eq!(WgmmaPlan::new(3072, 12288, 4096, 132), p(3, 16, 64, 1, 64));
        // Down projection at M = 256: 2 × 22 tiles × 3 splits of 64 K tiles = 132 blocks.
        let d = WgmmaPlan::new(256, 4096, 12288, 132);
        assert_eq!(d, p(2, 2, 22, 3, 64));
        assert_eq!(d.workspace_floats(), 44 * 3 * 128 * 192);
        // M = 384, 4096 → 4096: 3 × 22 tiles × 2 splits (cost 128·38·21 < 192·31·20).
        assert_eq!(WgmmaPlan::new(384, 4096, 4096, 132), p(2, 3, 22, 2, 32));
        // Short K never splits: K = 328 has 6 K tiles.
        assert_eq!(WgmmaPlan::new(65, 296, 328, 132).splits, 1);
        // With the TMA pairs at 9/10: the down projection at M = 384 moves to 2 × 22 tiles of
        // 192 rows × 3 splits (192·(64 + 9)·20·0.9 = 252 288 < 128·(96 + 6)·21 = 274 176) ...
        assert_eq!(
            WgmmaPlan::with_tma(384, 4096, 12288, 132),
            p(3, 2, 22, 3, 64).paired()
        );
        // ... the output projection stays on 3 tiles without pairs (119 040·0.9 > 102 144) ...
        assert_eq!(
            WgmmaPlan::with_tma(384, 4096, 4096, 132),
            p(2, 3, 22, 2, 32)
        );
        // ... and plans that were even already only gain the pairing.
        for (m, n, k) in [(384, 12288, 4096), (256, 4096, 12288), (3072, 12288, 4096)] {
            assert_eq!(
                WgmmaPlan::with_tma(m, n, k, 132),
                WgmmaPlan::new(m, n, k, 132).paired()
            );
        }
        // With the cluster-split kernels (1 K tile per split instead of 3, no pairs' discount):
        // the output projection at M = 384 runs its 2 splits as pairs of blocks
        // (128·(32 + 2)·21 = 91 392 < 102 144) ...
        let cs = |m, n, k, tma| WgmmaPlan::launch_for(m, n, k, 132, tma);
        assert_eq!(
            cs(384, 4096, 4096, true),
            GemmPlan::ClusterSplit(p(2, 3, 22, 2, 32))
        );
        // ... and at M = 256 (b8's block step) its 3 splits as triples, over the TMA pairs
        // (128·(22 + 3)·21 = 67 200 < 128·(22 + 9)·21·0.9 = 74 995) ...
        assert_eq!(
            cs(256, 4096, 4096, true),
            GemmPlan::ClusterSplit(p(2, 2, 22, 3, 22))
        );
        // ... while the down projections keep their TMA pairs (252 288 < 257 280 at M = 384,
        // 176 601 < 180 096 at M = 256), and unsplit shapes their pairs ...
        assert_eq!(
            cs(384, 4096, 12288, true),
            GemmPlan::Tma(p(3, 2, 22, 3, 64).paired())
        );
        assert_eq!(
            cs(256, 4096, 12288, true),
            GemmPlan::Tma(p(2, 2, 22, 3, 64).paired())
        );
        assert_eq!(
            cs(384, 12288, 4096, true),
            GemmPlan::Tma(p(3, 2, 64, 1, 64).paired())
        );
        // ... which, without the TMA kernel, become triples of 192-row blocks.
        assert_eq!(
            cs(384, 4096, 12288, false),
            GemmPlan::ClusterSplit(p(3, 2, 22, 3, 64))
        );
        // Forced: 6 K tiles by 4 → 4 + 2; wg is clamped to 2..=3.
        assert_eq!(
            WgmmaPlan::with_ktiles_per_split(7, 200, 296, 328, 4),
            p(3, 2, 2, 2, 4)
        );
        assert_eq!(wgmma_smem_bytes(2), 5 * 320 * 128 + 1024);
        assert_eq!(wgmma_smem_bytes(3), 4 * 384 * 128 + 1024);
        for k in [8, 328, 4096, 12288] {
            for (m, n) in [
                (1, 8),
                (65, 296),
                (256, 4096),
                (384, 12288),
                (3072, 126_464),
            ] {
                for sms in [1, 78, 132] {
                    let p = WgmmaPlan::new(m, n, k, sms);
                    let kt = k.div_ceil(64);
                    assert!(
                        (p.splits - 1) * p.ktiles_per_split < kt
                            && p.splits * p.ktiles_per_split >= kt,
                        "{p:?}"
                    );
                    assert!(p.splits == 1 || p.tiles() * p.splits <= sms, "{p:?}");
                    assert!(p.m_tiles * p.bm() >= m && p.n_tiles * 192 >= n);
                }
            }
        }
    }
}
