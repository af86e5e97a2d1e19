//! A batched generation loop over the paged latent cache: every prompt is prefilled (in
//! chunks of at most `prefill_chunk` tokens per step) and decoded in lockstep with the others.
//! Blocks are handed out per sequence from one cache. This is what `moe logits` and
//! `moe generate` run; the continuous-batching scheduler replaces the lockstep later.

use candle_core::{Tensor, D};
use moe_models::{DeepseekModel, LatentCache, RoutingTrace};

use crate::batch::{BatchBuilder, SeqChunk};
use crate::error::{EngineError, Result};
use crate::sampling::{Sampler, SamplingParams};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_tokens`.
    Length,
    /// Produced a stop (EOS) token.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation (included in the output).
    pub stop_ids: Vec<u32>,
}

/// Runs batches of sequences through a model with a paged latent cache.
pub struct Generator<'m> {
    model: &'m DeepseekModel,
    block_size: usize,
    /// Tokens per sequence per step during prefill.
    prefill_chunk: usize,
    /// Hand out blocks from the top of the cache down, so tables are never the identity map.
    pub scramble_blocks: bool,
}

struct Active {
    tokens: Vec<u32>,
    computed: usize,
    prompt_len: usize,
    blocks: Vec<u32>,
    sampler: Sampler,
    done: Option<FinishReason>,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m DeepseekModel, block_size: usize, prefill_chunk: usize) -> Result<Self> {
        if block_size == 0 || prefill_chunk == 0 {
            return Err(EngineError::InvalidRequest(
                "block size and prefill chunk must be positive".into(),
            ));
        }
        Ok(Generator {
            model,
            block_size,
            prefill_chunk,
            scramble_blocks: true,
        })
    }

    /// Checks ids and, for generation (`extra` = max tokens, `Some`), that the whole sequence
    /// fits the model's `max_position_embeddings`. Scoring a prompt (`None`) is not capped,
    /// as in transformers: RoPE extends past the trained length.
    fn check_prompt(&self, prompt: &[u32], extra: Option<usize>) -> Result<()> {
        let cfg = self.model.config();
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let Some(extra) = extra else { return Ok(()) };
        if prompt.len() + extra > cfg.max_position_embeddings {
            return Err(EngineError::InvalidRequest(format!(
                "prompt ({}) + max tokens ({extra}) exceeds the model's max_position_embeddings ({})",
                prompt.len(),
                cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// A cache with room for sequences of the given total lengths, and their block tables.
    fn allocate(&self, lengths: &[usize]) -> Result<(LatentCache, Vec<Vec<u32>>)> {
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
            self.check_prompt(p, None)?;
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
                let end = done[i].saturating_add(self.prefill_chunk).min(p.len());
                batch.push(&SeqChunk {
                    tokens: p[done[i]..end].to_vec(),
                    start_pos: done[i],
                    block_table: tables[i].clone(),
                    all_logits: true,
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

    /// Generates for every request together; outputs in request order.
    pub fn generate(&self, requests: &[GenerateRequest], trace: Option<&RoutingTrace>) -> Result<Vec<Generation>> {
        for r in requests {
            self.check_prompt(&r.prompt, Some(r.max_tokens))?;
        }
        let lengths: Vec<usize> = requests.iter().map(|r| r.prompt.len() + r.max_tokens).collect();
        let (cache, tables) = self.allocate(&lengths)?;
        let mut active = requests
            .iter()
            .zip(tables)
            .map(|(r, blocks)| {
                Ok(Active {
                    tokens: r.prompt.clone(),
                    computed: 0,
                    prompt_len: r.prompt.len(),
                    blocks,
                    sampler: Sampler::new(r.sampling.clone())?,
                    done: (r.max_tokens == 0).then_some(FinishReason::Length),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        loop {
            let mut batch = BatchBuilder::new(self.block_size);
            let mut members = Vec::new();
            for (i, a) in active.iter().enumerate() {
                if a.done.is_some() {
                    continue;
                }
                let end = a.computed.saturating_add(self.prefill_chunk).min(a.tokens.len());
                batch.push(&SeqChunk {
                    tokens: a.tokens[a.computed..end].to_vec(),
                    start_pos: a.computed,
                    block_table: a.blocks.clone(),
                    all_logits: false,
                })?;
                members.push((i, end));
            }
            if batch.is_empty() {
                break;
            }
            let t = batch.tensors(self.model.device())?;
            let logits = self.model.forward(&t.ctx(trace), &cache)?;
            for ((i, end), range) in members.into_iter().zip(&t.logits_ranges) {
                let a = &mut active[i];
                a.computed = end;
                if end < a.tokens.len() {
                    continue; // mid-prompt chunk: nothing to sample yet
                }
                let row = logits.narrow(0, range.start, 1)?.squeeze(0)?.to_vec1::<f32>()?;
                let token = a.sampler.sample(&row);
                a.tokens.push(token);
                let generated = a.tokens.len() - a.prompt_len;
                if requests[i].stop_ids.contains(&token) {
                    a.done = Some(FinishReason::Stop);
                } else if generated >= requests[i].max_tokens {
                    a.done = Some(FinishReason::Length);
                }
            }
        }
        Ok(active
            .into_iter()
            .map(|a| Generation {
                token_ids: a.tokens[a.prompt_len..].to_vec(),
                finish_reason: a.done.unwrap_or(FinishReason::Length),
            })
            .collect())
    }
}

/// Convenience: logits at every position of one prompt (`[len, vocab]`).
pub fn all_position_logits(model: &DeepseekModel, prompt: &[u32]) -> Result<Tensor> {
    let g = Generator::new(model, 16, usize::MAX)?;
    let mut out = g.prompt_logits(&[prompt.to_vec()], None)?;
    Ok(out.remove(0))
}

/// Greedy argmax of each row of `[rows, vocab]` logits.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
