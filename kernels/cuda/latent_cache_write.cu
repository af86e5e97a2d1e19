// Scatter of per-token latents into the paged latent cache.
//
// cache: [num_slots, kv_lora + rope] rows (= [num_blocks, block_size, latent_dim] flattened);
// ckv:   [T, kv_lora] rows `ckv_stride` elements apart; kpe: [T, rope] rows `kpe_stride` apart;
// slots: [T] (i64: negative = padding, skipped; u32: 0xffffffff = padding, skipped).
// One block per token; slots outside the cache are skipped (the host cannot check them
// without a device-to-host copy).
#include "common.cuh"

__device__ __forceinline__ int64_t slot_value(int64_t s) { return s; }
__device__ __forceinline__ int64_t slot_value(uint32_t s) { return s == 0xffffffffu ? -1 : (int64_t)s; }

template <typename T, typename S>
__device__ void latent_cache_write(const T* __restrict__ ckv, int64_t ckv_stride,
                                   const T* __restrict__ kpe, int64_t kpe_stride,
                                   const S* __restrict__ slots, T* __restrict__ cache,
                                   int kv_lora, int rope, int64_t num_slots) {
    const int64_t t = blockIdx.x;
    const int64_t slot = slot_value(slots[t]);
    if (slot < 0 || slot >= num_slots) return;
    T* dst = cache + slot * (int64_t)(kv_lora + rope);
    const T* a = ckv + t * ckv_stride;
    for (int i = threadIdx.x; i < kv_lora; i += blockDim.x) dst[i] = a[i];
    const T* b = kpe + t * kpe_stride;
    for (int i = threadIdx.x; i < rope; i += blockDim.x) dst[kv_lora + i] = b[i];
}

#define LATENT_CACHE_WRITE(NAME, T, S)                                                        \
    extern "C" __global__ void NAME(const T* ckv, int64_t ckv_stride, const T* kpe,          \
                                    int64_t kpe_stride, const S* slots, T* cache,           \
                                    int kv_lora, int rope, int64_t num_slots) {              \
        latent_cache_write<T, S>(ckv, ckv_stride, kpe, kpe_stride, slots, cache, kv_lora,    \
                                 rope, num_slots);                                           \
    }

LATENT_CACHE_WRITE(latent_cache_write_bf16_i64, bf16, int64_t)
LATENT_CACHE_WRITE(latent_cache_write_bf16_u32, bf16, uint32_t)
LATENT_CACHE_WRITE(latent_cache_write_f32_i64, float, int64_t)
LATENT_CACHE_WRITE(latent_cache_write_f32_u32, float, uint32_t)
