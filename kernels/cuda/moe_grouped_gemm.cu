// Grouped expert GEMMs in bf16 on tensor cores (WMMA 16x16x16, f32 accumulation), over the
// per-expert row tiles built by `moe_permute`, and the deterministic combine.
//
// moe_gate_up_silu: h[row, n] = bf16(silu(x[tok] . Wg[e, n]) * (x[tok] . Wu[e, n]))
//   x: [T, K] bf16 (row stride lda); w: [E, 2N, K] bf16 (gate rows, then up rows);
//   h: [rows, N] bf16 (row stride ldo), `row` = permuted row, tok = sorted_slots[row] / top_k.
//   A CTA computes BM rows x 64 gate columns and the matching 64 up columns, so the SiLU-and-
//   multiply happens in registers/shared memory and only h is written.
// moe_down_weighted: y[slot, n] = weight[slot] * (h[row] . Wd[e, n])
//   h: [rows, K] bf16; w: [E, N, K] bf16; y: [S, N] f32 in slot order (ldo), written once per
//   slot, so no atomics.
// moe_combine_*: out[t, n] = dtype(sum_j y[t * top_k + j, n] (+ shared[t, n])), summed in slot
//   order: the same input always gives the same output.
//
// Tiles: a CTA owns one row tile (BM = 32 permuted rows of one expert; blockIdx.x) and BN =
// 128 weight rows (blockIdx.y); 4 warps as 2 (16-row halves) x 2 (64-column halves), each
// holding four 16x16 accumulators. K advances in BK = 32 steps through a 3-stage cp.async
// pipeline. CTAs whose tile index is >= num_tiles (read on the device) exit at once, so the
// grid is sized from shapes alone and launches need no host synchronisation. Padding rows
// are zero-filled on load and never stored. Requires K % 8 == 0 and 16-byte aligned rows.
#include "common.cuh"
#include <mma.h>

using namespace nvcuda;

#define BM 32
#define BN 128
#define BK 32
#define STAGES 3
#define LDS (BK + 8)  // shared row stride in elements: 80 bytes keeps 16B/32B alignment, skews banks
#define LDC (BN + 4)  // f32 epilogue row stride
#define THREADS 128
#define PAD_SLOT 0xffffffffu

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// FUSED_SILU: gate/up mode (tile columns 0..63 gate rows n0+j, 64..127 up rows N+n0+j-64).
// Otherwise down mode (tile columns j -> weight rows n0+j).
template <bool FUSED_SILU>
__device__ void grouped_gemm(const bf16* __restrict__ a, int64_t lda, const bf16* __restrict__ w, int K, int N,
                             const uint32_t* __restrict__ sorted_slots, const uint32_t* __restrict__ tile_experts,
                             const uint32_t* __restrict__ num_tiles, int top_k,
                             const float* __restrict__ slot_weights, void* __restrict__ out, int64_t ldo) {
    const int tile = blockIdx.x;
    if (tile >= (int)num_tiles[0]) return;
    const int e = (int)tile_experts[tile];
    const int cols = FUSED_SILU ? BN / 2 : BN; // output columns per CTA
    const int n0 = blockIdx.y * cols;
    const int64_t w_rows = FUSED_SILU ? 2 * (int64_t)N : (int64_t)N;
    const bf16* we = w + (int64_t)e * w_rows * K;

    __shared__ __align__(128) unsigned char smem[STAGES * (BM + BN) * LDS * sizeof(bf16)];
    __shared__ int64_t a_off[BM]; // element offset of each A row, -1 for padding
    __shared__ uint32_t row_slot[BM];
    bf16* as = reinterpret_cast<bf16*>(smem);  // [STAGES][BM][LDS]
    bf16* bs = as + STAGES * BM * LDS;         // [STAGES][BN][LDS]
    const int tid = threadIdx.x;
    if (tid < BM) {
        const uint32_t slot = sorted_slots[(int64_t)tile * BM + tid];
        row_slot[tid] = slot;
        const int64_t a_row = FUSED_SILU ? (int64_t)(slot / top_k) : (int64_t)tile * BM + tid;
        a_off[tid] = slot == PAD_SLOT ? -1 : a_row * lda;
    }
    __syncthreads();

    auto load_stage = [&](int stage, int k0) {
        { // A: BM rows x 4 chunks of 8 elements, one chunk per thread
            const int r = tid >> 2, c = (tid & 3) * 8, k = k0 + c;
            const int64_t off = a_off[r];
            const bool ok = off >= 0 && k < K;
            cp_async16(&as[(stage * BM + r) * LDS + c], ok ? a + off + k : a, ok ? 16 : 0);
        }
#pragma unroll
        for (int q = 0; q < (BN * BK / 8) / THREADS; ++q) { // B: BN rows x 4 chunks
            const int idx = tid + q * THREADS, j = idx >> 2, c = (idx & 3) * 8, k = k0 + c;
            int n, wrow;
            if (FUSED_SILU) {
                n = n0 + (j < BN / 2 ? j : j - BN / 2);
                wrow = j < BN / 2 ? n : N + n;
            } else {
                n = n0 + j;
                wrow = n;
            }
            const bool ok = n < N && k < K;
            cp_async16(&bs[(stage * BN + j) * LDS + c], ok ? we + (int64_t)wrow * K + k : we, ok ? 16 : 0);
        }
    };

    const int warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
    for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);

    const int ktiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>(); // stage kt has landed (for this thread's copies)
        __syncthreads();             // ... for everyone's, and stage kt - 1 is free again
        const int pf = kt + STAGES - 1;
        if (pf < ktiles) load_stage(pf % STAGES, pf * BK);
        cp_async_commit();
        const int st = kt % STAGES;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, &as[(st * BM + wm * 16) * LDS + kk], LDS);
