//! Scatter of per-token latents into their cache slots (`slot_mapping`).

use candle_core::{DType, Result, Tensor};

/// Writes `latents[t]` into cache row `slot_mapping[t]`, in place.
///
/// * `cache`: `[num_blocks, block_size, latent_dim]`, contiguous.
/// * `latents`: `[num_tokens, latent_dim]`, converted to the cache dtype.
/// * `slot_mapping`: `[num_tokens]` u32, every slot `< num_blocks * block_size`, no duplicates.
pub fn write_latent_cache(cache: &Tensor, latents: &Tensor, slot_mapping: &Tensor) -> Result<()> {
    let (num_blocks, block_size, dim) = cache.dims3()?;
    let (num_tokens, latent_dim) = latents.dims2()?;
    if latent_dim != dim {
        candle_core::bail!("write_latent_cache: latent dim {latent_dim} != cache dim {dim}");
    }
    if slot_mapping.dims1()? != num_tokens {
        candle_core::bail!(
            "write_latent_cache: {num_tokens} latents but {} slots",
            slot_mapping.dims1()?
        );
    }
    if num_tokens == 0 {
        return Ok(());
    }
    if slot_mapping.dtype() != DType::U32 {
        candle_core::bail!("write_latent_cache: slot_mapping must be u32");
    }
    let max_slot = slot_mapping.max(0)?.to_scalar::<u32>()? as usize;
    if max_slot >= num_blocks * block_size {
        candle_core::bail!(
            "write_latent_cache: slot {max_slot} outside a cache of {} slots",
            num_blocks * block_size
        );
    }
    // A reshape of a contiguous tensor shares its storage, so the scatter lands in `cache`.
    let rows = cache.reshape((num_blocks * block_size, dim))?;
    let index = slot_mapping
        .unsqueeze(1)?
        .broadcast_as((num_tokens, dim))?
        .contiguous()?;
    let src = latents.to_dtype(cache.dtype())?.contiguous()?;
    rows.scatter_set(&index, &src, 0)
}
