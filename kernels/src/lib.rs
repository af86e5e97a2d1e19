//! Hot-path operators of moe-engine behind stable signatures: the paged latent KV cache
//! write and paged MLA attention. Each op has a device-agnostic reference implementation here
//! (candle ops, run on the CPU in tests); CUDA kernels slot in behind the same arguments
//! (module [`cuda`], with the `cuda` feature).
//! This crate knows nothing about models, configs or requests.

pub mod mla;
pub mod reference;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use mla::{paged_mla_attention, write_latent_cache, PagedSeq};
