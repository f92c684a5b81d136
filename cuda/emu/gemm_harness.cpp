// The GEMM kernels on the CPU through cuda_emu.h, sm90_emu.h and wgmma_emu.h, for
// tests/gemm_emulation.rs: the plain ones of cuda/gemm.cu (gemm_naive, gemm_skinny_mg<G>,
// gemm_skinny2_mg<G>, gemm_wide: blocks one after another), the Hopper warpgroup-MMA ones of
// cuda/gemm_wgmma.cu (gemm_wgmma_wg2/3 with split-K through the workspace, and the cluster split
// gemm_wgmma_wg*_cs* of DLLM_GEMM_CLUSTER_SPLIT through distributed shared memory)
// and the Hopper weight-streaming ones of cuda/gemm_stream.cu (gemm_stream_mg<G>,
// and the persistent multi-job kernels gemm_stream_mlp_mg<G>, gemm_stream_tail_mg<G>,
// gemm_stream_chain_mg<G> of DLLM_FUSED_MLP, DLLM_NORM_FOLD and DLLM_LAYER_CHAIN: every block of a
// launch at once, each in its own process, so the producer warp's TMA ring, the stream-K reductions
// across blocks and the grid barriers between jobs run as on the device).
// `gemm_harness COMMAND DIR`:
//
//   gemm    dims [M, N, K, epi, kernel, per_split, grid x, y, z, workspace floats, counters];
//           kernel 0 naive, 1 skinny (per_split: chunks of 32 K), 2 skinny2, 3 wide (per_split:
//           tiles of 32 K); the grid and workspace are the Rust plan's (SkinnyPlan, WidePlan);
//           a.u16 [M, K], w.u16 [N, K], c.f32 (epi 2: the old values) -> c.u16 or c.f32
//
//   tiled   dims [M, N, K, epi, blocks, scale, prep, rope: q_heads, kv_heads, head_dim, period,
//           offset, seq_rows, bias, kernel, wg, ktiles_per_split, grid x, y, z, workspace floats,
//           counters]; kernel 0: gemm_stream_mg<G> on `blocks` blocks, 1: gemm_wgmma_wg<wg> on the
//           grid of the Rust WgmmaPlan (blocks one after another), 2: gemm_wgmma_wg<wg>_cs<z> on
//           that grid (clusters of its z splits, every block at once); a.u16 [M, K], w.u16 [N, K], c.f32 (epi 2: the old values),
//           sq_in.f32 [M, K / 32] (scale), gamma.f32 [N] (prep), inv_freq.f32 and bias.f32 (rope,
//           epi 4) -> c.u16 or c.f32, xg.u16 and sq_out.f32 (prep); for epi 4 also k.u16 v.u16 (the
//           caches), and qkv_ref.u16 k_ref.u16 v_ref.u16: the same GEMM stored as bf16, then
//           rope_qkv_bf16 (grouped), the path the epilogue replaces.
//   layer   dims [M, hidden, inter, n_qkv, jobs, blocks, fold, epi_qkv, rope: q_heads, kv_heads,
//           head_dim, period, offset, seq_rows]; jobs 2 (mlp), 3 (tail), 4 (chain). Inputs o.u16,
//           w_o.u16 (jobs >= 3), x.u16 and sq_x.f32 (jobs 2: the MLP's input and, with fold, its
//           norm's partial sums), w_gu.u16 (gate/up interleaved), w_d.u16, r.f32, gamma_mlp.f32,
//           gamma_attn.f32 (fold), w_qkv.u16 and inv_freq.f32 (jobs 4) -> for each of the fused
//           launch (suffix .fused) and the same jobs as single gemm_stream_mg<G> launches on the
//           same grid (.split): h.u16, r.f32, x.u16 sq1.f32 (jobs >= 3), xa.u16 sq2.f32 (fold),
//           qkv.u16 k.u16 v.u16 (jobs 4); and r0.f32.split: the residual after the first job.
// The block count is the Rust launcher's (StreamPlan::with_blocks, MlpPlan::new).
#include "cuda_emu.h"
#include "harness_io.h"

