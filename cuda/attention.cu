// Bidirectional (non-causal) attention for dllm: bf16 Q/K/V in, fp32 softmax and accumulation, bf16 out.
//
// Layouts (all row-major, "row" = one token):
//   Q   element (b, s, h, d) at q[(b*sq + s)*q_stride + h*D + d]
//   K/V element (b, j, g, d) at k[(b*kv_batch_stride + j)*kv_stride + g*D + d]   (g = kv head)
//   out like Q with o_stride.
// With a per-canvas table `kv_canvas` (not null: 2 * batch base pointers, canvas b's K rows at kv_canvas[b] and its V
// rows at kv_canvas[batch + b], each laid out as k/v with j from 0), K/V come from there and k, v, kv_batch_stride
// are not read: the packed cached steps of sessions whose caches are separate allocations.
// GQA: query head h reads kv head h / (n_heads / n_kv_heads). Keys j >= min(skv, kv_len[b]) are excluded
// when kv_len is not null. A query row with no valid key gets zeros.
//
// Kernels:
//   attention_naive        one block per (query row, head, batch), fp32 CUDA cores; the reference.
//   attention_mma_d64/128  flash-attention-2 style: a block of 4 warps owns 64 query rows of one head,
//                          streams 64-key K/V tiles through shared memory (a cp.async ring of 3 slots, two
//                          tiles in flight; attention_mma2_d* has 2 slots, for comparison), computes
//                          S = QK^T and O += PV with mma.sync m16n8k16 bf16 and an online softmax in fp32.
//   attention_split_d*     the same with the key tiles split across blocks, merged through global memory.
//   attention_keys_d*      few query rows (<= 32 per block) against a short key range: 8 warps, 2 row groups
//                          x 4 key groups, each key group streaming every 4th key tile at once, the 4
//                          partial softmaxes merged in shared memory (no global workspace).
#include "common.cuh"
#include "sync.cuh"

typedef __nv_bfloat16 bf16;

// Canvas b's K (which = 0) or V (which = 1) rows: from the per-canvas table when there is one, else at row
// b * kv_batch_stride of the batch buffer `base`. gridDim.z is the batch in every kernel here.
__device__ __forceinline__ const bf16* attn_kv_rows(const bf16* base, const bf16* const* kv_canvas, int which, int b,
                                                    long long kv_batch_stride, long long kv_stride) {
    if (kv_canvas != nullptr) return kv_canvas[which * (int)gridDim.z + b];
    return base + (long long)b * kv_batch_stride * kv_stride;
}

