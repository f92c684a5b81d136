// DLLM_SM90A — this file is also compiled to an sm_90a cubin (build.rs), which is the only build
// in which its kernels do any work: wgmma exists only on sm_90a. In the portable compute_90 PTX
// the kernel bodies are empty (the host never launches them there: it requires the cubin, i.e. a
// compute capability 9.0 device, and self-tests them before use).
//
// gemm_wgmma_wg{2,3}: C[M, N] = A[M, K] · Wᵀ (A bf16 [M, K] row-major, W bf16 [N, K] row-major,
// fp32 accumulation, epilogues as in gemm.cu) on Hopper warpgroup MMA.
//   Block tile BM x 192 x 64 with BM = 64 * WG; WG warpgroups (128 threads each), warpgroup w owns
//   rows [64w, 64w + 64) of the tile and all 192 columns: one wgmma.m64n192k16 per k16 step
//   (96 fp32 accumulators per thread), both operands read by the tensor cores straight from shared
//   memory through matrix descriptors (K-major, 128-byte swizzle).
//   Tiles are copied global -> shared by all threads with 16-byte cp.async (zero-filled outside M,
//   N, K) into a STAGES-deep ring. Shared layout of one operand tile: row r (an M or N index) is
//   128 bytes (64 K values); its 16-byte chunk c lives at r * 128 + ((c ^ (r & 7)) << 4) — the
//   hardware "128B swizzle" pattern (address bits [4:6] ^= bits [7:9]) with 1024-byte aligned
//   tiles, so the descriptor's stride between 8-row groups is 1024 bytes and a k16 step advances
//   the start address by 32 bytes.
//   Pipeline per K tile kt: wait for tile kt's copies, fence.proxy.async (generic-proxy writes ->
//   async-proxy reads), barrier, issue the copies of tile kt + STAGES - 2 into the slot that tile
//   kt - 2 used (every warpgroup finished reading it: each waited for all but its latest wgmma
//   group before the barrier), then 4 wgmma on tile kt, commit, and wait for tile kt - 1's group.
//   grid = (ceil(M / BM), ceil(N / 192), splits); blockIdx.z splits K (ktiles_per_split K tiles
//   each), reduced deterministically like gemm_wide (workspace + last block of a tile sums the
//   partials in split order, applies the epilogue and resets the tile's counter).
//   gemm_wgmma_wg{2,3}_cs{2,3} (opt-in, DLLM_GEMM_CLUSTER_SPLIT=1): the same blocks with the CS
//   splits of a tile launched as one cluster (1, 1, CS), summed through distributed shared memory
//   (wg_cluster_reduce_store: block r sums and stores the r-th third or half of the tile's
//   columns): no workspace round trip through L2, no last-block serial reduction, and the
//   epilogue shared evenly by the CS blocks; the sums are the workspace path's bits.
#include "gemm_common.cuh"
#include "wgmma_common.cuh"

#define WG_BN 192
#define WG_BK 64
#define WG_ROW_BYTES 128

template <int WG>
struct WgCfg {
    static constexpr int BM = 64 * WG;
    static constexpr int THREADS = 128 * WG;
    static constexpr int A_BYTES = BM * WG_ROW_BYTES;
    static constexpr int B_BYTES = WG_BN * WG_ROW_BYTES;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int STAGES = (WG == 2) ? 5 : 4;
    // +1024: the ring is aligned up to 1024 bytes inside the dynamic allocation.
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
    static constexpr int A_PER_THREAD = BM * 8 / THREADS;     // 16-byte chunks per stage
    static constexpr int B_PER_THREAD = WG_BN * 8 / THREADS;  // 16-byte chunks per stage
    static constexpr int ROW_STEP = THREADS / 8;              // tile rows between a thread's chunks
};
static_assert(WgCfg<2>::SMEM_BYTES <= 232448, "wg2 shared memory");
static_assert(WgCfg<3>::SMEM_BYTES <= 232448, "wg3 shared memory");
static_assert(WgCfg<2>::B_PER_THREAD * WgCfg<2>::THREADS == WG_BN * 8, "wg2 B split");
static_assert(WgCfg<3>::B_PER_THREAD * WgCfg<3>::THREADS == WG_BN * 8, "wg3 B split");
static_assert(WgStage<WgCfg<2>::THREADS>::BYTES <= WgCfg<2>::STAGES * WgCfg<2>::STAGE_BYTES, "wg2 staging area");
static_assert(WgStage<WgCfg<3>::THREADS>::BYTES <= WgCfg<3>::STAGES * WgCfg<3>::STAGE_BYTES, "wg3 staging area");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(DLLM_EMU)

