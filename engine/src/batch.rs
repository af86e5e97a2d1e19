//! Flattening per-sequence work into the batch tensors a forward pass takes (token ids,
//! positions, slot mapping, block tables, logits rows). No model math here.

use candle_core::{Device, Tensor};
use moe_models::{ForwardCtx, PagedBatch, PagedSeq, RoutingTrace};

use crate::error::{EngineError, Result};

/// One sequence's tokens for this step.
#[derive(Debug, Clone)]
pub struct SeqChunk {
    /// The tokens computed this step (a prompt chunk, or one decode token).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]` (= tokens of this sequence already in the cache).
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + tokens.len()`.
    pub block_table: Vec<u32>,
    /// Which of the chunk's rows get logits.
    pub logits: LogitRows,
}

/// Rows of a chunk whose logits the step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// None (a prompt chunk that is not the last one).
    None,
    /// The last token's row (for sampling).
    Last,
    /// Every row (for scoring a prompt).
    All,
}

/// Host-side batch description, turned into device tensors by [`BatchBuilder::tensors`].
#[derive(Debug, Default, Clone)]
pub struct BatchBuilder {
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    slot_mapping: Vec<u32>,
    seqs: Vec<PagedSeq>,
    logits_rows: Vec<u32>,
    block_size: usize,
}

/// Device tensors of one step; borrow them into a [`ForwardCtx`] with [`BatchTensors::ctx`].
pub struct BatchTensors {
    pub token_ids: Tensor,
    /// `token_ids` on the host (the forward reads them there without a device round trip).
    pub host_token_ids: Vec<u32>,
    pub positions: Tensor,
    pub slot_mapping: Tensor,
    pub logits_rows: Tensor,
    pub seqs: PagedBatch,
    /// For each sequence, the range of its rows in the logits output.
    pub logits_ranges: Vec<std::ops::Range<usize>>,
}

impl BatchBuilder {
    pub fn new(block_size: usize) -> Self {
        BatchBuilder {
            block_size,
            ..Default::default()
        }
    }

    /// Appends one sequence's chunk; returns its index in the batch.
    pub fn push(&mut self, chunk: &SeqChunk) -> Result<usize> {
        if chunk.tokens.is_empty() {
            return Err(EngineError::InvalidRequest(
                "a batch chunk needs at least one token".into(),
            ));
        }
        let context_len = chunk.start_pos + chunk.tokens.len();
        if chunk.block_table.len() * self.block_size < context_len {
            return Err(EngineError::InvalidRequest(format!(
                "{} blocks of {} cannot hold {context_len} tokens",
                chunk.block_table.len(),
                self.block_size
            )));
        }
        let seq = PagedSeq {
            query_start: self.token_ids.len(),
            query_len: chunk.tokens.len(),
            context_len,
            block_table: chunk.block_table.clone(),
        };
        for (i, &t) in chunk.tokens.iter().enumerate() {
            let pos = chunk.start_pos + i;
            self.token_ids.push(t);
            self.positions.push(pos as u32);
            self.slot_mapping.push(seq.slot(pos, self.block_size) as u32);
        }
        let last = (seq.query_start + seq.query_len - 1) as u32;
        match chunk.logits {
            LogitRows::None => {}
            LogitRows::Last => self.logits_rows.push(last),
            LogitRows::All => self.logits_rows.extend(seq.query_start as u32..=last),
        }
        self.seqs.push(seq);
        Ok(self.seqs.len() - 1)
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn tensors(&self, device: &Device) -> Result<BatchTensors> {
        let n = self.token_ids.len();
        let mut logits_ranges = Vec::with_capacity(self.seqs.len());
        let mut row = 0;
        for seq in &self.seqs {
            let first = seq.query_start as u32;
            let last = first + seq.query_len as u32;
            let count = self.logits_rows[row..]
                .iter()
                .take_while(|&&r| r >= first && r < last)
                .count();
            logits_ranges.push(row..row + count);
            row += count;
        }
        Ok(BatchTensors {
            token_ids: Tensor::from_vec(self.token_ids.clone(), n, device)?,
            host_token_ids: self.token_ids.clone(),
            positions: Tensor::from_vec(self.positions.clone(), n, device)?,
            slot_mapping: Tensor::from_vec(self.slot_mapping.clone(), n, device)?,
            logits_rows: Tensor::from_vec(self.logits_rows.clone(), self.logits_rows.len(), device)?,
            seqs: PagedBatch::new(self.seqs.clone()),
            logits_ranges,
        })
    }
}

impl BatchTensors {
    pub fn ctx<'a>(&'a self, trace: Option<&'a RoutingTrace>) -> ForwardCtx<'a> {
        ForwardCtx {
            token_ids: &self.token_ids,
            host_token_ids: Some(&self.host_token_ids),
            positions: &self.positions,
            slot_mapping: &self.slot_mapping,
            seqs: &self.seqs,
            logits_rows: Some(&self.logits_rows),
            routing_trace: trace,
        }
    }
}
