//! What every paged-cache op shares: a sequence's share of a flat query batch
//! ([`PagedSeq`]), its validation against a cache, the causal mask and softmax of the
//! reference attentions, the slot scatter the cache writes use, and a step's batch as the
//! device attention kernels read it ([`PagedBatch`], [`DeviceRows`]: uploaded once a step,
//! read by every layer). It knows nothing about what a cache row holds (latents in
//! [`crate::mla`], per-head K/V in [`crate::gqa`]).

use std::ops::Deref;
use std::sync::OnceLock;

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

/// A step's sequences, and (built on first use by a device kernel, then shared by every
/// layer of the step) their [`DeviceRows`] on that device. Dereferences to the sequences.
#[derive(Debug, Default)]
pub struct PagedBatch {
    seqs: Vec<PagedSeq>,
    device_rows: OnceLock<DeviceRows>,
}

impl PagedBatch {
    pub fn new(seqs: Vec<PagedSeq>) -> Self {
        PagedBatch {
            seqs,
            device_rows: OnceLock::new(),
        }
    }

    /// The per-row tables of this batch on `device` for `num_rows` query rows: uploaded on
    /// the first call, the same tensors afterwards (a call for another device or row count
    /// gets a fresh upload, not cached).
    pub fn device_rows(&self, num_rows: usize, device: &Device) -> Result<DeviceRowsRef<'_>> {
        let cached = match self.device_rows.get() {
            Some(rows) => rows,
            None => {
                let rows = DeviceRows::new(&self.seqs, num_rows, device)?;
                // Another thread may fill the cache first: its rows are checked below too.
                self.device_rows.get_or_init(|| rows)
            }
        };
        if cached.num_rows == num_rows && cached.row_seq.device().same_device(device) {
            return Ok(DeviceRowsRef::Cached(cached));
        }
        Ok(DeviceRowsRef::Fresh(Box::new(DeviceRows::new(
            &self.seqs, num_rows, device,
        )?)))
    }
}

impl Clone for PagedBatch {
    /// Clones the sequences; device tables are built again when needed.
    fn clone(&self) -> Self {
        PagedBatch::new(self.seqs.clone())
    }
}

impl From<Vec<PagedSeq>> for PagedBatch {
    fn from(seqs: Vec<PagedSeq>) -> Self {
        PagedBatch::new(seqs)
    }
}

impl Deref for PagedBatch {
    type Target = [PagedSeq];
    fn deref(&self) -> &[PagedSeq] {
        &self.seqs
    }
}

/// [`PagedBatch::device_rows`]' answer: the batch's cached tables, or a one-off upload.
pub enum DeviceRowsRef<'a> {
    Cached(&'a DeviceRows),
    Fresh(Box<DeviceRows>),
}

impl Deref for DeviceRowsRef<'_> {
    type Target = DeviceRows;
    fn deref(&self) -> &DeviceRows {
        match self {
            DeviceRowsRef::Cached(r) => r,
            DeviceRowsRef::Fresh(r) => r,
        }
    }
}

/// A flat batch of query rows as the device attention kernels read it: every row (a decode
/// token or a token of a prompt chunk, in any mix) attends over its own prefix of its
/// sequence's blocks, so one launch covers a mixed step.
#[derive(Debug)]
pub struct DeviceRows {
    /// `[num_seqs, max_blocks]` u32: each sequence's block table, padded with block 0 (never
    /// read: a row sees at most its sequence's context).
    pub block_tables: Tensor,
    /// `[num_rows]` u32: the row of `block_tables` each query row reads.
    pub row_seq: Tensor,
    /// `[num_rows]` u32: how many positions each query row sees (causal: `context_len -
    /// query_len + i + 1` for a sequence's `i`-th row; 0 for rows no sequence covers, which
    /// get a zero output).
    pub visible: Tensor,
    /// The largest entry of `visible`.
    pub max_visible: usize,
    pub num_rows: usize,
}

impl DeviceRows {
    /// The tables of `seqs` (which tile rows `0..num_rows` in order, as the attention ops
    /// require; rows past them see nothing), on `device`.
    pub fn new(seqs: &[PagedSeq], num_rows: usize, device: &Device) -> Result<Self> {
        let (row_seq, visible) = row_tables(seqs, num_rows)?;
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
        let mut tables = vec![0u32; seqs.len().max(1) * max_blocks];
        for (row, seq) in tables.chunks_mut(max_blocks).zip(seqs) {
            row[..seq.block_table.len()].copy_from_slice(&seq.block_table);
        }
        let max_visible = visible.iter().copied().max().unwrap_or(0) as usize;
        Ok(DeviceRows {
            block_tables: Tensor::from_vec(tables, (seqs.len().max(1), max_blocks), device)?,
            row_seq: Tensor::from_vec(row_seq, num_rows, device)?,
            visible: Tensor::from_vec(visible, num_rows, device)?,
            max_visible,
            num_rows,
        })
    }
}

