// Rotary embedding of q_pe and k_pe in place, one block per token.
//
// q:   [T, H, rot] with token stride q_tok and head stride q_head (elements), last dim
//      contiguous; may be null when heads == 0.
// k:   [T, rot] with token stride k_tok; may be null.
// cos, sin: [T, rot/2] f32, row t for token t (the step's per-token tables, YaRN's
//      frequencies and attention factor folded in by the host), so every token is rotated:
//      no position table to run past.
// interleaved != 0 rotates pairs (x[2i], x[2i+1]) (DeepSeek), else (x[i], x[i + rot/2]).
#include "common.cuh"

template <typename T>
__device__ void rope_inplace(T* q, int64_t q_tok, int64_t q_head, int heads, T* k, int64_t k_tok,
                             const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                             int rot, int interleaved) {
    const int64_t t = blockIdx.x;
    const int half = rot / 2;
    const float* c = cos_t + t * half;
    const float* s = sin_t + t * half;
    const int rows = heads + (k != nullptr ? 1 : 0);
    for (int i = threadIdx.x; i < rows * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        T* x = h < heads ? q + t * q_tok + (int64_t)h * q_head : k + t * k_tok;
        const int ia = interleaved ? 2 * j : j;
        const int ib = interleaved ? 2 * j + 1 : j + half;
        const float a = to_f32(x[ia]), b = to_f32(x[ib]);
        const float cj = c[j], sj = s[j];
        x[ia] = from_f32<T>(a * cj - b * sj);
        x[ib] = from_f32<T>(a * sj + b * cj);
    }
}

#define ROPE(NAME, T)                                                                          \
    extern "C" __global__ void NAME(T* q, int64_t q_tok, int64_t q_head, int heads, T* k,      \
                                    int64_t k_tok, const float* cos_t, const float* sin_t,      \
                                    int rot, int interleaved) {                                 \
        rope_inplace<T>(q, q_tok, q_head, heads, k, k_tok, cos_t, sin_t, rot, interleaved);    \
    }
ROPE(rope_bf16, bf16)
ROPE(rope_f32, float)
