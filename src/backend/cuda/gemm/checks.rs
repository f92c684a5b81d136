//! GPU checks of the GEMM kernels ([`super::self_check`]): every kernel and epilogue against an
//! f64 host product of the same bf16 inputs on odd and model-sized shapes, poisoned outputs with
//! guard elements, split-K determinism, and the refusal of bad arguments; plus the upload,
//! download and reference helpers the other GEMM checks share.

use super::*;

/// Relative-L2 tolerance of fp32 outputs for a K-long reduction. mma.sync adds 16 products to
/// the accumulator per step after aligning them to the largest exponent and truncating (not
/// rounding) the low bits, so each of the K/16 steps may lose up to about one ulp of the running
/// sum, and the loss is biased toward zero: relative error up to (K/16)·2⁻²³, i.e. 3.1e-5 at
/// K = 4096 and 9.2e-5 at K = 12288, which fp32 round-to-nearest (the 1e-5 target) does not
/// model. A real fault (wrong fragment, dropped chunk, split counted twice) gives ≥ 1e-2.
pub fn tol_f32(k: usize) -> f64 {
    TOL_F32.max(k as f64 / 16.0 * f64::powi(2.0, -23))
}

/// SplitMix64 step, for fast parallel test data.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` deterministic bf16 values uniform in [-1, 1), as bits (parallel; independent of threads).
pub(super) fn random_bf16(seed: u64, n: usize) -> Vec<u16> {
    const CH: usize = 1 << 16;
    let mut v = vec![0u16; n];
    v.par_chunks_mut(CH).enumerate().for_each(|(ci, chunk)| {
        for (i, x) in chunk.iter_mut().enumerate() {
            let h = mix(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (ci * CH + i) as u64);
            let u = (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
            *x = bf16::from_f32(2.0 * u - 1.0).to_bits();
        }
    });
    v
}

/// f64 reference `Σ_k a[r, k]·w[c, k]` for every row `r < m` and each column in `cols`, laid out
/// `[m][cols.len()]`, from the bf16 bits the GPU sees (public for the kernels' CPU emulation,
/// tests/gemm_emulation.rs).
pub fn reference(a: &[u16], w: &[u16], m: usize, k: usize, cols: &[usize]) -> Vec<f64> {
    let wf: Vec<Vec<f64>> = cols
        .par_iter()
        .map(|&c| {
            w[c * k..(c + 1) * k]
                .iter()
                .map(|&b| bf16::from_bits(b).to_f64())
                .collect()
        })
        .collect();
    let mut out = vec![0f64; m * cols.len()];
    out.par_chunks_mut(cols.len().max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let ar: Vec<f64> = a[r * k..(r + 1) * k]
                .iter()
                .map(|&b| bf16::from_bits(b).to_f64())
                .collect();
            for (o, wc) in row.iter_mut().zip(&wf) {
                *o = ar.iter().zip(wc).map(|(x, y)| x * y).sum();
            }
        });
    out
}

/// Columns to verify: all when `n·m·k` is small, else a spread sample that hits every residue
/// modulo the tile sizes plus the first and last 8 columns.
fn sample_cols(m: usize, n: usize, k: usize) -> Vec<usize> {
    if m * n * k <= 1 << 27 {
        return (0..n).collect();
    }
    let mut c: Vec<usize> = (0..8)
        .chain(n - 8..n)
        .chain((0..160).map(|i| (i * 997 + 13) % n))
        .collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// Guard elements after `M·N` in every check output, poisoned and verified untouched.
pub(super) const GUARD: usize = 64;

/// Host data and device copies of one (n, k) weight and one A.
struct Case<'a> {
    m: usize,
    n: usize,
    k: usize,
    a_dev: &'a CudaSlice<u16>,
    w_dev: &'a CudaSlice<u16>,
    cols: &'a [usize],
    want: &'a [f64],
}

/// How a check launches the GEMM.
#[derive(Debug, Clone, Copy)]
enum How {
    Variant(GemmVariant),
    Plan(GemmPlan),
}

