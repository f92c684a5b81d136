//! GPU checks of the attention kernels against the CPU attention on the same bf16-rounded inputs
//! ([`super::self_check`]: every variant on odd shapes, head dims 64 and 128, GQA, strided and
//! padded layouts, per-canvas key counts, poisoned outputs) and their benches
//! ([`super::bench`]).

use super::*;

/// One self-check case.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    sq: usize,
    skv: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Extra K/V rows of cache capacity past skv.
    spare_rows: usize,
    /// Extra elements per Q / out row (as in a fused QKV buffer).
    q_pad: usize,
    o_pad: usize,
    /// Per-batch key counts (cycled over the batch), or none.
    kv_len: Option<&'static [i32]>,
}

/// Host reference: per batch element, the CPU attention on the same bf16-rounded inputs.
fn reference(
    c: &Case,
    shape: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_len: &[i32],
) -> Vec<f32> {
    let w = c.n_heads * c.head_dim;
    let wkv = c.n_kv_heads * c.head_dim;
    let mut want = vec![0f32; c.batch * c.sq * w];
    for b in 0..c.batch {
        let mut qb = Vec::with_capacity(c.sq * w);
        for s in 0..c.sq {
            let r = (b * c.sq + s) * shape.q_stride();
            qb.extend_from_slice(&q[r..r + w]);
        }
        let (mut kb, mut vb) = (
            Vec::with_capacity(c.skv * wkv),
            Vec::with_capacity(c.skv * wkv),
        );
        for j in 0..c.skv {
            let r = (b * shape.kv_batch_stride() + j) * shape.kv_stride();
            kb.extend_from_slice(&k[r..r + wkv]);
            vb.extend_from_slice(&v[r..r + wkv]);
        }
        let valid: Option<Vec<bool>> = c
            .kv_len
            .map(|_| (0..c.skv).map(|j| (j as i64) < kv_len[b] as i64).collect());
        let out = &mut want[b * c.sq * w..(b + 1) * c.sq * w];
        cpu::attention(
            &qb,
            &kb,
            &vb,
            c.sq,
            c.skv,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            valid.as_deref(),
            out,
        );
    }
    want
}

/// `variant`, or with `Some(tiles)` the split kernel forced to `tiles` key tiles per block.
fn check_case(
    dev: &CudaDevice,
    attn: &Attention,
    variant: AttnVariant,
    forced_tiles: Option<usize>,
    c: &Case,
    seed: u64,
) -> Result<(f64, String)> {
    let shape = AttnShape {
        q_stride: c.n_heads * c.head_dim + c.q_pad,
        o_stride: c.n_heads * c.head_dim + c.o_pad,
        kv_batch_stride: c.skv + c.spare_rows,
        ..AttnShape::dense(c.batch, c.sq, c.skv, c.n_heads, c.n_kv_heads, c.head_dim)
    };
    let q = check::round_bf16(&check::random_f32(seed, shape.q_len(), -2.0, 2.0));
    let k = check::round_bf16(&check::random_f32(seed + 1, shape.kv_len(), -2.0, 2.0));
    let v = check::round_bf16(&check::random_f32(seed + 2, shape.kv_len(), -1.0, 1.0));
    let kv_len: Vec<i32> = match c.kv_len {
        Some(l) => (0..c.batch).map(|b| l[b % l.len()]).collect(),
        None => vec![c.skv as i32; c.batch],
    };
    let s = &dev.stream;
    let dq = s
        .clone_htod(&check::to_bf16_bits(&q))
        .map_err(|e| cuda_err("upload q", e))?;
    let dk = s
        .clone_htod(&check::to_bf16_bits(&k))
        .map_err(|e| cuda_err("upload k", e))?;
    let dv = s
        .clone_htod(&check::to_bf16_bits(&v))
        .map_err(|e| cuda_err("upload v", e))?;
    let dl = s
        .clone_htod(&kv_len)
        .map_err(|e| cuda_err("upload kv_len", e))?;
    let mut dout = s
        .clone_htod(&vec![check::POISON_BF16_BITS; shape.o_len()])
        .map_err(|e| cuda_err("upload out", e))?;
    let kl = dl.as_view();
    let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
    let mut ov = dout.as_view_mut();
    let lens = c.kv_len.map(|_| &kl);
    match forced_tiles {
        Some(tiles) => {
            let plan = SplitPlan::with_tiles_per_split(&shape, tiles);
            attn.run_split(plan, &qv, &kv, &vv, &mut ov, lens, &shape)?
        }
        None => attn.run_variant(variant, &qv, &kv, &vv, &mut ov, lens, &shape)?,
    }
    dev.sync()?;
    let got_bits = s
        .clone_dtoh(&dout)
        .map_err(|e| cuda_err("download out", e))?;
    let got_all = check::from_bf16_bits(&got_bits);
    let w = c.n_heads * c.head_dim;
    let mut got = Vec::with_capacity(c.batch * c.sq * w);
    for r in 0..c.batch * c.sq {
        let o = r * shape.o_stride();
        got.extend_from_slice(&got_all[o..o + w]);
    }
    // Padding columns between output rows must be untouched.
    let pad_ok = (0..c.batch * c.sq).all(|r| {
        let o = r * shape.o_stride();
        got_bits[o + w..(o + shape.o_stride()).min(got_bits.len())]
            .iter()
            .all(|&b| b == check::POISON_BF16_BITS)
    });
    let want = reference(c, &shape, &q, &k, &v, &kv_len);
    let err = if pad_ok {
        check::rel_l2(&got, &want)
    } else {
        f64::INFINITY
    };
    Ok((
        err,
        format!(
            "{}{}",
            if pad_ok {
                ""
            } else {
                "wrote into row padding; "
            },
            "vs cpu::attention on bf16-rounded inputs"
        ),
    ))
}

