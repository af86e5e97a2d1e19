//! The attention of a decoder layer, whichever kind the model uses, and the cache layer it
//! reads and writes. One implementation per kind ([`Mla`], [`Gqa`]), shared by every family.

use candle_core::Tensor;
use moe_kernels::TokenSelection;

use super::gqa::Gqa;
use super::mla::Mla;
use super::rope::Rope;
use crate::config::AttentionConfig;
use crate::error::{ModelError, Result};
use crate::forward::ForwardCtx;
use crate::kv_cache::LayerCache;
use crate::loader::Weights;
use crate::parallel::Shard;

#[derive(Debug, Clone)]
pub enum Attention {
    Mla(Mla),
    Gqa(Gqa),
}

impl Attention {
    /// Loads `{prefix}.*` (`prefix` = `model.layers.{layer}.self_attn`): the heads `shard`
    /// holds.
    pub fn load(
        w: &Weights,
        prefix: &str,
        cfg: &AttentionConfig,
        hidden: usize,
        eps: f64,
        layer: usize,
        shard: &Shard,
    ) -> Result<Self> {
        Ok(match cfg {
            AttentionConfig::Mla(m) => Attention::Mla(Mla::load(w, prefix, m, hidden, layer, shard)?),
            AttentionConfig::Gqa(g) => Attention::Gqa(Gqa::load(w, prefix, g, hidden, eps, shard)?),
        })
    }

    /// `x`: `[tokens, hidden]` (normed) -> `[tokens, hidden]`, writing this layer's cache.
    /// `selection` carries DSA's chosen positions from layer to layer (untouched otherwise).
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx<'_>,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
        cache: &LayerCache,
        selection: &mut Option<TokenSelection>,
    ) -> Result<Tensor> {
        match (self, cache) {
            (Attention::Mla(a), LayerCache::Latent { latent, index_keys }) => {
                a.forward(x, ctx, rope, cos_sin, latent, index_keys.as_ref(), selection)
            }
            (Attention::Gqa(a), LayerCache::PerHead { k, v }) => a.forward(x, ctx, rope, cos_sin, k, v),
            _ => Err(ModelError::Input(
                "the KV cache layout does not match the model's attention".into(),
            )),
        }
    }
}
