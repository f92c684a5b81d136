// Cooperative fibers for the CUDA emulation (cuda/emu/cuda_emu.h with DLLM_EMU_FIBERS): a block's
// CUDA threads run as fibers of one OS thread, switched only where a thread waits (a barrier, a
// warp collective, a poll, an atomic's jitter point). A switch costs tens of nanoseconds instead of
// an OS context switch, which is what makes whole models runnable in the emulation (the mock
// driver, cuda/emu/libcuda_emu.cpp). Data races cannot show here (one thread runs at a time, and
// only where the kernel waits); the thread mode under ThreadSanitizer is for those.
//
// Variables that are per CUDA thread (thread indices, the cp.async and wgmma queues) are plain
// globals in fiber mode, registered with `fiber_local`: each fiber's value is swapped in when it
// runs and out when it waits. x86-64 System V only.
#pragma once

#include <sys/mman.h>
#include <sched.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
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

// A per-fiber variable: slot i holds fiber i's value while another fiber runs (slot `count` the
// value outside the fibers).
struct LocalBase {
    virtual ~LocalBase() = default;
    virtual void resize(size_t slots) = 0;
    virtual void swap(size_t slot) = 0;
};
template <class T>
struct Local final : LocalBase {
    explicit Local(T& v) : var(v) {}
    T& var;
    std::vector<T> saved;
    void resize(size_t slots) override {
        saved.clear();
        saved.resize(slots);
    }
    void swap(size_t slot) override { std::swap(var, saved[slot]); }
};
inline std::vector<std::unique_ptr<LocalBase>>& locals() {
    static std::vector<std::unique_ptr<LocalBase>> all;
    return all;
}
template <class T>
inline bool fiber_local(T& var) {
    locals().push_back(std::make_unique<Local<T>>(var));
    return true;
}

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxFibers = 1024;

struct Scheduler {
    std::vector<void*> sp;            // each fiber's saved stack pointer
    std::vector<unsigned char> done;  // whether it has finished
    size_t count = 0, current = 0, live = 0;
    void* outside = nullptr;  // the stack pointer of the code that called run()
    void (*body)(void*, int) = nullptr;
    void* context = nullptr;
    uint64_t switches = 0;
    std::vector<unsigned char*> stacks;  // mapped once, each above a guard page, reused by every run
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
    for (auto& l : locals()) l->swap(from);
    for (auto& l : locals()) l->swap(next);
    sched.current = next;
    void** save = from == sched.count ? &sched.outside : &sched.sp[from];
    void* load = next == sched.count ? sched.outside : sched.sp[next];
    in_fiber = next != sched.count;
    dllm_emu_fiber_switch(save, load);
}

inline size_t next_live() {
    for (size_t k = 1; k <= sched.count; ++k) {
        const size_t i = (sched.current + k) % sched.count;
        if (!sched.done[i]) return i;
    }
    return sched.count;
}

// Lets the other fibers run (from outside the fibers, the other OS threads).
inline void yield() {
    if (!in_fiber) {
        sched_yield();
        return;
    }
    // Fibers that spin on another process (a grid barrier of forked blocks) let it run.
    if ((++sched.switches & 4095) == 0) sched_yield();
    switch_to(next_live());
}

[[noreturn]] inline void entry() {
    const size_t me = sched.current;
    sched.body(sched.context, (int)me);
    sched.done[me] = 1;
    --sched.live;
    switch_to(sched.live == 0 ? sched.count : next_live());
    die("a finished fiber was resumed");
}

// Runs body(context, i) for i in 0..count as fibers, round robin from fiber 0, until all return.
inline void run(int count, void (*body)(void*, int), void* context) {
    if (in_fiber) die("fibers started from inside a fiber");
    if (count <= 0 || (size_t)count > kMaxFibers) die("fiber count outside 1..1024");
    const size_t page = 4096;
    while (sched.stacks.size() < (size_t)count) {
        void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) die("cannot map a fiber stack");
        if (mprotect(m, page, PROT_NONE) != 0) die("cannot protect a fiber stack's guard page");
        sched.stacks.push_back((unsigned char*)m + page);
    }
    sched.count = (size_t)count;
    sched.sp.assign(sched.count, nullptr);
    sched.done.assign(sched.count, 0);
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
    }
    for (auto& l : locals()) l->resize(sched.count + 1);
    sched.current = sched.count;
    switch_to(0);
    if (sched.live != 0) die("returned to the launch with fibers unfinished");
}

}  // namespace dllm_emu::fibers
