//! Collectives between the ranks of a model split across devices (tensor and expert
//! parallelism): one [`Communicator`] interface with an in-process implementation over
//! threads ([`LocalGroup`], what `cargo test` runs and CPU ranks use), a single-rank identity
//! ([`SingleRank`]), and NCCL on CUDA devices (`nccl`, feature `cuda`).
//!
//! Every collective is called by every rank of the group in the same order with tensors of
//! the same shape and dtype (all-to-all excepted: its row counts differ per peer), as with
//! NCCL. Results are deterministic: the in-process sums add the ranks' tensors in rank
//! order, so every rank gets the same bits, run after run. This module knows nothing about
//! models: it moves and sums tensors.

mod local;
#[cfg(feature = "cuda")]
mod nccl;

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

pub use local::LocalGroup;
#[cfg(feature = "cuda")]
pub use nccl::{nccl_group, NcclComm};

/// One rank's handle on its group.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// `x` summed over the ranks; every rank gets the sum.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// The ranks' `x` (`[n, ..]`, one shape on every rank) concatenated along dim 0 in rank
    /// order: `[size * n, ..]`.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
    /// `x` (`[size * n, ..]`) summed over the ranks; rank `r` gets rows `r*n..(r+1)*n` of
    /// the sum.
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Rows of `x` (`[Σ send_counts, ..]`) sent to the ranks in order: the first
    /// `send_counts[0]` rows to rank 0, the next `send_counts[1]` to rank 1, and so on.
    /// Returns the rows received, `[Σ recv_counts, ..]` in source-rank order;
    /// `recv_counts[p]` must equal what rank `p` sends here (see [`exchange_counts`]).
    fn all_to_all(&self, x: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor>;
    /// `x` of rank `root` on every rank (other ranks pass a tensor of the same shape and
    /// dtype, whose values are ignored).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    /// Makes every collective in flight or to come fail on every rank, so that ranks that
    /// wait for a rank that failed are released; see [`Communicator::recover`]. Called by the
    /// rank that failed: the group remembers it ([`Communicator::aborted_by`]).
    fn abort(&self);
    /// The rank whose [`abort`](Communicator::abort) came first, until the group recovers:
    /// the rank that failed, as opposed to the ranks whose collectives it aborted.
    fn aborted_by(&self) -> Option<usize>;
    /// After an [`abort`](Communicator::abort), once no rank is inside a collective: makes
    /// the group usable again. Implementations that cannot recover return an error.
    fn recover(&self) -> Result<()>;
    /// What carries the collectives, e.g. `threads` or `nccl`.
    fn transport(&self) -> &'static str;
}

/// The group of one rank: every collective returns its input.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_to_all(&self, x: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        check_counts(x, send_counts, 1)?;
        if recv_counts != send_counts {
            bail!("all_to_all: a single rank receives what it sends ({send_counts:?} vs {recv_counts:?})");
        }
        Ok(x.clone())
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root != 0 {
            bail!("broadcast: root {root} of a single rank");
        }
        Ok(x.clone())
    }
    fn abort(&self) {}
    fn aborted_by(&self) -> Option<usize> {
        None
    }
    fn recover(&self) -> Result<()> {
        Ok(())
    }
    fn transport(&self) -> &'static str {
        "none"
    }
}

/// One group over `devices` (rank `r` on `devices[r]`): threads when every device is the
/// CPU, NCCL when every device is a CUDA device (in a binary built with `cuda`).
pub fn group_for(devices: &[Device]) -> Result<Vec<Arc<dyn Communicator>>> {
    if devices.is_empty() {
        bail!("a group needs at least one rank");
    }
    if devices.iter().all(Device::is_cpu) {
        return Ok(LocalGroup::new(devices.len())
            .into_iter()
            .map(|g| Arc::new(g) as Arc<dyn Communicator>)
            .collect());
    }
    if !devices.iter().all(Device::is_cuda) {
        bail!("the ranks of one group must all be on the CPU or all on CUDA devices");
    }
    cuda_group(devices)
}

#[cfg(feature = "cuda")]
fn cuda_group(devices: &[Device]) -> Result<Vec<Arc<dyn Communicator>>> {
    Ok(nccl_group(devices)?
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect())
}

#[cfg(not(feature = "cuda"))]
fn cuda_group(_devices: &[Device]) -> Result<Vec<Arc<dyn Communicator>>> {
    bail!("CUDA ranks need a binary built with --features cuda (NCCL)")
}

/// Every rank's `counts` (`size` of them on every rank, e.g. rows per destination): returns
/// `all[p]` = rank `p`'s counts. One all-gather of a small u32 tensor (a host copy on GPUs).
pub fn exchange_counts(comm: &dyn Communicator, counts: &[usize], device: &Device) -> Result<Vec<Vec<usize>>> {
    let n = counts.len();
    let as_u32: Vec<u32> = counts
        .iter()
        .map(|&c| {
            u32::try_from(c).map_err(|_| candle_core::Error::Msg(format!("exchange_counts: count {c} too large")))
        })
        .collect::<Result<_>>()?;
    let t = Tensor::from_vec(as_u32, (1, n), device)?;
    let all = comm.all_gather(&t)?.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(all
        .into_iter()
        .map(|row| row.into_iter().map(|c| c as usize).collect())
        .collect())
}

/// Checks that `counts` has one entry per rank and sums to `x`'s rows.
pub(crate) fn check_counts(x: &Tensor, counts: &[usize], size: usize) -> Result<()> {
    let rows = x.dims().first().copied().unwrap_or(0);
    if counts.len() != size || counts.iter().sum::<usize>() != rows {
        bail!(
            "all_to_all: counts {counts:?} for {rows} rows among {size} ranks (one count per rank, summing to the rows)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