// ---------------------------------------------------------------------------------------------------------------
// Reference kernel. grid (sq, n_heads, batch), any block size (128 used), dynamic smem (D + skv) floats.
extern "C" __global__ void attention_naive(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                           const bf16* __restrict__ v, bf16* __restrict__ out,
                                           const int* __restrict__ kv_len, int sq, int skv, int n_heads,
                                           int n_kv_heads, int head_dim, long long q_stride, long long o_stride,
                                           long long kv_stride, long long kv_batch_stride, float scale,
                                           const bf16* const* __restrict__ kv_canvas) {
    dllm_pdl_entry();
    DLLM_DYNAMIC_SHARED(float, naive_smem);
    float* qs = naive_smem;             // head_dim
    float* sc = naive_smem + head_dim;  // skv
    __shared__ float red[32];
    const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (n_heads / n_kv_heads);
    int kv_end = skv;
    if (kv_len != nullptr) kv_end = min(skv, max(kv_len[b], 0));
    const bf16* qr = q + ((long long)b * sq + row) * q_stride + (long long)h * head_dim;
    const bf16* kb = attn_kv_rows(k, kv_canvas, 0, b, kv_batch_stride, kv_stride) + (long long)kvh * head_dim;
    const bf16* vb = attn_kv_rows(v, kv_canvas, 1, b, kv_batch_stride, kv_stride) + (long long)kvh * head_dim;
    bf16* orow = out + ((long long)b * sq + row) * o_stride + (long long)h * head_dim;
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = (nt + 31) >> 5;

    for (int d = tid; d < head_dim; d += nt) qs[d] = __bfloat162float(qr[d]);
    __syncthreads();
    float lmax = -INFINITY;
    for (int j = tid; j < kv_end; j += nt) {
        const bf16* kr = kb + (long long)j * kv_stride;
        float acc = 0.f;
        for (int d = 0; d < head_dim; ++d) acc += qs[d] * __bfloat162float(kr[d]);
        acc *= scale;
        sc[j] = acc;
        lmax = fmaxf(lmax, acc);
    }
    lmax = dllm_warp_max(lmax);
    if (lane == 0) red[warp] = lmax;
    __syncthreads();
    float gmax = -INFINITY;
    for (int w = 0; w < nwarps; ++w) gmax = fmaxf(gmax, red[w]);
    __syncthreads();
    float lsum = 0.f;
    for (int j = tid; j < kv_end; j += nt) {
        float p = __expf(sc[j] - gmax);
        sc[j] = p;
        lsum += p;
    }
    lsum = dllm_warp_sum(lsum);
    if (lane == 0) red[warp] = lsum;
    __syncthreads();
    float gsum = 0.f;
    for (int w = 0; w < nwarps; ++w) gsum += red[w];
    const float inv = gsum > 0.f ? 1.f / gsum : 0.f;
    for (int d = tid; d < head_dim; d += nt) {
        float acc = 0.f;
        for (int j = 0; j < kv_end; ++j) acc += sc[j] * __bfloat162float(vb[(long long)j * kv_stride + d]);
        orow[d] = __float2bfloat16(acc * inv);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core kernel.

__device__ __forceinline__ void attn_ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                             const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
#ifdef DLLM_EMU
    uint32_t r[4];
    dllm_emu_ldmatrix_x4(r, s, false);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
#endif
}
__device__ __forceinline__ void attn_ldsm_x4_t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                               const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
#ifdef DLLM_EMU
    uint32_t r[4];
    dllm_emu_ldmatrix_x4(r, s, true);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
#endif
}

// D(16x8 f32) += A(16x16 bf16, row) * B(16x8 bf16, col)
__device__ __forceinline__ void attn_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef DLLM_EMU
    float d[4] = {c[0], c[1], c[2], c[3]};
    dllm_emu_mma_bf16(d, a[0], a[1], a[2], a[3], b0, b1);
    for (int i = 0; i < 4; ++i) c[i] = d[i];
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ unsigned attn_pack_bf16(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&p);
}

// Element offset of 16-byte chunk `c` of row `r` in a [rows][D] bf16 tile, XOR-swizzled so that the 8 rows read
// by one ldmatrix phase hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int attn_swz(int r, int c) {
    return r * D + ((c ^ (r & 7)) << 3);
}

// Copies ROWS rows (row stride `stride` elements) into a swizzled tile; rows >= valid are zero-filled.
// Thread `tid` of the THREADS loading threads copies chunks tid, tid + THREADS, ...: always chunk
// column c = tid % CH of rows tid / CH + k * (THREADS / CH), so the copies unroll into one
// cp.async each with (near-)constant offsets (a generic loop spent ~20 instructions of index
// arithmetic per 16-byte copy: per key tile as many instructions as the tile's MMAs).
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void attn_load_tile(bf16* tile, const bf16* src, long long stride, int valid,
                                               int tid) {
    constexpr int CH = D / 8;
    static_assert(THREADS % CH == 0 && (ROWS * CH) % THREADS == 0, "whole rows per pass, whole passes");
    constexpr int PASSES = ROWS * CH / THREADS, ROW_STEP = THREADS / CH;
    const int r0 = tid / CH, c = tid % CH;
    const bf16* g = src + (long long)r0 * stride + c * 8;
#pragma unroll
    for (int k = 0; k < PASSES; ++k) {
        const int r = r0 + k * ROW_STEP;  // the swizzle takes r itself (ROW_STEP may be < 8)
        const bool ok = r < valid;
        dllm_cp_async16((uint32_t)__cvta_generic_to_shared(tile + attn_swz<D>(r, c)),
                        ok ? g + (long long)k * ROW_STEP * stride : src, ok);
    }
}

