// Shared-memory mbarrier helpers (sm_90) used by the bulk-copy / TMA kernels (cuda/gemm_stream.cu,
// cuda/gemm_tma.cu): init, a producer arrival that announces transaction bytes, a plain arrival,
// and a parity wait. Addresses are 32-bit shared-window addresses (`__cvta_generic_to_shared`).
#pragma once
#include <stdint.h>
#ifdef DLLM_EMU
#include "emu/sm90_emu.h"
#else

__device__ __forceinline__ uint32_t dllm_smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void dllm_bar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// One arrival that also announces `bytes` of asynchronous copies completing on this barrier.
__device__ __forceinline__ void dllm_bar_arrive_tx(uint32_t bar, uint32_t bytes) {
    asm volatile(
        "{\n"
        "  .reg .b64 st;\n"
        "  mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n"
        "}\n" ::"r"(bar),
        "r"(bytes)
        : "memory");
}

__device__ __forceinline__ void dllm_bar_arrive(uint32_t bar) {
    asm volatile(
        "{\n"
        "  .reg .b64 st;\n"
        "  mbarrier.arrive.shared::cta.b64 st, [%0];\n"
        "}\n" ::"r"(bar)
        : "memory");
}

// Blocks until the phase of `bar` with parity `parity` has completed. A watchdog turns a wait
// of more than ~2^28 polls (seconds; a legitimate wait is microseconds) into a trap, so a
// protocol bug fails the launch with an error instead of hanging the process.
__device__ __forceinline__ void dllm_bar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    uint32_t polls = 0;
    while (!done) {
        asm volatile(
            "{\n"
            "  .reg .pred p;\n"
            "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "  selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
        if (!done && ++polls == (1u << 28)) __trap();
    }
}
#endif  // DLLM_EMU
