//! Paged MLA attention over the latent cache (absorbed form): the CPU kernel of
//! [`super::host_attention`] for a CPU cache, and a reference in candle ops for other devices.

use candle_core::{DType, Result, Tensor};

use super::host_attention::host_paged_mla_attention;
use crate::paged::{causal_bias, check_seq, softmax_last_dim, PagedSeq};

/// Causal attention of absorbed queries over each sequence's cached latents.
///
/// * `q`: `[num_tokens, num_heads, latent_dim]`: `q_nope · W_UK` concatenated with the
///   rotated `q_pe`, rows grouped by sequence as `seqs` describes.
/// * `cache`: `[num_blocks, block_size, latent_dim]`; keys are whole rows, values are their
///   first `value_dim` columns (the `c_kv` part).
/// * `scale`: softmax scale (already including YaRN's mscale²).
///
/// Returns `[num_tokens, num_heads, value_dim]` in f32. Scores and softmax run in f32
/// whatever the cache dtype. Rows of `q` not covered by `seqs` are left zero.
pub fn paged_mla_attention(
    q: &Tensor,
    cache: &Tensor,
    seqs: &[PagedSeq],
    value_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    check_dims(q, cache, value_dim)?;
    if q.device().is_cpu() && cache.device().is_cpu() {
        if let Some(out) = host_paged_mla_attention(q, cache, seqs, value_dim, scale)? {
            return Ok(out);
        }
    }
    reference_paged_mla_attention(q, cache, seqs, value_dim, scale)
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
