//! DeepSeek Sparse Attention (DSA, DeepSeek-V3.2) over the paged caches, as Rust references:
//! the lightning indexer's scoring and top-k selection over the paged indexer key cache
//! ([`indexer_topk`]), and absorbed MLA restricted to each query's selected positions
//! ([`sparse_mla_attention`]). Scores, softmax and sums run in f32 on the host, a sequence at
//! a time; the device kernels take the same arguments.

use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

use crate::paged::{check_seq, PagedSeq};

/// Query rows scored against a sequence's keys in one product (bounds the `[rows, heads,
/// context]` score buffer).
const SCORE_ROWS: usize = 128;

/// The positions (within its own sequence) each query row attends to, ascending.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenSelection {
    /// `[num_tokens + 1]`: row `t`'s positions are `positions[offsets[t]..offsets[t + 1]]`.
    offsets: Vec<usize>,
    positions: Vec<u32>,
}

impl TokenSelection {
    /// Positions selected for query row `t`.
    pub fn of(&self, t: usize) -> &[u32] {
        &self.positions[self.offsets[t]..self.offsets[t + 1]]
    }

    pub fn num_tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Every causally visible position of every row (what a query keeps while it sees at
    /// most `index_topk` tokens), for the rows `seqs` covers; rows outside them select nothing.
    pub fn all_visible(seqs: &[PagedSeq], num_tokens: usize) -> Self {
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); num_tokens];
        for seq in seqs {
            let offset = seq.context_len - seq.query_len;
            for i in 0..seq.query_len {
                rows[seq.query_start + i] = (0..(offset + i + 1) as u32).collect();
            }
        }
        Self::from_rows(rows)
    }

    /// A selection from each row's positions (ascending, within the row's causal range).
    pub fn from_rows(rows: Vec<Vec<u32>>) -> Self {
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0);
        let mut positions = Vec::new();
        for r in rows {
            positions.extend_from_slice(&r);
            offsets.push(positions.len());
        }
        TokenSelection { offsets, positions }
    }
}

/// The `k` highest-scoring positions of `scores` (ties: the earlier position), ascending.
fn top_positions(scores: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    if k < order.len() {
        let better = |a: &u32, b: &u32| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then_with(|| a.cmp(b))
        };
        order.select_nth_unstable_by(k, better);
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// The lightning indexer's choice of positions for every query row.
///
/// * `q`: `[num_tokens, index_heads, index_dim]`: the indexer queries, rotated.
/// * `weights`: `[num_tokens, index_heads]` f32: `weights_proj(x) * index_heads^-1/2`.
/// * `key_cache`: `[num_blocks, block_size, index_dim]`: the indexer keys, this step's
///   already written.
/// * `topk`: positions kept per query (`index_topk`); `scale`: `index_dim^-1/2`.
///
/// Score of query `t` for position `s <= pos(t)`: `sum_h weights[t, h] * relu(q[t, h] .
/// k[s]) * scale`. A query that sees at most `topk` positions keeps all of them (scores are
/// not computed); otherwise the `topk` highest, ties going to the earlier position. Its own
/// position is not forced in.
pub fn indexer_topk(
    q: &Tensor,
    weights: &Tensor,
    key_cache: &Tensor,
    seqs: &[PagedSeq],
    topk: usize,
    scale: f64,
) -> Result<TokenSelection> {
    let (num_tokens, heads, dim) = q.dims3()?;
    let (num_blocks, block_size, cache_dim) = key_cache.dims3()?;
    if cache_dim != dim || weights.dims() != [num_tokens, heads] {
        bail!(
            "indexer_topk: q {:?}, weights {:?}, key cache {:?}",
            q.dims(),
            weights.dims(),
            key_cache.dims()
        );
    }
    if topk == 0 {
        bail!("indexer_topk: index_topk must be positive");
    }
    let device = q.device();
    let keys_flat = key_cache.reshape((num_blocks * block_size, dim))?;
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); num_tokens];
    let mut covered = 0usize;
    for seq in seqs {
        if seq.query_len == 0 {
            continue;
        }
        check_seq("indexer_topk", seq, covered, num_tokens, num_blocks, block_size)?;
        covered += seq.query_len;
        let offset = seq.context_len - seq.query_len;
        // Rows that see at most `topk` positions keep them all.
        let first_scored = topk.saturating_sub(offset).min(seq.query_len);
        for i in 0..first_scored {
            rows[seq.query_start + i] = (0..(offset + i + 1) as u32).collect();
        }
        if first_scored == seq.query_len {
            continue;
        }
        let keys = keys_flat
            .index_select(&seq.slots(block_size, device)?, 0)?
            .to_dtype(DType::F32)?; // [L, D]
        let keys_t = keys.t()?.contiguous()?;
        let mut start = first_scored;
        while start < seq.query_len {
            let n = SCORE_ROWS.min(seq.query_len - start);
            let row0 = seq.query_start + start;
            let q_rows = q.narrow(0, row0, n)?.to_dtype(DType::F32)?.reshape((n * heads, dim))?;
            let per_head = (q_rows.matmul(&keys_t)? * scale)?.relu()?; // [n*H, L]
            let per_head = per_head.reshape((n, heads, seq.context_len))?;
            let w = weights.narrow(0, row0, n)?.to_dtype(DType::F32)?.unsqueeze(2)?;
            let scores = per_head.broadcast_mul(&w)?.sum(1)?; // [n, L]
            let scores = scores.to_vec2::<f32>()?;
            let chosen: Vec<Vec<u32>> = scores
                .par_iter()
                .enumerate()
                .map(|(j, s)| top_positions(&s[..offset + start + j + 1], topk))
                .collect();
            for (j, c) in chosen.into_iter().enumerate() {
                rows[row0 + j] = c;
            }
            start += n;
        }
    }
    Ok(TokenSelection::from_rows(rows))
}

