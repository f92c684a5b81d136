// DLLM_SM90 — TMA loads and mbarrier waits (sm_90): no Ampere build of this file (build.rs).
// gemm_stream_mg<G> (G = 1..4, M <= 8 * G): the weight-streaming GEMM C[M, N] = A[M, K] · Wᵀ of
// the batch-1 block step (A bf16 [M, K], W bf16 [N, K] row-major, fp32 accumulation, epilogues
// as in gemm.cu), with the bytes moved by the Hopper bulk-copy engine instead of by the threads.
// Host side: src/backend/cuda/gemm_stream.rs; design notes: docs/gemm-notes.md ("stream").
//
// Why: the register-fed skinny kernels (gemm.cu) keep only the 16-byte loads that fit in their
// registers in flight, and every mma / activation load of a warp delays its next weight loads,
// so at M = 32 they stream at 54-63 % of the copy bandwidth. Here one thread of a producer warp
// issues TMA box loads (4 per stage: two 64-K boxes of the 128-row weight tile, two of the
// activations) into a STREAM_STAGES-deep shared-memory ring tracked by mbarriers (full:
// transaction bytes landed; empty: the 4 consumer warps are done with the slot), so the bytes in
// flight per SM are the ring (up to 4 stages x 32 KB of weights) whatever the consumers do.
//
// Work split ("stream-K"): the weight rows are cut into tiles of STREAM_ROWS = 128 rows and K into
// chunks of STREAM_KS = 128, giving T = tiles x C (tile, chunk) pairs in tile-major order. The grid
// is persistent (one block per SM, at most T blocks) and block b walks the contiguous range
// [b·T/B, (b+1)·T/B): every block streams the same number of bytes (±1 chunk), with no wave tail.
// A block's range covers whole tiles in its middle and at most two partial tiles at its ends. A
// whole tile is written by its block directly; a partial one is written to a workspace slot
// (per block: slot 0 = its first tile, slot 1 = its last), and the last of the tile's
// contributing blocks to arrive (per-tile, per-warp counter) sums every contribution in block
// order (so the result is the same bits whoever arrives last), applies the epilogue and resets
// the counter.
//
// Shared memory, per stage (1024-aligned): W boxes kb = 0, 1 (K [64 kb, 64 kb + 64) of the chunk)
// of 128 rows x 128 B, then A boxes kb = 0, 1 of 8·G rows x 128 B, all in the TMA 128-byte
// swizzle: 16-byte chunk c of box row r at r·128 + ((c ^ (r & 7)) << 4). Rows past N / M and K
// values past K arrive as zeros. Consumer warp w owns weight rows [32w, 32w + 32) as two 16-row
// mma tiles. At sub-step s (0..3, 32 K each) lane (g = lane / 4, t = lane % 4) reads logical
// chunk c = 2t + (s & 1) of box kb = s / 2 in rows g and g + 8 of each tile and in token row g of
// each group: the 8 K values of a 16-byte read are the lane's mma k-slots (the same assignment
// for weights and activations, which is all a dot product needs), and since rows g and g + 1 XOR
// different low bits into the even / odd chunk sets, the 8 lanes of a quarter-warp hit 8
// distinct 16-byte bank groups.
#include "gemm_common.cuh"
#include "mbarrier.cuh"
#include "sync.cuh"
#include "tma.cuh"

#define STREAM_CONSUMERS 4
#define STREAM_THREADS ((STREAM_CONSUMERS + 1) * 32)
#define STREAM_RT 2
#define STREAM_ROWS (STREAM_CONSUMERS * 16 * STREAM_RT)
#define STREAM_KS 128
#define STREAM_BOX_K 64
// Ring depth: a define (`-D STREAM_STAGES=N` in a DLLM_KERNEL_DIR build) the host reads back as
// dllm_stream_stages for the launch's shared memory (src/backend/cuda/gemm_stream.rs).
#ifndef STREAM_STAGES
#define STREAM_STAGES 5
#endif
static_assert(STREAM_STAGES >= 2 && STREAM_STAGES <= 8, "STREAM_STAGES must be 2..8");
DLLM_MODULE_INT(dllm_stream_stages, STREAM_STAGES);

