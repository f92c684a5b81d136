// The mixture-of-experts kernels (cuda/moe.cu, cuda/gemm_grouped.cu, rmsnorm_heads_bf16 and
// swiglu_bf16 of cuda/elementwise.cu) run on the CPU through cuda_emu.h, for
// tests/kernel_emulation.rs: `harness COMMAND DIR` reads DIR/dims.i32 and the command's inputs
// (raw little-endian arrays), launches the kernels with the grids their Rust launchers use
// (src/backend/cuda/moe.rs, gemm_grouped.rs, elementwise.rs), and writes the outputs into DIR.
//
//   route    dims [rows, E, k]; logits.f32                -> sel_e.i32 sel_w.f32 off.i32 cnt.i32
//                                                            pair_pos.i32 grp_row.i32
//   grouped  dims [rows, E, k, N, K, epi, gather]; logits.f32 (routed first), a.u16 (rows x K
//            gathered, or pairs x K in order), w.u16 (E x N x K) -> c.f32 or c.u16, and the routing
//   mixture  dims [rows, E, k, d, h, fused]; logits.f32, xn.u16, x.f32, gate_up.u16, down.u16
//                                                         -> x.f32 (x += the mixture)
//   heads    dims [rows, stride, q_heads, kv_heads, k_col, head_dim]; qkv.u16, qw.f32, kw.f32
//                                                         -> qkv.u16
#include "cuda_emu.h"

#include <math.h>

#include <cstdio>
#include <string>

#include "../elementwise.cu"
#include "../gemm_grouped.cu"
#include "../moe.cu"

namespace {

std::string dir;

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
void save(const char* name, const std::vector<T>& v) {
    FILE* f = std::fopen((dir + "/" + name).c_str(), "wb");
    if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
        std::fprintf(stderr, "harness: cannot write %s\n", name);
        std::exit(2);
    }
    std::fclose(f);
}

dim3 d3(unsigned x, unsigned y = 1, unsigned z = 1) { return dim3{x, y, z}; }

// The routing buffers of `rows` rows.
struct Routing {
    std::vector<int> sel_e, off, cnt, pair_pos, grp_row;
    std::vector<float> sel_w;
};

Routing route(const std::vector<float>& logits, int rows, int E, int k) {
    const int pairs = rows * k;
    Routing r{std::vector<int>(pairs, -7), std::vector<int>(E, -7), std::vector<int>(E, -7),
              std::vector<int>(pairs, -7), std::vector<int>(pairs, -7), std::vector<float>(pairs, NAN)};
    dllm_emu_launch(d3((rows + 3) / 4), d3(MOE_THREADS),
                    [&] { moe_route(logits.data(), rows, E, k, r.sel_e.data(), r.sel_w.data()); });
    dllm_emu_launch(d3(E), d3(MOE_GROUP_THREADS), [&] {
        moe_group(r.sel_e.data(), pairs, k, r.off.data(), r.cnt.data(), r.pair_pos.data(), r.grp_row.data());
    });
    return r;
}

void save_routing(const Routing& r) {
    save("sel_e.i32", r.sel_e);
    save("sel_w.f32", r.sel_w);
    save("off.i32", r.off);
    save("cnt.i32", r.cnt);
    save("pair_pos.i32", r.pair_pos);
    save("grp_row.i32", r.grp_row);
}

// The grouped GEMM with the rows per chunk gemm_grouped.rs's groups_for picks.
void grouped(const uint16_t* A, const int* a_rows, const uint16_t* W, void* C, const Routing& r, int max_rows,
             int E, int N, int K, int epi) {
    const int G = std::clamp((max_rows + 7) / 8, 1, 8);
    const long long stride = (long long)N * K;
    const int *off = r.off.data(), *cnt = r.cnt.data();
    auto run = [&](auto g) {
        constexpr int GG = decltype(g)::value;
        dllm_emu_launch(d3((max_rows + 8 * GG - 1) / (8 * GG), (N + 63) / 64, E), d3(SKINNY_THREADS), [&] {
            if (a_rows)
                gemm_grouped_body<GG, true>(A, a_rows, W, stride, C, off, cnt, N, K, epi);
            else
                gemm_grouped_body<GG, false>(A, nullptr, W, stride, C, off, cnt, N, K, epi);
        });
    };
    switch (G) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 5: run(std::integral_constant<int, 5>{}); break;
        case 6: run(std::integral_constant<int, 6>{}); break;
        case 7: run(std::integral_constant<int, 7>{}); break;
        default: run(std::integral_constant<int, 8>{}); break;
    }
}