/// `a . b` in eight running sums (so the compiler can keep them in one SIMD register).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Absorbed MLA of each query row over its selected positions only.
///
/// * `q`: `[num_tokens, num_heads, latent_dim]`, as [`crate::paged_mla_attention`] takes it.
/// * `cache`: `[num_blocks, block_size, latent_dim]`; values are the first `value_dim`
///   columns of a row.
/// * `selection`: per query row, the positions of its sequence it attends to (each within
///   the row's causal range).
///
/// Returns `[num_tokens, num_heads, value_dim]` f32; rows not covered by `seqs` stay zero.
pub fn sparse_mla_attention(
    q: &Tensor,
    cache: &Tensor,
    seqs: &[PagedSeq],
    selection: &TokenSelection,
    value_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    let (num_tokens, heads, latent_dim) = q.dims3()?;
    let (num_blocks, block_size, cache_dim) = cache.dims3()?;
    if cache_dim != latent_dim || value_dim > latent_dim {
        bail!("sparse_mla_attention: q dim {latent_dim}, cache dim {cache_dim}, value dim {value_dim}");
    }
    if selection.num_tokens() != num_tokens {
        bail!(
            "sparse_mla_attention: a selection of {} rows for {num_tokens} query rows",
            selection.num_tokens()
        );
    }
    let device = q.device();
    let rows_flat = cache.reshape((num_blocks * block_size, latent_dim))?;
    let q_host = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; num_tokens * heads * value_dim];
    let mut covered = 0usize;
    for seq in seqs {
        if seq.query_len == 0 {
            continue;
        }
        check_seq("sparse_mla_attention", seq, covered, num_tokens, num_blocks, block_size)?;
        covered += seq.query_len;
        let offset = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            let visible = offset + i + 1;
            if let Some(&bad) = selection
                .of(seq.query_start + i)
                .iter()
                .find(|&&p| p as usize >= visible)
            {
                bail!(
                    "sparse_mla_attention: row {} selects position {bad}, past its own",
                    seq.query_start + i
                );
            }
        }
        // Gather only the rows some query of this sequence selected (a decode row reads
        // index_topk rows, not its whole context); `compact[p]` is position p's gathered row.
        let mut compact = vec![u32::MAX; seq.context_len];
        let mut slots = Vec::new();
        for i in 0..seq.query_len {
            for &p in selection.of(seq.query_start + i) {
                if compact[p as usize] == u32::MAX {
                    compact[p as usize] = slots.len() as u32;
                    slots.push(seq.slot(p as usize, block_size) as u32);
                }
            }
        }
        let gathered = slots.len();
        let rows = rows_flat
            .index_select(&Tensor::from_vec(slots, gathered, device)?, 0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?; // [gathered * latent_dim]
                                // One (row, head) pair per task: decode rows still spread over the heads.
        let span = seq.query_start * heads * value_dim..(seq.query_start + seq.query_len) * heads * value_dim;
        out[span].par_chunks_mut(value_dim).enumerate().for_each(|(i, o)| {
            let (t, h) = (seq.query_start + i / heads, i % heads);
            let chosen = selection.of(t);
            let qh = &q_host[(t * heads + h) * latent_dim..][..latent_dim];
            let row = |p: u32| &rows[compact[p as usize] as usize * latent_dim..][..latent_dim];
            let scores: Vec<f32> = chosen.iter().map(|&p| dot(qh, row(p)) * scale as f32).collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = exps.iter().sum();
            for (e, &p) in exps.iter().zip(chosen) {
                let w = e / total;
                for (acc, v) in o.iter_mut().zip(&row(p)[..value_dim]) {
                    *acc += w * v;
                }
            }
        });
    }
    Tensor::from_vec(out, (num_tokens, heads, value_dim), device)
}

#[cfg(test)]
#[path = "sparse_tests.rs"]
mod tests;