fn launch_how(
    gemm: &Gemm,
    dev: &CudaDevice,
    how: How,
    case: &Case,
    out: GemmOut<'_>,
) -> Result<()> {
    let (a, w) = (case.a_dev.as_view(), case.w_dev.as_view());
    match how {
        How::Variant(v) => gemm.run_variant(dev, v, &a, &w, out, case.m, case.n, case.k),
        How::Plan(p) => gemm.run_plan(dev, p, &a, &w, out, case.m, case.n, case.k),
    }
}

/// Runs one (variant, epilogue) on a case with a poisoned output; returns (rel L2, detail).
fn check_one(
    gemm: &Gemm,
    dev: &CudaDevice,
    how: How,
    epi: Epilogue,
    case: &Case,
) -> Result<(f64, String)> {
    let (m, n) = (case.m, case.n);
    let mn = m * n;
    let poison_f32 = f32::from_bits(check::POISON_F32_BITS);
    // Initial C for AddF32 (random) and the expected values at the sampled positions.
    let c0: Vec<f32> = if epi == Epilogue::AddF32 {
        check::from_bf16_bits(&random_bf16(0xADD0 + (m * 31 + n) as u64, mn))
    } else {
        Vec::new()
    };
    let mut want = Vec::with_capacity(m * case.cols.len());
    for r in 0..m {
        for (j, &c) in case.cols.iter().enumerate() {
            let base = if c0.is_empty() {
                0.0
            } else {
                c0[r * n + c] as f64
            };
            want.push((base + case.want[r * case.cols.len() + j]) as f32);
        }
    }
    let got: Vec<f32> = match epi {
        Epilogue::SwigluBf16 | Epilogue::RopeQkv => {
            return Err(Error::invalid(format!(
                "gemm check: the {} epilogue has its own check",
                epi.name()
            )))
        }
        Epilogue::StoreBf16 => {
            let mut buf = upload(dev, &vec![check::POISON_BF16_BITS; mn + GUARD])?;
            launch_how(gemm, dev, how, case, GemmOut::Bf16(buf.as_view_mut()))?;
            let host = download(dev, &buf)?;
            if host[mn..].iter().any(|&b| b != check::POISON_BF16_BITS) {
                return Ok((f64::INFINITY, "wrote past the end of C".into()));
            }
            check::from_bf16_bits(&host[..mn])
        }
        Epilogue::StoreF32 | Epilogue::AddF32 => {
            let mut init = if c0.is_empty() {
                vec![poison_f32; mn]
            } else {
                c0.clone()
            };
            init.resize(mn + GUARD, poison_f32);
            let mut buf = upload(dev, &init)?;
            let view = buf.as_view_mut();
            let out = if epi == Epilogue::AddF32 {
                GemmOut::AddF32(view)
            } else {
                GemmOut::F32(view)
            };
            launch_how(gemm, dev, how, case, out)?;
            let host = download(dev, &buf)?;
            if host[mn..]
                .iter()
                .any(|v| v.to_bits() != check::POISON_F32_BITS)
            {
                return Ok((f64::INFINITY, "wrote past the end of C".into()));
            }
            host[..mn].to_vec()
        }
    };
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        return Ok((
            f64::INFINITY,
            format!(
                "C[{}, {}] not written (or not finite): {}",
                i / n,
                i % n,
                got[i]
            ),
        ));
    }
    let sampled: Vec<f32> = (0..m)
        .flat_map(|r| case.cols.iter().map(move |&c| (r, c)))
        .map(|(r, c)| got[r * n + c])
        .collect();
    let e = check::rel_l2(&sampled, &want);
    let mut detail = format!("{} of {} columns checked", case.cols.len(), n);
    let splits = match how {
        How::Plan(GemmPlan::Skinny(p)) => Some(p.splits),
        How::Plan(GemmPlan::Wide(p)) => Some(p.splits),
        How::Plan(GemmPlan::Wgmma(p) | GemmPlan::ClusterSplit(p)) => Some(p.splits),
        How::Variant(GemmVariant::Wgmma) => match gemm.wgmma_plan(m, n, case.k) {
            GemmPlan::Tma(p) | GemmPlan::Wgmma(p) | GemmPlan::ClusterSplit(p) => {
                detail.push_str(&format!(", {} wg{}", p.kind(), p.wg));
                Some(p.splits)
            }
            _ => None,
        },
        How::Plan(GemmPlan::Tma(p)) => Some(p.splits),
        How::Plan(GemmPlan::Stream(p)) => {
            detail.push_str(&format!(
                ", {} blocks, {} tiles cut between blocks",
                p.blocks,
                p.inner_boundaries()
            ));
            None
        }
        How::Variant(GemmVariant::Skinny) if m <= STREAM_MAX_M && gemm.stream_active() => {
            detail.push_str(", stream");
            None
        }
        How::Variant(GemmVariant::Skinny) => {
            let p = gemm.skinny_plan(m, n, case.k);
            detail.push_str(&format!(", skinny v{}", p.version));
            Some(p.splits)
        }
        How::Variant(GemmVariant::Wide) => Some(WidePlan::new(m, n, case.k, gemm.num_sms).splits),
        How::Variant(GemmVariant::Naive) | How::Plan(GemmPlan::Naive) => None,
    };
    if let Some(sp) = splits {
        detail.push_str(&format!(", {sp} K splits"));
    }
    if epi != Epilogue::StoreBf16 {
        detail.push_str(if e <= TOL_F32 {
            ", meets 1e-5"
        } else {
            ", above 1e-5 (tensor-core truncation)"
        });
    }
    Ok((e, detail))
}

