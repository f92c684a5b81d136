// gemm_stream_mg<G> (G = 1..4, M <= 8 * G): the weight-streaming GEMM C[M, N] = A[M, K] · Wᵀ of
// the batch-1 block step (A bf16 [M, K], W bf16 [N, K] row-major, fp32 accumulation, epilogues
// as in gemm.cu), with the bytes moved by the Hopper bulk-copy engine instead of by the threads.
// Host side: src/backend/cuda/gemm_stream.rs; design notes: docs/gemm-notes.md ("stream").
//
// Why: the register-fed skinny kernels (gemm.cu) keep only the 16-byte loads that fit in their
// registers in flight, and every mma / activation load of a warp delays its next weight loads,
// so at M = 32 they stream at 54-63 % of the copy bandwidth. Here one producer warp per block
// issues `cp.async.bulk` row copies (one per weight or activation row and K chunk) into a
// STREAM_STAGES-deep shared-memory ring tracked by mbarriers (full: transaction bytes landed;
// empty: the 4 consumer warps are done with the slot), so the bytes in flight per SM are the
// ring (up to 3 stages x 32 KB of weights) whatever the consumers are doing.
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
// Shared memory: STREAM_STAGES stages of [128 weight rows | 8·G activation rows], each row
// STREAM_KS bf16 (256 B) at a pitch of 320 B. Consumer warp w owns weight rows [32w, 32w + 32) as
// two 16-row mma tiles; lane (g = lane / 4, t = lane % 4) reads 16 bytes at k = 8t..8t+7 of rows
// g and g + 8 (the skinny kernels' k-slot permutation: the registers read are the mma
// fragments). With a 320-byte pitch the 8 lanes of a quarter-warp (rows g, g + 1; t = 0..3) hit
// 8 distinct 16-byte bank groups. Activation rows >= M and weight rows >= N of a slot hold stale
// bytes: they only feed output columns / rows that are never stored (each mma output element
// depends on one weight row and one activation row). K values >= K are read as zeros.
#include "gemm_common.cuh"
#include "mbarrier.cuh"

#define STREAM_CONSUMERS 4
#define STREAM_THREADS ((STREAM_CONSUMERS + 1) * 32)
#define STREAM_RT 2
#define STREAM_ROWS (STREAM_CONSUMERS * 16 * STREAM_RT)
#define STREAM_KS 128
#define STREAM_PITCH (STREAM_KS * 2 + 64)
#define STREAM_STAGES 4

template <int G>
struct StreamCfg {
    static constexpr int A_ROWS = 8 * G;
    static constexpr int W_BYTES = STREAM_ROWS * STREAM_PITCH;
    static constexpr int STAGE_BYTES = (STREAM_ROWS + A_ROWS) * STREAM_PITCH;
    static constexpr int SMEM_BYTES = STREAM_STAGES * STAGE_BYTES;
};
static_assert(StreamCfg<4>::SMEM_BYTES <= 232448 - 1024, "stream ring exceeds shared memory");
static_assert(STREAM_PITCH % 16 == 0 && (STREAM_PITCH % 128) == 64, "pitch: 16-byte rows, bank shift");

// Bulk copy global -> shared of `bytes` (multiple of 16, both addresses 16-byte aligned),
// completing as transaction bytes on `bar`; `policy` is an L2 cache policy.
__device__ __forceinline__ void stream_copy_hint(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                                 uint64_t policy) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
        "%4;\n" ::"r"(dst),
        "l"(src), "r"(bytes), "r"(bar), "l"(policy)
        : "memory");
}

__device__ __forceinline__ void stream_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// First chunk of block b's range, and the block whose range holds chunk x (B blocks, T chunks).
__device__ __forceinline__ long long stream_start(long long b, long long T, long long B) { return b * T / B; }
__device__ __forceinline__ int stream_block_of(long long x, long long T, long long B) {
    return (int)(((x + 1) * B - 1) / T);
}

template <int G>
__device__ __forceinline__ void stream_zero(float (&a)[STREAM_RT][G][4]) {
#pragma unroll
    for (int r = 0; r < STREAM_RT; ++r)
#pragma unroll
        for (int j = 0; j < G; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) a[r][j][q] = 0.0f;
}

