// Element-wise and row-wise kernels of the transformer block: fused RMSNorm (fp32 residual in,
// bf16 out; and per q/k head in place), RoPE on bf16 q/k in place (alone, or fused with the K/V cache write), SwiGLU
// combine (scalar and 16-byte), embedding gather, bf16 <-> f32 conversion, row gathers and the
// K/V cache scatter. bf16 tensors travel as raw 16-bit words.
//
// Every kernel is a plain grid-stride or one-block-per-row kernel: these ops move a few MB per
// step and are never the bottleneck next to the weight-streaming GEMMs. Launch shapes are chosen
// by src/backend/cuda/elementwise.rs; all indices are 64-bit where a product can exceed 2^31.
#include "common.cuh"

#define DLLM_ROW_THREADS 256

__device__ __forceinline__ float dllm_bf16_to_f32(uint16_t b) {
    return __uint_as_float(((uint32_t)b) << 16);
}

__device__ __forceinline__ uint16_t dllm_f32_to_bf16(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Block-wide sum for blockDim.x == DLLM_ROW_THREADS; every thread gets the total.
__device__ __forceinline__ float dllm_block_sum(float v) {
    __shared__ float partial[DLLM_ROW_THREADS / 32];
    __shared__ float total;
    v = dllm_warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < DLLM_ROW_THREADS / 32 ? partial[lane] : 0.0f;
        s = dllm_warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// RMSNorm, one block per row: out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w, x and w fp32,
// out bf16 (rmsnorm_f32_bf16) or fp32 (rmsnorm_f32_f32). Grid: (rows), block: DLLM_ROW_THREADS.
// vec = 1 (the host sets it when d % 4 == 0, d <= 4 * DLLM_ROW_THREADS * DLLM_RMS_V4 and x, w, out
// are 16-byte aligned): every thread loads its float4s of the row and of w at once, keeps them in
// registers through the block sum and stores from them, so the row costs one round trip to memory
// instead of one per few elements in each of two passes.
#define DLLM_RMS_V4 8

__device__ __forceinline__ void dllm_store_norm(uint16_t* out, size_t i, float v) { out[i] = dllm_f32_to_bf16(v); }
__device__ __forceinline__ void dllm_store_norm(float* out, size_t i, float v) { out[i] = v; }
__device__ __forceinline__ void dllm_store_norm4(uint16_t* out, size_t c, float4 v) {
    uint2 p;
    p.x = (uint32_t)dllm_f32_to_bf16(v.x) | ((uint32_t)dllm_f32_to_bf16(v.y) << 16);
    p.y = (uint32_t)dllm_f32_to_bf16(v.z) | ((uint32_t)dllm_f32_to_bf16(v.w) << 16);
    reinterpret_cast<uint2*>(out)[c] = p;
}
__device__ __forceinline__ void dllm_store_norm4(float* out, size_t c, float4 v) { reinterpret_cast<float4*>(out)[c] = v; }

template <class T>
__device__ __forceinline__ void rmsnorm_body(const float* __restrict__ x, const float* __restrict__ w,
                                             T* __restrict__ out, int d, float eps, int vec) {
    const size_t row = blockIdx.x;
    const float* xr = x + row * (size_t)d;
    T* orow = out + row * (size_t)d;
    if (vec) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        const int n4 = d >> 2;
        float4 xv[DLLM_RMS_V4], wv[DLLM_RMS_V4];
#pragma unroll
        for (int k = 0; k < DLLM_RMS_V4; ++k) {
            const int c = threadIdx.x + k * DLLM_ROW_THREADS;
            xv[k] = c < n4 ? x4[c] : make_float4(0.f, 0.f, 0.f, 0.f);
            wv[k] = c < n4 ? w4[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < DLLM_RMS_V4; ++k) ss += xv[k].x * xv[k].x + xv[k].y * xv[k].y + xv[k].z * xv[k].z + xv[k].w * xv[k].w;
        ss = dllm_block_sum(ss);
        const float inv = 1.0f / sqrtf(ss / (float)d + eps);
#pragma unroll
        for (int k = 0; k < DLLM_RMS_V4; ++k) {
            const int c = threadIdx.x + k * DLLM_ROW_THREADS;
            if (c < n4)
                dllm_store_norm4(orow, c,
                                 make_float4((xv[k].x * inv) * wv[k].x, (xv[k].y * inv) * wv[k].y,
                                             (xv[k].z * inv) * wv[k].z, (xv[k].w * inv) * wv[k].w));
        }
        return;
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += DLLM_ROW_THREADS) {
        const float v = xr[i];
        ss += v * v;
    }
    ss = dllm_block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += DLLM_ROW_THREADS) dllm_store_norm(orow, i, (xr[i] * inv) * w[i]);
}

extern "C" __global__ void rmsnorm_f32_bf16(const float* __restrict__ x, const float* __restrict__ w,
                                            uint16_t* __restrict__ out, int d, float eps, int vec) {
    dllm_pdl_entry();
    rmsnorm_body(x, w, out, d, eps, vec);
}

// RMSNorm of every q and k head in place (LLaDA-MoE's q_norm / k_norm, before RoPE), one warp
// per (row, head): heads h < q_heads start at column h * head_dim of row r (row_stride apart),
// the kv_heads key heads at k_col + (h - q_heads) * head_dim; q heads scale by q_w, key heads by
// k_w (head_dim each). Grid: ceil(rows * (q_heads + kv_heads) / 8), block DLLM_ROW_THREADS.
extern "C" __global__ void rmsnorm_heads_bf16(uint16_t* __restrict__ qkv, int rows, int row_stride, int q_heads,
                                              int kv_heads, int k_col, int head_dim, const float* __restrict__ q_w,
                                              const float* __restrict__ k_w, float eps) {
    dllm_pdl_entry();
    const int heads = q_heads + kv_heads;
    const long long item = (long long)blockIdx.x * (DLLM_ROW_THREADS / 32) + (threadIdx.x >> 5);
    if (item >= (long long)rows * heads) return;
    const int lane = threadIdx.x & 31;
    const long long r = item / heads;
    const int h = (int)(item % heads);
    const bool is_q = h < q_heads;
    uint16_t* v = qkv + r * row_stride + (is_q ? h * head_dim : k_col + (h - q_heads) * head_dim);
    const float* w = is_q ? q_w : k_w;
    float ss = 0.0f;
    for (int i = lane; i < head_dim; i += 32) {
        const float x = dllm_bf16_to_f32(v[i]);
        ss += x * x;
    }
    ss = dllm_warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)head_dim + eps);
    for (int i = lane; i < head_dim; i += 32) v[i] = dllm_f32_to_bf16((dllm_bf16_to_f32(v[i]) * inv) * w[i]);
}

