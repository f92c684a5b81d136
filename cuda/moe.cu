// dllm mixture-of-experts routing (LLaDA-MoE; host side: src/backend/cuda/moe.rs; the CPU
// reference: src/model/experts.rs). A layer's feed-forward over `rows` rows runs:
//   router GEMM (fp32 logits [rows, E]) -> moe_route -> moe_group -> gemm_grouped_mg (gate/up with
//   the SwiGLU epilogue) -> gemm_grouped_mg (down, fp32) -> moe_combine (into the residual).
// Pairs: row r's j-th chosen expert is pair r * k + j, its experts in ascending id order. Every
// grid depends on the row count alone (the counts per expert stay on the device), so a step that
// runs them can be captured in a CUDA graph.
#include "common.cuh"

#define MOE_THREADS 128
#define MOE_GROUP_THREADS 256
// Most experts a row may choose (the host checks k <= MOE_MAX_K).
#define MOE_MAX_K 32

// f32 bits as an int whose signed order is f32::total_cmp's (src/model/experts.rs ranks by it):
// -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN.
__device__ __forceinline__ int moe_total_key(float v) {
    const int b = __float_as_int(v);
    return b ^ (int)(((unsigned int)(b >> 31)) >> 1);
}

// exp(l - mx) with every NaN the positive canonical one (the device's own NaN; src/model/experts.rs
// ranks NaN so too), whatever the sign the subtraction gave it (x86 makes inf - inf a negative NaN:
// the CPU emulation of tests/kernel_emulation.rs runs this there).
__device__ __forceinline__ float moe_exp(float l, float mx) {
    const float v = expf(l - mx);
    return v == v ? v : __int_as_float(0x7fffffff);
}

