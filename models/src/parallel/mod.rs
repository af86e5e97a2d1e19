//! Splitting one model across ranks (devices, or threads on the CPU): the
//! [`ParallelLayout`] a user picks (`--tensor-parallel-size`, `--enable-expert-parallel`,
//! `--expert-parallel-size`), the [`Shard`] each rank's layers are built for (which heads,
//! rows, experts and vocabulary entries it holds, and its [`Communicator`]), and the
//! [`ShardedModel`] that runs one forward on every rank and returns rank 0's logits.
//!
//! Tensor parallelism splits attention heads (MLA: q/kv_b/o by head, the latent cache whole on
//! every rank; GQA: q heads split, kv heads split or replicated when fewer than ranks), the
//! dense MLPs and shared experts (gate/up by rows, down by columns, one all-reduce), and the
//! vocabulary (embedding and lm_head by rows). Expert parallelism partitions the routed
//! experts into groups; each group's experts are split by their intermediate rows over the
//! group's ranks. Which parts stay whole on every rank: norms, routers, MLA's low-rank
//! down-projections (`q_a_proj`, `kv_a_proj_with_mqa`) and DSA's indexer.

mod model;

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use moe_kernels::comm::{Communicator, SingleRank};

use crate::config::{AttentionConfig, ModelConfig};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCacheSpec;

pub use model::{load_sharded, RankWeights, ShardedModel};
/// The collectives the ranks meet in (re-exported for the binaries that build groups).
pub use moe_kernels::comm;

/// How a model is split across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelLayout {
    /// Ranks in all (vLLM's `--tensor-parallel-size`): attention heads, dense MLPs, shared
    /// experts and the vocabulary are split over every one of them.
    tensor_parallel: usize,
    /// Groups the routed experts are partitioned into. 1: every rank holds a slice of every
    /// expert; `tensor_parallel` (`--enable-expert-parallel`): each rank holds whole experts;
    /// in between, each group's experts are sliced over its `tensor_parallel /
    /// expert_parallel` ranks.
    expert_parallel: usize,
}

impl Default for ParallelLayout {
    fn default() -> Self {
        ParallelLayout::single()
    }
}

impl ParallelLayout {
    /// One rank.
    pub const fn single() -> Self {
        ParallelLayout {
            tensor_parallel: 1,
            expert_parallel: 1,
        }
    }

    /// `tensor_parallel` ranks with the routed experts in `expert_parallel` groups, which must
    /// divide it.
    pub fn new(tensor_parallel: usize, expert_parallel: usize) -> Result<Self> {
        if tensor_parallel == 0 || expert_parallel == 0 || !tensor_parallel.is_multiple_of(expert_parallel) {
            return Err(ModelError::Parallel(format!(
                "expert parallel size {expert_parallel} must be positive and divide the tensor parallel size {tensor_parallel} (the ranks in all)"
            )));
        }
        Ok(ParallelLayout {
            tensor_parallel,
            expert_parallel,
        })
    }

    /// Ranks in all.
    pub fn ranks(&self) -> usize {
        self.tensor_parallel
    }

    /// Ranks in all (`--tensor-parallel-size`).
    pub fn tensor_parallel(&self) -> usize {
        self.tensor_parallel
    }

    /// Groups the routed experts are partitioned into (`--expert-parallel-size`).
    pub fn expert_parallel(&self) -> usize {
        self.expert_parallel
    }

    /// Ranks that share each expert group (each holding a slice of every expert of it).
    pub fn expert_slices(&self) -> usize {
        self.tensor_parallel / self.expert_parallel
    }

    pub fn is_single(&self) -> bool {
        self.tensor_parallel == 1
    }

    /// E.g. `TP 4` or `TP 4, EP 2 (experts sliced 2 ways)`.
    pub fn describe(&self) -> String {
        match (self.expert_parallel, self.expert_slices()) {
            (1, _) => format!("TP {}", self.tensor_parallel),
            (ep, 1) => format!("TP {}, EP {ep}", self.tensor_parallel),
            (ep, slices) => format!("TP {}, EP {ep} (experts sliced {slices} ways)", self.tensor_parallel),
        }
    }

    /// Ranks holding (a slice of) routed expert `expert` of `num_experts`.
    pub fn expert_ranks(&self, expert: usize, num_experts: usize) -> Range<usize> {
        let group = expert / (num_experts / self.expert_parallel).max(1);
        let slices = self.expert_slices();
        group * slices..(group + 1) * slices
    }

