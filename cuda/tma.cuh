// Tensor-memory-accelerator (TMA) loads (sm_90) shared by cuda/gemm_stream.cu and cuda/gemm_tma.cu:
// 2-D boxes described by a CUtensorMap (encoded on the host: src/backend/cuda/gemm_tma.rs,
// `OperandBox`), written into shared memory and signalled as transaction bytes on an mbarrier
// (cuda/mbarrier.cuh). Coordinates are (x = K element, y = row); boxes reaching past the matrix
// are zero-filled and still deliver their full byte count.
#pragma once
#include <stdint.h>
#ifdef DLLM_EMU
#include "emu/sm90_emu.h"  // the loads, emulated (multicast through a cluster launch's arenas)
#else
#include <cuda.h>

// The box at (x, y) into this block's shared memory at `dst`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
            "r"(dst),
        "l"((uint64_t)map), "r"(x), "r"(y), "r"(bar)
        : "memory");
}

// tma_load with an L2 cache policy (e.g. tma_evict_first() for data read once).
__device__ __forceinline__ void tma_load_hint(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar,
                                              uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
        "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"((uint64_t)map), "r"(x), "r"(y), "r"(bar), "l"(policy)
        : "memory");
}

// The same box written to `dst` (and signalled on the barrier at `bar`) in every block of the
// cluster named in `mask`.
__device__ __forceinline__ void tma_load_multicast(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar,
                                                   uint16_t mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
        "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"((uint64_t)map), "r"(x), "r"(y), "r"(bar), "h"(mask)
        : "memory");
}

// An L2 policy that evicts the loaded lines first (streamed weights).
__device__ __forceinline__ uint64_t tma_evict_first() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// Lets the TMA unit fetch a tensor map (a kernel parameter) ahead of its first use.
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)map) : "memory");
}
#endif  // DLLM_EMU
