//! Continuous batching: decides each step how many tokens of which requests run, hands out
//! and reclaims KV blocks through the `BlockPool`, and preempts under memory pressure. It
//! must not depend on tensors, the model or the device: it is driven with token ids only.
//!
//! The loop the engine runs is `schedule()` -> model step over the plan -> `update(sampled)`.
//! Policy, in order:
//! 1. Running requests, oldest admission first, each get what they still need (the rest of a
//!    prompt/recompute chunk, or 1 decode token), capped by the token budget. Blocks are
//!    allocated lazily for exactly the tokens computed this step. When blocks run out the
//!    newest running request is preempted (blocks freed, computed tokens forgotten, moved to
//!    the front of the queue; its generated tokens are kept and recomputed with the prompt).
//!    The newest request itself takes a smaller chunk before it preempts itself.
//! 2. If nothing was preempted this step, waiting requests are admitted strictly in queue
//!    order (FCFS) with chunks of their prompt from the remaining budget, while blocks and
//!    `max_num_seqs` allow. A head that does not fit blocks everyone behind it, so a long
//!    prompt is never starved by later short ones.
//!
//! With prefix caching on (see [`crate::prefix_cache`]), an admitted request first takes the
//! cached blocks of the longest prefix of its tokens made of whole blocks (always leaving at
//! least one token to compute, whose logits it samples from) and starts computing after them.
//! After each step, blocks that became full are indexed so later requests can reuse them; a
//! preempted request usually finds its own blocks still cached when it resumes.

mod output;
mod request;

#[cfg(test)]
mod prefix_tests;
#[cfg(test)]
mod simulation_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};

pub use output::{FinishReason, FinishedRequest, SampledToken, ScheduledRequest, SchedulerOutput};
pub use request::{NewRequest, Request, RequestId, RequestStatus};

use crate::block_pool::{BlockId, BlockPoolError};
use crate::prefix_cache::{BlockHash, KvBlocks, PrefixCacheStats};

