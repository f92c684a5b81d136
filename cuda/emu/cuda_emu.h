// CPU emulation of the CUDA execution model, enough to run dllm's plain kernels (thread and block
// indices, __syncthreads, static shared memory, warp shuffles and ballots, the bf16 conversions,
// and mma.sync m16n8k16 bf16) as host C++, so CI checks their logic without a GPU
// (tests/kernel_emulation.rs builds cuda/emu/harness.cpp with it). Not emulated, so not for
// kernels that use them: TMA, wgmma, mbarriers, clusters, cp.async, dynamic shared memory.
//
// A launch runs its blocks one after another; each block runs one OS thread per CUDA thread, so
// barriers and warp collectives behave as on the device (every lane of a warp must reach a
// collective, as CUDA requires). `__shared__` variables are function statics: one block at a time
// uses them. Speed is not the point: keep the shapes small.
#pragma once
#define DLLM_EMU 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// The vector types with the device's alignment (a misaligned 8- or 16-byte access then trips
// UBSan, as it would fault on the device).
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <class To, class From>
inline To dllm_emu_bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To t;
    std::memcpy(&t, &v, sizeof t);
    return t;
}
inline float __uint_as_float(unsigned v) { return dllm_emu_bits<float>(v); }
inline float __int_as_float(int v) { return dllm_emu_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return dllm_emu_bits<unsigned>(v); }
inline int __float_as_int(float v) { return dllm_emu_bits<int>(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
template <class T>
inline T __ldcg(const T* p) {
    return *p;
}
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
// Separately rounded double operations (the harness builds with -ffp-contract=off, so plain
// operators never fuse either).
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }

// bf16 as the device converts: round to nearest even, every NaN to the canonical 0x7fff.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = __float_as_uint(f);
    if (std::isnan(f)) return {0x7fff};
    return {(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

namespace dllm_emu {

// One warp's rendezvous: a barrier of its live lanes, their count, and a slot per lane for
// exchanges (an exited lane's slots are zero: it takes no part in a ballot).
struct Warp {
    explicit Warp(int lanes) : bar(lanes), live(lanes) {}
    std::barrier<> bar;
    std::atomic<int> live;
    uint64_t slot[32][8] = {};
};

struct Block {
    Block(int threads, size_t shared_bytes) : sync(threads), dynamic((shared_bytes + 15) / 16) {
        for (int w = 0; w * 32 < threads; ++w) warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
    }
    std::barrier<> sync;
    std::vector<std::unique_ptr<Warp>> warps;
    // The launch's dynamic shared memory (16-byte units, so 16-byte aligned).
    std::vector<uint4> dynamic;
};

inline thread_local Block* block = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;

inline void* dynamic_shared() { return block->dynamic.data(); }

// Every live lane publishes `n` words, waits for the others, reads, and waits again so no slot is
// overwritten before every lane has read it.
template <class F>
inline void exchange(const uint64_t* mine, int n, F read) {
    for (int i = 0; i < n; ++i) warp->slot[lane][i] = mine[i];
    warp->bar.arrive_and_wait();
    read(warp->slot);
    warp->bar.arrive_and_wait();
}

}  // namespace dllm_emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { dllm_emu::block->sync.arrive_and_wait(); }

template <class T>
inline T dllm_emu_shfl(T v, int src_of_lane_xor, bool is_xor) {
    static_assert(sizeof(T) <= 8, "a register");
    uint64_t mine = 0;
    std::memcpy(&mine, &v, sizeof v);
    T out{};
    dllm_emu::exchange(&mine, 1, [&](uint64_t (&slot)[32][8]) {
        const int src = is_xor ? (dllm_emu::lane ^ src_of_lane_xor) : (src_of_lane_xor & 31);
        std::memcpy(&out, &slot[src][0], sizeof out);
    });
    return out;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return dllm_emu_shfl(v, mask, true);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return dllm_emu_shfl(v, src, false);
}
inline unsigned __ballot_sync(unsigned, bool pred) {
    const uint64_t mine = pred ? 1 : 0;
    unsigned bits = 0;
    dllm_emu::exchange(&mine, 1, [&](uint64_t (&slot)[32][8]) {
        for (int l = 0; l < 32; ++l) bits |= slot[l][0] ? (1u << l) : 0u;
    });
    return bits;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX fragment layouts (lane = 4 g + t):
// A (16 x 16): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9];
// B (16 x 8): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; D (16 x 8): d0, d1 = D[g][2t, 2t+1],
// d2, d3 = D[g+8][2t, 2t+1]; the lower k of a register pair in its low 16 bits. Products summed
// in fp32 in k order (the device truncates its sums differently: compare with a tolerance).
inline void dllm_emu_mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                              uint32_t b1) {
    if (dllm_emu::warp->live.load() != 32) {
        std::fprintf(stderr, "cuda_emu: mma.sync with %d of 32 lanes live (undefined on the device)\n",
                     dllm_emu::warp->live.load());
        std::abort();
    }
    const uint64_t mine[6] = {a0, a1, a2, a3, b0, b1};
    const int g = dllm_emu::lane >> 2, t = dllm_emu::lane & 3;
    float out[4];
    dllm_emu::exchange(mine, 6, [&](uint64_t (&slot)[32][8]) {
        auto half = [](uint64_t reg, int k) { return __uint_as_float(((uint32_t)(reg >> (16 * (k & 1))) & 0xffffu) << 16); };
        auto a = [&](int row, int k) {
            const int owner = 4 * (row & 7) + ((k & 7) >> 1);
            const int reg = (row < 8 ? 0 : 1) + (k < 8 ? 0 : 2);
            return half(slot[owner][reg], k);
        };
        auto b = [&](int k, int col) {
            const int owner = 4 * col + ((k & 7) >> 1);
            return half(slot[owner][4 + (k < 8 ? 0 : 1)], k);
        };
        for (int q = 0; q < 4; ++q) {
            const int row = g + (q < 2 ? 0 : 8), col = 2 * t + (q & 1);
            float s = d[q];
            for (int k = 0; k < 16; ++k) s += a(row, k) * b(k, col);
            out[q] = s;
        }
    });
    for (int q = 0; q < 4; ++q) d[q] = out[q];
}

// Runs `kernel` (a callable that calls the kernel with its arguments) over `grid` x `block`, the
// blocks from the last to the first (a kernel that relied on launch order, or on what an earlier
// block left in shared memory, would show it; every block of the device may run in any order).
template <class F>
inline void dllm_emu_launch(dim3 grid, dim3 block, F kernel, size_t shared_bytes = 0) {
    gridDim = grid;
    blockDim = block;
    const int threads = (int)(block.x * block.y * block.z);
    for (unsigned bz = grid.z; bz-- > 0;)
        for (unsigned by = grid.y; by-- > 0;)
            for (unsigned bx = grid.x; bx-- > 0;) {
                dllm_emu::Block b(threads, shared_bytes);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (int t = 0; t < threads; ++t)
                    pool.emplace_back([&, t] {
                        threadIdx = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y,
                                     (unsigned)t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        dllm_emu::block = &b;
                        dllm_emu::warp = b.warps[t / 32].get();
                        dllm_emu::lane = t % 32;
                        kernel();
                        // A finished thread leaves its barriers, as an exited thread on the device
                        // (its slots cleared first: its drop is its arrival, no lane reads them
                        // before the next phase).
                        std::memset(dllm_emu::warp->slot[dllm_emu::lane], 0, sizeof dllm_emu::warp->slot[0]);
                        dllm_emu::warp->live.fetch_sub(1);
                        dllm_emu::warp->bar.arrive_and_drop();
                        b.sync.arrive_and_drop();
                    });
                for (auto& th : pool) th.join();
            }
}