// One warp's work on one 64-key tile in shared memory (tK, tV: [64][D], swizzled): S = Q K^T for its 16
// query rows (qf: their A fragments), scaled into the log2 domain with keys >= kv_end masked, the online
// softmax update of the running maxima m0/m1 and per-thread row sums l0/l1 of rows g and g + 8, and O += P V.
template <int D>
__device__ __forceinline__ void attn_warp_tile(const unsigned (&qf)[D / 16][4], const bf16* tK, const bf16* tV,
                                               int key0, int kv_end, float scale_log2, float (&o)[D / 8][4],
                                               float& m0, float& m1, float& l0, float& l1, int lane) {
    constexpr int KD = D / 16, ND = D / 8, BN = 64;
    const int t = lane & 3;
    // S = Q K^T: 16 rows x 64 keys per warp = 8 n-tiles.
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            const int r = np * 16 + (lane & 7) + ((lane >> 4) << 3);
            const int c = kk * 2 + ((lane >> 3) & 1);
            unsigned b0, b1, b2, b3;
            attn_ldsm_x4(b0, b1, b2, b3, tK + attn_swz<D>(r, c));
            attn_mma(s[2 * np], qf[kk], b0, b1);
            attn_mma(s[2 * np + 1], qf[kk], b2, b3);
        }
    }

    // Scale into the log2 domain, mask keys past the end, online softmax.
    const bool tail = key0 + BN > kv_end;
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = s[nt][e] * scale_log2;
            if (tail && key0 + nt * 8 + 2 * t + (e & 1) >= kv_end) x = -INFINITY;
            s[nt][e] = x;
        }
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float nm0 = fmaxf(m0, mx0), nm1 = fmaxf(m1, mx1);
    const float base0 = nm0 == -INFINITY ? 0.f : nm0;
    const float base1 = nm1 == -INFINITY ? 0.f : nm1;
    const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
    m0 = nm0;
    m1 = nm1;
    l0 *= alpha0;
    l1 *= alpha1;
#pragma unroll
    for (int i = 0; i < ND; ++i) {
        o[i][0] *= alpha0;
        o[i][1] *= alpha0;
        o[i][2] *= alpha1;
        o[i][3] *= alpha1;
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        s[nt][0] = exp2f(s[nt][0] - base0);
        s[nt][1] = exp2f(s[nt][1] - base0);
        s[nt][2] = exp2f(s[nt][2] - base1);
        s[nt][3] = exp2f(s[nt][3] - base1);
        l0 += s[nt][0] + s[nt][1];
        l1 += s[nt][2] + s[nt][3];
    }

    // O += P V: 4 k-steps of 16 keys, ND n-tiles of 8 head dims.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        unsigned a[4];
        a[0] = attn_pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        a[1] = attn_pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        a[2] = attn_pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = attn_pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < ND / 2; ++np) {
            const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
            const int c = np * 2 + (lane >> 4);
            unsigned b0, b1, b2, b3;
            attn_ldsm_x4_t(b0, b1, b2, b3, tV + attn_swz<D>(r, c));
            attn_mma(o[2 * np], a, b0, b1);
            attn_mma(o[2 * np + 1], a, b2, b3);
        }
    }
}

// Normalises a warp's 16 output rows (row0 + g and row0 + g + 8 of this lane, by the row sums l0 / l1; a row
// without keys gives zeros) and stores the rows below sq as bf16 into `ob` (the head's first column of batch
// element b's output).
template <int D>
__device__ __forceinline__ void attn_store_rows(const float (&o)[D / 8][4], float l0, float l1, bf16* ob, int row0,
                                                int sq, long long o_stride, int lane) {
    constexpr int ND = D / 8;
    const int g = lane >> 2, t = lane & 3;
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
    const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const int r0 = row0 + g, r1 = r0 + 8;
    ob += 2 * t;
#pragma unroll
    for (int i = 0; i < ND; ++i) {
        if (r0 < sq)
            *reinterpret_cast<__nv_bfloat162*>(ob + (long long)r0 * o_stride + i * 8) =
                __floats2bfloat162_rn(o[i][0] * inv0, o[i][1] * inv0);
        if (r1 < sq)
            *reinterpret_cast<__nv_bfloat162*>(ob + (long long)r1 * o_stride + i * 8) =
                __floats2bfloat162_rn(o[i][2] * inv1, o[i][3] * inv1);
    }
}

