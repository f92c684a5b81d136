//! The attention kernels on the CPU: `cuda/emu/attention_harness.cpp` runs `attention_naive`,
//! `attention_mma_d*` (three key-tile slots), `attention_mma2_d*` (two), `attention_split_d*`
//! (split-KV, merged through a workspace) and `attention_keys_d*` (four key groups merged in
//! shared memory) through the emulation in `cuda/emu/` (`mma.sync`, `ldmatrix`, `cp.async` landing
//! only when waited for, named barriers), with their launcher's grids and shared memory, on
//! GQA shapes with partial query and key tiles, strided rows (the fused QKV activation, a cache
//! with spare rows), per-batch key counts (one of them zero) and the per-canvas K/V table. Each
//! output is compared with the CPU backend's attention ([`dllm::backend::cpu::attention`]); the
//! output columns between rows must keep what was there. A ThreadSanitizer build of the same harness
//! runs them again: no shared-memory reuse may race (tests/common/emulation.rs).

use dllm::backend::cpu::attention;
use dllm::backend::cuda::check::{from_bf16_bits, random_f32, rel_l2, round_bf16, to_bf16_bits};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::emulation::{self, Run, Sanitizer};

/// What the output holds before the launch.
const POISON: u16 = 0x7fbf;

/// The compiled `cuda/emu/attention_harness.cpp`, or `None` (skipped) without a C++ compiler.
fn harness() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    emulation::harness(&BUILT, "attention_harness.cpp")
}

/// The harness built with ThreadSanitizer.
fn race_harness() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    emulation::harness_with(&BUILT, "attention_harness.cpp", Sanitizer::Thread)
}

/// The kernels, as the harness numbers them.
#[derive(Debug, Clone, Copy)]
enum Variant {
    Naive,
    Mma,
    Mma2,
    Split { tiles_per_split: usize },
    Keys,
}

impl Variant {
    fn code(self) -> (usize, usize) {
        match self {
            Variant::Naive => (0, 0),
            Variant::Mma => (1, 0),
            Variant::Mma2 => (2, 0),
            Variant::Split { tiles_per_split } => (3, tiles_per_split),
            Variant::Keys => (4, 0),
        }
    }
}

/// One launch: `batch` canvases of `sq` query rows against `skv` keys (`kv_len`: fewer for some),
/// `heads` = (query heads, kv heads, head_dim).
#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    sq: usize,
    skv: usize,
    heads: (usize, usize, usize),
    kv_len: Option<Vec<i32>>,
    canvases: bool,
    /// Every block at once, each in its own process (else one after another).
    concurrent: bool,
}

fn check(h: &Path, c: &Case, variant: Variant) {
    check_env(h, c, variant, &[]);
}

/// [`check`] with extra environment variables for the harness.
fn check_env(h: &Path, c: &Case, variant: Variant, env: &[(&str, &str)]) {
    let (nh, nkv, hd) = c.heads;
    // The fused QKV activation's rows (q, then k and v columns), an output with 8 spare columns
    // per row, a cache with 5 spare rows per canvas.
    let (qs, os, kvs, kvb) = ((nh + 2 * nkv) * hd, nh * hd + 8, nkv * hd, c.skv + 5);
    let (code, tps) = variant.code();
    let run = Run::new(&[
        c.batch,
        c.sq,
        c.skv,
        nh,
        nkv,
        hd,
        code,
        tps,
        c.kv_len.is_some() as usize,
        c.canvases as usize,
        qs,
        os,
        kvs,
        kvb,
        c.concurrent as usize,
    ]);
    let what = format!("{variant:?} on {c:?}");
    let seed = (c.batch * 1000 + c.sq * 10 + c.skv + hd) as u64;
    let q = round_bf16(&random_f32(seed, c.batch * c.sq * qs, -2.0, 2.0));
    let k = round_bf16(&random_f32(seed + 1, c.batch * kvb * kvs, -2.0, 2.0));
    let v = round_bf16(&random_f32(seed + 2, c.batch * kvb * kvs, -1.0, 1.0));
    run.put("q.u16", &to_bf16_bits(&q));
    run.put("k.u16", &to_bf16_bits(&k));
    run.put("v.u16", &to_bf16_bits(&v));
    run.put("out.u16", &vec![POISON; c.batch * c.sq * os]);
    if let Some(l) = &c.kv_len {
        run.put("kv_len.i32", l);
    }
    run.exec_with(h, "attn", env);
    let out: Vec<u16> = run.get("out.u16");

    let (mut got, mut want) = (Vec::new(), Vec::new());
    for b in 0..c.batch {
        let keys = c
            .kv_len
            .as_ref()
            .map_or(c.skv, |l| (l[b].max(0) as usize).min(c.skv));
        let rows = |src: &[f32],
                    first: usize,
                    n: usize,
                    stride: usize,
                    width: usize,
                    col0: usize|
         -> Vec<f32> {
            (first..first + n)
                .flat_map(|r| src[r * stride + col0..r * stride + col0 + width].to_vec())
                .collect()
        };
        let qb = rows(&q, b * c.sq, c.sq, qs, nh * hd, 0);
        let kb = rows(&k, b * kvb, c.skv, kvs, kvs, 0);
        let vb = rows(&v, b * kvb, c.skv, kvs, kvs, 0);
        let valid: Vec<bool> = (0..c.skv).map(|j| j < keys).collect();
        let mut o = vec![0.0f32; c.sq * nh * hd];
        attention(
            &qb,
            &kb,
            &vb,
            c.sq,
            c.skv,
            nh,
            nkv,
            hd,
            Some(&valid),
            &mut o,
        );
        want.extend(o);
        for r in b * c.sq..(b + 1) * c.sq {
            let row = &out[r * os..(r + 1) * os];
            got.extend(from_bf16_bits(&row[..nh * hd]));
            assert!(
                row[nh * hd..].iter().all(|&x| x == POISON),
                "{what}: row {r}'s spare columns written"
            );
        }
    }
    let err = rel_l2(&got, &want);
    // The bf16 output's rounding alone is ~1.8e-3 here.
    assert!(err <= 4e-3, "{what}: rel L2 {err:.3e}");
}

