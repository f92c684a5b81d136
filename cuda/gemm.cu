// dllm GEMM kernels: C[M, N] = A[M, K] · Wᵀ with A bf16 row-major [M, K], W bf16 row-major
// [N, K] (PyTorch Linear layout), fp32 accumulation and three epilogues (store bf16, store fp32,
// add into fp32). Host side: src/backend/cuda/gemm.rs; design notes: docs/gemm-notes.md.
//
// Kernels (all take `void* C` and an `epi` code, see DLLM_EPI_*):
//   gemm_naive          one thread per output, fp32 FMA loop: the always-correct reference.
//   gemm_skinny_mg<G>   M <= 8*G (G = 1..8): weight-streaming GEMV-like kernel on mma.sync.
//   gemm_skinny2_mg<G>  M <= 8*G (G = 1..4): the same with 32 weight rows per warp (less A traffic).
//   gemm_wide           128x128x32 block tiles, cp.async 4-stage pipeline, ldmatrix + mma.sync.
//   gemm_grouped_mg<G>  the experts of a mixture in one launch: the skinny body per expert, with
//                       gathered A rows (gemm_grouped_seq_mg<G>: A rows in order).
//
// Preconditions (checked on the host): K % 8 == 0, N % 8 == 0, A/W 16-byte aligned, C 8-byte
// aligned. bf16 values travel as raw uint16 bits.
#include "gemm_common.cuh"

// 16-byte global load through the non-coherent path without allocating in L1 (streamed weights);
// returns zeros when `pred` is false (the address is then not touched).
__device__ __forceinline__ uint4 gemm_ld_stream(const void* p, bool pred) {
    uint4 r;
    asm("{\n"
        "  .reg .pred p;\n"
        "  setp.ne.b32 p, %5, 0;\n"
        "  mov.b32 %0, 0;\n"
        "  mov.b32 %1, 0;\n"
        "  mov.b32 %2, 0;\n"
        "  mov.b32 %3, 0;\n"
        "  @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        "}\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p), "r"((int)pred));
    return r;
}

// 16-byte global load through the read-only path, cached in L1 (activations, reused by warps).
__device__ __forceinline__ uint4 gemm_ld_cached(const void* p, bool pred) {
    uint4 r;
    asm("{\n"
        "  .reg .pred p;\n"
        "  setp.ne.b32 p, %5, 0;\n"
        "  mov.b32 %0, 0;\n"
        "  mov.b32 %1, 0;\n"
        "  mov.b32 %2, 0;\n"
        "  mov.b32 %3, 0;\n"
        "  @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        "}\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p), "r"((int)pred));
    return r;
}

// ---------------------------------------------------------------------------------------------
// gemm_naive: grid (ceil(N / 256), min(M, 65535)), block 256. Thread (n, m) computes one output.

extern "C" __global__ void __launch_bounds__(256) gemm_naive(const uint16_t* __restrict__ A,
                                                             const uint16_t* __restrict__ W, void* C, int M, int N,
                                                             int K, int epi) {
    dllm_pdl_entry();
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    for (int m = blockIdx.y; m < M; m += gridDim.y) {
        const uint16_t* a = A + (size_t)m * K;
        const uint16_t* w = W + (size_t)n * K;
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) acc = fmaf(gemm_bf16_to_f32(a[k]), gemm_bf16_to_f32(w[k]), acc);
        gemm_store1(C, (size_t)m * N + n, acc, epi);
    }
}