// Merges n partial online-softmax states of a lane's two rows, in order p = 0..n-1, into o / l0 / l1:
// `ml(p)` gives partial p's (m0, m1, l0, l1) (running maxima in the log2 domain, row sums), `part(p, i)` its
// unnormalised output values of n-tile i. The largest maximum first, then every partial rescaled to it; a
// partial without keys (maximum -inf) weighs 0, and a row without any keeps l = 0 (zeros on output).
template <int D, class ML, class Part>
__device__ __forceinline__ void attn_merge(int n, ML ml, Part part, float (&o)[D / 8][4], float& l0, float& l1) {
    constexpr int ND = D / 8;
    float gm0 = -INFINITY, gm1 = -INFINITY;
    for (int p = 0; p < n; ++p) {
        const float4 x = ml(p);
        gm0 = fmaxf(gm0, x.x);
        gm1 = fmaxf(gm1, x.y);
    }
    const float gb0 = gm0 == -INFINITY ? 0.f : gm0;
    const float gb1 = gm1 == -INFINITY ? 0.f : gm1;
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    l0 = 0.f;
    l1 = 0.f;
    for (int p = 0; p < n; ++p) {
        const float4 x = ml(p);
        const float w0 = exp2f(x.x - gb0), w1 = exp2f(x.y - gb1);
        l0 += x.z * w0;
        l1 += x.w * w1;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            const float4 v = part(p, i);
            o[i][0] += v.x * w0;
            o[i][1] += v.y * w0;
            o[i][2] += v.z * w1;
            o[i][3] += v.w * w1;
        }
    }
}

// Split-KV partials of one block: per thread, ND x 4 unnormalised output values, then the running
// maxima (log2 domain) and row sums of its rows g and g + 8.
template <int D>
struct AttnPartial {
    static constexpr int FLOATS = (D / 8) * 4 + 4;
};

