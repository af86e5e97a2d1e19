//! Paged MLA: writing latents into the block-paged cache and attending over it with
//! weight absorption (MQA with key dim `kv_lora_rank + rope_dim` and value dim `kv_lora_rank`).
//!
//! Cache layout (one tensor per layer): `[num_blocks, block_size, latent_dim]`, row `slot =
//! block_id * block_size + offset` holds one token's normalized `c_kv` (first `kv_lora_rank`
//! values) followed by its rotated `k_pe`. DeepSeek Sparse Attention adds an indexer key
//! cache, `[num_blocks, block_size, index_head_dim]` under the same block ids, and attends
//! over each query's selected positions only ([`sparse`]).

mod absorb;
mod attention;
mod cache_write;
mod host_attention;
mod host_chunk;
pub mod sparse;

pub use absorb::{absorb_queries, expand_values};
pub use attention::paged_mla_attention;
pub use cache_write::{write_index_keys, write_latent_cache};
pub use sparse::{indexer_topk, sparse_mla_attention, TokenSelection};

/// Re-exported from [`crate::paged`], where every paged op finds it.
pub use crate::paged::PagedSeq;