#[test]
fn every_attention_kernel_matches_the_cpu_backend() {
    let Some(h) = harness() else { return };
    // Two query tiles (the second partial), three key tiles (the last partial), GQA 2:1,
    // canvases with fewer keys (3: one key too many would weigh a quarter) and one with none.
    let base = Case {
        batch: 4,
        sq: 70,
        skv: 150,
        heads: (2, 1, 64),
        kv_len: Some(vec![150, 61, 3, 0]),
        canvases: false,
        concurrent: false,
    };
    for variant in [
        Variant::Naive,
        Variant::Mma,
        Variant::Mma2,
        Variant::Split { tiles_per_split: 1 },
        Variant::Split { tiles_per_split: 2 },
        Variant::Keys,
    ] {
        check(h, &base, variant);
    }
    // head_dim 128, through the per-canvas table.
    let wide = Case {
        batch: 2,
        sq: 33,
        skv: 200,
        heads: (2, 1, 128),
        kv_len: Some(vec![130, 200]),
        canvases: true,
        concurrent: false,
    };
    for variant in [
        Variant::Mma,
        Variant::Split { tiles_per_split: 2 },
        Variant::Keys,
    ] {
        check(h, &wide, variant);
    }
}

#[test]
fn the_key_group_kernel_merges_uneven_rounds() {
    let Some(h) = harness() else { return };
    // The dual-cache block step's shape: 32 query rows against 6 key tiles (key groups 0 and 1
    // get two tiles, 2 and 3 one), and 5 tiles with no length table.
    for (skv, kv_len) in [(384, Some(vec![384])), (300, None)] {
        let c = Case {
            batch: 1,
            sq: 32,
            skv,
            heads: (2, 2, 64),
            kv_len,
            canvases: false,
            concurrent: false,
        };
        check(h, &c, Variant::Keys);
    }
}

#[test]
fn the_attention_kernels_have_no_data_races() {
    let Some(h) = race_harness() else { return };
    // Every shared-memory reuse: the cp.async rings refilled while other warps compute, the key
    // groups' tiles and the merge that reuses them; each also with the copies landing at issue
    // (a slot refilled while another warp still reads it). The blocks run one after another in
    // one process, so the split's merge across blocks is checked by the concurrent test instead.
    let c = Case {
        batch: 2,
        sq: 40,
        skv: 150,
        heads: (2, 1, 64),
        kv_len: Some(vec![150, 61]),
        canvases: false,
        concurrent: false,
    };
    for variant in [
        Variant::Mma,
        Variant::Mma2,
        Variant::Split { tiles_per_split: 1 },
        Variant::Keys,
    ] {
        check(h, &c, variant);
        check_env(h, &c, variant, &[("DLLM_EMU_ASYNC", "early")]);
    }
    let uneven = Case {
        batch: 1,
        sq: 32,
        skv: 384,
        heads: (1, 1, 64),
        kv_len: None,
        canvases: false,
        concurrent: false,
    };
    check(h, &uneven, Variant::Keys);
}

#[test]
fn the_split_merge_holds_with_every_block_at_once() {
    let Some(h) = harness() else { return };
    // Three splits of each (query tile, head) unit running at the same time: the last to arrive,
    // whichever it is, merges all three (run a few times: the arrival order varies).
    let c = Case {
        batch: 1,
        sq: 20,
        skv: 150,
        heads: (2, 1, 64),
        kv_len: None,
        canvases: false,
        concurrent: true,
    };
    for _ in 0..3 {
        check(h, &c, Variant::Split { tiles_per_split: 1 });
    }
    check(h, &c, Variant::Keys);
}
