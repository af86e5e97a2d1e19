//! Hot-path operators of moe-engine behind stable signatures: the paged latent KV cache
//! write, paged MLA attention, and the mixture-of-experts routing, permutation and grouped
//! expert MLP. Each op has a device-agnostic reference implementation here
//! (candle ops, run on the CPU in tests); CUDA kernels slot in behind the same arguments
//! (module [`cuda`], with the `cuda` feature).
//! This crate knows nothing about models, configs or requests.

pub mod mla;
pub mod moe;
pub mod reference;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use mla::{paged_mla_attention, write_latent_cache, PagedSeq};
