// dllm grouped expert GEMM (host side: src/backend/cuda/gemm_grouped.rs; the routing that fills
// off / cnt / a_rows: cuda/moe.cu). gemm_grouped_mg<G> runs every expert of a mixture-of-experts
// layer in one launch: blockIdx.z = expert e with weights W + e * w_stride ([N, K] each); its
// cnt[e] rows are rows [off[e], off[e] + cnt[e]) of the grouped output C, and row off[e] + i takes
// A row a_rows[off[e] + i] (gemm_grouped_seq_mg<G>: A row off[e] + i, A already in grouped
// order). The skinny body (cuda/gemm_skinny.cuh) runs them in chunks of 8 * G rows, chunk
// blockIdx.x of weight tile blockIdx.y, no split-K; a block past its expert's rows reads nothing.
// The chunks of one (expert, tile) are neighbours in launch order, so they run together and the
// tile comes from memory once, the other chunks reading it from L2 (a b8 refresh gives each
// expert ~6 chunks; with one block looping over them the tile was streamed from memory each time). Epilogues: DLLM_EPI_STORE_BF16, DLLM_EPI_STORE_F32 and
// DLLM_EPI_SWIGLU_BF16 (C then [rows, N / 2]). Every element is the same dot product in the same
// k order as in the plain skinny kernel, so a row's output does not depend on where in its
// expert's group it lands.
#include "gemm_skinny.cuh"

__device__ __forceinline__ void* gemm_grouped_out(void* C, long long row, int N, int epi) {
    switch (epi) {
        case DLLM_EPI_STORE_F32:
            return (float*)C + row * N;
        case DLLM_EPI_SWIGLU_BF16:
            return (uint16_t*)C + row * (N / 2);
        default:
            return (uint16_t*)C + row * N;
    }
}

// GATHER = true: gemm_grouped_mg<G> (A rows through a_rows); false: gemm_grouped_seq_mg<G> (A
// already in grouped order). Two kernels, not a runtime branch: one body each keeps the
// registers of the plain skinny kernel.
template <int G, bool GATHER>
__device__ __forceinline__ void gemm_grouped_body(const uint16_t* __restrict__ A, const int* __restrict__ a_rows,
                                                  const uint16_t* __restrict__ W, long long w_stride, void* C,
                                                  const int* __restrict__ off, const int* __restrict__ cnt, int N,
                                                  int K, int epi) {
    dllm_pdl_entry();  // off, cnt and a_rows come from the routing kernels
    const int e = blockIdx.z;
    const int rows = cnt[e];
    const int m0 = blockIdx.x * 8 * G;
    if (m0 >= rows) return;  // past this expert's rows (most chunks of most experts)
    const long long r0 = (long long)off[e] + m0;
    gemm_skinny_body<G, 1, SKINNY_UNROLL, GATHER>(GATHER ? A : A + r0 * K, GATHER ? a_rows + r0 : nullptr,
                                                  W + (long long)e * w_stride, gemm_grouped_out(C, r0, N, epi),
                                                  nullptr, nullptr, min(8 * G, rows - m0), N, K, epi,
                                                  (K + 31) / 32, blockIdx.y, 0, 1);
}

// Past 32 rows per chunk (G > 4: full forwards and batches, twice the mma work per weight byte)
// two blocks per SM: at four blocks' 128 registers the gathered rows' indices spill into the loop.
#define GROUPED_MIN_BLOCKS(G) ((G) <= 4 ? 4 : 2)

#define DLLM_GROUPED_KERNEL(G)                                                                                  \
    extern "C" __global__ void __launch_bounds__(SKINNY_THREADS, GROUPED_MIN_BLOCKS(G))                       \
        gemm_grouped_mg##G(const uint16_t* __restrict__ A, const int* __restrict__ a_rows,                      \
                           const uint16_t* __restrict__ W, long long w_stride, void* C,                         \
                           const int* __restrict__ off, const int* __restrict__ cnt, int N, int K, int epi) {   \
        gemm_grouped_body<G, true>(A, a_rows, W, w_stride, C, off, cnt, N, K, epi);                             \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(SKINNY_THREADS, GROUPED_MIN_BLOCKS(G))                       \
        gemm_grouped_seq_mg##G(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W,                  \
                               long long w_stride, void* C, const int* __restrict__ off,                        \
                               const int* __restrict__ cnt, int N, int K, int epi) {                            \
        gemm_grouped_body<G, false>(A, nullptr, W, w_stride, C, off, cnt, N, K, epi);                           \
    }

DLLM_GROUPED_KERNEL(1)
DLLM_GROUPED_KERNEL(2)
DLLM_GROUPED_KERNEL(3)
DLLM_GROUPED_KERNEL(4)
DLLM_GROUPED_KERNEL(5)
DLLM_GROUPED_KERNEL(6)
DLLM_GROUPED_KERNEL(7)
DLLM_GROUPED_KERNEL(8)
