// Helpers shared by the GEMM kernels (cuda/gemm.cu, cuda/gemm_wgmma.cu, cuda/gemm_stream.cu):
// epilogue codes, bf16 conversion, the element / pair stores of the three epilogues, and the
// m16n8k16 bf16 mma.sync.
#pragma once
#include "common.cuh"

#define DLLM_EPI_STORE_BF16 0
#define DLLM_EPI_STORE_F32 1
#define DLLM_EPI_ADD_F32 2
// SwiGLU fused into the gate/up projection: W's rows come in groups of 16, 8 gate rows then the
// 8 matching up rows (src/backend/cuda/swiglu_layout.rs), so output column 16 b + i (gate) and
// 16 b + 8 + i (up) meet in one thread; C is bf16 [M, N / 2] with C[m, 8 b + i] =
// silu(gate) * up, computed in fp32 from the unrounded accumulators. Only the tiled kernels
// (skinny, stream, wide, wgmma, TMA) implement it, through the two helpers below.
#define DLLM_EPI_SWIGLU_BF16 3
// RoPE and the K/V cache write fused into the QKV projection (the stream, wgmma and TMA kernels;
// src/backend/cuda/rope_layout.rs): W's q and k rows come per head in groups of 16, 8 rows of the
// head's first half then the 8 matching rows of its second half, so the two columns of a rotation
// pair, 16 b + i and 16 b + 8 + i, meet in one thread as the SwiGLU's gate and up do. C is the bf16
// [M, N] QKV activation: q and k columns rotated (the half-split RoPE of the original rows), v
// columns plain, the bias (if any) added first; k and v also written to the caches. q·k is a sum
// over the head dimension, so the permuted q and k heads give the same attention.
#define DLLM_EPI_ROPE_QKV 4

__device__ __forceinline__ float gemm_silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ float gemm_bf16_to_f32(uint16_t b) { return __uint_as_float(((uint32_t)b) << 16); }