template <int G>
struct StreamCfg {
    static constexpr int W_BOX_BYTES = STREAM_ROWS * 128;
    static constexpr int A_BOX_BYTES = 8 * G * 128;
    static constexpr int A_OFFSET = 2 * W_BOX_BYTES;
    static constexpr int STAGE_BYTES = 2 * W_BOX_BYTES + 2 * A_BOX_BYTES;
    // +1024: the ring is aligned up to 1024 bytes (the swizzle pattern's period) inside the
    // dynamic allocation.
    static constexpr int SMEM_BYTES = STREAM_STAGES * STAGE_BYTES + 1024;
};
static_assert(StreamCfg<4>::SMEM_BYTES <= 232448 - 1024, "stream ring exceeds shared memory");
static_assert(StreamCfg<1>::A_BOX_BYTES % 1024 == 0 && StreamCfg<1>::STAGE_BYTES % 1024 == 0,
              "boxes must stay 1024-byte aligned for the 128-byte swizzle");

template <int G>
__device__ __forceinline__ void stream_zero(float (&a)[STREAM_RT][G][4]) {
#pragma unroll
    for (int r = 0; r < STREAM_RT; ++r)
#pragma unroll
        for (int j = 0; j < G; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) a[r][j][q] = 0.0f;
}

// First chunk of block b's range, and the block whose range holds chunk x (B blocks, T chunks).
__device__ __forceinline__ long long stream_start(long long b, long long T, long long B) { return b * T / B; }
__device__ __forceinline__ int stream_block_of(long long x, long long T, long long B) {
    return (int)(((x + 1) * B - 1) / T);
}

// Byte offset of logical 16-byte chunk c of row r in a 128-byte-swizzled box.
__device__ __forceinline__ uint32_t stream_swz(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }

// The next (tile, chunk) of a block's range.
__device__ __forceinline__ void stream_next(int& tile, int& kc, int C_chunks) {
    if (++kc == C_chunks) {
        kc = 0;
        ++tile;
    }
}

// The two weight boxes of chunk (tile, kc) into the stage at `stage`, signalled on `full`.
template <int G>
__device__ __forceinline__ void stream_load_w(uint32_t stage, const CUtensorMap* map_w, int tile, int kc,
                                              uint32_t full, uint64_t policy) {
#pragma unroll
    for (int kb = 0; kb < 2; ++kb)
        tma_load_hint(stage + kb * StreamCfg<G>::W_BOX_BYTES, map_w, kc * STREAM_KS + kb * STREAM_BOX_K,
                      tile * STREAM_ROWS, full, policy);
}

// The two activation boxes of chunk kc into the stage at `stage`, signalled on `full`.
template <int G>
__device__ __forceinline__ void stream_load_a(uint32_t stage, const CUtensorMap* map_a, int kc, uint32_t full) {
#pragma unroll
    for (int kb = 0; kb < 2; ++kb)
        tma_load(stage + StreamCfg<G>::A_OFFSET + kb * StreamCfg<G>::A_BOX_BYTES, map_a,
                 kc * STREAM_KS + kb * STREAM_BOX_K, 0, full);
}

// One GEMM of a launch: C = A · Wᵀ, epilogue `epi`, with its reduction workspace and counters.
struct StreamJob {
    const CUtensorMap* map_a;
    const CUtensorMap* map_w;
    void* C;
    float* ws;
    unsigned int* counters;
    int M, N, K, epi;
    const DllmEpiParams* ep;  // the RoPE epilogue's and the norm fold's parameters (nullable)
};

// This block's contiguous share of a job's (tile, chunk) pairs.
struct StreamRange {
    int C_chunks;    // chunks per tile
    long long T, B;  // pairs in all, blocks
    int n_chunks;    // pairs of this block (< 2^31: T / B, B >= 1)
    int tile_begin, kc_begin;
};

__device__ __forceinline__ StreamRange stream_range(int N, int K) {
    StreamRange r;
    r.C_chunks = (K + STREAM_KS - 1) / STREAM_KS;
    const long long tiles = ((long long)N + STREAM_ROWS - 1) / STREAM_ROWS;
    r.T = tiles * r.C_chunks;
    r.B = gridDim.x;
    const long long x_begin = stream_start(blockIdx.x, r.T, r.B);
    r.n_chunks = (int)(stream_start((long long)blockIdx.x + 1, r.T, r.B) - x_begin);
    // Where the range starts: tile and chunk (one 64-bit division; the loops count from here).
    r.tile_begin = (int)(x_begin / r.C_chunks);
    r.kc_begin = (int)(x_begin - (long long)r.tile_begin * r.C_chunks);
    return r;
}

// A position in the ring (slot, parity of its current use), carried from one job to the next.
// Starting at (0, 0), the producer's first wait on each slot's empty barrier (parity 1, the phase
// before a fresh barrier's first) returns at once.
struct StreamPos {
    int s;
    uint32_t phase;
};
__device__ __forceinline__ void stream_advance(StreamPos& p) {
    if (++p.s == STREAM_STAGES) {
        p.s = 0;
        p.phase ^= 1u;
    }
}

