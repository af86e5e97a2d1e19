//! One request's scheduling state: its tokens, how many of them are in the KV cache, and the
//! blocks holding them. Plain data; the policy that changes it lives in the scheduler.

use std::fmt;

use crate::block_pool::BlockId;
use crate::prefix_cache::BlockHash;

/// Caller-chosen request id, unique among the requests the scheduler currently holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the caller hands the scheduler. Arrival order is the order of `add_request` calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    pub id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    /// Most tokens to generate; at least 1.
    pub max_tokens: usize,
    /// Sampling one of these ends the request with `FinishReason::Stop` (the token is kept).
    pub stop_token_ids: Vec<u32>,
}

/// Where a live request is. Finished and aborted requests leave the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    /// In the waiting queue: holds no blocks and has nothing computed.
    Waiting,
    /// Admitted: holds blocks for its computed tokens and is scheduled in admission order.
    Running,
}

/// A live request as the scheduler tracks it.
#[derive(Debug, Clone)]
pub struct Request {
    pub(super) id: RequestId,
    /// Prompt followed by every generated token.
    pub(super) token_ids: Vec<u32>,
    pub(super) num_prompt_tokens: usize,
    pub(super) max_tokens: usize,
    pub(super) stop_token_ids: Vec<u32>,
    pub(super) status: RequestStatus,
    /// Tokens whose KV is in `block_table` (0 while waiting, also after a preemption).
    pub(super) num_computed_tokens: usize,
    /// Tokens scheduled in the step now in flight (0 when none).
    pub(super) num_scheduled_tokens: usize,
    pub(super) block_table: Vec<BlockId>,
    /// Chain hashes of the full blocks of `token_ids` computed so far (grows with the tokens;
    /// valid forever since tokens are only appended).
    pub(super) block_hashes: Vec<BlockHash>,
    /// Leading blocks of `block_table` already offered to the prefix cache.
    pub(super) num_registered_blocks: usize,
    /// Has it ever been scheduled (decides `first_scheduled` vs `resumed` in the plan).
    pub(super) ever_scheduled: bool,
    pub(super) num_preemptions: usize,
}

impl Request {
    pub(super) fn new(new: NewRequest) -> Self {
        Self {
            id: new.id,
            num_prompt_tokens: new.prompt_token_ids.len(),
            token_ids: new.prompt_token_ids,
            max_tokens: new.max_tokens,
            stop_token_ids: new.stop_token_ids,
            status: RequestStatus::Waiting,
            num_computed_tokens: 0,
            num_scheduled_tokens: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered_blocks: 0,
            ever_scheduled: false,
            num_preemptions: 0,
        }
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    pub fn status(&self) -> RequestStatus {
        self.status
    }

    /// Prompt followed by the tokens generated so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    pub fn num_prompt_tokens(&self) -> usize {
        self.num_prompt_tokens
    }

    pub fn generated_token_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Tokens whose KV is in the cache.
    pub fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }

    /// Tokens scheduled in the step now in flight (0 between `update` and `schedule`).
    pub fn num_scheduled_tokens(&self) -> usize {
        self.num_scheduled_tokens
    }

    /// Blocks holding this request's KV, in position order.
    pub fn block_table(&self) -> &[BlockId] {
        &self.block_table
    }

    /// How many times this request was preempted (and recomputed).
    pub fn num_preemptions(&self) -> usize {
        self.num_preemptions
    }

    /// Tokens that still need their KV computed before the next sample.
    pub(super) fn num_uncomputed_tokens(&self) -> usize {
        self.token_ids.len() - self.num_computed_tokens
    }
}