// fp32 output: the check harness and the fp32 head path.
extern "C" __global__ void rmsnorm_f32_f32(const float* __restrict__ x, const float* __restrict__ w,
                                           float* __restrict__ out, int d, float eps, int vec) {
    dllm_pdl_entry();
    rmsnorm_body(x, w, out, d, eps, vec);
}

// RoPE (half-split, "rotate_half") in place on the q and k heads of a bf16 activation matrix.
// buf: [rows, row_stride] bf16; q heads start at column 0, k heads at column k_col (each head
// head_dim wide, contiguous). Row r has position pos_offset + (r % pos_period).
// inv_freq: [head_dim / 2] fp32, computed on the host by the CPU reference's rope_inv_freq.
// angle = (float)pos * inv_freq[i] in fp32, sinf/cosf (accurate, not the fast intrinsics).
// One thread per (row, head, i < head_dim/2); grid-stride.
extern "C" __global__ void rope_bf16(uint16_t* __restrict__ buf, const float* __restrict__ inv_freq,
                                     int rows, int row_stride, int q_heads, int k_heads, int k_col,
                                     int head_dim, int pos_period, int pos_offset) {
    dllm_pdl_entry();
    const int half = head_dim / 2;
    const int heads = q_heads + k_heads;
    const size_t total = (size_t)rows * heads * half;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(t % half);
        const int h = (int)((t / half) % heads);
        const size_t r = t / ((size_t)half * heads);
        const int pos = pos_offset + (int)(r % (size_t)pos_period);
        const int col = h < q_heads ? h * head_dim : k_col + (h - q_heads) * head_dim;
        uint16_t* p = buf + r * (size_t)row_stride + col;
        const float angle = (float)pos * inv_freq[i];
        const float c = cosf(angle), s = sinf(angle);
        const float x0 = dllm_bf16_to_f32(p[i]);
        const float x1 = dllm_bf16_to_f32(p[i + half]);
        p[i] = dllm_f32_to_bf16(x0 * c - x1 * s);
        p[i + half] = dllm_f32_to_bf16(x1 * c + x0 * s);
    }
}

