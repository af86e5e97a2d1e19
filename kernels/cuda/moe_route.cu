// MoE routing on the device: gate logits -> expert ids and weights per token, the CUDA form of
// `moe_kernels::moe::route` (same selection order, tie rule and renormalisation order).
//
// logits:  [T, E] f32 row-major; bias: [E] f32 or null (used by method 2 only).
// ids:     [T, top_k] u32; weights: [T, top_k] f32.
// scoring: 0 softmax, 1 sigmoid. method: 0 greedy, 1 group-limited greedy (group score = max,
//          dropped groups -> 0), 2 noaux_tc (choice = score + bias, group score = sum of the two
//          best, dropped groups -> -inf). Weights are the unbiased scores of the chosen experts,
//          divided by their sum (+1e-20) when `normalize`, times `scale`.
// Layout: one warp per token, WARPS warps per CTA; dynamic shared memory holds each warp's
// scores and choice values (2 * E floats per warp). Limits (checked by the launcher):
// E <= 1024 (32 experts per lane), top_k <= 32, n_group <= 32.
#include "common.cuh"

#define WARPS 4
#define FULL 0xffffffffu

// (valid, larger value, lower index) first. Invalid candidates lose to any valid one.
__device__ __forceinline__ bool better(bool ok_a, float a, int ia, bool ok_b, float b, int ib) {
    if (ok_a != ok_b) return ok_a;
    return a > b || (a == b && ia < ib);
}

// Every lane ends with the warp's best (value, index, valid).
__device__ __forceinline__ void warp_best(float& v, int& i, bool& ok) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(FULL, v, off);
        const int oi = __shfl_xor_sync(FULL, i, off);
        const bool ook = __shfl_xor_sync(FULL, (int)ok, off) != 0;
        if (better(ook, ov, oi, ok, v, i)) {
            v = ov;
            i = oi;
            ok = ook;
        }
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, off));
    return v;
}

extern "C" __global__ void moe_route(const float* __restrict__ logits, const float* __restrict__ bias,
                                     uint32_t* __restrict__ ids, float* __restrict__ weights, int tokens,
                                     int E, int top_k, int scoring, int method, int n_group, int topk_group,
                                     int normalize, float scale) {
    extern __shared__ float route_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int token = blockIdx.x * WARPS + warp;
    if (token >= tokens) return; // whole warp; no block-level synchronisation below
    float* s = route_smem + warp * 2 * E;
    float* c = s + E;
    const float* row = logits + (int64_t)token * E;

    if (scoring == 0) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32) m = fmaxf(m, row[e]);
        m = warp_max(m);
        float sum = 0.f;
        for (int e = lane; e < E; e += 32) {
            const float x = expf(row[e] - m);
            s[e] = x;
            sum += x;
        }
        sum = warp_sum(sum);
        for (int e = lane; e < E; e += 32) s[e] = s[e] / sum;
    } else {
        for (int e = lane; e < E; e += 32) s[e] = 1.f / (1.f + expf(-row[e]));
    }
    const bool biased = method == 2 && bias != nullptr;
    for (int e = lane; e < E; e += 32) c[e] = biased ? s[e] + bias[e] : s[e];
    __syncwarp();

    if (method != 0 && n_group > 1) {
        const int per = E / n_group;
        float gs = -INFINITY;
        if (lane < n_group) {
            const float* g = c + lane * per;
            if (method == 1) {
                for (int j = 0; j < per; ++j) gs = fmaxf(gs, g[j]);
            } else {
                // The two best (ties: lower index first), summed best first.
                float b1 = -INFINITY, b2 = -INFINITY;
                int i1 = -1;
                for (int j = 0; j < per; ++j)
                    if (i1 < 0 || g[j] > b1) { b1 = g[j]; i1 = j; }
                bool have2 = false;
                for (int j = 0; j < per; ++j)
                    if (j != i1 && (!have2 || g[j] > b2)) { b2 = g[j]; have2 = true; }
                gs = 0.f + b1 + b2;
            }
        }
        uint32_t keep = 0;
        for (int r = 0; r < topk_group; ++r) {
            float v = gs;
            int i = lane;
            bool ok = lane < n_group && !((keep >> lane) & 1u);
            warp_best(v, i, ok);
            keep |= 1u << i;
        }
        const float fill = method == 1 ? 0.f : -INFINITY;
        for (int e = lane; e < E; e += 32)
            if (!((keep >> (e / per)) & 1u)) c[e] = fill;
        __syncwarp();
    }

    uint32_t taken = 0; // bit j: expert lane + 32 * j
    int my_id = 0;
    float my_w = 0.f;
    for (int r = 0; r < top_k; ++r) {
        float v = -INFINITY;
        int i = 0x7fffffff;
        bool ok = false;
        for (int j = 0, e = lane; e < E; ++j, e += 32) {
            if ((taken >> j) & 1u) continue;
            const float x = c[e];
            if (better(true, x, e, ok, v, i)) { v = x; i = e; ok = true; }
        }
        warp_best(v, i, ok);
        if ((i & 31) == lane) taken |= 1u << (i >> 5);
        if (lane == r) { my_id = i; my_w = s[i]; }
    }
    float sum = 0.f;
    for (int r = 0; r < top_k; ++r) sum += __shfl_sync(FULL, my_w, r);
    sum += 1e-20f;
    if (lane < top_k) {
        float w = normalize ? my_w / sum : my_w;
        ids[(int64_t)token * top_k + lane] = (uint32_t)my_id;
        weights[(int64_t)token * top_k + lane] = w * scale;
    }
}