    /// Checks that `config` splits this way, naming the config field that does not.
    pub fn check(&self, config: &ModelConfig) -> Result<()> {
        let n = self.tensor_parallel;
        if n == 1 {
            return Ok(());
        }
        let need = |value: usize, field: &str, by: usize, flag: &str| -> Result<()> {
            if !value.is_multiple_of(by) {
                return Err(ModelError::Parallel(format!(
                    "{field} = {value} does not split over {by} ranks ({flag})"
                )));
            }
            Ok(())
        };
        const TP: &str = "--tensor-parallel-size";
        match &config.attention {
            AttentionConfig::Mla(m) => need(m.num_heads, "num_attention_heads", n, TP)?,
            AttentionConfig::Gqa(g) => {
                need(g.num_heads, "num_attention_heads", n, TP)?;
                if g.num_kv_heads % n != 0 && !n.is_multiple_of(g.num_kv_heads) {
                    return Err(ModelError::Parallel(format!(
                        "num_key_value_heads = {} neither splits over {n} ranks nor divides them ({TP})",
                        g.num_kv_heads
                    )));
                }
            }
        }
        if config.moe_layers.iter().any(|m| !m) || config.moe.is_none() {
            need(config.intermediate_size, "intermediate_size", n, TP)?;
        }
        if let Some(moe) = &config.moe {
            let flag = "--expert-parallel-size / --enable-expert-parallel";
            need(moe.n_routed_experts, "n_routed_experts", self.expert_parallel, flag)?;
            need(
                moe.moe_intermediate_size,
                "moe_intermediate_size",
                self.expert_slices(),
                flag,
            )?;
            if moe.n_shared_experts > 0 {
                need(
                    moe.moe_intermediate_size * moe.n_shared_experts,
                    "the shared experts' width (moe_intermediate_size x n_shared_experts)",
                    n,
                    TP,
                )?;
            }
        }
        self.check_int4_columns(config)
    }

    /// INT4 packs 8 weights in a word: a rank's columns of a row-parallel INT4 projection
    /// (experts' and MLPs' down, o_proj) must start on a word.
    fn check_int4_columns(&self, config: &ModelConfig) -> Result<()> {
        use crate::config::ModuleQuant;
        let Some(q) = &config.quantization else { return Ok(()) };
        let int4 = |module: String| matches!(q.scheme_for(&module), Some(ModuleQuant::Int4 { .. }));
        let root = config.names.model;
        let n = self.tensor_parallel;
        let mut columns: Vec<(usize, String, bool)> = Vec::new();
        let heads_width = match &config.attention {
            AttentionConfig::Mla(m) => m.num_heads * m.v_head_dim,
            AttentionConfig::Gqa(g) => g.num_heads * g.head_dim,
        };
        let attn = int4(format!("{root}.layers.0.self_attn.o_proj"));
        columns.push((heads_width / n, "the attention heads' width a rank holds".into(), attn));
        if let Some(l) = (0..config.num_hidden_layers).find(|&l| !config.is_moe_layer(l)) {
            let dense = int4(format!("{root}.layers.{l}.mlp.down_proj"));
            columns.push((config.intermediate_size / n, "intermediate_size / ranks".into(), dense));
        }
        if let (Some(moe), Some(l)) = (
            &config.moe,
            (0..config.num_hidden_layers).find(|&l| config.is_moe_layer(l)),
        ) {
            let block = format!("{root}.layers.{l}.{}", moe.names.block);
            let experts = int4(format!("{block}.experts.0.{}", moe.names.experts.down));
            let slice = moe.moe_intermediate_size / self.expert_slices();
            columns.push((slice, "moe_intermediate_size / ranks per expert group".into(), experts));
            let shared = int4(format!("{block}.{}.down_proj", moe.names.shared_experts));
            let width = moe.moe_intermediate_size * moe.n_shared_experts / n;
            columns.push((width, "the shared experts' width / ranks".into(), shared));
        }
        for (width, what, packed) in columns {
            if packed && n > 1 && width % 8 != 0 {
                return Err(ModelError::Parallel(format!(
                    "{what} = {width} is not a multiple of 8, which INT4 columns split at (--tensor-parallel-size / --expert-parallel-size)"
                )));
            }
        }
        Ok(())
    }
}

/// What one rank holds of a model split by a [`ParallelLayout`], and its group.
#[derive(Debug, Clone)]
pub struct Shard {
    layout: ParallelLayout,
    comm: Arc<dyn Communicator>,
    /// Built for a group ([`Shard::new`]): the layers run their collectives, even in a group
    /// of one (so one GPU exercises the NCCL path).
    grouped: bool,
}

