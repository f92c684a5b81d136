// dllm GEMM kernels: C[M, N] = A[M, K] · Wᵀ with A bf16 row-major [M, K], W bf16 row-major
// [N, K] (PyTorch Linear layout), fp32 accumulation and three epilogues (store bf16, store fp32,
// add into fp32). Host side: src/backend/cuda/gemm.rs; design notes: docs/gemm-notes.md.
//
// Kernels (all take `void* C` and an `epi` code, see DLLM_EPI_*):
//   gemm_naive          one thread per output, fp32 FMA loop: the always-correct reference.
//   gemm_skinny_mg<G>   M <= 8*G (G = 1..8): weight-streaming GEMV-like kernel on mma.sync.
//   gemm_skinny2_mg<G>  M <= 8*G (G = 1..4): the same with 32 weight rows per warp (less A traffic).
//   gemm_wide           128x128x32 block tiles, cp.async 4-stage pipeline, ldmatrix + mma.sync.
// The skinny body lives in cuda/gemm_skinny.cuh (the grouped expert GEMM, cuda/gemm_grouped.cu,
// runs it too).
//
// Preconditions (checked on the host): K % 8 == 0, N % 8 == 0, A/W 16-byte aligned, C 8-byte
// aligned. bf16 values travel as raw uint16 bits.
#include "gemm_skinny.cuh"

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
// The skinny kernels: gemm_skinny_body (cuda/gemm_skinny.cuh) with one or two 16-row tiles per warp.

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
#ifdef DLLM_EMU
    dllm_emu_ldmatrix_x4(r, addr, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
#endif
}

extern "C" __global__ void __launch_bounds__(WIDE_THREADS, 2)
    gemm_wide(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C, float* __restrict__ ws,
              unsigned int* __restrict__ counters, int M, int N, int K, int epi, int ktiles_per_split) {
    dllm_pdl_entry();
    DLLM_DYNAMIC_SHARED_ALIGNED(unsigned char, gemm_smem, 128);
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
