// Paged GQA attention, one query row at a time (a decode token, or a token of a prompt chunk:
// row r sees the first context_lens[r] positions of its sequence); query head h reads kv
// head h / group.
//
// q:            [R, H, D] (strides q_seq, q_head in elements; last dim contiguous).
// k_cache:      [num_blocks * block_size, kv_heads, D] rows; v_cache: the same with D values
//               (the launcher requires v_head_dim == head_dim); both 16-byte aligned.
// block_tables: [S, bt_stride] u32 block ids; row_seq: [R] u32, the table row of each query
//               row (null: row r reads table row r); context_lens: [R] u32.
// out:          [R, H, D] contiguous.
//
// Work split: a CTA per (kv head, chunk of that kv head's query heads, KV split, sequence),
// grid (kv_heads * chunks, splits, S). All query heads of a group share one CTA (chunks > 1
// only past G_MAX heads), so every K/V row is read once per group. The CTA walks its KV range
// in tiles of TILE tokens:
//   1. loads: lane (warp w, token slot tg, chunk c) loads E values of the K row (and, for
//      bf16, of the V row) of its token straight into registers: TG = D / E lanes cover a
//      row with 16-byte (bf16) loads, TPW = 32 / TG tokens per warp and step;
//   2. scores: each lane holds the group's queries for its chunk (G x E floats, pre-scaled by
//      scale * log2(e)), forms G partial dot products and a butterfly reduce-scatter over the
//      TG lanes finishes them (log2(G) halving exchanges, then plain xor sums): about 4
//      shuffles per token for G = 8 instead of 5 per head;
//   3. online softmax in the log2 domain, warp w owning heads w, w + 4, ...; one token per
//      lane;
//   4. P.V: each lane accumulates G x E outputs in f32 over its tokens; at the end the TPW
//      token slots (shuffles) and the 4 warps (shared memory) are summed.
// With one split the CTA writes the normalized output; otherwise unnormalized partial
// outputs and the per-head (max, sum) go to a workspace laid out as paged_mla_decode's, and
// its merge kernel (paged_mla_decode_merge_*) combines the splits.
// Bounds: the context is clamped to the block table (bt_stride * block_size) and a block id
// >= num_blocks masks its tokens (score -inf, no load), so no read leaves the caches.
#include "common.cuh"

#define THREADS 128
#define WARPS 4
#define TILE 32 // tokens per tile: one per lane in the softmax

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// E consecutive values of T as raw 32-bit words (what one lane loads of a K or V row).
template <typename T, int E> struct Chunk {
    static constexpr int WORDS = E * (int)sizeof(T) / 4;
    uint32_t w[WORDS];
};

template <typename T, int E> __device__ __forceinline__ void load_chunk(Chunk<T, E>& c, const T* p) {
    constexpr int W = Chunk<T, E>::WORDS;
    if constexpr (W % 4 == 0) {
#pragma unroll
        for (int i = 0; i < W / 4; ++i) {
            const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
            c.w[4 * i] = u.x;
            c.w[4 * i + 1] = u.y;
            c.w[4 * i + 2] = u.z;
            c.w[4 * i + 3] = u.w;
        }
    } else {
        static_assert(W == 2, "chunks are 8, 16 or 32 bytes");
        const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
        c.w[0] = u.x;
        c.w[1] = u.y;
    }
}

template <typename T, int E> __device__ __forceinline__ void zero_chunk(Chunk<T, E>& c) {
#pragma unroll
    for (int i = 0; i < Chunk<T, E>::WORDS; ++i) c.w[i] = 0u;
}

// Raw words to floats (bf16: element 2i is the low half of word i).
template <int E> __device__ __forceinline__ void unpack(const Chunk<bf16, E>& c, float (&f)[E]) {
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
        f[2 * i] = __uint_as_float(c.w[i] << 16);
        f[2 * i + 1] = __uint_as_float(c.w[i] & 0xffff0000u);
    }
}
template <int E> __device__ __forceinline__ void unpack(const Chunk<float, E>& c, float (&f)[E]) {
#pragma unroll
    for (int i = 0; i < E; ++i) f[i] = __uint_as_float(c.w[i]);
}