/// Checks both variants against [`cpu::attention`] on odd lengths, GQA, head_dim 64/128,
/// batch 1/3, strided Q/out, cache capacity > skv and per-batch key lengths.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let attn = match Attention::load(dev) {
        Ok(a) => a,
        Err(e) => return vec![CheckResult::failed("attention load", e)],
    };
    let base = Case {
        batch: 1,
        sq: 1,
        skv: 7,
        n_heads: 6,
        n_kv_heads: 6,
        head_dim: 64,
        spare_rows: 0,
        q_pad: 0,
        o_pad: 0,
        kv_len: None,
    };
    let cases = [
        base,
        Case {
            sq: 7,
            skv: 100,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            batch: 3,
            ..base
        },
        Case {
            sq: 32,
            skv: 384,
            n_heads: 32,
            n_kv_heads: 32,
            head_dim: 128,
            spare_rows: 16,
            q_pad: 2 * 32 * 128,
            ..base
        },
        Case {
            sq: 100,
            skv: 400,
            batch: 3,
            spare_rows: 5,
            kv_len: Some(&[400, 257, 1]),
            ..base
        },
        Case {
            sq: 100,
            skv: 7,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 64,
            batch: 3,
            o_pad: 8,
            ..base
        },
        Case {
            sq: 384,
            skv: 384,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 128,
            batch: 1,
            ..base
        },
        Case {
            sq: 32,
            skv: 384,
            n_heads: 6,
            n_kv_heads: 6,
            head_dim: 128,
            batch: 3,
            kv_len: Some(&[384, 200, 33]),
            ..base
        },
        // A batch element with no valid key at all (its rows must come out as zeros; with the
        // split kernel every split of it is empty).
        Case {
            sq: 32,
            skv: 384,
            n_heads: 8,
            n_kv_heads: 8,
            head_dim: 128,
            batch: 3,
            kv_len: Some(&[384, 0, 33]),
            ..base
        },
        Case {
            sq: 65,
            skv: 130,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            batch: 1,
            kv_len: Some(&[129]),
            ..base
        },
    ];
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        // Unless DLLM_ATTN_SPLIT=0 also the split kernel: its default plan (or one tile per block
        // where the default would not split) and, with 3+ key tiles, 2 tiles per block.
        // The key-group kernel on every case, whatever DLLM_ATTN_KEYS says.
        // (Those that do not fit this device's shared memory are left out.)
        let mut hows: Vec<(AttnVariant, Option<usize>)> = [
            AttnVariant::Naive,
            AttnVariant::Mma,
            AttnVariant::Mma2,
            AttnVariant::Keys,
        ]
        .into_iter()
        .filter(|&v| attn.fit().allows(v, c.head_dim))
        .map(|v| (v, None))
        .collect();
        if attn.split_active(c.head_dim) {
            hows.push((AttnVariant::Split, None));
            if c.skv.div_ceil(MMA_KEYS) >= 3 {
                hows.push((AttnVariant::Split, Some(2)));
            }
        }
        for (variant, forced) in hows {
            let name = format!(
                "attention {variant:?}{} b{} sq{} skv{} h{}/{} hd{}{}{}",
                forced.map_or(String::new(), |t| format!(" tiles{t}")),
                c.batch,
                c.sq,
                c.skv,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                if c.kv_len.is_some() { " kvlen" } else { "" },
                if c.q_pad + c.o_pad + c.spare_rows > 0 {
                    " strided"
                } else {
                    ""
                }
            );
            out.push(CheckResult::from_result(
                name,
                TOL_BF16,
                check_case(dev, &attn, variant, forced, c, 100 + 10 * i as u64),
            ));
        }
    }
    out
}

