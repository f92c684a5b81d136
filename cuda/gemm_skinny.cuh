// The skinny GEMM's body (weight streaming on mma.sync for M <= 64), shared by the plain skinny
// kernels (cuda/gemm.cu) and the grouped expert GEMM (cuda/gemm_grouped.cu), with its two 16-byte
// loads. Under DLLM_EMU (cuda/emu/cuda_emu.h: the kernels on the CPU, tests/kernel_emulation.rs)
// the loads are plain C++ reads.
#pragma once
#include "gemm_common.cuh"

// 16-byte global load through the non-coherent path without allocating in L1 (streamed weights);
// returns zeros when `pred` is false (the address is then not touched).
__device__ __forceinline__ uint4 gemm_ld_stream(const void* p, bool pred) {
#ifdef DLLM_EMU
    return pred ? *(const uint4*)p : uint4{0u, 0u, 0u, 0u};  // aligned: UBSan checks
#else
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
#endif
}

// 16-byte global load through the read-only path, cached in L1 (activations, reused by warps).
__device__ __forceinline__ uint4 gemm_ld_cached(const void* p, bool pred) {
#ifdef DLLM_EMU
    return pred ? *(const uint4*)p : uint4{0u, 0u, 0u, 0u};
#else
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
#endif
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