// Butterfly reduce-scatter of G partial sums over the lanes that differ in bits OFF, OFF/2,
// ..., 1: while more than one value is held, each exchange gives away half of them (the
// upper half if the lane's OFF bit is clear) and keeps the sum of the other half; then plain
// xor sums. Afterwards v[0] is the full sum of head (c / (2 * OFF / G)) of lane chunk c.
template <int G, int N, int OFF> __device__ __forceinline__ void reduce_scatter(float (&v)[G], int c) {
    if constexpr (OFF > 0) {
        if constexpr (N > 1) {
            constexpr int HALF = N / 2;
            const bool upper = (c & OFF) != 0;
#pragma unroll
            for (int i = 0; i < HALF; ++i) {
                const float give = upper ? v[i] : v[i + HALF];
                const float keep = upper ? v[i + HALF] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, give, OFF);
            }
            reduce_scatter<G, HALF, OFF / 2>(v, c);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFF);
            reduce_scatter<G, 1, OFF / 2>(v, c);
        }
    }
}

// G: query heads per CTA (a power of two; heads past the group's are padding with q = 0).
// E: values per lane and row. D: head dim of keys and values.
template <typename T, int D, int G, int E>
__device__ void gqa_decode_split(const T* __restrict__ q, int64_t q_seq, int64_t q_head,
                                 const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                 const uint32_t* __restrict__ block_tables, int64_t bt_stride,
                                 const uint32_t* __restrict__ row_seq,
                                 const uint32_t* __restrict__ context_lens, T* __restrict__ out,
                                 float* __restrict__ ws_acc, float* __restrict__ ws_ml,
                                 int num_heads, int kv_heads, int group, int heads_per_cta,
                                 int chunks, int block_size, int64_t num_blocks,
                                 int tokens_per_split, float scale_log2) {
    constexpr int TG = D / E;                     // lanes per K/V row
    constexpr int TPW = 32 / TG;                  // tokens per warp and step
    constexpr int STEPS = TILE / (WARPS * TPW);   // steps per tile
    constexpr int HPW = (G + WARPS - 1) / WARPS;  // softmax heads per warp
    constexpr bool PREFETCH_V = sizeof(T) == 2;   // f32 loads V after the scores (registers)
    static_assert(D % E == 0 && TG <= 32 && 32 % TG == 0, "a row must map onto lanes of a warp");
    static_assert(G <= TG && (G & (G - 1)) == 0, "G must be a power of two <= D / E");
    static_assert(STEPS >= 1 && STEPS * WARPS * TPW == TILE, "tile must split into steps");

    __shared__ float s_score[G][TILE + 1];
    __shared__ float s_p[TILE][G + 1];
    __shared__ float s_alpha[G];
    __shared__ float s_ml[G][2];
    __shared__ float s_red[WARPS][G][D];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tg = lane / TG, c = lane % TG;
    const int kvh = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
    const int split = blockIdx.y, splits = gridDim.y, seq = blockIdx.z;
    const int h0 = kvh * group + chunk * heads_per_cta;
    const int nh = min(heads_per_cta, group - chunk * heads_per_cta);
    const int64_t ctx = min((int64_t)context_lens[seq], bt_stride * (int64_t)block_size);
    const int64_t start = (int64_t)split * tokens_per_split;
    const int64_t end = min(ctx, start + tokens_per_split);
    const uint32_t* bt = block_tables + (row_seq != nullptr ? (int64_t)row_seq[seq] : seq) * bt_stride;
    const int64_t row_stride = (int64_t)kv_heads * D; // elements between cache slots

    float qr[G][E];
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
#pragma unroll
        for (int e = 0; e < E; ++e) qr[hh][e] = 0.f;
        if (hh < nh) { // padding heads stay zero (and are never read)
            const T* qh = q + seq * q_seq + (int64_t)(h0 + hh) * q_head + c * E;
#pragma unroll
            for (int e = 0; e < E; ++e) qr[hh][e] = to_f32(qh[e]) * scale_log2;
        }
    }
    float acc[G][E];
