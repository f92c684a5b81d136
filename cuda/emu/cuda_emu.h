// CPU emulation of the CUDA execution model, enough to run dllm's kernels as host C++ (thread and
// block indices, __syncthreads and named barriers, static and dynamic shared memory with its
// 32-bit window addresses, warp shuffles and ballots, the bf16 conversions, mma.sync m16n8k16,
// ldmatrix, cp.async; cuda/emu/sm90_emu.h adds mbarriers, TMA boxes (multicast too) and the memory
// order operations, cuda/emu/wgmma_emu.h wgmma and the cluster helpers), so CI checks their logic
// without a GPU: the harnesses of tests/*_emulation.rs, and the mock driver cuda/emu/libcuda_emu.cpp
// under which the whole CUDA backend runs (tests/emulated_driver.rs).
//
// Each block runs one OS thread per CUDA thread (the default: barriers and warp collectives behave
// as on the device, and ThreadSanitizer sees the kernels' races), or with DLLM_EMU_FIBERS one
// cooperative fiber per CUDA thread on one OS thread (cuda/emu/fibers.h: far faster, no races).
// Every lane of a warp must reach a collective, as CUDA requires. `__shared__` variables are
// function statics and the dynamic shared memory one static arena, so one block per process uses
// them: dllm_emu_launch runs the blocks one after another, dllm_emu_launch_concurrent runs every
// block at once, each in its own forked process (shared memory private to it, global memory the
// MAP_SHARED buffers of dllm_emu::device_buffer), as a persistent kernel's grid barrier and a
// cluster's distributed shared memory need.
#pragma once
#define DLLM_EMU 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif
#if defined(DLLM_EMU_FIBERS)
#include "fibers.h"
// Per CUDA thread: thread_local in the thread mode; in the fiber mode plain globals that each
// fiber swaps in when it runs (fibers::fiber_local).
#define DLLM_EMU_TLS
#define DLLM_EMU_FIBER_LOCAL(var) \
    inline const bool dllm_emu_fiber_local_##var = dllm_emu::fibers::fiber_local(var)
#else
#define DLLM_EMU_TLS thread_local
#define DLLM_EMU_FIBER_LOCAL(var) static_assert(true, "")
#endif
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __grid_constant__
#define __cluster_dims__(...)
#define __align__(n) __attribute__((aligned(n)))

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
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.bits << 16); }
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
// The device's fast exponential is an approximation; the emulation's is exact (compare with a
// tolerance).
inline float __expf(float x) { return std::exp(x); }

namespace dllm_emu {

// Lets other CUDA threads run: an OS yield in the thread mode, a fiber switch in the fiber mode.
inline void relax() {
#if defined(DLLM_EMU_FIBERS)
    fibers::yield();
#else
    std::this_thread::yield();
#endif
}

#if defined(DLLM_EMU_FIBERS)
// std::barrier's arrive_and_wait / arrive_and_drop for fibers: waiting switches fibers.
class EmuBarrier {
  public:
    explicit EmuBarrier(std::ptrdiff_t expected) : expected_(expected) {}
    void arrive_and_wait();
    void arrive_and_drop() {
        --expected_;
        if (count_ > 0 && count_ == expected_) complete();
    }

