// Helpers shared by the GEMM kernels (cuda/gemm.cu, cuda/gemm_wgmma.cu, cuda/gemm_stream.cu):
// epilogue codes, bf16 conversion, the element / pair stores of the three epilogues, and the
// m16n8k16 bf16 mma.sync.
#pragma once
#include "common.cuh"

#define DLLM_EPI_STORE_BF16 0
#define DLLM_EPI_STORE_F32 1
#define DLLM_EPI_ADD_F32 2

__device__ __forceinline__ float gemm_bf16_to_f32(uint16_t b) { return __uint_as_float(((uint32_t)b) << 16); }

__device__ __forceinline__ uint16_t gemm_f32_to_bf16(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Writes one output element according to the epilogue.
__device__ __forceinline__ void gemm_store1(void* C, size_t idx, float v, int epi) {
    if (epi == DLLM_EPI_STORE_BF16) {
        ((uint16_t*)C)[idx] = gemm_f32_to_bf16(v);
    } else if (epi == DLLM_EPI_STORE_F32) {
        ((float*)C)[idx] = v;
    } else {
        ((float*)C)[idx] += v;
    }
}

// Writes two adjacent output elements (idx even, so the pair is 4/8-byte aligned).
__device__ __forceinline__ void gemm_store2(void* C, size_t idx, float v0, float v1, int epi) {
    if (epi == DLLM_EPI_STORE_BF16) {
        uint32_t packed = (uint32_t)gemm_f32_to_bf16(v0) | ((uint32_t)gemm_f32_to_bf16(v1) << 16);
        *(uint32_t*)((uint16_t*)C + idx) = packed;
    } else if (epi == DLLM_EPI_STORE_F32) {
        *(float2*)((float*)C + idx) = make_float2(v0, v1);
    } else {
        float2* p = (float2*)((float*)C + idx);
        float2 c = *p;
        c.x += v0;
        c.y += v1;
        *p = c;
    }
}

// D = A(16x16, row) * B(16x8, col) + D, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void gemm_mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
