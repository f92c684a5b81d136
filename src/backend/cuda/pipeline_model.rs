//! A host model of the mbarrier pipelines of `cuda/gemm_stream.cu` (one block: a producer and 4
//! consumer warps on a ring of full/empty barriers) and `cuda/gemm_tma.cu` (a cluster of 2 × CN
//! blocks: each producer's weight part is multicast into the blocks of its N tile and, with
//! CN = 2, its A part into the blocks of its M tile, so a slot is refilled only after the
//! consumers of every block the refill writes released it), written from the kernels'
//! phase/parity arithmetic. Random interleavings of every actor and every in-flight copy check that the
//! protocol never deadlocks, that a consumer only reads a slot holding all the bytes of its own
//! step, and that no copy overwrites a slot a consumer of either block still needs. A third model
//! covers the fused MLP's two jobs, the layer tail's three and the layer chain's four through one
//! stream ring, with a grid-wide gate before each later job.
//! Test-only: the kernels themselves are checked on the GPU by the load-time self-test.

/// An mbarrier: `count` arrivals plus a transaction byte count complete a phase.
#[derive(Debug, Clone)]
struct Barrier {
    count: u32,
    pending: u32,
    tx: i64,
    phase: u32,
}

impl Barrier {
    fn new(count: u32) -> Self {
        Barrier {
            count,
            pending: count,
            tx: 0,
            phase: 0,
        }
    }
    fn maybe_complete(&mut self) {
        if self.pending == 0 && self.tx == 0 {
            self.phase += 1;
            self.pending = self.count;
        }
    }
    /// `mbarrier.arrive.expect_tx` (bytes 0: a plain arrive).
    fn arrive(&mut self, bytes: i64) {
        assert!(
            self.pending > 0,
            "arrival on a phase with no pending arrivals"
        );
        self.tx += bytes;
        self.pending -= 1;
        self.maybe_complete();
    }
    /// `complete_tx` of a copy landing.
    fn complete_tx(&mut self, bytes: i64) {
        self.tx -= bytes;
        self.maybe_complete();
    }
    /// `mbarrier.try_wait.parity`: the phase with this parity has completed.
    fn passed(&self, parity: u32) -> bool {
        self.phase & 1 != parity
    }
}

/// What a slot of one block holds: the step whose bytes landed in each part (the A parts, then
/// the W parts), and how many of its consumers still read it.
#[derive(Debug, Clone, Default)]
struct Slot {
    parts: Vec<Option<usize>>,
    readers: usize,
}

/// Consumer `w` of block `b` starts reading `slot` for `step`: every part must hold that step.
fn begin_read(slot: &mut Slot, b: usize, w: usize, step: usize) {
    assert!(
        slot.parts.iter().all(|&q| q == Some(step)),
        "block {b} consumer {w} reads a slot for step {step}: {:?}",
        slot.parts
    );
    slot.readers += 1;
}

/// Part `part` of `step` lands in `slot` (slot `s` of block `dst`): nobody may be reading the
/// slot, and the part must have held the step one ring turn earlier, if any.
fn land(slot: &mut Slot, stages: usize, (dst, s, part): (usize, usize, usize), step: usize) {
    assert_eq!(
        slot.readers, 0,
        "step {step} lands in slot {s} of block {dst} while it is being read"
    );
    if let Some(prev) = slot.parts[part] {
        assert_eq!(
            prev + stages,
            step,
            "slot {s} part {part}: step {prev} then {step}"
        );
    }
    slot.parts[part] = Some(step);
}

/// A deterministic xorshift for the interleavings.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// How a kernel's consumer group gives a slot back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// gemm_stream: read the slot (ld.shared, synchronous), then arrive on its `empty` barrier.
    AfterRead,
    /// gemm_tma: issue the wgmma of step kt, wait until at most that group is in flight, then
    /// release step kt − 1; the last step is never released (nothing waits for it).
    AfterNextIssue,
}

