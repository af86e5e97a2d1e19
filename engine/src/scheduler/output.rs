//! What crosses the boundary between the scheduler and the model runner each step: the plan
//! going out, the sampled tokens coming back, and the requests that finished. Plain data.

use crate::block_pool::BlockId;

use super::request::RequestId;

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_tokens`.
    Length,
    /// Produced a stop token (EOS or a stop id) or a stop string.
    Stop,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// One request's share of a step.
///
/// Every entry carries the request's *whole* block table (not a diff against the last step):
/// simpler for the runner, and cheap at the table sizes we run. A runner that keeps
/// per-request state should rebuild it for ids in [`SchedulerOutput::first_scheduled`] and
/// [`SchedulerOutput::resumed`], and drop it for ids in [`SchedulerOutput::preempted`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRequest {
    pub id: RequestId,
    /// Position of the first token computed this step (the tokens already in the cache).
    pub start_position: usize,
    /// Tokens computed this step, at least 1: a prompt chunk, a recompute chunk after a
    /// preemption, or a single decode token.
    pub num_tokens: usize,
    /// The token ids at positions `start_position .. start_position + num_tokens`.
    pub token_ids: Vec<u32>,
    /// All blocks of the request after this step's allocation, in position order; they cover
    /// positions `0 .. start_position + num_tokens`. Position `p` lives in block
    /// `block_table[p / block_size]`, slot `p % block_size`.
    pub block_table: Vec<BlockId>,
    /// This step computes the request's last uncomputed token, so the runner samples from the
    /// logits at the last position and reports the token in [`SampledToken`]. False for a
    /// prompt chunk that is not the last one (its logits are not needed).
    pub needs_sample: bool,
}

/// The plan for one step: `{request: num_tokens}` plus what changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Running requests first, in admission order, then requests admitted this step in
    /// queue order.
    pub scheduled: Vec<ScheduledRequest>,
    /// Sum of `num_tokens`; never above `max_num_batched_tokens`.
    pub num_batched_tokens: usize,
    /// Requests preempted this step: their blocks are freed and they wait at the front of the
    /// queue to be recomputed (prompt and generated tokens) from position 0.
    pub preempted: Vec<RequestId>,
    /// Requests scheduled for the first time ever this step.
    pub first_scheduled: Vec<RequestId>,
    /// Previously preempted requests scheduled again this step (starting at position 0).
    pub resumed: Vec<RequestId>,
}

impl SchedulerOutput {
    /// Nothing to compute this step.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// The runner's answer for one scheduled request with `needs_sample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampledToken {
    pub id: RequestId,
    pub token_id: u32,
    /// Set by the caller to end the request now whatever the token (e.g. a stop string
    /// matched in the detokenized text). `None` lets the scheduler check its stop token ids
    /// and `max_tokens`.
    pub finish: Option<FinishReason>,
}

/// A request that finished in `update`; its blocks are already free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedRequest {
    pub id: RequestId,
    /// Every generated token, the last (stop) token included.
    pub generated_token_ids: Vec<u32>,
    pub reason: FinishReason,
    /// How many times it was preempted and recomputed on the way.
    pub num_preemptions: usize,
}
