// The mixture-of-experts kernels (cuda/moe.cu, cuda/gemm_grouped.cu, rmsnorm_heads_bf16 and
// swiglu_bf16 of cuda/elementwise.cu) and the fused RoPE + K/V cache write (rope_qkv_bf16: the
// grouped layout of DLLM_FUSED_ROPE, the per-canvas caches of DLLM_PACKED_SESSIONS) run on the
// CPU through cuda_emu.h (with the sampler's predict and commit kernels), for
// tests/kernel_emulation.rs: `harness COMMAND DIR` reads DIR/dims.i32 and the command's inputs
// (raw little-endian arrays), launches the kernels with the grids their Rust launchers use
// (src/backend/cuda/moe.rs, gemm_grouped.rs, elementwise.rs), and writes the outputs into DIR.
//
//   route    dims [rows, E, k]; logits.f32                -> sel_e.i32 sel_w.f32 off.i32 cnt.i32
//                                                            pair_pos.i32 grp_row.i32
//   grouped  dims [rows, E, k, N, K, epi, gather, G, chunks, tiles]; logits.f32 (routed first),
//            a.u16 (rows x K gathered, or pairs x K in order), w.u16 (E x N x K) -> c.f32 or c.u16,
//            and the routing
//   mixture  dims [rows, E, k, d, h, fused, G, chunks, tiles_up, tiles_down]; logits.f32, xn.u16,
//            x.f32, gate_up.u16, down.u16                 -> x.f32 (x += the mixture)
// The grouped GEMM's G, chunk and tile counts come from the test: its Rust launcher's
// launch_grid (src/backend/cuda/gemm_grouped.rs), so the emulation runs the grid the device gets.
//   heads    dims [rows, stride, q_heads, kv_heads, k_col, head_dim]; qkv.u16, qw.f32, kw.f32
//                                                         -> qkv.u16
//   predict  dims [rows, width, vocab_n, mask, first, mode, splits, chunk, vec_ok]; logits.f32,
//            positions.i32, rule.u64 [temperature bits, seed, step] -> tokens.i32 conf.f64
//            (sampling.cu's predict_partial + predict_finalize, splits and chunk from the Rust
//            launcher's split_plan)
//   commit   dims [batch, rows per canvas, canvas_len, mask, k, use_threshold]; canvas.i32,
//            tokens.i32, conf.f64, positions.i32, threshold.f64 -> canvas.i32 record.i32
//            (commit_kernel on Sampler::commit's grid)
//   rope_qkv dims [rows, q_heads, kv_heads, head_dim, period, offset, grouped, vec, bias, cache,
//            seq_rows]; qkv.u16, inv_freq.f32, (bias.f32), (starts.i32 for cache 2) -> qkv.u16, and
//            k.u16 v.u16: the batch cache (cache 1: canvases x seq_rows rows) or each canvas's own
//            (cache 2: seq_rows rows each, addressed through the per-canvas table), back to back
#include "cuda_emu.h"
#include "harness_io.h"

#include <math.h>

#include <unistd.h>

#include <cstdio>
#include <string>

#include "../elementwise.cu"
#include "../gemm_grouped.cu"
#include "../moe.cu"
#include "../sampling.cu"

