// Memory-order and barrier operations of the persistent kernels (cuda/gemm_stream.cu, sm_90):
// acquire loads and a release store (CTA scope in shared memory, GPU scope in global memory), the
// async-proxy fence that makes generic-proxy writes visible to later TMA loads, the fence that
// publishes mbarrier initialisation; and a named barrier of a subset of the block's threads (also
// cuda/attention.cu's key groups).
// Under DLLM_EMU (the CPU emulation) cuda/emu/sm90_emu.h provides them.
#pragma once
#include <stdint.h>
#ifdef DLLM_EMU
#include "emu/sm90_emu.h"
#else
__device__ __forceinline__ uint32_t dllm_ld_acquire_cta(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.cta.shared::cta.u32 %0, [%1];\n"
                 : "=r"(v)
                 : "r"((uint32_t)__cvta_generic_to_shared(p))
                 : "memory");
    return v;
}
__device__ __forceinline__ unsigned dllm_ld_acquire_gpu(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void dllm_st_release_cta(uint32_t* p, uint32_t v) {
    asm volatile("st.release.cta.shared::cta.u32 [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(p)), "r"(v)
                 : "memory");
}
__device__ __forceinline__ void dllm_fence_proxy_async() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }
__device__ __forceinline__ void dllm_fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// bar.sync id, threads: the first `threads` (a multiple of 32) arrivals at barrier `id` (1..15;
// 0 is __syncthreads) release each other.
__device__ __forceinline__ void dllm_named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
#endif  // DLLM_EMU
