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

pub use attention::paged_gqa_attention;
pub use cache_write::write_kv_cache;

pub use crate::paged::PagedSeq;

#[cfg(test)]
mod tests;