/// Per query row: the index of its sequence in `seqs` and how many positions it sees (see
/// [`DeviceRows`]). An error if the sequences overrun `num_rows` or a context is shorter
/// than its queries.
pub fn row_tables(seqs: &[PagedSeq], num_rows: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut row_seq = vec![0u32; num_rows];
    let mut visible = vec![0u32; num_rows];
    for (s, seq) in seqs.iter().enumerate() {
        let end = seq.query_start + seq.query_len;
        if end > num_rows || seq.context_len < seq.query_len {
            bail!("row_tables: bad sequence {seq:?} for {num_rows} query rows");
        }
        let first = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            row_seq[seq.query_start + i] = s as u32;
            visible[seq.query_start + i] = (first + i + 1) as u32;
        }
    }
    Ok((row_seq, visible))
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
/// Nothing is written unless every check passes. On a GPU (bf16 or f32 cache) the CUDA
/// scatter kernel writes, and a slot past the cache is skipped by the kernel instead of
/// checked here (that check would copy the slots to the host every layer).
pub(crate) fn write_cache_rows(op: &str, cache: &Tensor, rows: &Tensor, slot_mapping: &Tensor) -> Result<()> {
    let (num_blocks, block_size, dim) = cache.dims3()?;
    let (num_tokens, row_dim) = rows.dims2()?;
    if row_dim != dim {
        bail!("{op}: rows of {row_dim} values for cache rows of {dim}");
    }
    #[cfg(feature = "cuda")]
    if cache.device().is_cuda()
        && matches!(cache.dtype(), DType::BF16 | DType::F32)
        && cache.is_contiguous()
        && slot_mapping.dtype() == DType::U32
    {
        if slot_mapping.dims1()? != num_tokens {
            bail!("{op}: {num_tokens} rows but {} slots", slot_mapping.dims1()?);
        }
        let rows = rows.to_dtype(cache.dtype())?;
        let rows = if rows.stride()[1] == 1 {
            rows
        } else {
            rows.contiguous()?
        };
        let part = crate::cuda::RowPart {
            src: &rows,
            row_stride: rows.stride()[0],
            width: dim,
        };
        return crate::cuda::scatter_rows(op, cache, &[part], &slot_mapping.contiguous()?);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(query_start: usize, query_len: usize, context_len: usize, block_table: Vec<u32>) -> PagedSeq {
        PagedSeq {
            query_start,
            query_len,
            context_len,
            block_table,
        }
    }

    /// A decode token, a prompt chunk after a cached prefix, a whole prompt; 2 rows uncovered.
    fn mixed() -> Vec<PagedSeq> {
        vec![
            seq(0, 1, 9, vec![4, 2, 7]),
            seq(1, 5, 12, vec![1, 3, 0]),
            seq(6, 3, 3, vec![5]),
        ]
    }

    #[test]
    fn row_tables_follow_the_reference_causal_mask() -> Result<()> {
        let seqs = mixed();
        let (row_seq, visible) = row_tables(&seqs, 11)?;
        for (s, sq) in seqs.iter().enumerate() {
            // The reference's mask: a row sees the positions whose bias is finite.
            let bias = causal_bias(sq, 0, sq.query_len, &Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (i, row) in bias.chunks(sq.context_len).enumerate() {
                let seen = row.iter().filter(|b| b.is_finite()).count();
                assert_eq!(visible[sq.query_start + i] as usize, seen, "seq {s} row {i}");
                assert_eq!(row_seq[sq.query_start + i] as usize, s);
            }
        }
        assert_eq!(&visible[9..], &[0, 0], "uncovered rows see nothing");
        // Sequences past the rows, or contexts shorter than their queries, are errors.
        assert!(row_tables(&seqs, 8).is_err());
        assert!(row_tables(&[seq(0, 4, 3, vec![0])], 4).is_err());
        Ok(())
    }

    #[test]
    fn device_rows_pad_tables_and_are_uploaded_once_a_step() -> Result<()> {
        let batch = PagedBatch::new(mixed());
        let rows = batch.device_rows(11, &Device::Cpu)?;
        assert!(matches!(rows, DeviceRowsRef::Cached(_)));
        assert_eq!(
            rows.block_tables.to_vec2::<u32>()?,
            vec![vec![4, 2, 7], vec![1, 3, 0], vec![5, 0, 0]]
        );
        assert_eq!(rows.max_visible, 12);
        assert_eq!(rows.visible.dims1()?, 11);
        // Later layers get the same upload; another row count gets its own.
        let again = batch.device_rows(11, &Device::Cpu)?;
        assert!(std::ptr::eq(&*rows, &*again));
        assert!(matches!(batch.device_rows(12, &Device::Cpu)?, DeviceRowsRef::Fresh(_)));
        // A batch of no sequences still has a (1 x 1) table.
        let none = PagedBatch::default();
        let empty = none.device_rows(2, &Device::Cpu)?;
        assert_eq!(empty.block_tables.dims(), &[1, 1]);
        assert_eq!(empty.visible.to_vec1::<u32>()?, vec![0, 0]);
        Ok(())
    }
}