// ---------------------------------------------------------------------------------------------
// gemm_skinny_mg<G>: M <= 8 * G. Computes Cᵀ = W · Aᵀ with W as the mma "A" operand (16 weight
// rows per warp) and 8-token groups of A as the "B" operand, so every weight element is read
// exactly once, straight from global memory into registers with 16-byte loads.
//
// K is processed in chunks of 32. In a chunk, lane (g = lane / 4, t = lane % 4) loads the 8
// consecutive k values [8t, 8t + 8) of weight rows g and g + 8 and of token g of each group. The
// dot product does not care about the order of k, so those 8 values are assigned to mma k-slots
// {2t, 2t+1, 2t+8, 2t+9} of two consecutive m16n8k16 ops (the same assignment for both operands).
//
// Block: 4 warps = 64 weight rows (tile = blockIdx.x); blockIdx.y = split of the K chunks. With
// several splits each block writes its fp32 partial tile to `ws`, and the last block of a tile to
// arrive (per-tile counter) sums all partials in split order (deterministic) and applies the
// epilogue, then resets the counter to 0 for the next launch.

#define SKINNY_WARPS 4
#define SKINNY_THREADS (SKINNY_WARPS * 32)
#define SKINNY_ROWS (SKINNY_WARPS * 16)
#define SKINNY_UNROLL 4
// Version 2 (gemm_skinny2_mg<G>, G = 1..4): every warp owns RT = 2 tiles of 16 weight rows
// (block = 128 rows) and applies each activation fragment to both, which halves the activation
// traffic (L2 -> L1 and LSU instructions) per weight byte; at M = 32 version 1 re-reads A
// (M / 64 = 0.5 bytes per weight byte) from L2. Two register buffers of SKINNY2_UNROLL chunks
// keep the same 8 independent 16-byte weight loads per lane in flight as version 1.
#define SKINNY2_RT 2
#define SKINNY2_UNROLL 2

// GATHER: token m of A is row a_rows[m] (the grouped expert GEMM below); otherwise row m.
// tile / split / splits: this block's weight tile and K split (blockIdx.x, blockIdx.y, gridDim.y
// for the plain kernels).
template <int G, int RT, int UNROLL, bool GATHER>
__device__ __forceinline__ void gemm_skinny_body(const uint16_t* __restrict__ A, const int* __restrict__ a_rows,
                                                 const uint16_t* __restrict__ W, void* C, float* __restrict__ ws,
                                                 unsigned int* __restrict__ counters, int M, int N, int K, int epi,
                                                 int chunks_per_split, int tile, int split, int splits) {
    // PDL: let the next kernel launch now; wait for the previous one only after the first weight
    // loads are in flight (weights are never written, so they may be read before the wait).
    dllm_pdl_trigger();
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    // Warp rows: [rbase + 16 r, rbase + 16 r + 16) for r < RT; this lane's rows are
    // rbase + 16 r + g (fragment rows 0..7) and rbase + 16 r + g + 8 (rows 8..15).
    const int rbase = tile * (SKINNY_ROWS * RT) + warp * 16 * RT;
    const uint16_t* w0[RT];
    const uint16_t* w1[RT];
    bool ok0[RT], ok1[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
        const int row0 = rbase + 16 * r + g;
        const int row1 = row0 + 8;
        ok0[r] = row0 < N;
        ok1[r] = row1 < N;
        w0[r] = W + (size_t)(ok0[r] ? row0 : 0) * K;
        w1[r] = W + (size_t)(ok1[r] ? row1 : 0) * K;
    }

    const int total_chunks = (K + 31) / 32;
    const int c_begin = split * chunks_per_split;
    const int c_end = min(total_chunks, c_begin + chunks_per_split);

    float acc[RT][G][4];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
#pragma unroll
        for (int j = 0; j < G; ++j) {
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[r][j][q] = 0.0f;
        }
    }

    // The gathered rows of this lane's tokens (filled after the PDL wait; row 0 for tokens past M,
    // whose loads are off).
    int a_row[G];
    // Software pipeline over two register buffers: the weight loads of the next batch of
    // UNROLL chunks are issued before the MMAs of the current one, so every lane keeps
    // 2·RT·UNROLL to 4·RT·UNROLL independent 16-byte loads in flight at all times.
    uint4 wa0[RT][UNROLL], wb0[RT][UNROLL], wa1[RT][UNROLL], wb1[RT][UNROLL];
    auto load_w = [&](uint4 (&wa)[RT][UNROLL], uint4 (&wb)[RT][UNROLL], int c) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = (c + u) * 32 + 8 * t;
            const bool in = (c + u < c_end) && (k < K);
