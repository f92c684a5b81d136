//! Geometry of `cuda/gemm_stream.cu`: the bulk-copy ("TMA") weight-streaming GEMM for `M ≤ 32`,
//! which replaces the register-fed skinny kernels on Hopper (on by default; `DLLM_GEMM_STREAM=0`
//! turns it off).
//!
//! The kernel cuts the weight rows into tiles of [`STREAM_ROWS`] and K into chunks of
//! [`STREAM_KS`] (each moved as TMA boxes of [`STREAM_BOX_K`] K values, so the launch takes a
//! tensor map per operand: `gemm_tma::OperandBox`), and lets each of a persistent grid of
//! blocks (one per SM) stream an equal,
//! contiguous share of the `tiles × chunks` (tile, chunk) pairs ("stream-K"): no wave tail, no
//! split count to tune. Tiles cut between two blocks are reduced in the kernel through a small
//! workspace (two slots per block) and per-tile, per-warp counters, deterministically (block
//! order). This module computes that geometry and the buffers a launch needs; `gemm.rs` loads,
//! launches and checks the kernel. Design notes: docs/gemm-notes.md ("stream").

use crate::error::{Error, Result};

/// Largest `M` the stream kernel serves (`gemm_stream_mg{1..4}`, 8 tokens per mma group).
pub const STREAM_MAX_M: usize = 32;
/// Weight rows per tile; must match `STREAM_ROWS` in gemm_stream.cu (4 warps × 2 × 16).
pub const STREAM_ROWS: usize = 128;
/// K elements per chunk (one ring stage); must match `STREAM_KS`.
pub const STREAM_KS: usize = 128;
/// Consumer warps per block (each has its own reduction counter per tile); `STREAM_CONSUMERS`.
const STREAM_CONSUMERS: usize = 4;
/// Threads per block: the consumer warps plus one producer warp.
pub const STREAM_THREADS: u32 = ((STREAM_CONSUMERS + 1) * 32) as u32;
/// 16-row mma tiles per consumer warp; `STREAM_RT`.
const STREAM_RT: usize = 2;
/// Ring depth of the embedded image (`STREAM_STAGES`'s default in gemm_stream.cu). The loaded
/// module says its own ([`stages_of`]): an image built with `-D STREAM_STAGES=N` for
/// `DLLM_KERNEL_DIR` runs with the shared memory its ring needs.
pub const DEFAULT_STAGES: usize = 5;
/// The module constant holding the ring depth (`DLLM_MODULE_INT` in gemm_stream.cu).
pub const STAGES_SYMBOL: &str = "dllm_stream_stages";
/// The ring depths the kernel accepts (its `static_assert`).
const STAGES_RANGE: std::ops::RangeInclusive<usize> = 2..=8;
/// K elements per TMA box (two boxes per chunk and operand); `STREAM_BOX_K`.
pub const STREAM_BOX_K: usize = 64;

/// One launch of `gemm_stream_mg{groups}`: `blocks` persistent blocks share the `tiles ×
/// chunks_per_tile` (tile, chunk) pairs evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPlan {
    pub groups: usize,
    pub tiles: usize,
    pub chunks_per_tile: usize,
    pub blocks: usize,
}

impl StreamPlan {
    /// The default plan: one block per SM (the ring takes most of an SM's shared memory), fewer
    /// when there are fewer (tile, chunk) pairs than SMs.
    pub fn new(m: usize, n: usize, k: usize, num_sms: usize) -> Result<StreamPlan> {
        StreamPlan::with_blocks(m, n, k, num_sms.max(1))
    }

