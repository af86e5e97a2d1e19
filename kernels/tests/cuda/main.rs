//! Every GPU test of the kernels, in one test binary (feature `cuda`; needs a CUDA device):
//! one copy of candle's embedded kernels instead of one per file, so the GPU bundle fits what
//! a remote run may carry. Each module compares one kernel family with its host reference:
//! [`ops`] (latent cache write, fused residual + RMSNorm, RoPE, paged MLA decode), [`gqa`],
//! [`attention`] (the attention entry points over a mixed step of decode and prompt rows),
//! [`moe`] (routing, permutation, grouped experts) and [`dsa`] (indexer top-k, sparse MLA).
#![cfg(feature = "cuda")]

mod attention;
mod common;
mod dsa;
mod gqa;
mod moe;
mod ops;
