// The attention kernels (cuda/attention.cu: attention_naive, attention_mma_d*, attention_mma2_d*,
// attention_split_d*, attention_keys_d*) on the CPU through cuda_emu.h, for
// tests/attention_emulation.rs, with the grids, shared memory and workspaces of their Rust
// launcher (src/backend/cuda/attention.rs). `attention_harness attn DIR`:
//
//   attn  dims [batch, sq, skv, n_heads, n_kv_heads, head_dim, variant, tiles_per_split, kv_len,
//         canvases, q_stride, o_stride, kv_stride, kv_batch_stride]; variant 0 naive, 1 mma (3
//         slots), 2 mma2 (2 slots), 3 split (tiles_per_split key tiles per block), 4 keys; kv_len 1:
//         kv_len.i32 holds each batch element's key count; canvases 1: K and V are read through the
//         per-canvas table (each canvas's rows copied into an allocation of its own).
//         q.u16 (batch * sq rows of q_stride), k.u16 v.u16 (rows of kv_stride, kv_batch_stride
//         per batch element), out.u16 (batch * sq rows of o_stride: the columns the kernel must
//         keep) -> out.u16. dims[14] = 1: every block of the grid at once (each in its own process:
//         the split kernel's last-arriving merge under real concurrency), else one after another.
#include "cuda_emu.h"
#include "harness_io.h"

#include "../attention.cu"

namespace {

using namespace dllm_harness;

constexpr int kKeys = 64;  // key tile (MMA_KEYS in attention.rs)

int cmd_attn(const std::vector<int>& d) {
    const int batch = d[0], sq = d[1], skv = d[2], nh = d[3], nkv = d[4], hd = d[5], variant = d[6];
    const int tps = d[7], has_len = d[8], canvases = d[9];
    const long long qs = d[10], os = d[11], kvs = d[12], kvb = d[13];
    const bool concurrent = d[14] != 0;
    const auto q = load<uint16_t>("q.u16");
    const auto k = load<uint16_t>("k.u16");
    const auto v = load<uint16_t>("v.u16");
    const auto out_in = load<uint16_t>("out.u16");
    const std::vector<int> kv_len = has_len ? load<int>("kv_len.i32") : std::vector<int>();
    // The per-canvas table: canvas b's K rows, then its V rows, each in its own buffer.
    // Everything in device buffers (shared with forked blocks).
    std::vector<const bf16*> table;
    if (canvases) {
        for (int which = 0; which < 2; ++which)
            for (int b = 0; b < batch; ++b) {
                const auto& src = which ? v : k;
                table.push_back(reinterpret_cast<const bf16*>(dllm_emu::device_copy(std::vector<uint16_t>(
                    src.begin() + (size_t)b * kvb * kvs, src.begin() + ((size_t)b * kvb + skv) * kvs))));
            }
    }
    auto dev_bf16 = [](const std::vector<uint16_t>& x) { return reinterpret_cast<bf16*>(dllm_emu::device_copy(x)); };
    const bf16 *qp = dev_bf16(q), *kp = dev_bf16(k), *vp = dev_bf16(v);
    bf16* op = dev_bf16(out_in);
    const int* lp = has_len ? dllm_emu::device_copy(kv_len) : nullptr;
    const bf16* const* tp = canvases ? dllm_emu::device_copy(table) : nullptr;
    auto launch = [&](dim3 grid, dim3 block, auto kernel, size_t smem) {
        if (concurrent)
            dllm_emu_launch_concurrent(grid, block, kernel, smem);
        else
            dllm_emu_launch(grid, block, kernel, smem);
    };
    const float scale = 1.0f / std::sqrt((float)hd), scale_log2 = scale * 1.4426950408889634f;
    const unsigned heads = (unsigned)nh, batches = (unsigned)batch;
    const unsigned q_tiles = (unsigned)((sq + 63) / 64);
    switch (variant) {
        case 0:
            launch(
                d3(sq, heads, batches), d3(128),
                [&] { attention_naive(qp, kp, vp, op, lp, sq, skv, nh, nkv, hd, qs, os, kvs, kvb, scale, tp); },
                (size_t)(hd + skv) * 4);
            break;
        case 1:
        case 2: {
            const int stages = variant == 1 ? DLLM_ATTN_STAGES : 2;
            launch(
                d3(q_tiles, heads, batches), d3(128),
                [&] {
                    if (variant == 1 && hd == 64)
                        attention_mma_d64(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp);
                    else if (variant == 1)
                        attention_mma_d128(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp);
                    else if (hd == 64)
                        attention_mma2_d64(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp);
                    else
                        attention_mma2_d128(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp);
                },
                (size_t)(64 + 2 * stages * 64) * hd * 2);
            break;
        }
        case 3: {
            // SplitPlan::with_tiles_per_split: splits over the key tiles of skv, at least one.
            const int key_tiles = std::max((skv + kKeys - 1) / kKeys, 1);
            const int splits = (key_tiles + tps - 1) / tps;
            const size_t units = (size_t)q_tiles * nh * batch;
            float* ws = dllm_emu::device_filled<float>(units * splits * 128 * (hd / 8 * 4 + 4), NAN);
            unsigned* counters = dllm_emu::device_filled<unsigned>(units, 0u);
            launch(
                d3(q_tiles * splits, heads, batches), d3(128),
                [&] {
                    if (hd == 64)
                        attention_split_d64(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp,
                                            ws, counters, tps);
                    else
                        attention_split_d128(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp,
                                             ws, counters, tps);
                },
                (size_t)(64 + 2 * DLLM_ATTN_STAGES * 64) * hd * 2);
            expect_zero(counters, units, "the split attention");
            break;
        }
        default:
            launch(
                d3((sq + ATTN_KEYS_ROWS - 1) / ATTN_KEYS_ROWS, heads, batches), d3(2 * ATTN_KEY_GROUPS * 32),
                [&] {
                    if (hd == 64)
                        attention_keys_d64(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp);
                    else
                        attention_keys_d128(qp, kp, vp, op, lp, sq, skv, nh, nkv, qs, os, kvs, kvb, scale_log2, tp);
                },
                hd == 64 ? AttnKeysCfg<64>::SMEM_BYTES : AttnKeysCfg<128>::SMEM_BYTES);
    }
    save("out.u16", reinterpret_cast<const uint16_t*>(op), out_in.size());
    return 0;
}

}  // namespace

int main(int argc, char** argv) { return dllm_harness::dispatch(argc, argv, "attention_harness", {{"attn", cmd_attn}}); }