// Whether (ka, ia) ranks before (kb, ib): the larger key first, ties to the lower index.
__device__ __forceinline__ bool moe_before(int ka, int ia, int kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// moe_route: one warp per row. p = softmax(logits[r]) (fp32; the max ignores NaN like
// f32::max); the k most probable experts (ranked by exp(l - max) under total_cmp, ties to the
// lower index) go to sel_e[r * k ..] in ascending expert order with their probabilities in
// sel_w (not renormalised). k <= min(E, MOE_MAX_K) (host-checked), so the k picks are distinct
// valid experts whatever the logits hold. Grid: ceil(rows / 4), block MOE_THREADS.
extern "C" __global__ void __launch_bounds__(MOE_THREADS) moe_route(const float* __restrict__ logits, int rows, int E,
                                                                    int k, int* __restrict__ sel_e,
                                                                    float* __restrict__ sel_w) {
    dllm_pdl_entry();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (MOE_THREADS / 32) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* l = logits + (size_t)row * E;
    float mx = -INFINITY;
    for (int i = lane; i < E; i += 32) mx = fmaxf(mx, l[i]);
    mx = dllm_warp_max(mx);
    float sum = 0.0f;
    for (int i = lane; i < E; i += 32) sum += moe_exp(l[i], mx);
    sum = dllm_warp_sum(sum);
    // Pick j is the best expert ranked after pick j - 1; lane j keeps pick j.
    int prev_key = 0, prev_idx = -1;
    int my_e = 0;
    float my_p = 0.0f;
    for (int j = 0; j < k; ++j) {
        int best_key = 0, best_idx = -1;
        for (int i = lane; i < E; i += 32) {
            const int key = moe_total_key(moe_exp(l[i], mx));
            const bool after = j == 0 || moe_before(prev_key, prev_idx, key, i);
            if (after && (best_idx < 0 || moe_before(key, i, best_key, best_idx))) {
                best_key = key;
                best_idx = i;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const int ok = __shfl_xor_sync(0xffffffffu, best_key, o);
            const int oi = __shfl_xor_sync(0xffffffffu, best_idx, o);
            if (oi >= 0 && (best_idx < 0 || moe_before(ok, oi, best_key, best_idx))) {
                best_key = ok;
                best_idx = oi;
            }
        }
        // Every lane now holds the same pick (k <= E: there is always one).
        prev_key = best_key;
        prev_idx = best_idx;
        if (lane == j) {
            my_e = best_idx;
            my_p = moe_exp(l[best_idx], mx) / sum;
        }
    }
    // Lane j < k writes its pick at its rank among the picks by expert id.
    int rank = 0;
    for (int i = 0; i < k; ++i) {
        const int other = __shfl_sync(0xffffffffu, my_e, i);
        rank += other < my_e ? 1 : 0;
    }
    if (lane < k) {
        sel_e[(size_t)row * k + rank] = my_e;
        sel_w[(size_t)row * k + rank] = my_p;
    }
}

// moe_group: one block per expert e. off[e] = the number of pairs choosing an expert below e,
// cnt[e] = the pairs choosing e; the pairs choosing e, in pair order, get grouped positions
// off[e], off[e] + 1, ...: pair_pos[pair] = its position and grp_row[position] = its row
// (pair / k). Deterministic (no atomics). Grid: E, block MOE_GROUP_THREADS.
extern "C" __global__ void __launch_bounds__(MOE_GROUP_THREADS)
    moe_group(const int* __restrict__ sel_e, int pairs, int k, int* __restrict__ off, int* __restrict__ cnt,
              int* __restrict__ pair_pos, int* __restrict__ grp_row) {
    dllm_pdl_entry();
    constexpr int WARPS = MOE_GROUP_THREADS / 32;
    __shared__ int s_less[WARPS];
    __shared__ int s_eq[WARPS];
    const int e = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    // Warp w scans the contiguous pairs [begin, end), 32 at a time.
    const int seg = ((pairs + WARPS - 1) / WARPS + 31) & ~31;
    const int begin = min(pairs, warp * seg);
    const int end = min(pairs, begin + seg);
    int less = 0, eq = 0;
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const int x = i < end ? sel_e[i] : 0x7fffffff;
        less += x < e ? 1 : 0;
        eq += x == e ? 1 : 0;
    }
    for (int o = 16; o > 0; o >>= 1) {
        less += __shfl_xor_sync(0xffffffffu, less, o);
        eq += __shfl_xor_sync(0xffffffffu, eq, o);
    }
    if (lane == 0) {
        s_less[warp] = less;
        s_eq[warp] = eq;
    }
    __syncthreads();
    int first = 0, total = 0, before = 0;
    for (int w = 0; w < WARPS; ++w) {
        first += s_less[w];
        total += s_eq[w];
        before += w < warp ? s_eq[w] : 0;
    }
    if (threadIdx.x == 0) {
        off[e] = first;
        cnt[e] = total;
    }
    if (s_eq[warp] == 0) return;
    int pos = first + before;
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const bool mine = i < end && sel_e[i] == e;
        const unsigned int ballot = __ballot_sync(0xffffffffu, mine);
        if (mine) {
            const int p = pos + __popc(ballot & ((1u << lane) - 1u));
            pair_pos[i] = p;
            grp_row[p] = i / k;
        }
        pos += __popc(ballot);
    }
}

// moe_combine: x[r] += sum over row r's pairs, in ascending expert order, of sel_w[pair] *
// y[pair_pos[pair]] (y: the down projections, fp32 [pairs, d], in grouped order).
// Grid: rows, block MOE_THREADS.
extern "C" __global__ void __launch_bounds__(MOE_THREADS)
    moe_combine(const float* __restrict__ y, const int* __restrict__ pair_pos, const float* __restrict__ sel_w,
                int k, int d, float* __restrict__ x) {
    dllm_pdl_entry();
    __shared__ int s_pos[MOE_MAX_K];
    __shared__ float s_w[MOE_MAX_K];
    const int r = blockIdx.x;
    const int tid = threadIdx.x;
    if (tid < k) {
        s_pos[tid] = pair_pos[(size_t)r * k + tid];
        s_w[tid] = sel_w[(size_t)r * k + tid];
    }
    __syncthreads();
    float* xr = x + (size_t)r * d;
    for (int n = tid; n < d; n += MOE_THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) acc += s_w[j] * y[(size_t)s_pos[j] * d + n];
        xr[n] += acc;
    }
}