/// Limits of the scheduler; all must be positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most tokens computed in one step, over all requests (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Most requests running at once (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Most tokens one request may reach, prompt + `max_tokens` (`--max-model-len`).
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache; together they must hold at least `max_model_len` tokens.
    pub num_blocks: usize,
    /// Keep full blocks keyed by their prefix and reuse them for requests that start alike.
    pub enable_prefix_caching: bool,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let fields = [
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_num_seqs", self.max_num_seqs),
            ("max_model_len", self.max_model_len),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, value)| *value == 0) {
            return Err(SchedulerError::InvalidConfig(format!("{name} must be positive")));
        }
        let capacity = self.num_blocks.saturating_mul(self.block_size);
        if capacity < self.max_model_len {
            return Err(SchedulerError::InvalidConfig(format!(
                "{} blocks of {} tokens hold {capacity} tokens, fewer than max_model_len {}",
                self.num_blocks, self.block_size, self.max_model_len
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),

    #[error("request {0}: empty prompt")]
    EmptyPrompt(RequestId),

    #[error("request {0}: max_tokens must be at least 1")]
    ZeroMaxTokens(RequestId),

    #[error(
        "request {id}: {num_prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed \
         max_model_len {max_model_len}"
    )]
    ExceedsMaxModelLen {
        id: RequestId,
        num_prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },

    #[error("request {0} already exists")]
    DuplicateRequest(RequestId),

    #[error("no live request {0}")]
    UnknownRequest(RequestId),

    #[error("schedule() called again before update() reported the step in flight")]
    StepInFlight,

    #[error("request {0} finished its tokens this step but no sampled token was reported")]
    MissingSample(RequestId),

    #[error("a token was reported for request {0}, which was not due to sample this step")]
    UnexpectedSample(RequestId),

    #[error("two tokens were reported for request {0} in one step")]
    DuplicateSample(RequestId),

    /// The scheduler misused its own pool: a bug here, not in the caller.
    #[error("block pool: {0}")]
    BlockPool(#[from] BlockPoolError),
}

/// Continuous-batching scheduler over a pool of KV blocks. See the module docs for the policy.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: KvBlocks,
    requests: HashMap<RequestId, Request>,
    /// Queue order: front is next to admit.
    waiting: VecDeque<RequestId>,
    /// Admission order: last is the newest, the first to be preempted.
    running: Vec<RequestId>,
    /// Requests in the last plan, awaiting `update`.
    in_flight: Vec<RequestId>,
    /// Requests aborted while in flight; a token reported for them is ignored.
    aborted_in_flight: Vec<RequestId>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        Ok(Self {
            config,
            blocks: KvBlocks::new(config.num_blocks, config.block_size, config.enable_prefix_caching)?,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_flight: Vec::new(),
            aborted_in_flight: Vec::new(),
            num_preemptions: 0,
        })
    }

    /// Queues a request behind every request already waiting.
    pub fn add_request(&mut self, new: NewRequest) -> Result<(), SchedulerError> {
        let id = new.id;
        if new.prompt_token_ids.is_empty() {
            return Err(SchedulerError::EmptyPrompt(id));
        }
        if new.max_tokens == 0 {
            return Err(SchedulerError::ZeroMaxTokens(id));
        }
        let num_prompt_tokens = new.prompt_token_ids.len();
        let max_model_len = self.config.max_model_len;
        if num_prompt_tokens.saturating_add(new.max_tokens) > max_model_len {
            let max_tokens = new.max_tokens;
            return Err(SchedulerError::ExceedsMaxModelLen {
                id,
                num_prompt_tokens,
                max_tokens,
                max_model_len,
            });
        }
        if self.requests.contains_key(&id) {
            return Err(SchedulerError::DuplicateRequest(id));
        }
        self.requests.insert(id, Request::new(new));
        self.waiting.push_back(id);
        Ok(())
    }

    /// Plans the next step (see the module docs). Errors with `StepInFlight` if the previous
    /// plan has not been reported back through `update`.
    pub fn schedule(&mut self) -> Result<SchedulerOutput, SchedulerError> {
        if !self.in_flight.is_empty() {
            return Err(SchedulerError::StepInFlight);
        }
        self.aborted_in_flight.clear();
        let mut out = SchedulerOutput::default();
        let mut budget = self.config.max_num_batched_tokens;

        let mut index = 0;
        'running: while index < self.running.len() && budget > 0 {
            let id = self.running[index];
            let mut num_tokens = self.requests[&id].num_uncomputed_tokens().min(budget);
            while self.new_blocks_needed(id, num_tokens) > self.blocks.num_free() {
                let newest = *self.running.last().expect("the request being scheduled is running");
                if newest != id {
                    self.preempt(newest)?;
                    out.preempted.push(newest);
                    continue;
                }
                // The newest takes what fits rather than preempting itself.
                num_tokens = num_tokens.min(self.tokens_that_fit(id));
                if num_tokens == 0 {
                    self.preempt(id)?;
                    out.preempted.push(id);
                    break 'running;
                }
            }
            out.scheduled.push(self.schedule_tokens(id, num_tokens));
            budget -= num_tokens;
            index += 1;
        }

        // Admitting right after a preemption would only thrash: the preempted request sits at
        // the head of the queue and memory is short.
        if out.preempted.is_empty() {
            while budget > 0 && self.running.len() < self.config.max_num_seqs {
                let Some(&id) = self.waiting.front() else { break };
                let cached = self.cached_prefix(id);
                let num_cached_tokens = cached.len() * self.config.block_size;
                let request = &self.requests[&id];
                let num_prompt_tokens = request.token_ids.len();
                let num_tokens = (num_prompt_tokens - num_cached_tokens).min(budget);
                let total_blocks = (num_cached_tokens + num_tokens).div_ceil(self.config.block_size);
                let blocks_taken = total_blocks - cached.len() + self.blocks.count_free(&cached);
                if blocks_taken > self.blocks.num_free() {
                    break;
                }
                self.waiting.pop_front();
                self.running.push(id);
                self.blocks.acquire(&cached)?;
                self.blocks.record_lookup(num_prompt_tokens, num_cached_tokens);
                let request = self.requests.get_mut(&id).expect("queued requests are live");
                request.num_registered_blocks = cached.len();
                request.block_table = cached;
                request.num_computed_tokens = num_cached_tokens;
                request.status = RequestStatus::Running;
                if request.ever_scheduled {
                    out.resumed.push(id);
                } else {
                    out.first_scheduled.push(id);
                }
                request.ever_scheduled = true;
                out.scheduled.push(self.schedule_tokens(id, num_tokens));
                budget -= num_tokens;
            }
        }

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget;
        Ok(out)
    }

    /// Reports the step planned by the last `schedule`: every scheduled request advances by
    /// its `num_tokens`, and each one that had `needs_sample` gets its token from `sampled`
    /// (exactly one each; a token for a request aborted during the step is ignored). A request
    /// finishes on the caller's `finish`, else on one of its stop token ids, else on reaching
    /// `max_tokens`; finished requests free their blocks at once and are returned.
    ///
    /// On error nothing changes, so the caller may fix its report and call again.
    pub fn update(&mut self, sampled: &[SampledToken]) -> Result<Vec<FinishedRequest>, SchedulerError> {
        let mut tokens_by_id: HashMap<RequestId, SampledToken> = HashMap::with_capacity(sampled.len());
        for token in sampled {
            if tokens_by_id.insert(token.id, *token).is_some() {
                return Err(SchedulerError::DuplicateSample(token.id));
            }
        }
        for &id in &self.in_flight {
            let request = &self.requests[&id];
            let due = request.num_computed_tokens + request.num_scheduled_tokens == request.token_ids.len();
            if due && !tokens_by_id.contains_key(&id) {
                return Err(SchedulerError::MissingSample(id));
            }
            if !due && tokens_by_id.contains_key(&id) {
                return Err(SchedulerError::UnexpectedSample(id));
            }
        }
        for id in tokens_by_id.keys() {
            if !self.in_flight.contains(id) && !self.aborted_in_flight.contains(id) {
                return Err(SchedulerError::UnexpectedSample(*id));
            }
        }

        let mut finished = Vec::new();
        for id in std::mem::take(&mut self.in_flight) {
            let request = self.requests.get_mut(&id).expect("in-flight requests are live");
            request.num_computed_tokens += request.num_scheduled_tokens;
            request.num_scheduled_tokens = 0;
            self.register_full_blocks(id)?;
            let request = self.requests.get_mut(&id).expect("in-flight requests are live");
            let Some(token) = tokens_by_id.get(&id) else { continue };
            request.token_ids.push(token.token_id);
            let reason = token.finish.or_else(|| {
                if request.stop_token_ids.contains(&token.token_id) {
                    Some(FinishReason::Stop)
                } else if request.generated_token_ids().len() >= request.max_tokens {
                    Some(FinishReason::Length)
                } else {
                    None
                }
            });
            if let Some(reason) = reason {
                let request = self.remove(id)?;
                finished.push(FinishedRequest {
                    id,
                    generated_token_ids: request.generated_token_ids().to_vec(),
                    reason,
                    num_preemptions: request.num_preemptions,
                });
            }
        }
        self.aborted_in_flight.clear();
        Ok(finished)
    }

    /// Drops a waiting or running request and frees its blocks at once. If it is part of the
    /// step in flight, `update` ignores its token.
    pub fn abort(&mut self, id: RequestId) -> Result<(), SchedulerError> {
        if !self.requests.contains_key(&id) {
            return Err(SchedulerError::UnknownRequest(id));
        }
        if let Some(position) = self.in_flight.iter().position(|&x| x == id) {
            self.in_flight.remove(position);
            self.aborted_in_flight.push(id);
        }
        self.remove(id)?;
        Ok(())
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// A live (waiting or running) request.
    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    /// Waiting requests, next to admit first.
    pub fn waiting_ids(&self) -> impl ExactSizeIterator<Item = RequestId> + '_ {
        self.waiting.iter().copied()
    }

    /// Running requests, oldest admission first.
    pub fn running_ids(&self) -> impl ExactSizeIterator<Item = RequestId> + '_ {
        self.running.iter().copied()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Any request not yet finished or aborted.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Blocks that can be allocated now (cached ones included: they are evicted on demand).
    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    /// Free blocks that keep a reusable prefix.
    pub fn num_cached_blocks(&self) -> usize {
        self.blocks.num_cached()
    }

    /// Blocks some request holds.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.num_used()
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.num_blocks()
    }

    /// Prompt tokens looked up in the prefix cache and found there, since the start.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.blocks.stats()
    }

    /// The blocks and prefix index, for invariant checks.
    pub fn kv_blocks(&self) -> &KvBlocks {
        &self.blocks
    }

    /// Preemptions since the scheduler was made.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Blocks `id` lacks to hold its computed tokens plus `num_tokens` more.
    fn new_blocks_needed(&self, id: RequestId, num_tokens: usize) -> usize {
        let request = &self.requests[&id];
        let total = (request.num_computed_tokens + num_tokens).div_ceil(self.config.block_size);
        total.saturating_sub(request.block_table.len())
    }

    /// Most tokens `id` could compute now with its own blocks plus every free block.
    fn tokens_that_fit(&self, id: RequestId) -> usize {
        let request = &self.requests[&id];
        let slots = (request.block_table.len() + self.blocks.num_free()) * self.config.block_size;
        slots.saturating_sub(request.num_computed_tokens)
    }

    /// The cached blocks a waiting request can start from: the longest cached prefix of its
    /// tokens made of whole blocks, short of its last token (which must be computed to give
    /// the logits it samples from). Empty when prefix caching is off.
    fn cached_prefix(&mut self, id: RequestId) -> Vec<BlockId> {
        if !self.blocks.prefix_caching_enabled() {
            return Vec::new();
        }
        let block_size = self.config.block_size;
        let request = self.requests.get_mut(&id).expect("queued requests are live");
        BlockHash::extend_chain(&mut request.block_hashes, &request.token_ids, block_size);
        let max_blocks = (request.token_ids.len() - 1) / block_size;
        self.blocks
            .longest_cached_prefix(&request.block_hashes, &request.token_ids, max_blocks)
    }

    /// Offers the request's blocks that are now full and computed to the prefix cache.
    fn register_full_blocks(&mut self, id: RequestId) -> Result<(), SchedulerError> {
        if !self.blocks.prefix_caching_enabled() {
            return Ok(());
        }
        let block_size = self.config.block_size;
        let request = self.requests.get_mut(&id).expect("in-flight requests are live");
        let num_full = request.num_computed_tokens / block_size;
        if num_full <= request.num_registered_blocks {
            return Ok(());
        }
        BlockHash::extend_chain(&mut request.block_hashes, &request.token_ids, block_size);
        for i in request.num_registered_blocks..num_full {
            let parent = i.checked_sub(1).map(|p| request.block_hashes[p]);
            let tokens = &request.token_ids[i * block_size..(i + 1) * block_size];
            self.blocks
                .register(request.block_hashes[i], parent, tokens, request.block_table[i])?;
        }
        request.num_registered_blocks = num_full;
        Ok(())
    }

    /// Allocates the blocks for `num_tokens` more tokens of a running request and records
    /// them as in flight. The caller has checked that enough blocks are free.
    fn schedule_tokens(&mut self, id: RequestId, num_tokens: usize) -> ScheduledRequest {
        let new_blocks = self.new_blocks_needed(id, num_tokens);
        let blocks = self
            .blocks
            .allocate_many(new_blocks)
            .expect("caller checked the free blocks");
        let request = self.requests.get_mut(&id).expect("scheduled requests are live");
        request.block_table.extend(blocks);
        request.num_scheduled_tokens = num_tokens;
        self.in_flight.push(id);
        let start_position = request.num_computed_tokens;
        let end = start_position + num_tokens;
        ScheduledRequest {
            id,
            start_position,
            num_tokens,
            token_ids: request.token_ids[start_position..end].to_vec(),
            block_table: request.block_table.clone(),
            needs_sample: end == request.token_ids.len(),
        }
    }

    /// Moves a running request to the front of the queue, freeing its blocks and forgetting
    /// its computed tokens (it keeps its generated tokens, which are recomputed later).
    fn preempt(&mut self, id: RequestId) -> Result<(), SchedulerError> {
        let request = self.requests.get_mut(&id).expect("preempted requests are live");
        self.blocks.release(&request.block_table)?;
        request.block_table.clear();
        request.num_registered_blocks = 0;
        request.num_computed_tokens = 0;
        request.status = RequestStatus::Waiting;
        request.num_preemptions += 1;
        self.running.retain(|&x| x != id);
        self.waiting.push_front(id);
        self.num_preemptions += 1;
        Ok(())
    }

    /// Takes a request out of the scheduler, freeing its blocks.
    fn remove(&mut self, id: RequestId) -> Result<Request, SchedulerError> {
        let request = self.requests.remove(&id).ok_or(SchedulerError::UnknownRequest(id))?;
        match request.status {
            RequestStatus::Waiting => self.waiting.retain(|&x| x != id),
            RequestStatus::Running => self.running.retain(|&x| x != id),
        }
        self.blocks.release(&request.block_table)?;
        Ok(request)
    }
}