/// The protocol variant one simulation runs.
#[derive(Debug, Clone, Copy)]
struct Protocol {
    /// The cluster: `cm` blocks along M (sharing the W tile: block (x, y) loads W part x into
    /// the `cm` blocks (·, y)) × `cn` along N (sharing the A tile: A part y into the `cn` blocks
    /// (x, ·)). (1, 1): gemm_stream; (2, 1): gemm_tma's pairs; (2, 2): its quads.
    cm: usize,
    cn: usize,
    /// Arriving consumer groups per block (warps or warpgroups).
    consumers: usize,
    stages: usize,
    release: Release,
    /// Which blocks' `empty` barriers a consumer arrives on.
    releases: Releases,
}

/// The blocks a consumer releases a slot in (and each `empty` barrier counts arrivals from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Releases {
    /// Every block whose producer writes into the consumer's block (the same N tile or the
    /// same M tile): what the kernels do.
    Writers,
    /// Only its own block: a deliberate bug, to show the model catches it.
    Own,
    /// The blocks of its N tile only (the pairs' rule): a bug for quads, whose A parts also
    /// come from the N peer.
    SameNTile,
}

impl Protocol {
    fn blocks(&self) -> usize {
        self.cm * self.cn
    }
    /// Block `b`'s (x, y) in the cluster (x fastest, as `%cluster_ctarank`).
    fn pos(&self, b: usize) -> (usize, usize) {
        (b % self.cm, b / self.cm)
    }
    /// Whether block `src`'s producer writes into block `dst`: the same N tile (W) or the same
    /// M tile (A).
    fn writes_into(&self, src: usize, dst: usize) -> bool {
        let ((sx, sy), (dx, dy)) = (self.pos(src), self.pos(dst));
        sx == dx || sy == dy
    }
}

