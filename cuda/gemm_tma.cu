// DLLM_SM90A — compiled to an sm_90a cubin (build.rs); in the portable compute_90 PTX the kernels
// are empty and the host never launches them there.
//
// gemm_tma_wg{2,3}: C[M, N] = A[M, K] · Wᵀ (A bf16 [M, K], W bf16 [N, K], fp32 accumulation,
// epilogues as in gemm.cu) on Hopper warpgroup MMA, fed by the tensor-memory accelerator (TMA)
// with the weight tile multicast to a cluster of two blocks. Host side: src/backend/cuda/gemm_tma.rs;
// notes: docs/gemm-notes.md ("tma").
//
// Why: gemm_wgmma (cp.async by all threads, one block per tile) is bound by L2 bandwidth at the
// shapes that matter (M = 384: 517 TFLOP/s on 192x192 tiles, 389 on the split-K 4096-column
// shapes, H100): each 64-K step of a 192x192 tile reads (192 + 192) x 128 B from L2 for
// 192 x 192 x 64 x 2 FLOP, 96 FLOP per L2 byte. Here the two blocks of a cluster compute the
// two M tiles of the same N tile and each loads half of the shared weight tile, multicast into
// both blocks' shared memory: per cluster (2 x 192 + 192) rows for twice the work, 128 FLOP per
// L2 byte (+33 %), and no thread spends issue slots on copies.
//
//   Block = WG consumer warpgroups (tile BM = 64·WG rows x 192 columns, one m64n192k16 wgmma per
//   k16 step, 96 fp32 accumulators per thread, as in gemm_wgmma) + 1 producer warp. Cluster
//   (2, 1, 1): cluster rank r = blockIdx.x & 1 computes M tile blockIdx.x of N tile blockIdx.y.
//   Ring of STAGES slots [A tile BM x 128 B | W tile 192 x 128 B], 128-byte swizzle written by
//   TMA (the pattern the wgmma descriptors read: 16-byte chunk c of row r at c ^ (r & 7)).
//   Per 64-K step the producer (one thread) waits for the slot's `empty` barrier, arms its own
//   `full` barrier with the bytes that will land in this block (A tile + whole W tile), loads its
//   A tile, and loads W rows [96 r, 96 r + 96) of the N tile multicast to both blocks (each
//   block's `full` barrier at the same offset receives those bytes). A slot is refilled only
//   when the consumers of BOTH blocks released it (every consumer warpgroup arrives on the
//   `empty` barrier of its own block and of the peer: count 2·WG), since the refill writes into
//   both. Consumers: wait `full`, 4 wgmma, commit, wait for the previous step's group, release
//   the previous slot. Out-of-range rows / K columns are zero-filled by TMA (the tensor maps hold
//   the true M, N, K). Split-K along blockIdx.z exactly as gemm_wgmma (workspace + the last
//   split reduces in split order). Both blocks meet at a cluster barrier before exiting, so no
//   block leaves while its peer may still arrive on its barriers.
//
// gemm_tma4_wg{2,3} (opt-in, DLLM_GEMM_TMA4=1; correct but slower than the pairs on an H200): clusters of
// 2 x 2 blocks, (x, y) = (blockIdx.x & 1, blockIdx.y & 1), rank x + 2 y. The two blocks of an N tile
// share its W tile as above, and the two blocks of an M tile share its A tile the same way: block
// (x, y) loads A rows [m0 + y BM/2, + BM/2) multicast to (x, 0) and (x, 1), and W rows
// [n0 + 96 x, + 96) multicast to (0, y) and (1, y). Per cluster and 64-K step (2·BM + 2·192) rows
// for 4·BM·192 outputs: at BM = 192, 192 FLOP per L2 byte (pairs 128). A block's slot is written
// by itself, its M peer (W) and its N peer (A), so every consumer warpgroup releases the slot in
// those three blocks (`empty` counts 3·WG; src/backend/cuda/pipeline_model.rs checks the
// protocol). The grid's y (N tiles) is even: a phantom N tile loads zeros past N and stores
// nothing.
#include "gemm_common.cuh"
#include "wgmma_common.cuh"
#include "mbarrier.cuh"
#include "sync.cuh"
#include "tma.cuh"


