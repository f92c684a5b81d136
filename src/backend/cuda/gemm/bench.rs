//! GEMM benches ([`super::bench`], [`super::time_shape`]): the kernel `run` picks against the
//! others on the LLaDA-8B shapes, timed with CUDA events, and the device buffers and timing
//! helpers the other GEMM benches share.

use super::*;

/// Times the kernel `run` picks (named in each line, marked "default") and, for comparison,
/// `wide` and `wgmma` at every M ≥ 256, `wide` at m = 32 and `naive` on one small shape, on the
/// LLaDA-8B shapes at M ∈ {1, 8, 32, 256, 384, 3072}; GB/s counts weight bytes only. One
/// `gemm.summary` line per shape lists the default kernel's time at every M and the speed-up of
/// wgmma over wide.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let gemm = match Gemm::load(dev) {
        Ok(g) => g,
        Err(e) => return vec![BenchResult::failed("gemm.load", e)],
    };
    let mut res = Vec::new();
    let shapes = [
        (4096usize, 12288usize, Epilogue::StoreBf16),
        (12288, 4096, Epilogue::AddF32),
        (4096, 126_464, Epilogue::StoreF32),
    ];
    for (k, n, epi) in shapes {
        if let Err(e) = bench_shape(&gemm, dev, k, n, epi, &mut res) {
            res.push(BenchResult::failed(format!("gemm n{n} k{k}"), e));
        }
    }
    res
}

/// Times [`Gemm::run`] (the kernel it picks, e.g. the stream kernel under `DLLM_GEMM_STREAM=1`
/// or the TMA kernel unless `DLLM_GEMM_TMA=0`)
/// on one shape with a bf16 output, `repeat` timed launches after 3 warm-up ones: a focused run
/// for profilers (`dllm-gpu-check --gemm-shape M,N,K`, `ncu -k regex:gemm_`).
pub fn time_shape(
    dev: &CudaDevice,
    m: usize,
    n: usize,
    k: usize,
    repeat: usize,
) -> Result<BenchResult> {
    let gemm = Gemm::load(dev)?;
    let mut bufs = BenchBuffers::new(dev, m, n, k, Epilogue::StoreBf16)?;
    let ms = bufs.time_n(dev, m, repeat, |av, wv, out| {
        gemm.run(dev, av, wv, out, m, n, k)
    })?;
    let kernel = match gemm.variant_for_m(m) {
        GemmVariant::Skinny if m <= STREAM_MAX_M && gemm.stream_active() => {
            let p = gemm.stream_plan(m, n, k)?;
            format!("stream, {} blocks", p.blocks)
        }
        GemmVariant::Skinny => {
            let p = gemm.skinny_plan(m, n, k);
            format!(
                "skinny v{}, {} tiles × {} splits",
                p.version, p.tiles, p.splits
            )
        }
        GemmVariant::Wgmma => {
            let p = match gemm.wgmma_plan(m, n, k) {
                GemmPlan::Tma(p) | GemmPlan::Wgmma(p) => p,
                other => return Err(Error::Backend(format!("unexpected plan {other:?}"))),
            };
            format!(
                "{} wg{}, {} × {} tiles × {} splits",
                p.kind(),
                p.wg,
                p.m_tiles,
                p.n_tiles,
                p.splits
            )
        }
        v => v.name().to_string(),
    };
    Ok(BenchResult::new(
        format!("gemm.shape m{m} n{n} k{k}"),
        ms,
        Some((n * k * 2) as f64),
        Some(2.0 * (m * n * k) as f64),
        format!("{kernel}, median of {repeat}"),
    ))
}

/// The operands of one bench shape: rotating weight copies (so the set exceeds the 50 MB L2),
/// activations and an output for up to `max_m` rows.
pub(in crate::backend::cuda) struct BenchBuffers {
    ws: Vec<CudaSlice<u16>>,
    a: CudaSlice<u16>,
    c16: CudaSlice<u16>,
    c32: CudaSlice<f32>,
    epi: Epilogue,
    n: usize,
    k: usize,
}

