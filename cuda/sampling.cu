// Parallel sampling for dllm: the GPU twin of src/denoise/predict.rs `predict_row`, and the per-canvas commit.
//
// predict_partial + predict_finalize: fp32 logits rows [R, width] -> per row the token x0 (i32) and its confidence
// (f64). Each row is cut into `splits` chunks; a block per (chunk, row) reduces its chunk to a PredictPartial
// (row max, top-2, sum of exp, entropy term, best candidate), and predict_finalize merges the chunks of a row.
//   candidates: ids j < vocab_n (= min(vocab_size, width)), j != mask. x0 = argmax of the score, ties to the
//   lower id, where score = l (T = 0) or l - T*ln(-ln u), u = dllm_uniform(seed, step, pos, j), in float64.
//   As in the sequential host loop, the first candidate wins whenever no later score is strictly greater, and
//   always when its own score is NaN.
//   confidence by mode: 0 low-confidence = softmax(row)[x0] in float64 over all `width` entries, noise-free;
//   1 random = dllm_uniform(seed, step, pos, 2^64-1); 2 margin = p1 - p2 (two largest softmax probabilities of
//   the row); 3 entropy = sum p ln p over the row (<= 0, larger = more confident).
// commit_kernel: one block per canvas; picks the k most confident still-masked positions (ties to the lower
// position, NaN last) or, with a threshold, the most confident plus every other with confidence >= threshold; writes
// their tokens into the device canvas and records count + positions + tokens.
#include "common.cuh"

struct PredictPartial {
    double sum;         // sum over the chunk of exp(x - maxv)
    double ent;         // sum over the chunk of exp(x - maxv) * (x - maxv)
    double best_score;  // best candidate score in the chunk (excluding the first candidate)
    float maxv;         // max logit of the chunk (NaN ignored)
    float top2;         // second largest logit of the chunk (counting repeats)
    int best_idx;       // INT_MAX when the chunk has no candidate
    int pad;
};

#define PREDICT_THREADS 256
#define PREDICT_NONE 0x7fffffff

__device__ __forceinline__ double predict_score(float x, int j, double temperature, unsigned long long seed,
                                                unsigned long long step, unsigned long long pos) {
    if (temperature > 0.0) {
        const double u = dllm_uniform(seed, step, pos, (unsigned long long)j);
        const double g = log(-log(u));
        // Same rounding as the host: l - (T * g), no fused multiply-add.
        return __dsub_rn((double)x, __dmul_rn(temperature, g));
    }
    return (double)x;
}

__device__ __forceinline__ bool predict_better(double s, int j, double bs, int bj) {
    return s > bs || (s == bs && j < bj);
}

__device__ __forceinline__ void predict_top2_push(float x, float& t1, float& t2) {
    if (x > t1) {
        t2 = t1;
        t1 = x;
    } else if (x > t2) {
        t2 = x;
    }
}

