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
// function statics, so one block per process uses them: dllm_emu_launch runs the blocks one after
// another; dllm_emu_launch_concurrent runs every block at once, as a persistent kernel's grid
// barrier and a cluster's distributed shared memory need: in the thread mode each in its own
// forked process (global memory the MAP_SHARED buffers of dllm_emu::device_buffer), in the fiber
// mode all in this process, each with its own arena of the shared space (its dynamic shared memory
// and its DLLM_SHARED_ARRAYs; a `__shared__` static there fails the run).
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
// State per CUDA thread (DLLM_EMU_THREAD_VAR: thread_local in the thread mode) and per block
// (DLLM_EMU_BLOCK_VAR: a process global in the thread mode, whose concurrent blocks are forked
// processes). In the fiber mode both are references into dllm_emu::fiber_now, the running fiber's
// ThreadLocals, which a switch copies out and in as one piece (fibers::fiber_local).
#define DLLM_EMU_THREAD_VAR(T, name, init) inline T& name = ::dllm_emu::fiber_now.name
#define DLLM_EMU_BLOCK_VAR(T, name, init) inline T& name = ::dllm_emu::fiber_now.name
#else
#define DLLM_EMU_THREAD_VAR(T, name, init) inline thread_local T name = init
#define DLLM_EMU_BLOCK_VAR(T, name, init) inline T name = init
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
// A `__shared__` static is one per process: fine for blocks run one after another, or each in a
// forked process, wrong for the fiber mode's blocks that run at once in one process (a grid
// barrier or a cluster launch), which fails on it (those kernels declare DLLM_SHARED_ARRAY).
#define __shared__ dllm_emu_static_shared_check(); static
#define __grid_constant__
#define __cluster_dims__(...)
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// What a thread's state refers to (cuda_emu.h, wgmma_emu.h).
namespace dllm_emu {
struct Block;
struct Warp;
struct ClusterBarrier;
// A queued cp.async copy (dllm_cp_async16 / 8): `bytes` from `src` (nullptr: zeros) to `dst`.
struct AsyncCopy {
    uint32_t dst;
    const void* src;
    int bytes;
};
// A queued wgmma (wgmma_emu.h): accumulators `d`, operand descriptors; `product` the operands'
// product read at issue (DLLM_EMU_ASYNC=wgmma-early), else empty.
struct WgmmaOp {
    float* d;
    uint64_t da, db;
    std::vector<float> product;
};
constexpr size_t kSharedArenaBytes = 256 * 1024;
constexpr int kClusterSlots = 256;
alignas(4096) inline unsigned char shared_space[kClusterSlots * kSharedArenaBytes];
#if defined(DLLM_EMU_FIBERS)
// Everything per CUDA thread in the fiber mode (the variables of DLLM_EMU_THREAD_VAR and
// DLLM_EMU_BLOCK_VAR are its members); the initial values are the ones outside any fiber.
struct ThreadLocals {
    dim3 threadIdx, blockIdx;
    Block* block = nullptr;
    Warp* warp = nullptr;
    int lane = 0;
    uint32_t cluster_rank = 0;
    unsigned char* shared_arena = shared_space;
    ClusterBarrier* cluster_bar = nullptr;
    std::vector<AsyncCopy> cp_open;
    std::vector<std::vector<AsyncCopy>> cp_groups;
    std::vector<WgmmaOp> wg_open;
    std::vector<std::vector<WgmmaOp>> wg_groups;
};
#endif
}  // namespace dllm_emu
#if defined(DLLM_EMU_FIBERS)
// Members: dim3s, pointers, ints and vectors, each relocatable by a byte copy.
template <>
struct dllm_emu::fibers::byte_relocatable<dllm_emu::ThreadLocals> : std::true_type {};
namespace dllm_emu {
inline ThreadLocals fiber_now;
inline const bool fiber_now_registered = fibers::fiber_local(fiber_now);
}  // namespace dllm_emu
#endif

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
// std::barrier's arrive_and_wait / arrive_and_drop for fibers: a waiting fiber is not run again
// until the phase completes (so a barrier costs one switch per thread, and a barrier no running
// thread can complete is a deadlock at once, not after a timeout). arrive_and_wait returns
// whether the caller completed the phase: it runs on while every other arrival still waits.
class EmuBarrier {
  public:
    explicit EmuBarrier(std::ptrdiff_t expected) : expected_(expected) {}
    bool arrive_and_wait() {
        if (++count_ == expected_) {
            complete();
            return true;
        }
        waiters_.push_back(fibers::current());
        fibers::wait_for_wake("deadlock: every unfinished thread waits at a barrier (a thread never arrived)");
        return false;
    }
    void arrive_and_drop() {
        --expected_;
        if (count_ > 0 && count_ == expected_) complete();
    }

  private:
    void complete() {
        count_ = 0;
        for (size_t w : waiters_) fibers::wake(w);
        waiters_.clear();
    }
    std::ptrdiff_t expected_, count_ = 0;
    std::vector<size_t> waiters_;
};
#else
using EmuBarrier = std::barrier<>;
#endif

// One warp's rendezvous: a barrier of its live lanes, their count, and a slot per lane for
// exchanges (an exited lane's slots read as zero: it takes no part in a ballot). The fiber mode
// alternates between two sets of slots (each lane's `parity`), so an exchange needs one barrier:
// a lane cannot write a set again before every lane has read it, since that takes passing the
// next exchange's barrier, which every lane must reach. There `pending` marks a set whose
// exchange's once-per-warp work has not run yet, and `exited` the lanes that left the kernel.
struct Warp {
    explicit Warp(int lanes) : bar(lanes), live(lanes) {}
    EmuBarrier bar;
    std::atomic<int> live;
    uint64_t slots[2][32][8] = {};
    unsigned char parity[32] = {}, exited[32] = {}, pending[2] = {};
};

// The shared memory of the running block, and the base of the emulated 32-bit shared addresses:
// one of kClusterSlots arenas of a static space (slot 0 for blocks run one after another; in a
// concurrent launch block b of the wave gets slot b, and a cluster's blocks consecutive slots, so
// that they reach each other's arenas: distributed shared memory; the thread mode's forked blocks
// share the space through a MAP_SHARED mapping for a cluster launch).
// Where a block's dynamic shared memory starts in its arena: 128-byte aligned (the most any kernel
// declares) but not 1024, since on the device static shared memory comes first: a kernel that
// needs a 1024-aligned ring must align it up itself.
constexpr size_t kDynamicOffset = 128;
// The arena's last bytes: the static shared arrays of DLLM_SHARED_ARRAY (static_shared).
constexpr size_t kStaticSharedBytes = 4096;
constexpr size_t kMaxDynamicShared = kSharedArenaBytes - kDynamicOffset - kStaticSharedBytes;
// The running block's arena: per fiber in the fiber mode (whose concurrent launches run every
// block in this process), per process in the thread mode (set before the block's threads start).
DLLM_EMU_BLOCK_VAR(unsigned char*, shared_arena, shared_space);
// Whether the blocks of the running launch share this process (the fiber mode's concurrent
// launches): `__shared__` statics are then one for every block.
inline bool blocks_share_process = false;
}  // namespace dllm_emu
inline void dllm_emu_static_shared_check() {
    if (dllm_emu::blocks_share_process) {
        std::fprintf(stderr,
                     "cuda_emu: a __shared__ static in a kernel whose blocks run at once in one process "
                     "(declare it with DLLM_SHARED_ARRAY)\n");
        std::abort();
    }
}
namespace dllm_emu {

// A named barrier (bar.sync id, count): its participant count is fixed by its first use.
struct NamedBarrier {
    std::atomic<int> count{0};
    std::unique_ptr<EmuBarrier> bar;
};

struct Block {
    Block(int threads, size_t shared_bytes, unsigned char* arena) : sync(threads), arena(arena), running(threads) {
        for (int w = 0; w * 32 < threads; ++w) warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
        if (shared_bytes > kMaxDynamicShared) {
            std::fprintf(stderr, "cuda_emu: %zu bytes of dynamic shared memory (at most %zu)\n", shared_bytes,
                         kMaxDynamicShared);
            std::abort();
        }
#if defined(__SANITIZE_ADDRESS__)
        ASAN_UNPOISON_MEMORY_REGION(arena, kSharedArenaBytes);
#endif
        // Uninitialised shared memory reads as NaN-like bf16 / f32 garbage, not as zeros.
        std::memset(arena + kDynamicOffset, 0xff, shared_bytes);
        std::memset(arena + kSharedArenaBytes - kStaticSharedBytes, 0xff, kStaticSharedBytes);
#if defined(__SANITIZE_ADDRESS__)
        // Past the launch's dynamic shared memory (and before it) is out of bounds, as on the device.
        ASAN_POISON_MEMORY_REGION(arena, kDynamicOffset);
        ASAN_POISON_MEMORY_REGION(arena + kDynamicOffset + shared_bytes, kMaxDynamicShared - shared_bytes);
#endif
    }
    EmuBarrier sync;
    unsigned char* arena;  // its shared memory
    int running;           // threads not yet exited (the fiber mode)
    std::vector<std::unique_ptr<Warp>> warps;
    std::mutex named_lock;  // the named barriers' and the static arrays' first uses
    NamedBarrier named[16];
    std::vector<std::pair<const void*, size_t>> static_sites;  // DLLM_SHARED_ARRAY: site, offset
    size_t static_used = 0;
};

DLLM_EMU_THREAD_VAR(Block*, block, nullptr);
DLLM_EMU_THREAD_VAR(Warp*, warp, nullptr);
DLLM_EMU_THREAD_VAR(int, lane, 0);

inline void* dynamic_shared() { return shared_arena + kDynamicOffset; }


[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::abort();
}

// The kernels' static shared arrays (DLLM_SHARED_ARRAY): the last kStaticSharedBytes of the
// block's arena, where cluster peers reach them. Each declaration (`site`, a static of its own)
// gets its place when the block's first thread reaches it; every later execution of it in the
// block, by any thread, gets the same (as the device has one address per declaration).
template <class T>
inline T* static_shared(const void* site, size_t n, size_t align) {
    Block& b = *block;
    std::lock_guard<std::mutex> g(b.named_lock);
    size_t start = kStaticSharedBytes;
    for (const auto& [s, at] : b.static_sites)
        if (s == site) start = at;
    if (start == kStaticSharedBytes) {
        start = (b.static_used + align - 1) / align * align;
        if (start + n * sizeof(T) > kStaticSharedBytes) fail("static shared arrays past kStaticSharedBytes");
        b.static_used = start + n * sizeof(T);
        b.static_sites.emplace_back(site, start);
    }
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
// cluster's barrier (count and generation; in MAP_SHARED memory for the thread mode's forked
// blocks). A block's rank in its cluster
// is x + cx (y + cy z) of its position in the cluster (%cluster_ctarank: x fastest).
struct ClusterBarrier {
    uint32_t count = 0, generation = 0;
};
inline dim3 cluster_dims{1, 1, 1};
DLLM_EMU_BLOCK_VAR(uint32_t, cluster_rank, 0);
DLLM_EMU_BLOCK_VAR(ClusterBarrier*, cluster_bar, nullptr);
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

// A warp collective: every live lane publishes `n` words in its slot and waits for the others;
// then the lanes' work runs (`work(slots, l)` for lane l may write words of slot l that no other
// lane's work reads), and each lane runs `read(slots)`, which must read only the slots (what a
// lane reads later than the instruction, memory, belongs in the work). With
// `all_lanes`, every lane of the warp must take part (mma.sync, ldmatrix, wgmma: .aligned),
// checked where no lane can be on its way out. In the thread mode each lane does its own work
// between two barriers (the second keeps the slots until every lane has read them). In the fiber
// mode the first lane to run after the one barrier does every lane's work at once,
// `work_all(slots)` (the same results as `work` for each lane), on the set of its parity.
inline void no_work(uint64_t (&)[32][8], int) {}
template <class W, class A, class F>
inline void collective(const uint64_t* mine, int n, bool all_lanes, W work, A work_all, F read) {
#if defined(DLLM_EMU_FIBERS)
    (void)work;
    const int p = warp->parity[lane];
    warp->parity[lane] ^= 1;
    auto& set = warp->slots[p];
    for (int i = 0; i < n; ++i) set[lane][i] = mine[i];
    warp->pending[p] = 1;
    warp->bar.arrive_and_wait();
    if (warp->pending[p]) {
        warp->pending[p] = 0;
        if (all_lanes && warp->live.load() != 32) fail("a warp-synchronous operation with lanes missing");
        for (int l = 0; l < 32; ++l)
            if (warp->exited[l]) std::memset(set[l], 0, sizeof set[l]);
        work_all(set);
    }
    read(set);
#else
    (void)work_all;
    auto& set = warp->slots[0];
    for (int i = 0; i < n; ++i) set[lane][i] = mine[i];
    warp->bar.arrive_and_wait();
    if (all_lanes && warp->live.load() != 32) fail("a warp-synchronous operation with lanes missing");
    work(set, lane);
    read(set);
    warp->bar.arrive_and_wait();
#endif
}
template <class F>
inline void collective(const uint64_t* mine, int n, bool all_lanes, F read) {
    collective(mine, n, all_lanes, no_work, [](uint64_t (&)[32][8]) {}, read);
}

// A collective without work, open to a partial warp (shuffles, ballots).
template <class F>
inline void exchange(const uint64_t* mine, int n, F read) {
    collective(mine, n, false, read);
}

}  // namespace dllm_emu

DLLM_EMU_THREAD_VAR(dim3, threadIdx, {});
DLLM_EMU_THREAD_VAR(dim3, blockIdx, {});
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
DLLM_EMU_THREAD_VAR(std::vector<AsyncCopy>, cp_open, {});
DLLM_EMU_THREAD_VAR(std::vector<std::vector<AsyncCopy>>, cp_groups, {});
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
// Shared memory is read in the collective's work, at the instruction for every lane (a lane that
// runs on after it cannot change what the others load); lane l's registers go to its slot words
// 1-4.
inline void dllm_emu_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
    if (addr & 15) dllm_emu::fail("ldmatrix row address not 16-byte aligned");
    const uint64_t mine = addr;
    auto work = [trans](uint64_t (&slot)[32][8], int l) {
        auto elem = [&](int matrix, int row, int col) {
            uint16_t v;
            std::memcpy(&v, dllm_emu::shared_at((uint32_t)slot[8 * matrix + row][0] + 2 * col), 2);
            return (uint32_t)v;
        };
        for (int j = 0; j < 4; ++j) {
            const uint32_t lo = trans ? elem(j, 2 * (l & 3), l >> 2) : elem(j, l >> 2, 2 * (l & 3));
            const uint32_t hi = trans ? elem(j, 2 * (l & 3) + 1, l >> 2) : elem(j, l >> 2, 2 * (l & 3) + 1);
            slot[l][1 + j] = lo | (hi << 16);
        }
    };
    const int l = dllm_emu::lane;
    dllm_emu::collective(
        &mine, 1, true, work,
        [&](uint64_t (&slot)[32][8]) {
            for (int k = 0; k < 32; ++k) work(slot, k);
        },
        [&](uint64_t (&slot)[32][8]) {
            for (int j = 0; j < 4; ++j) r[j] = (uint32_t)slot[l][1 + j];
        });
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX fragment layouts (lane = 4 g + t):
// A (16 x 16): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9];
// B (16 x 8): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; D (16 x 8): d0, d1 = D[g][2t, 2t+1],
// d2, d3 = D[g+8][2t, 2t+1]; the lower k of a register pair in its low 16 bits. Products summed
// in fp32 in k order (the device truncates its sums differently: compare with a tolerance).
namespace dllm_emu {
// Lane l's part of an mma.sync whose operands the lanes published in `slot` (words 0-5: a0-a3,
// b0, b1; words 6-7: the accumulators d0, d1 and d2, d3, two floats each, the lower first), its
// results written over words 6-7.
inline void mma_lane(uint64_t (&slot)[32][8], int l) {
    const int g = l >> 2, t = l & 3;
    auto half = [](uint64_t reg, int k) { return __uint_as_float(((uint32_t)(reg >> (16 * (k & 1))) & 0xffffu) << 16); };
    // Lane l's rows g, g + 8 of A and columns 2t, 2t + 1 of B, decoded once.
    float a[2][16], b[2][16];
    for (int k = 0; k < 16; ++k) {
        const int quad = (k & 7) >> 1, high = k < 8 ? 0 : 1;
        for (int h = 0; h < 2; ++h) {
            a[h][k] = half(slot[4 * g + quad][h + 2 * high], k);
            b[h][k] = half(slot[4 * (2 * t + h) + quad][4 + high], k);
        }
    }
    float d[4];
    std::memcpy(d, &slot[l][6], sizeof d);
    for (int q = 0; q < 4; ++q) {
        const float* row = a[q < 2 ? 0 : 1];
        const float* col = b[q & 1];
        float s = d[q];
        for (int k = 0; k < 16; ++k) s += row[k] * col[k];
        d[q] = s;
    }
    std::memcpy(&slot[l][6], d, sizeof d);
}
// Every lane's part of an mma.sync at once (the fiber mode's collective work): the 16 x 8 tile
// D += A B with each sum in the order and the roundings of mma_lane (d, then + a_k b_k for k in
// order, each product and each sum rounded to fp32: the build does not contract them), the eight
// columns of a row in two 4-float vectors.
inline void mma_warp(uint64_t (&slot)[32][8]) {
    typedef float v4 __attribute__((vector_size(16)));
    auto lo = [](uint64_t reg) { return __uint_as_float(((uint32_t)reg & 0xffffu) << 16); };
    auto hi = [](uint64_t reg) { return __uint_as_float((uint32_t)reg & 0xffff0000u); };
    float a[16][16], b[16][8], d[16][8];
    for (int g = 0; g < 8; ++g)
        for (int t = 0; t < 4; ++t) {
            const uint64_t* w = slot[4 * g + t];
            for (int h = 0; h < 2; ++h) {  // rows g (h = 0) and g + 8 of A and D, rows 2t (+ 8) of B
                a[g + 8 * h][2 * t] = lo(w[h]);
                a[g + 8 * h][2 * t + 1] = hi(w[h]);
                a[g + 8 * h][2 * t + 8] = lo(w[2 + h]);
                a[g + 8 * h][2 * t + 9] = hi(w[2 + h]);
                b[2 * t + 8 * h][g] = lo(w[4 + h]);
                b[2 * t + 1 + 8 * h][g] = hi(w[4 + h]);
                float acc[2];
                std::memcpy(acc, &w[6 + h], sizeof acc);
                d[g + 8 * h][2 * t] = acc[0];
                d[g + 8 * h][2 * t + 1] = acc[1];
            }
        }
    for (int r = 0; r < 16; ++r) {
        v4 s0, s1;
        std::memcpy(&s0, &d[r][0], 16);
        std::memcpy(&s1, &d[r][4], 16);
        for (int k = 0; k < 16; ++k) {
            v4 b0, b1;
            std::memcpy(&b0, &b[k][0], 16);
            std::memcpy(&b1, &b[k][4], 16);
            const v4 x = {a[r][k], a[r][k], a[r][k], a[r][k]};
            s0 = s0 + x * b0;
            s1 = s1 + x * b1;
        }
        std::memcpy(&d[r][0], &s0, 16);
        std::memcpy(&d[r][4], &s1, 16);
    }
    for (int g = 0; g < 8; ++g)
        for (int t = 0; t < 4; ++t)
            for (int h = 0; h < 2; ++h) {
                const float acc[2] = {d[g + 8 * h][2 * t], d[g + 8 * h][2 * t + 1]};
                std::memcpy(&slot[4 * g + t][6 + h], acc, sizeof acc);
            }
}
}  // namespace dllm_emu
inline void dllm_emu_mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                              uint32_t b1) {
    uint64_t mine[8] = {a0, a1, a2, a3, b0, b1, 0, 0};
    std::memcpy(&mine[6], d, sizeof d);
    const int l = dllm_emu::lane;
    dllm_emu::collective(mine, 8, true, dllm_emu::mma_lane, dllm_emu::mma_warp,
                         [&](uint64_t (&slot)[32][8]) { std::memcpy(d, &slot[l][6], sizeof d); });
}

namespace dllm_emu {
// One block of a launch: its index, its shared memory, and in a cluster launch its rank and the
// cluster's barrier.
struct BlockRun {
    dim3 idx;
    unsigned char* arena;
    uint32_t rank = 0;
    ClusterBarrier* bar = nullptr;
};
}  // namespace dllm_emu

// Runs blocks of `kernel` to their end, all at once (one OS thread per CUDA thread, a block per
// process; or, in the fiber mode, one fiber per CUDA thread of every block, so the blocks of a
// grid barrier or a cluster run at once in this process). With `clobber`, a block's shared memory
// is garbage once its last thread exits (a cluster peer still reading it reads that, as on the
// device).
template <class F>
inline void dllm_emu_run_blocks(const std::vector<dllm_emu::BlockRun>& runs, dim3 block, F& kernel,
                                size_t shared_bytes, bool clobber) {
    const int threads = (int)(block.x * block.y * block.z);
    std::vector<std::unique_ptr<dllm_emu::Block>> blocks;
    for (const auto& r : runs) blocks.push_back(std::make_unique<dllm_emu::Block>(threads, shared_bytes, r.arena));
    auto thread = [&](int i) {
        const int t = i % threads;
        const dllm_emu::BlockRun& run = runs[(size_t)(i / threads)];
        dllm_emu::Block& b = *blocks[(size_t)(i / threads)];
        threadIdx = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y, (unsigned)t / (block.x * block.y)};
        blockIdx = run.idx;
#if defined(DLLM_EMU_FIBERS)
        dllm_emu::shared_arena = run.arena;
        dllm_emu::cluster_rank = run.rank;
        dllm_emu::cluster_bar = run.bar;
#endif
        dllm_emu::block = &b;
        dllm_emu::warp = b.warps[t / 32].get();
        dllm_emu::lane = t % 32;
        kernel();
        // A finished thread leaves its barriers, as an exited thread on the device (in the thread
        // mode its slots cleared first: its drop is its arrival, no lane reads them before the
        // next phase; in the fiber mode lanes may still read its last set, so the next
        // collective's work clears them).
#if defined(DLLM_EMU_FIBERS)
        dllm_emu::warp->exited[dllm_emu::lane] = 1;
        if (--b.running == 0 && clobber) {
#if defined(__SANITIZE_ADDRESS__)
            ASAN_UNPOISON_MEMORY_REGION(b.arena, dllm_emu::kSharedArenaBytes);
#endif
            std::memset(b.arena, 0xff, dllm_emu::kSharedArenaBytes);
        }
#else
        std::memset(dllm_emu::warp->slots[0][dllm_emu::lane], 0, sizeof dllm_emu::warp->slots[0][0]);
#endif
        dllm_emu::warp->live.fetch_sub(1);
        dllm_emu::warp->bar.arrive_and_drop();
        b.sync.arrive_and_drop();
    };
    const int total = threads * (int)runs.size();
#if defined(DLLM_EMU_FIBERS)
    dllm_emu::blocks_share_process = runs.size() > 1;
    dllm_emu::fibers::run(
        total, [](void* context, int i) { (*static_cast<decltype(thread)*>(context))(i); }, &thread);
    dllm_emu::blocks_share_process = false;
#else
    if (runs.size() != 1) dllm_emu::fail("the thread mode runs one block per process");
    std::vector<std::thread> pool;
    pool.reserve(total);
    for (int i = 0; i < total; ++i) pool.emplace_back(thread, i);
    for (auto& th : pool) th.join();
#endif
}

// Runs one block of `kernel` to its end (the process's arena, cluster rank and barrier).
template <class F>
inline void dllm_emu_run_block(dim3 idx, dim3 block, F& kernel, size_t shared_bytes) {
    dllm_emu_run_blocks({dllm_emu::BlockRun{idx, dllm_emu::shared_arena, dllm_emu::cluster_rank, dllm_emu::cluster_bar}},
                        block, kernel, shared_bytes, false);
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

// Block `run` runs `kernel` in a forked child (the thread mode's concurrent launches); with a
// cluster shape, in its arena of the shared space, with its cluster's barrier.
template <class F>
inline pid_t fork_block(const BlockRun& run, dim3 block, F& kernel, size_t shared_bytes, unsigned seconds,
                        dim3 cluster) {
    const pid_t pid = fork();
    if (pid < 0) fail("fork failed");
    if (pid != 0) return pid;
    alarm(seconds);
    const bool clustered = cluster.x > 0;
    if (clustered) {
        shared_arena = run.arena;
        cluster_dims = cluster;
        cluster_rank = run.rank;
        cluster_bar = run.bar;
    }
    dllm_emu_run_block(run.idx, block, kernel, shared_bytes);
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
// first .. first + count - 1 (cluster index x fastest over the grid of clusters), a cluster's
// blocks in consecutive arenas of the shared space, in rank order. The fiber mode runs them in
// this process (a failing block aborts it); the thread mode forks a process per block (the shared
// space made MAP_SHARED for a cluster launch) and reports a failed block.
template <class F>
inline bool launch_wave(dim3 grid, dim3 block, F& kernel, size_t shared_bytes, unsigned seconds, dim3 cluster,
                        unsigned first, unsigned count) {
    const bool clustered = cluster.x > 0;
    const size_t per_cluster = clustered ? (size_t)cluster.x * cluster.y * cluster.z : 1;
    std::vector<ClusterBarrier> local_bars;
    ClusterBarrier* bars = nullptr;
#if !defined(DLLM_EMU_FIBERS)
    const size_t bar_bytes = std::max<size_t>(1, count) * sizeof(ClusterBarrier);
#endif
    if (clustered) {
#if defined(DLLM_EMU_FIBERS)
        local_bars.resize(count);
        bars = local_bars.data();
#else
        if (mmap(shared_space, count * per_cluster * kSharedArenaBytes, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
            fail("cluster launch: cannot share the shared-memory space");
        void* m = mmap(nullptr, bar_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) fail("cluster launch: cannot map the cluster barriers");
        bars = static_cast<ClusterBarrier*>(m);
#endif
#if defined(__SANITIZE_ADDRESS__)
        // Every slot readable by every block (each poisons only its own slot's unused part).
        ASAN_UNPOISON_MEMORY_REGION(shared_space, sizeof shared_space);
#endif
    }
    std::vector<BlockRun> runs;
    if (!clustered) {
#if defined(DLLM_EMU_FIBERS)
        // All at once (a grid barrier needs every block resident): an arena and a fiber each.
        const size_t blocks = (size_t)grid.x * grid.y * grid.z;
        if (blocks > (size_t)kClusterSlots || blocks * block.x * block.y * block.z > fibers::kMaxFibers)
            fail("a grid-barrier launch larger than the emulation runs at once (at most 256 blocks and 16384 "
                 "threads: fewer DLLM_EMU_SMS or DLLM_GEMM_STREAM_BLOCKS)");
#endif
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
#if defined(DLLM_EMU_FIBERS)
                    unsigned char* arena = shared_space + runs.size() * kSharedArenaBytes;
#else
                    unsigned char* arena = shared_arena;
#endif
                    runs.push_back(BlockRun{dim3{bx, by, bz}, arena, 0, nullptr});
                }
    } else {
        const unsigned ncx = grid.x / cluster.x, ncy = grid.y / cluster.y;
        for (unsigned c = 0; c < count; ++c) {
            const unsigned id = first + c;
            const dim3 origin{id % ncx * cluster.x, id / ncx % ncy * cluster.y, id / (ncx * ncy) * cluster.z};
            for (unsigned r = 0; r < per_cluster; ++r) {
                const dim3 idx{origin.x + r % cluster.x, origin.y + r / cluster.x % cluster.y,
                               origin.z + r / (cluster.x * cluster.y)};
                runs.push_back(BlockRun{idx, shared_space + (c * per_cluster + r) * kSharedArenaBytes,
                                        (uint32_t)(idx.x % cluster.x +
                                                   cluster.x * (idx.y % cluster.y + cluster.y * (idx.z % cluster.z))),
                                        bars + c});
            }
        }
    }
#if defined(DLLM_EMU_FIBERS)
    (void)seconds;
    const dim3 outside_dims = cluster_dims;
    if (clustered) cluster_dims = cluster;
    dllm_emu_run_blocks(runs, block, kernel, shared_bytes, clustered);
    cluster_dims = outside_dims;
    return true;
#else
    std::fflush(nullptr);
    std::vector<pid_t> children;
    for (const BlockRun& run : runs) children.push_back(fork_block(run, block, kernel, shared_bytes, seconds, cluster));
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
    if (!ok) std::exit(1);
    return ok;
#endif
}

}  // namespace dllm_emu

// Runs every block of the grid at once: for kernels whose blocks wait for each other (a grid
// barrier), which the device runs only when the whole grid is resident. In the thread mode each
// block is a forked process of its own (its shared memory private, as on the device; global memory
// must be dllm_emu::device_buffer memory, since a plain host allocation is copied into each child
// and what the child writes is lost), and a block that fails (a sanitizer report, an abort, a
// watchdog's `__trap`, or `seconds` passing: a deadlock) exits the process with status 1. In the
// fiber mode the blocks' threads are fibers of this process, each block with its own arena (at
// most kClusterSlots blocks at once), and a failing block aborts it.
//
// `cluster` (x > 0) launches clusters of that shape (the grid a multiple of it in each dimension),
// only each cluster's blocks at once (in waves of at most kClusterSlots blocks, and in the fiber
// mode of at most kMaxFibers threads): a cluster's arenas are consecutive slots of the shared space
// (MAP_SHARED for the thread mode's forked blocks), in rank order, so dllm_emu::cluster_peer
// reaches a peer's shared memory, and dllm_emu::cluster_sync is the cluster barrier.
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
    unsigned per_wave = (unsigned)dllm_emu::kClusterSlots / per_cluster;
#if defined(DLLM_EMU_FIBERS)
    // Every thread of a wave is a fiber of this process.
    const size_t threads = (size_t)block.x * block.y * block.z;
    per_wave = std::max(1u, std::min(per_wave, (unsigned)(dllm_emu::fibers::kMaxFibers / (threads * per_cluster))));
#endif
    bool ok = true;
    for (unsigned first = 0; first < clusters && ok; first += per_wave)
        ok = dllm_emu::launch_wave(grid, block, kernel, shared_bytes, seconds, cluster, first,
                                   std::min(per_wave, clusters - first));
    return ok;
}

