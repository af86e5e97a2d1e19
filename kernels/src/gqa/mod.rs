//! Paged grouped-query attention (GQA: Qwen3-MoE, Mixtral, MiniMax-M2, GLM-4.5): writing
//! per-head keys and values into the block-paged cache and attending over it, query head `h`
//! reading kv head `h / (num_heads / kv_heads)`. Plain MHA is `kv_heads == num_heads`, MQA
//! `kv_heads == 1`. Nothing here knows which model asks.
//!
//! Cache layout (two tensors per layer, same `num_blocks` and `block_size`):
//! `k_cache`: `[num_blocks, block_size, kv_heads, head_dim]`,
//! `v_cache`: `[num_blocks, block_size, kv_heads, v_head_dim]`, both contiguous; slot `slot =
//! block_id * block_size + offset` (as [`PagedSeq::slot`]) holds one token's keys (rotated) and
//! values for every kv head, so a token's row of either cache is `kv_heads * dim` contiguous
//! values, heads outermost.

mod attention;
mod cache_write;
mod host;

pub use attention::paged_gqa_attention;
pub use cache_write::write_kv_cache;

pub use crate::paged::PagedSeq;

use candle_core::{bail, Result, Tensor};

/// Shapes of a layer's caches: `(num_blocks, block_size, kv_heads, head_dim, v_head_dim)`,
/// after checking that `k_cache` and `v_cache` agree on everything but the head width.
fn cache_dims(op: &str, k_cache: &Tensor, v_cache: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
    let (num_blocks, block_size, kv_heads, head_dim) = k_cache.dims4()?;
    let (vb, vbs, vh, v_head_dim) = v_cache.dims4()?;
    if (vb, vbs, vh) != (num_blocks, block_size, kv_heads) {
        bail!(
            "{op}: k_cache {:?} and v_cache {:?} disagree",
            k_cache.shape(),
            v_cache.shape()
        );
    }
    Ok((num_blocks, block_size, kv_heads, head_dim, v_head_dim))
}

#[cfg(test)]
mod tests;