#include "../elementwise.cu"
#include "../gemm.cu"
#include "../gemm_stream.cu"
#include "../gemm_wgmma.cu"

namespace {

using namespace dllm_harness;

constexpr float kEps = 1e-5f;

// One GEMM of a stream launch: C = A · Wᵀ with epilogue `epi` and its parameters.
struct Job {
    const uint16_t* a;
    const uint16_t* w;
    void* c;
    int M, N, K, epi;
    DllmEpiParams ep;
};

int tiles_of(int N) { return (N + STREAM_ROWS - 1) / STREAM_ROWS; }

// A job's reduction workspace (poisoned) and counters (zero), sized as StreamPlan sizes them.
struct Scratch {
    float* ws;
    unsigned* counters;
    int n_counters;
};
Scratch scratch(const Job& j, int blocks, int G) {
    const int n_counters = tiles_of(j.N) * STREAM_CONSUMERS;
    return {dllm_emu::device_filled<float>((size_t)blocks * 2 * STREAM_CONSUMERS * STREAM_RT * G * 32 * 4, NAN),
            dllm_emu::device_filled<unsigned>(n_counters, 0u), n_counters};
}

// Every reduction counter back at zero, as the next launch needs.
void check_counters(const Scratch& s, const char* what) { expect_zero(s.counters, s.n_counters, what); }

size_t smem_of(int G) {
    switch (G) {
        case 1: return StreamCfg<1>::SMEM_BYTES;
        case 2: return StreamCfg<2>::SMEM_BYTES;
        case 3: return StreamCfg<3>::SMEM_BYTES;
        default: return StreamCfg<4>::SMEM_BYTES;
    }
}

CUtensorMap map_a(const Job& j, int G) { return dllm_emu::encode_map(j.a, j.M, j.K, 8 * G); }
CUtensorMap map_w(const Job& j) { return dllm_emu::encode_map(j.w, j.N, j.K, STREAM_ROWS); }

// gemm_stream_mg<G> on `blocks` blocks.
void stream(const Job& j, int blocks) {
    const int G = (j.M + 7) / 8;
    const Scratch s = scratch(j, blocks, G);
    const CUtensorMap ma = map_a(j, G), mw = map_w(j);
    dllm_emu_launch_concurrent(
        d3(blocks), d3(STREAM_THREADS),
        [&] {
            switch (G) {
                case 1: return gemm_stream_mg1(ma, mw, j.c, s.ws, s.counters, j.M, j.N, j.K, j.epi, j.ep);
                case 2: return gemm_stream_mg2(ma, mw, j.c, s.ws, s.counters, j.M, j.N, j.K, j.epi, j.ep);
                case 3: return gemm_stream_mg3(ma, mw, j.c, s.ws, s.counters, j.M, j.N, j.K, j.epi, j.ep);
                default: return gemm_stream_mg4(ma, mw, j.c, s.ws, s.counters, j.M, j.N, j.K, j.epi, j.ep);
            }
        },
        smem_of(G));
    check_counters(s, "gemm_stream_mg");
}

// The persistent launch of 2 (mlp), 3 (tail) or 4 (chain) jobs on `blocks` blocks (every job
// has at least that many (tile, chunk) pairs: MlpPlan::new).
void fused(const std::vector<Job>& jobs, int blocks) {
    const Job& last = jobs.back();
    const int G = (last.M + 7) / 8, M = last.M;
    std::vector<Scratch> s;
    for (const Job& j : jobs) s.push_back(scratch(j, blocks, G));
    unsigned* grid_bar = dllm_emu::device_filled<unsigned>(6, 0u);
    std::vector<CUtensorMap> maps;
    for (const Job& j : jobs) {
        maps.push_back(map_a(j, G));
        maps.push_back(map_w(j));
    }
    const CUtensorMap* m = maps.data();
    const size_t n = jobs.size();
    // Jobs in launch order: (out,) up, down (, qkv).
    const Job& up = jobs[n == 2 ? 0 : 1];
    const Job& down = jobs[n == 2 ? 1 : 2];
    const int hidden = down.N, inter = down.K;
    dllm_emu_launch_concurrent(
        d3(blocks), d3(STREAM_THREADS),
        [&] {
#define DLLM_H_MLP(GG)                                                                                          \
    return gemm_stream_mlp_mg##GG(m[0], m[1], m[2], m[3], up.c, down.c, s[0].ws, s[0].counters, s[1].ws,       \
                                  s[1].counters, grid_bar, M, hidden, inter, up.ep, down.ep)
#define DLLM_H_TAIL(GG)                                                                                         \
    return gemm_stream_tail_mg##GG(m[0], m[1], m[2], m[3], m[4], m[5], up.c, down.c, s[0].ws, s[0].counters,   \
                                   s[1].ws, s[1].counters, s[2].ws, s[2].counters, grid_bar, M, hidden, inter, \
                                   jobs[0].ep, up.ep, down.ep)
#define DLLM_H_CHAIN(GG)                                                                                        \
    return gemm_stream_chain_mg##GG(m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], up.c, down.c, last.c,      \
                                    s[0].ws, s[0].counters, s[1].ws, s[1].counters, s[2].ws, s[2].counters,     \
                                    s[3].ws, s[3].counters, grid_bar, M, hidden, inter, last.N, last.epi,       \
                                    jobs[0].ep, up.ep, down.ep, last.ep)
#define DLLM_H_BY_G(WHAT) \
    switch (G) {          \
        case 1: WHAT(1);  \
        case 2: WHAT(2);  \
        case 3: WHAT(3);  \
        default: WHAT(4); \
    }
            if (n == 2) DLLM_H_BY_G(DLLM_H_MLP)
            if (n == 3) DLLM_H_BY_G(DLLM_H_TAIL)
            DLLM_H_BY_G(DLLM_H_CHAIN)
#undef DLLM_H_BY_G
#undef DLLM_H_CHAIN
#undef DLLM_H_TAIL
#undef DLLM_H_MLP
        },
        smem_of(G));
    for (size_t i = 0; i < n; ++i) check_counters(s[i], "the fused launch");
    expect_zero(grid_bar, 6, "the fused launch's grid barrier");
}