#pragma unroll
            for (int r = 0; r < RT; ++r) {
                wa[r][u] = gemm_ld_stream(w0[r] + (in ? k : 0), in && ok0[r]);
                wb[r][u] = gemm_ld_stream(w1[r] + (in ? k : 0), in && ok1[r]);
            }
        }
    };
    auto mma_batch = [&](const uint4 (&wa)[RT][UNROLL], const uint4 (&wb)[RT][UNROLL], int c) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (c + u < c_end) {  // warp-uniform
                const int k = (c + u) * 32 + 8 * t;
                const bool in = k < K;
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    const int m = 8 * j + g;
                    const bool okm = in && (m < M);
                    const int am = GATHER ? a_row[j] : (okm ? m : 0);
                    const uint4 av = gemm_ld_cached(A + (size_t)am * K + (okm ? k : 0), okm);
#pragma unroll
                    for (int r = 0; r < RT; ++r) {
                        gemm_mma_bf16(acc[r][j], wa[r][u].x, wb[r][u].x, wa[r][u].y, wb[r][u].y, av.x, av.y);
                        gemm_mma_bf16(acc[r][j], wa[r][u].z, wb[r][u].z, wa[r][u].w, wb[r][u].w, av.z, av.w);
                    }
                }
            }
        }
    };

    if (c_begin < c_end) load_w(wa0, wb0, c_begin);
    dllm_pdl_wait();  // before reading A (written by the previous kernel) or the split-K scratch
#pragma unroll
    for (int j = 0; j < G; ++j) a_row[j] = (GATHER && 8 * j + g < M) ? a_rows[8 * j + g] : 0;
    for (int c = c_begin; c < c_end; c += 2 * UNROLL) {
        const int c1 = c + UNROLL;
        const int c2 = c1 + UNROLL;
        if (c1 < c_end) load_w(wa1, wb1, c1);
        mma_batch(wa0, wb0, c);
        if (c2 < c_end) load_w(wa0, wb0, c2);
        if (c1 < c_end) mma_batch(wa1, wb1, c1);
    }

    if (splits > 1) {
        // Partial tile layout: [tile][split][r][j][thread] float4 (RT = 1: [tile][split][j][thread]).
        float4* part = (float4*)ws;
        const size_t base = ((size_t)tile * splits + split) * (RT * G);
#pragma unroll
        for (int r = 0; r < RT; ++r) {
#pragma unroll
            for (int j = 0; j < G; ++j)
                part[(base + r * G + j) * SKINNY_THREADS + threadIdx.x] =
                    make_float4(acc[r][j][0], acc[r][j][1], acc[r][j][2], acc[r][j][3]);
        }
        __threadfence();
        __syncthreads();
        __shared__ unsigned int s_last;
        if (threadIdx.x == 0) s_last = (atomicAdd(&counters[tile], 1u) == (unsigned int)(splits - 1)) ? 1u : 0u;
        __syncthreads();
        if (s_last == 0u) return;
        __threadfence();
        float sum[RT][G][4];
#pragma unroll
        for (int r = 0; r < RT; ++r) {
#pragma unroll
            for (int j = 0; j < G; ++j) {
#pragma unroll
                for (int q = 0; q < 4; ++q) sum[r][j][q] = 0.0f;
            }
        }
        for (int s = 0; s < splits; ++s) {
            const size_t b = ((size_t)tile * splits + s) * (RT * G);
#pragma unroll
            for (int r = 0; r < RT; ++r) {
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    float4 v;
                    if (s == split) {
                        v = make_float4(acc[r][j][0], acc[r][j][1], acc[r][j][2], acc[r][j][3]);
                    } else {
                        v = __ldcg(&part[(b + r * G + j) * SKINNY_THREADS + threadIdx.x]);
                    }
                    sum[r][j][0] += v.x;
                    sum[r][j][1] += v.y;
                    sum[r][j][2] += v.z;
                    sum[r][j][3] += v.w;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < RT; ++r) {
#pragma unroll
            for (int j = 0; j < G; ++j) {
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[r][j][q] = sum[r][j][q];
            }
        }
        if (threadIdx.x == 0) counters[tile] = 0u;
    }

    gemm_store_fragments<RT, G>(acc, C, rbase, g, t, M, N, epi);
}