// SPLIT = false: the block attends to every key tile and writes the normalised bf16 output.
// SPLIT = true (grid x = q tile x splits + split): the block attends to key tiles
// [split·tiles_per_split, +tiles_per_split) only, writes its unnormalised partial (AttnPartial) to
// `ws`, and the last split of the (q tile, head, batch) unit to arrive (per-unit counter) merges all
// partials in split order (the same bits whichever block is last), writes the output and resets
// the counter.
template <int D, bool SPLIT, int STAGES>
__device__ __forceinline__ void attention_mma_body(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                   const bf16* __restrict__ v, bf16* __restrict__ out,
                                                   const int* __restrict__ kv_len, int sq, int skv, int n_heads,
                                                   int n_kv_heads, long long q_stride, long long o_stride,
                                                   long long kv_stride, long long kv_batch_stride,
                                                   float scale_log2, const bf16* const* __restrict__ kv_canvas,
                                                   float* __restrict__ ws, unsigned int* __restrict__ counters,
                                                   int tiles_per_split) {
    constexpr int WARPS = 4, THREADS = WARPS * 32, BM = 16 * WARPS, BN = 64;
    constexpr int KD = D / 16;  // k-steps of QK^T
    constexpr int ND = D / 8;   // n-tiles of the output
    DLLM_DYNAMIC_SHARED_ALIGNED(unsigned char, attn_smem, 128);
    bf16* sQ = reinterpret_cast<bf16*>(attn_smem);
    static_assert(STAGES >= 2, "a key tile in flight while one is computed");
    bf16* sK = sQ + BM * D;           // [STAGES][BN][D]
    bf16* sV = sK + STAGES * BN * D;  // [STAGES][BN][D]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // Splits of the key tiles (the host's SplitPlan: at least one, even for skv == 0).
    const int key_tiles = max((skv + BN - 1) / BN, 1);
    const int splits = SPLIT ? (key_tiles + tiles_per_split - 1) / tiles_per_split : 1;
    const int qt = SPLIT ? blockIdx.x / splits : blockIdx.x;
    const int split = SPLIT ? blockIdx.x % splits : 0;
    const int q0 = qt * BM, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (n_heads / n_kv_heads);
    int kv_end = skv;
    if (kv_len != nullptr) kv_end = min(skv, max(kv_len[b], 0));
    const int n_tiles = (kv_end + BN - 1) / BN;
    // This block's key tiles [j0, j1).
    const int j0 = SPLIT ? min(n_tiles, split * tiles_per_split) : 0;
    const int j1 = SPLIT ? min(n_tiles, j0 + tiles_per_split) : n_tiles;

    const bf16* qb = q + ((long long)b * sq + q0) * q_stride + (long long)h * D;
    const bf16* kb = attn_kv_rows(k, kv_canvas, 0, b, kv_batch_stride, kv_stride) + (long long)kvh * D;
    const bf16* vb = attn_kv_rows(v, kv_canvas, 1, b, kv_batch_stride, kv_stride) + (long long)kvh * D;

    // Ring of STAGES K/V slots, tile j in slot (j - j0) % STAGES, STAGES - 1 tiles requested
    // ahead. One cp.async group per tile (Q rides with the first); a group is committed every
    // iteration, empty past the last tile, so "all but the newest STAGES - 2 groups" is always
    // "tile j has landed".
    auto load_kv = [&](int j) {
        const int slot = (j - j0) % STAGES;
        const long long off = (long long)j * BN * kv_stride;
        attn_load_tile<D, BN, THREADS>(sK + slot * BN * D, kb + off, kv_stride, kv_end - j * BN, tid);
        attn_load_tile<D, BN, THREADS>(sV + slot * BN * D, vb + off, kv_stride, kv_end - j * BN, tid);
    };
    attn_load_tile<D, BM, THREADS>(sQ, qb, q_stride, sq - q0, tid);
#pragma unroll
    for (int p = 0; p < STAGES - 1; ++p) {
        if (j0 + p < j1) load_kv(j0 + p);
        dllm_cp_commit();
    }

    unsigned qf[KD][4];
    float o[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY;  // running max (log2 domain) of rows g and g+8
    float l0 = 0.f, l1 = 0.f;              // per-thread partial row sums

    if (j1 <= j0) {
        dllm_cp_wait<0>();
        __syncthreads();
    }
    for (int j = j0; j < j1; ++j) {
        dllm_cp_wait<STAGES - 2>();
        // Every thread's copies of tile j are visible, and every warp is done with tile j - 1,
        // whose slot the next request refills.
        __syncthreads();
        if (j + STAGES - 1 < j1) load_kv(j + STAGES - 1);
        dllm_cp_commit();
        if (j == j0) {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                const int r = warp * 16 + (lane & 15), c = kk * 2 + (lane >> 4);
                attn_ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQ + attn_swz<D>(r, c));
            }
        }
        const int slot = (j - j0) % STAGES;
        attn_warp_tile<D>(qf, sK + slot * BN * D, sV + slot * BN * D, j * BN, kv_end, scale_log2, o, m0, m1, l0,
                          l1, lane);
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    if constexpr (SPLIT) {
        constexpr int PF = AttnPartial<D>::FLOATS;
        const size_t unit = ((size_t)b * gridDim.y + h) * (gridDim.x / splits) + qt;
        float* mine = ws + ((unit * splits + split) * THREADS + tid) * PF;
        // A warp whose 16 rows all lie past sq (half the block at sq = 32) has nothing to keep:
        // it neither writes nor merges (warp 0 is always live, so the counter is still reset).
        const bool live = q0 + warp * 16 < sq;  // warp-uniform
        if (live) {
#pragma unroll
            for (int i = 0; i < ND; ++i)
                *reinterpret_cast<float4*>(mine + 4 * i) = make_float4(o[i][0], o[i][1], o[i][2], o[i][3]);
            *reinterpret_cast<float4*>(mine + 4 * ND) = make_float4(m0, m1, l0, l1);
        }
        __threadfence();
        __syncthreads();
        __shared__ unsigned int s_last;
        if (tid == 0) s_last = (atomicAdd(&counters[unit], 1u) == (unsigned int)(splits - 1)) ? 1u : 0u;
        __syncthreads();
        if (s_last == 0u || !live) return;
        __threadfence();
        // Merge in split order.
        const float* parts = ws + (unit * splits * THREADS + tid) * PF;
        attn_merge<D>(
            splits,
            [&](int sp) { return __ldcg(reinterpret_cast<const float4*>(parts + (size_t)sp * THREADS * PF + 4 * ND)); },
            [&](int sp, int i) { return __ldcg(reinterpret_cast<const float4*>(parts + (size_t)sp * THREADS * PF + 4 * i)); },
            o, l0, l1);
        if (tid == 0) counters[unit] = 0u;
    }
    attn_store_rows<D>(o, l0, l1, out + (long long)b * sq * o_stride + (long long)h * D, q0 + warp * 16, sq,
                       o_stride, lane);
}

