// Groups token slots by expert on the device, the CUDA form of
// `moe_kernels::moe::permute_by_expert`, in one launch and with no host round trip.
//
// ids:          [S] u32 expert per slot (slot = token * top_k + j); ids >= E own no row.
// counts:       [E] u32 slots per expert.
// offsets:      [E + 1] u32 first permuted row of each expert, groups padded to `tile` rows.
// sorted_slots: [>= offsets[E]] u32 slot of each permuted row, ascending within an expert,
//               0xffffffff for padding rows.
// tile_experts: [>= offsets[E] / tile] u32 expert of each tile; num_tiles: [1] u32.
// Layout: one CTA per expert. Each CTA histograms all slots in shared memory (deterministic:
// counts do not depend on atomic order), scans the padded counts to find its offset, then
// compacts its own slots in slot order with a block-wide prefix sum. CTA 0 also writes
// `offsets` and `num_tiles`. Experts with no slots skip the compaction.
#include "common.cuh"

#define PAD_SLOT 0xffffffffu

// Inclusive prefix sum over the block (blockDim.x a multiple of 32); `*total` gets the sum.
__device__ __forceinline__ uint32_t block_scan(uint32_t v, uint32_t* total) {
    __shared__ uint32_t warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const uint32_t t = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += t;
    }
    __syncthreads(); // warp_sums may still be read from a previous call
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        uint32_t w = lane < warps ? warp_sums[lane] : 0u;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const uint32_t t = __shfl_up_sync(0xffffffffu, w, off);
            if (lane >= off) w += t;
        }
        warp_sums[lane] = w;
    }
    __syncthreads();
    *total = warp_sums[warps - 1];
    return v + (warp > 0 ? warp_sums[warp - 1] : 0u);
}

extern "C" __global__ void moe_permute(const uint32_t* __restrict__ ids, int n_slots, int E, int tile,
                                       uint32_t* __restrict__ counts, uint32_t* __restrict__ offsets,
                                       uint32_t* __restrict__ sorted_slots, uint32_t* __restrict__ tile_experts,
                                       uint32_t* __restrict__ num_tiles) {
    extern __shared__ uint32_t starts[]; // [E + 1]: counts, then padded exclusive offsets
    const int tid = threadIdx.x, threads = blockDim.x;
    const uint32_t e = blockIdx.x;
    for (int i = tid; i <= E; i += threads) starts[i] = 0;
    __syncthreads();
    for (int i = tid; i < n_slots; i += threads) {
        const uint32_t x = ids[i];
        if (x < (uint32_t)E) atomicAdd(&starts[x], 1u);
    }
    __syncthreads();
    const uint32_t count = starts[e];
    uint32_t carry = 0, total;
    for (int base = 0; base < E; base += threads) {
        const int i = base + tid;
        const uint32_t v = i < E ? (starts[i] + tile - 1) / tile * tile : 0u;
        const uint32_t incl = block_scan(v, &total); // synchronises before anyone writes below
        if (i < E) starts[i] = carry + incl - v;
        carry += total;
    }
    if (tid == 0) starts[E] = carry;
    __syncthreads();
    const uint32_t start = starts[e], end = starts[e + 1];
    if (e == 0) {
        for (int i = tid; i <= E; i += threads) offsets[i] = starts[i];
        if (tid == 0) num_tiles[0] = carry / tile;
    }
    if (tid == 0) counts[e] = count;
    for (uint32_t t = start / tile + tid; t < end / tile; t += threads) tile_experts[t] = e;
    if (count == 0) return; // uniform across the CTA
    uint32_t written = 0;
    for (int base = 0; base < n_slots; base += threads) {
        const int i = base + tid;
        const bool mine = i < n_slots && ids[i] == e;
        const uint32_t incl = block_scan(mine ? 1u : 0u, &total);
        if (mine) sorted_slots[start + written + incl - 1] = (uint32_t)i;
        written += total;
    }
    for (uint32_t r = start + count + tid; r < end; r += threads) sorted_slots[r] = PAD_SLOT;
}
