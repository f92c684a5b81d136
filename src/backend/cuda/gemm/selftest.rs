//! The load-time self-test: every fast kernel against `gemm_naive` on the device, on a shape
//! with partial tiles in M, N and K, with and without split-K, all three epilogues, poisoned
//! outputs with guard elements. A variant with any wrong result is disabled.

use super::*;

const M: usize = 133;
const N: usize = 8 * 49;
const K: usize = 8 * 97;
/// Rows used for the skinny kernel (a prefix of the same A).
const M_SKINNY: usize = 37;
/// Rows used for version 2 of the skinny kernel (4 groups, the last one partial; and 1 group).
const M_SKINNY2: [usize; 2] = [29, 3];
/// fp32 outputs: tensor-core truncation at K = 776 is ~1e-5; real faults give ≥ 1e-2.
const TOL_F32_SELFTEST: f64 = 1e-4;

/// What the self-test found.
pub(super) struct SelfTestOutcome {
    /// Disabled variants, each with its first failure.
    pub disabled: Vec<(GemmVariant, String)>,
    /// The first failure of skinny version 2 (`run` then uses version 1).
    pub skinny2_failure: Option<String>,
    /// The first failure of the stream kernel, when loaded (`run` then keeps the skinny one).
    pub stream_failure: Option<String>,
    /// The first failure of the TMA kernel, when loaded (`run` then keeps `gemm_wgmma`).
    pub tma_failure: Option<String>,
    /// The first failure of the quad kernel, when loaded (`run` then keeps the pairs).
    pub tma4_failure: Option<String>,
    /// The first failure of the cluster-split kernels, when loaded (`run` then keeps the
    /// workspace reduction).
    pub cluster_split_failure: Option<String>,
}