__device__ __forceinline__ uint16_t gemm_f32_to_bf16(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// The RoPE epilogue's parameters (a kernel parameter; layout mirrored by RopeEpi in
// src/backend/cuda/gemm_rope.rs). Row r of C has position pos = pos_offset + r % pos_period; table
// holds (cos, sin) of pos * inv_freq[i] for i < head_dim / 2 at [pos * head_dim / 2 + i] (the
// arithmetic of rope_qkv_bf16). With k_cache set, the k and v columns of row r also go to row
// (r / pos_period) * cache_seq_rows + pos of k_cache / v_cache (v_col - q_cols wide).
struct DllmRopeEpi {
    const float2* table;
    const float* bias;
    uint16_t* k_cache;
    uint16_t* v_cache;
    int q_cols;  // q columns [0, q_cols), k [q_cols, v_col), v [v_col, N)
    int v_col;
    int head_dim;
    int pos_period;
    int pos_offset;
    int cache_seq_rows;
};

// The RMSNorm fold (src/backend/cuda/gemm_norm.rs; a kernel parameter, layout mirrored by NormEpi
// there). rmsnorm(x) · Wᵀ = inv_rms(x) ⊙ ((x ⊙ γ) · Wᵀ): the norm's per-column part commutes with the
// next GEMM, its per-row part with that GEMM's output. So the GEMM that updates the residual x
// (DLLM_EPI_ADD_F32, "prep": gamma set) also writes xg[m, n] = bf16(x_new[m, n] · gamma[n]) and, per
// row and 32-column group, the sum of squares of x_new into sq_out[m · N / 32 + n / 32]; the next GEMM
// takes xg as its A operand and ("row scale": sq_in set) multiplies its row m by
// 1 / sqrt(Σ_p sq_in[m · parts + p] / d + eps) before its own epilogue (bias, RoPE, SwiGLU, store).
// 63 of the 64 RMSNorm launches inside a step's layers go. N (prep) and d (scale) are multiples of 32.
struct DllmNormEpi {
    const float* sq_in;  // row scale: [M, parts] partial sums of squares (nullptr: no scale)
    const float* gamma;  // prep: [N] the next norm's weight (nullptr: no prep)
    uint16_t* xg;        // prep: [M, N] bf16(x_new · gamma)
    float* sq_out;       // prep: [M, N / 32] partial sums of squares of x_new
    int parts;           // row scale: partials per row (d / 32)
    int d;               // row scale: the normalised width
    float eps;
    int pad;
};

// Everything an epilogue may need besides C: the RoPE epilogue's parameters and the norm fold's.
struct DllmEpiParams {
    DllmRopeEpi rope;
    DllmNormEpi norm;
};

// The row scale from a row's total sum of squares (the RMSNorm kernel's arithmetic).
__device__ __forceinline__ float gemm_norm_scale(const DllmNormEpi& e, float total) {
    return 1.0f / sqrtf(total / (float)e.d + e.eps);
}

// The row scales of ROWS rows m[r] (rows past M read nothing) for LANES lanes that share those rows,
// xor-adjacent at lane stride STRIDE (LANES a power of two; `sub` = this lane's index among them):
// each lane sums its share of every row's partials (a contiguous run of float4s where the count
// allows, else p = sub, sub + LANES, ...; all rows' loads in flight at once), the xor tree
// combines the lanes' sums in a fixed order (the same bits in
// every lane and run). The loads bypass L1 (__ldcg): in the layer tail the sums were written by other
// blocks earlier in the same launch. Every lane of the warp calls it.
template <int ROWS, int LANES, int STRIDE>
__device__ __forceinline__ void gemm_norm_row_scales(const DllmNormEpi& e, const int (&m)[ROWS], int M, int sub,
                                                     float (&out)[ROWS]) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) out[r] = 0.0f;
    if (e.parts % (4 * LANES) == 0 && ((uintptr_t)e.sq_in & 15u) == 0) {
        // Whole float4s (LLaDA-8B: 128 partials, 4 float4s per lane and row in the stream kernel):
        // each lane sums its contiguous share of each row, every row's loads in flight at once.
        const int quads = e.parts / (4 * LANES);
#pragma unroll 4
        for (int i = 0; i < quads; ++i)
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                if (m[r] < M) {
                    const float4 v = __ldcg((const float4*)(e.sq_in + (size_t)m[r] * e.parts) + sub * quads + i);
                    out[r] += (v.x + v.y) + (v.z + v.w);
                }
    } else {
#pragma unroll 4
        for (int p = sub; p < e.parts; p += LANES)
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                if (m[r] < M) out[r] += __ldcg(e.sq_in + (size_t)m[r] * e.parts + p);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int o = STRIDE; o < STRIDE * LANES; o <<= 1) out[r] += __shfl_xor_sync(0xffffffffu, out[r], o);
        out[r] = gemm_norm_scale(e, out[r]);
    }
}

// One RoPE rotation pair: column n (n % 16 < 8) of row `row` with value x0 and
// column n + 8 with x1 (accumulators, unrounded).
__device__ __forceinline__ void gemm_rope_pair(const DllmRopeEpi& e, void* C, int M, int N, int row, int n, float x0,
                                               float x1) {
    if (row >= M || n >= N) return;
    if (e.bias != nullptr) {
        x0 += e.bias[n];
        x1 += e.bias[n + 8];
    }
    const int pos = e.pos_offset + row % e.pos_period;
    if (n < e.v_col) {
        const int c = n % e.head_dim;  // q and k heads start at multiples of head_dim
        const float2 cs = e.table[(size_t)pos * (e.head_dim >> 1) + ((c >> 4) << 3) + (c & 7)];
        const float r0 = x0 * cs.x - x1 * cs.y;
        const float r1 = x1 * cs.x + x0 * cs.y;
        x0 = r0;
        x1 = r1;
    }
    const uint16_t b0 = gemm_f32_to_bf16(x0), b1 = gemm_f32_to_bf16(x1);
    uint16_t* out = (uint16_t*)C + (size_t)row * N + n;
    out[0] = b0;
    out[8] = b1;
    if (e.k_cache != nullptr && n >= e.q_cols) {
        const size_t crow = ((size_t)(row / e.pos_period) * e.cache_seq_rows + pos) * (size_t)(e.v_col - e.q_cols);
        uint16_t* dst = n < e.v_col ? e.k_cache + crow + (n - e.q_cols) : e.v_cache + crow + (n - e.v_col);
        dst[0] = b0;
        dst[8] = b1;
    }
}

