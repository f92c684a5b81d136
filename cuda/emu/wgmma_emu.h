// Hopper warpgroup MMA for the CPU emulation (cuda/emu/cuda_emu.h): the helpers of
// cuda/wgmma_common.cuh that are inline PTX there (cuda/wgmma_common.cuh includes this file under
// DLLM_EMU). wgmma.mma_async m64n192k16 bf16 -> f32 reads both operands from shared memory through
// their matrix descriptors (K-major, 128-byte swizzle: the start address in 16-byte units in bits
// 0-13, the stride between 8-row groups in bits 32-45, the swizzle mode in bits 62-63) and is
// asynchronous: an issued operation joins its thread's open group, wgmma.commit_group closes the
// group, and wgmma.wait_group N retires all but the newest N groups. The emulation performs an
// operation only when its group is retired, the latest the device may read the operands and write
// the accumulators: a kernel that refills an operand slot before waiting reads the new data here.
// (DLLM_EMU_ASYNC=wgmma-early reads the operands at issue instead.) Accumulator layout of m64nN:
// warp w of the warpgroup owns rows 16 w .. 16 w + 15; lane (g = lane / 4,
// t = lane % 4) holds, for column block j, (row g, columns 8 j + 2 t, + 1) in d[4 j], d[4 j + 1] and
// row g + 8 in d[4 j + 2], d[4 j + 3]. Products are summed in fp32 in k order (the device's tensor
// cores round their sums differently: compare with a tolerance). The cluster split's barrier and
// distributed shared memory come from a cluster launch (dllm_emu_launch_concurrent).
#pragma once
#include "cuda_emu.h"

namespace dllm_emu {

// The calling thread's open group and its committed groups (WgmmaOp: cuda_emu.h).
DLLM_EMU_THREAD_VAR(std::vector<WgmmaOp>, wg_open, {});
DLLM_EMU_THREAD_VAR(std::vector<std::vector<WgmmaOp>>, wg_groups, {});

// Elements k = 0..15 of row `row` of the K-major, 128-byte-swizzled operand described by `desc`.
// Element k's logical address is the row's (16-byte aligned) + 2 k, and the swizzle XORs bits 4-6
// with bits 7-9, which a 16-byte chunk does not cross: k = 0..7 and 8..15 are two contiguous
// 16-byte chunks.
inline void wg_operand_row(uint64_t desc, int row, float (&out)[16]) {
    if ((desc >> 62) != 1) fail("wgmma descriptor: only the 128-byte swizzle is emulated");
    if (((desc >> 49) & 7) != 0) fail("wgmma descriptor: nonzero base offset");
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4;
    const uint32_t sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    const uint32_t logical = start + (uint32_t)(row >> 3) * sbo + (uint32_t)(row & 7) * 128;
    for (int chunk = 0; chunk < 2; ++chunk) {
        const uint32_t at = logical + 16 * (uint32_t)chunk;
        uint16_t v[8];
        std::memcpy(v, shared_at(at ^ (((at >> 7) & 7u) << 4)), sizeof v);
        for (int e = 0; e < 8; ++e) out[8 * chunk + e] = __uint_as_float((uint32_t)v[e] << 16);
    }
}

// The calling thread's 96 elements of A·B (m64n192k16), each summed onto `acc` in k order (acc,
// then + a_k b_k for k = 0..15, each product and sum rounded to fp32: the build does not contract
// them); the thread's 48 columns of B side by side, so each k is 12 four-float vector steps.
inline void wg_products(uint64_t da, uint64_t db, int wtid, float* acc) {
    typedef float v4 __attribute__((vector_size(16)));
    const int w = wtid >> 5, g = (wtid & 31) >> 2, t = wtid & 3;
    // The thread's two rows of A; bt[k][2 j + h] is element k of its column 8 j + 2 t + h of B.
    float a[2][16];
    for (int h = 0; h < 2; ++h) wg_operand_row(da, 16 * w + g + 8 * h, a[h]);
    alignas(16) float bt[16][48];
    for (int c = 0; c < 48; ++c) {
        float col[16];
        wg_operand_row(db, 8 * (c >> 1) + 2 * t + (c & 1), col);
        for (int k = 0; k < 16; ++k) bt[k][c] = col[k];
    }
    // Row r of the thread's outputs: acc[4 j + 2 r + h] for column c = 2 j + h.
    for (int r = 0; r < 2; ++r) {
        alignas(16) float sum[48];
        for (int c = 0; c < 48; ++c) sum[c] = acc[4 * (c >> 1) + 2 * r + (c & 1)];
        v4 s[12];
        std::memcpy(s, sum, sizeof s);
        for (int k = 0; k < 16; ++k) {
            const v4 x = {a[r][k], a[r][k], a[r][k], a[r][k]};
            for (int v = 0; v < 12; ++v) {
                v4 b;
                std::memcpy(&b, &bt[k][4 * v], sizeof b);
                s[v] = s[v] + x * b;
            }
        }
        std::memcpy(sum, s, sizeof s);
        for (int c = 0; c < 48; ++c) acc[4 * (c >> 1) + 2 * r + (c & 1)] = sum[c];
    }
}

// DLLM_EMU_ASYNC=wgmma-early: operands read at issue (the earliest the device may), the result
// added when the group retires; with cp.async landing at its wait (the latest), a wgmma issued
// on a tile whose copies were not waited for reads the poison.
inline bool wg_early() { return dllm_emu::async_mode_is("wgmma-early"); }

// One m64n192k16 operation of the calling thread's accumulators, retired.
inline void wg_perform(const WgmmaOp& op, int wtid) {
    if (op.product.empty()) {
        wg_products(op.da, op.db, wtid, op.d);
        return;
    }
    for (int i = 0; i < 96; ++i) op.d[i] += op.product[i];
}

}  // namespace dllm_emu