#define TMA_BN 192
#define TMA_BK 64
#define TMA_ROW_BYTES 128

template <int WG>
struct TmaCfg {
    static constexpr int BM = 64 * WG;
    static constexpr int CONSUMERS = 128 * WG;
    static constexpr int THREADS = CONSUMERS + 32;
    static constexpr int A_BYTES = BM * TMA_ROW_BYTES;
    static constexpr int B_BYTES = TMA_BN * TMA_ROW_BYTES;
    static constexpr int B_HALF_BYTES = B_BYTES / 2;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int STAGES = (WG == 2) ? 5 : 4;
    // +1024: the ring is aligned up to 1024 bytes inside the dynamic allocation.
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
};
static_assert(TmaCfg<2>::SMEM_BYTES <= 232448 - 1024, "tma wg2 shared memory");
static_assert(TmaCfg<3>::SMEM_BYTES <= 232448 - 1024, "tma wg3 shared memory");
static_assert(TmaCfg<2>::B_HALF_BYTES % 1024 == 0, "the multicast half must keep 1024-byte alignment");
static_assert(TmaCfg<2>::STAGE_BYTES % 1024 == 0 && TmaCfg<3>::STAGE_BYTES % 1024 == 0, "1024-aligned stages");
static_assert(TmaCfg<2>::A_BYTES % 1024 == 0 && TmaCfg<3>::A_BYTES % 1024 == 0, "1024-aligned W tiles");
static_assert((64 * TMA_ROW_BYTES) % 1024 == 0, "1024-aligned warpgroup slices of the A tile");
static_assert(TMA_BN / 2 <= 256 && TmaCfg<3>::BM <= 256, "TMA boxes hold at most 256 rows");
static_assert(WgStage<TmaCfg<2>::CONSUMERS>::BYTES <= TmaCfg<2>::STAGES * TmaCfg<2>::STAGE_BYTES, "wg2 staging area");
static_assert(WgStage<TmaCfg<3>::CONSUMERS>::BYTES <= TmaCfg<3>::STAGES * TmaCfg<3>::STAGE_BYTES, "wg3 staging area");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(DLLM_EMU)

// Arrives on the barrier at shared offset `bar` of cluster block `cta` (this block or the peer).
__device__ __forceinline__ void tma_bar_arrive_cluster(uint32_t bar, uint32_t cta) {
#ifdef DLLM_EMU
    dllm_bar_arrive(dllm_emu::cluster_peer(bar, cta));
#else
    asm volatile(
        "{\n"
        "  .reg .b32 remote;\n"
        "  mapa.shared::cluster.u32 remote, %0, %1;\n"
        "  mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
        "}\n" ::"r"(bar),
        "r"(cta)
        : "memory");
#endif
}