// grid (ceil(sq / 64), n_heads, batch), block 128, dynamic smem (64 + 2 * STAGES * 64) * D * 2 bytes
// (112 KiB at D = 128: two blocks per SM). attention_mma_d* keeps DLLM_ATTN_STAGES = 3 slots (two
// key tiles requested while one is computed); attention_mma2_d* 2 (one ahead, as before session 6;
// DLLM_ATTN_STAGES=2 selects it for comparison). Requires 16-byte aligned base pointers and strides
// that are multiples of 8 elements.
#define DLLM_ATTN_STAGES 3
#define DLLM_ATTN_MMA(NAME, D, STAGES)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                                       \
        const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, bf16* __restrict__ out, \
        const int* __restrict__ kv_len, int sq, int skv, int n_heads, int n_kv_heads, long long q_stride,          \
        long long o_stride, long long kv_stride, long long kv_batch_stride, float scale_log2,                     \
        const bf16* const* __restrict__ kv_canvas) {                                                              \
        dllm_pdl_entry();                                                                                          \
        attention_mma_body<D, false, STAGES>(q, k, v, out, kv_len, sq, skv, n_heads, n_kv_heads, q_stride,        \
                                             o_stride, kv_stride, kv_batch_stride, scale_log2, kv_canvas, nullptr, \
                                             nullptr, 1);                                                         \
    }
DLLM_ATTN_MMA(attention_mma_d64, 64, DLLM_ATTN_STAGES)
DLLM_ATTN_MMA(attention_mma_d128, 128, DLLM_ATTN_STAGES)
DLLM_ATTN_MMA(attention_mma2_d64, 64, 2)
DLLM_ATTN_MMA(attention_mma2_d128, 128, 2)

// Split-KV ("flash-decoding") variant for few query rows against many keys (the dual-cache block
// step: 32 queries x 384+ cached keys gives only n_heads blocks otherwise). grid (ceil(sq / 64) x
// splits, n_heads, batch) with splits = ceil(ceil(skv / 64) / tiles_per_split); `ws` holds
// units x splits x 128 x AttnPartial<D>::FLOATS floats and `counters` one zeroed entry per unit
// (q tile, head, batch), reset by the merging block.
#define DLLM_ATTN_SPLIT(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) attention_split_d##D(                                       \
        const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, bf16* __restrict__ out, \
        const int* __restrict__ kv_len, int sq, int skv, int n_heads, int n_kv_heads, long long q_stride,          \
        long long o_stride, long long kv_stride, long long kv_batch_stride, float scale_log2,                     \
        const bf16* const* __restrict__ kv_canvas, float* __restrict__ ws, unsigned int* __restrict__ counters,   \
        int tiles_per_split) {                                                                                    \
        dllm_pdl_entry();                                                                                          \
        attention_mma_body<D, true, DLLM_ATTN_STAGES>(q, k, v, out, kv_len, sq, skv, n_heads, n_kv_heads,         \
                                                      q_stride, o_stride, kv_stride, kv_batch_stride, scale_log2, \
                                                      kv_canvas, ws, counters, tiles_per_split);                   \
    }
DLLM_ATTN_SPLIT(64)
DLLM_ATTN_SPLIT(128)

