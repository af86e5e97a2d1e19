//! [`LocalGroup`]: the ranks of a group as threads of one process, meeting at a rendezvous.
//! Each collective is one exchange: every rank deposits its tensor, the last to arrive
//! publishes all of them, and each rank computes its result from the published set (sums in
//! rank order, so every rank gets the same bits). Used by `cargo test` and by CPU ranks.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{bail, Result, Tensor};

use super::{check_counts, Communicator};

/// One rank's handle on an in-process group; [`LocalGroup::new`] makes all of them.
#[derive(Debug, Clone)]
pub struct LocalGroup {
    shared: Arc<Shared>,
    rank: usize,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    state: Mutex<State>,
    turn: Condvar,
}

/// What a rank brings to an exchange.
#[derive(Debug, Clone)]
struct Deposit {
    /// The collective it is in (every rank must be in the same one).
    op: &'static str,
    tensor: Tensor,
    /// All-to-all: rows for each destination rank.
    counts: Vec<usize>,
}

#[derive(Debug)]
struct State {
    /// Exchanges completed so far.
    round: u64,
    arrived: usize,
    filling: Vec<Option<Deposit>>,
    /// The deposits of the last completed exchange, in rank order.
    published: Arc<Vec<Deposit>>,
    /// The rank that aborted the group first, until it recovers.
    aborted_by: Option<usize>,
}

