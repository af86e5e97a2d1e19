// Fused residual add + RMSNorm, one block per row.
//
// x:        [rows, dim]; with residual != nullptr, h = x + residual (the new residual stream,
//           rounded to T) is written to h_out (which may be x itself: in place); with
//           residual == nullptr nothing is written but out (plain RMSNorm of x).
// out:      [rows, dim] = T(T(x * rsqrt(mean(x^2) + eps)) * w), the rounding order of the
//           reference (normalize in f32, cast, then scale by the weight).
// w:        [dim]. All rows contiguous.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_residual(const T* x, const T* __restrict__ residual, T* h_out,
                                 const T* __restrict__ w, T* __restrict__ out, int dim,
                                 float eps) {
    const int64_t row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* rr = residual ? residual + row * dim : nullptr;
    T* hr = residual ? h_out + row * dim : nullptr;
    T* o = out + row * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (rr) {
            const T h = from_f32<T>(v + to_f32(rr[i]));
            hr[i] = h;
            v = to_f32(h);
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    const float rinv = rsqrtf(ss / (float)dim + eps);
    // Each thread re-reads only the elements it wrote itself.
    const T* src = rr ? hr : xr;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float n = to_f32(from_f32<T>(to_f32(src[i]) * rinv));
        o[i] = from_f32<T>(n * to_f32(w[i]));
    }
}

extern "C" __global__ void rmsnorm_residual_bf16(const bf16* x, const bf16* residual, bf16* h_out,
                                                 const bf16* w, bf16* out, int dim, float eps) {
    rmsnorm_residual<bf16>(x, residual, h_out, w, out, dim, eps);
}
extern "C" __global__ void rmsnorm_residual_f32(const float* x, const float* residual, float* h_out,
                                                const float* w, float* out, int dim, float eps) {
    rmsnorm_residual<float>(x, residual, h_out, w, out, dim, eps);
}