    /// A plan with an explicit block count (checks use odd counts so that tiles are cut between
    /// blocks at many places); capped at the number of (tile, chunk) pairs.
    pub fn with_blocks(m: usize, n: usize, k: usize, blocks: usize) -> Result<StreamPlan> {
        if m == 0 || m > STREAM_MAX_M || n == 0 || k == 0 {
            return Err(Error::invalid(format!(
                "gemm: the stream kernel takes 1 ≤ m ≤ {STREAM_MAX_M}, n, k ≥ 1 (got m={m} n={n} k={k})"
            )));
        }
        let tiles = n.div_ceil(STREAM_ROWS);
        let chunks_per_tile = k.div_ceil(STREAM_KS);
        let pairs = tiles * chunks_per_tile;
        let blocks = blocks.clamp(1, pairs);
        if blocks > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "gemm: stream plan of {blocks} blocks exceeds the grid limit"
            )));
        }
        Ok(StreamPlan {
            groups: m.div_ceil(8),
            tiles,
            chunks_per_tile,
            blocks,
        })
    }

    /// (tile, chunk) pairs in all.
    pub fn pairs(&self) -> usize {
        self.tiles * self.chunks_per_tile
    }

    /// fp32 elements of workspace: two partial-tile slots per block, each one float4 per lane,
    /// 16-row tile and token group of every consumer warp.
    pub fn workspace_floats(&self) -> usize {
        self.blocks * 2 * STREAM_CONSUMERS * STREAM_RT * self.groups * 32 * 4
    }

    /// Reduction counters the launch needs (one per tile and consumer warp, zero between launches).
    pub fn counters(&self) -> usize {
        self.tiles * STREAM_CONSUMERS
    }

    /// How many block boundaries fall inside a tile (each cuts that tile between two blocks,
    /// which then meet in the workspace reduction); tiles not cut are written directly.
    pub fn inner_boundaries(&self) -> usize {
        let (t, b) = (self.pairs(), self.blocks);
        (1..b)
            .map(|i| i * t / b)
            .filter(|&x| x % self.chunks_per_tile != 0)
            .count()
    }
}

/// Dynamic shared memory of `gemm_stream_mg{groups}` with a ring of `stages`
/// (`StreamCfg<G>::SMEM_BYTES`): stages of two 64-K boxes of 128 weight rows and two of 8·groups
/// activation rows (128 bytes a row), plus 1 KB to align the ring to the swizzle's 1024-byte
/// period.
pub fn smem_bytes(groups: usize, stages: usize) -> u32 {
    let stage = 2 * STREAM_ROWS * 128 + 2 * 8 * groups * 128;
    (stages * stage + 1024) as u32
}

/// The ring depth the loaded `gemm_stream` module was compiled with ([`STAGES_SYMBOL`]), checked
/// against the range its kernel accepts.
pub fn stages_read(dev: &super::CudaDevice) -> Result<usize> {
    stages_checked(dev.module_int("gemm_stream", STAGES_SYMBOL)?)
}

/// The ring depth to launch the loaded module with: [`stages_read`], or, when that fails and no
/// `DLLM_KERNEL_DIR` is in use, [`DEFAULT_STAGES`] (the embedded image is compiled from the source
/// that constant mirrors; `dllm-gpu-check`'s `gemm.stream_stages` reports a failed read).
pub fn stages_of(dev: &super::CudaDevice) -> Result<usize> {
    match stages_read(dev) {
        Ok(s) => Ok(s),
        Err(_) if dev.kernel_dir.is_none() => Ok(DEFAULT_STAGES),
        Err(e) => Err(e),
    }
}

/// `value` as a ring depth, or the error naming the module constant.
fn stages_checked(value: i32) -> Result<usize> {
    usize::try_from(value)
        .ok()
        .filter(|s| STAGES_RANGE.contains(s))
        .ok_or_else(|| {
            Error::Backend(format!(
                "gemm_stream's {STAGES_SYMBOL} is {value}, outside {}..={}",
                STAGES_RANGE.start(),
                STAGES_RANGE.end()
            ))
        })
}

/// The largest `m` [`super::gemm::Gemm::run`] gives the stream kernel: `DLLM_GEMM_STREAM_MAX_M`
/// (1..=32, for bisecting), else [`STREAM_MAX_M`].
pub fn max_m_from_env() -> usize {
    super::env_switch::count("DLLM_GEMM_STREAM_MAX_M", 0..=usize::MAX)
        .map_or(STREAM_MAX_M, |m| m.min(STREAM_MAX_M))
}