// A consumer's wait for its producer to have passed the grid barrier before job `job` (the release
// in StreamGridGate). By the time a consumer asks, its job's first chunk has landed, which the
// producer requested after the barrier: the first acquire normally sees it.
__device__ __forceinline__ void stream_gate_wait(const uint32_t* gate_passed, uint32_t job) {
    while (dllm_ld_acquire_cta(gate_passed) < job) {
    }
}

// Producer thread: streams a job's chunks through the ring from `pos`. The weights of the first
// min(n_chunks, STREAM_STAGES) chunks are requested before `gate()` (constant data: they stream
// while the work the gate waits for finishes), their activations after it; each stage's full
// barrier completes when both have landed.
template <int G, class Gate>
__device__ __forceinline__ void stream_produce(const StreamJob& job, const StreamRange& r, uint32_t ring,
                                               uint64_t* full_bar, uint64_t* empty_bar, StreamPos& pos,
                                               uint64_t policy, Gate gate) {
    using Cfg = StreamCfg<G>;
    const int pre = r.n_chunks < STREAM_STAGES ? r.n_chunks : STREAM_STAGES;
    const StreamPos first = pos;
    int tile = r.tile_begin, kc = r.kc_begin;
    for (int i = 0; i < pre; ++i) {
        dllm_bar_wait(dllm_smem_addr(&empty_bar[pos.s]), pos.phase ^ 1u);
        const uint32_t full = dllm_smem_addr(&full_bar[pos.s]);
        dllm_bar_arrive_tx(full, Cfg::STAGE_BYTES);
        stream_load_w<G>(ring + (uint32_t)(pos.s * Cfg::STAGE_BYTES), job.map_w, tile, kc, full, policy);
        stream_next(tile, kc, r.C_chunks);
        stream_advance(pos);
    }
    gate();
    StreamPos p = first;
    tile = r.tile_begin;
    kc = r.kc_begin;
    for (int i = 0; i < pre; ++i) {
        stream_load_a<G>(ring + (uint32_t)(p.s * Cfg::STAGE_BYTES), job.map_a, kc, dllm_smem_addr(&full_bar[p.s]));
        stream_next(tile, kc, r.C_chunks);
        stream_advance(p);
    }
    // Steady state: each slot's next use waits for the consumers' release of its previous one.
    for (int i = pre; i < r.n_chunks; ++i) {
        dllm_bar_wait(dllm_smem_addr(&empty_bar[pos.s]), pos.phase ^ 1u);
        const uint32_t full = dllm_smem_addr(&full_bar[pos.s]);
        dllm_bar_arrive_tx(full, Cfg::STAGE_BYTES);
        const uint32_t stage = ring + (uint32_t)(pos.s * Cfg::STAGE_BYTES);
        stream_load_w<G>(stage, job.map_w, tile, kc, full, policy);
        stream_load_a<G>(stage, job.map_a, kc, full);
        stream_next(tile, kc, r.C_chunks);
        stream_advance(pos);
    }
}

