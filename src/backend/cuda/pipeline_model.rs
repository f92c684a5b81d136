//! A host model of the mbarrier pipelines of `cuda/gemm_stream.cu` (one block: a producer and 4
//! consumer warps on a ring of full/empty barriers) and `cuda/gemm_tma.cu` (a cluster of two
//! blocks: each producer's weight half is multicast into both blocks, so a slot is refilled only
//! after the consumers of both blocks released it), written from the kernels' phase/parity
//! arithmetic. Random interleavings of every actor and every in-flight copy check that the
//! protocol never deadlocks, that a consumer only reads a slot holding all the bytes of its own
//! step, and that no copy overwrites a slot a consumer of either block still needs.
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

/// What a slot of one block holds: the step whose bytes landed in each part (A, W half 0, W
/// half 1), and how many of its consumers (this block's and the peer's) still read it.
#[derive(Debug, Clone, Default)]
struct Slot {
    parts: [Option<usize>; 3],
    readers: usize,
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
    /// 1: gemm_stream; 2: gemm_tma's cluster (A local, W half `rank` multicast to both).
    blocks: usize,
    /// Arriving consumer groups per block (warps or warpgroups).
    consumers: usize,
    stages: usize,
    release: Release,
    /// Consumers release the slot in every block of the cluster (the kernels), or only in their
    /// own (a deliberate bug, to show the model catches it).
    peer_release: bool,
}

/// One random interleaving of `p` over `k_tiles` steps; panics on a deadlock, a read of a slot
/// without all the bytes of its step, or a copy landing in a slot still being read. Returns the
/// number of events run.
fn simulate(p: Protocol, k_tiles: usize, seed: u64) -> usize {
    const BYTES: [i64; 3] = [100, 30, 30];
    let Protocol {
        blocks,
        consumers,
        stages,
        release,
        peer_release,
    } = p;
    let releasers = if peer_release { blocks } else { 1 };
    let empty_count = (releasers * consumers) as u32;
    let mut full: Vec<Vec<Barrier>> = vec![vec![Barrier::new(1); stages]; blocks];
    let mut empty: Vec<Vec<Barrier>> = vec![vec![Barrier::new(empty_count); stages]; blocks];
    let mut slots: Vec<Vec<Slot>> = vec![vec![Slot::default(); stages]; blocks];
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
                if peer_release || dst == b {
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
                full[b][s].arrive(BYTES.iter().sum());
                if blocks == 1 {
                    for part in 0..3 {
                        flight.push((b, s, part, kt));
                    }
                } else {
                    flight.push((b, s, 0, kt));
                    for dst in 0..blocks {
                        flight.push((dst, s, 1 + b, kt));
                    }
                }
                producer[b] += 1;
            }
            1 => {
                let (next, reading) = consumer[b][w];
                let s = next % stages;
                let slot = &mut slots[b][s];
                assert_eq!(
                    slot.parts,
                    [Some(next); 3],
                    "block {b} consumer {w} reads slot {s} for step {next}"
                );
                slot.readers += 1;
                if let Some(prev) = reading {
                    // AfterNextIssue: the wait for all but the newest group ends prev's read.
                    give_back(&mut slots, &mut empty, b, prev, false);
                }
                consumer[b][w] = (next + 1, Some(next));
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
                let slot = &mut slots[dst][s];
                assert_eq!(
                    slot.readers, 0,
                    "step {kt} lands in slot {s} of block {dst} while it is being read"
                );
                if let Some(prev) = slot.parts[part] {
                    assert_eq!(
                        prev + stages,
                        kt,
                        "slot {s} part {part}: step {prev} then {kt}"
                    );
                }
                slot.parts[part] = Some(kt);
                full[dst][s].complete_tx(BYTES[part]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: Protocol = Protocol {
        blocks: 1,
        consumers: 4,
        stages: 5,
        release: Release::AfterRead,
        peer_release: true,
    };
    const CLUSTER: Protocol = Protocol {
        blocks: 2,
        consumers: 3,
        stages: 4,
        release: Release::AfterNextIssue,
        peer_release: true,
    };

    #[test]
    fn the_stream_ring_never_deadlocks_or_overwrites() {
        for stages in [2, 4, 5] {
            for k_tiles in [1, 2, 3, 5, 9, 24] {
                for seed in 0..40u64 {
                    let p = Protocol { stages, ..STREAM };
                    let events = simulate(p, k_tiles, seed * 7919 + 17);
                    // Per step: 1 issue, 3 copies, 4 reads and 4 releases.
                    assert_eq!(events, k_tiles * 12);
                }
            }
        }
    }

    #[test]
    fn the_cluster_pipeline_never_deadlocks_or_overwrites() {
        for consumers in [2, 3] {
            for stages in [4, 5] {
                for k_tiles in [1, 2, 4, 5, 6, 13, 30] {
                    for seed in 0..40u64 {
                        let p = Protocol {
                            consumers,
                            stages,
                            ..CLUSTER
                        };
                        simulate(p, k_tiles, seed * 104_729 + 3);
                    }
                }
            }
        }
    }

    /// The model catches a protocol bug: if each block's consumers released only their own
    /// block's slots (and its empty barriers counted only them), a producer could multicast a
    /// refill into a slot the peer block is still reading.
    #[test]
    #[should_panic(expected = "while it is being read")]
    fn a_cluster_without_peer_releases_is_caught() {
        let broken = Protocol {
            peer_release: false,
            stages: 2,
            ..CLUSTER
        };
        for seed in 0..500u64 {
            simulate(broken, 12, seed * 31 + 7);
        }
    }
}