/// One random interleaving of `p` over `k_tiles` steps; panics on a deadlock, a read of a slot
/// without all the bytes of its step, or a copy landing in a slot still being read. Returns the
/// number of events run.
fn simulate(p: Protocol, k_tiles: usize, seed: u64) -> usize {
    let Protocol {
        cm,
        cn,
        consumers,
        stages,
        release,
        releases,
    } = p;
    let blocks = p.blocks();
    // Part bytes: the A tile (120) in cn parts, then the W tile (60) in cm parts.
    let parts = cn + cm;
    let bytes = |part: usize| -> i64 {
        if part < cn {
            120 / cn as i64
        } else {
            60 / cm as i64
        }
    };
    let stage_bytes: i64 = (0..parts).map(bytes).sum();
    // Arrivals on a block's empty barrier: the consumers of every block it writes into (its
    // own included), or only its own.
    let releasers = match releases {
        Releases::Writers => cm + cn - 1,
        Releases::Own => 1,
        Releases::SameNTile => cm,
    };
    let empty_count = (releasers * consumers) as u32;
    let mut full: Vec<Vec<Barrier>> = vec![vec![Barrier::new(1); stages]; blocks];
    let mut empty: Vec<Vec<Barrier>> = vec![vec![Barrier::new(empty_count); stages]; blocks];
    let empty_slot = Slot {
        parts: vec![None; parts],
        readers: 0,
    };
    let mut slots: Vec<Vec<Slot>> = vec![vec![empty_slot; stages]; blocks];
    // Producer: next step. Consumer: (next step to read, step whose read is in progress).
    let mut producer = vec![0usize; blocks];
    let mut consumer = vec![vec![(0usize, None::<usize>); consumers]; blocks];
    // Copies in flight: (destination block, slot, part, step).
    let mut flight: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut rng = Rng(seed | 1);
    let mut events = 0;
    // Gives step `step`'s slot of block `b` back: one reader fewer, and (unless `quiet`) an
    // arrival on the slot's `empty` barrier of every block a refill writes.
    let give_back = |slots: &mut Vec<Vec<Slot>>,
                     empty: &mut Vec<Vec<Barrier>>,
                     b: usize,
                     step: usize,
                     quiet: bool| {
        let s = step % stages;
        slots[b][s].readers -= 1;
        if !quiet {
            for (dst, barriers) in empty.iter_mut().enumerate() {
                let arrive = match releases {
                    Releases::Writers => p.writes_into(dst, b),
                    Releases::Own => dst == b,
                    Releases::SameNTile => p.pos(dst).1 == p.pos(b).1,
                };
                if arrive {
                    barriers[s].arrive(0);
                }
            }
        }
    };
    loop {
        // Moves: 0 = a producer issues a step, 1 = a consumer reads its next step, 2 = a
        // consumer finishes its read in progress, 3 = a copy lands.
        let mut moves: Vec<(u8, usize, usize)> = Vec::new();
        for b in 0..blocks {
            let kt = producer[b];
            if kt < k_tiles {
                let (s, use_) = (kt % stages, kt / stages);
                if use_ == 0 || empty[b][s].passed(((use_ - 1) & 1) as u32) {
                    moves.push((0, b, 0));
                }
            }
            for (w, &(next, reading)) in consumer[b].iter().enumerate() {
                let may_read = match release {
                    Release::AfterRead => reading.is_none(),
                    Release::AfterNextIssue => true,
                };
                if may_read && next < k_tiles {
                    let (s, use_) = (next % stages, next / stages);
                    if full[b][s].passed((use_ & 1) as u32) {
                        moves.push((1, b, w));
                    }
                }
                let may_finish = match release {
                    Release::AfterRead => reading.is_some(),
                    Release::AfterNextIssue => reading.is_some() && next == k_tiles,
                };
                if may_finish {
                    moves.push((2, b, w));
                }
            }
        }
        for i in 0..flight.len() {
            moves.push((3, i, 0));
        }
        if moves.is_empty() {
            let finished = producer.iter().all(|&q| q == k_tiles)
                && consumer
                    .iter()
                    .flatten()
                    .all(|&(n, r)| n == k_tiles && r.is_none());
            assert!(
                finished,
                "deadlock: producers {producer:?}, consumers {consumer:?}"
            );
            assert!(flight.is_empty());
            return events;
        }
        events += 1;
        let (kind, b, w) = moves[rng.below(moves.len())];
        match kind {
            0 => {
                let kt = producer[b];
                let s = kt % stages;
                full[b][s].arrive(stage_bytes);
                // A part y into the blocks of this M tile, W part x into those of this N tile.
                let (x, y) = p.pos(b);
                for dst in 0..blocks {
                    let (dx, dy) = p.pos(dst);
                    if dx == x {
                        flight.push((dst, s, y, kt));
                    }
                    if dy == y {
                        flight.push((dst, s, cn + x, kt));
                    }
                }
                producer[b] += 1;
            }
            1 => {
                let (next, reading) = consumer[b][w];
                begin_read(&mut slots[b][next % stages], b, w, next);
                if let Some(prev) = reading {
                    // AfterNextIssue: the wait for all but the newest group ends prev's read.
                    give_back(&mut slots, &mut empty, b, prev, false);
                }
                consumer[b][w] = (next + 1, Some(next));
                // The staged epilogue (wgmma_common.cuh) reuses the ring as soon as every
                // consumer of the block has passed its last `full` wait: no copy may still be
                // on its way into the block then.
                if consumer[b].iter().all(|&(n, _)| n == k_tiles) {
                    assert!(
                        !flight.iter().any(|f| f.0 == b),
                        "block {b}: a copy still lands after its consumers' last wait"
                    );
                }
            }
            2 => {
                let (next, Some(step)) = consumer[b][w] else {
                    unreachable!("move 2 needs a read in progress")
                };
                // AfterRead: the release of the slot just read. AfterNextIssue: the final
                // wait of the last step, which releases nothing.
                let quiet = release == Release::AfterNextIssue;
                give_back(&mut slots, &mut empty, b, step, quiet);
                consumer[b][w] = (next, None);
            }
            _ => {
                let (dst, s, part, kt) = flight.swap_remove(b);
                land(&mut slots[dst][s], stages, (dst, s, part), kt);
                full[dst][s].complete_tx(bytes(part));
            }
        }
    }
}