#pragma unroll
    for (int hh = 0; hh < G; ++hh)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[hh][e] = 0.f;
    float m_r[HPW], l_r[HPW];
#pragma unroll
    for (int i = 0; i < HPW; ++i) {
        m_r[i] = -INFINITY;
        l_r[i] = 0.f;
    }

    for (int64_t t0 = start; t0 < end; t0 += TILE) {
        // 1. Addresses and loads of this lane's tokens (step s: tile token j below).
        int64_t base[STEPS];
        bool ok[STEPS];
        Chunk<T, E> kb[STEPS], vb[STEPS];
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            const int j = s * (WARPS * TPW) + warp * TPW + tg;
            const int64_t pos = t0 + j;
            ok[s] = pos < end;
            base[s] = 0;
            if (ok[s]) {
                const uint32_t b = bt[pos / block_size];
                ok[s] = b < num_blocks;
                base[s] = ((int64_t)b * block_size + pos % block_size) * row_stride + (int64_t)kvh * D + c * E;
            }
        }
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            if (ok[s]) {
                load_chunk(kb[s], k_cache + base[s]);
                if constexpr (PREFETCH_V) load_chunk(vb[s], v_cache + base[s]);
            } else {
                zero_chunk(kb[s]);
                if constexpr (PREFETCH_V) zero_chunk(vb[s]);
            }
        }
        __syncthreads(); // the previous tile's s_score / s_p / s_alpha are consumed

        // 2. Scores (log2 domain), -inf for tokens past the range or in a bad block.
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            float kf[E];
            unpack(kb[s], kf);
            float part[G];
#pragma unroll
            for (int hh = 0; hh < G; ++hh) {
                float a = 0.f;
#pragma unroll
                for (int e = 0; e < E; ++e) a = fmaf(qr[hh][e], kf[e], a);
                part[hh] = a;
            }
            reduce_scatter<G, G, TG / 2>(part, c);
            constexpr int LANES_PER_HEAD = TG / G;
            if (c % LANES_PER_HEAD == 0) {
                const int j = s * (WARPS * TPW) + warp * TPW + tg;
                s_score[c / LANES_PER_HEAD][j] = ok[s] ? part[0] : -INFINITY;
            }
        }
        if constexpr (!PREFETCH_V) {
#pragma unroll
            for (int s = 0; s < STEPS; ++s) {
                if (ok[s]) load_chunk(vb[s], v_cache + base[s]);
                else zero_chunk(vb[s]);
            }
        }
        __syncthreads();

        // 3. Online softmax: warp w owns heads w, w + WARPS, ...; lane = tile token.
#pragma unroll
        for (int i = 0; i < HPW; ++i) {
            const int hh = warp + i * WARPS;
            if (hh < G) { // warp-uniform
                const float x = s_score[hh][lane];
                const float m_new = fmaxf(m_r[i], warp_max(x));
                const float m_use = m_new == -INFINITY ? 0.f : m_new; // all masked so far
                const float alpha = exp2f(m_r[i] - m_use);
                const float p = exp2f(x - m_use);
                l_r[i] = l_r[i] * alpha + warp_sum(p);
                m_r[i] = m_new;
                s_p[lane][hh] = p;
                if (lane == 0) s_alpha[hh] = alpha;
            }
        }
        __syncthreads();

        // 4. P.V over this lane's tokens.
#pragma unroll
        for (int hh = 0; hh < G; ++hh) {
            const float alpha = s_alpha[hh];
#pragma unroll
            for (int e = 0; e < E; ++e) acc[hh][e] *= alpha;
        }
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            const int j = s * (WARPS * TPW) + warp * TPW + tg;
            float vf[E];
            unpack(vb[s], vf);
