//! What every paged-cache op shares: a sequence's share of a flat query batch
//! ([`PagedSeq`]), its validation against a cache, the causal mask and softmax of the
//! reference attentions, and the slot scatter the cache writes use. It knows nothing about
//! what a cache row holds (latents in [`crate::mla`], per-head K/V in [`crate::gqa`]).

use candle_core::{bail, DType, Device, Result, Tensor, D};

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

    /// Cache slots of positions `0..context_len` as a `[context_len]` u32 tensor (call
    /// [`check_seq`] first: it guarantees the table covers them).
    pub(crate) fn slots(&self, block_size: usize, device: &Device) -> Result<Tensor> {
        let slots: Vec<u32> = (0..self.context_len).map(|p| self.slot(p, block_size) as u32).collect();
        Tensor::from_vec(slots, self.context_len, device)
    }
}

/// Checks that `seq` (with `query_len > 0`) starts at row `covered` (sequences tile the query
/// rows in order), fits in `num_tokens` rows, has `context_len >= query_len`, and that its
/// block table covers the context with ids below `num_blocks`. `op` names the caller in the
/// error.
pub(crate) fn check_seq(
    op: &str,
    seq: &PagedSeq,
    covered: usize,
    num_tokens: usize,
    num_blocks: usize,
    block_size: usize,
) -> Result<()> {
    if seq.query_start != covered {
        bail!("{op}: sequences must tile the query rows in order ({seq:?} after {covered} rows)");
    }
    if seq.context_len < seq.query_len || seq.query_start + seq.query_len > num_tokens {
        bail!("{op}: bad sequence {seq:?} for {num_tokens} query rows");
    }
    if block_size == 0 {
        bail!("{op}: block size 0");
    }
    let needed = seq.context_len.div_ceil(block_size);
    if seq.block_table.len() < needed || seq.block_table[..needed].iter().any(|&b| b as usize >= num_blocks) {
        bail!("{op}: block table of {seq:?} does not cover its context in a pool of {num_blocks} blocks");
    }
    Ok(())
}

/// `[rows, 1, context_len]` additive mask for query rows `first..first + rows` of `seq`:
/// query `i` sits at position `context_len - query_len + i` and sees keys at positions `<=`
/// its own.
pub(crate) fn causal_bias(seq: &PagedSeq, first: usize, rows: usize, device: &Device) -> Result<Tensor> {
    let ctx = seq.context_len;
    let offset = ctx - seq.query_len;
    let mut bias = vec![0f32; rows * ctx];
    for (r, row) in bias.chunks_mut(ctx.max(1)).enumerate().take(rows) {
        let visible = offset + first + r + 1;
        row[visible..].fill(f32::NEG_INFINITY);
    }
    Tensor::from_vec(bias, (rows, 1, ctx), device)
}

/// Numerically stable softmax over the last dim (every row has at least one finite entry).
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Scores `[rows, span]` to probabilities in place: row `r` over its first `visible(r)`
/// positions, scaled by `scale`; the positions past them get zero.
pub(crate) fn softmax_visible(scores: &mut [f32], span: usize, scale: f32, visible: impl Fn(usize) -> usize) {
    for (r, row) in scores.chunks_mut(span).enumerate() {
        let (seen, hidden) = row.split_at_mut(visible(r));
        hidden.fill(0.0);
        let max = seen.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
        let mut total = 0f32;
        for v in seen.iter_mut() {
            *v = (*v * scale - max).exp();
            total += *v;
        }
        let inv = 1.0 / total;
        seen.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Writes `rows[t]` into cache row `slot_mapping[t]`, in place: the scatter behind
/// [`crate::write_latent_cache`] and [`crate::write_kv_cache`].
///
/// * `cache`: `[num_blocks, block_size, row_dim]`, contiguous (a copy would swallow the write).
/// * `rows`: `[num_tokens, row_dim]`, converted to the cache dtype.
/// * `slot_mapping`: `[num_tokens]` u32, every slot `< num_blocks * block_size`, no duplicates.
///
/// Nothing is written unless every check passes.
pub(crate) fn write_cache_rows(op: &str, cache: &Tensor, rows: &Tensor, slot_mapping: &Tensor) -> Result<()> {
    let (num_blocks, block_size, dim) = cache.dims3()?;
    let (num_tokens, row_dim) = rows.dims2()?;
    if row_dim != dim {
        bail!("{op}: rows of {row_dim} values for cache rows of {dim}");
    }
    check_slots(op, num_blocks * block_size, num_tokens, slot_mapping)?;
    if num_tokens == 0 {
        return Ok(());
    }
    if !cache.is_contiguous() {
        bail!("{op}: the cache must be contiguous to be written in place");
    }
    // A reshape of a contiguous tensor shares its storage, so the scatter lands in `cache`.
    let flat = cache.reshape((num_blocks * block_size, dim))?;
    let index = slot_mapping
        .unsqueeze(1)?
        .broadcast_as((num_tokens, dim))?
        .contiguous()?;
    let src = rows.to_dtype(cache.dtype())?.contiguous()?;
    flat.scatter_set(&index, &src, 0)
}

/// Checks `slot_mapping`: `[num_tokens]` u32 with every slot below `num_slots`.
pub(crate) fn check_slots(op: &str, num_slots: usize, num_tokens: usize, slot_mapping: &Tensor) -> Result<()> {
    let n = slot_mapping.dims1()?;
    if n != num_tokens {
        bail!("{op}: {num_tokens} rows but {n} slots");
    }
    if num_tokens == 0 {
        return Ok(());
    }
    if slot_mapping.dtype() != DType::U32 {
        bail!("{op}: slot_mapping must be u32, not {:?}", slot_mapping.dtype());
    }
    let max_slot = slot_mapping.max(0)?.to_scalar::<u32>()? as usize;
    if max_slot >= num_slots {
        bail!("{op}: slot {max_slot} outside a cache of {num_slots} slots");
    }
    Ok(())
}