// CS = 1: split-K through the workspace (or no split); CS = 2, 3: the CS splits of a tile are one
// cluster and reduce through distributed shared memory (gemm_wgmma_wg*_cs*, grid z == CS).
template <int WG, int CS>
__device__ __forceinline__ void gemm_wgmma_body(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W,
                                                void* C, float* __restrict__ ws, unsigned int* __restrict__ counters,
                                                int M, int N, int K, int epi, int ktiles_per_split,
                                                const DllmEpiParams* ep) {
    using Cfg = WgCfg<WG>;
    DLLM_DYNAMIC_SHARED(unsigned char, wg_smem_raw);
    const uint32_t smem = ((uint32_t)__cvta_generic_to_shared(wg_smem_raw) + 1023u) & ~1023u;
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int m0 = blockIdx.x * Cfg::BM;
    const int n0 = blockIdx.y * WG_BN;
    const int split = blockIdx.z;
    const int splits = gridDim.z;
    const int kt_begin = split * ktiles_per_split;
    const int k_tiles = max(0, min((K + WG_BK - 1) / WG_BK, kt_begin + ktiles_per_split) - kt_begin);

    // Copy roles: this thread copies chunk c = tid % 8 of tile rows r0 + i * ROW_STEP.
    const int c = tid & 7;
    const int r0 = tid >> 3;
    // (r0 + i * ROW_STEP) & 7 == r0 & 7 because ROW_STEP is a multiple of 8.
    const uint32_t dst0 = (uint32_t)(r0 * WG_ROW_BYTES + ((c ^ (r0 & 7)) << 4));
    const uint16_t* a_src = A + (size_t)min(m0 + r0, M - 1) * K + c * 8;
    const uint16_t* w_src = W + (size_t)min(n0 + r0, N - 1) * K + c * 8;
    uint32_t a_ok = 0, w_ok = 0;
#pragma unroll
    for (int i = 0; i < Cfg::A_PER_THREAD; ++i) a_ok |= (m0 + r0 + i * Cfg::ROW_STEP < M) ? (1u << i) : 0u;
#pragma unroll
    for (int i = 0; i < Cfg::B_PER_THREAD; ++i) w_ok |= (n0 + r0 + i * Cfg::ROW_STEP < N) ? (1u << i) : 0u;

    auto load_stage = [&](int kt, int slot) {
        const uint32_t sa = smem + slot * Cfg::STAGE_BYTES + dst0;
        const uint32_t sw = sa + Cfg::A_BYTES;
        const int k = (kt_begin + kt) * WG_BK + c * 8;
        const bool kin = k < K;
        const size_t koff = kin ? (size_t)(kt_begin + kt) * WG_BK : 0;
#pragma unroll
        for (int i = 0; i < Cfg::A_PER_THREAD; ++i) {
            const bool ok = kin && ((a_ok >> i) & 1u);
            const uint16_t* src = ok ? a_src + (size_t)i * Cfg::ROW_STEP * K + koff : A;
            dllm_cp_async16(sa + i * Cfg::ROW_STEP * WG_ROW_BYTES, src, ok);
        }
#pragma unroll
        for (int i = 0; i < Cfg::B_PER_THREAD; ++i) {
            const bool ok = kin && ((w_ok >> i) & 1u);
            const uint16_t* src = ok ? w_src + (size_t)i * Cfg::ROW_STEP * K + koff : W;
            dllm_cp_async16(sw + i * Cfg::ROW_STEP * WG_ROW_BYTES, src, ok);
        }
    };

    float acc[96];
#pragma unroll
    for (int i = 0; i < 96; ++i) acc[i] = 0.0f;

#pragma unroll
    for (int s = 0; s < Cfg::STAGES - 2; ++s) {
        if (s < k_tiles) load_stage(s, s);
        dllm_cp_commit();
    }
    // The norm fold's row scales, read while the first stages load.
    const float2 rs = wg_row_scales(ep, wg_thread_row(m0, tid), M, tid);

    for (int kt = 0; kt < k_tiles; ++kt) {
        dllm_cp_wait<Cfg::STAGES - 3>();
        wg_fence_proxy_async();
        __syncthreads();
        const int next = kt + Cfg::STAGES - 2;
        if (next < k_tiles) load_stage(next, next % Cfg::STAGES);
        dllm_cp_commit();

        const uint32_t sa = smem + (kt % Cfg::STAGES) * Cfg::STAGE_BYTES + wg * 64 * WG_ROW_BYTES;
        const uint32_t sb = smem + (kt % Cfg::STAGES) * Cfg::STAGE_BYTES + Cfg::A_BYTES;
        const uint64_t da = wg_desc(sa);
        const uint64_t db = wg_desc(sb);
        wg_fence_acc(acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; ++kk) {
            // +32 bytes per k16 step = +2 in the descriptor's address field (16-byte units).
            wg_mma_n192(acc, da + (uint64_t)(2 * kk), db + (uint64_t)(2 * kk));
        }
        wg_commit();
        wg_wait<1>();
        wg_fence_acc(acc);
    }
    wg_wait<0>();
    wg_fence_acc(acc);
    dllm_cp_wait<0>();

    if constexpr (CS > 1) {
        wg_cluster_reduce_store<WG, CS>(acc, C, m0, n0, M, N, epi, tid, smem, ep, rs);
        return;
    }
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    // The drained ring stages the epilogue's global reads (wg_split_reduce, wg_store_tile).
    if (splits > 1 && !wg_split_reduce<Cfg::THREADS>(acc, ws, counters, tile, split, splits, tid, 0, smem)) return;
    wg_store_tile<Cfg::THREADS>(acc, C, m0 + wg * 64, n0, M, N, epi, tid, 0, smem, ep, rs);
}

