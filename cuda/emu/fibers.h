// Cooperative fibers for the CUDA emulation (cuda/emu/cuda_emu.h with DLLM_EMU_FIBERS): a block's
// CUDA threads (or, in a concurrent launch, every block's) run as fibers of one OS thread,
// switched only where a thread waits (a barrier, a warp collective, an mbarrier, a poll, an
// atomic's jitter point). A switch costs tens of nanoseconds instead of an OS context switch,
// which is what makes whole models runnable in the emulation (the mock driver,
// cuda/emu/libcuda_emu.cpp). A fiber that waits at a barrier or an mbarrier is not run again until
// woken (wait_for_wake / wake), so waiting costs nothing and a wait nothing can end is reported at
// once; a fiber that polls memory yields and runs again in turn. Data races cannot show here (one
// thread runs at a time, and only where the kernel waits); the thread mode under
// ThreadSanitizer is for those.
//
// What is per CUDA thread (thread indices, the cp.async and wgmma queues; cuda_emu.h keeps it all
// in one struct, dllm_emu::ThreadLocals) is registered with `fiber_local`: each fiber's value is
// copied in when it runs and out when it waits. x86-64 System V only.
#pragma once

#include <sys/mman.h>
#include <sched.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#error "the emulation's fibers are written for x86-64"
#endif

// Saves the callee-saved registers on the current stack, stores its pointer in *save, loads `load`
// as the stack pointer and pops the registers saved there (the System V callee-saved set; the
// kernels do not change the floating-point control words).
extern "C" void dllm_emu_fiber_switch(void** save, void* load);
asm(R"(
    .pushsection .text
    .weak dllm_emu_fiber_switch
    .hidden dllm_emu_fiber_switch
    .type dllm_emu_fiber_switch, @function
dllm_emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size dllm_emu_fiber_switch, .-dllm_emu_fiber_switch
    .popsection
)");