// Consumer warp `warp` (0..STREAM_CONSUMERS-1): the job's chunks from the ring at `pos`, each
// finished tile segment stored, or handed to the tile's reducer (the last of its blocks to
// arrive, per warp: it sums the partials in block order, so the bits do not depend on who
// arrives last).
template <int G>
//
// `gate_passed` (a shared word, or nullptr for the first job of a launch): the job follows a grid
// barrier in the same launch, so what other blocks wrote in the jobs before it (the partial sums of
// its row scale, the residual its add epilogue reads) is read only once this block's producer has
// passed that barrier and said so with a release of `job_index` into the word (stream_gate_wait:
// the acquire makes those writes, which the producer's acquire of the barrier observed, visible
// here). A block with no chunk of the job reads and writes nothing of it.
__device__ __forceinline__ void stream_consume(const StreamJob& job, const StreamRange& r,
                                               const unsigned char* ring_ptr, uint64_t* full_bar,
                                               uint64_t* empty_bar, StreamPos& pos, int warp, int lane,
                                               const uint32_t* gate_passed, uint32_t job_index) {
    const bool gated = gate_passed != nullptr;
    using Cfg = StreamCfg<G>;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int wrow = warp * 16 * STREAM_RT;  // first weight row of this warp within the tile
    const int C_chunks = r.C_chunks;
    const long long T = r.T, B = r.B;
    float acc[STREAM_RT][G][4];
    stream_zero<G>(acc);
    // The norm fold's row scale of this lane's tokens 8 j + 2 t + b (the 8 lanes of a t share them).
    const bool row_scale = job.ep != nullptr && job.ep->norm.sq_in != nullptr;
    float rs[2 * G];  // token 8 j + 2 t + b at 2 j + b
    auto load_row_scales = [&]() {
        int rows[2 * G];
#pragma unroll
        for (int i = 0; i < 2 * G; ++i) rows[i] = 8 * (i >> 1) + 2 * t + (i & 1);
        gemm_norm_row_scales<2 * G, 8, 4>(job.ep->norm, rows, job.M, g, rs);
    };
    if (row_scale && !gated) load_row_scales();

    int tile = r.tile_begin, kc = r.kc_begin;
    bool seg_whole = r.kc_begin == 0;  // this segment of `tile` started at the tile's first chunk
    for (int i = 0; i < r.n_chunks; ++i) {
        dllm_bar_wait(dllm_smem_addr(&full_bar[pos.s]), pos.phase);
        if (gated && i == 0) {
            // Every generic read of what other blocks wrote earlier in the launch (the row scale's
            // sums, the residual-add epilogue's old values) comes after this acquire.
            stream_gate_wait(gate_passed, job_index);
            if (row_scale) load_row_scales();
        }
        const unsigned char* stage = ring_ptr + pos.s * Cfg::STAGE_BYTES;
#pragma unroll
        for (int sub = 0; sub < STREAM_KS / 32; ++sub) {
            const unsigned char* wbox = stage + (sub >> 1) * Cfg::W_BOX_BYTES;
            const unsigned char* abox = stage + Cfg::A_OFFSET + (sub >> 1) * Cfg::A_BOX_BYTES;
            const int c = 2 * t + (sub & 1);
            uint4 wa[STREAM_RT], wb[STREAM_RT];
#pragma unroll
            for (int rr = 0; rr < STREAM_RT; ++rr) {
                const int row = wrow + 16 * rr + g;
                wa[rr] = *(const uint4*)(wbox + stream_swz(row, c));
                wb[rr] = *(const uint4*)(wbox + stream_swz(row + 8, c));
            }
#pragma unroll
            for (int j = 0; j < G; ++j) {
                const uint4 av = *(const uint4*)(abox + stream_swz(8 * j + g, c));
#pragma unroll
                for (int rr = 0; rr < STREAM_RT; ++rr) {
                    gemm_mma_bf16(acc[rr][j], wa[rr].x, wb[rr].x, wa[rr].y, wb[rr].y, av.x, av.y);
                    gemm_mma_bf16(acc[rr][j], wa[rr].z, wb[rr].z, wa[rr].w, wb[rr].w, av.z, av.w);
                }
            }
        }
        __syncwarp();
        if (lane == 0) dllm_bar_arrive(dllm_smem_addr(&empty_bar[pos.s]));
        stream_advance(pos);

        const bool tile_end = kc == C_chunks - 1;
        if (!tile_end && i != r.n_chunks - 1) {
            ++kc;
            continue;
        }
        // End of this block's segment of `tile`: write it, or hand it to the tile's reducer.
        bool store = seg_whole && tile_end;
        if (!store) {
            float4* part = (float4*)job.ws;
            const int slot = (tile == r.tile_begin) ? 0 : 1;
            const size_t base = (((size_t)blockIdx.x * 2 + slot) * STREAM_CONSUMERS + warp) * (STREAM_RT * G);
#pragma unroll
            for (int rr = 0; rr < STREAM_RT; ++rr)
#pragma unroll
                for (int j = 0; j < G; ++j)
                    part[(base + rr * G + j) * 32 + lane] =
                        make_float4(acc[rr][j][0], acc[rr][j][1], acc[rr][j][2], acc[rr][j][3]);
            // Every lane's partial is visible device-wide before the counter moves; the lane
            // that moves it fences again, and __syncwarp orders that for the other lanes, before
            // anyone reads the other blocks' partials.
            __threadfence();
            __syncwarp();
            const long long t0 = (long long)tile * C_chunks;
            unsigned int* counter = &job.counters[(size_t)tile * STREAM_CONSUMERS + warp];
            unsigned int prev = 0;
            if (lane == 0) {
                prev = atomicAdd(counter, 1u);
                __threadfence();
            }
            __syncwarp();
            prev = __shfl_sync(0xffffffffu, prev, 0);
            const int b0 = stream_block_of(t0, T, B);
            const int b1 = stream_block_of(t0 + C_chunks - 1, T, B);
            if (prev == (unsigned int)(b1 - b0)) {
                float sum[STREAM_RT][G][4];
                stream_zero<G>(sum);
                for (int b = b0; b <= b1; ++b) {
                    const int sb = (stream_start(b, T, B) / C_chunks == tile) ? 0 : 1;
                    const size_t bb = (((size_t)b * 2 + sb) * STREAM_CONSUMERS + warp) * (STREAM_RT * G);
#pragma unroll
                    for (int rr = 0; rr < STREAM_RT; ++rr)
#pragma unroll
                        for (int j = 0; j < G; ++j) {
                            float4 v;
                            if (b == (int)blockIdx.x) {
                                v = make_float4(acc[rr][j][0], acc[rr][j][1], acc[rr][j][2], acc[rr][j][3]);
                            } else {
                                v = __ldcg(&part[(bb + rr * G + j) * 32 + lane]);
                            }
                            sum[rr][j][0] += v.x;
                            sum[rr][j][1] += v.y;
                            sum[rr][j][2] += v.z;
                            sum[rr][j][3] += v.w;
                        }
                }
#pragma unroll
                for (int rr = 0; rr < STREAM_RT; ++rr)
#pragma unroll
                    for (int j = 0; j < G; ++j)
#pragma unroll
                        for (int q = 0; q < 4; ++q) acc[rr][j][q] = sum[rr][j][q];
                if (lane == 0) *counter = 0u;
                store = true;
            }
        }
        if (store) {
            if (row_scale) {
#pragma unroll
                for (int rr = 0; rr < STREAM_RT; ++rr)
#pragma unroll
                    for (int j = 0; j < G; ++j)
#pragma unroll
                        for (int q = 0; q < 4; ++q) acc[rr][j][q] *= rs[2 * j + (q & 1)];
            }
            gemm_store_fragments<STREAM_RT, G>(acc, job.C, tile * STREAM_ROWS + wrow, g, t, job.M, job.N, job.epi,
                                               job.ep);
        }
        stream_zero<G>(acc);
        seg_whole = true;  // the next segment starts at a tile's first chunk
        kc = 0;
        ++tile;
    }
}