fn bench_one(
    dev: &CudaDevice,
    attn: &Attention,
    variant: AttnVariant,
    batch: usize,
    sq: usize,
    skv: usize,
) -> Result<BenchResult> {
    let (h, hd) = (32, 128);
    let shape = AttnShape::dense(batch, sq, skv, h, h, hd);
    let s = &dev.stream;
    // Random bf16 values in [-r, r] on the device.
    let random = |what: &str, seed: u64, n: usize, r: f32| {
        s.clone_htod(&check::to_bf16_bits(&check::random_f32(seed, n, -r, r)))
            .map_err(|e| cuda_err(&format!("upload {what}"), e))
    };
    let q = random("q", 1, shape.q_len(), 2.0)?;
    let k = random("k", 2, shape.kv_len(), 2.0)?;
    let v = random("v", 3, shape.kv_len(), 1.0)?;
    let mut o = s
        .alloc_zeros::<u16>(shape.o_len())
        .map_err(|e| cuda_err("alloc out", e))?;
    let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
    // REPS back-to-back launches per timed sample, so host launch overhead is hidden as it is in
    // the model's queue of kernels.
    let ms = check::time_median_ms(dev, 2, 10, |_| {
        for _ in 0..BENCH_REPS {
            attn.run_variant(variant, &qv, &kv, &vv, &mut o.as_view_mut(), None, &shape)?;
        }
        Ok(())
    })? / BENCH_REPS as f64;
    let flops = 4.0 * (batch * h * sq * skv * hd) as f64;
    let bytes = 2.0 * (shape.q_len() + 2 * shape.kv_len() + shape.o_len()) as f64;
    Ok(BenchResult::new(
        format!("attention {variant:?} b{batch} sq{sq} skv{skv} h32 hd128"),
        ms,
        Some(bytes),
        Some(flops),
        format!("LLaDA-8B shape, no GQA; mean of {BENCH_REPS} queued launches"),
    ))
}

/// Times the tensor-core kernel at the LLaDA-8B shapes (batch 1 and 8, full canvas 384×384 and
/// a 32-token dual-cache block against 384 keys), and the naive kernel at batch 1 for scale.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let attn = match Attention::load(dev) {
        Ok(a) => a,
        Err(e) => return vec![BenchResult::failed("attention load", e)],
    };
    let mut out = Vec::new();
    for (variant, batch, sq, skv) in [
        (AttnVariant::Mma, 1, 384, 384),
        (AttnVariant::Mma, 8, 384, 384),
        (AttnVariant::Mma, 1, 32, 384),
        (AttnVariant::Mma, 8, 32, 384),
        // The ring's depth: the same shapes with one key tile ahead instead of two.
        (AttnVariant::Mma2, 1, 384, 384),
        (AttnVariant::Mma2, 8, 384, 384),
        (AttnVariant::Mma2, 8, 32, 384),
        (AttnVariant::Naive, 1, 384, 384),
        (AttnVariant::Naive, 1, 32, 384),
        (AttnVariant::Mma, 1, 32, 2048),
        (AttnVariant::Keys, 1, 32, 384),
        (AttnVariant::Keys, 8, 32, 384),
        (AttnVariant::Keys, 1, 32, 2048),
        // The b1 full step (192 plain blocks: under two per SM): does the key split pay there?
        (AttnVariant::Keys, 1, 384, 384),
    ]
    .into_iter()
    .chain(
        // The split kernel (unless DLLM_ATTN_SPLIT=0) at the block-step shapes it is meant for.
        [(1, 32, 384), (1, 32, 2048)]
            .into_iter()
            .filter(|_| attn.split_enabled())
            .map(|(b, sq, skv)| (AttnVariant::Split, b, sq, skv)),
    )
    .filter(|c| attn.fit().allows(c.0, 128))
    {
        let name = format!("attention {variant:?} b{batch} sq{sq} skv{skv}");
        out.push(
            bench_one(dev, &attn, variant, batch, sq, skv)
                .unwrap_or_else(|e| BenchResult::failed(name, e)),
        );
    }
    out
}
