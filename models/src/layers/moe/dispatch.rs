//! Expert parallelism: each rank takes its share of the tokens (an equal run of rows, the
//! last ones possibly short or empty), sends each token's row to the ranks holding its
//! chosen experts (all-to-all), runs the rows it received through its experts, sends the
//! outputs back (all-to-all), and sums each token's outputs in slot order with the routing
//! weights. The shared experts' partial outputs are summed onto the same rows
//! (reduce-scatter), and an all-gather gives every rank every token's output again.
//!
//! Rows travel sorted by (destination rank, expert), so a receiver learns from the exchanged
//! counts alone which of its experts each row is for; nothing else is sent. The result does
//! not depend on how tokens happen to be spread: each token's sum runs in slot order.

use candle_core::{DType, Tensor};
use moe_kernels::comm::exchange_counts;

use super::router::Routing;
use super::MoeBlock;
use crate::error::Result;

/// Where one copy of a token's row goes.
struct Send {
    dest: usize,
    /// The expert's index among the destination's experts.
    local_expert: usize,
    /// Token-major slot `token * top_k + choice`.
    slot: usize,
}

impl MoeBlock {
    /// `x`: `[tokens, H]` (the same on every rank), `routing`: every token's experts ->
    /// `[tokens, H]`, the layer's output on every rank.
    pub(super) fn forward_dispatched(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let comm = self.shard.comm();
        let (ranks, rank) = (comm.size(), comm.rank());
        let layout = self.shard.layout();
        let (tokens, hidden) = x.dims2()?;
        let k = routing.top_k;
        routing.check(tokens, self.num_experts)?;
        let per_rank = self.num_experts / layout.expert_parallel();
        let chunk = tokens.div_ceil(ranks);
        let mine = (rank * chunk).min(tokens)..((rank + 1) * chunk).min(tokens);

        // Every copy this rank sends, sorted by (destination, expert), slots ascending within.
        let mut sends = Vec::new();
        for slot in mine.start * k..mine.end * k {
            let e = routing.expert_ids[slot] as usize;
            for dest in layout.expert_ranks(e, self.num_experts) {
                sends.push(Send {
                    dest,
                    local_expert: e % per_rank,
                    slot,
                });
            }
        }
        sends.sort_by_key(|s| (s.dest, s.local_expert));
        let mut counts = vec![0usize; ranks * per_rank];
        for s in &sends {
            counts[s.dest * per_rank + s.local_expert] += 1;
        }
        // all[src][dest * per_rank + e]: rows rank src sends to expert e of rank dest.
        let all = exchange_counts(comm, &counts, x.device())?;
        let send_counts: Vec<usize> = (0..ranks)
            .map(|d| counts[d * per_rank..][..per_rank].iter().sum())
            .collect();
        let received = |src: usize| &all[src][rank * per_rank..][..per_rank];
        let recv_counts: Vec<usize> = (0..ranks).map(|src| received(src).iter().sum()).collect();

        let device = x.device();
        let rows_of = |idx: Vec<u32>| -> Result<Tensor> {
            let n = idx.len();
            Ok(x.index_select(&Tensor::from_vec(idx, n, device)?, 0)?)
        };
        let outgoing = rows_of(sends.iter().map(|s| (s.slot / k) as u32).collect())?;
        let incoming = comm.all_to_all(&outgoing.contiguous()?, &send_counts, &recv_counts)?;

        // Received rows come by source rank, then by expert: one expert id per row.
        let expert_of_row: Vec<u32> = (0..ranks)
            .flat_map(|src| {
                received(src)
                    .iter()
                    .enumerate()
                    .flat_map(|(e, &n)| std::iter::repeat_n(e as u32, n))
                    .collect::<Vec<_>>()
            })
            .collect();
        let outputs = if expert_of_row.is_empty() {
            incoming.clone()
        } else {
            let rows = expert_of_row.len();
            let one_each = Routing {
                top_k: 1,
                expert_ids: expert_of_row,
                weights: vec![1.0; rows],
            };
            self.experts.forward(&incoming, &one_each)?.to_dtype(incoming.dtype())?
        };
        let returned = comm.all_to_all(&outputs.contiguous()?, &recv_counts, &send_counts)?;

        // Each of my tokens: Σ over its slots (in order) and each slot's expert slices.
        let routed = self.combine(&returned, &sends, routing, mine.clone(), chunk, hidden, x.dtype())?;
        let local = match &self.shared {
            Some(s) => {
                let partial = pad_rows(&s.partial(x)?, chunk * ranks)?;
                let summed = s.down_proj.finish(comm.reduce_scatter_sum(&partial.contiguous()?)?)?;
                (routed + summed)?
            }
            None => routed,
        };
        Ok(comm.all_gather(&local.contiguous()?)?.narrow(0, 0, tokens)?)
    }

    /// `[chunk, H]`: rows `0..mine.len()` the combined expert outputs of tokens `mine`, then
    /// zeros. `returned[i]` is the output of `sends[i]`'s row.
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &self,
        returned: &Tensor,
        sends: &[Send],
        routing: &Routing,
        mine: std::ops::Range<usize>,
        chunk: usize,
        hidden: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let device = returned.device();
        if mine.is_empty() {
            return Ok(Tensor::zeros((chunk, hidden), dtype, device)?);
        }
        let k = routing.top_k;
        let slices = self.shard.layout().expert_slices();
        // For every (token, slot, slice) in order, the returned row holding it.
        let mut row_of = vec![Vec::with_capacity(slices); mine.len() * k];
        for (i, s) in sends.iter().enumerate() {
            row_of[s.slot - mine.start * k].push(i as u32);
        }
        let order: Vec<u32> = row_of.into_iter().flatten().collect();
        let weights: Vec<f32> = routing.weights[mine.start * k..mine.end * k]
            .iter()
            .flat_map(|&w| std::iter::repeat_n(w, slices))
            .collect();
        let per_token = k * slices;
        let n = order.len();
        let gathered = returned
            .to_dtype(DType::F32)?
            .index_select(&Tensor::from_vec(order, n, device)?, 0)?
            .reshape((mine.len(), per_token, hidden))?;
        let weights = Tensor::from_vec(weights, (mine.len(), per_token, 1), device)?;
        let combined = gathered.broadcast_mul(&weights)?.sum(1)?.to_dtype(dtype)?;
        pad_rows(&combined, chunk)
    }
}

/// `x` (`[n, H]`, `n <= rows`) with zero rows appended up to `rows`.
fn pad_rows(x: &Tensor, rows: usize) -> Result<Tensor> {
    let (n, hidden) = x.dims2()?;
    if n == rows {
        return Ok(x.clone());
    }
    let zeros = Tensor::zeros((rows - n, hidden), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[x, &zeros], 0)?)
}