// The ring in dynamic shared memory (1024-aligned for the swizzle) and its barriers, initialised;
// then the PDL trigger (the next kernel may start launching).
struct StreamRing {
    uint32_t ring;
    unsigned char* ring_ptr;
};
__device__ __forceinline__ StreamRing stream_ring_init(unsigned char* raw_ptr, uint64_t* full_bar,
                                                       uint64_t* empty_bar) {
    const uint32_t raw = dllm_smem_addr(raw_ptr);
    StreamRing r;
    r.ring = (raw + 1023u) & ~1023u;
    r.ring_ptr = raw_ptr + (r.ring - raw);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STREAM_STAGES; ++s) {
            dllm_bar_init(dllm_smem_addr(&full_bar[s]), 1);
            dllm_bar_init(dllm_smem_addr(&empty_bar[s]), STREAM_CONSUMERS);
        }
        dllm_fence_mbarrier_init();
    }
    __syncthreads();
    // Programmatic dependent launch (a no-op without it): the next kernel may start launching
    // now. Weights are constant, so the producer requests the first ring's worth of them before
    // waiting for the previous kernel (they stream while it finishes); the activations it wrote,
    // the split scratch and C are touched only after the wait.
    dllm_pdl_trigger();
    return r;
}

struct StreamPdlGate {
    __device__ __forceinline__ void operator()() const { dllm_pdl_wait(); }
};

// Grid-wide barrier between two jobs of one launch (gemm_stream_mlp_mg<G>). It needs every block resident
// at once: the host caps the grid at the blocks the SMs hold together (the occupancy query at load; one
// per SM with the default ring), and with PDL the next kernel can start only once every block of this one
// has started. grid_bar[0] counts the blocks whose outputs of the job before are written,
// grid_bar[1] the producers that saw the count complete; the last of those resets both before the launch
// ends, so the next launch (which touches them only after its PDL wait, i.e. after this one completed)
// starts from zero.
//
// One arrival per block, by a consumer thread after all consumer warps stored their outputs: the CTA
// barrier orders their stores before this thread's fence, the fence before the count.
__device__ __forceinline__ void stream_grid_arrive(unsigned int* grid_bar) {
    __threadfence();
    atomicAdd(&grid_bar[0], 1u);
}