// ---------------------------------------------------------------------------------------------------------------
// Key-group kernel for few query rows against a short key range (the batch-1 dual-cache block step: 32 queries
// x 384 keys per head gives 32 blocks that each walk 6 key tiles one after the other in the plain kernel).
// A block owns ATTN_KEYS_ROWS = 32 query rows of one head: 8 warps = 2 row groups (16 rows each) x
// ATTN_KEY_GROUPS = 4 key groups. Key group kg streams tiles kg, kg + 4, kg + 8, ... through its own shared K/V
// tile (its two warps load it, synchronised by a named barrier), so 4 tiles are in flight per block instead of
// one; afterwards the 4 partial softmaxes of each row group are merged in shared memory in key-group order
// (deterministic), and the key-group-0 warps write the output.
#define ATTN_KEY_GROUPS 4
#define ATTN_KEYS_ROWS 32

template <int D>
struct AttnKeysCfg {
    static constexpr int WARPS = 2 * ATTN_KEY_GROUPS, THREADS = WARPS * 32, BN = 64;
    static constexpr int Q_ELEMS = ATTN_KEYS_ROWS * D;
    static constexpr int GROUP_ELEMS = 2 * BN * D;  // K tile then V tile
    static constexpr int SMEM_BYTES = (Q_ELEMS + ATTN_KEY_GROUPS * GROUP_ELEMS) * 2;
    // The merge reuses the K/V tiles: per warp ND float4 per lane of output partials, then (m0, m1, l0, l1).
    static constexpr int MERGE_BYTES = WARPS * ((D / 8) + 1) * 32 * 16;
    static_assert(MERGE_BYTES <= ATTN_KEY_GROUPS * GROUP_ELEMS * 2, "merge buffer exceeds the K/V tiles");
};

// Named barrier `id` (1..4) over the 64 threads of one key group.
__device__ __forceinline__ void attn_group_sync(int id) { dllm_named_sync(id, 64); }