// Writes one output element according to one of the three plain epilogues (any other code, such
// as the fused SwiGLU, which these element stores cannot do, writes nothing).
__device__ __forceinline__ void gemm_store1(void* C, size_t idx, float v, int epi) {
    if (epi == DLLM_EPI_STORE_BF16) {
        ((uint16_t*)C)[idx] = gemm_f32_to_bf16(v);
    } else if (epi == DLLM_EPI_STORE_F32) {
        ((float*)C)[idx] = v;
    } else if (epi == DLLM_EPI_ADD_F32) {
        ((float*)C)[idx] += v;
    }
}

// Writes two adjacent output elements (idx even, so the pair is 4/8-byte aligned) for the two
// plain stores; gemm_store_pairs does the residual add (batched) and the fused SwiGLU itself.
__device__ __forceinline__ void gemm_store2(void* C, size_t idx, float v0, float v1, int epi) {
    if (epi == DLLM_EPI_STORE_BF16) {
        uint32_t packed = (uint32_t)gemm_f32_to_bf16(v0) | ((uint32_t)gemm_f32_to_bf16(v1) << 16);
        *(uint32_t*)((uint16_t*)C + idx) = packed;
    } else if (epi == DLLM_EPI_STORE_F32) {
        *(float2*)((float*)C + idx) = make_float2(v0, v1);
    }
}

// The residual add (DLLM_EPI_ADD_F32) is a read-modify-write of C. Written one element at a
// time, each load waits for the previous store: the compiler cannot prove two computed C
// addresses distinct, so it keeps every load after every earlier store, and a thread's 32-48
// adds become as many serial L2 round trips (~20-30 us per GEMM on an H200, more than the whole
// weight stream of the 33 MB attention-output projection). The helpers below load a whole batch
// of old values first, then store: one round trip per batch.

// A compiler barrier: keeps the batch's loads ahead of its stores (left alone, the optimiser
// sinks each load next to the store that uses it, back to one round trip per element).
__device__ __forceinline__ void gemm_loads_before_stores() { asm volatile("" ::: "memory"); }

// Calls f(r, j, q, m, n) for every element of a skinny / stream warp's fragments
// (acc[r][j][q]: weight row n = rbase + 16 r + g, + 8 when q >= 2; token m = 8 j + 2 t + (q & 1)),
// fully unrolled so that the indices into register arrays stay constants.
template <int RT, int G, class F>
__device__ __forceinline__ void gemm_for_fragments(int rbase, int g, int t, F f) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int j = 0; j < G; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) f(r, j, q, 8 * j + 2 * t + (q & 1), rbase + 16 * r + g + ((q < 2) ? 0 : 8));
}

