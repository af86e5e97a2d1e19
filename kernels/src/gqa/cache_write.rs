//! Scatter of per-token keys and values into their slots of the paged K and V caches.

use candle_core::{bail, Result, Tensor};

use crate::paged::write_cache_rows;

/// Writes `k[t]`, `v[t]` into cache row `slot_mapping[t]` of both caches, in place.
///
/// * `k_cache`: `[num_blocks, block_size, kv_heads, head_dim]`; `v_cache`: `[num_blocks,
///   block_size, kv_heads, v_head_dim]`; both contiguous.
/// * `k`: `[T, kv_heads, head_dim]`; `v`: `[T, kv_heads, v_head_dim]` (any layout; converted to
///   the cache dtype).
/// * `slot_mapping`: `[T]` u32, every slot `< num_blocks * block_size`, no duplicates.
///
/// Every argument is checked before either cache is touched.
pub fn write_kv_cache(k_cache: &Tensor, v_cache: &Tensor, k: &Tensor, v: &Tensor, slot_mapping: &Tensor) -> Result<()> {
    const OP: &str = "write_kv_cache";
    let (num_blocks, block_size, kv_heads, head_dim, v_head_dim) = super::cache_dims(OP, k_cache, v_cache)?;
    let (t, kh, kd) = k.dims3()?;
    let (tv, vhh, vd) = v.dims3()?;
    if (kh, kd) != (kv_heads, head_dim) || (tv, vhh, vd) != (t, kv_heads, v_head_dim) {
        bail!(
            "{OP}: k {:?}, v {:?} for caches {:?}, {:?}",
            k.shape(),
            v.shape(),
            k_cache.shape(),
            v_cache.shape()
        );
    }
    if !k_cache.is_contiguous() || !v_cache.is_contiguous() {
        bail!("{OP}: the caches must be contiguous to be written in place");
    }
    // Both writes check the slots the same way (the same slots over caches of as many rows),
    // so either both happen or neither does.
    // A token's row is `kv_heads * dim` contiguous values in either cache, so the flattened
    // views take the same scatter as the latent cache.
    let k_rows = k_cache.reshape((num_blocks, block_size, kv_heads * head_dim))?;
    let v_rows = v_cache.reshape((num_blocks, block_size, kv_heads * v_head_dim))?;
    write_cache_rows(OP, &k_rows, &k.reshape((t, kv_heads * head_dim))?, slot_mapping)?;
    write_cache_rows(OP, &v_rows, &v.reshape((t, kv_heads * v_head_dim))?, slot_mapping)
}