// SwiGLU combine: gu bf16 [rows, 2h] = gate | up per row; out bf16 [rows, h] = silu(gate) * up,
// computed in fp32. Grid-stride over rows * h.
extern "C" __global__ void swiglu_bf16(const uint16_t* __restrict__ gu, uint16_t* __restrict__ out,
                                       int rows, int h) {
    dllm_pdl_entry();
    const size_t total = (size_t)rows * h;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / h;
        const int j = (int)(t % h);
        const float g = dllm_bf16_to_f32(gu[r * 2 * h + j]);
        const float u = dllm_bf16_to_f32(gu[r * 2 * h + h + j]);
        out[t] = dllm_f32_to_bf16(g / (1.0f + expf(-g)) * u);
    }
}

// Embedding gather: table bf16 [vocab, d] -> out fp32 [rows, d]. Row r reads the id at
// ids[(r / rows_per_seq) * id_seq_stride + id_offset + r % rows_per_seq] (a slice of each canvas
// of a [batch, id_seq_stride] id matrix; rows_per_seq = rows, stride 0, offset 0 for a flat list).
// An id outside the table writes NaN (the host validates ids; this makes a slip visible).
extern "C" __global__ void embedding_bf16_f32(const uint16_t* __restrict__ table, const uint32_t* __restrict__ ids,
                                              float* __restrict__ out, int rows, int d, int vocab,
                                              int rows_per_seq, int id_seq_stride, int id_offset) {
    dllm_pdl_entry();
    const size_t total = (size_t)rows * d;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / d;
        const int j = (int)(t % d);
        const uint32_t id = ids[(r / rows_per_seq) * id_seq_stride + id_offset + r % rows_per_seq];
        out[t] = id < (uint32_t)vocab ? dllm_bf16_to_f32(table[(size_t)id * d + j]) : __int_as_float(0x7fc00000);
    }
}

// bf16 -> f32, n elements.
extern "C" __global__ void bf16_to_f32(const uint16_t* __restrict__ in, float* __restrict__ out, long long n) {
    dllm_pdl_entry();
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long long)gridDim.x * blockDim.x) {
        out[t] = dllm_bf16_to_f32(in[t]);
    }
}

// f32 -> bf16 (round to nearest even), n elements.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ in, uint16_t* __restrict__ out, long long n) {
    dllm_pdl_entry();
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long long)gridDim.x * blockDim.x) {
        out[t] = dllm_f32_to_bf16(in[t]);
    }
}

// Row gather: out fp32 [n_idx, d] = src fp32 [*, d] rows idx[0..n_idx).
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, const int* __restrict__ idx,
                                           float* __restrict__ out, int n_idx, int d) {
    dllm_pdl_entry();
    const size_t total = (size_t)n_idx * d;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / d;
        const int j = (int)(t % d);
        out[t] = src[(size_t)idx[r] * d + j];
    }
}

// Strided bf16 row gather: out bf16 [n_idx, width] = columns [0, width) of the rows idx[0..n_idx)
// of src (row stride src_stride). Takes the query rows' q out of the fused QKV matrix when the
// last layer runs only for the rows a prediction reads. Two columns per thread when the stride
// and width are even and both pointers 4-byte aligned (every pair then aligned), else one.
extern "C" __global__ void gather_rows_bf16(const uint16_t* __restrict__ src, int src_stride,
                                            const int* __restrict__ idx, uint16_t* __restrict__ out,
                                            int n_idx, int width) {
    dllm_pdl_entry();
    const bool pairs = ((src_stride | width) & 1) == 0 &&
                       ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out)) & 3) == 0;
    const int per_row = pairs ? width / 2 : width;
    const size_t total = (size_t)n_idx * per_row;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / per_row;
        const int j = (int)(t % per_row);
        const size_t row = (size_t)idx[r] * src_stride;
        if (pairs) {
            reinterpret_cast<uint32_t*>(out)[r * per_row + j] =
                reinterpret_cast<const uint32_t*>(src + row)[j];
        } else {
            out[r * width + j] = src[row + j];
        }
    }
}

