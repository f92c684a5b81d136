// Hopper warpgroup-MMA helpers shared by cuda/gemm_wgmma.cu and cuda/gemm_tma.cu (sm_90a only:
// everything is inside __CUDA_ARCH_FEAT_SM90_ALL): shared-memory matrix descriptors, wgmma
// fences / commit / wait, the m64n192k16 bf16 MMA, cp.async staging through shared memory, the
// split-K reduction of a 64x192-per-warpgroup accumulator tile (through a global workspace, or
// across a cluster through distributed shared memory), and its epilogue store.
#pragma once
#include "gemm_common.cuh"

// Shared memory the epilogue's staging area needs for THREADS accumulator threads: 24 float4
// (split-K partial) or 48 float2 (old residual pairs) each (see wg_split_reduce, wg_store_tile).
template <int THREADS>
struct WgStage {
    static constexpr int BYTES = THREADS * 384;
};

// Under DLLM_EMU (the CPU emulation, cuda/emu/wgmma_emu.h) the helpers with inline PTX are emulated,
// the cluster's distributed shared memory and barrier included.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(DLLM_EMU)

// Shared-memory matrix descriptor: start address, LBO 16 B (unused with swizzled K-major),
// SBO 1024 B (8 rows x 128 B), base offset 0 (1024-aligned tiles), 128-byte swizzle.
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr) {
    uint64_t d = (uint64_t)((addr & 0x3FFFF) >> 4);
    d |= (uint64_t)1 << 16;
    d |= (uint64_t)(1024 >> 4) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}

#ifdef DLLM_EMU
#include "emu/wgmma_emu.h"
#else
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

// Named barrier `id` over `threads` threads (id 0 with every thread of the block = __syncthreads).
__device__ __forceinline__ void wg_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Every thread of every block of the cluster arrives (release) and waits for all (acquire): the
// blocks' shared-memory writes before it are visible to the others' distributed reads after it.
__device__ __forceinline__ void wg_cluster_sync() {
    asm volatile(
        "barrier.cluster.arrive.release.aligned;\n"
        "barrier.cluster.wait.acquire.aligned;\n" ::
            : "memory");
}

// mapa.shared::cluster: this block's shared-window address `addr` in cluster block `rank`.
__device__ __forceinline__ uint32_t wg_mapa(uint32_t addr, uint32_t rank) {
    uint32_t peer;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(peer) : "r"(addr), "r"(rank));
    return peer;
}
// 16 bytes from a cluster shared-memory address (wg_mapa's).
__device__ __forceinline__ float4 wg_ld_cluster128(uint32_t addr) {
    float4 p;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(p.x), "=f"(p.y), "=f"(p.z), "=f"(p.w)
                 : "r"(addr)
                 : "memory");
    return p;
}
__device__ __forceinline__ void wg_sts128(uint32_t addr, float a, float b, float c, float d) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

// Orders this thread's async-proxy shared-memory accesses (wgmma operand reads, TMA writes) with
// its generic ones (cp.async, ld/st.shared) across a following barrier.
__device__ __forceinline__ void wg_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ float4 wg_lds128(uint32_t addr) {
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr)
                 : "memory");
    return v;
}
__device__ __forceinline__ float2 wg_lds64(uint32_t addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
    return v;
}
#endif  // DLLM_EMU

// The epilogue reads global memory written by other blocks (split-K partials) or kernels (the
// residual of the add epilogue). Loaded into registers one value at a time, every load is one L2
// round trip after the previous (a loop over splits cannot be unrolled, and the compiler keeps
// the residual's loads behind earlier stores): 24 per split plus 12-24 for the residual, 15-25 us
// per launch on an H200. Instead each thread copies its values into its own slots of a shared
// staging area (the drained operand ring) with cp.async, all in flight at once, waits once, and
// reads them back: one round trip per split and one for the residual. Slots are thread-private
// (slot i of consumer thread `tid` at stage + (i * THREADS + tid) * bytes, conflict-free), so only
// reuse of the area needs a barrier. The area: WgStage<THREADS>::BYTES.

