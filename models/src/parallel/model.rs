//! [`ShardedModel`]: a model split over ranks behind the one-model interface. Rank 0 runs
//! on the caller's thread; every other rank has a worker thread that owns its part of the
//! weights and runs the same forward on the same batch (its own device's copy of the batch
//! tensors, its own part of the KV cache). The ranks meet in the collectives inside the
//! layers; the logits come back from rank 0, so sampling happens once, in the engine.
//!
//! A rank that fails aborts the group, so no rank waits forever for it; the step then fails
//! on every rank with the first real error and the group is recovered for the next step.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{DType, Device, Tensor};
use moe_kernels::comm::Communicator;
use moe_kernels::{PagedBatch, PagedSeq};

use super::{ParallelLayout, Shard};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::ForwardCtx;
use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::loader::Weights;
use crate::model::{CausalLm, LoadOptions, Model};
use crate::registry::load_model;

/// Opens rank `r`'s weights (on rank `r`'s device).
pub type RankWeights<'a> = &'a (dyn Fn(usize) -> Result<Weights> + Sync);

/// One step's batch as host data, for the ranks to put on their devices.
struct HostBatch {
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    slot_mapping: Vec<u32>,
    seqs: Vec<PagedSeq>,
    logits_rows: Option<Vec<u32>>,
}

impl HostBatch {
    fn of(ctx: &ForwardCtx<'_>) -> Result<Self> {
        Ok(HostBatch {
            token_ids: ctx.token_ids.to_vec1()?,
            positions: ctx.positions.to_vec1()?,
            slot_mapping: ctx.slot_mapping.to_vec1()?,
            seqs: ctx.seqs.to_vec(),
            logits_rows: ctx.logits_rows.map(|r| r.to_vec1()).transpose()?,
        })
    }
}

struct Job {
    batch: Arc<HostBatch>,
    cache: KvCache,
}

/// A rank other than 0: its worker thread and the channels to it.
struct Peer {
    jobs: Sender<Job>,
    done: Mutex<Receiver<Result<()>>>,
    thread: Option<JoinHandle<()>>,
    model: Arc<Model>,
}

/// A model split over the ranks of a [`ParallelLayout`], run as one.
pub struct ShardedModel {
    layout: ParallelLayout,
    lead: Model,
    /// Rank 0's handle on the group (any rank's can abort and recover it).
    comm: Arc<dyn Communicator>,
    peers: Vec<Peer>,
    /// Bytes of weights each rank holds, in rank order.
    resident_bytes: Vec<u64>,
    /// One step at a time: the ranks must see the steps in the same order.
    step: Mutex<()>,
}

/// Loads `config` split by `layout`: rank `r` reads its part of `open(r)` (each rank only
/// its slices from disk) and meets the others through `comms[r]`. The ranks load at once,
/// one thread each; `options.progress` follows rank 0.
pub fn load_sharded(
    config: &ModelConfig,
    layout: ParallelLayout,
    open: RankWeights<'_>,
    options: &LoadOptions,
    comms: Vec<Arc<dyn Communicator>>,
) -> Result<ShardedModel> {
    layout.check(config)?;
    if comms.len() != layout.ranks() || comms.iter().enumerate().any(|(r, c)| c.rank() != r) {
        return Err(ModelError::Parallel(format!(
            "{} communicators for {} ranks (one per rank, in rank order)",
            comms.len(),
            layout.ranks()
        )));
    }
    let loaded: Vec<Result<(Model, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(rank, comm)| {
                let mut rank_options = options.clone();
                if rank != 0 {
                    rank_options.progress = None;
                }
                let comm = comm.clone();
                s.spawn(move || -> Result<(Model, u64)> {
                    rank_options.shard = Shard::new(layout, comm)?;
                    let weights = open(rank)?;
                    let model = load_model(config, &weights, &rank_options)?;
                    Ok((model, weights.resident_bytes()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ModelError::Parallel("a rank panicked while loading".into())))
            })
            .collect()
    });
    let mut models = Vec::with_capacity(loaded.len());
    let mut resident_bytes = Vec::with_capacity(loaded.len());
    for (rank, r) in loaded.into_iter().enumerate() {
        let (model, bytes) = r.map_err(|e| match e {
            ModelError::Parallel(_) => e,
            other if rank == 0 => other,
            other => ModelError::Parallel(format!("rank {rank}: {other}")),
        })?;
        models.push(model);
        resident_bytes.push(bytes);
    }
    let mut models = models.into_iter();
    let lead = models.next().expect("at least one rank");
    let peers = models
        .zip(comms.iter().skip(1))
        .map(|(model, comm)| spawn_peer(Arc::new(model), comm.clone()))
        .collect::<Result<Vec<_>>>()?;
    Ok(ShardedModel {
        layout,
        lead,
        comm: comms[0].clone(),
        peers,
        resident_bytes,
        step: Mutex::new(()),
    })
}