// The norm fold's prep (DllmNormEpi) for a stream warp's fragments with their new residual values
// `v` (layout as in gemm_for_fragments; RT = 2, so the warp's 32 weight rows rbase.. are one
// 32-column group of the output): xg, and per token the group's sum of squares, summed in the
// thread (r, then q) and across the 8 lanes of the group (xor over g), stored by lane g = 0. Every
// lane of the warp calls it (the shuffles), with rbase a multiple of 32 and N of 32.
template <int RT, int G>
__device__ __forceinline__ void gemm_norm_prep_fragments(const DllmNormEpi& e, const float (&v)[RT][G][4], int rbase,
                                                         int g, int t, int M, int N) {
    static_assert(RT == 2, "a 32-column group per warp");
    gemm_for_fragments<RT, G>(rbase, g, t, [&](int r, int j, int q, int m, int n) {
        if (m < M && n < N) {
            const uint16_t b = gemm_f32_to_bf16(v[r][j][q] * e.gamma[n]);
            e.xg[(size_t)m * N + n] = b;
        }
    });
#pragma unroll
    for (int j = 0; j < G; ++j)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            float s = 0.0f;
#pragma unroll
            for (int r = 0; r < RT; ++r) s += v[r][j][b] * v[r][j][b] + v[r][j][b + 2] * v[r][j][b + 2];
            s += __shfl_xor_sync(0xffffffffu, s, 4);
            s += __shfl_xor_sync(0xffffffffu, s, 8);
            s += __shfl_xor_sync(0xffffffffu, s, 16);
            const int m = 8 * j + 2 * t + b;
            if (g == 0 && m < M && rbase < N) e.sq_out[(size_t)m * (N / 32) + rbase / 32] = s;
        }
}

// The fragments of a skinny / stream warp (layout as in gemm_for_fragments), masked to M x N,
// stored with epilogue `epi`; `ep` (nullable) holds the RoPE epilogue's parameters and the norm
// fold's (prep with the residual add: every lane of the warp then calls this, RT = 2).
template <int RT, int G>
__device__ __forceinline__ void gemm_store_fragments(const float (&acc)[RT][G][4], void* C, int rbase, int g, int t,
                                                     int M, int N, int epi, const DllmEpiParams* ep = nullptr) {
    if (epi == DLLM_EPI_ROPE_QKV) {
        // As the SwiGLU: rows rbase + 16 r + g (q < 2) and + 8 (q + 2) are one rotation pair.
        if (ep == nullptr) return;
        gemm_for_fragments<RT, G>(rbase, g, t, [&](int r, int j, int q, int m, int n) {
            if (q < 2) gemm_rope_pair(ep->rope, C, M, N, m, n, acc[r][j][q], acc[r][j][q + 2]);
        });
        return;
    }
    if (epi == DLLM_EPI_SWIGLU_BF16) {
        // rbase is a multiple of 16: rows rbase + 16 r + g (gate, q < 2) and + 8 (up, q + 2)
        // form one pair, output column (rbase + 16 r) / 2 + g of an N / 2-wide C.
        uint16_t* out = (uint16_t*)C;
        const int half = N / 2;
        gemm_for_fragments<RT, G>(rbase, g, t, [&](int r, int j, int q, int m, int n) {
            if (q < 2 && m < M && n < N)
                out[(size_t)m * half + (rbase + 16 * r) / 2 + g] =
                    gemm_f32_to_bf16(gemm_silu_mul(acc[r][j][q], acc[r][j][q + 2]));
        });
        return;
    }
    if (epi == DLLM_EPI_ADD_F32) {
        float* out = (float*)C;
        float old[RT][G][4];
        gemm_for_fragments<RT, G>(rbase, g, t, [&](int r, int j, int q, int m, int n) {
            old[r][j][q] = (m < M && n < N) ? out[(size_t)m * N + n] : 0.0f;
        });
        gemm_loads_before_stores();
        gemm_for_fragments<RT, G>(rbase, g, t, [&](int r, int j, int q, int m, int n) {
            old[r][j][q] += acc[r][j][q];
            if (m < M && n < N) out[(size_t)m * N + n] = old[r][j][q];
        });
        if constexpr (RT == 2) {
            if (ep != nullptr && ep->norm.gamma != nullptr) gemm_norm_prep_fragments<RT, G>(ep->norm, old, rbase, g, t, M, N);
        }
        return;
    }
    gemm_for_fragments<RT, G>(rbase, g, t, [&](int r, int j, int q, int m, int n) {
        if (m < M && n < N) gemm_store1(C, (size_t)m * N + n, acc[r][j][q], epi);
    });
}

