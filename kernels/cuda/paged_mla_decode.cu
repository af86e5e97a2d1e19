// Paged MLA attention with weight absorption, one query row at a time: MQA of each row over
// the first context_lens[row] positions of its sequence's latent cache (keys = whole rows of
// `dim` values, values = their first `dv`). A decode step has one row per sequence; a prompt
// chunk's rows see growing prefixes (causal), so one launch covers any mix of both.
//
// q:            [R, H, dim] (strides q_seq, q_head in elements; last dim contiguous), already
//               absorbed (q_nope . W_UK ++ rotated q_pe).
// cache:        [num_blocks * block_size, dim] rows, 16-byte aligned, dim * sizeof(Tkv) % 16 == 0.
// block_tables: [S, bt_stride] u32 block ids; row_seq: [R] u32, the table row of each query
//               row (null: row r reads table row r); context_lens: [R] u32 (0 = zero output).
// selected:     null for dense attention; else [R, sel_stride] u32 positions (DeepSeek Sparse
//               Attention's top-k), and context_lens[r] counts the selected positions of
//               row r: the kernel attends to exactly those (sparse MLA decode).
// out:          [R, H, dv] contiguous.
// Bounds: a context is clamped to its block table (bt_stride * block_size); a block id at or
// past num_blocks masks its positions (score -inf) instead of reading outside the pool.
// Work split: a CTA per (head group of HPC heads, KV split, query row). Each CTA walks its KV
// range in tiles of TILE tokens, loading each tile once into shared memory for all its heads,
// with an online softmax in the log2 domain (q is pre-scaled by scale * log2(e)). With one split
// it writes the normalized output; otherwise it writes unnormalized partial outputs and the
// per-head (max, sum) to a workspace and `paged_mla_decode_merge_*` combines the splits with
// a log-sum-exp merge.
// Thread layout (256 threads): scores: thread (h = tid % 16, token = tid / 16 (+16));
// softmax and P.V: 16 threads per head, thread u owns value dims 32k + 2u, 32k + 2u + 1.
#include "common.cuh"

#define HPC 16       // heads per CTA
#define TILE 32      // KV tokens per shared-memory tile (= 2 * TPH)
#define THREADS 256
#define TPH 16       // threads per head in the softmax / P.V phase
#define MAX_VK 16    // value pairs per thread: dv <= 2 * TPH * MAX_VK = 512

__device__ __forceinline__ size_t align16(size_t x) { return (x + 15) & ~(size_t)15; }