// Strided bf16 block copy: for row r < rows and column j < width,
//   dst[dst_row(r) * dst_stride + dst_col + j] = src[r * src_stride + src_col + j]
// with dst_row(r) = (r / rows_per_seq) * dst_seq_rows + dst_row_offset + (r % rows_per_seq).
// Writes fresh K/V rows of a (batch x len) slice into a [batch, S_max, kv_dim] cache, and copies
// Q out of the fused QKV matrix.
extern "C" __global__ void copy_rows_bf16(const uint16_t* __restrict__ src, int src_stride, int src_col,
                                          uint16_t* __restrict__ dst, int dst_stride, int dst_col, int rows,
                                          int width, int rows_per_seq, int dst_seq_rows, int dst_row_offset) {
    dllm_pdl_entry();
    const size_t total = (size_t)rows * width;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / width;
        const int j = (int)(t % width);
        const size_t seq = r / rows_per_seq;
        const size_t dr = seq * dst_seq_rows + dst_row_offset + r % rows_per_seq;
        dst[dr * dst_stride + dst_col + j] = src[r * src_stride + src_col + j];
    }
}

// Fills n 32-bit words with `bits` (used to poison outputs in the checks).
extern "C" __global__ void fill_u32(uint32_t* __restrict__ out, uint32_t bits, long long n) {
    dllm_pdl_entry();
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long long)gridDim.x * blockDim.x) {
        out[t] = bits;
    }
}

// Fused RoPE + K/V cache write over a fused QKV activation matrix, one block per row.
// qkv: [rows, row_stride] bf16; q heads (q_heads x head_dim) start at column 0, k heads
// (kv_heads x head_dim) at k_col, v heads at v_col. Row r has position
// pos = pos_offset + r % pos_period. The q and k heads are rotated in place (half-split, same
// arithmetic as rope_bf16: angle = (float)pos * inv_freq[i], cosf/sinf). When k_cache is not
// null, the rotated k part and the v part of row r are also written to row
// (r / pos_period) * cache_seq_rows + pos (width kv_heads x head_dim) of k_cache / v_cache.
// bias (nullable, fp32, indexed by qkv column): added to every q, k and v element before the
// rotation (q/k/v projection biases, Dream); the biased v is written back in place too.
// vec = 1 uses 16-byte accesses (8 bf16): the host sets it only when head_dim % 16 == 0, the
// columns and row stride are multiples of 8 and the buffers are 16-byte aligned.
// prefetch (nullable; 16-byte aligned, prefetch_bytes a multiple of 16): a buffer the next
// kernels read (the attention-output weights of a block step), requested into L2 with bulk
// prefetches (thread 0 of each block, 1/gridDim.x of it each) so that its stream from HBM
// overlaps RoPE and attention, which leave HBM idle.
// grouped = 1: the q and k heads are in the grouped pair layout (rope_first); the cache gets the
// same layout.
// canvas_start (nullable): per-canvas positions, row r of canvas c = r / pos_period at
// canvas_start[c] + r % pos_period instead of pos_offset + r % pos_period. kv_canvas (nullable):
// per-canvas caches, 2 * canvases pointers (canvases = gridDim.x / pos_period): canvas c's K rows
// at kv_canvas[c], its V rows at kv_canvas[canvases + c], row pos at pos * kv_width; k_cache,
// v_cache and cache_seq_rows are then not read (the packed cached steps of sessions whose caches
// are separate allocations).
// Block: DLLM_ROW_THREADS threads; head_dim <= 2 * DLLM_ROPE_MAX_HALF.
#define DLLM_ROPE_MAX_HALF 512
#ifndef DLLM_PREFETCH_CHUNK  // bytes per prefetch instruction, a multiple of 16 (device only: a kvariant define)
#define DLLM_PREFETCH_CHUNK 65536LL
#endif

__device__ __forceinline__ void dllm_prefetch_l2_slice(const unsigned char* p, long long bytes) {
    const long long per = ((bytes + gridDim.x - 1) / gridDim.x + 15) & ~15LL;
    const long long lo = min(bytes, per * (long long)blockIdx.x);
    const long long hi = min(bytes, lo + per);
    for (long long off = lo; off < hi; off += DLLM_PREFETCH_CHUNK) {
        const unsigned n = (unsigned)min(DLLM_PREFETCH_CHUNK, hi - off);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p + off), "r"(n) : "memory");
#else
        (void)n;  // the Ampere build: a hint without its sm_90 instruction (the model only asks on Hopper)
#endif
    }
}

// Where rotation pair i of a head sits: the first element at rope_first(i), the second
// rope_gap further. Half-split (grouped = 0): i and i + half. Grouped (the rows permuted for the
// GEMM's RoPE epilogue, DLLM_EPI_ROPE_QKV in gemm_common.cuh): groups of 16 columns, 8 first
// elements then their 8 partners, pair i in group i / 8.
__device__ __forceinline__ int rope_first(int i, int grouped) { return grouped ? ((i >> 3) << 4) + (i & 7) : i; }
__device__ __forceinline__ int rope_gap(int half, int grouped) { return grouped ? 8 : half; }