/// The fused MLP's jobs through one stream ring (`gemm_stream_mlp_mg*`: gate/up then down;
/// `gemm_stream_tail_mg*`: the attention-output projection first; `gemm_mlp.rs`): block `b`
/// streams `jobs[j][b]` chunks of job `j`, one job after the other, the ring position carried
/// over (step numbers continue). For each job the producer waits on the `empty` barrier of each
/// step's slot with the kernel's parity (`(t / stages) & 1 ^ 1`, which a fresh barrier passes),
/// issues the weight part of the job's first `min(n, stages)` steps, passes the job's gate, then
/// issues their activation parts, then the remaining steps whole. Job `j`'s gate opens once every
/// block's consumers have finished jobs `0..j` (`missing_gate` Some(j): job j has no gate, a
/// deliberate bug). Panics
/// on a deadlock, on a consumer reading a slot without both parts of its step, on a copy landing
/// in a slot being read, and on a later job's activation copy (the job before's output) issued
/// before every block finished the job before. Returns the events run.
fn simulate_jobs(
    stages: usize,
    jobs: &[&[usize]],
    missing_gate: Option<usize>,
    seed: u64,
) -> usize {
    const CONSUMERS: usize = 4;
    const A_BYTES: i64 = 120;
    const W_BYTES: i64 = 60;
    let blocks = jobs[0].len();
    // First step of each job per block, and every block's total.
    let starts: Vec<Vec<usize>> = (0..blocks)
        .map(|b| {
            jobs.iter()
                .scan(0, |t, n| {
                    let t0 = *t;
                    *t += n[b];
                    Some(t0)
                })
                .collect()
        })
        .collect();
    let total: Vec<usize> = (0..blocks)
        .map(|b| jobs.iter().map(|n| n[b]).sum())
        .collect();
    let mut full = vec![vec![Barrier::new(1); stages]; blocks];
    let mut empty = vec![vec![Barrier::new(CONSUMERS as u32); stages]; blocks];
    let mut slots = vec![
        vec![
            Slot {
                parts: vec![None; 2],
                readers: 0,
            };
            stages
        ];
        blocks
    ];
    // The producer's program per block: (step, part) issues, part 0 = A, 1 = W, 2 = both, and
    // u8::MAX = the gate of job `step`.
    let program: Vec<Vec<(usize, u8)>> = (0..blocks)
        .map(|b| {
            let mut prog = Vec::new();
            for (j, n) in jobs.iter().enumerate() {
                let (t0, n) = (starts[b][j], n[b]);
                let pre = n.min(stages);
                prog.extend((t0..t0 + pre).map(|t| (t, 1u8)));
                if j > 0 && missing_gate != Some(j) {
                    prog.push((j, u8::MAX));
                }
                prog.extend((t0..t0 + pre).map(|t| (t, 0u8)));
                prog.extend((t0 + pre..t0 + n).map(|t| (t, 2u8)));
            }
            prog
        })
        .collect();
    let mut pc = vec![0usize; blocks];
    // Consumer warps: (next step, reading).
    let mut consumer = vec![vec![(0usize, false); CONSUMERS]; blocks];
    let mut flight: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut rng = Rng(seed | 1);
    let mut events = 0;
    // Whether every block's consumers finished jobs 0..j.
    let done_before = |consumer: &Vec<Vec<(usize, bool)>>, j: usize| {
        (0..blocks).all(|b| {
            let end = starts[b][j];
            consumer[b].iter().all(|&(n, _)| n >= end)
        })
    };
    // The job step t of block b belongs to.
    let job_of = |b: usize, t: usize| starts[b].iter().rposition(|&t0| t0 <= t).unwrap_or(0);
    loop {
        let mut moves: Vec<(u8, usize, usize)> = Vec::new();
        for b in 0..blocks {
            if let Some(&(t, part)) = program[b].get(pc[b]) {
                let ready = if part == u8::MAX {
                    done_before(&consumer, t)
                } else if part == 0 {
                    true
                } else {
                    let parity = ((t / stages) & 1) as u32 ^ 1;
                    empty[b][t % stages].passed(parity)
                };
                if ready {
                    moves.push((0, b, 0));
                }
            }
            for (w, &(next, reading)) in consumer[b].iter().enumerate() {
                if reading {
                    moves.push((2, b, w));
                } else if next < total[b]
                    && full[b][next % stages].passed(((next / stages) & 1) as u32)
                {
                    moves.push((1, b, w));
                }
            }
        }
        for i in 0..flight.len() {
            moves.push((3, i, 0));
        }
        if moves.is_empty() {
            let finished = (0..blocks).all(|b| {
                pc[b] == program[b].len() && consumer[b].iter().all(|&(n, r)| n == total[b] && !r)
            });
            assert!(
                finished,
                "deadlock: producers at {pc:?}, consumers {consumer:?}"
            );
            return events;
        }
        events += 1;
        let (kind, b, w) = moves[rng.below(moves.len())];
        match kind {
            0 => {
                let (t, part) = program[b][pc[b]];
                pc[b] += 1;
                if part == u8::MAX {
                    continue;
                }
                let s = t % stages;
                if part != 0 {
                    full[b][s].arrive(A_BYTES + W_BYTES);
                    flight.push((b, s, 1, t));
                }
                if part != 1 {
                    let j = job_of(b, t);
                    assert!(
                        j == 0 || done_before(&consumer, j),
                        "block {b} requests step {t}'s activations (job {}'s output) before \
                         every block finished job {}",
                        j.saturating_sub(1),
                        j.saturating_sub(1)
                    );
                    flight.push((b, s, 0, t));
                }
            }
            1 => {
                let next = consumer[b][w].0;
                begin_read(&mut slots[b][next % stages], b, w, next);
                consumer[b][w] = (next, true);
            }
            2 => {
                let step = consumer[b][w].0;
                let s = step % stages;
                slots[b][s].readers -= 1;
                empty[b][s].arrive(0);
                consumer[b][w] = (step + 1, false);
            }
            _ => {
                let (dst, s, part, t) = flight.swap_remove(b);
                land(&mut slots[dst][s], stages, (dst, s, part), t);
                full[dst][s].complete_tx(if part == 0 { A_BYTES } else { W_BYTES });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: Protocol = Protocol {
        cm: 1,
        cn: 1,
        consumers: 4,
        stages: 5,
        release: Release::AfterRead,
        releases: Releases::Writers,
    };
    const CLUSTER: Protocol = Protocol {
        cm: 2,
        cn: 1,
        consumers: 3,
        stages: 4,
        release: Release::AfterNextIssue,
        releases: Releases::Writers,
    };

    #[test]
    fn the_stream_ring_never_deadlocks_or_overwrites() {
        for stages in [2, 4, 5] {
            for k_tiles in [1, 2, 3, 5, 9, 24] {
                for seed in 0..40u64 {
                    let p = Protocol { stages, ..STREAM };
                    let events = simulate(p, k_tiles, seed * 7919 + 17);
                    // Per step: 1 issue, 2 copies (A, W), 4 reads and 4 releases.
                    assert_eq!(events, k_tiles * 11);
                }
            }
        }
    }

    /// The pairs of `gemm_tma` (2 × 1 blocks sharing W) and the quads of `gemm_tma4` (2 × 2:
    /// W parts shared along M, A parts along N; every consumer warpgroup releases the slot in
    /// its own block, its M peer and its N peer, so the empty barriers count 3·WG arrivals).
    #[test]
    fn the_cluster_pipelines_never_deadlock_or_overwrite() {
        for cn in [1, 2] {
            for consumers in [2, 3] {
                for stages in [4, 5] {
                    for k_tiles in [1, 2, 4, 5, 6, 13, 30] {
                        for seed in 0..40u64 {
                            let p = Protocol {
                                cn,
                                consumers,
                                stages,
                                ..CLUSTER
                            };
                            let events = simulate(p, k_tiles, seed * 104_729 + 3);
                            // Per step and block: 1 issue, its A part landing in cn blocks and
                            // its W part in 2, a read per consumer (which releases the step
                            // before); at the end each consumer's final wait.
                            let blocks = 2 * cn;
                            assert_eq!(
                                events,
                                blocks * k_tiles * (1 + cn + 2 + consumers) + blocks * consumers
                            );
                        }
                    }
                }
            }
        }
    }

    /// Quads whose consumers released only their own block and their M peer (the pairs'
    /// rule) would let an N peer's A refill land in a slot still being read.
    #[test]
    #[should_panic(expected = "while it is being read")]
    fn a_quad_with_the_pairs_release_rule_is_caught() {
        let broken = Protocol {
            cn: 2,
            releases: Releases::SameNTile,
            stages: 2,
            ..CLUSTER
        };
        for seed in 0..500u64 {
            simulate(broken, 12, seed * 31 + 7);
        }
    }

    /// The model catches a protocol bug: if each block's consumers released only their own
    /// block's slots (and its empty barriers counted only them), a producer could multicast a
    /// refill into a slot the peer block is still reading.
    #[test]
    #[should_panic(expected = "while it is being read")]
    fn a_cluster_without_peer_releases_is_caught() {
        let broken = Protocol {
            releases: Releases::Own,
            stages: 2,
            ..CLUSTER
        };
        for seed in 0..500u64 {
            simulate(broken, 12, seed * 31 + 7);
        }
    }

    /// The fused MLP's two jobs and the layer tail's three through one ring, blocks with
    /// different chunk counts (fewer than, equal to and more than the ring's stages in each job;
    /// a block with no chunk of a job).
    #[test]
    fn the_fused_jobs_share_the_ring_without_deadlock_or_early_reads() {
        let cases: [&[&[usize]]; 8] = [
            &[&[1, 2], &[1, 3]],
            &[&[5, 4, 7], &[2, 9, 5]],
            &[&[12, 11], &[6, 6]],
            &[&[3, 3, 3, 3], &[8, 1, 2, 5]],
            &[&[2, 7, 1], &[5, 4, 7], &[2, 9, 5]],
            &[&[4, 0], &[1, 6], &[9, 3]],
            // The layer chain: the tail's three jobs, then the next QKV projection.
            &[&[2, 7, 1], &[5, 4, 7], &[2, 9, 5], &[3, 1, 6]],
            &[&[1, 1], &[6, 2], &[4, 4], &[1, 0]],
        ];
        for stages in [2, 3, 5] {
            for jobs in cases {
                for seed in 0..30u64 {
                    let events = simulate_jobs(stages, jobs, None, seed * 6151 + 5);
                    // Per step: the weight and activation issues (one when whole), 2 copies,
                    // 4 reads and 4 releases; per block and later job its gate.
                    let all = || jobs.iter().flat_map(|n| n.iter());
                    let steps: usize = all().sum();
                    let split: usize = all().map(|&n| n.min(stages)).sum();
                    let gates = jobs[0].len() * (jobs.len() - 1);
                    assert_eq!(events, steps * 11 + split + gates, "{jobs:?} {stages}");
                }
            }
        }
    }

    /// Without its grid gate a producer requests a job's input before every block has written
    /// it: the model catches that.
    #[test]
    #[should_panic(expected = "before every block finished job 0")]
    fn the_fused_mlp_without_its_grid_gate_is_caught() {
        for seed in 0..200u64 {
            simulate_jobs(3, &[&[6, 2], &[4, 4]], Some(1), seed * 131 + 1);
        }
    }

    /// The same for the layer tail's second gate (before its third job, down).
    #[test]
    #[should_panic(expected = "before every block finished job 1")]
    fn the_layer_tail_without_its_second_gate_is_caught() {
        for seed in 0..200u64 {
            simulate_jobs(3, &[&[2, 2], &[6, 2], &[4, 4]], Some(2), seed * 131 + 1);
        }
    }

    /// The same for the layer chain's third gate (before its fourth job, the next QKV).
    #[test]
    #[should_panic(expected = "before every block finished job 2")]
    fn the_layer_chain_without_its_third_gate_is_caught() {
        for seed in 0..200u64 {
            simulate_jobs(
                3,
                &[&[2, 2], &[3, 3], &[6, 2], &[4, 4]],
                Some(3),
                seed * 131 + 1,
            );
        }
    }
}
