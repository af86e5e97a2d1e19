//! Hot-path operators of moe-engine behind stable signatures: the paged latent KV cache
//! write and paged MLA attention. Each op has a device-agnostic reference implementation here
//! (candle ops, run on the CPU in tests); CUDA kernels slot in behind the same arguments.
//! This crate knows nothing about models, configs or requests.

pub mod mla;

pub use mla::{paged_mla_attention, write_latent_cache, PagedSeq};