template <typename Tkv> __device__ __forceinline__ float2 load_pair(const Tkv* p);
template <> __device__ __forceinline__ float2 load_pair<bf16>(const bf16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
template <> __device__ __forceinline__ float2 load_pair<float>(const float* p) {
    return *reinterpret_cast<const float2*>(p);
}

template <typename Tq, typename Tkv, typename Tout>
__device__ void mla_decode_split(const Tq* __restrict__ q, int64_t q_seq, int64_t q_head,
                                 const Tkv* __restrict__ cache,
                                 const uint32_t* __restrict__ block_tables, int64_t bt_stride,
                                 const uint32_t* __restrict__ row_seq, int64_t num_blocks,
                                 const uint32_t* __restrict__ context_lens,
                                 const uint32_t* __restrict__ selected, int64_t sel_stride,
                                 Tout* __restrict__ out,
                                 float* __restrict__ ws_acc, float* __restrict__ ws_ml,
                                 int num_heads, int dim, int dv, int block_size,
                                 int tokens_per_split, float scale_log2) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int dp = dim + 16 / (int)sizeof(Tkv);   // padded kv row (keeps rows 16B aligned)
    const int qp = dim + 1;                        // padded q row (conflict-free across heads)
    int64_t* slot_s = reinterpret_cast<int64_t*>(smem);
    float* q_s = reinterpret_cast<float*>(smem + TILE * sizeof(int64_t));
    float* p_s = q_s + HPC * qp;
    Tkv* kv_s = reinterpret_cast<Tkv*>(
        smem + align16(TILE * sizeof(int64_t) + (size_t)(HPC * qp + HPC * TILE) * sizeof(float)));

    const int tid = threadIdx.x;
    const int seq = blockIdx.z, split = blockIdx.y, splits = gridDim.y;
    const int h0 = blockIdx.x * HPC;
    const int nh = min(HPC, num_heads - h0);
    const int ctx = (int)min((int64_t)context_lens[seq], bt_stride * (int64_t)block_size);
    const int start = split * tokens_per_split;
    const int end = min(ctx, start + tokens_per_split);

    for (int i = tid; i < HPC * dim; i += THREADS) {
        const int h = i / dim, c = i % dim;
        q_s[h * qp + c] =
            h < nh ? to_f32(q[seq * q_seq + (int64_t)(h0 + h) * q_head + c]) * scale_log2 : 0.f;
    }

    const int hl = tid / TPH, u = tid % TPH;   // softmax / P.V role
    const int nk = dv / (2 * TPH);
    float acc[MAX_VK][2];
#pragma unroll
    for (int k = 0; k < MAX_VK; ++k) acc[k][0] = acc[k][1] = 0.f;
    float m = -INFINITY, l = 0.f;
    const uint32_t* bt = block_tables + (row_seq != nullptr ? (int64_t)row_seq[seq] : seq) * bt_stride;
    const int vec_per_row = dim * (int)sizeof(Tkv) / 16;

    for (int t0 = start; t0 < end; t0 += TILE) {
        const int n = min(TILE, end - t0);
        __syncthreads(); // previous tile (and q_s on the first pass) fully consumed / written
        if (tid < TILE) {
            int pos = t0 + tid;
            if (tid < n && selected != nullptr) pos = (int)selected[seq * sel_stride + pos];
            // -1: no row to read (past the tile, or a block id outside the pool: masked).
            int64_t slot = -1;
            if (tid < n && pos >= 0 && pos < bt_stride * block_size) {
                const int64_t block = bt[pos / block_size];
                if (block < num_blocks) slot = block * block_size + pos % block_size;
            }
            slot_s[tid] = slot;
        }
        __syncthreads();
        for (int i = tid; i < n * vec_per_row; i += THREADS) {
            const int j = i / vec_per_row, v = i % vec_per_row;
            uint4 row = make_uint4(0, 0, 0, 0);
            if (slot_s[j] >= 0) row = __ldg(reinterpret_cast<const uint4*>(cache + slot_s[j] * dim) + v);
            reinterpret_cast<uint4*>(kv_s + j * dp)[v] = row;
        }
        __syncthreads();
        // Scores (log2 domain), -inf past the end of the range.
        for (int j = tid / HPC; j < TILE; j += THREADS / HPC) {
            const int h = tid % HPC;
            float s = -INFINITY;
            if (j < n && slot_s[j] >= 0) {
                const float* qr = q_s + h * qp;
                const Tkv* kr = kv_s + j * dp;
                float a0 = 0.f, a1 = 0.f;
                for (int c = 0; c < dim; c += 2) {
                    const float2 kk = load_pair<Tkv>(kr + c);
                    a0 = fmaf(qr[c], kk.x, a0);
                    a1 = fmaf(qr[c + 1], kk.y, a1);
                }
                s = a0 + a1;
            }
            p_s[h * TILE + j] = s;
        }
        __syncthreads();
        // Online softmax: the 16 threads of head hl own tokens u and u + 16 of the tile.
        float* ph = p_s + hl * TILE;
        const float s0 = ph[u], s1 = ph[u + TPH];
        float tmax = fmaxf(s0, s1);
#pragma unroll
        for (int off = TPH / 2; off > 0; off >>= 1)
            tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
        // -inf only when every position so far was masked (block ids outside the pool).
        const float m_new = fmaxf(m, tmax);
        const float alpha = m_new == -INFINITY ? 1.f : exp2f(m - m_new);
        const float p0 = m_new == -INFINITY ? 0.f : exp2f(s0 - m_new);
        const float p1 = m_new == -INFINITY ? 0.f : exp2f(s1 - m_new);
        float psum = p0 + p1;
#pragma unroll
        for (int off = TPH / 2; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
        l = l * alpha + psum;
        m = m_new;
        ph[u] = p0;
        ph[u + TPH] = p1;
        __syncwarp(); // the 16 threads of a head are in one warp
#pragma unroll
        for (int k = 0; k < MAX_VK; ++k) {
            acc[k][0] *= alpha;
            acc[k][1] *= alpha;
        }
        for (int j = 0; j < n; ++j) {
            const float p = ph[j];
            const Tkv* vr = kv_s + j * dp + 2 * u;
#pragma unroll
            for (int k = 0; k < MAX_VK; ++k) {
                if (k < nk) {
                    const float2 v = load_pair<Tkv>(vr + 32 * k);
                    acc[k][0] = fmaf(p, v.x, acc[k][0]);
                    acc[k][1] = fmaf(p, v.y, acc[k][1]);
                }
            }
        }
    }

    if (hl >= nh) return;
    const int h = h0 + hl;
    if (splits == 1) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        Tout* o = out + ((int64_t)seq * num_heads + h) * dv;
#pragma unroll
        for (int k = 0; k < MAX_VK; ++k) {
            if (k < nk) {
                o[32 * k + 2 * u] = from_f32<Tout>(acc[k][0] * inv);
                o[32 * k + 2 * u + 1] = from_f32<Tout>(acc[k][1] * inv);
            }
        }
    } else {
        const int64_t row = ((int64_t)seq * splits + split) * num_heads + h;
        float* w = ws_acc + row * dv;
#pragma unroll
        for (int k = 0; k < MAX_VK; ++k) {
            if (k < nk) {
                w[32 * k + 2 * u] = acc[k][0];
                w[32 * k + 2 * u + 1] = acc[k][1];
            }
        }
        if (u == 0) {
            ws_ml[row * 2] = m;
            ws_ml[row * 2 + 1] = l;
        }
    }
}

