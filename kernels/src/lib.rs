//! Hot-path operators of moe-engine behind stable signatures: the paged latent KV cache
//! write and paged MLA attention, the paged per-head K/V cache write and grouped-query
//! attention (GQA), and the mixture-of-experts routing, permutation and grouped
//! expert MLP. Each op has a device-agnostic reference implementation here
//! (candle ops, run on the CPU in tests); CUDA kernels slot in behind the same arguments
//! (module [`cuda`], with the `cuda` feature).
//! [`dense::matmul_nt`] is the dense projection, with one tiled CPU path for every weight dtype;
//! [`dense::Weight`] adds weights kept quantized (FP8, INT4; [`quant`]).
//! This crate knows nothing about models, configs or requests.

pub mod comm;
pub mod dense;
pub mod device_memory;
pub mod gqa;
pub mod mla;
pub mod moe;
pub mod norm;
pub mod paged;
pub mod quant;
pub mod reference;
pub mod rope;
pub mod sampling;

#[cfg(test)]
mod test_values;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use gqa::{paged_gqa_attention, write_kv_cache};
pub use mla::{
    absorb_queries, expand_values, indexer_topk, paged_mla_attention, sparse_mla_attention, write_index_keys,
    write_latent_cache, TokenSelection,
};
pub use norm::rmsnorm_residual;
pub use paged::{DeviceRows, PagedBatch, PagedSeq};
pub use rope::rope;