  private:
    void complete() {
        count_ = 0;
        ++generation_;
    }
    std::ptrdiff_t expected_, count_ = 0;
    uint64_t generation_ = 0;
};
#else
using EmuBarrier = std::barrier<>;
#endif

// One warp's rendezvous: a barrier of its live lanes, their count, and a slot per lane for
// exchanges (an exited lane's slots are zero: it takes no part in a ballot).
struct Warp {
    explicit Warp(int lanes) : bar(lanes), live(lanes) {}
    EmuBarrier bar;
    std::atomic<int> live;
    uint64_t slot[32][8] = {};
};

// The dynamic shared memory of the running block (one block per process at a time), 1024-byte
// aligned as the device's shared window, and the base of the emulated 32-bit shared addresses:
// one of kClusterSlots arenas of a static space (slot 0, except in a cluster launch, which makes
// the space shared between its forked blocks and gives block b slot b, so that a cluster's
// blocks reach each other's arenas: distributed shared memory).
constexpr size_t kSharedArenaBytes = 256 * 1024;
constexpr int kClusterSlots = 256;
// Where a block's dynamic shared memory starts in its arena: 128-byte aligned (the most any kernel
// declares) but not 1024, since on the device static shared memory comes first: a kernel that
// needs a 1024-aligned ring must align it up itself.
constexpr size_t kDynamicOffset = 128;
// The arena's last bytes: the static shared arrays of DLLM_SHARED_ARRAY (static_shared).
constexpr size_t kStaticSharedBytes = 4096;
constexpr size_t kMaxDynamicShared = kSharedArenaBytes - kDynamicOffset - kStaticSharedBytes;
alignas(4096) inline unsigned char shared_space[kClusterSlots * kSharedArenaBytes];
inline unsigned char* shared_arena = shared_space;

// A named barrier (bar.sync id, count): its participant count is fixed by its first use.
struct NamedBarrier {
    std::atomic<int> count{0};
    std::unique_ptr<EmuBarrier> bar;
};

struct Block {
    Block(int threads, size_t shared_bytes) : sync(threads) {
        for (int w = 0; w * 32 < threads; ++w) warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
        if (shared_bytes > kMaxDynamicShared) {
            std::fprintf(stderr, "cuda_emu: %zu bytes of dynamic shared memory (at most %zu)\n", shared_bytes,
                         kMaxDynamicShared);
            std::abort();
        }
#if defined(__SANITIZE_ADDRESS__)
        ASAN_UNPOISON_MEMORY_REGION(shared_arena, kSharedArenaBytes);
#endif
        // Uninitialised shared memory reads as NaN-like bf16 / f32 garbage, not as zeros.
        std::memset(shared_arena + kDynamicOffset, 0xff, shared_bytes);
        std::memset(shared_arena + kSharedArenaBytes - kStaticSharedBytes, 0xff, kStaticSharedBytes);
#if defined(__SANITIZE_ADDRESS__)
        // Past the launch's dynamic shared memory (and before it) is out of bounds, as on the device.
        ASAN_POISON_MEMORY_REGION(shared_arena, kDynamicOffset);
        ASAN_POISON_MEMORY_REGION(shared_arena + kDynamicOffset + shared_bytes, kMaxDynamicShared - shared_bytes);
#endif
    }
    EmuBarrier sync;
    std::vector<std::unique_ptr<Warp>> warps;
    std::mutex named_lock;
    NamedBarrier named[16];
};

inline DLLM_EMU_TLS Block* block = nullptr;
inline DLLM_EMU_TLS Warp* warp = nullptr;
inline DLLM_EMU_TLS int lane = 0;
DLLM_EMU_FIBER_LOCAL(block);
DLLM_EMU_FIBER_LOCAL(warp);
DLLM_EMU_FIBER_LOCAL(lane);

inline void* dynamic_shared() { return shared_arena + kDynamicOffset; }


[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::abort();
}

// The kernels' static shared arrays that cluster peers reach (DLLM_SHARED_ARRAY): the last
// kStaticSharedBytes of the arena, handed out in declaration order; every thread of the block
// declares the same arrays in the same order, so each gets the same addresses. Each declaration
// must run once per thread (at the top of the kernel, not in a loop or a helper called twice:
// there it would get a second address, where the device has one).
inline DLLM_EMU_TLS size_t static_shared_used = 0;
DLLM_EMU_FIBER_LOCAL(static_shared_used);
template <class T>
inline T* static_shared(size_t n, size_t align) {
    const size_t start = (static_shared_used + align - 1) / align * align;
    if (start + n * sizeof(T) > kStaticSharedBytes) fail("static shared arrays past kStaticSharedBytes");
    static_shared_used = start + n * sizeof(T);
    return reinterpret_cast<T*>(shared_arena + kSharedArenaBytes - kStaticSharedBytes + start);
}

// Polls until `done()`, yielding; a wait of more than a minute is a deadlock and fails the run.
template <class F>
inline void poll(const char* what, F done) {
    // The clock only now and then (reading it costs more than a fiber switch): the minute is
    // counted from the 1024th spin.
    std::chrono::steady_clock::time_point start{};
    for (uint64_t spins = 1; !done(); ++spins) {
        relax();
        if ((spins & 1023) == 0) {
            const auto now = std::chrono::steady_clock::now();
            if (spins == 1024) start = now;
            else if (now - start > std::chrono::seconds(60)) fail(what);
        }
    }
}

#if defined(DLLM_EMU_FIBERS)
inline void EmuBarrier::arrive_and_wait() {
    const uint64_t generation = generation_;
    if (++count_ == expected_) {
        complete();
        return;
    }
    poll("a barrier: no completion within a minute (a thread never arrived)",
         [&] { return generation_ != generation; });
}
#endif

// Whether DLLM_EMU_ASYNC names `mode` (read once): which asynchronous operations complete at
// issue instead of at their wait ("early": cp.async copies; "wgmma-early": wgmma operand reads).
inline bool async_mode_is(const char* mode) {
    static const std::string value = [] {
        const char* v = std::getenv("DLLM_EMU_ASYNC");
        return std::string(v ? v : "");
    }();
    return value == mode;
}

// A shared-window address (`__cvta_generic_to_shared`) back to a pointer. Addresses are offsets
// from the arena, taken modulo 2^32 (the statics of `__shared__` lie within +-2 GB of it).
inline unsigned char* shared_at(uint32_t addr) { return shared_arena + (int64_t)(int32_t)addr; }

// A random pause at the points where threads of different warps or blocks meet (atomics, fences,
// mbarrier operations): half the time a yield, one time in eight a sleep of up to 100 us, so that
// the interleavings a real device produces (a block that arrives last, a partial read before it
// is written) show up in a few runs instead of never.
inline void jitter() {
#if defined(DLLM_EMU_FIBERS)
    // One thread runs at a time: switching here is what lets the others interleave.
    relax();
    return;
#endif
    thread_local uint64_t state = 0;
    if (state == 0)
        state = (uint64_t)std::hash<std::thread::id>{}(std::this_thread::get_id()) ^
                (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count() ^ 0x9E3779B97F4A7C15ull;
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    if ((state & 7) == 0)
        std::this_thread::sleep_for(std::chrono::microseconds((state >> 8) % 100));
    else if (state & 1)
        std::this_thread::yield();
}

// The cluster of a cluster launch's block (dllm_emu_launch_concurrent): its shape, and the
// cluster's barrier (in MAP_SHARED memory: count and generation). A block's rank in its cluster
// is x + cx (y + cy z) of its position in the cluster (%cluster_ctarank: x fastest).
struct ClusterBarrier {
    uint32_t count = 0, generation = 0;
};
inline dim3 cluster_dims{1, 1, 1};
inline uint32_t cluster_rank = 0;
inline ClusterBarrier* cluster_bar = nullptr;
// What a failed concurrent launch does: exit the process (the harnesses), or set
// `launch_failed` (the mock driver, which reports it as CUDA_ERROR_LAUNCH_FAILED).
inline bool exit_on_launch_failure = true;
inline bool launch_failed = false;
inline int cluster_blocks() { return (int)(cluster_dims.x * cluster_dims.y * cluster_dims.z); }

// `bar.sync id, count`: the first `count` arrivals of this phase release each other.
inline void named_sync(int id, int count) {
    if (id < 1 || id > 15) fail("named barrier id outside 1..15");
    NamedBarrier& nb = block->named[id];
    {
        std::lock_guard<std::mutex> g(block->named_lock);
        if (!nb.bar) {
            nb.count = count;
            nb.bar = std::make_unique<EmuBarrier>(count);
        }
    }
    if (nb.count != count) fail("named barrier used with two thread counts");
    nb.bar->arrive_and_wait();
}

// A global-memory buffer that forked blocks share (MAP_SHARED), placed so that it ends at a
// PROT_NONE guard page: a read or write past its end faults (the sanitizer does not see these
// mappings). Never freed (the harness is short-lived).
template <class T>
inline T* device_buffer(size_t n) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t bytes = (n * sizeof(T) + 15) / 16 * 16;
    const size_t span = (bytes + page - 1) / page * page;
    void* m = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("mmap of a device buffer failed");
    unsigned char* base = (unsigned char*)m;
    if (mprotect(base + span, page, PROT_NONE) != 0) fail("mprotect of a guard page failed");
    return reinterpret_cast<T*>(base + span - bytes);
}
template <class T>
inline T* device_copy(const std::vector<T>& v) {
    T* p = device_buffer<T>(v.size());
    std::copy(v.begin(), v.end(), p);
    return p;
}
template <class T>
inline T* device_filled(size_t n, T value) {
    T* p = device_buffer<T>(n);
    std::fill(p, p + n, value);
    return p;
}

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

inline DLLM_EMU_TLS dim3 threadIdx, blockIdx;
DLLM_EMU_FIBER_LOCAL(threadIdx);
DLLM_EMU_FIBER_LOCAL(blockIdx);
inline dim3 blockDim, gridDim;

namespace dllm_emu {

// barrier.cluster.arrive.release + wait.acquire: every thread of every block of the cluster.
inline void cluster_sync() {
    if (cluster_bar == nullptr) fail("a cluster barrier outside a cluster launch");
    std::atomic_ref<uint32_t> count(cluster_bar->count), generation(cluster_bar->generation);
    const uint32_t total = (uint32_t)cluster_blocks() * (blockDim.x * blockDim.y * blockDim.z);
    const uint32_t gen = generation.load();
    if (count.fetch_add(1) + 1 == total) {
        count.store(0);
        generation.fetch_add(1);
        return;
    }
    poll("cluster barrier: no completion within a minute (a block did not arrive)",
         [&] { return generation.load() != gen; });
}

// mapa.shared::cluster: the shared-window address `addr` of this block (in its arena) as the same
// offset in the arena of cluster block `rank` (a cluster's blocks have consecutive arena slots, in
// rank order).
inline uint32_t cluster_peer(uint32_t addr, uint32_t rank) {
    if ((int)rank >= cluster_blocks()) fail("mapa: rank outside the cluster");
    if (addr >= kSharedArenaBytes) fail("mapa of an address outside the block's arena (a host-static __shared__?)");
    return addr + (uint32_t)(((int64_t)rank - (int64_t)cluster_rank) * (int64_t)kSharedArenaBytes);
}

}  // namespace dllm_emu

inline void __syncthreads() { dllm_emu::block->sync.arrive_and_wait(); }
inline void __threadfence() {
    dllm_emu::jitter();
    std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    dllm_emu::jitter();
    const unsigned old = std::atomic_ref<unsigned>(*p).fetch_add(v);
    dllm_emu::jitter();
    return old;
}
inline void __syncwarp(unsigned = 0xffffffffu) { dllm_emu::warp->bar.arrive_and_wait(); }
inline void __nanosleep(unsigned) { dllm_emu::relax(); }
[[noreturn]] inline void __trap() { dllm_emu::fail("__trap() (a kernel's watchdog or assertion)"); }
inline size_t __cvta_generic_to_shared(const void* p) {
    const int64_t off = (const unsigned char*)p - dllm_emu::shared_arena;
    if (off != (int64_t)(int32_t)off) dllm_emu::fail("a shared variable lies over 2 GB from the arena");
    return (uint32_t)off;
}

template <class T>
inline T dllm_emu_shfl(T v, int src_of_lane_xor, bool is_xor) {
    static_assert(sizeof(T) <= 8, "a register");
    uint64_t mine = 0;
    std::memcpy(&mine, &v, sizeof v);
    T out{};
    dllm_emu::exchange(&mine, 1, [&](uint64_t (&slot)[32][8]) {
        const int src = (is_xor ? (dllm_emu::lane ^ src_of_lane_xor) : src_of_lane_xor) & 31;
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

// cp.async (dllm_cp_async16 / 8, commit, wait_group of cuda/common.cuh): each copy is queued in its
// thread's open group and performed only when a wait_group retires that group, the latest a
// device copy may land; a kernel that reads shared memory before waiting sees the poison left
// there. `valid` false zero-fills and reads nothing.
namespace dllm_emu {
struct AsyncCopy {
    uint32_t dst;
    const void* src;
    int bytes;
};
inline DLLM_EMU_TLS std::vector<AsyncCopy> cp_open;
inline DLLM_EMU_TLS std::vector<std::vector<AsyncCopy>> cp_groups;
DLLM_EMU_FIBER_LOCAL(cp_open);
DLLM_EMU_FIBER_LOCAL(cp_groups);
inline void cp_perform(const AsyncCopy& c) {
    unsigned char* d = shared_at(c.dst);
    if (c.src)
        std::memcpy(d, c.src, c.bytes);
    else
        std::memset(d, 0, c.bytes);
}
// DLLM_EMU_ASYNC=early: every copy lands at once instead, the earliest it may (a slot refilled
// while an asynchronous reader, such as a wgmma still in flight, may read it then shows).
inline bool cp_early() { return async_mode_is("early"); }
inline void cp_async(uint32_t dst, const void* src, bool valid, int bytes) {
    if ((dst % bytes) != 0 || (valid && ((uintptr_t)src % bytes) != 0)) fail("cp.async address not aligned to its size");
    const AsyncCopy c{dst, valid ? src : nullptr, bytes};
    if (cp_early())
        cp_perform(c);
    else
        cp_open.push_back(c);
}
}  // namespace dllm_emu
inline void dllm_cp_async16(uint32_t dst, const void* src, bool valid) { dllm_emu::cp_async(dst, src, valid, 16); }
inline void dllm_cp_async8(uint32_t dst, const void* src, bool valid) { dllm_emu::cp_async(dst, src, valid, 8); }
inline void dllm_cp_commit() {
    dllm_emu::cp_groups.push_back(std::move(dllm_emu::cp_open));
    dllm_emu::cp_open.clear();
}
template <int N>
inline void dllm_cp_wait() {
    auto& groups = dllm_emu::cp_groups;
    while (groups.size() > (size_t)N) {
        for (const auto& c : groups.front()) dllm_emu::cp_perform(c);
        groups.erase(groups.begin());
    }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8 j .. 8 j + 7 give the 16-byte rows of
// matrix j; register j of lane l gets row l / 4, elements 2 (l % 4) and + 1 (the lower in the low
// half), or with `trans` column l / 4, rows 2 (l % 4) and + 1.
inline void dllm_emu_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
    if (addr & 15) dllm_emu::fail("ldmatrix row address not 16-byte aligned");
    const uint64_t mine = addr;
    const int l = dllm_emu::lane;
    dllm_emu::exchange(&mine, 1, [&](uint64_t (&slot)[32][8]) {
        // Checked inside the rendezvous, where no lane can be on its way out.
        if (dllm_emu::warp->live.load() != 32) dllm_emu::fail("ldmatrix with lanes missing");
        auto elem = [&](int matrix, int row, int col) {
            uint16_t v;
            std::memcpy(&v, dllm_emu::shared_at((uint32_t)slot[8 * matrix + row][0] + 2 * col), 2);
            return (uint32_t)v;
        };
        for (int j = 0; j < 4; ++j) {
            const uint32_t lo = trans ? elem(j, 2 * (l & 3), l >> 2) : elem(j, l >> 2, 2 * (l & 3));
            const uint32_t hi = trans ? elem(j, 2 * (l & 3) + 1, l >> 2) : elem(j, l >> 2, 2 * (l & 3) + 1);
            r[j] = lo | (hi << 16);
        }
    });
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX fragment layouts (lane = 4 g + t):
// A (16 x 16): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9];
// B (16 x 8): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; D (16 x 8): d0, d1 = D[g][2t, 2t+1],
// d2, d3 = D[g+8][2t, 2t+1]; the lower k of a register pair in its low 16 bits. Products summed
// in fp32 in k order (the device truncates its sums differently: compare with a tolerance).
inline void dllm_emu_mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                              uint32_t b1) {
    const uint64_t mine[6] = {a0, a1, a2, a3, b0, b1};
    const int g = dllm_emu::lane >> 2, t = dllm_emu::lane & 3;
    float out[4];
    dllm_emu::exchange(mine, 6, [&](uint64_t (&slot)[32][8]) {
        // Checked inside the rendezvous, where no lane can be on its way out.
        if (dllm_emu::warp->live.load() != 32) dllm_emu::fail("mma.sync with lanes missing (undefined on the device)");
        auto half = [](uint64_t reg, int k) { return __uint_as_float(((uint32_t)(reg >> (16 * (k & 1))) & 0xffffu) << 16); };
        // This lane's rows g, g + 8 of A and columns 2t, 2t + 1 of B, decoded once.
        float a[2][16], b[2][16];
        for (int k = 0; k < 16; ++k) {
            const int quad = (k & 7) >> 1, high = k < 8 ? 0 : 1;
            for (int h = 0; h < 2; ++h) {
                a[h][k] = half(slot[4 * g + quad][h + 2 * high], k);
                b[h][k] = half(slot[4 * (2 * t + h) + quad][4 + high], k);
            }
        }
        for (int q = 0; q < 4; ++q) {
            const float* row = a[q < 2 ? 0 : 1];
            const float* col = b[q & 1];
            float s = d[q];
            for (int k = 0; k < 16; ++k) s += row[k] * col[k];
            out[q] = s;
        }
    });
    for (int q = 0; q < 4; ++q) d[q] = out[q];
}

// Runs one block of `kernel` (one OS thread per CUDA thread, or one fiber in the fiber mode) to
// its end.
template <class F>
inline void dllm_emu_run_block(dim3 idx, dim3 block, F& kernel, size_t shared_bytes) {
    const int threads = (int)(block.x * block.y * block.z);
    dllm_emu::Block b(threads, shared_bytes);
    auto thread = [&](int t) {
        threadIdx = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y, (unsigned)t / (block.x * block.y)};
        blockIdx = idx;
        dllm_emu::block = &b;
        dllm_emu::warp = b.warps[t / 32].get();
        dllm_emu::lane = t % 32;
        dllm_emu::static_shared_used = 0;
        kernel();
        // A finished thread leaves its barriers, as an exited thread on the device (its
        // slots cleared first: its drop is its arrival, no lane reads them before the next
        // phase).
        std::memset(dllm_emu::warp->slot[dllm_emu::lane], 0, sizeof dllm_emu::warp->slot[0]);
        dllm_emu::warp->live.fetch_sub(1);
        dllm_emu::warp->bar.arrive_and_drop();
        b.sync.arrive_and_drop();
    };
#if defined(DLLM_EMU_FIBERS)
    dllm_emu::fibers::run(
        threads, [](void* context, int t) { (*static_cast<decltype(thread)*>(context))(t); }, &thread);
#else
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) pool.emplace_back(thread, t);
    for (auto& th : pool) th.join();
#endif
}

// Runs `kernel` (a callable that calls the kernel with its arguments) over `grid` x `block`, the
// blocks from the last to the first (a kernel that relied on launch order, or on what an earlier
// block left in shared memory, would show it; every block of the device may run in any order).
template <class F>
inline void dllm_emu_launch(dim3 grid, dim3 block, F kernel, size_t shared_bytes = 0) {
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = grid.z; bz-- > 0;)
        for (unsigned by = grid.y; by-- > 0;)
            for (unsigned bx = grid.x; bx-- > 0;) dllm_emu_run_block(dim3{bx, by, bz}, block, kernel, shared_bytes);
}

namespace dllm_emu {

// Block (bx, by, bz) of `grid` runs `kernel` in a forked child; with a cluster shape, in arena slot
// `slot` of the shared space, its cluster's barrier `bar`.
template <class F>
inline pid_t fork_block(dim3 idx, dim3 block, F& kernel, size_t shared_bytes, unsigned seconds, dim3 cluster,
                        size_t slot, ClusterBarrier* bar) {
    const pid_t pid = fork();
    if (pid < 0) fail("fork failed");
    if (pid != 0) return pid;
    alarm(seconds);
    const bool clustered = cluster.x > 0;
    if (clustered) {
        shared_arena = shared_space + slot * kSharedArenaBytes;
        cluster_dims = cluster;
        cluster_rank = idx.x % cluster.x + cluster.x * (idx.y % cluster.y + cluster.y * (idx.z % cluster.z));
        cluster_bar = bar;
    }
    dllm_emu_run_block(idx, block, kernel, shared_bytes);
    // A cluster block's shared memory is gone once it exits: a peer still reading it (no closing
    // cluster barrier) reads garbage.
    if (clustered) {
#if defined(__SANITIZE_ADDRESS__)
        ASAN_UNPOISON_MEMORY_REGION(shared_arena, kSharedArenaBytes);
#endif
        std::memset(shared_arena, 0xff, kSharedArenaBytes);
    }
    std::fflush(nullptr);
    _exit(0);
}

// Every block of the grid at once (no cluster shape), or the blocks of clusters
// first .. first + count - 1 (cluster index x fastest over the grid of clusters).
template <class F>
inline bool launch_wave(dim3 grid, dim3 block, F& kernel, size_t shared_bytes, unsigned seconds, dim3 cluster,
                        unsigned first, unsigned count) {
    const bool clustered = cluster.x > 0;
    ClusterBarrier* bars = nullptr;
    const size_t per_cluster = clustered ? (size_t)cluster.x * cluster.y * cluster.z : 1;
    const size_t bar_bytes = std::max<size_t>(1, count) * sizeof(ClusterBarrier);
    if (clustered) {
        if (mmap(shared_space, count * per_cluster * kSharedArenaBytes, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
            fail("cluster launch: cannot share the shared-memory space");
#if defined(__SANITIZE_ADDRESS__)
        // Every slot readable by every block (each poisons only its own slot's unused part).
        ASAN_UNPOISON_MEMORY_REGION(shared_space, sizeof shared_space);
#endif
        void* m = mmap(nullptr, bar_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) fail("cluster launch: cannot map the cluster barriers");
        bars = static_cast<ClusterBarrier*>(m);
    }
    std::fflush(nullptr);
    std::vector<pid_t> children;
    if (!clustered) {
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx)
                    children.push_back(fork_block(dim3{bx, by, bz}, block, kernel, shared_bytes, seconds, cluster, 0,
                                                  nullptr));
    } else {
        const unsigned ncx = grid.x / cluster.x, ncy = grid.y / cluster.y;
        for (unsigned c = 0; c < count; ++c) {
            const unsigned id = first + c;
            const dim3 origin{id % ncx * cluster.x, id / ncx % ncy * cluster.y, id / (ncx * ncy) * cluster.z};
            for (unsigned r = 0; r < per_cluster; ++r) {
                const dim3 idx{origin.x + r % cluster.x, origin.y + r / cluster.x % cluster.y,
                               origin.z + r / (cluster.x * cluster.y)};
                children.push_back(fork_block(idx, block, kernel, shared_bytes, seconds, cluster,
                                              c * per_cluster + r, bars + c));
            }
        }
    }
    bool ok = true;
    for (size_t i = 0; i < children.size(); ++i) {
        int status = 0;
        waitpid(children[i], &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            std::fprintf(stderr, "cuda_emu: block %zu of the concurrent launch failed (%s %d)\n", i,
                         WIFSIGNALED(status) ? "signal" : "exit status",
                         WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
            ok = false;
        }
    }
    if (clustered) {
        munmap(bars, bar_bytes);
        // The space private again (a later launch's forked blocks must not share it).
        if (mmap(shared_space, sizeof shared_space, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                 -1, 0) == MAP_FAILED)
            fail("cluster launch: cannot make the shared-memory space private again");
    }
    if (!ok) {
        if (exit_on_launch_failure) std::exit(1);
        launch_failed = true;
    }
    return ok;
}

}  // namespace dllm_emu

// Runs every block of the grid at once, each in a forked process of its own (its shared memory
// private, as on the device): for kernels whose blocks wait for each other (a grid barrier), which
// the device runs only when the whole grid is resident. Global memory must be dllm_emu::device_buffer
// memory (a plain host allocation is copied into each child, and what the child writes is lost).
// A block that fails (a sanitizer report, an abort, a watchdog's `__trap`, or `seconds` passing: a
// deadlock) fails the launch.
//
// `cluster` (x > 0) launches clusters of that shape (the grid a multiple of it in each dimension),
// only each cluster's blocks at once (in waves of at most kClusterSlots blocks): a cluster's arenas
// are consecutive slots of one MAP_SHARED space, in rank order, so dllm_emu::cluster_peer reaches a
// peer's shared memory, and dllm_emu::cluster_sync is the cluster barrier.
template <class F>
inline bool dllm_emu_launch_concurrent(dim3 grid, dim3 block, F kernel, size_t shared_bytes = 0,
                                       unsigned seconds = 120, dim3 cluster = {0, 0, 0}) {
    gridDim = grid;
    blockDim = block;
    const bool clustered = cluster.x > 0;
    if (!clustered) return dllm_emu::launch_wave(grid, block, kernel, shared_bytes, seconds, {0, 0, 0}, 0, 0);
    if (cluster.y == 0 || cluster.z == 0 || grid.x % cluster.x != 0 || grid.y % cluster.y != 0 ||
        grid.z % cluster.z != 0 || cluster.x * cluster.y * cluster.z > (unsigned)dllm_emu::kClusterSlots)
        dllm_emu::fail("cluster launch: the grid must be a multiple of the cluster (of at most kClusterSlots blocks)");
    const unsigned per_cluster = cluster.x * cluster.y * cluster.z;
    const unsigned clusters = grid.x * grid.y * grid.z / per_cluster;
    const unsigned per_wave = (unsigned)dllm_emu::kClusterSlots / per_cluster;
    bool ok = true;
    for (unsigned first = 0; first < clusters && ok; first += per_wave)
        ok = dllm_emu::launch_wave(grid, block, kernel, shared_bytes, seconds, cluster, first,
                                   std::min(per_wave, clusters - first));
    return ok;
}