// CN = 1: pairs along M (gemm_tma_wg*); CN = 2: 2 x 2 quads (gemm_tma4_wg*).
template <int WG, int CN>
__device__ __forceinline__ void gemm_tma_body(const CUtensorMap* map_a, const CUtensorMap* map_w, void* C,
                                              float* __restrict__ ws, unsigned int* __restrict__ counters, int M,
                                              int N, int K, int epi, int ktiles_per_split, const DllmEpiParams* ep) {
    using Cfg = TmaCfg<WG>;
    static_assert(CN == 1 || CN == 2, "clusters of 2 x 1 or 2 x 2 blocks");
    // This block's share of the A tile: BM / CN rows, 1024-byte aligned in the slot.
    constexpr int A_PART_ROWS = Cfg::BM / CN;
    static_assert((A_PART_ROWS * TMA_ROW_BYTES) % 1024 == 0, "A parts keep the swizzle alignment");
    DLLM_DYNAMIC_SHARED(unsigned char, tma_smem_raw);
    // Peers arrive on them (tma_bar_arrive_cluster, the multicast copies' bytes).
    DLLM_SHARED_ARRAY(uint64_t, full_bar, Cfg::STAGES, 8);
    DLLM_SHARED_ARRAY(uint64_t, empty_bar, Cfg::STAGES, 8);
    const uint32_t smem = ((uint32_t)__cvta_generic_to_shared(tma_smem_raw) + 1023u) & ~1023u;
    const int tid = threadIdx.x;
    const int wg = tid >> 7;  // == WG for the producer warp
    // (x, y) in the cluster: x = position along M (shares W with x ^ 1), y = along N (shares A
    // with y ^ 1 when CN = 2).
    const uint32_t cx = blockIdx.x & 1u;
    const uint32_t cy = CN == 2 ? (blockIdx.y & 1u) : 0u;
    const uint32_t rank = cx + 2u * cy;
    const uint32_t m_peer = rank ^ 1u;  // same N tile
    const uint32_t n_peer = rank ^ 2u;  // same M tile (CN = 2 only)
    const uint16_t w_mask = (uint16_t)(0x3u << (2u * cy));        // the blocks of this N tile
    const uint16_t a_mask = (uint16_t)((1u << cx) | (1u << (cx + 2u)));  // of this M tile
    const int m0 = blockIdx.x * Cfg::BM;
    const int n0 = blockIdx.y * TMA_BN;
    const int split = blockIdx.z;
    const int splits = gridDim.z;
    const int kt_begin = split * ktiles_per_split;
    const int k_tiles = max(0, min((K + TMA_BK - 1) / TMA_BK, kt_begin + ktiles_per_split) - kt_begin);

    if (tid == 0) {
        for (int s = 0; s < Cfg::STAGES; ++s) {
            dllm_bar_init(dllm_smem_addr(&full_bar[s]), 1);
            // Released by the consumers of every block that writes into this one: itself, its M
            // peer (the W half) and, in quads, its N peer (the A half).
            dllm_bar_init(dllm_smem_addr(&empty_bar[s]), (CN + 1) * WG);
        }
        dllm_fence_mbarrier_init();
    }
    // Both blocks' barriers exist before either block's copies or arrivals can reach them.
    wg_cluster_sync();
    // A (and, with split-K, the workspace) were written by earlier kernels.
    dllm_pdl_entry();

    float acc[96];
    bool store = false;
    float2 rs = make_float2(1.0f, 1.0f);
    if (wg == WG) {
        // Producer warp: one thread issues every copy. It must issue exactly the k_tiles loads
        // the consumers wait for (and so must every block of the cluster): the epilogue reuses
        // the ring as staging once the consumers have seen every `full` barrier, which is only
        // safe because no copy into this block can still be in flight then.
        if (tid == Cfg::CONSUMERS) {
            tma_prefetch_map(map_a);
            tma_prefetch_map(map_w);
            for (int kt = 0; kt < k_tiles; ++kt) {
                const int s = kt % Cfg::STAGES;
                const uint32_t use = (uint32_t)(kt / Cfg::STAGES);
                if (use > 0) dllm_bar_wait(dllm_smem_addr(&empty_bar[s]), (use - 1) & 1u);
                const uint32_t full = dllm_smem_addr(&full_bar[s]);
                dllm_bar_arrive_tx(full, Cfg::A_BYTES + Cfg::B_BYTES);
                const uint32_t sa = smem + s * Cfg::STAGE_BYTES;
                const int k = (kt_begin + kt) * TMA_BK;
                if constexpr (CN == 1) {
                    tma_load(sa, map_a, k, m0, full);
                } else {
                    tma_load_multicast(sa + cy * (A_PART_ROWS * TMA_ROW_BYTES), map_a, k,
                                       m0 + (int)cy * A_PART_ROWS, full, a_mask);
                }
                tma_load_multicast(sa + Cfg::A_BYTES + cx * Cfg::B_HALF_BYTES, map_w, k,
                                   n0 + (int)cx * (TMA_BN / 2), full, w_mask);
            }
        }
    } else {
        // The norm fold's row scales, read while the producer's first copies land.
        rs = wg_row_scales(ep, wg_thread_row(m0, tid), M, tid);
#pragma unroll
        for (int i = 0; i < 96; ++i) acc[i] = 0.0f;
        for (int kt = 0; kt < k_tiles; ++kt) {
            const int s = kt % Cfg::STAGES;
            dllm_bar_wait(dllm_smem_addr(&full_bar[s]), (uint32_t)(kt / Cfg::STAGES) & 1u);
            const uint32_t sa = smem + s * Cfg::STAGE_BYTES + wg * 64 * TMA_ROW_BYTES;
            const uint32_t sb = smem + s * Cfg::STAGE_BYTES + Cfg::A_BYTES;
            const uint64_t da = wg_desc(sa);
            const uint64_t db = wg_desc(sb);
            wg_fence_acc(acc);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < TMA_BK / 16; ++kk) wg_mma_n192(acc, da + (uint64_t)(2 * kk), db + (uint64_t)(2 * kk));
            wg_commit();
            wg_wait<1>();
            wg_fence_acc(acc);
            // The previous step's wgmma group has finished reading its slot: release it in every
            // block whose producer writes into it (their refills write into this block).
            if (kt > 0 && (tid & 127) == 0) {
                const uint32_t empty =
                    dllm_smem_addr(&empty_bar[(kt - 1) % Cfg::STAGES]);
                tma_bar_arrive_cluster(empty, rank);
                tma_bar_arrive_cluster(empty, m_peer);
                if constexpr (CN == 2) tma_bar_arrive_cluster(empty, n_peer);
            }
        }
        wg_wait<0>();
        wg_fence_acc(acc);
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        store = splits == 1 ||
                wg_split_reduce<Cfg::CONSUMERS>(acc, ws, counters, tile, split, splits, tid, 1, smem);
    }
    // Every copy into the ring has landed (the consumers waited for every `full` barrier, the
    // peer's multicast halves included), so the epilogue stages its global reads there.
    if (store) wg_store_tile<Cfg::CONSUMERS>(acc, C, m0 + wg * 64, n0, M, N, epi, tid, 1, smem, ep, rs);
    // No block leaves while its peer may still arrive on its barriers or multicast into it
    // (the release of the cluster barrier also orders this block's last remote arrivals).
    __syncwarp();
    wg_cluster_sync();
}