// The norm fold's prep (DllmNormEpi) for BATCH column blocks of an mma.sync / wgmma accumulator
// layout with their new residual values: block j holds (row, cols n + 8 j, + 1) in nv[4 j],
// nv[4 j + 1] and (row + 8, same cols) in nv[4 j + 2], nv[4 j + 3], n = n_first (= the group base
// + 2 t, the group base a multiple of 32). Writes xg, and per row and 32-column group (4 column
// blocks x the 4 lanes of a quad) the sum of squares, summed in the thread (blocks in order) and
// across the quad (xor over t), stored by lane t = 0. Every lane of the warp calls it.
template <int BATCH>
__device__ __forceinline__ void gemm_norm_prep_pairs(const DllmNormEpi& e, const float* nv, int row, int n_first,
                                                     int M, int N) {
    static_assert(BATCH % 4 == 0, "whole 32-column groups");
    const int t2 = n_first & 7;  // 2 t
#pragma unroll
    for (int q = 0; q < BATCH / 4; ++q) {
        const int n_group = n_first - t2 + 32 * q;  // the group's first column
        const bool in_n = n_group < N;              // N % 32 == 0: the whole group, or none of it
        float s[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 4 * q; j < 4 * q + 4; ++j) {
            const int n = n_first + 8 * j;
            const float2 gm = in_n ? *(const float2*)(e.gamma + n) : make_float2(0.0f, 0.0f);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float a = nv[4 * j + 2 * h], b = nv[4 * j + 2 * h + 1];
                s[h] += a * a + b * b;
                if (in_n && row + 8 * h < M)
                    *(uint32_t*)(e.xg + (size_t)(row + 8 * h) * N + n) =
                        (uint32_t)gemm_f32_to_bf16(a * gm.x) | ((uint32_t)gemm_f32_to_bf16(b * gm.y) << 16);
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            s[h] += __shfl_xor_sync(0xffffffffu, s[h], 1);
            s[h] += __shfl_xor_sync(0xffffffffu, s[h], 2);
            if (t2 == 0 && in_n && row + 8 * h < M) e.sq_out[(size_t)(row + 8 * h) * (N / 32) + n_group / 32] = s[h];
        }
        // One group's gamma loads at a time (left alone, the compiler hoists all of them).
        gemm_loads_before_stores();
    }
}

