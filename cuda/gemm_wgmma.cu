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
#include "gemm_common.cuh"

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

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void wg_cp_async16(uint32_t dst, const void* src, bool pred) {
    const int bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void wg_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void wg_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor: start address, LBO 16 B (unused with swizzled K-major),
// SBO 1024 B (8 rows x 128 B), base offset 0 (1024-aligned tiles), 128-byte swizzle.
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr) {
    uint64_t d = (uint64_t)((addr & 0x3FFFF) >> 4);
    d |= (uint64_t)1 << 16;
    d |= (uint64_t)(1024 >> 4) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accumulator accesses across wgmma issue / wait.
__device__ __forceinline__ void wg_fence_acc(float (&d)[96]) {
#pragma unroll
    for (int i = 0; i < 96; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D(64x192, fp32) += A(64x16, smem desc) * B(192x16, smem desc)ᵀ, both K-major, 128-byte swizzle.
__device__ __forceinline__ void wg_mma_n192(float (&d)[96], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
        "%96, %97, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(da), "l"(db), "n"(1)
        : "memory");
}

template <int WG>
__device__ __forceinline__ void gemm_wgmma_body(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W,
                                                void* C, float* __restrict__ ws, unsigned int* __restrict__ counters,
                                                int M, int N, int K, int epi, int ktiles_per_split) {
    using Cfg = WgCfg<WG>;
    extern __shared__ unsigned char wg_smem_raw[];
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
            wg_cp_async16(sa + i * Cfg::ROW_STEP * WG_ROW_BYTES, src, ok);
        }
#pragma unroll
        for (int i = 0; i < Cfg::B_PER_THREAD; ++i) {
            const bool ok = kin && ((w_ok >> i) & 1u);
            const uint16_t* src = ok ? w_src + (size_t)i * Cfg::ROW_STEP * K + koff : W;
            wg_cp_async16(sw + i * Cfg::ROW_STEP * WG_ROW_BYTES, src, ok);
        }
    };

    float acc[96];
#pragma unroll
    for (int i = 0; i < 96; ++i) acc[i] = 0.0f;

#pragma unroll
    for (int s = 0; s < Cfg::STAGES - 2; ++s) {
        if (s < k_tiles) load_stage(s, s);
        wg_cp_commit();
    }

    for (int kt = 0; kt < k_tiles; ++kt) {
        wg_cp_wait<Cfg::STAGES - 3>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const int next = kt + Cfg::STAGES - 2;
        if (next < k_tiles) load_stage(next, next % Cfg::STAGES);
        wg_cp_commit();

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
    wg_cp_wait<0>();

    if (splits > 1) {
        // Partial tiles [tile][split][e][thread] float4 (24 per thread), reduced by the last block.
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        float4* part = (float4*)ws;
        const size_t base = ((size_t)tile * splits + split) * 24;
#pragma unroll
        for (int e = 0; e < 24; ++e)
            part[(base + e) * Cfg::THREADS + tid] = make_float4(acc[4 * e], acc[4 * e + 1], acc[4 * e + 2], acc[4 * e + 3]);
        __threadfence();
        __syncthreads();
        __shared__ unsigned int s_last;
        if (tid == 0) s_last = (atomicAdd(&counters[tile], 1u) == (unsigned int)(splits - 1)) ? 1u : 0u;
        __syncthreads();
        if (s_last == 0u) return;
        __threadfence();
#pragma unroll
        for (int e = 0; e < 24; ++e) {
            float4 total = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            // Own partial read back from the workspace too (keeps register pressure low).
#pragma unroll 1
            for (int s = 0; s < splits; ++s) {
                const float4 p = __ldcg(&part[(((size_t)tile * splits + s) * 24 + e) * Cfg::THREADS + tid]);
                total.x += p.x;
                total.y += p.y;
                total.z += p.z;
                total.w += p.w;
            }
            acc[4 * e] = total.x;
            acc[4 * e + 1] = total.y;
            acc[4 * e + 2] = total.z;
            acc[4 * e + 3] = total.w;
        }
        if (tid == 0) counters[tile] = 0u;
    }

    // Accumulator layout of m64nNk16: warp w of the warpgroup owns rows 16w..16w+15; lane (g, t)
    // holds, for each 8-column block j, (row g, cols 8j+2t, +1) in acc[4j], acc[4j+1] and
    // (row g+8, same cols) in acc[4j+2], acc[4j+3].
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int row = m0 + wg * 64 + ((tid >> 5) & 3) * 16 + g;
#pragma unroll
    for (int j = 0; j < 24; ++j) {
        const int n = n0 + 8 * j + 2 * t;
        if (n < N) {
            if (row < M) gemm_store2(C, (size_t)row * N + n, acc[4 * j], acc[4 * j + 1], epi);
            if (row + 8 < M) gemm_store2(C, (size_t)(row + 8) * N + n, acc[4 * j + 2], acc[4 * j + 3], epi);
        }
    }
}

#define DLLM_WGMMA_KERNEL(WGN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128 * WGN, 1)                                                    \
        gemm_wgmma_wg##WGN(const uint16_t* __restrict__ A, const uint16_t* __restrict__ W, void* C,                \
                           float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N, int K,       \
                           int epi, int ktiles_per_split) {                                                        \
        dllm_pdl_entry();                                                                                          \
        gemm_wgmma_body<WGN>(A, W, C, ws, counters, M, N, K, epi, ktiles_per_split);                             \
    }

#else  // portable PTX: no wgmma; empty kernels with the same signature (never launched).

#define DLLM_WGMMA_KERNEL(WGN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128 * WGN, 1)                                                    \
        gemm_wgmma_wg##WGN(const uint16_t* __restrict__, const uint16_t* __restrict__, void*, float* __restrict__, \
                           unsigned int* __restrict__, int, int, int, int, int) {}

#endif

DLLM_WGMMA_KERNEL(2)
DLLM_WGMMA_KERNEL(3)
