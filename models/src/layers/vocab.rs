//! The token embedding and the output projection (lm_head), split over the ranks by
//! vocabulary rows under tensor parallelism: rank `r` holds rows `r * part..(r + 1) * part`
//! (`part = ceil(vocab / ranks)`; the last rank's may be short). A token's embedding comes
//! from the rank that holds it (the others add zeros: one all-reduce, exact), and each rank's
//! logits for its rows are gathered into the full vocabulary.

use std::ops::Range;

use candle_core::{Module, Tensor};
use moe_kernels::dense::Weight;

use super::linear::Linear;
use crate::error::Result;
use crate::loader::Weights;
use crate::parallel::Shard;

/// This rank's rows of a `vocab`-row table.
fn vocab_rows(shard: &Shard, vocab: usize) -> (Range<usize>, usize) {
    let part = vocab.div_ceil(shard.size());
    let start = (shard.rank() * part).min(vocab);
    (start..(start + part).min(vocab), part)
}

#[derive(Debug, Clone)]
pub struct VocabEmbedding {
    /// `[rows held, hidden]`, plus one zero row on a split vocabulary (for ids held elsewhere).
    table: Tensor,
    rows: Range<usize>,
    shard: Shard,
}

impl VocabEmbedding {
    /// This rank's rows of `name` (`[vocab, hidden]`).
    pub fn load(w: &Weights, name: &str, vocab: usize, hidden: usize, shard: &Shard) -> Result<Self> {
        let (rows, _) = vocab_rows(shard, vocab);
        let mut table = w.get_part(name, &[vocab, hidden], &[rows.clone(), 0..hidden])?;
        if !shard.is_single() {
            let zero = Tensor::zeros((1, hidden), table.dtype(), table.device())?;
            table = Tensor::cat(&[&table, &zero], 0)?;
        }
        Ok(VocabEmbedding {
            table,
            rows,
            shard: shard.clone(),
        })
    }

    /// This rank's rows, as the weight of a tied lm_head: `[rows held, hidden]`.
    pub fn rows_held(&self) -> Result<Tensor> {
        Ok(self.table.narrow(0, 0, self.rows.len())?)
    }

    /// `ids`: `[tokens]` u32 (`host_ids` the same on the host) -> `[tokens, hidden]`.
    pub fn forward(&self, ids: &Tensor, host_ids: &[u32]) -> Result<Tensor> {
        if self.shard.is_single() {
            return Ok(self.table.index_select(ids, 0)?);
        }
        let zero_row = self.rows.len() as u32;
        let local: Vec<u32> = host_ids
            .iter()
            .map(|&t| {
                let t = t as usize;
                if self.rows.contains(&t) {
                    (t - self.rows.start) as u32
                } else {
                    zero_row
                }
            })
            .collect();
        let local = Tensor::from_vec(local, host_ids.len(), self.table.device())?;
        self.shard.all_reduce(&self.table.index_select(&local, 0)?)
    }
}

#[derive(Debug, Clone)]
pub struct VocabHead {
    /// `[rows held, hidden]`.
    proj: Linear,
    vocab: usize,
    /// Rows per rank (the padded part).
    part: usize,
    shard: Shard,
}

impl VocabHead {
    /// This rank's rows of the projection `prefix` (`[vocab, hidden]`).
    pub fn load(w: &Weights, prefix: &str, vocab: usize, hidden: usize, shard: &Shard) -> Result<Self> {
        let (rows, part) = vocab_rows(shard, vocab);
        Ok(VocabHead {
            proj: Linear::load_rows(w, prefix, hidden, vocab, false, rows)?,
            vocab,
            part,
            shard: shard.clone(),
        })
    }

    /// The lm_head tied to `embedding`'s rows.
    pub fn tied(embedding: &VocabEmbedding, vocab: usize, shard: &Shard) -> Result<Self> {
        Ok(VocabHead {
            proj: Linear {
                weight: Weight::Dense(embedding.rows_held()?),
                bias: None,
            },
            vocab,
            part: vocab.div_ceil(shard.size()),
            shard: shard.clone(),
        })
    }

    /// `x`: `[rows, hidden]` -> logits `[rows, vocab]` (every rank gets all of them).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let local = self.proj.forward(x)?; // [rows, held]
        if self.shard.is_single() {
            return Ok(local);
        }
        let (rows, held) = local.dims2()?;
        let local = if held < self.part {
            let pad = Tensor::zeros((rows, self.part - held), local.dtype(), local.device())?;
            Tensor::cat(&[&local, &pad], 1)?
        } else {
            local
        };
        // [ranks * rows, part] -> [rows, ranks * part]: rank r's columns after rank r-1's.
        let ranks = self.shard.size();
        let all = self.shard.comm().all_gather(&local.contiguous()?)?;
        let all = all
            .reshape((ranks, rows, self.part))?
            .transpose(0, 1)?
            .reshape((rows, ranks * self.part))?;
        Ok(all.narrow(1, 0, self.vocab)?)
    }
}
