//! The model runner: owns the model (any family, through [`CausalLm`]) and its paged KV
//! cache, turns a scheduler step into batch tensors, runs the forward pass and hands back the
//! logits rows to sample from (or, for greedy requests, their tokens picked on the logits'
//! device). It makes no scheduling decisions and keeps no per-request state.

use std::collections::HashSet;

use candle_core::{DType, Tensor};
use moe_models::{CausalLm, KvCache, KvCacheSpec, Model, RoutingTrace};

use crate::batch::{BatchBuilder, LogitRows, SeqChunk};
use crate::error::{EngineError, Result};
use crate::memory::ProfileChunk;
use crate::scheduler::{RequestId, SchedulerOutput};

/// Default tokens per KV block. A DeepSeek token is 576 latent values per layer (a Qwen3-30B
/// one 1024 K/V values), so a 16-token block is ~18 KiB (~32 KiB) per layer in bf16: small enough that the half-empty last block
/// of each sequence wastes little (8 tokens on average) and prefix sharing stays fine-grained,
/// large enough that block tables stay short (a 128k context is 8k entries).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

pub struct ModelRunner {
    model: Model,
    cache: KvCache,
}

/// A sampling request's share of a step's output.
#[derive(Debug, Clone, PartialEq)]
pub enum StepRow {
    /// Its logits row (`[vocab]` f32), for the host sampler.
    Logits(Vec<f32>),
    /// The greedy token, chosen on the logits' device.
    Greedy(u32),
}

impl ModelRunner {
    /// Allocates `num_blocks` cache blocks of `block_size` tokens for `model`.
    /// Waits for the device first: the weights' uploads (queued by the loading thread, maybe
    /// on other streams) and the cache's allocation are done before the engine thread runs a
    /// step, and a device that failed while loading is an error here.
    pub fn new(model: Model, num_blocks: usize, block_size: usize) -> Result<Self> {
        let cache = model.new_cache(num_blocks, block_size)?;
        model.check_device()?;
        Ok(ModelRunner { model, cache })
    }

    /// Blocks of `block_size` tokens that fit in `bytes` of cache memory (`--kv-cache-memory`)
    /// for a cache of `spec` over `num_layers` layers in `dtype`.
    pub fn blocks_for_memory(
        spec: &KvCacheSpec,
        num_layers: usize,
        dtype: DType,
        bytes: usize,
        block_size: usize,
    ) -> usize {
        let per_token = spec.bytes_per_token(num_layers, dtype);
        bytes / per_token.saturating_mul(block_size).max(1)
    }

    pub fn model(&self) -> &dyn CausalLm {
        self.model.as_ref()
    }

    /// The model back, its cache freed.
    pub fn into_model(self) -> Model {
        self.model
    }

    /// Cache blocks [`ModelRunner::profile_step`] needs for `chunks` (each sequence's
    /// positions up to the end of its chunk).
    pub fn profile_blocks(chunks: &[ProfileChunk], block_size: usize) -> usize {
        chunks
            .iter()
            .map(|c| (c.start + c.len).div_ceil(block_size.max(1)))
            .sum()
    }

    /// Runs one forward over made-up prompt chunks (each asking for its last logits row),
    /// a step of the shape the engine may schedule, so that the caller can read the device's
    /// peak memory (`crate::memory`). The cache must hold [`ModelRunner::profile_blocks`]
    /// blocks; what the step reads and writes there is garbage.
    pub fn profile_step(&self, chunks: &[ProfileChunk]) -> Result<()> {
        let block_size = self.cache.block_size;
        let needed = Self::profile_blocks(chunks, block_size);
        if needed > self.cache.num_blocks {
            return Err(EngineError::InvalidRequest(format!(
                "the profiling step needs {needed} cache blocks, the cache has {}",
                self.cache.num_blocks
            )));
        }
        let vocab = self.model.config().vocab_size.max(1);
        let mut batch = BatchBuilder::new(block_size);
        let mut next_block = 0u32;
        for (s, c) in chunks.iter().enumerate() {
            let blocks = (c.start + c.len).div_ceil(block_size) as u32;
            batch.push(&SeqChunk {
                tokens: (0..c.len).map(|i| ((s * 7919 + i) % vocab) as u32).collect(),
                start_pos: c.start,
                block_table: (next_block..next_block + blocks).collect(),
                logits: LogitRows::Last,
            })?;
            next_block += blocks;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let tensors = batch.tensors(self.model.device())?;
        let logits = self.model.forward(&tensors.ctx(None), &self.cache)?;
        // Bring the rows to the host as a step does, so their copy counts too.
        logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(())
    }

    /// Bytes of the cache tensors.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes(self.model.dtype())
    }

    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.cache.block_size
    }

    /// Runs one step. Returns, for every scheduled request with `needs_sample`, its id and
    /// either the f32 logits (`[vocab]`) of its last computed position or, for the requests in
    /// `greedy`, only their argmax (picked where the logits are: on a GPU only the ids are
    /// downloaded), in plan order.
    pub fn execute(
        &self,
        step: &SchedulerOutput,
        greedy: &HashSet<RequestId>,
        trace: Option<&RoutingTrace>,
    ) -> Result<Vec<(RequestId, StepRow)>> {
        let mut batch = BatchBuilder::new(self.cache.block_size);
        for s in &step.scheduled {
            if s.token_ids.len() != s.num_tokens {
                return Err(EngineError::InvalidRequest(format!(
                    "step for {:?} is inconsistent",
                    s.id
                )));
            }
            batch.push(&SeqChunk {
                tokens: s.token_ids.clone(),
                start_pos: s.start_position,
                block_table: s.block_table.iter().map(|b| b.index() as u32).collect(),
                logits: if s.needs_sample {
                    LogitRows::Last
                } else {
                    LogitRows::None
                },
            })?;
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let tensors = batch.tensors(self.model.device())?;
        let logits = self.model.forward(&tensors.ctx(trace), &self.cache)?;
        // (request, its logits row), for the requests that sample.
        let sampling: Vec<(RequestId, usize)> = step
            .scheduled
            .iter()
            .zip(&tensors.logits_ranges)
            .filter(|(s, _)| s.needs_sample)
            .map(|(s, range)| (s.id, range.start))
            .collect();
        let pick = |wanted: bool| -> Vec<u32> {
            sampling
                .iter()
                .filter(|(id, _)| greedy.contains(id) == wanted)
                .map(|&(_, row)| row as u32)
                .collect()
        };
        let (greedy_rows, full_rows) = (pick(true), pick(false));
        let rows_of = |rows: &[u32]| -> Result<Tensor> {
            if rows.len() == logits.dims()[0] {
                return Ok(logits.clone());
            }
            Ok(logits.index_select(&Tensor::from_slice(rows, rows.len(), logits.device())?, 0)?)
        };
        let mut ids = match greedy_rows.is_empty() {
            true => Vec::new(),
            false => moe_kernels::sampling::argmax_rows(&rows_of(&greedy_rows)?)?,
        }
        .into_iter();
        let mut full = match full_rows.is_empty() {
            true => Vec::new(),
            false => rows_of(&full_rows)?.to_vec2::<f32>()?,
        }
        .into_iter();
        let mut out = Vec::with_capacity(sampling.len());
        for (id, _) in sampling {
            let row = match greedy.contains(&id) {
                true => ids.next().map(StepRow::Greedy),
                false => full.next().map(StepRow::Logits),
            };
            out.push((
                id,
                row.ok_or_else(|| EngineError::InvalidRequest("a step lost a logits row".into()))?,
            ));
        }
        Ok(out)
    }
}