#pragma unroll
            for (int f = 0; f < 4; ++f) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, &bs[(st * BN + wn * 64 + f * 16) * LDS + kk], LDS);
                wmma::mma_sync(acc[f], fa, fb, acc[f]);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads(); // the pipeline buffers become the f32 epilogue tile

    float* cs = reinterpret_cast<float*>(smem); // [BM][LDC]
#pragma unroll
    for (int f = 0; f < 4; ++f)
        wmma::store_matrix_sync(&cs[(wm * 16) * LDC + wn * 64 + f * 16], acc[f], LDC, wmma::mem_row_major);
    __syncthreads();

    if (FUSED_SILU) {
        bf16* h = reinterpret_cast<bf16*>(out);
        for (int idx = tid; idx < BM * (BN / 2); idx += THREADS) {
            const int r = idx / (BN / 2), j = idx % (BN / 2), n = n0 + j;
            if (n >= N || row_slot[r] == PAD_SLOT) continue;
            const float g = cs[r * LDC + j], u = cs[r * LDC + BN / 2 + j];
            h[((int64_t)tile * BM + r) * ldo + n] = __float2bfloat16_rn(g / (1.f + expf(-g)) * u);
        }
    } else {
        float* y = reinterpret_cast<float*>(out);
        for (int idx = tid; idx < BM * BN; idx += THREADS) {
            const int r = idx / BN, j = idx % BN, n = n0 + j;
            const uint32_t slot = row_slot[r];
            if (n >= N || slot == PAD_SLOT) continue;
            y[(int64_t)slot * ldo + n] = slot_weights[slot] * cs[r * LDC + j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    moe_gate_up_silu(const bf16* x, int64_t ldx, const bf16* w_gate_up, int K, int N, const uint32_t* sorted_slots,
                     const uint32_t* tile_experts, const uint32_t* num_tiles, int top_k, bf16* h, int64_t ldh) {
    grouped_gemm<true>(x, ldx, w_gate_up, K, N, sorted_slots, tile_experts, num_tiles, top_k, nullptr, h, ldh);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    moe_down_weighted(const bf16* h, int64_t ldh, const bf16* w_down, int K, int N, const uint32_t* sorted_slots,
                      const uint32_t* tile_experts, const uint32_t* num_tiles, const float* slot_weights, float* y,
                      int64_t ldy) {
    grouped_gemm<false>(h, ldh, w_down, K, N, sorted_slots, tile_experts, num_tiles, 1, slot_weights, y, ldy);
}

template <typename T>
__device__ void combine(const float* __restrict__ y, int top_k, const T* __restrict__ shared, T* __restrict__ out,
                        int N) {
    const int64_t t = blockIdx.x;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < top_k; ++j) acc += y[(t * top_k + j) * N + n];
        if (shared != nullptr) acc += to_f32(shared[t * N + n]);
        out[t * N + n] = from_f32<T>(acc);
    }
}

extern "C" __global__ void moe_combine_bf16(const float* y, int top_k, const bf16* shared, bf16* out, int N) {
    combine<bf16>(y, top_k, shared, out, N);
}
extern "C" __global__ void moe_combine_f32(const float* y, int top_k, const float* shared, float* out, int N) {
    combine<float>(y, top_k, shared, out, N);
}