inline void wg_fence() {}
inline void wg_commit() {
    dllm_emu::wg_groups.push_back(std::move(dllm_emu::wg_open));
    dllm_emu::wg_open.clear();
}
template <int N>
inline void wg_wait() {
    auto& groups = dllm_emu::wg_groups;
    while (groups.size() > (size_t)N) {
        for (const auto& op : groups.front()) dllm_emu::wg_perform(op, (int)(threadIdx.x & 127));
        groups.erase(groups.begin());
    }
}
inline void wg_fence_acc(float (&)[96]) {}
inline void wg_mma_n192(float (&d)[96], uint64_t da, uint64_t db) {
    // .sync.aligned: every lane of the warp issues it together (checked inside a rendezvous, where no
    // lane can be on its way out of the kernel).
    const uint64_t none = 0;
    dllm_emu::collective(&none, 1, true, [](uint64_t (&)[32][8]) {});
    dllm_emu::WgmmaOp op{d, da, db, {}};
    if (dllm_emu::wg_early()) {
        op.product.assign(96, 0.0f);
        dllm_emu::wg_products(da, db, (int)(threadIdx.x & 127), op.product.data());
    }
    dllm_emu::wg_open.push_back(std::move(op));
}
// bar.sync id, threads; id 0 is the block barrier (__syncthreads), which needs every thread.
inline void wg_bar_sync(int id, int threads) {
    if (id == 0) {
        if ((unsigned)threads != blockDim.x * blockDim.y * blockDim.z) dllm_emu::fail("bar.sync 0 with a partial count");
        __syncthreads();
    } else {
        dllm_emu::named_sync(id, threads);
    }
}
inline void wg_fence_proxy_async() {}
inline float4 wg_lds128(uint32_t addr) {
    if (addr & 15) dllm_emu::fail("ld.shared.v4 not 16-byte aligned");
    float4 v;
    std::memcpy(&v, dllm_emu::shared_at(addr), 16);
    return v;
}
inline float2 wg_lds64(uint32_t addr) {
    if (addr & 7) dllm_emu::fail("ld.shared.v2 not 8-byte aligned");
    float2 v;
    std::memcpy(&v, dllm_emu::shared_at(addr), 8);
    return v;
}

// The cluster split's distributed shared memory (dllm_emu_launch_concurrent with a cluster shape):
// the cluster barrier, mapa into a peer's arena, and the 16-byte shared loads and stores.
inline void wg_cluster_sync() { dllm_emu::cluster_sync(); }
inline uint32_t wg_mapa(uint32_t addr, uint32_t rank) { return dllm_emu::cluster_peer(addr, rank); }
inline float4 wg_ld_cluster128(uint32_t addr) { return wg_lds128(addr); }
inline void wg_sts128(uint32_t addr, float a, float b, float c, float d) {
    if (addr & 15) dllm_emu::fail("st.shared.v4 not 16-byte aligned");
    const float4 v{a, b, c, d};
    std::memcpy(dllm_emu::shared_at(addr), &v, 16);
}