impl LocalGroup {
    /// The handles of a new group of `size` ranks, in rank order (hand one to each thread;
    /// none for a size of 0).
    pub fn new(size: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(State {
                round: 0,
                arrived: 0,
                filling: vec![None; size],
                published: Arc::new(Vec::new()),
                aborted_by: None,
            }),
            turn: Condvar::new(),
        });
        (0..size)
            .map(|rank| LocalGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock left the state consistent (every
        // update below is a few plain assignments), so the poison is ignored.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deposits `tensor` (and `counts`) and waits for every rank's; returns them in rank order.
    /// Every rank must call the same collective (`op`); a mismatch fails on every rank.
    fn exchange(&self, op: &'static str, tensor: &Tensor, counts: Vec<usize>) -> Result<Arc<Vec<Deposit>>> {
        let mut s = self.lock();
        if let Some(by) = s.aborted_by {
            bail!("{op}: the collective was aborted (rank {by} failed)");
        }
        if s.filling[self.rank].is_some() {
            bail!("{op}: rank {} entered a collective twice", self.rank);
        }
        let my_round = s.round;
        s.filling[self.rank] = Some(Deposit {
            op,
            tensor: tensor.clone(),
            counts,
        });
        s.arrived += 1;
        if s.arrived == self.shared.size {
            let all: Vec<Deposit> = s
                .filling
                .iter_mut()
                .map(|d| d.take().expect("every rank arrived"))
                .collect();
            s.published = Arc::new(all);
            s.arrived = 0;
            s.round += 1;
            self.shared.turn.notify_all();
            let all = s.published.clone();
            drop(s);
            return same_op(op, all);
        }
        while s.round == my_round && s.aborted_by.is_none() {
            s = self.shared.turn.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.round == my_round {
            let by = s.aborted_by.unwrap_or(self.rank);
            bail!("{op}: the collective was aborted (rank {by} failed)");
        }
        // The next round cannot complete before this rank joins it, so `published` is still
        // this round's.
        let all = s.published.clone();
        drop(s);
        same_op(op, all)
    }
}

/// Checks that every rank called the same collective.
fn same_op(op: &str, all: Arc<Vec<Deposit>>) -> Result<Arc<Vec<Deposit>>> {
    if let Some((rank, d)) = all.iter().enumerate().find(|(_, d)| d.op != op) {
        bail!(
            "{op}: rank {rank} called {} at the same point (the ranks ran different steps)",
            d.op
        );
    }
    Ok(all)
}

/// Checks that every rank brought a tensor of one shape and dtype.
fn same_shapes(op: &str, all: &[Deposit]) -> Result<()> {
    let first = &all[0].tensor;
    for (rank, d) in all.iter().enumerate() {
        if d.tensor.dims() != first.dims() || d.tensor.dtype() != first.dtype() {
            bail!(
                "{op}: rank {rank} brought {:?} {:?}, rank 0 {:?} {:?}",
                d.tensor.dtype(),
                d.tensor.dims(),
                first.dtype(),
                first.dims()
            );
        }
    }
    Ok(())
}

/// The sum of `parts` in order.
fn sum_in_order(parts: impl IntoIterator<Item = Result<Tensor>>) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for p in parts {
        let p = p?;
        acc = Some(match acc {
            None => p,
            Some(a) => (a + p)?,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("sum over no ranks".into()))
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange("all_reduce", x, Vec::new())?;
        same_shapes("all_reduce", &all)?;
        sum_in_order(all.iter().map(|d| Ok(d.tensor.clone())))
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange("all_gather", x, Vec::new())?;
        same_shapes("all_gather", &all)?;
        let parts: Vec<Tensor> = all.iter().map(|d| d.tensor.clone()).collect();
        Tensor::cat(&parts, 0)
    }

    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange("reduce_scatter", x, Vec::new())?;
        same_shapes("reduce_scatter", &all)?;
        let rows = x.dims().first().copied().unwrap_or(0);
        if rows % self.size() != 0 {
            bail!("reduce_scatter: {rows} rows do not split over {} ranks", self.size());
        }
        let n = rows / self.size();
        sum_in_order(all.iter().map(|d| d.tensor.narrow(0, self.rank * n, n)))
    }

    fn all_to_all(&self, x: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        check_counts(x, send_counts, self.size())?;
        if recv_counts.len() != self.size() {
            bail!(
                "all_to_all: {} receive counts among {} ranks",
                recv_counts.len(),
                self.size()
            );
        }
        let all = self.exchange("all_to_all", x, send_counts.to_vec())?;
        let mut parts = Vec::with_capacity(all.len());
        for (peer, d) in all.iter().enumerate() {
            if d.tensor.dtype() != x.dtype() || d.tensor.dims().get(1..) != x.dims().get(1..) {
                bail!(
                    "all_to_all: rank {peer} sends {:?} {:?} rows, rank {} {:?} {:?}",
                    d.tensor.dtype(),
                    d.tensor.dims(),
                    self.rank,
                    x.dtype(),
                    x.dims()
                );
            }
            if d.counts.len() != self.size() {
                bail!(
                    "all_to_all: rank {peer} sent {} counts among {} ranks",
                    d.counts.len(),
                    self.size()
                );
            }
            let offset: usize = d.counts[..self.rank].iter().sum();
            let len = d.counts[self.rank];
            if len != recv_counts[peer] {
                bail!(
                    "all_to_all: rank {peer} sends {len} rows to rank {}, which expects {}",
                    self.rank,
                    recv_counts[peer]
                );
            }
            if len > 0 {
                parts.push(d.tensor.narrow(0, offset, len)?);
            }
        }
        if parts.is_empty() {
            return x.narrow(0, 0, 0);
        }
        Tensor::cat(&parts, 0)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.size() {
            bail!("broadcast: root {root} of {} ranks", self.size());
        }
        let all = self.exchange("broadcast", x, Vec::new())?;
        same_shapes("broadcast", &all)?;
        Ok(all[root].tensor.clone())
    }

    fn abort(&self) {
        let mut s = self.lock();
        s.aborted_by.get_or_insert(self.rank);
        self.shared.turn.notify_all();
    }

    fn aborted_by(&self) -> Option<usize> {
        self.lock().aborted_by
    }

    fn recover(&self) -> Result<()> {
        let mut s = self.lock();
        s.aborted_by = None;
        s.arrived = 0;
        s.filling.iter_mut().for_each(|d| *d = None);
        Ok(())
    }

    fn transport(&self) -> &'static str {
        "threads"
    }
}