fn spawn_peer(model: Arc<Model>, comm: Arc<dyn Communicator>) -> Result<Peer> {
    let (jobs, inbox) = channel::<Job>();
    let (outbox, done) = channel::<Result<()>>();
    let worker = model.clone();
    let rank = comm.rank();
    let thread = std::thread::Builder::new()
        .name(format!("moe-rank-{rank}"))
        .spawn(move || {
            while let Ok(job) = inbox.recv() {
                let result = catch_unwind(AssertUnwindSafe(|| run_rank(worker.as_ref(), &job)))
                    .unwrap_or_else(|_| Err(ModelError::Parallel(format!("rank {rank} panicked in its forward"))));
                if result.is_err() {
                    comm.abort();
                }
                if outbox.send(result).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| ModelError::Parallel(format!("starting rank {rank}'s worker: {e}")))?;
    Ok(Peer {
        jobs,
        done: Mutex::new(done),
        thread: Some(thread),
        model,
    })
}

/// A peer's forward over its device's copy of the batch (its logits are rank 0's too and
/// are dropped).
fn run_rank(model: &dyn CausalLm, job: &Job) -> Result<()> {
    let dev = model.device();
    let b = &job.batch;
    let n = b.token_ids.len();
    let token_ids = Tensor::from_vec(b.token_ids.clone(), n, dev)?;
    let positions = Tensor::from_vec(b.positions.clone(), n, dev)?;
    let slot_mapping = Tensor::from_vec(b.slot_mapping.clone(), n, dev)?;
    let logits_rows = match &b.logits_rows {
        Some(r) => Some(Tensor::from_vec(r.clone(), r.len(), dev)?),
        None => None,
    };
    let seqs = PagedBatch::new(b.seqs.clone());
    let ctx = ForwardCtx {
        token_ids: &token_ids,
        host_token_ids: Some(&b.token_ids),
        positions: &positions,
        slot_mapping: &slot_mapping,
        seqs: &seqs,
        logits_rows: logits_rows.as_ref(),
        routing_trace: None,
    };
    model.forward(&ctx, &job.cache).map(|_| ())
}

impl ShardedModel {
    pub fn layout(&self) -> ParallelLayout {
        self.layout
    }

    /// Bytes of weights each rank holds, in rank order.
    pub fn resident_bytes_per_rank(&self) -> &[u64] {
        &self.resident_bytes
    }

    /// What carries the collectives (`threads`, `nccl`).
    pub fn transport(&self) -> &'static str {
        self.comm.transport()
    }
}

impl Drop for ShardedModel {
    fn drop(&mut self) {
        // No step is in flight (forward waits for every rank); aborting releases any rank
        // that is somehow still waiting, so the joins below cannot hang.
        if !self.peers.is_empty() {
            self.comm.abort();
        }
        for peer in &mut self.peers {
            // Closing the job channel ends the worker's loop.
            let (closed, _) = channel();
            drop(std::mem::replace(&mut peer.jobs, closed));
            if let Some(t) = peer.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl CausalLm for ShardedModel {
    fn config(&self) -> &ModelConfig {
        self.lead.config()
    }

    fn dtype(&self) -> DType {
        self.lead.dtype()
    }

    fn device(&self) -> &Device {
        self.lead.device()
    }

    fn routers(&self) -> Vec<(usize, String)> {
        self.lead.routers()
    }

    fn ranks(&self) -> usize {
        self.layout.ranks()
    }

    fn kv_cache_spec(&self) -> KvCacheSpec {
        self.lead.kv_cache_spec()
    }

    /// Every rank's device, rank 0's first.
    fn check_device(&self) -> Result<()> {
        self.lead.check_device()?;
        self.peers.iter().try_for_each(|p| p.model.check_device())
    }

    /// Rank 0's cache, holding every other rank's in `peer_ranks`.
    fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        let mut cache = self.lead.new_cache(num_blocks, block_size)?;
        cache.peer_ranks = self
            .peers
            .iter()
            .map(|p| p.model.new_cache(num_blocks, block_size))
            .collect::<Result<_>>()?;
        Ok(cache)
    }

    fn forward(&self, ctx: &ForwardCtx<'_>, cache: &KvCache) -> Result<Tensor> {
        let _one_step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        if cache.peer_ranks.len() != self.peers.len() {
            return Err(ModelError::Input(format!(
                "the cache holds {} ranks' parts, the model {}",
                cache.peer_ranks.len() + 1,
                self.peers.len() + 1
            )));
        }
        // The host copy of the batch is for the other ranks: none in a group of one.
        let batch = match self.peers.is_empty() {
            true => None,
            false => Some(Arc::new(HostBatch::of(ctx)?)),
        };
        let mut failures: Vec<(usize, ModelError)> = Vec::new();
        let mut started = Vec::with_capacity(self.peers.len());
        for (i, (peer, part)) in self.peers.iter().zip(&cache.peer_ranks).enumerate() {
            let Some(batch) = &batch else { break };
            let job = Job {
                batch: batch.clone(),
                cache: part.clone(),
            };
            if peer.jobs.send(job).is_ok() {
                started.push(i);
            } else {
                failures.push((
                    i + 1,
                    ModelError::Parallel(format!("rank {}'s worker has stopped", i + 1)),
                ));
            }
        }
        let lead = if failures.is_empty() {
            catch_unwind(AssertUnwindSafe(|| self.lead.forward(ctx, cache)))
                .unwrap_or_else(|_| Err(ModelError::Parallel("rank 0 panicked in its forward".into())))
        } else {
            Err(ModelError::Parallel("the step did not start on every rank".into()))
        };
        if lead.is_err() {
            self.comm.abort();
        }
        for i in started {
            let reply = self.peers[i]
                .done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv()
                .unwrap_or_else(|_| Err(ModelError::Parallel(format!("rank {}'s worker has stopped", i + 1))));
            if let Err(e) = reply {
                failures.push((i + 1, e));
            }
        }
        if failures.is_empty() && lead.is_ok() {
            return lead;
        }
        if let Err(e) = lead {
            failures.insert(0, (0, e));
        }
        // The cause is the failure of the rank that aborted first (the others' collectives
        // were only aborted by it).
        let cause_rank = self.comm.aborted_by().unwrap_or(failures[0].0);
        let pick = failures.iter().position(|(r, _)| *r == cause_rank).unwrap_or(0);
        let (rank, cause) = failures.swap_remove(pick);
        let cause = match cause {
            e @ (ModelError::Input(_) | ModelError::Parallel(_)) if rank == 0 => e,
            e => ModelError::Parallel(format!("rank {rank}: {e}")),
        };
        // Every rank is out of its collectives now: the group can start over.
        match self.comm.recover() {
            Ok(()) => Err(cause),
            Err(e) => Err(ModelError::Parallel(format!("{cause}; and {e}"))),
        }
    }
}