// (cos, sin) of pos * inv_freq[i] for pos < positions, i < half, at table[pos * half + i]: the
// table of the GEMM's RoPE epilogue, with rope_qkv_bf16's arithmetic (fp32 angle, cosf / sinf).
extern "C" __global__ void rope_table_f32(float2* __restrict__ table, const float* __restrict__ inv_freq,
                                          int positions, int half) {
    dllm_pdl_entry();
    const long long total = (long long)positions * half;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const float angle = (float)(int)(t / half) * inv_freq[t % half];
        table[t] = make_float2(cosf(angle), sinf(angle));
    }
}

extern "C" __global__ void rope_qkv_bf16(uint16_t* __restrict__ qkv, const float* __restrict__ inv_freq,
                                         const float* __restrict__ bias, uint16_t* __restrict__ k_cache, uint16_t* __restrict__ v_cache,
                                         int row_stride, int q_heads, int kv_heads, int k_col, int v_col,
                                         int head_dim, int pos_period, int pos_offset, int cache_seq_rows,
                                         int vec, const unsigned char* __restrict__ prefetch,
                                         long long prefetch_bytes, int grouped, const int* __restrict__ canvas_start,
                                         uint16_t* const* __restrict__ kv_canvas) {
    dllm_pdl_entry();
    if (prefetch != nullptr && threadIdx.x == 0) dllm_prefetch_l2_slice(prefetch, prefetch_bytes);
    __shared__ float cs[DLLM_ROPE_MAX_HALF];
    __shared__ float sn[DLLM_ROPE_MAX_HALF];
    const size_t r = blockIdx.x;
    const int half = head_dim / 2;
    const size_t canvas = r / (size_t)pos_period;
    const int pos = (canvas_start != nullptr ? canvas_start[canvas] : pos_offset) + (int)(r % (size_t)pos_period);
    for (int i = threadIdx.x; i < half; i += DLLM_ROW_THREADS) {
        const float angle = (float)pos * inv_freq[i];
        cs[i] = cosf(angle);
        sn[i] = sinf(angle);
    }
    __syncthreads();
    uint16_t* row = qkv + r * (size_t)row_stride;
    const int kv_width = kv_heads * head_dim;
    // This row's K and V cache rows: in its canvas's own cache (per-canvas table), in the batch cache, or none.
    uint16_t* kdst = nullptr;
    uint16_t* vdst = nullptr;
    if (kv_canvas != nullptr) {
        const size_t canvases = gridDim.x / (size_t)pos_period;
        kdst = kv_canvas[canvas] + (size_t)pos * kv_width;
        vdst = kv_canvas[canvases + canvas] + (size_t)pos * kv_width;
    } else if (k_cache != nullptr) {
        const size_t crow = (canvas * (size_t)cache_seq_rows + (size_t)pos) * (size_t)kv_width;
        kdst = k_cache + crow;
        vdst = v_cache + crow;
    }
    const bool to_cache = kdst != nullptr;
    const int heads = q_heads + kv_heads;
    if (vec) {
        const int groups = half / 8;  // 8-element groups per half head
        for (int t = threadIdx.x; t < heads * groups; t += DLLM_ROW_THREADS) {
            const int h = t / groups;
            const int i0 = (t % groups) * 8;
            const bool is_k = h >= q_heads;
            const int col = is_k ? k_col + (h - q_heads) * head_dim : h * head_dim;
            const int o0 = rope_first(i0, grouped), o1 = o0 + rope_gap(half, grouped);
            uint4* p0 = reinterpret_cast<uint4*>(row + col + o0);
            uint4* p1 = reinterpret_cast<uint4*>(row + col + o1);
            uint4 a = *p0, b = *p1;
            uint16_t* ea = reinterpret_cast<uint16_t*>(&a);
            uint16_t* eb = reinterpret_cast<uint16_t*>(&b);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float c = cs[i0 + j], s = sn[i0 + j];
                float x0 = dllm_bf16_to_f32(ea[j]);
                float x1 = dllm_bf16_to_f32(eb[j]);
                if (bias) {
                    x0 += bias[col + o0 + j];
                    x1 += bias[col + o1 + j];
                }
                ea[j] = dllm_f32_to_bf16(x0 * c - x1 * s);
                eb[j] = dllm_f32_to_bf16(x1 * c + x0 * s);
            }
            *p0 = a;
            *p1 = b;
            if (is_k && to_cache) {
                const int kc = (h - q_heads) * head_dim;
                *reinterpret_cast<uint4*>(kdst + kc + o0) = a;
                *reinterpret_cast<uint4*>(kdst + kc + o1) = b;
            }
        }
        if (bias) {
            for (int t = threadIdx.x; t < kv_width / 8; t += DLLM_ROW_THREADS) {
                uint4* p = reinterpret_cast<uint4*>(row + v_col + t * 8);
                uint4 a = *p;
                uint16_t* ea = reinterpret_cast<uint16_t*>(&a);
#pragma unroll
                for (int j = 0; j < 8; ++j) ea[j] = dllm_f32_to_bf16(dllm_bf16_to_f32(ea[j]) + bias[v_col + t * 8 + j]);
                *p = a;
                if (to_cache) *reinterpret_cast<uint4*>(vdst + t * 8) = a;
            }
        } else if (to_cache) {
            for (int t = threadIdx.x; t < kv_width / 8; t += DLLM_ROW_THREADS) {
                *reinterpret_cast<uint4*>(vdst + t * 8) =
                    *reinterpret_cast<const uint4*>(row + v_col + t * 8);
            }
        }
    } else {
        for (int t = threadIdx.x; t < heads * half; t += DLLM_ROW_THREADS) {
            const int h = t / half;
            const int i = t % half;
            const bool is_k = h >= q_heads;
            const int col = is_k ? k_col + (h - q_heads) * head_dim : h * head_dim;
            uint16_t* p = row + col;
            const int o0 = rope_first(i, grouped), o1 = o0 + rope_gap(half, grouped);
            const float c = cs[i], s = sn[i];
            float x0 = dllm_bf16_to_f32(p[o0]);
            float x1 = dllm_bf16_to_f32(p[o1]);
            if (bias) {
                x0 += bias[col + o0];
                x1 += bias[col + o1];
            }
            const uint16_t y0 = dllm_f32_to_bf16(x0 * c - x1 * s);
            const uint16_t y1 = dllm_f32_to_bf16(x1 * c + x0 * s);
            p[o0] = y0;
            p[o1] = y1;
            if (is_k && to_cache) {
                const int kc = (h - q_heads) * head_dim;
                kdst[kc + o0] = y0;
                kdst[kc + o1] = y1;
            }
        }
        if (bias) {
            for (int t = threadIdx.x; t < kv_width; t += DLLM_ROW_THREADS) {
                const uint16_t y = dllm_f32_to_bf16(dllm_bf16_to_f32(row[v_col + t]) + bias[v_col + t]);
                row[v_col + t] = y;
                if (to_cache) vdst[t] = y;
            }
        } else if (to_cache) {
            for (int t = threadIdx.x; t < kv_width; t += DLLM_ROW_THREADS) vdst[t] = row[v_col + t];
        }
    }
}