namespace {

using namespace dllm_harness;

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

// The grouped GEMM kernels (gemm_grouped_mg<G>, gemm_grouped_seq_mg<G>) on the grid (chunks,
// tiles, E).
void grouped(const uint16_t* A, const int* a_rows, const uint16_t* W, void* C, const Routing& r, int G, int chunks,
             int tiles, int E, int N, int K, int epi) {
    const long long stride = (long long)N * K;
    const int *off = r.off.data(), *cnt = r.cnt.data();
    auto run = [&](auto g) {
        constexpr int GG = decltype(g)::value;
        auto gather = [&] {
            switch (GG) {
                case 1: return gemm_grouped_mg1(A, a_rows, W, stride, C, off, cnt, N, K, epi);
                case 2: return gemm_grouped_mg2(A, a_rows, W, stride, C, off, cnt, N, K, epi);
                case 3: return gemm_grouped_mg3(A, a_rows, W, stride, C, off, cnt, N, K, epi);
                case 4: return gemm_grouped_mg4(A, a_rows, W, stride, C, off, cnt, N, K, epi);
                case 5: return gemm_grouped_mg5(A, a_rows, W, stride, C, off, cnt, N, K, epi);
                case 6: return gemm_grouped_mg6(A, a_rows, W, stride, C, off, cnt, N, K, epi);
                case 7: return gemm_grouped_mg7(A, a_rows, W, stride, C, off, cnt, N, K, epi);
                default: return gemm_grouped_mg8(A, a_rows, W, stride, C, off, cnt, N, K, epi);
            }
        };
        auto in_order = [&] {
            switch (GG) {
                case 1: return gemm_grouped_seq_mg1(A, W, stride, C, off, cnt, N, K, epi);
                case 2: return gemm_grouped_seq_mg2(A, W, stride, C, off, cnt, N, K, epi);
                case 3: return gemm_grouped_seq_mg3(A, W, stride, C, off, cnt, N, K, epi);
                case 4: return gemm_grouped_seq_mg4(A, W, stride, C, off, cnt, N, K, epi);
                case 5: return gemm_grouped_seq_mg5(A, W, stride, C, off, cnt, N, K, epi);
                case 6: return gemm_grouped_seq_mg6(A, W, stride, C, off, cnt, N, K, epi);
                case 7: return gemm_grouped_seq_mg7(A, W, stride, C, off, cnt, N, K, epi);
                default: return gemm_grouped_seq_mg8(A, W, stride, C, off, cnt, N, K, epi);
            }
        };
        dllm_emu_launch(d3(chunks, tiles, E), d3(SKINNY_THREADS), [&] {
            if (a_rows)
                gather();
            else
                in_order();
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
    const int G = dims[7], chunks = dims[8], tiles = dims[9];
    const int pairs = rows * k;
    const Routing r = route(load<float>("logits.f32"), rows, E, k);
    const auto a = load<uint16_t>("a.u16");
    const auto w = load<uint16_t>("w.u16");
    if (epi == DLLM_EPI_STORE_F32) {
        std::vector<float> c(pairs * N, NAN);
        grouped(a.data(), gather ? r.grp_row.data() : nullptr, w.data(), c.data(), r, G, chunks, tiles, E, N, K, epi);
        save("c.f32", c);
    } else {
        std::vector<uint16_t> c(epi == DLLM_EPI_SWIGLU_BF16 ? pairs * N / 2 : pairs * N, 0x7fbf);
        grouped(a.data(), gather ? r.grp_row.data() : nullptr, w.data(), c.data(), r, G, chunks, tiles, E, N, K, epi);
        save("c.u16", c);
    }
    save_routing(r);
    return 0;
}

int cmd_mixture(const std::vector<int>& dims) {
    const int rows = dims[0], E = dims[1], k = dims[2], d = dims[3], h = dims[4], fused = dims[5];
    const int G = dims[6], chunks = dims[7], tiles_up = dims[8], tiles_down = dims[9];
    const int pairs = rows * k;
    const Routing r = route(load<float>("logits.f32"), rows, E, k);
    const auto xn = load<uint16_t>("xn.u16");
    auto x = load<float>("x.f32");
    const auto gate_up = load<uint16_t>("gate_up.u16");
    const auto down = load<uint16_t>("down.u16");
    std::vector<uint16_t> act(pairs * h, 0x7fbf);
    if (fused) {
        grouped(xn.data(), r.grp_row.data(), gate_up.data(), act.data(), r, G, chunks, tiles_up, E, 2 * h, d,
                DLLM_EPI_SWIGLU_BF16);
    } else {
        std::vector<uint16_t> gu(pairs * 2 * h, 0x7fbf);
        grouped(xn.data(), r.grp_row.data(), gate_up.data(), gu.data(), r, G, chunks, tiles_up, E, 2 * h, d,
                DLLM_EPI_STORE_BF16);
        // Elementwise::swiglu's choice for aligned buffers and h % 8 == 0 (every mixture's): the
        // 16-byte kernel, grid_for(pairs * h / 8).
        const int total = pairs * h / 8;
        dllm_emu_launch(d3(std::clamp((total + 255) / 256, 1, 8192)), d3(256),
                        [&] { swiglu_bf16_v8(gu.data(), act.data(), pairs, h); });
    }
    std::vector<float> y(pairs * d, NAN);
    grouped(act.data(), nullptr, down.data(), y.data(), r, G, chunks, tiles_down, E, d, h, DLLM_EPI_STORE_F32);
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

int cmd_rope_qkv(const std::vector<int>& dims) {
    const int rows = dims[0], qh = dims[1], kvh = dims[2], hd = dims[3], period = dims[4], offset = dims[5];
    const int grouped = dims[6], vec = dims[7], has_bias = dims[8], cache = dims[9], seq_rows = dims[10];
    const int kv = kvh * hd, stride = (qh + 2 * kvh) * hd, canvases = rows / period;
    auto qkv = load<uint16_t>("qkv.u16");
    const auto inv_freq = load<float>("inv_freq.f32");
    const std::vector<float> bias = has_bias ? load<float>("bias.f32") : std::vector<float>();
    const std::vector<int> starts = cache == 2 ? load<int>("starts.i32") : std::vector<int>();
    std::vector<uint16_t> k(canvases * seq_rows * kv, 0x7fbf), v(canvases * seq_rows * kv, 0x7fbf);
    std::vector<uint16_t*> table;
    for (int c = 0; c < canvases; ++c) table.push_back(k.data() + (size_t)c * seq_rows * kv);
    for (int c = 0; c < canvases; ++c) table.push_back(v.data() + (size_t)c * seq_rows * kv);
    dllm_emu_launch(d3(rows), d3(DLLM_ROW_THREADS), [&] {
        rope_qkv_bf16(qkv.data(), inv_freq.data(), has_bias ? bias.data() : nullptr, cache == 1 ? k.data() : nullptr,
                      cache == 1 ? v.data() : nullptr, stride, qh, kvh, qh * hd, (qh + kvh) * hd, hd, period, offset,
                      seq_rows, vec, nullptr, 0, grouped, cache == 2 ? starts.data() : nullptr,
                      cache == 2 ? table.data() : nullptr);
    });
    save("qkv.u16", qkv);
    save("k.u16", k);
    save("v.u16", v);
    return 0;
}

int cmd_predict(const std::vector<int>& dims) {
    const int rows = dims[0], width = dims[1], vocab_n = dims[2], mask = dims[3], first = dims[4], mode = dims[5];
    const int splits = dims[6], chunk = dims[7], vec_ok = dims[8];
    const auto logits = load<float>("logits.f32");
    const auto positions = load<int>("positions.i32");
    const auto rule = load<uint64_t>("rule.u64");
    double temperature;
    std::memcpy(&temperature, &rule[0], sizeof temperature);
    const unsigned long long seed = rule[1], step = rule[2];
    std::vector<PredictPartial> part(rows * splits);
    std::vector<int> tokens(rows, -7);
    std::vector<double> conf(rows, NAN);
    dllm_emu_launch(d3(splits, rows), d3(PREDICT_THREADS), [&] {
        predict_partial(logits.data(), width, positions.data(), vocab_n, mask, first, temperature, seed, step, mode,
                        chunk, vec_ok, part.data());
    });
    dllm_emu_launch(d3((rows + 127) / 128), d3(128), [&] {
        predict_finalize(logits.data(), width, positions.data(), rows, splits, first, temperature, seed, step, mode,
                         part.data(), tokens.data(), conf.data());
    });
    save("tokens.i32", tokens);
    save("conf.f64", conf);
    return 0;
}

int cmd_commit(const std::vector<int>& dims) {
    const int batch = dims[0], n = dims[1], canvas_len = dims[2], mask = dims[3], k = dims[4], use_threshold = dims[5];
    auto canvas = load<int>("canvas.i32");
    const auto tokens = load<int>("tokens.i32");
    const auto conf = load<double>("conf.f64");
    const auto positions = load<int>("positions.i32");
    const double threshold = load<double>("threshold.f64")[0];
    std::vector<int> record((size_t)batch * (1 + 2 * n), INT32_MIN);
    // Sampler::commit's launch: a block per canvas, the rows rounded up to whole warps, 20 bytes
    // of shared memory per row.
    dllm_emu_launch(
        d3(batch), d3((n + 31) / 32 * 32),
        [&] {
            commit_kernel(canvas.data(), canvas_len, tokens.data(), conf.data(), positions.data(), n, mask, k,
                          threshold, use_threshold, record.data());
        },
        (size_t)n * 20);
    save("canvas.i32", canvas);
    save("record.i32", record);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return dllm_harness::dispatch(argc, argv, "harness",
                                  {{"route", cmd_route},
                                   {"grouped", cmd_grouped},
                                   {"mixture", cmd_mixture},
                                   {"heads", cmd_heads},
                                   {"rope_qkv", cmd_rope_qkv},
                                   {"predict", cmd_predict},
                                   {"commit", cmd_commit}});
}
