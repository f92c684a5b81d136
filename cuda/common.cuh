// Shared device helpers for dllm kernels: bf16 conversion, warp reductions, cp.async copies, and
// the counter-based RNG that must stay bit-identical to src/denoise/rng.rs.
#pragma once
// Under DLLM_EMU (cuda/emu/cuda_emu.h) the kernels compile as host C++: that header stands in for
// the CUDA headers and intrinsics, and the PTX-only helpers below are left out.
#ifndef DLLM_EMU
#include <cuda_bf16.h>
#endif
#include <stdint.h>

// SplitMix64 finaliser (src/denoise/rng.rs: mix64).
__device__ __forceinline__ uint64_t dllm_mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in (0, 1) with 53 random bits (src/denoise/rng.rs: uniform).
__device__ __forceinline__ double dllm_uniform(uint64_t seed, uint64_t step, uint64_t pos, uint64_t index) {
    uint64_t h = dllm_mix64(seed);
    h = dllm_mix64(h ^ step);
    h = dllm_mix64(h ^ pos);
    h = dllm_mix64(h ^ index);
    return ((double)(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// A compile-time setting the host reads from the loaded module (CudaDevice::module_int) instead of
// mirroring it in Rust: a module built with other -D values (DLLM_KERNEL_DIR) is then launched
// with the shared memory and grid its own constants need.
#ifdef DLLM_EMU
#define DLLM_MODULE_INT(symbol, value) [[maybe_unused]] static const int symbol = (value)
#else
#define DLLM_MODULE_INT(symbol, value) extern "C" __constant__ int symbol = (value)
#endif

// A kernel's dynamic shared memory (the launch's shared_mem_bytes) as `T name[]`; under DLLM_EMU
// the emulator's buffer of the block.
// DLLM_DYNAMIC_SHARED_ALIGNED declares it with that alignment (the emulator's is 1024-aligned).
// DLLM_SHARED_ARRAY declares a static shared array `T name[n]` aligned to A; under DLLM_EMU it lies
// in the block's arena (not a host static: one per block even where blocks share a process), where
// a cluster peer's mapa reaches it, at the address the block's first thread to reach the
// declaration got for it.
#ifdef DLLM_EMU
#define DLLM_SHARED_ARRAY(T, name, n, A)          \
    static char dllm_emu_site_##name;           \
    T* name = dllm_emu::static_shared<T>(&dllm_emu_site_##name, (n), (A))
#else
#define DLLM_SHARED_ARRAY(T, name, n, A) __shared__ __align__(A) T name[n]
#endif
#ifdef DLLM_EMU
#define DLLM_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(dllm_emu::dynamic_shared())
#define DLLM_DYNAMIC_SHARED_ALIGNED(T, name, A) DLLM_DYNAMIC_SHARED(T, name)
#else
#define DLLM_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#define DLLM_DYNAMIC_SHARED_ALIGNED(T, name, A) extern __shared__ __align__(A) T name[]
#endif

__device__ __forceinline__ float dllm_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float dllm_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Programmatic dependent launch (src/backend/cuda/launch.rs). `trigger` lets the next kernel in
// the stream start launching once every block of this one has executed it; `wait` blocks until
// the previous kernel in the stream has completed and its writes are visible. Both are no-ops in
// a kernel launched without the PDL attribute. Every dllm kernel runs `dllm_pdl_entry()` before
// touching memory another kernel writes, so results follow stream order exactly. The instructions
// exist from sm_90; the Ampere build (compute_80, build.rs) never launches with PDL, and there
// both are empty.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void dllm_pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void dllm_pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
#else
__device__ __forceinline__ void dllm_pdl_trigger() {}
__device__ __forceinline__ void dllm_pdl_wait() {}
#endif
__device__ __forceinline__ void dllm_pdl_entry() {
    dllm_pdl_trigger();
    dllm_pdl_wait();
}

#ifndef DLLM_EMU
// Asynchronous global -> shared copies (cp.async, sm_80+; `dst` a shared-window address): 16
// bytes through L2 only (.cg), or 8 bytes cached like a plain load (.ca); `valid` false
// zero-fills the destination and reads nothing. Committed in groups; wait_group N waits until at
// most the newest N of this thread's groups are pending.
__device__ __forceinline__ void dllm_cp_async16(uint32_t dst, const void* src, bool valid) {
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void dllm_cp_async8(uint32_t dst, const void* src, bool valid) {
    const int bytes = valid ? 8 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void dllm_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void dllm_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif
