// The Hopper pieces of dllm's streaming kernels (cuda/gemm_stream.cu) for the CPU emulation
// (cuda/emu/cuda_emu.h): shared-memory mbarriers, 2-D TMA box loads with the 128-byte swizzle and
// zero fill, and the memory-order operations of cuda/sync.cuh. cuda/mbarrier.cuh, cuda/tma.cuh and
// cuda/sync.cuh include this file instead of their inline PTX when DLLM_EMU is set.
//
// An mbarrier is its 8 shared bytes, updated atomically: the phase bit (63), the arrivals still
// expected in this phase (bits 0-19), the count it was initialised with (20-39) and the pending
// transaction bytes (40-62, two's complement, so a copy may complete before its bytes are
// announced). The phase completes, and the next begins, when both reach zero. A TMA load copies its
// box at once and then completes its bytes on the barrier: the emulated copy engine is never late,
// so only a consumer that reads before waiting, not a slow copy, shows up as a wrong result.
#pragma once
#include "cuda_emu.h"

#include <unordered_map>

// What cuTensorMapEncodeTiled writes, as the emulation reads it: a 2-D bf16 matrix (K elements per
// row, `rows` rows, row stride k * 2 bytes), a box of 64 x box_rows, 128-byte swizzle, zero fill.
struct alignas(64) CUtensorMap {
    const uint16_t* base;
    uint64_t k, rows, box_k, box_rows;
    uint64_t pad[11];
};

namespace dllm_emu {

// src/backend/cuda/gemm_tma.rs OperandBox::encode, with its checks.
inline CUtensorMap encode_map(const uint16_t* base, uint64_t rows, uint64_t k, uint64_t box_rows) {
    if (((uintptr_t)base & 15) != 0 || k == 0 || rows == 0 || (k * 2) % 16 != 0 || box_rows == 0 || box_rows > 256)
        fail("tensor map: bad operand (alignment, k % 8, or a box of 1..=256 rows)");
    CUtensorMap m{};
    m.base = base;
    m.k = k;
    m.rows = rows;
    m.box_k = 64;
    m.box_rows = box_rows;
    return m;
}

constexpr uint64_t kPhase = 1ull << 63;
constexpr uint64_t kCountMask = (1ull << 20) - 1;
constexpr uint64_t kTxMask = (1ull << 23) - 1;

#if defined(DLLM_EMU_FIBERS)
// The fibers waiting for an mbarrier's phase to complete, by its word (every block of a launch runs
// in this process in the fiber mode, so every completion happens here and wakes them).
inline std::unordered_map<const void*, std::vector<size_t>> bar_waiters;
#endif

inline uint64_t bar_pending(uint64_t s) { return s & kCountMask; }
inline uint64_t bar_expected(uint64_t s) { return (s >> 20) & kCountMask; }
inline uint64_t bar_tx(uint64_t s) { return (s >> 40) & kTxMask; }

// Applies `arrivals` arrivals and `tx` transaction bytes (negative: completed) to the barrier at
// `addr`, completing the phase when nothing is left pending.
inline void bar_update(uint32_t addr, int arrivals, int64_t tx) {
    if (addr & 7) fail("mbarrier not 8-byte aligned");
    jitter();
    std::atomic_ref<uint64_t> word(*reinterpret_cast<uint64_t*>(shared_at(addr)));
    uint64_t s = word.load();
    for (;;) {
        const uint64_t expected = bar_expected(s);
        if (expected == 0) fail("mbarrier used before init");
        if ((int64_t)bar_pending(s) < arrivals) fail("mbarrier: more arrivals than its count in one phase");
        const uint64_t pending = bar_pending(s) - arrivals;
        const uint64_t txv = (bar_tx(s) + (uint64_t)tx) & kTxMask;
        uint64_t next;
        if (pending == 0 && txv == 0)
            next = ((s & kPhase) ^ kPhase) | (expected << 20) | expected;  // next phase
        else
            next = (s & kPhase) | (txv << 40) | (expected << 20) | pending;
        if (word.compare_exchange_weak(s, next)) break;
    }
#if defined(DLLM_EMU_FIBERS)
    const auto waiting = bar_waiters.find(shared_at(addr));
    if (waiting != bar_waiters.end() && ((s ^ word.load()) & kPhase)) {
        for (size_t f : waiting->second) fibers::wake(f);
        bar_waiters.erase(waiting);
    }
#endif
}

}  // namespace dllm_emu

inline uint32_t dllm_smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

inline void dllm_bar_init(uint32_t bar, uint32_t count) {
    if (count == 0 || count > dllm_emu::kCountMask) dllm_emu::fail("mbarrier init count");
    std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(dllm_emu::shared_at(bar))).store(((uint64_t)count << 20) |
                                                                                            count);
}
inline void dllm_bar_arrive_tx(uint32_t bar, uint32_t bytes) { dllm_emu::bar_update(bar, 1, bytes); }
inline void dllm_bar_arrive(uint32_t bar) { dllm_emu::bar_update(bar, 1, 0); }
inline void dllm_bar_wait(uint32_t bar, uint32_t parity) {
    std::atomic_ref<uint64_t> word(*reinterpret_cast<uint64_t*>(dllm_emu::shared_at(bar)));
#if defined(DLLM_EMU_FIBERS)
    // Waits without polling: the phase's completion wakes it.
    while (((word.load() >> 63) & 1u) == (parity & 1u)) {
        dllm_emu::bar_waiters[dllm_emu::shared_at(bar)].push_back(dllm_emu::fibers::current());
        dllm_emu::fibers::wait_for_wake("deadlock: every unfinished thread waits (an mbarrier phase never completes)");
    }
    return;
#endif
    dllm_emu::poll("mbarrier wait: no completion within a minute (a protocol deadlock)",
                   [&] { return ((word.load() >> 63) & 1u) != (parity & 1u); });
}

// The box at (x = K element, y = row) of `map` into shared memory at `dst`, in the hardware's
// 128-byte swizzle (16-byte chunk bits 4-6 of the shared address XORed with its bits 7-9),
// elements outside the matrix as zeros; then the box's bytes complete on `bar`.
inline void tma_load(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
    if (dst & 127) dllm_emu::fail("TMA destination not 128-byte aligned");
    const uint64_t row_bytes = map->box_k * 2;
    if (row_bytes != 128) dllm_emu::fail("TMA box rows must be 128 bytes for the 128-byte swizzle");
    // By 16-byte chunks of 8 elements (the swizzle moves whole chunks), element by element where
    // a chunk reaches past the matrix.
    for (uint64_t r = 0; r < map->box_rows; ++r)
        for (uint64_t c = 0; c < map->box_k; c += 8) {
            const int64_t gy = (int64_t)y + (int64_t)r, gx = (int64_t)x + (int64_t)c;
            const uint32_t logical = dst + (uint32_t)(r * row_bytes + 2 * c);
            unsigned char* chunk = dllm_emu::shared_at(logical ^ (((logical >> 7) & 7u) << 4));
            const bool row_in = gy >= 0 && (uint64_t)gy < map->rows;
            if (row_in && gx >= 0 && (uint64_t)gx + 8 <= map->k) {
                std::memcpy(chunk, map->base + (uint64_t)gy * map->k + (uint64_t)gx, 16);
                continue;
            }
            for (int e = 0; e < 8; ++e) {
                const int64_t ge = gx + e;
                const bool in = row_in && ge >= 0 && (uint64_t)ge < map->k;
                const uint16_t v = in ? map->base[(uint64_t)gy * map->k + (uint64_t)ge] : 0;
                std::memcpy(chunk + 2 * e, &v, 2);
            }
        }
    dllm_emu::bar_update(bar, 0, -(int64_t)(map->box_rows * row_bytes));
}
inline void tma_load_hint(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar, uint64_t) {
    tma_load(dst, map, x, y, bar);
}
// The multicast load: the same box at `dst`, signalled on the barrier at `bar`, in every block of
// the cluster named in `mask` (bit r: rank r), through their arenas (a cluster launch).
inline void tma_load_multicast(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar, uint16_t mask) {
    if (mask == 0) dllm_emu::fail("TMA multicast with an empty mask");
    for (uint32_t r = 0; r < 16; ++r)
        if ((mask >> r) & 1u) tma_load(dllm_emu::cluster_peer(dst, r), map, x, y, dllm_emu::cluster_peer(bar, r));
}
inline uint64_t tma_evict_first() { return 0; }
inline void tma_prefetch_map(const CUtensorMap*) {}

// cuda/sync.cuh.
// The acquire loads yield first: kernels spin on them.
inline uint32_t dllm_ld_acquire_cta(const uint32_t* p) {
    dllm_emu::relax();
    return std::atomic_ref<uint32_t>(*const_cast<uint32_t*>(p)).load(std::memory_order_acquire);
}
inline unsigned dllm_ld_acquire_gpu(const unsigned* p) {
    dllm_emu::relax();
    return std::atomic_ref<unsigned>(*const_cast<unsigned*>(p)).load(std::memory_order_acquire);
}
inline void dllm_st_release_cta(uint32_t* p, uint32_t v) {
    std::atomic_ref<uint32_t>(*p).store(v, std::memory_order_release);
}
inline void dllm_fence_proxy_async() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void dllm_fence_mbarrier_init() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void dllm_named_sync(int id, int threads) { dllm_emu::named_sync(id, threads); }