// Log-sum-exp merge of the splits: grid (H, S), any block size.
// out[s, h, :] = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i over splits with l_i > 0.
template <typename Tout>
__device__ void mla_decode_merge(const float* __restrict__ ws_acc, const float* __restrict__ ws_ml,
                                 Tout* __restrict__ out, int num_heads, int dv, int splits) {
    const int h = blockIdx.x, seq = blockIdx.y;
    const int64_t base = (int64_t)seq * splits * num_heads + h; // row of split 0
    float mx = -INFINITY;
    for (int i = 0; i < splits; ++i) {
        const int64_t r = base + (int64_t)i * num_heads;
        if (ws_ml[r * 2 + 1] > 0.f) mx = fmaxf(mx, ws_ml[r * 2]);
    }
    float denom = 0.f;
    for (int i = 0; i < splits; ++i) {
        const int64_t r = base + (int64_t)i * num_heads;
        const float li = ws_ml[r * 2 + 1];
        if (li > 0.f) denom += exp2f(ws_ml[r * 2] - mx) * li;
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    Tout* o = out + ((int64_t)seq * num_heads + h) * dv;
    for (int d = threadIdx.x; d < dv; d += blockDim.x) {
        float a = 0.f;
        for (int i = 0; i < splits; ++i) {
            const int64_t r = base + (int64_t)i * num_heads;
            const float li = ws_ml[r * 2 + 1];
            if (li > 0.f) a = fmaf(exp2f(ws_ml[r * 2] - mx), ws_acc[r * dv + d], a);
        }
        o[d] = from_f32<Tout>(a * inv);
    }
}

#define MLA_DECODE(NAME, TQ, TKV, TOUT)                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                 \
        const TQ* q, int64_t q_seq, int64_t q_head, const TKV* cache,                          \
        const uint32_t* block_tables, int64_t bt_stride, const uint32_t* row_seq,               \
        int64_t num_blocks, const uint32_t* context_lens,                                       \
        const uint32_t* selected, int64_t sel_stride,                                           \
        TOUT* out, float* ws_acc, float* ws_ml, int num_heads, int dim, int dv,                 \
        int block_size, int tokens_per_split, float scale_log2) {                               \
        mla_decode_split<TQ, TKV, TOUT>(q, q_seq, q_head, cache, block_tables, bt_stride,       \
                                        row_seq, num_blocks, context_lens, selected, sel_stride, out, ws_acc, ws_ml, \
                                        num_heads, dim, dv, block_size, tokens_per_split,       \
                                        scale_log2);                                            \
    }
MLA_DECODE(paged_mla_decode_bf16, bf16, bf16, bf16)
MLA_DECODE(paged_mla_decode_f32, float, float, float)

extern "C" __global__ void paged_mla_decode_merge_bf16(const float* ws_acc, const float* ws_ml,
                                                       bf16* out, int num_heads, int dv,
                                                       int splits) {
    mla_decode_merge<bf16>(ws_acc, ws_ml, out, num_heads, dv, splits);
}
extern "C" __global__ void paged_mla_decode_merge_f32(const float* ws_acc, const float* ws_ml,
                                                      float* out, int num_heads, int dv,
                                                      int splits) {
    mla_decode_merge<float>(ws_acc, ws_ml, out, num_heads, dv, splits);
}