#define DLLM_SKINNY_KERNEL(G)                                                                                   \
    extern "C" __global__ void __launch_bounds__(SKINNY_THREADS, 4)                                           \
        gemm_skinny_mg##G(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C,              \
                          float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N, int K,     \
                          int epi, int chunks_per_split) {                                                      \
        gemm_skinny_body<G, 1, SKINNY_UNROLL, false>(A, nullptr, W, C, ws, counters, M, N, K, epi, chunks_per_split, \
                                                     blockIdx.x, blockIdx.y, gridDim.y);                           \
    }

DLLM_SKINNY_KERNEL(1)
DLLM_SKINNY_KERNEL(2)
DLLM_SKINNY_KERNEL(3)
DLLM_SKINNY_KERNEL(4)
DLLM_SKINNY_KERNEL(5)
DLLM_SKINNY_KERNEL(6)
DLLM_SKINNY_KERNEL(7)
DLLM_SKINNY_KERNEL(8)

// Version 2: 2 tiles of 16 weight rows per warp, 128 rows per block (M <= 32).
#define DLLM_SKINNY2_KERNEL(G)                                                                                  \
    extern "C" __global__ void __launch_bounds__(SKINNY_THREADS, 4)                                           \
        gemm_skinny2_mg##G(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C,             \
                           float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N, int K,    \
                           int epi, int chunks_per_split) {                                                     \
        gemm_skinny_body<G, SKINNY2_RT, SKINNY2_UNROLL, false>(A, nullptr, W, C, ws, counters, M, N, K, epi,          \
                                                               chunks_per_split, blockIdx.x, blockIdx.y, gridDim.y); \
    }

DLLM_SKINNY2_KERNEL(1)
DLLM_SKINNY2_KERNEL(2)
DLLM_SKINNY2_KERNEL(3)
DLLM_SKINNY2_KERNEL(4)

// ---------------------------------------------------------------------------------------------
// gemm_grouped_mg<G>: every expert of a mixture-of-experts layer in one launch (host side:
// src/backend/cuda/gemm_grouped.rs; the routing that fills off / cnt / a_rows: cuda/moe.cu).
// blockIdx.z = expert e with weights W + e * w_stride ([N, K] each); its cnt[e] rows are rows
// [off[e], off[e] + cnt[e]) of the grouped output C, and row off[e] + i takes A row
// a_rows[off[e] + i] (gemm_grouped_seq_mg<G>: A row off[e] + i, A already in grouped order). The skinny
// body runs them in chunks of 8 * G rows (each chunk streams the expert's weight tile again), one
// weight tile per blockIdx.x, no split-K; an expert no row chose reads nothing. Epilogues: DLLM_EPI_STORE_BF16, DLLM_EPI_STORE_F32 and DLLM_EPI_SWIGLU_BF16 (C
// then [rows, N / 2]). Every element is the same dot product in the same k order as in the plain
// skinny kernel, so a row's output does not depend on where in its expert's group it lands.
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
// registers of the plain skinny kernel. Past 32 rows per chunk (G > 4: experts of full forwards,
// twice the mma work per weight byte) two blocks per SM get the registers the chunk loop needs,
// which at four blocks' 128 spill.
template <int G, bool GATHER>
__device__ __forceinline__ void gemm_grouped_body(const uint16_t* __restrict__ A, const int* __restrict__ a_rows,
                                                  const uint16_t* __restrict__ W, long long w_stride, void* C,
                                                  const int* __restrict__ off, const int* __restrict__ cnt, int N,
                                                  int K, int epi) {
    dllm_pdl_entry();  // off, cnt and a_rows come from the routing kernels
    const int e = blockIdx.z;
    const int first = off[e];
    const int rows = cnt[e];
    const uint16_t* We = W + (long long)e * w_stride;
    for (int m0 = 0; m0 < rows; m0 += 8 * G) {
        const long long r0 = (long long)first + m0;
        gemm_skinny_body<G, 1, SKINNY_UNROLL, GATHER>(GATHER ? A : A + r0 * K, GATHER ? a_rows + r0 : nullptr, We,
                                                      gemm_grouped_out(C, r0, N, epi), nullptr, nullptr,
                                                      min(8 * G, rows - m0), N, K, epi, (K + 31) / 32, blockIdx.x,
                                                      0, 1);
    }
}

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