// grid (splits, R), block PREDICT_THREADS. chunk is a multiple of 4; vec_ok selects float4 loads.
extern "C" __global__ void __launch_bounds__(PREDICT_THREADS)
    predict_partial(const float* __restrict__ logits, long long width, const int* __restrict__ positions,
                    int vocab_n, int mask, int first, double temperature, unsigned long long seed,
                    unsigned long long step, int mode, long long chunk, int vec_ok,
                    PredictPartial* __restrict__ part) {
    dllm_pdl_entry();
    const int split = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
    const float* x = logits + (long long)row * width;
    const long long c0 = (long long)split * chunk;
    const long long c1 = min(width, c0 + chunk);
    const unsigned long long pos = (unsigned long long)(long long)positions[row];
    const bool sampled = temperature > 0.0;
    const bool want_top2 = mode == 2;

    float mx = -INFINITY;
    double bs = -INFINITY;
    int bj = PREDICT_NONE;
    float bsf = -INFINITY;  // greedy path: compare in fp32 (exact same order as in fp64)
    const double reach = 37.5 * temperature;

    auto visit = [&](float l, long long jj) {
        mx = fmaxf(mx, l);
        const int j = (int)jj;
        if (j < vocab_n && j != mask && j != first) {
            if (sampled) {
                // Skip exactly the candidates that cannot win: the Gumbel term -ln(-ln u) is below
                // 37.43 for every u that dllm_uniform can return (u <= 1 - 2^-54).
                if ((double)l + reach >= bs || bj == PREDICT_NONE) {
                    const double s = predict_score(l, j, temperature, seed, step, pos);
                    if (predict_better(s, j, bs, bj)) {
                        bs = s;
                        bj = j;
                    }
                }
            } else if (l > bsf || (l == bsf && j < bj)) {
                bsf = l;
                bj = j;
            }
        }
    };
    float a1 = -INFINITY, a2 = -INFINITY;  // top-2 logits (margin mode only)

    const bool vec = vec_ok != 0;  // width % 4 == 0 and 16-byte aligned logits (checked by the host)
    if (vec) {
        for (long long i = c0 + 4 * tid; i < c1; i += 4 * PREDICT_THREADS) {
            const float4 f = __ldg(reinterpret_cast<const float4*>(x + i));
            visit(f.x, i);
            visit(f.y, i + 1);
            visit(f.z, i + 2);
            visit(f.w, i + 3);
            if (want_top2) {
                predict_top2_push(f.x, a1, a2);
                predict_top2_push(f.y, a1, a2);
                predict_top2_push(f.z, a1, a2);
                predict_top2_push(f.w, a1, a2);
            }
        }
    } else {
        for (long long i = c0 + tid; i < c1; i += PREDICT_THREADS) {
            const float l = __ldg(x + i);
            visit(l, i);
            if (want_top2) predict_top2_push(l, a1, a2);
        }
    }
    if (!sampled) bs = (double)bsf;

    // Block reduction of max, top-2 and best candidate.
    __shared__ float s_mx[PREDICT_THREADS / 32], s_a1[PREDICT_THREADS / 32], s_a2[PREDICT_THREADS / 32];
    __shared__ double s_bs[PREDICT_THREADS / 32];
    __shared__ int s_bj[PREDICT_THREADS / 32];
    __shared__ float s_blockmax;
    __shared__ double s_sum[PREDICT_THREADS / 32], s_ent[PREDICT_THREADS / 32];
    const int lane = tid & 31, warp = tid >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float omx = __shfl_xor_sync(0xffffffffu, mx, o);
        const float o1 = __shfl_xor_sync(0xffffffffu, a1, o);
        const float o2 = __shfl_xor_sync(0xffffffffu, a2, o);
        const double obs = __shfl_xor_sync(0xffffffffu, bs, o);
        const int obj = __shfl_xor_sync(0xffffffffu, bj, o);
        mx = fmaxf(mx, omx);
        predict_top2_push(o1, a1, a2);
        predict_top2_push(o2, a1, a2);
        if (predict_better(obs, obj, bs, bj)) {
            bs = obs;
            bj = obj;
        }
    }
    if (lane == 0) {
        s_mx[warp] = mx;
        s_a1[warp] = a1;
        s_a2[warp] = a2;
        s_bs[warp] = bs;
        s_bj[warp] = bj;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < PREDICT_THREADS / 32; ++w) {
            mx = fmaxf(mx, s_mx[w]);
            predict_top2_push(s_a1[w], a1, a2);
            predict_top2_push(s_a2[w], a1, a2);
            if (predict_better(s_bs[w], s_bj[w], bs, bj)) {
                bs = s_bs[w];
                bj = s_bj[w];
            }
        }
        s_blockmax = mx;
    }
    __syncthreads();
    const float m = s_blockmax;

    // Pass 2 (the chunk is now in L1/L2): sum of exp and entropy term relative to the chunk max, in fp64.
    double sum = 0.0, ent = 0.0;
    if (m != -INFINITY) {
        const double md = (double)m;
        const bool want_ent = mode == 3;
        auto acc = [&](float l) {
            const double d = (double)l - md;
            const double e = exp(d);
            sum += e;
            if (want_ent && e > 0.0) ent += e * d;
        };
        if (vec) {
            for (long long i = c0 + 4 * tid; i < c1; i += 4 * PREDICT_THREADS) {
                const float4 f = __ldg(reinterpret_cast<const float4*>(x + i));
                acc(f.x);
                acc(f.y);
                acc(f.z);
                acc(f.w);
            }
        } else {
            for (long long i = c0 + tid; i < c1; i += PREDICT_THREADS) acc(__ldg(x + i));
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
        ent += __shfl_xor_sync(0xffffffffu, ent, o);
    }
    if (lane == 0) {
        s_sum[warp] = sum;
        s_ent[warp] = ent;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < PREDICT_THREADS / 32; ++w) {
            sum += s_sum[w];
            ent += s_ent[w];
        }
        PredictPartial p;
        p.sum = sum;
        p.ent = ent;
        p.best_score = bs;
        p.maxv = m;
        p.top2 = a2;
        p.best_idx = bj;
        p.pad = 0;
        part[(long long)row * gridDim.x + split] = p;
    }
}