template <int G>
__device__ __forceinline__ void stream_body(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C,
                                            float* __restrict__ ws, unsigned int* __restrict__ counters, int M,
                                            int N, int K, int epi) {
    using Cfg = StreamCfg<G>;
    extern __shared__ __align__(128) unsigned char stream_ring[];
    __shared__ __align__(8) uint64_t full_bar[STREAM_STAGES];
    __shared__ __align__(8) uint64_t empty_bar[STREAM_STAGES];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int C_chunks = (K + STREAM_KS - 1) / STREAM_KS;
    const long long tiles = ((long long)N + STREAM_ROWS - 1) / STREAM_ROWS;
    const long long T = tiles * C_chunks;
    const long long B = gridDim.x;
    const long long x_begin = stream_start(blockIdx.x, T, B);
    const long long x_end = stream_start((long long)blockIdx.x + 1, T, B);

    if (threadIdx.x == 0) {
        for (int s = 0; s < STREAM_STAGES; ++s) {
            dllm_bar_init(dllm_smem_addr(&full_bar[s]), 1);
            dllm_bar_init(dllm_smem_addr(&empty_bar[s]), STREAM_CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    // Every load below reads A (written by the previous kernel) or the split scratch.
    dllm_pdl_entry();

    const uint32_t ring = dllm_smem_addr(stream_ring);
    if (warp == STREAM_CONSUMERS) {
        // Producer warp: lane 0 announces each stage's bytes, all lanes issue the row copies.
        uint64_t policy;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
        for (long long x = x_begin; x < x_end; ++x) {
            const long long i = x - x_begin;
            const int s = (int)(i % STREAM_STAGES);
            const uint32_t use = (uint32_t)(i / STREAM_STAGES);
            if (use > 0) dllm_bar_wait(dllm_smem_addr(&empty_bar[s]), (use - 1) & 1);
            const long long tile = x / C_chunks;
            const int k0 = (int)(x - tile * C_chunks) * STREAM_KS;
            const uint32_t bytes = (uint32_t)min(STREAM_KS, K - k0) * 2;
            const int row0 = (int)tile * STREAM_ROWS;
            const int rows = min(STREAM_ROWS, N - row0);
            const uint32_t full = dllm_smem_addr(&full_bar[s]);
            if (lane == 0) dllm_bar_arrive_tx(full, (uint32_t)(rows + M) * bytes);
            __syncwarp();
            const uint32_t stage = ring + (uint32_t)(s * Cfg::STAGE_BYTES);
            for (int r = lane; r < rows; r += 32)
                stream_copy_hint(stage + r * STREAM_PITCH, W + (size_t)(row0 + r) * K + k0, bytes, full, policy);
            for (int r = lane; r < M; r += 32)
                stream_copy(stage + Cfg::W_BYTES + r * STREAM_PITCH, A + (size_t)r * K + k0, bytes, full);
        }
        return;
    }

    // Consumer warps.
    const int g = lane >> 2;
    const int t = lane & 3;
    const int wrow = warp * 16 * STREAM_RT;  // first weight row of this warp within the tile
    float acc[STREAM_RT][G][4];
    stream_zero<G>(acc);

    long long seg_begin = x_begin;
    for (long long x = x_begin; x < x_end; ++x) {
        const long long i = x - x_begin;
        const int s = (int)(i % STREAM_STAGES);
        const uint32_t use = (uint32_t)(i / STREAM_STAGES);
        const long long tile = x / C_chunks;
        const int kc = (int)(x - tile * C_chunks);
        const int k0 = kc * STREAM_KS;
        dllm_bar_wait(dllm_smem_addr(&full_bar[s]), use & 1);
        const unsigned char* stage = stream_ring + s * Cfg::STAGE_BYTES;
#pragma unroll
        for (int sub = 0; sub < STREAM_KS / 32; ++sub) {
            if (k0 + sub * 32 < K) {  // warp-uniform
                const int kk = sub * 32 + 8 * t;
                const bool in = k0 + kk < K;
                const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
                uint4 wa[STREAM_RT], wb[STREAM_RT];
#pragma unroll
                for (int r = 0; r < STREAM_RT; ++r) {
                    const int row = wrow + 16 * r + g;
                    wa[r] = in ? *(const uint4*)(stage + row * STREAM_PITCH + kk * 2) : zero;
                    wb[r] = in ? *(const uint4*)(stage + (row + 8) * STREAM_PITCH + kk * 2) : zero;
                }
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    const uint4 av =
                        in ? *(const uint4*)(stage + Cfg::W_BYTES + (8 * j + g) * STREAM_PITCH + kk * 2) : zero;
#pragma unroll
                    for (int r = 0; r < STREAM_RT; ++r) {
                        gemm_mma_bf16(acc[r][j], wa[r].x, wb[r].x, wa[r].y, wb[r].y, av.x, av.y);
                        gemm_mma_bf16(acc[r][j], wa[r].z, wb[r].z, wa[r].w, wb[r].w, av.z, av.w);
                    }
                }
            }
        }
        __syncwarp();
        if (lane == 0) dllm_bar_arrive(dllm_smem_addr(&empty_bar[s]));

        if (kc != C_chunks - 1 && x != x_end - 1) continue;
        // End of this block's segment of `tile`: write it, or hand it to the tile's reducer.
        const long long t0 = tile * C_chunks;
        bool store = (seg_begin == t0) && (x == t0 + C_chunks - 1);
        if (!store) {
            float4* part = (float4*)ws;
            const int slot = (x_begin / C_chunks == tile) ? 0 : 1;
            const size_t base = (((size_t)blockIdx.x * 2 + slot) * STREAM_CONSUMERS + warp) * (STREAM_RT * G);
#pragma unroll
            for (int r = 0; r < STREAM_RT; ++r)
#pragma unroll
                for (int j = 0; j < G; ++j)
                    part[(base + r * G + j) * 32 + lane] =
                        make_float4(acc[r][j][0], acc[r][j][1], acc[r][j][2], acc[r][j][3]);
            __threadfence();
            __syncwarp();
            unsigned int* counter = &counters[tile * STREAM_CONSUMERS + warp];
            unsigned int prev = 0;
            if (lane == 0) prev = atomicAdd(counter, 1u);
            prev = __shfl_sync(0xffffffffu, prev, 0);
            const int b0 = stream_block_of(t0, T, B);
            const int b1 = stream_block_of(t0 + C_chunks - 1, T, B);
            if (prev == (unsigned int)(b1 - b0)) {
                __threadfence();
                float sum[STREAM_RT][G][4];
                stream_zero<G>(sum);
                for (int b = b0; b <= b1; ++b) {
                    const int sb = (stream_start(b, T, B) / C_chunks == tile) ? 0 : 1;
                    const size_t bb = (((size_t)b * 2 + sb) * STREAM_CONSUMERS + warp) * (STREAM_RT * G);
#pragma unroll
                    for (int r = 0; r < STREAM_RT; ++r)
#pragma unroll
                        for (int j = 0; j < G; ++j) {
                            float4 v;
                            if (b == (int)blockIdx.x) {
                                v = make_float4(acc[r][j][0], acc[r][j][1], acc[r][j][2], acc[r][j][3]);
                            } else {
                                v = __ldcg(&part[(bb + r * G + j) * 32 + lane]);
                            }
                            sum[r][j][0] += v.x;
                            sum[r][j][1] += v.y;
                            sum[r][j][2] += v.z;
                            sum[r][j][3] += v.w;
                        }
                }
#pragma unroll
                for (int r = 0; r < STREAM_RT; ++r)
#pragma unroll
                    for (int j = 0; j < G; ++j)
#pragma unroll
                        for (int q = 0; q < 4; ++q) acc[r][j][q] = sum[r][j][q];
                if (lane == 0) *counter = 0u;
                store = true;
            }
        }
        if (store) {
            // Fragment element q of tile r, group j: weight row rbase + 16 r + g (+ 8 when q >= 2),
            // token 8 j + 2 t + (q & 1).
            const int rbase = (int)tile * STREAM_ROWS + wrow;
#pragma unroll
            for (int r = 0; r < STREAM_RT; ++r)
#pragma unroll
                for (int j = 0; j < G; ++j)
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const int m = 8 * j + 2 * t + (q & 1);
                        const int n = rbase + 16 * r + g + ((q < 2) ? 0 : 8);
                        if (m < M && n < N) gemm_store1(C, (size_t)m * N + n, acc[r][j][q], epi);
                    }
        }
        stream_zero<G>(acc);
        seg_begin = x + 1;
    }
}

#define DLLM_STREAM_KERNEL(G)                                                                                  \
    extern "C" __global__ void __launch_bounds__(STREAM_THREADS, 1)                                          \
        gemm_stream_mg##G(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C,             \
                          float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N, int K,    \
                          int epi) {                                                                           \
        stream_body<G>(A, W, C, ws, counters, M, N, K, epi);                                                   \
    }

DLLM_STREAM_KERNEL(1)
DLLM_STREAM_KERNEL(2)
DLLM_STREAM_KERNEL(3)
DLLM_STREAM_KERNEL(4)