// One launch of a cuda/gemm.cu kernel on the plan's grid.
int cmd_gemm(const std::vector<int>& d) {
    const int M = d[0], N = d[1], K = d[2], epi = d[3], kernel = d[4], per_split = d[5];
    const dim3 grid = d3(d[6], d[7], d[8]);
    const auto a = load<uint16_t>("a.u16");
    const auto w = load<uint16_t>("w.u16");
    std::vector<float> ws(std::max(d[9], 1), NAN);
    std::vector<unsigned> counters(std::max(d[10], 1), 0u);
    const bool f32 = epi == DLLM_EPI_STORE_F32 || epi == DLLM_EPI_ADD_F32;
    std::vector<float> cf = epi == DLLM_EPI_ADD_F32 ? load<float>("c.f32") : std::vector<float>((size_t)M * N, NAN);
    std::vector<uint16_t> cb(epi == DLLM_EPI_SWIGLU_BF16 ? (size_t)M * N / 2 : (size_t)M * N, 0x7fbf);
    void* c = f32 ? (void*)cf.data() : (void*)cb.data();
    const uint16_t *A = a.data(), *W = w.data();
    float* wsp = ws.data();
    unsigned* cp = counters.data();
    const int G = (M + 7) / 8;
    auto skinny = [&] {
        switch (G) {
            case 1: return gemm_skinny_mg1(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 2: return gemm_skinny_mg2(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 3: return gemm_skinny_mg3(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 4: return gemm_skinny_mg4(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 5: return gemm_skinny_mg5(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 6: return gemm_skinny_mg6(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 7: return gemm_skinny_mg7(A, W, c, wsp, cp, M, N, K, epi, per_split);
            default: return gemm_skinny_mg8(A, W, c, wsp, cp, M, N, K, epi, per_split);
        }
    };
    auto skinny2 = [&] {
        switch (G) {
            case 1: return gemm_skinny2_mg1(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 2: return gemm_skinny2_mg2(A, W, c, wsp, cp, M, N, K, epi, per_split);
            case 3: return gemm_skinny2_mg3(A, W, c, wsp, cp, M, N, K, epi, per_split);
            default: return gemm_skinny2_mg4(A, W, c, wsp, cp, M, N, K, epi, per_split);
        }
    };
    switch (kernel) {
        case 0: dllm_emu_launch(grid, d3(256), [&] { gemm_naive(A, W, c, M, N, K, epi); }); break;
        case 1: dllm_emu_launch(grid, d3(SKINNY_THREADS), skinny); break;
        case 2: dllm_emu_launch(grid, d3(SKINNY_THREADS), skinny2); break;
        default:
            dllm_emu_launch(
                grid, d3(WIDE_THREADS), [&] { gemm_wide(A, W, c, wsp, cp, M, N, K, epi, per_split); },
                WIDE_SMEM_BYTES);
    }
    expect_zero(counters.data(), counters.size(), "the split-K GEMM");
    if (f32)
        save("c.f32", cf);
    else
        save("c.u16", cb);
    return 0;
}

// The RoPE layout of a QKV product (dims[first..first + 6)) and its (cos, sin) table, computed by
// rope_table_f32 as RopeTable::new does.
struct Rope {
    int qh, kvh, hd, period, offset, seq_rows;
    float2* table;
    float* inv_freq;
};
Rope rope_of(const std::vector<int>& dims, size_t first) {
    Rope r{dims[first], dims[first + 1], dims[first + 2], dims[first + 3], dims[first + 4], dims[first + 5],
           nullptr, nullptr};
    if (r.hd == 0) return r;
    r.inv_freq = dllm_emu::device_copy(load<float>("inv_freq.f32"));
    const int positions = r.offset + r.period, half = r.hd / 2;
    r.table = dllm_emu::device_filled<float2>((size_t)positions * half, make_float2(NAN, NAN));
    dllm_emu_launch(d3((positions * half + 255) / 256), d3(256),
                    [&] { rope_table_f32(r.table, r.inv_freq, positions, half); });
    return r;
}

// The RoPE epilogue's parameters for rows x (qh + 2 kvh) hd, the caches k, v (seq_rows rows per
// canvas of `period` rows) written.
DllmRopeEpi rope_epi(const Rope& r, const float* bias, uint16_t* k, uint16_t* v) {
    DllmRopeEpi e{};
    e.table = r.table;
    e.bias = bias;
    e.k_cache = k;
    e.v_cache = v;
    e.q_cols = r.qh * r.hd;
    e.v_col = (r.qh + r.kvh) * r.hd;
    e.head_dim = r.hd;
    e.pos_period = r.period;
    e.pos_offset = r.offset;
    e.cache_seq_rows = r.seq_rows;
    return e;
}

size_t cache_len(const Rope& r, int M) { return (size_t)(M / r.period) * r.seq_rows * r.kvh * r.hd; }

template <class T>
void save_n(const std::string& name, const T* p, size_t n) {
    save(name.c_str(), p, n);
}

// The tiled kernel a `tiled` run launches: gemm_stream_mg<G> on `blocks` blocks, or gemm_wgmma_wg<wg>
// on the grid (and split-K workspace) of the Rust WgmmaPlan.
struct Tiled {
    int kind;  // 0 stream, 1 wgmma, 2 wgmma cluster split
    int blocks, wg, ktiles_per_split;
    dim3 grid;
    int ws_floats, n_counters;
};

// gemm_wgmma_wg<wg> on the plan's grid, blocks one after another.
void wgmma(const Job& j, const Tiled& t) {
    std::vector<float> ws(std::max(t.ws_floats, 1), NAN);
    std::vector<unsigned> counters(std::max(t.n_counters, 1), 0u);
    const DllmEpiParams ep = j.ep;
    dllm_emu_launch(
        t.grid, d3(128 * t.wg),
        [&] {
            if (t.wg == 2)
                gemm_wgmma_wg2(j.a, j.w, j.c, ws.data(), counters.data(), j.M, j.N, j.K, j.epi, t.ktiles_per_split, ep);
            else
                gemm_wgmma_wg3(j.a, j.w, j.c, ws.data(), counters.data(), j.M, j.N, j.K, j.epi, t.ktiles_per_split, ep);
        },
        t.wg == 2 ? WgCfg<2>::SMEM_BYTES : WgCfg<3>::SMEM_BYTES);
    expect_zero(counters.data(), counters.size(), "the wgmma split-K GEMM");
}

// gemm_wgmma_wg<wg>_cs<CS> on the plan's grid: clusters of the CS = grid.z splits of a tile,
// summed through distributed shared memory (every block at once, the cluster's arenas shared).
void cluster_split(const Job& j, const Tiled& t) {
    const DllmEpiParams ep = j.ep;
    const unsigned cs = t.grid.z;
    dllm_emu_launch_concurrent(
        t.grid, d3(128 * t.wg),
        [&] {
            const int kps = t.ktiles_per_split;
            if (t.wg == 2 && cs == 2) return gemm_wgmma_wg2_cs2(j.a, j.w, j.c, j.M, j.N, j.K, j.epi, kps, ep);
            if (t.wg == 2 && cs == 3) return gemm_wgmma_wg2_cs3(j.a, j.w, j.c, j.M, j.N, j.K, j.epi, kps, ep);
            if (t.wg == 3 && cs == 2) return gemm_wgmma_wg3_cs2(j.a, j.w, j.c, j.M, j.N, j.K, j.epi, kps, ep);
            if (t.wg == 3 && cs == 3) return gemm_wgmma_wg3_cs3(j.a, j.w, j.c, j.M, j.N, j.K, j.epi, kps, ep);
            dllm_emu::fail("no cluster-split kernel of that shape");
        },
        t.wg == 2 ? WgCfg<2>::SMEM_BYTES : WgCfg<3>::SMEM_BYTES, 120, dim3{1, 1, cs});
}

void run_tiled(const Job& j, const Tiled& t) {
    if (t.kind == 0)
        stream(j, t.blocks);
    else if (t.kind == 1)
        wgmma(j, t);
    else
        cluster_split(j, t);
}

int cmd_tiled(const std::vector<int>& dims) {
    const int M = dims[0], N = dims[1], K = dims[2], epi = dims[3], scale = dims[5], prep = dims[6];
    const int has_bias = dims[13];
    const Tiled tiled{dims[14], dims[4], dims[15], dims[16], d3(dims[17], dims[18], dims[19]), dims[20], dims[21]};
    const Rope rope = rope_of(dims, 7);
    const uint16_t* a = dllm_emu::device_copy(load<uint16_t>("a.u16"));
    const uint16_t* w = dllm_emu::device_copy(load<uint16_t>("w.u16"));
    Job j{a, w, nullptr, M, N, K, epi, DllmEpiParams{}};
    if (scale) {
        j.ep.norm.sq_in = dllm_emu::device_copy(load<float>("sq_in.f32"));
        j.ep.norm.parts = K / 32;
        j.ep.norm.d = K;
        j.ep.norm.eps = kEps;
    }
    if (prep) {
        j.ep.norm.gamma = dllm_emu::device_copy(load<float>("gamma.f32"));
        j.ep.norm.xg = dllm_emu::device_filled<uint16_t>((size_t)M * N, 0x7fbf);
        j.ep.norm.sq_out = dllm_emu::device_filled<float>((size_t)M * (N / 32), NAN);
    }
    if (epi == DLLM_EPI_STORE_F32 || epi == DLLM_EPI_ADD_F32) {
        float* c = epi == DLLM_EPI_ADD_F32 ? dllm_emu::device_copy(load<float>("c.f32"))
                                           : dllm_emu::device_filled<float>((size_t)M * N, NAN);
        j.c = c;
        run_tiled(j, tiled);
        save("c.f32", c, (size_t)M * N);
    } else if (epi == DLLM_EPI_ROPE_QKV) {
        const float* bias = has_bias ? dllm_emu::device_copy(load<float>("bias.f32")) : nullptr;
        const size_t cl = cache_len(rope, M);
        uint16_t *c = dllm_emu::device_filled<uint16_t>((size_t)M * N, 0x7fbf),
                 *k = dllm_emu::device_filled<uint16_t>(cl, 0x7fbf), *v = dllm_emu::device_filled<uint16_t>(cl, 0x7fbf);
        j.c = c;
        j.ep.rope = rope_epi(rope, bias, k, v);
        run_tiled(j, tiled);
        save("c.u16", c, (size_t)M * N);
        save("k.u16", k, cl);
        save("v.u16", v, cl);
        // The path the epilogue replaces: the GEMM stored as bf16, then rope_qkv_bf16 (grouped).
        uint16_t *c2 = dllm_emu::device_filled<uint16_t>((size_t)M * N, 0x7fbf),
                 *k2 = dllm_emu::device_filled<uint16_t>(cl, 0x7fbf), *v2 = dllm_emu::device_filled<uint16_t>(cl, 0x7fbf);
        Job plain = j;
        plain.c = c2;
        plain.epi = DLLM_EPI_STORE_BF16;
        plain.ep.rope = DllmRopeEpi{};
        run_tiled(plain, tiled);
        dllm_emu_launch(d3(M), d3(DLLM_ROW_THREADS), [&] {
            rope_qkv_bf16(c2, rope.inv_freq, bias, k2, v2, N, rope.qh, rope.kvh, rope.qh * rope.hd,
                          (rope.qh + rope.kvh) * rope.hd, rope.hd, rope.period, rope.offset, rope.seq_rows, 0,
                          nullptr, 0, 1, nullptr, nullptr);
        });
        save("qkv_ref.u16", c2, (size_t)M * N);
        save("k_ref.u16", k2, cl);
        save("v_ref.u16", v2, cl);
    } else {
        const size_t n = epi == DLLM_EPI_SWIGLU_BF16 ? (size_t)M * N / 2 : (size_t)M * N;
        uint16_t* c = dllm_emu::device_filled<uint16_t>(n, 0x7fbf);
        j.c = c;
        run_tiled(j, tiled);
        save("c.u16", c, n);
    }
    if (prep) {
        save("xg.u16", j.ep.norm.xg, (size_t)M * N);
        save("sq_out.f32", j.ep.norm.sq_out, (size_t)M * (N / 32));
    }
    return 0;
}

// The layer's buffers (device memory), fresh for each of the two runs.
struct LayerBuffers {
    uint16_t *h, *x, *xa, *qkv, *k, *v;
    float *r, *sq1, *sq2;
};

int cmd_layer(const std::vector<int>& dims) {
    const int M = dims[0], hidden = dims[1], inter = dims[2], n_qkv = dims[3], n_jobs = dims[4], blocks = dims[5];
    const int fold = dims[6], epi_qkv = dims[7];
    const Rope rope = rope_of(dims, 8);
    const bool out_job = n_jobs >= 3, qkv_job = n_jobs == 4;
    auto in16 = [](const char* f) { return dllm_emu::device_copy(load<uint16_t>(f)); };
    auto in32 = [](const char* f) { return dllm_emu::device_copy(load<float>(f)); };
    const uint16_t* o = out_job ? in16("o.u16") : nullptr;
    const uint16_t* w_o = out_job ? in16("w_o.u16") : nullptr;
    const uint16_t* x_in = out_job ? nullptr : in16("x.u16");
    const float* sq_x = (!out_job && fold) ? in32("sq_x.f32") : nullptr;
    const uint16_t* w_gu = in16("w_gu.u16");
    const uint16_t* w_d = in16("w_d.u16");
    const std::vector<float> r_in = load<float>("r.f32");
    const float* gamma_mlp = out_job ? in32("gamma_mlp.f32") : nullptr;
    const float* gamma_attn = fold ? in32("gamma_attn.f32") : nullptr;
    const uint16_t* w_qkv = qkv_job ? in16("w_qkv.u16") : nullptr;
    const size_t mh = (size_t)M * hidden, cl = (qkv_job && rope.hd > 0) ? cache_len(rope, M) : 0;

    auto run = [&](bool fuse, const std::string& suffix) {
        LayerBuffers b{};
        b.h = dllm_emu::device_filled<uint16_t>((size_t)M * inter, 0x7fbf);
        b.r = dllm_emu::device_copy(r_in);
        if (out_job) {
            b.x = dllm_emu::device_filled<uint16_t>(mh, 0x7fbf);
            b.sq1 = dllm_emu::device_filled<float>(mh / 32, NAN);
        }
        if (fold) {
            b.xa = dllm_emu::device_filled<uint16_t>(mh, 0x7fbf);
            b.sq2 = dllm_emu::device_filled<float>(mh / 32, NAN);
        }
        if (qkv_job) {
            b.qkv = dllm_emu::device_filled<uint16_t>((size_t)M * n_qkv, 0x7fbf);
            b.k = dllm_emu::device_filled<uint16_t>(cl, 0x7fbf);
            b.v = dllm_emu::device_filled<uint16_t>(cl, 0x7fbf);
        }
        auto row_scale = [&](const float* sq) {
            DllmNormEpi e{};
            e.sq_in = sq;
            e.parts = hidden / 32;
            e.d = hidden;
            e.eps = kEps;
            return e;
        };
        auto prep = [&](const float* gamma, uint16_t* xg, float* sq) {
            DllmNormEpi e{};
            e.gamma = gamma;
            e.xg = xg;
            e.sq_out = sq;
            return e;
        };
        std::vector<Job> jobs;
        if (out_job) {
            Job j{o, w_o, b.r, M, hidden, hidden, DLLM_EPI_ADD_F32, DllmEpiParams{}};
            j.ep.norm = prep(gamma_mlp, b.x, b.sq1);
            jobs.push_back(j);
        }
        Job up{out_job ? b.x : x_in, w_gu, b.h, M, 2 * inter, hidden, DLLM_EPI_SWIGLU_BF16, DllmEpiParams{}};
        if (out_job) up.ep.norm = row_scale(b.sq1);
        if (!out_job && fold) up.ep.norm = row_scale(sq_x);
        jobs.push_back(up);
        Job down{b.h, w_d, b.r, M, hidden, inter, DLLM_EPI_ADD_F32, DllmEpiParams{}};
        if (fold) down.ep.norm = prep(gamma_attn, b.xa, b.sq2);
        jobs.push_back(down);
        if (qkv_job) {
            Job q{b.xa, w_qkv, b.qkv, M, n_qkv, hidden, epi_qkv, DllmEpiParams{}};
            q.ep.norm = row_scale(b.sq2);
            if (epi_qkv == DLLM_EPI_ROPE_QKV) q.ep.rope = rope_epi(rope, nullptr, b.k, b.v);
            jobs.push_back(q);
        }
        if (fuse) {
            fused(jobs, blocks);
        } else {
            for (size_t i = 0; i < jobs.size(); ++i) {
                stream(jobs[i], blocks);
                if (i == 0) save_n("r0.f32" + suffix, b.r, mh);
            }
        }
        save_n("h.u16" + suffix, b.h, (size_t)M * inter);
        save_n("r.f32" + suffix, b.r, mh);
        if (out_job) {
            save_n("x.u16" + suffix, b.x, mh);
            save_n("sq1.f32" + suffix, b.sq1, mh / 32);
        }
        if (fold) {
            save_n("xa.u16" + suffix, b.xa, mh);
            save_n("sq2.f32" + suffix, b.sq2, mh / 32);
        }
        if (qkv_job) {
            save_n("qkv.u16" + suffix, b.qkv, (size_t)M * n_qkv);
            save_n("k.u16" + suffix, b.k, cl);
            save_n("v.u16" + suffix, b.v, cl);
        }
    };
    run(true, ".fused");
    run(false, ".split");
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return dllm_harness::dispatch(argc, argv, "gemm_harness",
                                  {{"gemm", cmd_gemm}, {"tiled", cmd_tiled}, {"layer", cmd_layer}});
}