impl Default for Shard {
    fn default() -> Self {
        Shard::single()
    }
}

impl Shard {
    /// The whole model on one rank.
    pub fn single() -> Self {
        Shard {
            layout: ParallelLayout::single(),
            comm: Arc::new(SingleRank),
            grouped: false,
        }
    }

    /// Rank `comm.rank()` of `layout`.
    pub fn new(layout: ParallelLayout, comm: Arc<dyn Communicator>) -> Result<Self> {
        if comm.size() != layout.ranks() {
            return Err(ModelError::Parallel(format!(
                "a group of {} ranks for a layout of {}",
                comm.size(),
                layout.ranks()
            )));
        }
        Ok(Shard {
            layout,
            comm,
            grouped: true,
        })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.layout.ranks()
    }

    /// The whole model on one rank with no group: the layers skip every collective.
    pub fn is_single(&self) -> bool {
        !self.grouped
    }

    pub fn layout(&self) -> ParallelLayout {
        self.layout
    }

    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// This rank's part of `n` items split evenly over all ranks (`what` names them in the
    /// error when they do not split).
    pub fn split(&self, n: usize, what: &str) -> Result<Range<usize>> {
        split_range(n, self.size(), self.rank(), what)
    }

    /// This rank's part of `n` items split evenly over the ranks of its expert group.
    pub fn expert_slice(&self, n: usize, what: &str) -> Result<Range<usize>> {
        let slices = self.layout.expert_slices();
        split_range(n, slices, self.rank() % slices, what)
    }

    /// The routed experts this rank holds (a slice of each).
    pub fn experts(&self, num_experts: usize) -> Result<Range<usize>> {
        let groups = self.layout.expert_parallel();
        let group = self.rank() / self.layout.expert_slices();
        split_range(num_experts, groups, group, "n_routed_experts")
    }

    /// The kv heads this rank keeps for its query heads: its share when the kv heads split
    /// over the ranks, else the one kv head its query heads read (replicated on
    /// `ranks / kv_heads` ranks).
    pub fn kv_heads(&self, kv_heads: usize) -> Result<Range<usize>> {
        let n = self.size();
        if kv_heads.is_multiple_of(n) {
            return self.split(kv_heads, "num_key_value_heads");
        }
        if !n.is_multiple_of(kv_heads) {
            return Err(ModelError::Parallel(format!(
                "num_key_value_heads = {kv_heads} neither splits over {n} ranks nor divides them"
            )));
        }
        let head = self.rank() / (n / kv_heads);
        Ok(head..head + 1)
    }

    /// Whether this rank is the first of the ranks that hold its kv heads (replicas of a kv
    /// head count once in sums over heads).
    pub fn first_kv_replica(&self, kv_heads: usize) -> bool {
        let n = self.size();
        kv_heads.is_multiple_of(n) || self.rank().is_multiple_of((n / kv_heads.max(1)).max(1))
    }

    /// `x` summed over the ranks (a row-parallel product's partial sums).
    pub fn all_reduce(&self, x: &Tensor) -> Result<Tensor> {
        if self.is_single() {
            return Ok(x.clone());
        }
        Ok(self.comm.all_reduce_sum(&x.contiguous()?)?)
    }

    /// What this rank keeps per token and layer: the model's spec with GQA's kv heads cut to
    /// this rank's (MLA's latent stays whole on every rank).
    pub fn kv_cache_spec(&self, config: &ModelConfig) -> Result<KvCacheSpec> {
        Ok(match config.kv_cache_spec() {
            KvCacheSpec::PerHead {
                kv_heads,
                head_dim,
                v_head_dim,
            } => KvCacheSpec::PerHead {
                kv_heads: self.kv_heads(kv_heads)?.len(),
                head_dim,
                v_head_dim,
            },
            latent => latent,
        })
    }
}

/// Part `index` of `n` items split into `parts` equal parts.
fn split_range(n: usize, parts: usize, index: usize, what: &str) -> Result<Range<usize>> {
    if parts == 0 || !n.is_multiple_of(parts) {
        return Err(ModelError::Parallel(format!(
            "{what} = {n} does not split into {parts} equal parts"
        )));
    }
    let len = n / parts;
    Ok(index * len..(index + 1) * len)
}

#[cfg(test)]
mod tests;