// Split-K: writes this split's partial tile ([tile][split][e][thread] float4, 24 per thread of
// the THREADS accumulator threads, which take part in named barrier `bar`) to `ws`; the last split
// of the tile to arrive sums all partials in split order into `acc` (the same bits whichever block
// is last: every partial, its own included, comes back from the workspace through the staging
// area `stage`, WgStage<THREADS>::BYTES of shared memory no thread still reads or writes), resets
// the tile's counter and returns true; the others return false.
template <int THREADS>
__device__ __forceinline__ bool wg_split_reduce(float (&acc)[96], float* __restrict__ ws,
                                                unsigned int* __restrict__ counters, int tile, int split, int splits,
                                                int tid, int bar, uint32_t stage) {
    float4* part = (float4*)ws;
    const size_t base = ((size_t)tile * splits + split) * 24;
    wg_fence_proxy_async();  // this thread's wgmma reads of the ring, before the barriers below
#pragma unroll
    for (int e = 0; e < 24; ++e)
        part[(base + e) * THREADS + tid] = make_float4(acc[4 * e], acc[4 * e + 1], acc[4 * e + 2], acc[4 * e + 3]);
    __threadfence();
    wg_bar_sync(bar, THREADS);
    DLLM_SHARED_ARRAY(unsigned int, s_last, 1, 4);
    if (tid == 0) s_last[0] = (atomicAdd(&counters[tile], 1u) == (unsigned int)(splits - 1)) ? 1u : 0u;
    wg_bar_sync(bar, THREADS);
    if (s_last[0] == 0u) return false;
    __threadfence();
#pragma unroll
    for (int i = 0; i < 96; ++i) acc[i] = 0.0f;
    const uint32_t mine = stage + (uint32_t)tid * 16u;
#pragma unroll 1
    for (int s = 0; s < splits; ++s) {
        // The slots are refilled only after this thread's reads of the previous split (the
        // barrier orders them before the asynchronous writes).
        if (s > 0) wg_bar_sync(bar, THREADS);
        const float4* src = part + ((size_t)tile * splits + s) * 24 * THREADS + tid;
        // Not unrolled: the copies need no registers but their addresses.
#pragma unroll 1
        for (int e = 0; e < 24; ++e) dllm_cp_async16(mine + (uint32_t)(e * THREADS * 16), src + (size_t)e * THREADS, true);
        dllm_cp_commit();
        dllm_cp_wait<0>();
#pragma unroll
        for (int e = 0; e < 24; ++e) {
            const float4 p = wg_lds128(mine + (uint32_t)(e * THREADS * 16));
            acc[4 * e] += p.x;
            acc[4 * e + 1] += p.y;
            acc[4 * e + 2] += p.z;
            acc[4 * e + 3] += p.w;
        }
    }
    if (tid == 0) counters[tile] = 0u;
    return true;
}

// The first of the two rows (row, row + 8) an accumulator thread `tid` holds in a tile starting at
// row m0 (warpgroup tid / 128 owns rows 64 w.., its warp 16 of them, lane (g, t) row g).
__device__ __forceinline__ int wg_thread_row(int m0, int tid) {
    return m0 + (tid >> 7) * 64 + ((tid & 127) >> 5) * 16 + ((tid & 31) >> 2);
}

// The norm fold's row scales (ep->norm.sq_in set) of an accumulator thread's rows `row`, row + 8,
// or {1, 1} without: read before the main loop, so the loads overlap the operand pipeline's fill
// instead of adding to the epilogue. The 4 lanes of a quad share the rows. Every lane of the warp
// calls it.
__device__ __forceinline__ float2 wg_row_scales(const DllmEpiParams* ep, int row, int M, int tid) {
    if (ep == nullptr || ep->norm.sq_in == nullptr) return make_float2(1.0f, 1.0f);
    const int rows[2] = {row, row + 8};
    float s[2];
    gemm_norm_row_scales<2, 4, 1>(ep->norm, rows, M, tid & 3, s);
    return make_float2(s[0], s[1]);
}

