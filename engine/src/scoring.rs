//! Prompt scoring: logits at every position of one or more prompts, computed together
//! through the paged KV cache in chunks of at most `chunk` tokens per prompt and step.
//! This is what `moe logits` runs and what the transformers goldens are checked through.

use candle_core::Tensor;
use moe_models::{CausalLm, KvCache, RoutingTrace};

use crate::batch::{BatchBuilder, LogitRows, SeqChunk};
use crate::error::{EngineError, Result};

/// Scores prompts through the batched, paged path.
pub struct PromptScorer<'m> {
    model: &'m dyn CausalLm,
    block_size: usize,
    /// Tokens per prompt per step.
    chunk: usize,
    /// Hand out blocks from the top of the cache down, so tables are never the identity map.
    pub scramble_blocks: bool,
}

impl<'m> PromptScorer<'m> {
    pub fn new(model: &'m dyn CausalLm, block_size: usize, chunk: usize) -> Result<Self> {
        if block_size == 0 || chunk == 0 {
            return Err(EngineError::InvalidRequest(
                "block size and chunk must be positive".into(),
            ));
        }
        Ok(PromptScorer {
            model,
            block_size,
            chunk,
            scramble_blocks: true,
        })
    }

    /// Checks the ids. Scoring is not capped at `max_position_embeddings`, as in
    /// transformers: RoPE extends past the trained length.
    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// A cache with room for sequences of the given lengths, and their block tables.
    fn allocate(&self, lengths: &[usize]) -> Result<(KvCache, Vec<Vec<u32>>)> {
        let per_seq: Vec<usize> = lengths.iter().map(|l| l.div_ceil(self.block_size).max(1)).collect();
        let total: usize = per_seq.iter().sum();
        let cache = self.model.new_cache(total, self.block_size)?;
        let mut next = 0u32;
        let tables = per_seq
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        let b = if self.scramble_blocks {
                            total as u32 - 1 - next
                        } else {
                            next
                        };
                        next += 1;
                        b
                    })
                    .collect()
            })
            .collect();
        Ok((cache, tables))
    }

    /// f32 logits `[len, vocab]` at every position of every prompt, computed together.
    pub fn prompt_logits(&self, prompts: &[Vec<u32>], trace: Option<&RoutingTrace>) -> Result<Vec<Tensor>> {
        for p in prompts {
            self.check_prompt(p)?;
        }
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let (cache, tables) = self.allocate(&lengths)?;
        let mut done = vec![0usize; prompts.len()];
        let mut pieces: Vec<Vec<Tensor>> = vec![Vec::new(); prompts.len()];
        while done.iter().zip(prompts).any(|(d, p)| *d < p.len()) {
            let mut batch = BatchBuilder::new(self.block_size);
            let mut members = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                if done[i] == p.len() {
                    continue;
                }
                let end = done[i].saturating_add(self.chunk).min(p.len());
                batch.push(&SeqChunk {
                    tokens: p[done[i]..end].to_vec(),
                    start_pos: done[i],
                    block_table: tables[i].clone(),
                    logits: LogitRows::All,
                })?;
                members.push((i, end));
            }
            let t = batch.tensors(self.model.device())?;
            let logits = self.model.forward(&t.ctx(trace), &cache)?;
            for ((i, end), range) in members.into_iter().zip(&t.logits_ranges) {
                pieces[i].push(logits.narrow(0, range.start, range.len())?);
                done[i] = end;
            }
        }
        pieces.into_iter().map(|p| Ok(Tensor::cat(&p, 0)?)).collect()
    }
}

/// Logits at every position of one prompt (`[len, vocab]`).
pub fn all_position_logits(model: &dyn CausalLm, prompt: &[u32]) -> Result<Tensor> {
    let scorer = PromptScorer::new(model, 16, usize::MAX)?;
    let mut out = scorer.prompt_logits(&[prompt.to_vec()], None)?;
    Ok(out.remove(0))
}

/// Greedy argmax of each row of `[rows, vocab]` logits (the sampler's rule: lowest index on
/// ties, NaN never chosen), on the logits' device.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(moe_kernels::sampling::argmax_rows(logits)?)
}