/// Split-K must be deterministic: two runs give identical bits.
fn check_deterministic(gemm: &Gemm, dev: &CudaDevice, how: How, case: &Case) -> Result<bool> {
    let mut outs = Vec::new();
    for _ in 0..2 {
        let mut buf = dev
            .stream
            .alloc_zeros::<f32>(case.m * case.n)
            .map_err(|e| cuda_err("gemm check: alloc", e))?;
        launch_how(gemm, dev, how, case, GemmOut::F32(buf.as_view_mut()))?;
        outs.push(download(dev, &buf)?);
    }
    Ok(outs[0]
        .iter()
        .zip(&outs[1])
        .all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// Every variant × epilogue against the f64 host reference on odd and real shapes, outputs
/// poisoned; never panics (errors become failed results).
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let gemm = match Gemm::load(dev) {
        Ok(g) => g,
        Err(e) => return vec![CheckResult::failed("gemm.load", e)],
    };
    let mut res = Vec::new();
    let wrong_args = check_bad_args(&gemm, dev);
    res.push(CheckResult::from_result(
        "gemm.rejects_bad_args",
        0.0,
        wrong_args,
    ));
    // The load-time self-test must not have disabled anything (but wgmma in the Ampere build,
    // which has none).
    let why = gemm.inactive_reasons(dev);
    // The stream kernel's ring depth, read from its module (what a DLLM_KERNEL_DIR build with
    // -D STREAM_STAGES=N relies on); the embedded image has the default.
    if gemm.stream.is_some() {
        let read = gemm_stream::stages_read(dev);
        let embedded = dev.kernel_dir.is_none();
        let ok = matches!(&read, Ok(s) if !embedded || *s == gemm_stream::DEFAULT_STAGES);
        res.push(CheckResult::exact(
            "gemm.stream_stages",
            ok,
            match &read {
                Ok(s) => format!(
                    "{} = {s} read from the module (launched with {}); embedded default {}",
                    gemm_stream::STAGES_SYMBOL,
                    gemm.stream_stages,
                    gemm_stream::DEFAULT_STAGES
                ),
                Err(e) => format!("cannot read {}: {e}", gemm_stream::STAGES_SYMBOL),
            },
        ));
    }
    let [pairs, quads] = gemm.resident_clusters();
    let mut resident = format!("resident clusters (wg2, wg3): pairs {pairs:?}, quads {quads:?}");
    if gemm.cluster_split.is_some() {
        resident.push_str(&format!(
            ", cluster splits {:?}: {:?}",
            gemm_cluster_split::KERNELS,
            gemm.cluster_split_resident()
        ));
    }
    res.push(CheckResult::exact(
        "gemm.load_self_test",
        why.is_empty(),
        if why.is_empty() {
            format!("every fast variant (skinny v1 and v2 included) agrees with naive; {resident}")
        } else {
            format!("{}; {resident}", why.join("; "))
        },
    ));
    let has_wgmma = gemm.wgmma.is_some();
    // (n, k, rows, naive?) groups; naive is skipped only on the 126464-row LM head (slow).
    let groups: &[(usize, usize, &[usize], bool)] = &[
        (8 * 37, 8 * 41, &[1, 3, 17, 33, 64, 65, 200, 384], true),
        (8 * 37, 4096, &[8, 32, 64], true),
        (12288, 4096, &[32, 384, 3072], true),
        (4096, 12288, &[32, 256], true),
        (126_464, 4096, &[32], false),
        // The tiny test model's block-step shapes (few K chunks, many blocks per tile).
        (1152, 384, &[28, 32], true),
        (384, 1024, &[32], true),
        (8192, 384, &[25, 32], true),
    ];
    for (gi, &(n, k, rows, with_naive)) in groups.iter().enumerate() {
        let w = random_bf16(1000 + gi as u64, n * k);
        let w_dev = match upload(dev, &w) {
            Ok(b) => b,
            Err(e) => {
                res.push(CheckResult::failed(format!("gemm n{n} k{k}: upload W"), e));
                continue;
            }
        };
        for &m in rows {
            let a = random_bf16(2000 + (gi * 1000 + m) as u64, m * k);
            let a_dev = match upload(dev, &a) {
                Ok(b) => b,
                Err(e) => {
                    res.push(CheckResult::failed(
                        format!("gemm m{m} n{n} k{k}: upload A"),
                        e,
                    ));
                    continue;
                }
            };
            let cols = sample_cols(m, n, k);
            let want = reference(&a, &w, m, k, &cols);
            let case = Case {
                m,
                n,
                k,
                a_dev: &a_dev,
                w_dev: &w_dev,
                cols: &cols,
                want: &want,
            };
            let mut hows = Vec::new();
            if with_naive {
                hows.push(How::Variant(GemmVariant::Naive));
            }
            if m <= SKINNY_MAX_M {
                // The default (version 2 for m ≤ 32) and both versions explicitly, each with
                // its default split and a forced 4-chunk split on the small shapes.
                hows.push(How::Variant(GemmVariant::Skinny));
                let versions: &[usize] = if m <= SKINNY2_MAX_M { &[1, 2] } else { &[1] };
                for &version in versions {
                    hows.push(How::Plan(GemmPlan::Skinny(SkinnyPlan::for_version(
                        version,
                        m,
                        n,
                        k,
                        gemm.num_sms,
                    ))));
                    if k.div_ceil(SKINNY_CHUNK) > 4 && n * k < 1 << 20 {
                        hows.push(How::Plan(GemmPlan::Skinny(
                            SkinnyPlan::with_version_chunks(version, m, n, k, 4),
                        )));
                    }
                }
            }
            if m <= STREAM_MAX_M && gemm.stream_loaded() {
                // The default plan, and on the small shapes 5 and 7 blocks (tiles cut at uneven
                // places, several blocks per tile).
                let mut counts = vec![gemm.num_sms];
                if n * k < 1 << 20 {
                    counts.extend([5, 7]);
                }
                for blocks in counts {
                    match StreamPlan::with_blocks(m, n, k, blocks) {
                        Ok(p) => hows.push(How::Plan(GemmPlan::Stream(p))),
                        Err(e) => res.push(CheckResult::failed(
                            format!("gemm.stream m{m} n{n} k{k}: plan"),
                            e,
                        )),
                    }
                }
            }
            hows.push(How::Variant(GemmVariant::Wide));
            if k.div_ceil(WIDE_BK) > 4 && n * k < 1 << 20 {
                hows.push(How::Plan(GemmPlan::Wide(WidePlan::with_ktiles_per_split(
                    m, n, k, 4,
                ))));
            }
            if has_wgmma {
                hows.push(How::Variant(GemmVariant::Wgmma));
                if n * k < 1 << 20 {
                    // Both block heights without split-K, and with a forced split.
                    for wg in [2, 3] {
                        let kt = k.div_ceil(WGMMA_BK);
                        hows.push(How::Plan(GemmPlan::Wgmma(
                            WgmmaPlan::with_ktiles_per_split(wg, m, n, k, kt),
                        )));
                        if kt > 2 {
                            hows.push(How::Plan(GemmPlan::Wgmma(
                                WgmmaPlan::with_ktiles_per_split(wg, m, n, k, 2),
                            )));
                        }
                    }
                }
            }
            if gemm.tma_loaded() {
                // The TMA cluster kernel: its default plan, and on the small shapes both block
                // heights with and without a forced split.
                // The quads (when asked for) on the same plans.
                let p = WgmmaPlan::with_tma(m, n, k, gemm.num_sms);
                let mut plans = vec![p.paired()];
                if n * k < 1 << 20 {
                    let kt = k.div_ceil(WGMMA_BK);
                    for wg in [2, 3] {
                        for kps in [kt, 2] {
                            plans.push(WgmmaPlan::paired_with_ktiles_per_split(wg, m, n, k, kps));
                        }
                    }
                }
                let quads = gemm.tma4_loaded();
                for p in plans {
                    hows.push(How::Plan(GemmPlan::Tma(p)));
                    if quads {
                        hows.push(How::Plan(GemmPlan::Tma(p.quad())));
                    }
                }
            }
            for how in hows {
                let label = match how {
                    How::Variant(v) => v.name().to_string(),
                    How::Plan(GemmPlan::Skinny(p)) => {
                        format!("skinny_v{}_split{}", p.version, p.splits)
                    }
                    How::Plan(GemmPlan::Wide(p)) => format!("wide_split{}", p.splits),
                    How::Plan(GemmPlan::Wgmma(p)) => format!("wgmma_wg{}_split{}", p.wg, p.splits),
                    How::Plan(GemmPlan::ClusterSplit(p)) => {
                        format!("wgmma_wg{}_cs{}", p.wg, p.splits)
                    }
                    How::Plan(GemmPlan::Stream(p)) => format!("stream_b{}", p.blocks),
                    How::Plan(GemmPlan::Naive) => "naive".to_string(),
                    How::Plan(GemmPlan::Tma(p)) => format!(
                        "tma{}_wg{}_split{}",
                        if p.cluster_n == 2 { "4" } else { "" },
                        p.wg,
                        p.splits
                    ),
                };
                for epi in Epilogue::ALL {
                    let tol = if epi == Epilogue::StoreBf16 {
                        TOL_BF16
                    } else {
                        tol_f32(k)
                    };
                    let name = format!("gemm.{label}.{} m{m} n{n} k{k}", epi.name());
                    res.push(CheckResult::from_result(
                        name,
                        tol,
                        check_one(&gemm, dev, how, epi, &case),
                    ));
                }
            }
            let det = match (n, k, m) {
                (4096, 12288, 32) => Some(GemmVariant::Skinny),
                (4096, 12288, 256) if has_wgmma => Some(GemmVariant::Wgmma),
                _ => None,
            };
            if let Some(v) = det {
                let mut dets = vec![(v.name().to_string(), How::Variant(v))];
                if v == GemmVariant::Skinny {
                    for version in [1, 2] {
                        let p = SkinnyPlan::for_version(version, m, n, k, gemm.num_sms);
                        dets.push((format!("skinny_v{version}"), How::Plan(GemmPlan::Skinny(p))));
                    }
                    if gemm.stream_loaded() {
                        if let Ok(p) = gemm.stream_plan(m, n, k) {
                            dets.push(("stream".to_string(), How::Plan(GemmPlan::Stream(p))));
                        }
                    }
                }
                if v == GemmVariant::Wgmma && gemm.tma_loaded() {
                    let p = WgmmaPlan::with_tma(m, n, k, gemm.num_sms).paired();
                    dets.push(("tma".to_string(), How::Plan(GemmPlan::Tma(p))));
                    if gemm.tma4_loaded() {
                        dets.push(("tma4".to_string(), How::Plan(GemmPlan::Tma(p.quad()))));
                    }
                }
                for (label, how) in dets {
                    let name = format!("gemm.{label}.split_k_deterministic");
                    let r = check_deterministic(&gemm, dev, how, &case);
                    res.push(match r {
                        Ok(ok) => CheckResult::exact(name, ok, "two runs, bitwise"),
                        Err(e) => CheckResult::failed(name, e),
                    });
                }
            }
        }
    }
    res
}

/// Bad shapes and misaligned views must be refused with an error, never launched.
fn check_bad_args(gemm: &Gemm, dev: &CudaDevice) -> Result<(f64, String)> {
    let a = dev
        .stream
        .alloc_zeros::<u16>(64 * 64)
        .map_err(|e| cuda_err("alloc", e))?;
    let w = dev
        .stream
        .alloc_zeros::<u16>(64 * 64)
        .map_err(|e| cuda_err("alloc", e))?;
    let mut c = dev
        .stream
        .alloc_zeros::<f32>(64 * 64)
        .map_err(|e| cuda_err("alloc", e))?;
    let mut failures = Vec::new();
    let mut expect_err = |what: &str, r: Result<()>| {
        if r.is_ok() {
            failures.push(what.to_string());
        }
    };
    let (av, wv) = (a.as_view(), w.as_view());
    expect_err(
        "k % 8",
        gemm.run(dev, &av, &wv, GemmOut::F32(c.as_view_mut()), 4, 8, 12),
    );
    expect_err(
        "n % 8",
        gemm.run(dev, &av, &wv, GemmOut::F32(c.as_view_mut()), 4, 12, 8),
    );
    expect_err(
        "short W",
        gemm.run(dev, &av, &wv, GemmOut::F32(c.as_view_mut()), 4, 128, 64),
    );
    expect_err(
        "skinny m > 64",
        gemm.run_variant(
            dev,
            GemmVariant::Skinny,
            &av,
            &wv,
            GemmOut::F32(c.as_view_mut()),
            65,
            8,
            8,
        ),
    );
    let a_off = a.slice(4..);
    expect_err(
        "misaligned A",
        gemm.run(dev, &a_off, &wv, GemmOut::F32(c.as_view_mut()), 4, 8, 8),
    );
    expect_err(
        "misaligned C",
        gemm.run(dev, &av, &wv, GemmOut::F32(c.slice_mut(1..)), 4, 8, 8),
    );
    dev.sync()?;
    if failures.is_empty() {
        Ok((0.0, "6 bad calls refused".into()))
    } else {
        Ok((1.0, format!("accepted: {}", failures.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_grows_with_k() {
        assert_eq!(tol_f32(328), TOL_F32);
        assert!((tol_f32(12288) - 768.0 / 8_388_608.0).abs() < 1e-12);
    }

    #[test]
    fn reference_hand_case() {
        // a = [[1, 2], [3, -1]] (k = 2), w rows: [1, 1], [0.5, -2]
        let b = |v: &[f32]| check::to_bf16_bits(v);
        let a = b(&[1.0, 2.0, 3.0, -1.0]);
        let w = b(&[1.0, 1.0, 0.5, -2.0]);
        assert_eq!(reference(&a, &w, 2, 2, &[0, 1]), vec![3.0, -3.5, 2.0, 3.5]);
        assert_eq!(reference(&a, &w, 2, 2, &[1]), vec![-3.5, 3.5]);
    }

    #[test]
    fn random_data_and_sampling() {
        let x = random_bf16(5, 200_000);
        assert_eq!(x, random_bf16(5, 200_000));
        let f = check::from_bf16_bits(&x);
        assert!(f.iter().all(|v| (-1.0..=1.0).contains(v)));
        let mean = f.iter().map(|&v| v as f64).sum::<f64>() / f.len() as f64;
        assert!(mean.abs() < 0.01);
        assert_eq!(sample_cols(3, 296, 328).len(), 296);
        let c = sample_cols(32, 12288, 4096);
        assert!(c.contains(&0) && c.contains(&12287));
        let residues: std::collections::HashSet<usize> = c.iter().map(|x| x % 64).collect();
        assert_eq!(residues.len(), 64);
    }
}
