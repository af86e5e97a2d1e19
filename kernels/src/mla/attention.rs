//! Reference paged MLA attention over the latent cache (absorbed form).

use candle_core::{DType, Device, Result, Tensor, D};

use super::PagedSeq;

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
    let (num_tokens, num_heads, latent_dim) = q.dims3()?;
    let (num_blocks, block_size, cache_dim) = cache.dims3()?;
    if cache_dim != latent_dim || value_dim > latent_dim {
        candle_core::bail!("paged_mla_attention: q dim {latent_dim}, cache dim {cache_dim}, value dim {value_dim}");
    }
    let device = q.device();
    let rows = cache.reshape((num_blocks * block_size, cache_dim))?;
    let mut outputs = Vec::with_capacity(seqs.len());
    let mut covered = 0usize;
    for seq in seqs {
        if seq.query_len == 0 {
            continue;
        }
        if seq.query_start != covered {
            candle_core::bail!("paged_mla_attention: sequences must tile the query rows in order");
        }
        if seq.context_len < seq.query_len || seq.query_start + seq.query_len > num_tokens {
            candle_core::bail!("paged_mla_attention: bad sequence {seq:?} for {num_tokens} query rows");
        }
        let needed_blocks = seq.context_len.div_ceil(block_size);
        if seq.block_table.len() < needed_blocks || seq.block_table.iter().any(|&b| b as usize >= num_blocks) {
            candle_core::bail!("paged_mla_attention: block table of {seq:?} does not cover its context");
        }
        let slots: Vec<u32> = (0..seq.context_len).map(|p| seq.slot(p, block_size) as u32).collect();
        let slots = Tensor::from_vec(slots, seq.context_len, device)?;
        let keys = rows.index_select(&slots, 0)?.to_dtype(DType::F32)?; // [L, Dk]
        let values = keys.narrow(1, 0, value_dim)?; // [L, Dv]
        let q_seq = q
            .narrow(0, seq.query_start, seq.query_len)?
            .to_dtype(DType::F32)?
            .reshape((seq.query_len * num_heads, latent_dim))?;
        let scores = (q_seq.matmul(&keys.t()?)? * scale)?; // [Q*H, L]
        let scores = scores.reshape((seq.query_len, num_heads, seq.context_len))?;
        let scores = scores.broadcast_add(&causal_bias(seq, device)?)?;
        let probs = candle_nn_free_softmax(&scores)?;
        let out = probs
            .reshape((seq.query_len * num_heads, seq.context_len))?
            .matmul(&values.contiguous()?)?; // [Q*H, Dv]
        outputs.push(out.reshape((seq.query_len, num_heads, value_dim))?);
        covered += seq.query_len;
    }
    if covered < num_tokens {
        outputs.push(Tensor::zeros(
            (num_tokens - covered, num_heads, value_dim),
            DType::F32,
            device,
        )?);
    }
    Tensor::cat(&outputs, 0)
}

/// `[query_len, 1, context_len]` additive mask: query `i` sits at position
/// `context_len - query_len + i` and sees keys at positions `<=` its own.
fn causal_bias(seq: &PagedSeq, device: &Device) -> Result<Tensor> {
    let offset = seq.context_len - seq.query_len;
    let mut bias = vec![0f32; seq.query_len * seq.context_len];
    for i in 0..seq.query_len {
        for j in (offset + i + 1)..seq.context_len {
            bias[i * seq.context_len + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(bias, (seq.query_len, 1, seq.context_len), device)
}

/// Numerically stable softmax over the last dim (every row has at least one finite entry).
fn candle_nn_free_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

#[cfg(test)]
mod tests;
