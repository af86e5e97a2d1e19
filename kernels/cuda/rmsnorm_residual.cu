// Fused residual add + RMSNorm, one block per row.
//
// x:        [rows, dim], updated in place to x + residual (the new residual stream), rounded
//           to T; with residual == nullptr x is left alone (plain RMSNorm).
// out:      [rows, dim] = T(T(x * rsqrt(mean(x^2) + eps)) * w), the rounding order of the
//           reference (normalize in f32, cast, then scale by the weight).
// w:        [dim]. All rows contiguous.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_residual(T* __restrict__ x, const T* __restrict__ residual,
                                 const T* __restrict__ w, T* __restrict__ out, int dim,
                                 float eps) {
    const int64_t row = blockIdx.x;
    T* xr = x + row * dim;
    const T* rr = residual ? residual + row * dim : nullptr;
    T* o = out + row * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (rr) {
            const T h = from_f32<T>(v + to_f32(rr[i]));
            xr[i] = h;
            v = to_f32(h);
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    const float rinv = rsqrtf(ss / (float)dim + eps);
    // Each thread re-reads only the elements it wrote itself.
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float n = to_f32(from_f32<T>(to_f32(xr[i]) * rinv));
        o[i] = from_f32<T>(n * to_f32(w[i]));
    }
}

extern "C" __global__ void rmsnorm_residual_bf16(bf16* x, const bf16* residual, const bf16* w,
                                                 bf16* out, int dim, float eps) {
    rmsnorm_residual<bf16>(x, residual, w, out, dim, eps);
}
extern "C" __global__ void rmsnorm_residual_f32(float* x, const float* residual, const float* w,
                                                float* out, int dim, float eps) {
    rmsnorm_residual<float>(x, residual, w, out, dim, eps);
}