/// Blocks the stream kernel's plans launch ([`super::gemm::Gemm::stream_plan`]):
/// `DLLM_GEMM_STREAM_BLOCKS` (1..=4096), else one per SM. An isolated-launch sweep on an H200
/// (session 5) found 99 blocks 9 % faster than 132 on the 32 × 12288 × 4096 QKV projection and
/// 7 % slower on the 32 × 24576 × 4096 gate/up; the variable lets `dllm bench` time a count
/// end to end before any default changes.
pub fn blocks_from_env(num_sms: usize) -> usize {
    blocks_override().unwrap_or(num_sms.max(1))
}

/// Weights up to this size take 3/4 of the SMs under `DLLM_GEMM_STREAM_BLOCKS=auto` (LLaDA-8B's
/// QKV and down projections, 100.7 MB, and its attention output, 33.5 MB; not the 201 MB gate/up
/// or the 1 GB LM head).
pub const AUTO_FEW_BLOCKS_BYTES: usize = 128 << 20;

/// How many blocks the stream kernel's plans launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamBlocks {
    /// The same count for every shape: one per SM, or `DLLM_GEMM_STREAM_BLOCKS=N`.
    Fixed(usize),
    /// `DLLM_GEMM_STREAM_BLOCKS=auto` (opt-in, session 10, not yet timed end to end): 3/4 of the
    /// `sms` for weights up to [`AUTO_FEW_BLOCKS_BYTES`], one per SM above. Session 9's sweep
    /// (H200, isolated launches at M = 32): 99 blocks against 132 took the QKV projection from
    /// 0.0420 to 0.0388 ms, the attention output from 0.0250 to 0.0241, the down projection
    /// from 0.0450 to 0.0420, while the gate/up went from 0.0638 to 0.0663.
    BySize { sms: usize },
}

impl StreamBlocks {
    /// From `DLLM_GEMM_STREAM_BLOCKS`: `auto`, a count (1..=4096), else one per SM.
    pub fn from_env(num_sms: usize) -> StreamBlocks {
        if auto_blocks_requested() {
            StreamBlocks::BySize {
                sms: num_sms.max(1),
            }
        } else {
            StreamBlocks::Fixed(blocks_from_env(num_sms))
        }
    }

    /// The block count for an `n × k` bf16 weight matrix.
    pub fn for_shape(&self, n: usize, k: usize) -> usize {
        match *self {
            StreamBlocks::Fixed(b) => b,
            StreamBlocks::BySize { sms } => {
                if n.saturating_mul(k).saturating_mul(2) <= AUTO_FEW_BLOCKS_BYTES {
                    (3 * sms / 4).max(1)
                } else {
                    sms
                }
            }
        }
    }
}

/// Whether `DLLM_GEMM_STREAM_BLOCKS=auto` asks for [`StreamBlocks::BySize`].
pub fn auto_blocks_requested() -> bool {
    std::env::var("DLLM_GEMM_STREAM_BLOCKS").is_ok_and(|v| v.trim() == "auto")
}

/// The block count `DLLM_GEMM_STREAM_BLOCKS` sets (1..=4096), if any.
pub fn blocks_override() -> Option<usize> {
    super::env_switch::count("DLLM_GEMM_STREAM_BLOCKS", 1..=4096)
}

/// Whether the stream kernel is wanted: on unless `DLLM_GEMM_STREAM=0`. Verified on an H200
/// (2026-11-27): every GEMM check including the tiny model's shapes, compute-sanitizer memcheck
/// and racecheck clean, the LM head at 97 % of the copy rate, b1 dual-cache 8.54 → 6.91 ms/step.
/// Its one failed check was a free-running cached-session comparison that parted at a near-tie
/// (docs/perf.md, "The stream GEMM's session divergence"); the lockstep checks that replace it
/// have not run on a GPU yet.
pub fn requested_by_env() -> bool {
    super::env_switch::flag("DLLM_GEMM_STREAM", true)
}

