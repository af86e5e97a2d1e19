//! The explicit per-step context handed to a model's forward (no globals), and the routing
//! trace a forward may record.

use std::sync::Mutex;

use candle_core::Tensor;
use moe_kernels::PagedBatch;

use crate::error::Result;

/// Everything a forward pass needs to know about the flat batch it computes.
///
/// Rows of the batch are grouped by sequence in `seqs` order; row `t` is token
/// `token_ids[t]` at position `positions[t]` and its K/V (or latent) goes to `slot_mapping[t]`.
pub struct ForwardCtx<'a> {
    /// `[num_tokens]` u32.
    pub token_ids: &'a Tensor,
    /// The same ids on the host when the caller has them (the engine does): the forward then
    /// reads them without copying `token_ids` back from a GPU every step.
    pub host_token_ids: Option<&'a [u32]>,
    /// `[num_tokens]` u32: absolute positions (for RoPE).
    pub positions: &'a Tensor,
    /// `[num_tokens]` u32: cache slot (`block * block_size + offset`) each token writes.
    pub slot_mapping: &'a Tensor,
    /// Per-sequence query ranges, context lengths and block tables (with their device copy,
    /// uploaded by the first layer that needs it and shared by the rest of the step).
    pub seqs: &'a PagedBatch,
    /// `[num_rows]` u32: the rows to compute logits for; `None` computes every row.
    pub logits_rows: Option<&'a Tensor>,
    /// When set, every MoE layer records the experts it chose for every token.
    pub routing_trace: Option<&'a RoutingTrace>,
}

impl ForwardCtx<'_> {
    pub fn num_tokens(&self) -> Result<usize> {
        Ok(self.token_ids.dims1()?)
    }
}

/// Expert choices recorded during forward passes, for tests and routing statistics.
#[derive(Debug, Default)]
pub struct RoutingTrace {
    /// `(layer, expert ids of every token, row-major [num_tokens, top_k])` in call order.
    pub records: Mutex<Vec<(usize, Vec<u32>)>>,
}

impl RoutingTrace {
    pub fn record(&self, layer: usize, expert_ids: &[u32]) {
        if let Ok(mut r) = self.records.lock() {
            r.push((layer, expert_ids.to_vec()));
        }
    }

    pub fn take(&self) -> Vec<(usize, Vec<u32>)> {
        self.records
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }
}
