//! Scatter of per-token latents into their cache slots (`slot_mapping`).

use candle_core::{Result, Tensor};

use crate::paged::write_cache_rows;

/// Writes `latents[t]` into cache row `slot_mapping[t]`, in place.
///
/// * `cache`: `[num_blocks, block_size, latent_dim]`, contiguous.
/// * `latents`: `[num_tokens, latent_dim]`, converted to the cache dtype.
/// * `slot_mapping`: `[num_tokens]` u32, every slot `< num_blocks * block_size`, no duplicates.
pub fn write_latent_cache(cache: &Tensor, latents: &Tensor, slot_mapping: &Tensor) -> Result<()> {
    write_cache_rows("write_latent_cache", cache, latents, slot_mapping)
}

/// Writes the DSA indexer's key of every token into its slot of the indexer key cache, in
/// place. Same contract as [`write_latent_cache`], over `[num_blocks, block_size,
/// index_head_dim]` (the same block ids and slots as the latents).
pub fn write_index_keys(cache: &Tensor, keys: &Tensor, slot_mapping: &Tensor) -> Result<()> {
    write_cache_rows("write_index_keys", cache, keys, slot_mapping)
}
