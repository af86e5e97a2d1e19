// Greedy token choice on the device, one block per row: the index of the row's largest value,
// the lowest index among equal values, NaN never chosen (0 for a row of NaNs), the rule of
// the host sampler's argmax. Only the ids leave the device.
//
// logits: [rows, vocab] f32, row stride ld (elements); ids: [rows] u32.
#include "common.cuh"

// (value, index) better than (best, best_i): larger, or equal and at a lower index; NaN values
// are never better, and anything beats the empty candidate (index -1).
__device__ __forceinline__ bool better(float v, int64_t i, float best, int64_t best_i) {
    if (isnan(v) || i < 0) return false;
    if (best_i < 0) return true;
    return v > best || (v == best && i < best_i);
}

extern "C" __global__ void argmax_rows_f32(const float* __restrict__ logits, int64_t ld, int64_t vocab,
                                           uint32_t* __restrict__ ids) {
    const int64_t row = blockIdx.x;
    const float* x = logits + row * ld;
    float best = 0.f;
    int64_t best_i = -1;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (better(v, i, best, best_i)) {
            best = v;
            best_i = i;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, off);
        const int64_t i = __shfl_xor_sync(0xffffffffu, best_i, off);
        if (better(v, i, best, best_i)) {
            best = v;
            best_i = i;
        }
    }
    __shared__ float s_best[32];
    __shared__ int64_t s_index[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        s_best[warp] = best;
        s_index[warp] = best_i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < warps; ++w) {
            if (better(s_best[w], s_index[w], best, best_i)) {
                best = s_best[w];
                best_i = s_index[w];
            }
        }
        ids[row] = best_i < 0 ? 0u : (uint32_t)best_i;
    }
}