// SwiGLU combine with 16-byte accesses: like swiglu_bf16, 8 outputs per thread. The host uses it
// only when h % 8 == 0 and both buffers are 16-byte aligned. Grid-stride over rows * h / 8.
extern "C" __global__ void swiglu_bf16_v8(const uint16_t* __restrict__ gu, uint16_t* __restrict__ out,
                                          int rows, int h) {
    dllm_pdl_entry();
    const int hv = h / 8;
    const size_t total = (size_t)rows * hv;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / hv;
        const int j = (int)(t % hv) * 8;
        const uint4 g4 = *reinterpret_cast<const uint4*>(gu + r * 2 * (size_t)h + j);
        const uint4 u4 = *reinterpret_cast<const uint4*>(gu + r * 2 * (size_t)h + h + j);
        const uint16_t* g = reinterpret_cast<const uint16_t*>(&g4);
        const uint16_t* u = reinterpret_cast<const uint16_t*>(&u4);
        uint4 o4;
        uint16_t* o = reinterpret_cast<uint16_t*>(&o4);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float gf = dllm_bf16_to_f32(g[e]);
            const float uf = dllm_bf16_to_f32(u[e]);
            o[e] = dllm_f32_to_bf16(gf / (1.0f + expf(-gf)) * uf);
        }
        *reinterpret_cast<uint4*>(out + r * (size_t)h + j) = o4;
    }
}