namespace dllm_emu::fibers {

// A per-fiber variable: while fiber i waits its value sits in slot i of `saved` (slot `count`
// holds the value outside the fibers); a switch copies the running fiber's values out and the next
// one's in. The copies are byte copies, so the types must be relocatable that way: trivially
// copyable ones, or a type declared so by specialising byte_relocatable (cuda_emu.h's
// ThreadLocals: pointers, ints and std::vectors, three pointers each). The running fiber's
// own slot is stale (its value lives in the variable), so only the waiting fibers' slots own what
// they hold.
template <class T>
struct byte_relocatable : std::is_trivially_copyable<T> {};
struct LocalVar {
    void* var;
    size_t bytes, offset;
    void (*construct)(void*);
    void (*destroy)(void*);
};
struct Locals {
    std::vector<LocalVar> vars;
    size_t stride = 0;  // bytes per slot, every variable at its offset
    std::vector<unsigned char> saved;
    size_t slots = 0;   // slots whose fiber values are constructed (0 .. slots - 1)
    unsigned char* slot(size_t i) { return saved.data() + i * stride; }
    // (Keep them few: one struct of everything is one copy per switch and direction.)
    void save(size_t i) {
        for (const auto& v : vars) std::memcpy(slot(i) + v.offset, v.var, v.bytes);
    }
    void load(size_t i) {
        for (const auto& v : vars) std::memcpy(v.var, slot(i) + v.offset, v.bytes);
    }
    // Destroys the values the fibers of the last run left in their slots, then gives `fibers` slots
    // a value-initialised variable each (plus the outside slot, written by the first switch).
    void reset(size_t fibers) {
        for (size_t i = 0; i < slots; ++i)
            for (const auto& v : vars) v.destroy(slot(i) + v.offset);
        saved.assign((fibers + 1) * stride, 0);
        for (size_t i = 0; i < fibers; ++i)
            for (const auto& v : vars) v.construct(slot(i) + v.offset);
        slots = fibers;
    }
};
inline Locals& locals() {
    static Locals all;
    return all;
}
template <class T>
inline bool fiber_local(T& var) {
    static_assert(byte_relocatable<T>::value, "a fiber-local variable must be relocatable by a byte copy");
    Locals& l = locals();
    constexpr size_t align = alignof(T) < 16 ? alignof(T) : 16;
    static_assert(alignof(T) <= 16, "fiber-local alignment above 16");
    const size_t offset = (l.stride + align - 1) / align * align;
    l.vars.push_back({&var, sizeof(T), offset, [](void* p) { new (p) T(); },
                      [](void* p) { static_cast<T*>(p)->~T(); }});
    l.stride = (offset + sizeof(T) + 15) / 16 * 16;
    return true;
}

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxFibers = 16384;  // the threads of a concurrent launch's blocks

// The fibers that may run are in a FIFO queue (each at most once): a fiber that yields goes to its
// back, one that waits to be woken leaves it until wake() puts it back, so a switch costs O(1)
// however many fibers wait.
struct Scheduler {
    std::vector<void*> sp;            // each fiber's saved stack pointer
    std::vector<uint32_t> queue;      // ring buffer of the runnable fibers (the running one excluded)
    size_t head = 0, queued = 0;
    size_t count = 0, current = 0, live = 0;
    void* outside = nullptr;  // the stack pointer of the code that called run()
    void (*body)(void*, int) = nullptr;
    void* context = nullptr;
    uint64_t switches = 0;
    std::vector<unsigned char*> stacks;  // mapped once, each above a guard page, reused by every run
    void push(size_t fiber) {
        size_t at = head + queued++;
        if (at >= count) at -= count;
        queue[at] = (uint32_t)fiber;
    }
    // The next runnable fiber, or `count` when none is.
    size_t pop() {
        if (queued == 0) return count;
        const size_t fiber = queue[head];
        if (++head == count) head = 0;
        --queued;
        return fiber;
    }
};
inline Scheduler sched;
inline bool in_fiber = false;

[[noreturn]] inline void die(const char* what) {
    std::fprintf(stderr, "cuda_emu fibers: %s\n", what);
    std::abort();
}

// From the running fiber (or the outside, index `count`) to `next`.
inline void switch_to(size_t next) {
    const size_t from = sched.current;
    if (from == next) return;
    locals().save(from);
    locals().load(next);
    sched.current = next;
    void** save = from == sched.count ? &sched.outside : &sched.sp[from];
    void* load = next == sched.count ? sched.outside : sched.sp[next];
    in_fiber = next != sched.count;
    dllm_emu_fiber_switch(save, load);
}

// The running fiber's index.
inline size_t current() { return sched.current; }

// Suspends the running fiber until another one calls wake() on it. With no fiber left to run,
// no one can: a deadlock, named by `what`.
inline void wait_for_wake(const char* what) {
    if (!in_fiber) die("a fiber wait outside the fibers");
    const size_t next = sched.pop();
    if (next == sched.count) die(what);
    switch_to(next);
}
// Makes a waiting fiber runnable again.
inline void wake(size_t fiber) { sched.push(fiber); }

// Lets the other fibers run (from outside the fibers, the other OS threads).
inline void yield() {
    if (!in_fiber) {
        sched_yield();
        return;
    }
    // Now and then the OS thread too (a spinning emulation would starve other processes).
    if ((++sched.switches & 4095) == 0) sched_yield();
    if (sched.queued == 0) return;
    sched.push(sched.current);
    switch_to(sched.pop());
}

[[noreturn]] inline void entry() {
    sched.body(sched.context, (int)sched.current);
    --sched.live;
    const size_t next = sched.pop();
    if (sched.live != 0 && next == sched.count) die("deadlock: every unfinished thread waits (a barrier or an mbarrier)");
    switch_to(next);
    die("a finished fiber was resumed");
}

// Runs body(context, i) for i in 0..count as fibers, from fiber 0 in order, until all return.
inline void run(int count, void (*body)(void*, int), void* context) {
    if (in_fiber) die("fibers started from inside a fiber");
    if (count <= 0 || (size_t)count > kMaxFibers) die("fiber count outside 1..kMaxFibers");
    const size_t page = 4096;
    while (sched.stacks.size() < (size_t)count) {
        void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) die("cannot map a fiber stack");
        if (mprotect(m, page, PROT_NONE) != 0) die("cannot protect a fiber stack's guard page");
        sched.stacks.push_back((unsigned char*)m + page);
    }
    sched.count = (size_t)count;
    sched.sp.assign(sched.count, nullptr);
    sched.queue.assign(sched.count, 0);
    sched.head = sched.queued = 0;
    sched.live = sched.count;
    sched.body = body;
    sched.context = context;
    for (size_t i = 0; i < sched.count; ++i) {
        // What dllm_emu_fiber_switch pops: r15, r14, r13, r12, rbx, rbp, then entry() as the return
        // address, above it a dummy slot so that entry() starts with the stack a call leaves.
        void** top = (void**)(sched.stacks[i] + kStackBytes);
        top[-1] = nullptr;
        top[-2] = (void*)&entry;
        for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
        sched.sp[i] = top - 8;
        if (i > 0) sched.push(i);
    }
    locals().reset(sched.count);
    sched.current = sched.count;
    switch_to(0);
    if (sched.live != 0) die("returned to the launch with fibers unfinished");
}

}  // namespace dllm_emu::fibers