// Applies row scales `rs` (wg_row_scales) to JN column blocks `v` of the accumulator layout
// (block j: row `row` in v[4 j], v[4 j + 1], row + 8 in v[4 j + 2], v[4 j + 3]).
template <int JN>
__device__ __forceinline__ void wg_apply_row_scales(float2 rs, float* v) {
#pragma unroll
    for (int j = 0; j < JN; ++j) {
        v[4 * j] *= rs.x;
        v[4 * j + 1] *= rs.x;
        v[4 * j + 2] *= rs.y;
        v[4 * j + 3] *= rs.y;
    }
}

// Stores the 64x192 accumulator tile of one warpgroup (rows row0.., columns n0..), masked to
// M x N. Layout of m64nNk16: warp w of the warpgroup owns rows 16w..16w+15; lane (g, t) holds, for
// each 8-column block j, (row g, cols 8j+2t, +1) in acc[4j], acc[4j+1] and (row g+8, same cols) in
// acc[4j+2], acc[4j+3]. `tid` is the thread's index among the THREADS accumulator threads (named
// barrier `bar`), all of which call this. The residual add stages the 48 old value pairs of the
// thread through `stage` (WgStage<THREADS>::BYTES of shared memory that no thread of the block
// reads or writes any more once they all got here); the other epilogues only store, through
// gemm_store_pairs (column blocks in pairs: the fused SwiGLU pairs gate and up blocks, the RoPE
// epilogue the two halves of its rotation pairs).
template <int THREADS>
__device__ __forceinline__ void wg_store_tile(float (&acc)[96], void* C, int row0, int n0, int M, int N, int epi,
                                              int tid, int bar, uint32_t stage, const DllmEpiParams* ep, float2 rs) {
    const int wtid = tid & 127;
    const int lane = wtid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int row = row0 + (wtid >> 5) * 16 + g;
    if (ep != nullptr && ep->norm.sq_in != nullptr) wg_apply_row_scales<24>(rs, acc);
    if (epi == DLLM_EPI_ROPE_QKV) {
        // n0 is a multiple of 16 (192-column tiles): the column blocks pair up as gemm_store_pairs wants.
        gemm_store_pairs<24>(acc, C, row, n0 + 2 * t, 0, M, N, epi, ep);
        return;
    }
    if (epi == DLLM_EPI_ADD_F32) {
        float* out = (float*)C;
        const uint32_t mine = stage + (uint32_t)tid * 8u;
        wg_fence_proxy_async();
        wg_bar_sync(bar, THREADS);
#pragma unroll 1
        for (int j = 0; j < 24; ++j) {
            const int n = n0 + 8 * j + 2 * t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row + 8 * h;
                const bool ok = n < N && r < M;
                dllm_cp_async8(mine + (uint32_t)((2 * j + h) * THREADS * 8), ok ? out + (size_t)r * N + n : out, ok);
            }
        }
        dllm_cp_commit();
        dllm_cp_wait<0>();
#pragma unroll
        for (int j = 0; j < 24; ++j) {
            const int n = n0 + 8 * j + 2 * t;
            if (n >= N) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row + 8 * h;
                if (r >= M) continue;
                // acc becomes the new value (outside M x N it stays 0: the operands were zero-filled).
                const float2 old = wg_lds64(mine + (uint32_t)((2 * j + h) * THREADS * 8));
                acc[4 * j + 2 * h] += old.x;
                acc[4 * j + 2 * h + 1] += old.y;
                *(float2*)(out + (size_t)r * N + n) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            }
        }
        if (ep != nullptr && ep->norm.gamma != nullptr) gemm_norm_prep_pairs<24>(ep->norm, acc, row, n0 + 2 * t, M, N);
        return;
    }
#pragma unroll
    for (int j0 = 0; j0 < 24; j0 += 2) gemm_store_pairs<2>(acc, C, row, n0 + 2 * t, j0, M, N, epi);
}