/// Whether `DLLM_GEMM_STREAM=1` asks for the stream kernel explicitly (a device that cannot run
/// it is then reported as a failure rather than silently skipped).
pub fn explicitly_requested() -> bool {
    super::env_switch::explicitly_on("DLLM_GEMM_STREAM")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_blocks_take_three_quarters_of_the_sms_on_the_smaller_weights() {
        let auto = StreamBlocks::BySize { sms: 132 };
        // LLaDA-8B's block-step shapes (N × K): QKV, attention output, down: 99 blocks.
        for (n, k) in [(6144, 4096), (12_288, 4096), (4096, 4096), (4096, 12_288)] {
            assert_eq!(auto.for_shape(n, k), 99, "{n}×{k}");
        }
        // Gate/up (201 MB) and the LM head: one per SM.
        assert_eq!(auto.for_shape(24_576, 4096), 132);
        assert_eq!(auto.for_shape(126_464, 4096), 132);
        assert_eq!(StreamBlocks::Fixed(77).for_shape(24_576, 4096), 77);
        assert_eq!(StreamBlocks::BySize { sms: 1 }.for_shape(8, 8), 1);
    }

    /// The kernel's chunk range of block `b` (`stream_start` in gemm_stream.cu).
    fn start(b: usize, t: usize, blocks: usize) -> usize {
        b * t / blocks
    }

    /// The kernel's `stream_block_of`: the block whose range holds chunk `x`.
    fn block_of(x: usize, t: usize, blocks: usize) -> usize {
        ((x + 1) * blocks - 1) / t
    }

    #[test]
    fn ranges_cover_every_pair_once_and_block_of_inverts_them() {
        for (t, blocks) in [
            (28, 5),
            (28, 7),
            (28, 28),
            (3072, 132),
            (31_616, 132),
            (7, 3),
        ] {
            let mut covered = vec![0u32; t];
            for b in 0..blocks {
                let (s, e) = (start(b, t, blocks), start(b + 1, t, blocks));
                assert!(e > s, "block {b} of {blocks} is empty for {t} pairs");
                for (x, c) in covered.iter_mut().enumerate().take(e).skip(s) {
                    *c += 1;
                    assert_eq!(block_of(x, t, blocks), b, "x={x} t={t} blocks={blocks}");
                }
                // Balanced: every block gets floor or ceil of t / blocks.
                assert!(e - s == t / blocks || e - s == t.div_ceil(blocks));
            }
            assert!(covered.iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn a_block_meets_at_most_two_cut_tiles_so_two_slots_suffice() {
        // For every tile, each contributing block's slot (0 = the block's first tile, else 1)
        // must be distinct per block and a block may use slot 1 only for its last tile.
        for (tiles, c, blocks) in [
            (4, 7, 5),
            (4, 7, 3),
            (96, 32, 132),
            (32, 96, 132),
            (988, 32, 132),
        ] {
            let t = tiles * c;
            for b in 0..blocks {
                let (s, e) = (start(b, t, blocks), start(b + 1, t, blocks));
                let first = s / c;
                let last = (e - 1) / c;
                let cut = |tile: usize| s > tile * c || e < (tile + 1) * c;
                let cuts: Vec<usize> = (first..=last).filter(|&tl| cut(tl)).collect();
                assert!(cuts.len() <= 2, "block {b}: cut tiles {cuts:?}");
                for tl in cuts {
                    assert!(tl == first || tl == last);
                }
            }
        }
    }

    /// A host model of the kernel's per-tile protocol (the consumer loop's flush): every block
    /// walks its chunks, flushes at a tile's last chunk or its own last chunk, writes a whole
    /// segment directly or its partial into slot 0 (its first tile) / 1, and the contributor
    /// whose counter increment completes the tile sums slots of blocks b0..=b1 in order. Checked
    /// for every arrival order: each tile is stored exactly once, with the sum of all its chunks.
    #[test]
    fn the_reduction_protocol_stores_every_tile_once_with_all_its_chunks() {
        for (tiles, c, blocks) in [
            (4, 7, 5),
            (4, 7, 28),
            (4, 7, 4),
            (3, 5, 2),
            (96, 32, 132),
            (5, 3, 7),
        ] {
            let t = tiles * c;
            // Chunk x contributes 1 << (x % 20) + x: sums identify missing or doubled chunks.
            let val = |x: usize| (1u64 << (x % 20)) + x as u64;
            // Flush events per block in program order: (tile, seg_begin, x_last, partial sum).
            let mut events = Vec::new();
            for b in 0..blocks {
                let (xb, xe) = (start(b, t, blocks), start(b + 1, t, blocks));
                let (mut seg, mut acc) = (xb, 0u64);
                for x in xb..xe {
                    acc += val(x);
                    let tile = x / c;
                    if x % c == c - 1 || x == xe - 1 {
                        events.push((b, tile, seg, x, acc, xb));
                        acc = 0;
                        seg = x + 1;
                    }
                }
            }
            for order_seed in 0..6u64 {
                // A deterministic shuffle of the flush order (blocks run concurrently).
                let mut ev = events.clone();
                let mut z = order_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for i in (1..ev.len()).rev() {
                    z ^= z << 13;
                    z ^= z >> 7;
                    z ^= z << 17;
                    ev.swap(i, (z % (i as u64 + 1)) as usize);
                }
                let mut slots = std::collections::HashMap::new();
                let mut counters = vec![0usize; tiles];
                let mut stored = vec![None::<u64>; tiles];
                for &(b, tile, seg, x, acc, xb) in &ev {
                    let t0 = tile * c;
                    let result = if seg == t0 && x == t0 + c - 1 {
                        Some(acc)
                    } else {
                        let slot = usize::from(xb / c != tile);
                        assert!(slots.insert((b, slot), acc).is_none(), "slot reused");
                        let prev = counters[tile];
                        counters[tile] += 1;
                        let (b0, b1) = (block_of(t0, t, blocks), block_of(t0 + c - 1, t, blocks));
                        (prev == b1 - b0).then(|| {
                            counters[tile] = 0;
                            (b0..=b1)
                                .map(|bb| {
                                    let sb = usize::from(start(bb, t, blocks) / c != tile);
                                    if bb == b {
                                        acc
                                    } else {
                                        slots[&(bb, sb)]
                                    }
                                })
                                .sum()
                        })
                    };
                    if let Some(v) = result {
                        assert!(stored[tile].is_none(), "tile {tile} stored twice");
                        stored[tile] = Some(v);
                    }
                }
                for (tile, got) in stored.iter().enumerate() {
                    let want: u64 = (tile * c..(tile + 1) * c).map(val).sum();
                    assert_eq!(
                        *got,
                        Some(want),
                        "tile {tile} of {tiles}×{c}, {blocks} blocks"
                    );
                }
                assert!(counters.iter().all(|&k| k == 0), "counters not reset");
            }
        }
    }

    /// A host emulation of one block's data path in `gemm_stream.cu`, written from the kernel's
    /// index expressions: TMA boxes (64 K × rows, 128-byte swizzle: chunk c of row r at
    /// `r·128 + ((c ^ (r & 7)) << 4)`, zeros past the matrix), the consumers' reads (sub-step s,
    /// lane (g, t): chunk `2t + (s & 1)` of box `s / 2`, rows g and g + 8), the m16n8k16
    /// fragment semantics, and the epilogue's (token, row) mapping. Checked against a plain
    /// product on integer data (exact in f32), with a partial tile in N and M and a K tail; and
    /// every quarter-warp's 8 reads must hit 8 distinct 16-byte bank groups.
    #[test]
    #[allow(clippy::needless_range_loop)] // the emulation mirrors the kernel's index expressions
    fn the_kernel_data_path_computes_the_product_and_reads_without_bank_conflicts() {
        let (m, n, k) = (29usize, 100usize, 776usize);
        let groups = m.div_ceil(8);
        let val = |seed: usize, i: usize| ((i * 2_654_435_761 + seed * 97) % 7) as f32 - 3.0;
        let a: Vec<f32> = (0..m * k).map(|i| val(1, i)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| val(2, i)).collect();
        // One 64-K box of `rows` rows starting at (x, y) of a `total_rows × k` matrix, as 64-element
        // rows of 8 swizzled chunks (element index = byte offset / 2).
        let tma_box = |src: &[f32], total_rows: usize, rows: usize, x: usize, y: usize| {
            let mut smem = vec![f32::NAN; rows * 64];
            for r in 0..rows {
                for c in 0..8 {
                    let phys = (r * 128 + ((c ^ (r & 7)) << 4)) / 2;
                    for e in 0..8 {
                        let (row, col) = (y + r, x + 8 * c + e);
                        smem[phys + e] = if row < total_rows && col < k {
                            src[row * k + col]
                        } else {
                            0.0
                        };
                    }
                }
            }
            smem
        };
        let read = |smem: &[f32], r: usize, c: usize| -> [f32; 8] {
            let phys = (r * 128 + ((c ^ (r & 7)) << 4)) / 2;
            smem[phys..phys + 8].try_into().unwrap()
        };
        let mut c_out = vec![f32::NAN; m * n];
        let tiles = n.div_ceil(STREAM_ROWS);
        for tile in 0..tiles {
            // acc[warp][r][j][lane][q]
            let mut acc = vec![[[[[0f32; 4]; 32]; 4]; STREAM_RT]; STREAM_CONSUMERS];
            for kc in 0..k.div_ceil(STREAM_KS) {
                let k0 = kc * STREAM_KS;
                let wbox: Vec<Vec<f32>> = (0..2)
                    .map(|kb| tma_box(&w, n, STREAM_ROWS, k0 + 64 * kb, tile * STREAM_ROWS))
                    .collect();
                let abox: Vec<Vec<f32>> = (0..2)
                    .map(|kb| tma_box(&a, m, 8 * groups, k0 + 64 * kb, 0))
                    .collect();
                for (warp, acc_w) in acc.iter_mut().enumerate() {
                    let wrow = warp * 16 * STREAM_RT;
                    for sub in 0..STREAM_KS / 32 {
                        let (kb, par) = (sub >> 1, sub & 1);
                        // Bank groups of each quarter-warp's W reads (rows g and g + 1 share one).
                        for quarter in 0..4 {
                            let mut banks: Vec<usize> = (8 * quarter..8 * quarter + 8)
                                .map(|lane| {
                                    let (g, t) = (lane >> 2, lane & 3);
                                    let row = wrow + g;
                                    ((row * 128 + (((2 * t + par) ^ (row & 7)) << 4)) % 128) / 16
                                })
                                .collect();
                            banks.sort_unstable();
                            banks.dedup();
                            assert_eq!(banks.len(), 8, "bank conflict, warp {warp} sub {sub}");
                        }
                        for r in 0..STREAM_RT {
                            for j in 0..groups {
                                // Each of the two mma ops gathers its operands from the
                                // lanes' registers: lane (g, t) gives values 4·mma..4·mma + 4 of
                                // its 16-byte reads (regs x, y then z, w) to k-slots 2t, 2t+1,
                                // 2t+8, 2t+9 of rows g, g + 8 (weights) and of column g (token).
                                let mut am = [[0f32; 16]; 16]; // [row][slot]
                                let mut bm = [[0f32; 8]; 16]; // [slot][col]
                                for mma in 0..2 {
                                    for lane in 0..32 {
                                        let (g, t) = (lane >> 2, lane & 3);
                                        let c = 2 * t + par;
                                        let row = wrow + 16 * r + g;
                                        let wa = read(&wbox[kb], row, c);
                                        let wb = read(&wbox[kb], row + 8, c);
                                        let av = read(&abox[kb], 8 * j + g, c);
                                        let slots = [2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9];
                                        for (e, &slot) in slots.iter().enumerate() {
                                            let v = 4 * mma + e;
                                            am[g][slot] = wa[v];
                                            am[g + 8][slot] = wb[v];
                                            bm[slot][g] = av[v];
                                        }
                                    }
                                    for lane in 0..32 {
                                        let (g, t) = (lane >> 2, lane & 3);
                                        for q in 0..4 {
                                            let (i, col) =
                                                (g + if q < 2 { 0 } else { 8 }, 2 * t + (q & 1));
                                            let dot: f32 =
                                                (0..16).map(|sl| am[i][sl] * bm[sl][col]).sum();
                                            acc_w[r][j][lane][q] += dot;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // Epilogue: element q of tile r, group j → token 8j + 2t + (q & 1), weight row
            // tile·128 + wrow + 16r + g (+ 8 for q ≥ 2), masked to m × n.
            for (warp, acc_w) in acc.iter().enumerate() {
                let rbase = tile * STREAM_ROWS + warp * 16 * STREAM_RT;
                for r in 0..STREAM_RT {
                    for j in 0..groups {
                        for lane in 0..32 {
                            let (g, t) = (lane >> 2, lane & 3);
                            for q in 0..4 {
                                let tok = 8 * j + 2 * t + (q & 1);
                                let row = rbase + 16 * r + g + if q < 2 { 0 } else { 8 };
                                if tok < m && row < n {
                                    c_out[tok * n + row] = acc_w[r][j][lane][q];
                                }
                            }
                        }
                    }
                }
            }
        }
        for tok in 0..m {
            for row in 0..n {
                let want: f32 = (0..k).map(|i| a[tok * k + i] * w[row * k + i]).sum();
                assert_eq!(c_out[tok * n + row], want, "C[{tok}, {row}]");
            }
        }
    }

    #[test]
    fn plans_for_the_llada_shapes() {
        let p = StreamPlan::new(32, 12288, 4096, 132).unwrap();
        assert_eq!(
            (p.groups, p.tiles, p.chunks_per_tile, p.blocks),
            (4, 96, 32, 132)
        );
        let p = StreamPlan::new(1, 4096, 12288, 132).unwrap();
        assert_eq!((p.groups, p.tiles, p.chunks_per_tile), (1, 32, 96));
        let p = StreamPlan::new(29, 392, 776, 132).unwrap();
        // 4 tiles (the last of 8 rows) × 7 chunks (the last of 8 K values) = 28 pairs.
        assert_eq!(
            (p.groups, p.tiles, p.chunks_per_tile, p.blocks),
            (4, 4, 7, 28)
        );
        // One chunk per block: every boundary not on a tile edge (i % 7 != 0) cuts a tile.
        assert_eq!(p.inner_boundaries(), 24);
        // Four blocks of exactly one tile each: nothing is cut.
        assert_eq!(
            StreamPlan::with_blocks(29, 392, 776, 4)
                .unwrap()
                .inner_boundaries(),
            0
        );
        let p = StreamPlan::with_blocks(29, 392, 776, 5).unwrap();
        assert_eq!((p.blocks, p.inner_boundaries()), (5, 4));
        assert!(StreamPlan::new(33, 8, 8, 132).is_err());
        assert!(StreamPlan::new(0, 8, 8, 132).is_err());
    }

    #[test]
    fn shared_memory_fits_hopper() {
        // 227 KB of opt-in shared memory per block on sm_90, minus the static barriers.
        for g in 1..=4 {
            assert!(
                smem_bytes(g, DEFAULT_STAGES) <= 232_448 - 1024,
                "groups {g}: {}",
                smem_bytes(g, DEFAULT_STAGES)
            );
        }
        assert_eq!(smem_bytes(4, 5), 5 * (32_768 + 8_192) + 1024);
        assert_eq!(smem_bytes(1, 5), 5 * (32_768 + 2_048) + 1024);
        // A 2-stage ring at M = 32 leaves room for a second block on the SM (the next GEMM's,
        // launched early by PDL), a 3-stage one does not.
        assert!(2 * (smem_bytes(4, 2) + 1024) <= 228 * 1024);
        assert!(2 * (smem_bytes(4, 3) + 1024) > 228 * 1024);
    }

    #[test]
    fn default_ring_depth_mirrors_the_kernel_source() {
        let src = include_str!("../../../cuda/gemm_stream.cu");
        let line = format!("#define STREAM_STAGES {DEFAULT_STAGES}");
        assert!(
            src.lines().any(|l| l.trim() == line),
            "{line} not in gemm_stream.cu"
        );
        assert!(src.contains(&format!("DLLM_MODULE_INT({STAGES_SYMBOL}, STREAM_STAGES)")));
    }

    #[test]
    fn ring_depth_from_the_module_is_range_checked() {
        assert_eq!(stages_checked(5).unwrap(), 5);
        assert_eq!(stages_checked(2).unwrap(), 2);
        for bad in [-1, 0, 1, 9] {
            let e = stages_checked(bad).unwrap_err().to_string();
            assert!(
                e.contains(STAGES_SYMBOL) && e.contains(&bad.to_string()),
                "{e}"
            );
        }
    }
}
