// DeepSeek Sparse Attention's lightning indexer for decode (one query token per sequence):
// scoring every cached position against the query, then keeping the index_topk best.
//
// dsa_index_scores_*: grid (ceil(max_ctx / POS_PER_CTA), S), THREADS threads (8 warps).
//   q:       [S, heads, dim] (contiguous), the rotated indexer queries.
//   w:       [S, heads] f32, weights_proj(x) / sqrt(heads).
//   keys:    [num_blocks * block_size, dim] rows, the paged indexer key cache.
//   scores:  [S, score_stride] f32; position p < context_lens[s] gets
//            sum_h w[s, h] * relu(q[s, h] . k[p] * scale). dim % 32 == 0, dim <= 128,
//            heads <= 64.
//   A warp scores one position at a time: each lane holds dim / 32 key values, and a warp
//   sum per head combines the lanes.
// dsa_topk: grid (S), 1024 threads. Writes the selected positions of sequence s, ascending,
//   to selected[s, :] and their count to selected_lens[s]: every position when
//   context_lens[s] <= topk, else the topk highest scores, ties going to the earlier
//   position (as moe_kernels::indexer_topk chooses). The topk-th largest score is found by a
//   radix select over order-preserving u32 keys (32 counting passes), then one pass in
//   position order keeps everything above it and the earliest ties.
#include "common.cuh"
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#define THREADS 256
#define POS_PER_CTA 64
#define MAX_HEADS 64
#define MAX_DIM 128
#define TOPK_THREADS 1024

template <typename T>
__device__ void index_scores(const T* __restrict__ q, const float* __restrict__ w,
                             const T* __restrict__ keys, const uint32_t* __restrict__ block_tables,
                             int64_t bt_stride, const uint32_t* __restrict__ context_lens,
                             float* __restrict__ scores, int64_t score_stride, int heads, int dim,
                             int block_size, float scale) {
    __shared__ float q_s[MAX_HEADS * MAX_DIM];
    __shared__ float w_s[MAX_HEADS];
    const int seq = blockIdx.y;
    const int ctx = (int)context_lens[seq];
    for (int i = threadIdx.x; i < heads * dim; i += blockDim.x)
        q_s[i] = to_f32(q[(int64_t)seq * heads * dim + i]);
    for (int i = threadIdx.x; i < heads; i += blockDim.x) w_s[i] = w[(int64_t)seq * heads + i];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int per_lane = dim / 32;
    const uint32_t* bt = block_tables + seq * bt_stride;
    for (int j = warp; j < POS_PER_CTA; j += warps) {
        const int pos = blockIdx.x * POS_PER_CTA + j;
        if (pos >= ctx) break;
        const int64_t slot = (int64_t)bt[pos / block_size] * block_size + pos % block_size;
        float k[MAX_DIM / 32];
#pragma unroll
        for (int v = 0; v < MAX_DIM / 32; ++v)
            k[v] = v < per_lane ? to_f32(keys[slot * dim + v * 32 + lane]) : 0.f;
        float score = 0.f;
        for (int h = 0; h < heads; ++h) {
            const float* qh = q_s + h * dim;
            float dot = 0.f;
#pragma unroll
            for (int v = 0; v < MAX_DIM / 32; ++v)
                if (v < per_lane) dot = fmaf(qh[v * 32 + lane], k[v], dot);
            dot = warp_sum(dot);
            score = fmaf(w_s[h], fmaxf(dot * scale, 0.f), score);
        }
        if (lane == 0) scores[seq * score_stride + pos] = score;
    }
}

#define INDEX_SCORES(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                 \
        const T* q, const float* w, const T* keys, const uint32_t* block_tables,               \
        int64_t bt_stride, const uint32_t* context_lens, float* scores, int64_t score_stride,   \
        int heads, int dim, int block_size, float scale) {                                      \
        index_scores<T>(q, w, keys, block_tables, bt_stride, context_lens, scores, score_stride, \
                        heads, dim, block_size, scale);                                         \
    }
INDEX_SCORES(dsa_index_scores_bf16, bf16)
INDEX_SCORES(dsa_index_scores_f32, float)

// Monotone map of f32 onto u32: a > b as floats iff key(a) > key(b) as unsigned.
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
dsa_topk(const float* __restrict__ scores, int64_t score_stride,
         const uint32_t* __restrict__ context_lens, uint32_t* __restrict__ selected,
         int64_t sel_stride, uint32_t* __restrict__ selected_lens, int topk) {
    typedef cub::BlockReduce<int, TOPK_THREADS> Reduce;
    typedef cub::BlockScan<int, TOPK_THREADS> Scan;
    __shared__ union {
        typename Reduce::TempStorage reduce;
        typename Scan::TempStorage scan;
    } tmp;
    __shared__ int broadcast;
    const int seq = blockIdx.x, tid = threadIdx.x;
    const int ctx = (int)context_lens[seq];
    const float* sc = scores + seq * score_stride;
    uint32_t* out = selected + seq * sel_stride;
    if (ctx <= topk) {
        for (int i = tid; i < ctx; i += blockDim.x) out[i] = (uint32_t)i;
        if (tid == 0) selected_lens[seq] = (uint32_t)ctx;
        return;
    }
    // The largest key with at least topk scores at or above it: the topk-th largest.
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
        const uint32_t cand = prefix | (1u << bit);
        int c = 0;
        for (int i = tid; i < ctx; i += blockDim.x) c += order_key(sc[i]) >= cand;
        const int total = Reduce(tmp.reduce).Sum(c);
        if (tid == 0) broadcast = total;
        __syncthreads();
        if (broadcast >= topk) prefix = cand;
        __syncthreads();
    }
    // Contiguous chunks per thread keep the output in position order.
    const int chunk = (ctx + TOPK_THREADS - 1) / TOPK_THREADS;
    const int b = min(ctx, tid * chunk), e = min(ctx, b + chunk);
    int gt = 0, eq = 0;
    for (int i = b; i < e; ++i) {
        const uint32_t k = order_key(sc[i]);
        gt += k > prefix;
        eq += k == prefix;
    }
    const int gt_total = Reduce(tmp.reduce).Sum(gt);
    if (tid == 0) broadcast = gt_total;
    __syncthreads();
    const int need = topk - broadcast; // ties to keep, >= 1
    __syncthreads();
    int eq_before;
    Scan(tmp.scan).ExclusiveSum(eq, eq_before);
    __syncthreads();
    const int take = gt + max(0, min(eq, need - eq_before));
    int out_before;
    Scan(tmp.scan).ExclusiveSum(take, out_before);
    int o = out_before, r = eq_before;
    for (int i = b; i < e; ++i) {
        const uint32_t k = order_key(sc[i]);
        bool keep = k > prefix;
        if (k == prefix) keep = r++ < need;
        if (keep) out[o++] = (uint32_t)i;
    }
    if (tid == 0) selected_lens[seq] = (uint32_t)topk;
}