#define DLLM_WGMMA_KERNEL(WGN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128 * WGN, 1)                                                    \
        gemm_wgmma_wg##WGN(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C,                \
                           float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N, int K,       \
                           int epi, int ktiles_per_split, const __grid_constant__ DllmEpiParams ep) {              \
        dllm_pdl_entry();                                                                                          \
        gemm_wgmma_body<WGN, 1>(A, W, C, ws, counters, M, N, K, epi, ktiles_per_split, &ep);                     \
    }

// The cluster-split kernels: clusters of CSN blocks along z, one per K split (grid z == CSN).
#define DLLM_WGMMA_CS_KERNEL(WGN, CSN)                                                                             \
    extern "C" __global__ void __cluster_dims__(1, 1, CSN) __launch_bounds__(128 * WGN, 1)                        \
        gemm_wgmma_wg##WGN##_cs##CSN(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C,     \
                                     int M, int N, int K, int epi, int ktiles_per_split,                          \
                                     const __grid_constant__ DllmEpiParams ep) {                                  \
        dllm_pdl_entry();                                                                                          \
        gemm_wgmma_body<WGN, CSN>(A, W, C, nullptr, nullptr, M, N, K, epi, ktiles_per_split, &ep);                \
    }

#else  // portable PTX: no wgmma; empty kernels with the same signature (never launched).

#define DLLM_WGMMA_KERNEL(WGN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128 * WGN, 1)                                                    \
        gemm_wgmma_wg##WGN(const uint16_t* __restrict__, const uint16_t* __restrict__, void*, float* __restrict__, \
                           unsigned int* __restrict__, int, int, int, int, int, const __grid_constant__ DllmEpiParams) {}

#define DLLM_WGMMA_CS_KERNEL(WGN, CSN)                                                                             \
    extern "C" __global__ void __launch_bounds__(128 * WGN, 1) gemm_wgmma_wg##WGN##_cs##CSN(                     \
        const uint16_t* __restrict__, const uint16_t* __restrict__, void*, int, int, int, int, int,              \
        const __grid_constant__ DllmEpiParams) {}

#endif

DLLM_WGMMA_KERNEL(2)
DLLM_WGMMA_KERNEL(3)
DLLM_WGMMA_CS_KERNEL(2, 2)
DLLM_WGMMA_CS_KERNEL(2, 3)
DLLM_WGMMA_CS_KERNEL(3, 2)
DLLM_WGMMA_CS_KERNEL(3, 3)