#pragma unroll
            for (int hh = 0; hh < G; ++hh) {
                const float p = s_p[j][hh];
#pragma unroll
                for (int e = 0; e < E; ++e) acc[hh][e] = fmaf(p, vf[e], acc[hh][e]);
            }
        }
    }

    // Sum the TPW token slots of each warp, then the warps.
#pragma unroll
    for (int off = TG; off < 32; off <<= 1)
#pragma unroll
        for (int hh = 0; hh < G; ++hh)
#pragma unroll
            for (int e = 0; e < E; ++e) acc[hh][e] += __shfl_xor_sync(0xffffffffu, acc[hh][e], off);
    if (tg == 0) {
#pragma unroll
        for (int hh = 0; hh < G; ++hh)
#pragma unroll
            for (int e = 0; e < E; ++e) s_red[warp][hh][c * E + e] = acc[hh][e];
    }
#pragma unroll
    for (int i = 0; i < HPW; ++i) {
        const int hh = warp + i * WARPS;
        if (hh < G && lane == 0) {
            s_ml[hh][0] = m_r[i];
            s_ml[hh][1] = l_r[i];
        }
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += THREADS) {
        const int hh = i / D, d = i % D;
        if (hh >= nh) continue;
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) a += s_red[w][hh][d];
        const int h = h0 + hh;
        if (splits == 1) {
            const float l = s_ml[hh][1];
            out[((int64_t)seq * num_heads + h) * D + d] = from_f32<T>(l > 0.f ? a / l : 0.f);
        } else {
            const int64_t row = ((int64_t)seq * splits + split) * num_heads + h;
            ws_acc[row * D + d] = a;
            if (d == 0) {
                ws_ml[row * 2] = s_ml[hh][0];
                ws_ml[row * 2 + 1] = s_ml[hh][1];
            }
        }
    }
}

#define GQA_DECODE(SFX, T, D, G)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_gqa_decode_##SFX##_d##D##_g##G( \
        const T* q, int64_t q_seq, int64_t q_head, const T* k_cache, const T* v_cache,          \
        const uint32_t* block_tables, int64_t bt_stride, const uint32_t* row_seq,               \
        const uint32_t* context_lens, T* out,                                                   \
        float* ws_acc, float* ws_ml, int num_heads, int kv_heads, int group, int heads_per_cta, \
        int chunks, int block_size, int64_t num_blocks, int tokens_per_split, float scale_log2) { \
        gqa_decode_split<T, D, G, (G == 16 ? 4 : 8)>(                                            \
            q, q_seq, q_head, k_cache, v_cache, block_tables, bt_stride, row_seq, context_lens, \
            out,                                                                                \
            ws_acc, ws_ml, num_heads, kv_heads, group, heads_per_cta, chunks, block_size,        \
            num_blocks, tokens_per_split, scale_log2);                                          \
    }

// Head dims 64, 128, 256 x heads per CTA 1..16 (16 heads use 4 values per lane, which a
// 256-wide row cannot map onto one warp: those groups run as chunks of 8).
#define GQA_DECODE_DIM(SFX, T, D)                                                                \
    GQA_DECODE(SFX, T, D, 1)                                                                     \
    GQA_DECODE(SFX, T, D, 2)                                                                     \
    GQA_DECODE(SFX, T, D, 4)                                                                     \
    GQA_DECODE(SFX, T, D, 8)
GQA_DECODE_DIM(bf16, bf16, 64)
GQA_DECODE_DIM(bf16, bf16, 128)
GQA_DECODE_DIM(bf16, bf16, 256)
GQA_DECODE(bf16, bf16, 64, 16)
GQA_DECODE(bf16, bf16, 128, 16)
GQA_DECODE_DIM(f32, float, 64)
GQA_DECODE_DIM(f32, float, 128)
GQA_DECODE_DIM(f32, float, 256)
GQA_DECODE(f32, float, 64, 16)
GQA_DECODE(f32, float, 128, 16)