#define DLLM_TMA_KERNEL(NAME, WGN, CN)                                                                             \
    extern "C" __global__ void __cluster_dims__(2, CN, 1) __launch_bounds__(128 * WGN + 32, 1)                    \
        NAME(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w, void* C,        \
             float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N, int K, int epi,            \
             int ktiles_per_split, const __grid_constant__ DllmEpiParams ep) {                                     \
        gemm_tma_body<WGN, CN>(&map_a, &map_w, C, ws, counters, M, N, K, epi, ktiles_per_split, &ep);             \
    }

#else  // portable PTX: no wgmma / multicast TMA; empty kernels with the same signature (never launched).

#define DLLM_TMA_KERNEL(NAME, WGN, CN)                                                                             \
    extern "C" __global__ void __launch_bounds__(128 * WGN + 32, 1)                                                \
        NAME(const __grid_constant__ CUtensorMap, const __grid_constant__ CUtensorMap, void*, float* __restrict__, \
             unsigned int* __restrict__, int, int, int, int, int, const __grid_constant__ DllmEpiParams) {}

#endif

DLLM_TMA_KERNEL(gemm_tma_wg2, 2, 1)
DLLM_TMA_KERNEL(gemm_tma_wg3, 3, 1)
DLLM_TMA_KERNEL(gemm_tma4_wg2, 2, 2)
DLLM_TMA_KERNEL(gemm_tma4_wg3, 3, 2)
