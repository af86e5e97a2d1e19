//! Paged MLA: writing latents into the block-paged cache and attending over it with
//! weight absorption (MQA with key dim `kv_lora_rank + rope_dim` and value dim `kv_lora_rank`).
//!
//! Cache layout (one tensor per layer): `[num_blocks, block_size, latent_dim]`, row `slot =
//! block_id * block_size + offset` holds one token's normalized `c_kv` (first `kv_lora_rank`
//! values) followed by its rotated `k_pe`.

mod attention;
mod cache_write;

pub use attention::paged_mla_attention;
pub use cache_write::write_latent_cache;

/// One sequence's share of a flat batch of query tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedSeq {
    /// First row of this sequence in the flat query tensor.
    pub query_start: usize,
    /// Number of query rows (new tokens this step; 1 for decode).
    pub query_len: usize,
    /// Tokens in the cache for this sequence after this step's writes (>= `query_len`); the
    /// queries are its last `query_len` positions and attend causally.
    pub context_len: usize,
    /// Block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

impl PagedSeq {
    /// Cache slot of position `pos` of this sequence.
    pub fn slot(&self, pos: usize, block_size: usize) -> usize {
        self.block_table[pos / block_size] as usize * block_size + pos % block_size
    }
}