// One thread per row: merges the row's `splits` partials and writes token + confidence.
extern "C" __global__ void predict_finalize(const float* __restrict__ logits, long long width,
                                            const int* __restrict__ positions, int rows, int splits, int first,
                                            double temperature, unsigned long long seed, unsigned long long step,
                                            int mode, const PredictPartial* __restrict__ part,
                                            int* __restrict__ out_tokens, double* __restrict__ out_conf) {
    dllm_pdl_entry();
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float* x = logits + (long long)row * width;
    const unsigned long long pos = (unsigned long long)(long long)positions[row];
    const PredictPartial* p = part + (long long)row * splits;

    float M = -INFINITY, a1 = -INFINITY, a2 = -INFINITY;
    double bs = -INFINITY;
    int bj = PREDICT_NONE;
    for (int s = 0; s < splits; ++s) {
        M = fmaxf(M, p[s].maxv);
        predict_top2_push(p[s].maxv, a1, a2);
        predict_top2_push(p[s].top2, a1, a2);
        if (predict_better(p[s].best_score, p[s].best_idx, bs, bj)) {
            bs = p[s].best_score;
            bj = p[s].best_idx;
        }
    }
    double S = 0.0, E = 0.0;
    const double Md = (double)M;
    if (M != -INFINITY) {
        for (int s = 0; s < splits; ++s) {
            if (p[s].maxv == -INFINITY) continue;
            const double dm = (double)p[s].maxv - Md;
            const double w = exp(dm);
            S += p[s].sum * w;
            E += w * (p[s].ent + dm * p[s].sum);
        }
    } else {
        S = nan("");
        E = nan("");
    }

    const double s0 = predict_score(x[first], first, temperature, seed, step, pos);
    int x0 = first;
    if (!isnan(s0) && bj != PREDICT_NONE && bs > s0) x0 = bj;
    out_tokens[row] = x0;

    double conf;
    if (mode == 1) {
        conf = dllm_uniform(seed, step, pos, 0xffffffffffffffffull);
    } else if (mode == 2) {
        conf = (exp((double)a1 - Md) - exp((double)a2 - Md)) / S;
    } else if (mode == 3) {
        conf = E / S - log(S);
    } else {
        conf = exp((double)x[x0] - Md) / S;
    }
    out_conf[row] = conf;
}

// Rank order of src/denoise/commit.rs: higher confidence first, NaN below every number (-inf included),
// ties to the lower position.
__device__ __forceinline__ bool commit_before(double ca, int pa, double cb, int pb) {
    const bool na = isnan(ca), nb = isnan(cb);
    if (na != nb) return nb;
    if (!na && ca != cb) return ca > cb;
    return pa < pb;
}

// grid (batch), block = rows_per_canvas rounded up to a multiple of 32 (<= 1024).
// Rows of canvas b are b*rows_per_canvas .. +rows_per_canvas; a row is eligible when its position is inside the
// canvas, the canvas holds mask_token there, and no earlier row of the canvas has the same position.
// out per canvas: [count, positions ascending (rows_per_canvas slots, -1 padded), tokens (same order, -1 padded)].
extern "C" __global__ void commit_kernel(int* __restrict__ canvas, long long canvas_len,
                                         const int* __restrict__ tokens, const double* __restrict__ conf,
                                         const int* __restrict__ positions, int rows_per_canvas, int mask_token,
                                         int k, double threshold, int use_threshold, int* __restrict__ out) {
    dllm_pdl_entry();
    DLLM_DYNAMIC_SHARED(unsigned char, commit_smem);
    double* sc = reinterpret_cast<double*>(commit_smem);         // rows
    int* sp = reinterpret_cast<int*>(sc + rows_per_canvas);       // rows
    int* se = sp + rows_per_canvas;                               // rows: eligible
    int* ss = se + rows_per_canvas;                               // rows: selected
    const int b = blockIdx.x, i = threadIdx.x, n = rows_per_canvas;
    int* cv = canvas + (long long)b * canvas_len;
    const long long r = (long long)b * n + i;
    int* ob = out + (long long)b * (1 + 2 * n);

    if (i < n) {
        sc[i] = conf[r];
        sp[i] = positions[r];
    }
    __syncthreads();
    bool elig = false;
    if (i < n) {
        const int p = sp[i];
        elig = p >= 0 && p < canvas_len && cv[p] == mask_token;
        for (int j = 0; j < i && elig; ++j)
            if (sp[j] == p) elig = false;
        se[i] = elig ? 1 : 0;
    }
    __syncthreads();
    bool sel = false;
    if (i < n && elig) {
        const double c = sc[i];
        const int p = sp[i];
        int rank = 0;
        for (int j = 0; j < n; ++j)
            if (se[j] && commit_before(sc[j], sp[j], c, p)) ++rank;
        sel = use_threshold ? (rank == 0 || c >= threshold) : rank < k;
    }
    if (i < n) ss[i] = sel ? 1 : 0;
    __syncthreads();
    if (i < n) {
        ob[1 + i] = -1;
        ob[1 + n + i] = -1;
    }
    __syncthreads();
    if (sel) {
        const int p = sp[i];
        int idx = 0, count = 0;
        for (int j = 0; j < n; ++j) {
            if (ss[j]) {
                ++count;
                if (sp[j] < p) ++idx;
            }
        }
        const int tok = tokens[r];
        cv[p] = tok;
        ob[1 + idx] = p;
        ob[1 + n + idx] = tok;
        if (idx == 0) ob[0] = count;
    }
    if (i == 0) {
        int any = 0;
        for (int j = 0; j < n; ++j) any |= ss[j];
        if (!any) ob[0] = 0;
    }
}