// Pair stores of an mma.sync / wgmma accumulator layout, BATCH column blocks at a time: block j
// holds (row, cols n0 + 8 j + 2 t, +1) in v[4 j], v[4 j + 1] and (row + 8, same cols) in
// v[4 j + 2], v[4 j + 3] for j in [j0, j0 + BATCH). Masked to M x N (N even, so a pair is either
// inside or past N). For the residual add, the batch's old values are all loaded before any store.
// The RoPE epilogue (block pairs, as the SwiGLU's) needs `ep`: without it nothing is written.
template <int BATCH>
__device__ __forceinline__ void gemm_store_pairs(const float* v, void* C, int row, int n0, int j0, int M, int N,
                                                 int epi, const DllmEpiParams* ep = nullptr) {
    if (epi == DLLM_EPI_ROPE_QKV) {
        // n0 - 2 t + 8 j0 a multiple of 16 (the callers' tiles and cluster shares start so): block
        // j (even) holds the first halves of its group's rotation pairs, block j + 1 the second.
        static_assert(BATCH % 2 == 0, "RoPE pairs need an even batch");
        if (ep == nullptr) return;
#pragma unroll
        for (int j = 0; j < BATCH; j += 2)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int b = 0; b < 2; ++b)
                    gemm_rope_pair(ep->rope, C, M, N, row + 8 * h, n0 + 8 * (j0 + j) + b, v[4 * (j0 + j) + 2 * h + b],
                                   v[4 * (j0 + j + 1) + 2 * h + b]);
        return;
    }
    if (epi == DLLM_EPI_SWIGLU_BF16) {
        // n0 - 2 t and j0 even: block j (gate) pairs with block j + 1 (up); the pair's two
        // columns land at (n - 2 t) / 2 + 2 t, + 1 of an N / 2-wide C.
        static_assert(BATCH % 2 == 0, "SwiGLU pairs need an even batch");
        uint32_t* out = (uint32_t*)C;
        const int half = N / 2;
#pragma unroll
        for (int j = 0; j < BATCH; j += 2) {
            const int n = n0 + 8 * (j0 + j);  // gate column of this thread (+1 beside it)
            if (n >= N) continue;
            const int t2 = n & 7;             // 2 t
            const int col = (n - t2) / 2 + t2;
            const float* gv = v + 4 * (j0 + j);
            const float* uv = v + 4 * (j0 + j + 1);
            if (row < M)
                out[((size_t)row * half + col) / 2] = (uint32_t)gemm_f32_to_bf16(gemm_silu_mul(gv[0], uv[0])) |
                                                      ((uint32_t)gemm_f32_to_bf16(gemm_silu_mul(gv[1], uv[1])) << 16);
            if (row + 8 < M)
                out[((size_t)(row + 8) * half + col) / 2] =
                    (uint32_t)gemm_f32_to_bf16(gemm_silu_mul(gv[2], uv[2])) |
                    ((uint32_t)gemm_f32_to_bf16(gemm_silu_mul(gv[3], uv[3])) << 16);
        }
        return;
    }
    if (epi == DLLM_EPI_ADD_F32) {
        float2* out = (float2*)C;
        float2 old[BATCH][2];
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const int n = n0 + 8 * (j0 + j);
            const bool in_n = n < N;
            old[j][0] = (in_n && row < M) ? out[((size_t)row * N + n) / 2] : make_float2(0.0f, 0.0f);
            old[j][1] = (in_n && row + 8 < M) ? out[((size_t)(row + 8) * N + n) / 2] : make_float2(0.0f, 0.0f);
        }
        gemm_loads_before_stores();
        float nv[4 * BATCH];  // the new values, in v's layout (for the norm fold's prep)
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const int n = n0 + 8 * (j0 + j);
            const float* a = v + 4 * (j0 + j);
            nv[4 * j] = old[j][0].x + a[0];
            nv[4 * j + 1] = old[j][0].y + a[1];
            nv[4 * j + 2] = old[j][1].x + a[2];
            nv[4 * j + 3] = old[j][1].y + a[3];
            if (n >= N) continue;
            if (row < M) out[((size_t)row * N + n) / 2] = make_float2(nv[4 * j], nv[4 * j + 1]);
            if (row + 8 < M) out[((size_t)(row + 8) * N + n) / 2] = make_float2(nv[4 * j + 2], nv[4 * j + 3]);
        }
        // The prep needs whole 32-column groups: the cluster split's shares (12 or 8 blocks; its
        // kernels assert it) pass ep, the plain pair stores (BATCH 2, 4) never do.
        if constexpr (BATCH % 4 == 0) {
            if (ep != nullptr && ep->norm.gamma != nullptr)
                gemm_norm_prep_pairs<BATCH>(ep->norm, nv, row, n0 + 8 * j0, M, N);
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
        const int n = n0 + 8 * (j0 + j);
        if (n >= N) continue;
        const float* a = v + 4 * (j0 + j);
        if (row < M) gemm_store2(C, (size_t)row * N + n, a[0], a[1], epi);
        if (row + 8 < M) gemm_store2(C, (size_t)(row + 8) * N + n, a[2], a[3], epi);
    }
}

// D = A(16x16, row) * B(16x8, col) + D, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void gemm_mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
#ifdef DLLM_EMU
    dllm_emu_mma_bf16(d, a0, a1, a2, a3, b0, b1);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
