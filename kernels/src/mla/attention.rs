//! Paged MLA attention over the latent cache (absorbed form), one entry point for every
//! device: the CPU kernel of [`super::host_attention`] for a CPU cache, the CUDA kernel
//! (`kernels/cuda/paged_mla_decode.cu`, every row of a mixed step in one launch) for a bf16 or
//! f32 cache on a GPU, and a reference in candle ops for anything else.

use candle_core::{DType, Result, Tensor};

use super::host_attention::host_paged_mla_attention;
use crate::paged::{causal_bias, check_seq, softmax_last_dim, PagedBatch, PagedSeq};

/// Causal attention of absorbed queries over each sequence's cached latents.
///
/// * `q`: `[num_tokens, num_heads, latent_dim]`: `q_nope · W_UK` concatenated with the
///   rotated `q_pe`, rows grouped by sequence as `seqs` describes.
/// * `cache`: `[num_blocks, block_size, latent_dim]`; keys are whole rows, values are their
///   first `value_dim` columns (the `c_kv` part).
/// * `scale`: softmax scale (already including YaRN's mscale²).
///
/// Returns `[num_tokens, num_heads, value_dim]` in f32. Scores and softmax run in f32
/// whatever the cache dtype; on a GPU the queries are rounded to the cache dtype first (the
/// kernel reads both in one type). Rows of `q` not covered by `seqs` are left zero.
pub fn paged_mla_attention(
    q: &Tensor,
    cache: &Tensor,
    seqs: &PagedBatch,
    value_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    check_dims(q, cache, value_dim)?;
    if q.device().is_cpu() && cache.device().is_cpu() {
        if let Some(out) = host_paged_mla_attention(q, cache, seqs, value_dim, scale)? {
            return Ok(out);
        }
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda_paged_mla_attention(q, cache, seqs, value_dim, scale)? {
        return Ok(out);
    }
    reference_paged_mla_attention(q, cache, seqs, value_dim, scale)
}

/// The CUDA kernel's answer where it applies (a bf16 or f32 cache on a GPU, value dim a
/// multiple of 32 up to 512, 16-byte cache rows), after the same host checks as the
/// reference; `None` elsewhere. The batch's row tables are uploaded once a step.
#[cfg(feature = "cuda")]
fn cuda_paged_mla_attention(
    q: &Tensor,
    cache: &Tensor,
    seqs: &PagedBatch,
    value_dim: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (num_tokens, _, latent_dim) = q.dims3()?;
    let (num_blocks, block_size, _) = cache.dims3()?;
    let dtype = cache.dtype();
    let applies = cache.device().is_cuda()
        && matches!(dtype, DType::BF16 | DType::F32)
        && cache.is_contiguous()
        && value_dim > 0
        && value_dim <= 512
        && value_dim.is_multiple_of(32)
        && latent_dim.is_multiple_of(2)
        && (latent_dim * dtype.size_in_bytes()).is_multiple_of(16);
    if !applies {
        return Ok(None);
    }
    let mut covered = 0;
    for seq in seqs.iter().filter(|s| s.query_len > 0) {
        check_seq("paged_mla_attention", seq, covered, num_tokens, num_blocks, block_size)?;
        covered += seq.query_len;
    }
    let rows = seqs.device_rows(num_tokens, cache.device())?;
    let q = q.to_dtype(dtype)?;
    let q = if q.stride()[2] == 1 { q } else { q.contiguous()? };
    let out = crate::cuda::paged_mla_rows(&q, cache, &rows, value_dim, scale)?;
    Ok(Some(out.to_dtype(DType::F32)?))
}

fn check_dims(q: &Tensor, cache: &Tensor, value_dim: usize) -> Result<()> {
    let (_, _, latent_dim) = q.dims3()?;
    let (_, _, cache_dim) = cache.dims3()?;
    if cache_dim != latent_dim || value_dim > latent_dim {
        candle_core::bail!("paged_mla_attention: q dim {latent_dim}, cache dim {cache_dim}, value dim {value_dim}");
    }
    Ok(())
}

/// [`paged_mla_attention`] in candle ops, on any device: per sequence, the context's rows
/// gathered, a causal mask, two matmuls.
pub(crate) fn reference_paged_mla_attention(
    q: &Tensor,
    cache: &Tensor,
    seqs: &[PagedSeq],
    value_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    check_dims(q, cache, value_dim)?;
    let (num_tokens, num_heads, latent_dim) = q.dims3()?;
    let (num_blocks, block_size, cache_dim) = cache.dims3()?;
    let device = q.device();
    let rows = cache.reshape((num_blocks * block_size, cache_dim))?;
    let mut outputs = Vec::with_capacity(seqs.len());
    let mut covered = 0usize;
    for seq in seqs {
        if seq.query_len == 0 {
            continue;
        }
        check_seq("paged_mla_attention", seq, covered, num_tokens, num_blocks, block_size)?;
        let slots = seq.slots(block_size, device)?;
        let keys = rows.index_select(&slots, 0)?.to_dtype(DType::F32)?; // [L, Dk]
        let values = keys.narrow(1, 0, value_dim)?; // [L, Dv]
        let q_seq = q
            .narrow(0, seq.query_start, seq.query_len)?
            .to_dtype(DType::F32)?
            .reshape((seq.query_len * num_heads, latent_dim))?;
        let scores = (q_seq.matmul(&keys.t()?)? * scale)?; // [Q*H, L]
        let scores = scores.reshape((seq.query_len, num_heads, seq.context_len))?;
        let scores = scores.broadcast_add(&causal_bias(seq, 0, seq.query_len, device)?)?;
        let probs = softmax_last_dim(&scores)?;
        let out = probs
            .reshape((seq.query_len * num_heads, seq.context_len))?
            .matmul(&values.contiguous()?)?; // [Q*H, Dv]
        outputs.push(out.reshape((seq.query_len, num_heads, value_dim))?);
        covered += seq.query_len;
    }
    if covered < num_tokens || outputs.is_empty() {
        outputs.push(Tensor::zeros(
            (num_tokens - covered, num_heads, value_dim),
            DType::F32,
            device,
        )?);
    }
    Tensor::cat(&outputs, 0)
}

#[cfg(test)]
mod tests;