template <int D>
__device__ __forceinline__ void attention_keys_body(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                    const bf16* __restrict__ v, bf16* __restrict__ out,
                                                    const int* __restrict__ kv_len, int sq, int skv, int n_heads,
                                                    int n_kv_heads, long long q_stride, long long o_stride,
                                                    long long kv_stride, long long kv_batch_stride,
                                                    float scale_log2, const bf16* const* __restrict__ kv_canvas) {
    using Cfg = AttnKeysCfg<D>;
    constexpr int BN = Cfg::BN, KD = D / 16, ND = D / 8, KG = ATTN_KEY_GROUPS;
    DLLM_DYNAMIC_SHARED_ALIGNED(unsigned char, attn_smem, 128);
    bf16* sQ = reinterpret_cast<bf16*>(attn_smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rg = warp & 1, kg = warp >> 1;  // row group, key group
    bf16* tK = sQ + Cfg::Q_ELEMS + kg * Cfg::GROUP_ELEMS;
    bf16* tV = tK + BN * D;
    const int q0 = blockIdx.x * ATTN_KEYS_ROWS, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (n_heads / n_kv_heads);
    int kv_end = skv;
    if (kv_len != nullptr) kv_end = min(skv, max(kv_len[b], 0));
    const int n_tiles = (kv_end + BN - 1) / BN;

    const bf16* qb = q + ((long long)b * sq + q0) * q_stride + (long long)h * D;
    const bf16* kb = attn_kv_rows(k, kv_canvas, 0, b, kv_batch_stride, kv_stride) + (long long)kvh * D;
    const bf16* vb = attn_kv_rows(v, kv_canvas, 1, b, kv_batch_stride, kv_stride) + (long long)kvh * D;
    const int gtid = rg * 32 + lane;  // this thread's index among its key group's 64 loaders

    // Q (all threads) and each group's first tile, then everything waited for by everyone.
    attn_load_tile<D, ATTN_KEYS_ROWS, Cfg::THREADS>(sQ, qb, q_stride, sq - q0, tid);
    int j = kg;
    if (j < n_tiles) {
        const long long off = (long long)j * BN * kv_stride;
        attn_load_tile<D, BN, 64>(tK, kb + off, kv_stride, kv_end - j * BN, gtid);
        attn_load_tile<D, BN, 64>(tV, vb + off, kv_stride, kv_end - j * BN, gtid);
    }
    dllm_cp_commit();
    dllm_cp_wait<0>();
    __syncthreads();

    unsigned qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        const int r = rg * 16 + (lane & 15), c = kk * 2 + (lane >> 4);
        attn_ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQ + attn_swz<D>(r, c));
    }
    float o[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    // Every group runs the same number of rounds, and so passes the same number of barriers, even
    // where its last tile came a round earlier than another group's (n_tiles not a multiple of
    // KG). compute-sanitizer's racecheck (2026-11-28, H200) reported the merge's writes below as
    // racing with the tile reads here, which a __syncthreads() orders; the likely cause (not yet
    // confirmed on a GPU) is its accounting of named barriers that groups passed different numbers
    // of times. The idle group's extra barriers are among its own two warps, idle anyway.
    const int rounds = (n_tiles + KG - 1) / KG;
    for (int r = 0; r < rounds; ++r, j += KG) {
        if (j < n_tiles) attn_warp_tile<D>(qf, tK, tV, j * BN, kv_end, scale_log2, o, m0, m1, l0, l1, lane);
        if (r + 1 < rounds) {
            attn_group_sync(1 + kg);  // both warps of the group are done with the tile
            if (j + KG < n_tiles) {
                const long long off = (long long)(j + KG) * BN * kv_stride;
                attn_load_tile<D, BN, 64>(tK, kb + off, kv_stride, kv_end - (j + KG) * BN, gtid);
                attn_load_tile<D, BN, 64>(tV, vb + off, kv_stride, kv_end - (j + KG) * BN, gtid);
            }
            dllm_cp_commit();
            dllm_cp_wait<0>();
            attn_group_sync(1 + kg);  // every loader's copies have landed
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);

    // Merge: every warp parks its partial (lane-major float4s, conflict-free) in the K/V tiles.
    __syncthreads();  // all groups are done reading their tiles
    float4* part = reinterpret_cast<float4*>(sQ + Cfg::Q_ELEMS);
    float4* ml = part + Cfg::WARPS * ND * 32;
#pragma unroll
    for (int i = 0; i < ND; ++i) part[(warp * ND + i) * 32 + lane] = make_float4(o[i][0], o[i][1], o[i][2], o[i][3]);
    ml[warp * 32 + lane] = make_float4(m0, m1, l0, l1);
    __syncthreads();
    if (kg != 0) return;
    // Key-group 0's warp of row group rg: the partials of warps rg, rg + 2, rg + 4, rg + 6 (key groups 0..3).
    attn_merge<D>(
        KG, [&](int kq) { return ml[(2 * kq + rg) * 32 + lane]; },
        [&](int kq, int i) { return part[((2 * kq + rg) * ND + i) * 32 + lane]; }, o, l0, l1);
    attn_store_rows<D>(o, l0, l1, out + (long long)b * sq * o_stride + (long long)h * D, q0 + rg * 16, sq,
                       o_stride, lane);
}

// grid (ceil(sq / 32), n_heads, batch), block 256, dynamic smem AttnKeysCfg<D>::SMEM_BYTES (136 KiB at D = 128).
// Same argument list and requirements as attention_mma_d*.
#define DLLM_ATTN_KEYS(D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(2 * ATTN_KEY_GROUPS * 32) attention_keys_d##D(                   \
        const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, bf16* __restrict__ out, \
        const int* __restrict__ kv_len, int sq, int skv, int n_heads, int n_kv_heads, long long q_stride,          \
        long long o_stride, long long kv_stride, long long kv_batch_stride, float scale_log2,                     \
        const bf16* const* __restrict__ kv_canvas) {                                                              \
        dllm_pdl_entry();                                                                                          \
        attention_keys_body<D>(q, k, v, out, kv_len, sq, skv, n_heads, n_kv_heads, q_stride, o_stride, kv_stride, \
                               kv_batch_stride, scale_log2, kv_canvas);                                            \
    }
DLLM_ATTN_KEYS(64)
DLLM_ATTN_KEYS(128)