// The producer's gate for a later job: every block has arrived, then the job-before's outputs, written
// through the generic proxy, are made visible to this thread's TMA (async proxy) loads of them. A watchdog
// turns a hang (a block that never became resident) into a trap.
//
// After the barrier the producer releases `job` into the block's shared word `gate_passed`: the
// consumers acquire it (stream_gate_wait) before their own generic reads of what other blocks wrote
// in the job before (the partial sums of a row scale).
struct StreamGridGate {
    unsigned int* grid_bar;
    uint32_t* gate_passed;
    uint32_t job;
    __device__ __forceinline__ void operator()() const {
        uint32_t polls = 0;
        for (;;) {
            if (dllm_ld_acquire_gpu(grid_bar) >= gridDim.x) break;
            if (++polls == (1u << 26)) __trap();
            __nanosleep(64);
        }
        dllm_fence_proxy_async();
        dllm_st_release_cta(gate_passed, job);
        // Departure: the last producer through resets the barrier for the next launch.
        if (atomicAdd(&grid_bar[1], 1u) == gridDim.x - 1) {
            grid_bar[0] = 0u;
            grid_bar[1] = 0u;
            __threadfence();
        }
    }
};

// The body of a launch of JOBS stream GEMMs one after another through one ring: the first job's
// activations after the PDL wait, each later job's after the grid barrier that follows the job
// before it (grid_bar: two words per barrier; unused with one job).
template <int G, int JOBS>
__device__ __forceinline__ void stream_jobs_body(const StreamJob (&jobs)[JOBS], unsigned int* grid_bar) {
    DLLM_DYNAMIC_SHARED(unsigned char, stream_raw);
    DLLM_SHARED_ARRAY(uint64_t, full_bar, STREAM_STAGES, 8);
    DLLM_SHARED_ARRAY(uint64_t, empty_bar, STREAM_STAGES, 8);
    // The last grid barrier this block's producer passed (StreamGridGate, stream_gate_wait).
    DLLM_SHARED_ARRAY(uint32_t, gate_passed, 1, 4);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) gate_passed[0] = 0u;  // ordered before any use by stream_ring_init's barrier
    const StreamRing ring = stream_ring_init(stream_raw, full_bar, empty_bar);
    StreamPos pos = {0, 0u};
    if (warp == STREAM_CONSUMERS) {
        // Producer: one thread arms each stage with its byte count and issues its 4 boxes.
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < JOBS; ++j) {
                tma_prefetch_map(jobs[j].map_a);
                tma_prefetch_map(jobs[j].map_w);
            }
            const uint64_t policy = tma_evict_first();
#pragma unroll
            for (int j = 0; j < JOBS; ++j) {
                const StreamRange r = stream_range(jobs[j].N, jobs[j].K);
                if (j == 0) {
                    stream_produce<G>(jobs[j], r, ring.ring, full_bar, empty_bar, pos, policy, StreamPdlGate{});
                } else {
                    stream_produce<G>(jobs[j], r, ring.ring, full_bar, empty_bar, pos, policy,
                                      StreamGridGate{grid_bar + 2 * (j - 1), gate_passed, (uint32_t)j});
                }
            }
        }
        return;
    }
    // Consumers read the split scratch and write C: after the previous kernel.
    dllm_pdl_wait();
#pragma unroll
    for (int j = 0; j < JOBS; ++j) {
        stream_consume<G>(jobs[j], stream_range(jobs[j].N, jobs[j].K), ring.ring_ptr, full_bar, empty_bar, pos,
                          warp, lane, j > 0 ? gate_passed : nullptr, (uint32_t)j);
        if (j + 1 < JOBS) {
            // This job's outputs stored by every consumer warp (and by this block's reductions):
            // generic-proxy writes that other blocks' TMA loads read after the barrier.
            dllm_fence_proxy_async();
            dllm_named_sync(1, STREAM_CONSUMERS * 32);
            if (threadIdx.x == 0) stream_grid_arrive(grid_bar + 2 * j);
        }
    }
}

#define DLLM_STREAM_KERNEL(G)                                                                                  \
    extern "C" __global__ void __launch_bounds__(STREAM_THREADS, 1)                                          \
        gemm_stream_mg##G(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w, \
                          void* C, float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N,  \
                          int K, int epi, const __grid_constant__ DllmEpiParams ep) {                          \
        const StreamJob jobs[1] = {{&map_a, &map_w, C, ws, counters, M, N, K, epi, &ep}};                      \
        stream_jobs_body<G, 1>(jobs, nullptr);                                                                  \
    }

DLLM_STREAM_KERNEL(1)
DLLM_STREAM_KERNEL(2)
DLLM_STREAM_KERNEL(3)
DLLM_STREAM_KERNEL(4)