int cmd_route(const std::vector<int>& dims) {
    const int rows = dims[0], E = dims[1], k = dims[2];
    save_routing(route(load<float>("logits.f32"), rows, E, k));
    return 0;
}

int cmd_grouped(const std::vector<int>& dims) {
    const int rows = dims[0], E = dims[1], k = dims[2], N = dims[3], K = dims[4], epi = dims[5], gather = dims[6];
    const int pairs = rows * k;
    const Routing r = route(load<float>("logits.f32"), rows, E, k);
    const auto a = load<uint16_t>("a.u16");
    const auto w = load<uint16_t>("w.u16");
    if (epi == DLLM_EPI_STORE_F32) {
        std::vector<float> c(pairs * N, NAN);
        grouped(a.data(), gather ? r.grp_row.data() : nullptr, w.data(), c.data(), r, rows, E, N, K, epi);
        save("c.f32", c);
    } else {
        std::vector<uint16_t> c(epi == DLLM_EPI_SWIGLU_BF16 ? pairs * N / 2 : pairs * N, 0x7fbf);
        grouped(a.data(), gather ? r.grp_row.data() : nullptr, w.data(), c.data(), r, rows, E, N, K, epi);
        save("c.u16", c);
    }
    save_routing(r);
    return 0;
}

int cmd_mixture(const std::vector<int>& dims) {
    const int rows = dims[0], E = dims[1], k = dims[2], d = dims[3], h = dims[4], fused = dims[5];
    const int pairs = rows * k;
    const Routing r = route(load<float>("logits.f32"), rows, E, k);
    const auto xn = load<uint16_t>("xn.u16");
    auto x = load<float>("x.f32");
    const auto gate_up = load<uint16_t>("gate_up.u16");
    const auto down = load<uint16_t>("down.u16");
    std::vector<uint16_t> act(pairs * h, 0x7fbf);
    if (fused) {
        grouped(xn.data(), r.grp_row.data(), gate_up.data(), act.data(), r, rows, E, 2 * h, d, DLLM_EPI_SWIGLU_BF16);
    } else {
        std::vector<uint16_t> gu(pairs * 2 * h, 0x7fbf);
        grouped(xn.data(), r.grp_row.data(), gate_up.data(), gu.data(), r, rows, E, 2 * h, d, DLLM_EPI_STORE_BF16);
        const int total = pairs * h;
        dllm_emu_launch(d3(std::clamp((total + 255) / 256, 1, 8192)), d3(256),
                        [&] { swiglu_bf16(gu.data(), act.data(), pairs, h); });
    }
    std::vector<float> y(pairs * d, NAN);
    grouped(act.data(), nullptr, down.data(), y.data(), r, rows, E, d, h, DLLM_EPI_STORE_F32);
    dllm_emu_launch(d3(rows), d3(MOE_THREADS),
                    [&] { moe_combine(y.data(), r.pair_pos.data(), r.sel_w.data(), k, d, x.data()); });
    save("x.f32", x);
    return 0;
}

int cmd_heads(const std::vector<int>& dims) {
    const int rows = dims[0], stride = dims[1], qh = dims[2], kvh = dims[3], kcol = dims[4], hd = dims[5];
    auto qkv = load<uint16_t>("qkv.u16");
    const auto qw = load<float>("qw.f32");
    const auto kw = load<float>("kw.f32");
    const int items = rows * (qh + kvh);
    dllm_emu_launch(d3((items + 7) / 8), d3(DLLM_ROW_THREADS), [&] {
        rmsnorm_heads_bf16(qkv.data(), rows, stride, qh, kvh, kcol, hd, qw.data(), kw.data(), 1e-6f);
    });
    save("qkv.u16", qkv);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: harness route|grouped|mixture|heads DIR\n");
        return 2;
    }
    dir = argv[2];
    const std::string cmd = argv[1];
    const auto dims = load<int>("dims.i32");
    if (cmd == "route") return cmd_route(dims);
    if (cmd == "grouped") return cmd_grouped(dims);
    if (cmd == "mixture") return cmd_mixture(dims);
    if (cmd == "heads") return cmd_heads(dims);
    std::fprintf(stderr, "harness: unknown command %s\n", cmd.c_str());
    return 2;
}
