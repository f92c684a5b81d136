// The emulation harnesses' file exchange with tests/kernel_emulation.rs: a run's folder holds
// dims.i32 and the command's inputs as raw little-endian arrays; outputs are written beside them.
#pragma once
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "cuda_emu.h"

namespace dllm_harness {

inline std::string dir;

template <class T>
std::vector<T> load(const char* name) {
    std::vector<T> v;
    FILE* f = std::fopen((dir + "/" + name).c_str(), "rb");
    if (!f) {
        std::fprintf(stderr, "harness: cannot open %s\n", name);
        std::exit(2);
    }
    std::fseek(f, 0, SEEK_END);
    const long bytes = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    v.resize(bytes / sizeof(T));
    if (std::fread(v.data(), 1, bytes, f) != (size_t)bytes) std::exit(2);
    std::fclose(f);
    return v;
}

template <class T>
void save(const char* name, const T* data, size_t n) {
    FILE* f = std::fopen((dir + "/" + name).c_str(), "wb");
    if (!f || std::fwrite(data, sizeof(T), n, f) != n) {
        std::fprintf(stderr, "harness: cannot write %s\n", name);
        std::exit(2);
    }
    std::fclose(f);
}

template <class T>
void save(const char* name, const std::vector<T>& v) {
    save(name, v.data(), v.size());
}

inline dim3 d3(unsigned x, unsigned y = 1, unsigned z = 1) { return dim3{x, y, z}; }

// Enters the run's folder and reads its dims; a deadlocked collective then fails the test after
// ten minutes instead of hanging CI.
inline std::vector<int> start(const char* folder) {
    dir = folder;
    alarm(600);
    return load<int>("dims.i32");
}

// Fails the run unless every one of the `n` reduction counters at `c` is back at zero (the
// launches' last-arriving blocks reset them, as the next launch needs).
inline void expect_zero(const unsigned* c, size_t n, const char* what) {
    for (size_t i = 0; i < n; ++i)
        if (c[i] != 0u) {
            std::fprintf(stderr, "harness: %s left counter %zu at %u\n", what, i, c[i]);
            std::exit(1);
        }
}

using Command = int (*)(const std::vector<int>&);

// A harness's main: `NAME COMMAND DIR` runs the command named COMMAND on DIR's dims.
inline int dispatch(int argc, char** argv, const char* name,
                    std::initializer_list<std::pair<const char*, Command>> commands) {
    if (argc != 3) {
        std::string names;
        for (const auto& c : commands) names += (names.empty() ? "" : "|") + std::string(c.first);
        std::fprintf(stderr, "usage: %s %s DIR\n", name, names.c_str());
        return 2;
    }
    const std::string cmd = argv[1];
    const auto dims = start(argv[2]);
    for (const auto& c : commands)
        if (cmd == c.first) return c.second(dims);
    std::fprintf(stderr, "%s: unknown command %s\n", name, cmd.c_str());
    return 2;
}

}  // namespace dllm_harness