// ---------------------------------------------------------------------------------------------------------------
// gemm_stream_mlp_mg<G> (opt-in, DLLM_FUSED_MLP=1; M <= 8 * G <= 32): a batch-1 block step's whole MLP in one
// persistent launch: H = swiglu(X · W_guᵀ) (gate/up rows interleaved, swiglu_layout.rs), a grid-wide barrier,
// then R += H · W_dᵀ. Two stream-K jobs through one ring: while the last chunks of the gate/up job drain and
// the grid waits, the producer already requests the first ring's worth of the down projection's weights, so
// the down GEMM has no launch, no ramp-up and no separate tail. Each job's arithmetic is the stream kernel's
// (same ranges for the same block count, same reduction order), so the outputs equal two gemm_stream_mg<G>
// launches of that block count bit for bit.


// map_x: X [M, hidden] bf16 (boxes of 8·G rows), map_gu: W_gu [2·inter, hidden] interleaved, map_h: H [M, inter]
// bf16 (written here), map_d: W_d [hidden, inter]; h = H's storage (bf16), r = the f32 residual [M, hidden]
// (added to); ws_up / ws_down, counters_up / counters_down: each job's workspace and zeroed counters (sized
// as for a gemm_stream_mg<G> launch of this grid); grid_bar: two zeroed words; ep_up / ep_down: the
// norm fold's parameters of each job (the gate/up job's row scale, the down job's prep), or zeros.
#define DLLM_STREAM_MLP_KERNEL(G)                                                                               \
    extern "C" __global__ void __launch_bounds__(STREAM_THREADS, 1) gemm_stream_mlp_mg##G(                     \
        const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_gu,                  \
        const __grid_constant__ CUtensorMap map_h, const __grid_constant__ CUtensorMap map_d, void* h, void* r,  \
        float* __restrict__ ws_up, unsigned int* __restrict__ counters_up, float* __restrict__ ws_down,          \
        unsigned int* __restrict__ counters_down, unsigned int* grid_bar, int M, int hidden, int inter,         \
        const __grid_constant__ DllmEpiParams ep_up, const __grid_constant__ DllmEpiParams ep_down) {           \
        const StreamJob jobs[2] = {                                                                             \
            {&map_x, &map_gu, h, ws_up, counters_up, M, 2 * inter, hidden, DLLM_EPI_SWIGLU_BF16, &ep_up},        \
            {&map_h, &map_d, r, ws_down, counters_down, M, hidden, inter, DLLM_EPI_ADD_F32, &ep_down}};          \
        stream_jobs_body<G, 2>(jobs, grid_bar);                                                                 \
    }

DLLM_STREAM_MLP_KERNEL(1)
DLLM_STREAM_MLP_KERNEL(2)
DLLM_STREAM_MLP_KERNEL(3)
DLLM_STREAM_MLP_KERNEL(4)

// ---------------------------------------------------------------------------------------------------------------
// gemm_stream_tail_mg<G> (opt-in, DLLM_FUSED_MLP=1 with the RMSNorm fold, DLLM_NORM_FOLD=1; M <= 8 * G <= 32): a
// batch-1 block step's layer after attention in one launch: R += O · W_oᵀ (the attention-output projection,
// with the fold's prep of the MLP norm: X = bf16(R ⊙ γ) and its partial sums), a grid barrier, then the two
// jobs of gemm_stream_mlp_mg<G> (gate/up with the row scale, down with the next layer's prep, if any). Three
// stream-K jobs through one ring, each the stream kernel's arithmetic: the same bits as three gemm_stream_mg<G>
// launches of the same block count. Without the fold the MLP norm would need its own launch between the
// first two jobs.
//
// map_o: O [M, hidden] bf16, map_wo: W_o [hidden, hidden]; then the MLP kernel's maps; r: the f32 residual
// (added to by jobs 0 and 2); ws_* / counters_*: each job's workspace and zeroed counters; grid_bar: four
// zeroed words (two barriers); ep_*: each job's epilogue parameters (ep_out's prep writes X and the partial
// sums ep_up's row scale reads).
#define DLLM_STREAM_TAIL_KERNEL(G)                                                                              \
    extern "C" __global__ void __launch_bounds__(STREAM_THREADS, 1) gemm_stream_tail_mg##G(                    \
        const __grid_constant__ CUtensorMap map_o, const __grid_constant__ CUtensorMap map_wo,                  \
        const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_gu,                  \
        const __grid_constant__ CUtensorMap map_h, const __grid_constant__ CUtensorMap map_d, void* h, void* r,  \
        float* __restrict__ ws_out, unsigned int* __restrict__ counters_out, float* __restrict__ ws_up,         \
        unsigned int* __restrict__ counters_up, float* __restrict__ ws_down,                                    \
        unsigned int* __restrict__ counters_down, unsigned int* grid_bar, int M, int hidden, int inter,         \
        const __grid_constant__ DllmEpiParams ep_out, const __grid_constant__ DllmEpiParams ep_up,              \
        const __grid_constant__ DllmEpiParams ep_down) {                                                        \
        const StreamJob jobs[3] = {                                                                             \
            {&map_o, &map_wo, r, ws_out, counters_out, M, hidden, hidden, DLLM_EPI_ADD_F32, &ep_out},            \
            {&map_x, &map_gu, h, ws_up, counters_up, M, 2 * inter, hidden, DLLM_EPI_SWIGLU_BF16, &ep_up},        \
            {&map_h, &map_d, r, ws_down, counters_down, M, hidden, inter, DLLM_EPI_ADD_F32, &ep_down}};          \
        stream_jobs_body<G, 3>(jobs, grid_bar);                                                                 \
    }