impl BenchBuffers {
    pub(in crate::backend::cuda) fn new(
        dev: &CudaDevice,
        max_m: usize,
        n: usize,
        k: usize,
        epi: Epilogue,
    ) -> Result<Self> {
        // One copy already exceeds the L2 past 256 MB.
        let copies = if n * k * 2 >= 256 << 20 { 1 } else { 2 };
        let w_host = random_bf16(77, n * k);
        let ws: Vec<CudaSlice<u16>> = (0..copies)
            .map(|_| upload(dev, &w_host))
            .collect::<Result<_>>()?;
        drop(w_host);
        let a = upload(dev, &random_bf16(78, max_m * k))?;
        let bf16_out = epi.bf16_out();
        let c16 = dev
            .stream
            .alloc_zeros::<u16>(if bf16_out { max_m * n } else { 1 })
            .map_err(|e| cuda_err("gemm bench: alloc C", e))?;
        let c32 = dev
            .stream
            .alloc_zeros::<f32>(if bf16_out { 1 } else { max_m * n })
            .map_err(|e| cuda_err("gemm bench: alloc C", e))?;
        Ok(BenchBuffers {
            ws,
            a,
            c16,
            c32,
            epi,
            n,
            k,
        })
    }

    /// Median ms of `launch(a, w, out)` over `m` rows (15 runs), the weight copy rotating.
    fn time(
        &mut self,
        dev: &CudaDevice,
        m: usize,
        launch: impl FnMut(&CudaView<u16>, &CudaView<u16>, GemmOut<'_>) -> Result<()>,
    ) -> Result<f64> {
        self.time_n(dev, m, 15, launch)
    }

    /// Times `plan` over `m` rows ([`BenchBuffers::time`]) as the bench line `name`; `detail`
    /// starts with "default, " when `default` (the plan `run` would pick).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::backend::cuda) fn bench_plan(
        &mut self,
        gemm: &Gemm,
        dev: &CudaDevice,
        plan: GemmPlan,
        m: usize,
        name: String,
        default: bool,
        detail: String,
    ) -> Result<BenchResult> {
        let (n, k) = (self.n, self.k);
        let ms = self.time(dev, m, |av, wv, out| {
            gemm.run_plan(dev, plan, av, wv, out, m, n, k)
        })?;
        Ok(BenchResult::new(
            name,
            ms,
            Some((n * k * 2) as f64),
            Some(2.0 * (m * n * k) as f64),
            format!("{}{detail}", if default { "default, " } else { "" }),
        ))
    }

    /// The product `launch` computes over `m` rows from a zeroed output (so that a residual add
    /// gives `A·Wᵀ` too), as f32.
    pub(in crate::backend::cuda) fn product(
        &mut self,
        dev: &CudaDevice,
        m: usize,
        launch: impl FnOnce(&CudaView<u16>, &CudaView<u16>, GemmOut<'_>) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let (n, epi) = (self.n, self.epi);
        let zero = |e| cuda_err("gemm bench: zero C", e);
        if epi.bf16_out() {
            dev.stream.memset_zeros(&mut self.c16).map_err(zero)?;
        } else {
            dev.stream.memset_zeros(&mut self.c32).map_err(zero)?;
        }
        let len = if epi == Epilogue::SwigluBf16 {
            m * n / 2
        } else {
            m * n
        };
        let out = output_view(epi, &mut self.c16, &mut self.c32, m, n);
        launch(&self.a.slice(..m * self.k), &self.ws[0].as_view(), out)?;
        Ok(if epi.bf16_out() {
            download(dev, &self.c16)?[..len]
                .iter()
                .map(|&b| bf16::from_bits(b).to_f32())
                .collect()
        } else {
            download(dev, &self.c32)?[..len].to_vec()
        })
    }

    /// [`BenchBuffers::time`] over `iters` timed runs.
    pub(in crate::backend::cuda) fn time_n(
        &mut self,
        dev: &CudaDevice,
        m: usize,
        iters: usize,
        mut launch: impl FnMut(&CudaView<u16>, &CudaView<u16>, GemmOut<'_>) -> Result<()>,
    ) -> Result<f64> {
        let (n, copies) = (self.n, self.ws.len());
        let av = self.a.slice(..m * self.k);
        let (ws, c16, c32, epi) = (&self.ws, &mut self.c16, &mut self.c32, self.epi);
        check::time_median_ms(dev, 3, iters, |i| {
            let wv = ws[i % copies].as_view();
            launch(&av, &wv, output_view(epi, c16, c32, m, n))
        })
    }
}

/// The output of epilogue `epi` over `m` rows of an `n`-column product: in `c16` for the bf16
/// epilogues (`m·n/2` values for the fused SwiGLU), in `c32` for the fp32 ones. The RoPE
/// epilogue needs its caches and table ([`crate::backend::cuda::gemm_rope`]): its product is the bf16 store's.
fn output_view<'b>(
    epi: Epilogue,
    c16: &'b mut CudaSlice<u16>,
    c32: &'b mut CudaSlice<f32>,
    m: usize,
    n: usize,
) -> GemmOut<'b> {
    match epi {
        Epilogue::StoreBf16 | Epilogue::RopeQkv => GemmOut::Bf16(c16.slice_mut(..m * n)),
        Epilogue::SwigluBf16 => GemmOut::SwigluBf16(c16.slice_mut(..m * n / 2)),
        Epilogue::StoreF32 => GemmOut::F32(c32.slice_mut(..m * n)),
        Epilogue::AddF32 => GemmOut::AddF32(c32.slice_mut(..m * n)),
    }
}

