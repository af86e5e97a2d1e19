//! The pre-norm decoder every family shares: embedding, layers of (RMSNorm -> attention ->
//! residual, RMSNorm -> dense MLP or MoE block -> residual), final RMSNorm and the output
//! projection. Attention (MLA or GQA), the MoE block and the tensor names come from the
//! [`ModelConfig`] a family's parser wrote; there is no per-family code path here. A decoder
//! is one rank's part of the model when `LoadOptions::shard` splits it (see
//! [`crate::parallel`]); every rank runs the same forward on the same batch.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::ForwardCtx;
use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::layers::attention::Attention;
use crate::layers::mlp::Mlp;
use crate::layers::moe::MoeBlock;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::layers::vocab::{VocabEmbedding, VocabHead};
use crate::loader::Weights;
use crate::model::{CausalLm, LoadOptions, Model};

// One per layer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    config: ModelConfig,
    /// `[vocab, hidden]` (this rank's rows).
    embed_tokens: VocabEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]` (the embedding when `tie_word_embeddings`; this rank's rows).
    lm_head: VocabHead,
    rope: Rope,
    /// What this rank keeps per token and layer.
    kv_spec: KvCacheSpec,
    dtype: DType,
    device: Device,
}

/// [`Decoder::load`] as a registry loader.
pub fn load_boxed(config: &ModelConfig, weights: &Weights, options: &LoadOptions) -> Result<Model> {
    Ok(Box::new(Decoder::load(config, weights, options)?))
}

impl Decoder {
    /// Builds the model from `weights`, reading only the tensors it uses (a checkpoint's
    /// multi-token-prediction layers and vision tower are never read).
    pub fn load(config: &ModelConfig, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let cfg = config;
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let root = cfg.names.model;
        if !cfg.names.skipped.is_empty() {
            let skipped = weights
                .names()
                .iter()
                .filter(|n| cfg.names.skipped.iter().any(|p| n.starts_with(p)))
                .count();
            if skipped > 0 {
                tracing::info!(
                    "skipping {skipped} tensors under {} (not part of the text model)",
                    cfg.names.skipped.join(", ")
                );
            }
        }
        let shard = &options.shard;
        options.shard.layout().check(cfg)?;
        let embed_tokens = VocabEmbedding::load(
            weights,
            &format!("{root}.embed_tokens.weight"),
            cfg.vocab_size,
            h,
            shard,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("{root}.layers.{i}");
            let mlp = match cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(i)) {
                Some(moe) => FeedForward::Moe(MoeBlock::load(weights, &p, i, moe, h, cfg.mlp_bias, options)?),
                None => FeedForward::Dense(Mlp::load(
                    weights,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                    shard,
                )?),
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(weights, &format!("{p}.input_layernorm.weight"), h, eps)?,
                self_attn: Attention::load(weights, &format!("{p}.self_attn"), &cfg.attention, h, eps, i, shard)?,
                post_attention_layernorm: RmsNorm::load(
                    weights,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                )?,
                mlp,
            });
            if let Some(progress) = &options.progress {
                progress(i + 1, cfg.num_hidden_layers);
            }
        }
        let lm_head = if cfg.tie_word_embeddings {
            VocabHead::tied(&embed_tokens, cfg.vocab_size, shard)?
        } else {
            VocabHead::load(weights, cfg.names.lm_head, cfg.vocab_size, h, shard)?
        };
        Ok(Decoder {
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::load(weights, &format!("{root}.norm.weight"), h, eps)?,
            lm_head,
            rope: Rope::new(&cfg.rope, cfg.attention.rope_dim()),
            kv_spec: shard.kv_cache_spec(cfg)?,
            dtype: weights.dtype(),
            device: weights.device().clone(),
        })
    }
}

impl CausalLm for Decoder {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn kv_cache_spec(&self) -> KvCacheSpec {
        self.kv_spec
    }

    fn routers(&self) -> Vec<(usize, String)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.mlp {
                FeedForward::Moe(m) => Some((i, m.router().describe())),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    fn forward(&self, ctx: &ForwardCtx<'_>, cache: &KvCache) -> Result<Tensor> {
        let tokens = ctx.num_tokens()?;
        if ctx.positions.dims1()? != tokens || ctx.slot_mapping.dims1()? != tokens {
            return Err(ModelError::Input(
                "token_ids, positions and slot_mapping must have one entry per token".into(),
            ));
        }
        if cache.layers.len() != self.layers.len() || cache.spec != self.kv_spec {
            return Err(ModelError::Input("the cache was not made for this model".into()));
        }
        let ids = match ctx.host_token_ids {
            Some(ids) if ids.len() == tokens => std::borrow::Cow::Borrowed(ids),
            _ => std::borrow::Cow::Owned(ctx.token_ids.to_vec1::<u32>()?),
        };
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let cos_sin = self.rope.cos_sin(ctx.positions)?;
        let mut x = self.embed_tokens.forward(ctx.token_ids, &ids)?; // [T, H]
                                                                     // The last sublayer's output, not yet added to `x`: each norm adds it as it reads the
                                                                     // stream (one fused op on GPUs).
        let mut pending: Option<Tensor> = None;
        // DSA's selected positions, handed from a layer with an indexer to the shared ones.
        let mut selection = None;
        for (layer, cache_layer) in self.layers.iter().zip(&cache.layers) {
            let (stream, normed) = layer.input_layernorm.forward_residual(&x, pending.as_ref())?;
            let attn = layer
                .self_attn
                .forward(&normed, ctx, &self.rope, &cos_sin, cache_layer, &mut selection)?;
            let (stream, normed) = layer.post_attention_layernorm.forward_residual(&stream, Some(&attn))?;
            pending = Some(match &layer.mlp {
                FeedForward::Dense(m) => m.forward(&normed)?,
                FeedForward::Moe(m) => m.forward(&normed, ctx.routing_trace)?,
            });
            x = stream;
        }
        if let Some(ff) = pending {
            x = (x + ff)?;
        }
        let x = match ctx.logits_rows {
            Some(rows) => x.index_select(rows, 0)?,
            None => x,
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}