DLLM_STREAM_TAIL_KERNEL(1)
DLLM_STREAM_TAIL_KERNEL(2)
DLLM_STREAM_TAIL_KERNEL(3)
DLLM_STREAM_TAIL_KERNEL(4)

// ---------------------------------------------------------------------------------------------------------------
// gemm_stream_chain_mg<G> (opt-in, DLLM_LAYER_CHAIN=1 with the layer tail, the RMSNorm fold and the RoPE epilogue;
// M <= 8 * G <= 32): the layer tail of gemm_stream_tail_mg<G> followed, after a third grid barrier, by the next
// layer's QKV projection: QKV = (XA · W_qkvᵀ) scaled per row by the next attention norm (XA and its partial sums are
// the down job's prep), with epilogue `epi_qkv` (the RoPE epilogue writing the K/V caches, or a plain bf16 store).
// Four stream-K jobs through one ring, each the stream kernel's arithmetic: the same bits as four gemm_stream_mg<G>
// launches of the same block count. A batch-1 block step then runs two launches per layer (this and attention)
// instead of three; the producer requests the QKV weights while the down job drains.
//
// The tail kernel's parameters, then map_xa: XA [M, hidden] bf16 (the down job's prep output), map_wqkv: W_qkv
// [n_qkv, hidden]; qkv: the bf16 [M, n_qkv] output; ws_qkv / counters_qkv its workspace and zeroed counters;
// grid_bar: six zeroed words (three barriers); ep_qkv: its row scale (and RoPE parameters).
#define DLLM_STREAM_CHAIN_KERNEL(G)                                                                             \
    extern "C" __global__ void __launch_bounds__(STREAM_THREADS, 1) gemm_stream_chain_mg##G(                   \
        const __grid_constant__ CUtensorMap map_o, const __grid_constant__ CUtensorMap map_wo,                  \
        const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_gu,                  \
        const __grid_constant__ CUtensorMap map_h, const __grid_constant__ CUtensorMap map_d,                   \
        const __grid_constant__ CUtensorMap map_xa, const __grid_constant__ CUtensorMap map_wqkv, void* h,      \
        void* r, void* qkv, float* __restrict__ ws_out, unsigned int* __restrict__ counters_out,                \
        float* __restrict__ ws_up, unsigned int* __restrict__ counters_up, float* __restrict__ ws_down,          \
        unsigned int* __restrict__ counters_down, float* __restrict__ ws_qkv,                                   \
        unsigned int* __restrict__ counters_qkv, unsigned int* grid_bar, int M, int hidden, int inter,          \
        int n_qkv, int epi_qkv, const __grid_constant__ DllmEpiParams ep_out,                                   \
        const __grid_constant__ DllmEpiParams ep_up, const __grid_constant__ DllmEpiParams ep_down,             \
        const __grid_constant__ DllmEpiParams ep_qkv) {                                                         \
        const StreamJob jobs[4] = {                                                                             \
            {&map_o, &map_wo, r, ws_out, counters_out, M, hidden, hidden, DLLM_EPI_ADD_F32, &ep_out},            \
            {&map_x, &map_gu, h, ws_up, counters_up, M, 2 * inter, hidden, DLLM_EPI_SWIGLU_BF16, &ep_up},        \
            {&map_h, &map_d, r, ws_down, counters_down, M, hidden, inter, DLLM_EPI_ADD_F32, &ep_down},           \
            {&map_xa, &map_wqkv, qkv, ws_qkv, counters_qkv, M, n_qkv, hidden, epi_qkv, &ep_qkv}};                \
        stream_jobs_body<G, 4>(jobs, grid_bar);                                                                 \
    }

DLLM_STREAM_CHAIN_KERNEL(1)
DLLM_STREAM_CHAIN_KERNEL(2)
DLLM_STREAM_CHAIN_KERNEL(3)
DLLM_STREAM_CHAIN_KERNEL(4)