// ---------------------------------------------------------------------------------------------
// gemm_wide: block tile 128 (M) x 128 (N) x 32 (K), 8 warps as 2 (M) x 4 (N), warp tile 64 x 32
// (4 x 4 m16n8k16 ops per k16 step). A and W tiles are copied global -> shared with cp.async
// (16-byte chunks, zero-filled outside M, N, K) in a 4-stage ring, and read into fragments with
// ldmatrix. Shared tile rows are 64 bytes (4 chunks); chunk c of row r is stored at position
// c ^ ((r >> 1) & 3), which makes both the cp.async stores and the 8-row ldmatrix reads
// conflict-free. grid = (ceil(M / 128), ceil(N / 128)): M tiles vary fastest so the blocks in
// flight share weight tiles through L2; blockIdx.z splits K (ktiles_per_split tiles each) when
// the output has too few tiles to fill the GPU, reduced like the skinny kernel's split-K.
// Dynamic shared memory: WIDE_SMEM_BYTES.

#define WIDE_BM 128
#define WIDE_BN 128
#define WIDE_BK 32
#define WIDE_STAGES 4
#define WIDE_THREADS 256
#define WIDE_TILE_BYTES (WIDE_BM * WIDE_BK * 2)
#define WIDE_STAGE_BYTES (2 * WIDE_TILE_BYTES)
#define WIDE_SMEM_BYTES (WIDE_STAGES * WIDE_STAGE_BYTES)

__device__ __forceinline__ uint32_t gemm_swz(int r, int c) { return (uint32_t)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4)); }

__device__ __forceinline__ void gemm_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