fn bench_shape(
    gemm: &Gemm,
    dev: &CudaDevice,
    k: usize,
    n: usize,
    epi: Epilogue,
    res: &mut Vec<BenchResult>,
) -> Result<()> {
    const MS: [usize; 6] = [1, 8, 32, 256, 384, 3072];
    let w_bytes = n * k * 2;
    let mut bufs = BenchBuffers::new(dev, 3072, n, k, epi)?;
    let mut runs: Vec<(usize, GemmVariant)> = Vec::new();
    for m in MS {
        let default = gemm.variant_for_m(m);
        runs.push((m, default));
        if m > SKINNY_MAX_M {
            for v in [GemmVariant::Wgmma, GemmVariant::Wide] {
                if v != default && (v != GemmVariant::Wgmma || gemm.wgmma.is_some()) {
                    runs.push((m, v));
                }
            }
        }
    }
    runs.push((32, GemmVariant::Wide));
    if (k, n) == (4096, 12288) {
        runs.push((1, GemmVariant::Naive));
    }
    let mut times: Vec<(usize, GemmVariant, f64)> = Vec::new();
    for (m, variant) in runs {
        let ms = bufs.time(dev, m, |av, wv, out| {
            gemm.run_variant(dev, variant, av, wv, out, m, n, k)
        })?;
        times.push((m, variant, ms));
        let flops = 2.0 * (m * n * k) as f64;
        let mut detail = format!("{} out", epi.name());
        if variant == gemm.variant_for_m(m) {
            detail.insert_str(0, "default, ");
        }
        if let (GemmVariant::Wgmma, GemmPlan::Tma(p) | GemmPlan::Wgmma(p)) =
            (variant, gemm.wgmma_plan(m, n, k))
        {
            detail.push_str(&format!(
                ", {} wg{} ({}×192 tiles): {} tiles × {} splits",
                p.kind(),
                p.wg,
                p.bm(),
                p.tiles(),
                p.splits
            ));
        } else if variant == GemmVariant::Skinny {
            let p = gemm.skinny_plan(m, n, k);
            detail.push_str(&format!(
                ", v{}: {} tiles × {} splits",
                p.version, p.tiles, p.splits
            ));
        } else if variant == GemmVariant::Wide {
            let p = WidePlan::new(m, n, k, gemm.num_sms);
            detail.push_str(&format!(", {} tiles × {} splits", p.tiles(), p.splits));
        }
        let out_bytes = m * n * if epi == Epilogue::StoreBf16 { 2 } else { 4 };
        detail.push_str(&format!(
            ", all bytes {:.1} MB",
            (w_bytes + m * k * 2 + out_bytes) as f64 / 1e6
        ));
        res.push(BenchResult::new(
            format!("gemm.{} m{m} n{n} k{k}", variant.name()),
            ms,
            Some(w_bytes as f64),
            Some(flops),
            detail,
        ));
    }
    // Skinny version 1 against version 2 with their default plans (m ≤ 32).
    for m in [1usize, 8, 32] {
        for version in [1usize, 2] {
            let plan = SkinnyPlan::for_version(version, m, n, k, gemm.num_sms);
            res.push(bufs.bench_plan(
                gemm,
                dev,
                GemmPlan::Skinny(plan),
                m,
                format!("gemm.skinny_v{version} m{m} n{n} k{k}"),
                gemm.skinny_plan(m, n, k) == plan,
                format!(
                    "{} tiles of {} rows × {} splits",
                    plan.tiles,
                    plan.rows(),
                    plan.splits
                ),
            )?);
        }
        if gemm.stream_loaded() {
            // The bulk-copy stream kernel (DLLM_GEMM_STREAM=1), one block per SM, and with
            // twice as many blocks (two waves) to show what the persistent grid buys.
            for blocks in [gemm.num_sms, 2 * gemm.num_sms] {
                let plan = StreamPlan::with_blocks(m, n, k, blocks)?;
                res.push(bufs.bench_plan(
                    gemm,
                    dev,
                    GemmPlan::Stream(plan),
                    m,
                    format!("gemm.stream m{m} n{n} k{k} blocks{}", plan.blocks),
                    gemm.stream_active() && blocks == gemm.stream_blocks.for_shape(n, k),
                    format!(
                        "{} tiles of 128 rows × {} chunks of 128 K, {} tiles cut between blocks",
                        plan.tiles,
                        plan.chunks_per_tile,
                        plan.inner_boundaries()
                    ),
                )?);
            }
        }
    }
    // The TMA cluster kernel (unless DLLM_GEMM_TMA=0) against gemm_wgmma, each with its own default
    // plan, in the same process.
    if gemm.tma_loaded() {
        for m in [256usize, 384, 3072] {
            let p = WgmmaPlan::new(m, n, k, gemm.num_sms);
            let pairs = WgmmaPlan::with_tma(m, n, k, gemm.num_sms).paired();
            let mut plans = vec![
                ("wgmma", p, GemmPlan::Wgmma(p)),
                ("tma", pairs, GemmPlan::Tma(pairs)),
            ];
            if gemm.tma4_loaded() {
                let quads = pairs.quad();
                plans.push(("tma4", quads, GemmPlan::Tma(quads)));
            }
            for (label, wp, plan) in plans {
                res.push(bufs.bench_plan(
                    gemm,
                    dev,
                    plan,
                    m,
                    format!("gemm.{label}_vs m{m} n{n} k{k}"),
                    gemm.wgmma_plan(m, n, k) == plan,
                    format!(
                        "wg{}: {} × {} tiles × {} splits",
                        wp.wg, wp.m_tiles, wp.n_tiles, wp.splits
                    ),
                )?);
            }
        }
    }
    // Skinny split-K sweep at m = 1 and 32 for both versions (the default plan's choice is a
    // model; this measures the alternatives) on the two 100 MB shapes. On the LM head only m = 32
    // with 1, 2 and 4 splits: whether shorter K ranges per block (an activation slice that stays
    // in L1) recover the m = 1 rate there.
    let small = n * k * 2 < 256 << 20;
    let sweep: &[(usize, usize)] = if small {
        &[(1, 1), (32, 1), (1, 2), (32, 2)]
    } else {
        &[(32, 1), (32, 2)]
    };
    let wants: &[usize] = if small {
        &[1, 2, 3, 4, 6, 8, 12, 16]
    } else {
        &[1, 2, 4]
    };
    {
        for &(m, version) in sweep {
            let chunks = k.div_ceil(SKINNY_CHUNK);
            let unroll = if version == 2 {
                SKINNY2_UNROLL
            } else {
                SKINNY_UNROLL
            };
            let mut seen = Vec::new();
            for &want in wants {
                let plan = SkinnyPlan::with_version_chunks(
                    version,
                    m,
                    n,
                    k,
                    chunks.div_ceil(want).next_multiple_of(unroll),
                );
                if seen.contains(&plan.splits) {
                    continue;
                }
                seen.push(plan.splits);
                res.push(bufs.bench_plan(
                    gemm,
                    dev,
                    GemmPlan::Skinny(plan),
                    m,
                    format!(
                        "gemm.skinny_sweep v{version} m{m} n{n} k{k} splits{}",
                        plan.splits
                    ),
                    gemm.skinny_plan(m, n, k) == plan,
                    format!(
                        "{} blocks = {:.2} × (4 per SM)",
                        plan.tiles * plan.splits,
                        (plan.tiles * plan.splits) as f64 / (4 * gemm.num_sms) as f64
                    ),
                )?);
            }
        }
    }
    // Summary: the default kernel at every M, and wgmma vs wide where both ran.
    let find = |m: usize, v: GemmVariant| times.iter().find(|t| t.0 == m && t.1 == v).map(|t| t.2);
    let mut parts = Vec::new();
    for m in MS {
        let v = gemm.variant_for_m(m);
        let Some(ms) = find(m, v) else { continue };
        let mut part = format!("m{m} {} {ms:.4}", v.name());
        if let (Some(a), Some(b)) = (find(m, GemmVariant::Wgmma), find(m, GemmVariant::Wide)) {
            part.push_str(&format!(" (wgmma/wide speed-up {:.2}×)", b / a));
        }
        parts.push(part);
    }
    let ms384 = find(384, gemm.variant_for_m(384)).unwrap_or(f64::NAN);
    res.push(BenchResult::new(
        format!("gemm.summary n{n} k{k} (ms = m384)"),
        ms384,
        Some(w_bytes as f64),
        Some(2.0 * (384 * n * k) as f64),
        format!("default ms by M: {}", parts.join(" | ")),
    ));
    Ok(())
}
