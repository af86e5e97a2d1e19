//! The model interface the engine, scorer, CLI and benches use: what they need to know about
//! a model (its [`ModelConfig`]: vocabulary, EOS ids, layers, experts, positions, KV-cache
//! spec) and a forward over a [`ForwardCtx`] and the paged cache. Every family implements
//! [`CausalLm`]; [`crate::registry::load_model`] builds one from a config.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::forward::ForwardCtx;
use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::layers::moe::router::RouterSpec;
use crate::parallel::Shard;

/// A loaded model of any family.
pub type Model = Box<dyn CausalLm>;

/// A causal language model over a paged KV cache.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// The compute dtype (weights and activations).
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
    /// Descriptions of the router of each MoE layer (`(layer, description)`).
    fn routers(&self) -> Vec<(usize, String)>;

    /// Ranks the model is split over (each holds its own part of the weights and the cache).
    fn ranks(&self) -> usize {
        1
    }

    /// What one token of one layer keeps in the cache.
    fn kv_cache_spec(&self) -> KvCacheSpec {
        self.config().kv_cache_spec()
    }

    /// A cache for this model with `num_blocks` blocks of `block_size` tokens.
    fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        KvCache::new(
            self.kv_cache_spec(),
            self.config().num_hidden_layers,
            &self.config().index_key_layers(),
            num_blocks,
            block_size,
            self.dtype(),
            self.device(),
        )
    }

    /// Runs the batch in `ctx`, writing its K/V (or latents) into `cache`.
    /// Returns f32 logits `[rows, vocab]` for `ctx.logits_rows` (all rows when `None`).
    fn forward(&self, ctx: &ForwardCtx<'_>, cache: &KvCache) -> Result<Tensor>;

    /// Whether the device still works: waits for its queued work and reports an error it
    /// left (a sticky CUDA error fails here; the CPU always passes). The engine asks after a
    /// failed step, to tell a bad batch from a lost device.
    fn check_device(&self) -> Result<()> {
        Ok(moe_kernels::device_memory::synchronize(self.device())?)
    }
}

/// Called after each decoder layer is loaded with `(layers loaded, total layers)`.
pub type LoadProgress = std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>;

/// Options that change how a checkpoint is run without changing the checkpoint.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Replaces the checkpoint's routing in every MoE layer (`--router`).
    pub router: Option<RouterSpec>,
    /// Progress callback (e.g. a progress bar) while weights load.
    pub progress: Option<LoadProgress>,
    /// Run routed experts through the reference path (host routing, per-expert matmuls) even
    /// where the grouped GPU kernels apply (`--expert-backend reference`, for A/B runs).
    pub reference_experts: bool,
    /// The part of the model to load: one rank's (tensor/expert parallelism), or all of it.
    pub shard: Shard,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("router", &self.router)
            .field("progress", &self.progress.is_some())
            .field("reference_experts", &self.reference_experts)
            .field("shard", &self.shard.layout().describe())
            .finish()
    }
}

/// A boxed model is a model, so `&Model` goes wherever `&dyn CausalLm` does.
impl<T: CausalLm + ?Sized> CausalLm for Box<T> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn device(&self) -> &Device {
        (**self).device()
    }
    fn routers(&self) -> Vec<(usize, String)> {
        (**self).routers()
    }
    fn ranks(&self) -> usize {
        (**self).ranks()
    }
    fn kv_cache_spec(&self) -> KvCacheSpec {
        (**self).kv_cache_spec()
    }
    fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        (**self).new_cache(num_blocks, block_size)
    }
    fn forward(&self, ctx: &ForwardCtx<'_>, cache: &KvCache) -> Result<Tensor> {
        (**self).forward(ctx, cache)
    }
    fn check_device(&self) -> Result<()> {
        (**self).check_device()
    }
}