// Split-K across a cluster (gemm_wgmma_wg*_cs*): the CS blocks of one output tile, one per split,
// form a cluster along z (cluster rank = split = blockIdx.z) and sum their partials through
// distributed shared memory instead of the workspace. Each block parks its partial in its own
// drained ring in wg_split_reduce's thread-private layout (float4 e of accumulator thread `tid`
// at stage + (e * THREADS + tid) * 16; THREADS * 384 bytes). The tile's 24 column blocks of 8 are
// shared out by rank: block R sums column blocks [R * JN, R * JN + JN), JN = 24 / CS, of every
// row, each thread its own fragment of them from all CS blocks in split order (peers' slots of
// the same thread through the cluster window). Starting from zero and adding split 0, 1, ... as
// wg_split_reduce does, the sums are the workspace path's bits. The second cluster barrier keeps
// every partial alive until all reads are done (no block exits or reuses its ring earlier); then
// each thread stores its JN column blocks (the residual add loads all their old values at once).
// JN even keeps the fused SwiGLU's gate/up block pairs together. Every thread of the block calls
// this; `part` is its JN column blocks' sums (compile-time indices: R is a template parameter).
template <int THREADS, int CS, int R>
__device__ __forceinline__ void wg_cluster_sum_store(uint32_t mine, void* C, int row0, int n0, int M, int N,
                                                     int epi, int tid, const DllmEpiParams* ep, float2 rs) {
    constexpr int JN = 24 / CS;
    float part[4 * JN];
#pragma unroll
    for (int i = 0; i < 4 * JN; ++i) part[i] = 0.0f;
#pragma unroll 1
    for (int s = 0; s < CS; ++s) {
        const uint32_t peer = wg_mapa(mine, (uint32_t)s);
#pragma unroll
        for (int j = 0; j < JN; ++j) {
            const float4 p = wg_ld_cluster128(peer + (uint32_t)((R * JN + j) * THREADS * 16));
            part[4 * j] += p.x;
            part[4 * j + 1] += p.y;
            part[4 * j + 2] += p.z;
            part[4 * j + 3] += p.w;
        }
    }
    // Every block's reads of the others' partials are done before any block goes on.
    wg_cluster_sync();
    const int wtid = tid & 127;
    const int row = row0 + (wtid >> 5) * 16 + ((wtid & 31) >> 2);
    if (ep != nullptr && ep->norm.sq_in != nullptr) wg_apply_row_scales<JN>(rs, part);
    gemm_store_pairs<JN>(part, C, row, n0 + 8 * R * JN + 2 * (wtid & 3), 0, M, N, epi, ep);
}

template <int WG, int CS>
__device__ __forceinline__ void wg_cluster_reduce_store(const float (&acc)[96], void* C, int m0, int n0, int M,
                                                        int N, int epi, int tid, uint32_t stage,
                                                        const DllmEpiParams* ep, float2 rs) {
    constexpr int THREADS = 128 * WG;
    static_assert(CS >= 2 && 24 % CS == 0 && (24 / CS) % 2 == 0, "whole, even column-block shares");
    // The norm fold's prep sums whole 32-column groups (4 column blocks) per share (gemm_store_pairs).
    static_assert((24 / CS) % 4 == 0, "whole 32-column groups per share");
    // Every warpgroup's wgmma reads of the ring (waited for) are ordered before the generic
    // writes below by the proxy fence and the barrier.
    wg_fence_proxy_async();
    __syncthreads();
    const uint32_t mine = stage + (uint32_t)tid * 16u;
#pragma unroll
    for (int e = 0; e < 24; ++e)
        wg_sts128(mine + (uint32_t)(e * THREADS * 16), acc[4 * e], acc[4 * e + 1], acc[4 * e + 2], acc[4 * e + 3]);
    wg_cluster_sync();
    const int row0 = m0 + (tid >> 7) * 64;
    switch (blockIdx.z) {
        case 0:
            wg_cluster_sum_store<THREADS, CS, 0>(mine, C, row0, n0, M, N, epi, tid, ep, rs);
            break;
        case 1:
            wg_cluster_sum_store<THREADS, CS, 1>(mine, C, row0, n0, M, N, epi, tid, ep, rs);
            break;
        default:
            // blockIdx.z is the rank, < CS (the host launches grid z = CS): a block past it would
            // skip the sum's closing cluster barrier and hang its peers, so it traps instead.
            if constexpr (CS > 2) {
                if (blockIdx.z == 2) {
                    wg_cluster_sum_store<THREADS, CS, (CS > 2 ? 2 : 0)>(mine, C, row0, n0, M, N, epi, tid, ep, rs);
                    break;
                }
            }
            __trap();
    }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL || DLLM_EMU