/// Every fast kernel against `gemm_naive`: the variants that failed, and the first failures
/// of skinny version 2 and of the stream kernel (which only switch `run` back to the others).
pub(super) fn run(gemm: &Gemm, dev: &CudaDevice) -> Result<SelfTestOutcome> {
    let a = upload(dev, &random_bf16(0x5E1F, M * K))?;
    let w = upload(dev, &random_bf16(0x5E20, N * K))?;
    let mut r = dev
        .stream
        .alloc_zeros::<f32>(M * N)
        .map_err(|e| cuda_err("gemm self-test: alloc", e))?;
    let (av, wv) = (a.as_view(), w.as_view());
    gemm.launch(
        dev,
        GemmPlan::Naive,
        &av,
        &wv,
        GemmOut::F32(r.as_view_mut()),
        NormFold::NONE,
        M,
        N,
        K,
    )?;
    let want = download(dev, &r)?;
    if want.iter().any(|v| !v.is_finite()) {
        return Err(Error::Backend(
            "gemm self-test: the naive reference kernel produced non-finite values".into(),
        ));
    }
    let c0 = check::from_bf16_bits(&random_bf16(0x5E21, M * N));
    let sms = gemm.num_sms;
    let mut jobs: Vec<(GemmVariant, GemmPlan, usize)> = vec![
        (
            GemmVariant::Skinny,
            GemmPlan::Skinny(SkinnyPlan::new(M_SKINNY, N, K, sms)),
            M_SKINNY,
        ),
        (
            GemmVariant::Skinny,
            GemmPlan::Skinny(SkinnyPlan::with_chunks_per_split(M_SKINNY, N, K, 4)),
            M_SKINNY,
        ),
        (
            GemmVariant::Wide,
            GemmPlan::Wide(WidePlan::new(M, N, K, sms)),
            M,
        ),
        (
            GemmVariant::Wide,
            GemmPlan::Wide(WidePlan::with_ktiles_per_split(M, N, K, 8)),
            M,
        ),
    ];
    if gemm.wgmma.is_some() {
        for wg in [2, 3] {
            for kps in [K.div_ceil(WGMMA_BK), 4] {
                let plan = WgmmaPlan::with_ktiles_per_split(wg, M, N, K, kps);
                jobs.push((GemmVariant::Wgmma, GemmPlan::Wgmma(plan), M));
            }
        }
    }
    let mut failed: Vec<(GemmVariant, String)> = Vec::new();
    for (variant, job, m) in jobs {
        if failed.iter().any(|(v, _)| *v == variant) {
            continue;
        }
        for epi in Epilogue::ALL {
            let outcome = match one(gemm, dev, job, epi, m, &a, &w, &want, &c0) {
                Ok(None) => continue,
                Ok(Some(why)) => why,
                Err(e) => format!("error: {e}"),
            };
            failed.push((
                variant,
                format!("self-test {job:?} {} m{m} n{N} k{K}: {outcome}", epi.name()),
            ));
            break;
        }
    }
    // Skinny version 2: default plan and a forced 4-chunk split, each at 4 groups (partial
    // last group) and 1 group; N = 392 leaves a partial 128-row tile, K = 776 a partial chunk.
    let mut v2_jobs = Vec::new();
    for m in M_SKINNY2 {
        v2_jobs.push((SkinnyPlan::for_version(2, m, N, K, sms), m));
        v2_jobs.push((SkinnyPlan::with_version_chunks(2, m, N, K, 4), m));
    }
    let v2_jobs: Vec<(GemmPlan, usize)> = v2_jobs
        .into_iter()
        .map(|(plan, m)| (GemmPlan::Skinny(plan), m))
        .collect();
    let fixture = (&a, &w, &want[..], &c0[..]);
    let skinny2_failure = first_failure(gemm, dev, &v2_jobs, fixture);
    // The stream kernel (when loaded): the default plan (here one chunk per block, so every
    // tile is cut between blocks), 4 blocks of exactly one tile each (no cut) and 5 blocks
    // (cuts at uneven places); 4 groups (the last partial) and 1 group.
    let mut stream_failure = None;
    if gemm.stream.is_some() {
        let mut jobs = Vec::new();
        for m in M_SKINNY2 {
            for blocks in [sms, 4, 5] {
                jobs.push((
                    GemmPlan::Stream(StreamPlan::with_blocks(m, N, K, blocks)?),
                    m,
                ));
            }
        }
        stream_failure = first_failure(gemm, dev, &jobs, fixture);
    }
    // The TMA kernel (when loaded): both block heights with and without a forced split;
    // M = 133 gives 2 (wg 2) or 1 + 1 phantom (wg 3) M tiles, N = 392 a partial 192-column
    // tile whose second half is entirely past N, K = 776 a partial K tile.
    // The quads (when asked for) run the same plans as quads; N = 392 gives 3 N tiles, so a
    // phantom N tile (entirely past N) joins the last one.
    let pairs: Vec<WgmmaPlan> = [2, 3]
        .into_iter()
        .flat_map(|wg| {
            [K.div_ceil(WGMMA_BK), 4]
                .map(|kps| WgmmaPlan::paired_with_ktiles_per_split(wg, M, N, K, kps))
        })
        .collect();
    let failure_of = |loaded: bool, as_run: fn(&WgmmaPlan) -> WgmmaPlan| {
        let jobs: Vec<(GemmPlan, usize)> = pairs
            .iter()
            .map(|p| (GemmPlan::Tma(as_run(p)), M))
            .collect();
        if loaded {
            first_failure(gemm, dev, &jobs, fixture)
        } else {
            None
        }
    };
    let tma_failure = failure_of(gemm.tma.is_some(), |p| *p);
    let tma4_failure = failure_of(gemm.tma4.is_some(), WgmmaPlan::quad);
    // The cluster-split kernels (when asked for): each compiled (wg, splits) on the 13 K
    // tiles of K = 776 (the last split shorter); M = 133 leaves a partial M tile, N = 392 a
    // partial N tile.
    let ktiles = K.div_ceil(WGMMA_BK);
    let cluster_jobs: Vec<(GemmPlan, usize)> = gemm_cluster_split::KERNELS
        .iter()
        .map(|&(wg, cs)| {
            let plan = WgmmaPlan::with_ktiles_per_split(wg, M, N, K, ktiles.div_ceil(cs));
            (GemmPlan::ClusterSplit(plan), M)
        })
        .collect();
    let cluster_split_failure = if gemm.cluster_split.is_some() {
        first_failure(gemm, dev, &cluster_jobs, fixture)
    } else {
        None
    };
    Ok(SelfTestOutcome {
        disabled: failed,
        skinny2_failure,
        stream_failure,
        tma_failure,
        tma4_failure,
        cluster_split_failure,
    })
}