extern "C" __global__ void __launch_bounds__(WIDE_THREADS, 2)
    gemm_wide(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C, float* __restrict__ ws,
              unsigned int* __restrict__ counters, int M, int N, int K, int epi, int ktiles_per_split) {
    dllm_pdl_entry();
    extern __shared__ __align__(128) unsigned char gemm_smem[];
    const uint32_t smem = (uint32_t)__cvta_generic_to_shared(gemm_smem);
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int warp_m = warp >> 2;  // 0..1
    const int warp_n = warp & 3;   // 0..3
    const int m0 = blockIdx.x * WIDE_BM;
    const int n0 = blockIdx.y * WIDE_BN;
    // This block's K tiles: [kt_begin, kt_begin + k_tiles) (split-K along blockIdx.z).
    const int split = blockIdx.z;
    const int splits = gridDim.z;
    const int kt_begin = split * ktiles_per_split;
    const int k_tiles = max(0, min((K + WIDE_BK - 1) / WIDE_BK, kt_begin + ktiles_per_split) - kt_begin);

    // Each thread copies 2 chunks of the A tile and 2 of the W tile per stage.
    auto load_stage = [&](int kt, int slot) {
        const uint32_t sa = smem + slot * WIDE_STAGE_BYTES;
        const uint32_t sw = sa + WIDE_TILE_BYTES;
        const int k0 = (kt_begin + kt) * WIDE_BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int q = tid + i * WIDE_THREADS;
            const int r = q >> 2;
            const int c = q & 3;
            const int k = k0 + c * 8;
            const bool kin = k < K;
            const int am = m0 + r;
            const bool aok = kin && am < M;
            dllm_cp_async16(sa + gemm_swz(r, c), aok ? (const void*)(A + (size_t)am * K + k) : (const void*)A, aok);
            const int wn = n0 + r;
            const bool wok = kin && wn < N;
            dllm_cp_async16(sw + gemm_swz(r, c), wok ? (const void*)(W + (size_t)wn * K + k) : (const void*)W, wok);
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < WIDE_STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        dllm_cp_commit();
    }

    // ldmatrix lane roles: A matrices (rows +0/+8) x (k +0/+8); W matrices (k +0/+8) x (n +0/+8).
    const int a_row = warp_m * 64 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int a_kc = lane >> 4;
    const int b_row = warp_n * 32 + (lane & 7) + (lane >> 4) * 8;
    const int b_kc = (lane >> 3) & 1;

    for (int kt = 0; kt < k_tiles; ++kt) {
        dllm_cp_wait<WIDE_STAGES - 2>();
        __syncthreads();
        // Refill the slot consumed in the previous iteration (all warps are past it now).
        const int next = kt + WIDE_STAGES - 1;
        if (next < k_tiles) load_stage(next, next % WIDE_STAGES);
        dllm_cp_commit();

        const uint32_t sa = smem + (kt % WIDE_STAGES) * WIDE_STAGE_BYTES;
        const uint32_t sw = sa + WIDE_TILE_BYTES;
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            uint32_t af[4][4];
            uint32_t bfr[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) gemm_ldmatrix_x4(af[i], sa + gemm_swz(a_row + i * 16, kk * 2 + a_kc));
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
                uint32_t r[4];
                gemm_ldmatrix_x4(r, sw + gemm_swz(b_row + jj * 16, kk * 2 + b_kc));
                bfr[2 * jj][0] = r[0];
                bfr[2 * jj][1] = r[1];
                bfr[2 * jj + 1][0] = r[2];
                bfr[2 * jj + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    gemm_mma_bf16(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bfr[j][0], bfr[j][1]);
        }
    }
    dllm_cp_wait<0>();

    if (splits > 1) {
        // Same scheme as the skinny kernel: partial tiles [tile][split][e][thread] float4, the
        // last block of a tile to arrive sums them in split order and runs the epilogue.
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        float4* part = (float4*)ws;
        const size_t base = ((size_t)tile * splits + split) * 16;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            float* v = acc[e >> 2][e & 3];
            part[(base + e) * WIDE_THREADS + tid] = make_float4(v[0], v[1], v[2], v[3]);
        }
        __threadfence();
        __syncthreads();
        __shared__ unsigned int s_last;
        if (tid == 0) s_last = (atomicAdd(&counters[tile], 1u) == (unsigned int)(splits - 1)) ? 1u : 0u;
        __syncthreads();
        if (s_last == 0u) return;
        __threadfence();
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            float* v = acc[e >> 2][e & 3];
            float4 total = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int s = 0; s < splits; ++s) {
                const float4 p = (s == split) ? make_float4(v[0], v[1], v[2], v[3])
                                              : __ldcg(&part[(((size_t)tile * splits + s) * 16 + e) * WIDE_THREADS + tid]);
                total.x += p.x;
                total.y += p.y;
                total.z += p.z;
                total.w += p.w;
            }
            v[0] = total.x;
            v[1] = total.y;
            v[2] = total.z;
            v[3] = total.w;
        }
        if (tid == 0) counters[tile] = 0u;
    }

    const int g = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r0 = m0 + warp_m * 64 + i * 16 + g;
        gemm_store_pairs<4>(&acc[i][0][0], C, r0, n0 + warp_n * 32 + 2 * t, 0, M, N, epi);
    }
}