/// The first (job, epilogue) of `jobs` that disagrees with the reference, described.
fn first_failure(
    gemm: &Gemm,
    dev: &CudaDevice,
    jobs: &[(GemmPlan, usize)],
    (a, w, want, c0): (&CudaSlice<u16>, &CudaSlice<u16>, &[f32], &[f32]),
) -> Option<String> {
    for &(job, m) in jobs {
        for epi in Epilogue::ALL {
            let outcome = match one(gemm, dev, job, epi, m, a, w, want, c0) {
                Ok(None) => continue,
                Ok(Some(why)) => why,
                Err(e) => format!("error: {e}"),
            };
            return Some(format!(
                "self-test {job:?} {} m{m} n{N} k{K}: {outcome}",
                epi.name()
            ));
        }
    }
    None
}

/// One launch compared with the reference: `None` when right, else what was wrong.
#[allow(clippy::too_many_arguments)]
fn one(
    gemm: &Gemm,
    dev: &CudaDevice,
    job: GemmPlan,
    epi: Epilogue,
    m: usize,
    a: &CudaSlice<u16>,
    w: &CudaSlice<u16>,
    want: &[f32],
    c0: &[f32],
) -> Result<Option<String>> {
    let mn = m * N;
    let av = a.slice(..m * K);
    let wv = w.as_view();
    let mut expect = want[..mn].to_vec();
    let (got, guard_ok) = match epi {
        Epilogue::SwigluBf16 | Epilogue::RopeQkv => {
            return Err(Error::invalid(format!(
                "gemm self-test: the {} epilogue has its own check",
                epi.name()
            )))
        }
        Epilogue::StoreBf16 => {
            let mut buf = upload(dev, &vec![check::POISON_BF16_BITS; mn + GUARD])?;
            gemm.launch(
                dev,
                job,
                &av,
                &wv,
                GemmOut::Bf16(buf.as_view_mut()),
                NormFold::NONE,
                m,
                N,
                K,
            )?;
            let host = download(dev, &buf)?;
            let ok = host[mn..].iter().all(|&b| b == check::POISON_BF16_BITS);
            (check::from_bf16_bits(&host[..mn]), ok)
        }
        Epilogue::StoreF32 | Epilogue::AddF32 => {
            let poison = f32::from_bits(check::POISON_F32_BITS);
            let mut init = if epi == Epilogue::AddF32 {
                for (e, c) in expect.iter_mut().zip(c0) {
                    *e += c;
                }
                c0[..mn].to_vec()
            } else {
                vec![poison; mn]
            };
            init.resize(mn + GUARD, poison);
            let mut buf = upload(dev, &init)?;
            let out = if epi == Epilogue::AddF32 {
                GemmOut::AddF32(buf.as_view_mut())
            } else {
                GemmOut::F32(buf.as_view_mut())
            };
            gemm.launch(dev, job, &av, &wv, out, NormFold::NONE, m, N, K)?;
            let host = download(dev, &buf)?;
            let ok = host[mn..]
                .iter()
                .all(|v| v.to_bits() == check::POISON_F32_BITS);
            (host[..mn].to_vec(), ok)
        }
    };
    if !guard_ok {
        return Ok(Some("wrote past the end of C".into()));
    }
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        return Ok(Some(format!(
            "C[{}, {}] not written or not finite",
            i / N,
            i % N
        )));
    }
    let e = check::rel_l2(&got, &expect);
    let tol = if epi == Epilogue::StoreBf16 {
        TOL_BF16
    } else {
        TOL_F32_SELFTEST
    };
    Ok((e > tol).then(|| format!("rel L2 error {e:.3e} > {tol:.0e}")))
}
