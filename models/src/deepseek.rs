//! The DeepSeek MLA + MoE decoder (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`: DeepSeek
//! V2, V2-Lite, V2.5, V3, V3.1, R1, Kimi K2, Moonlight), assembled from the shared layers.
//!
//! Owns the weights and the forward over a flat, paged batch. V2 and V3 differ only in config
//! (routing, defaults), which the shared layers read; there is no per-version code path.

use candle_core::{DType, Device, Module, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::{ForwardCtx, LatentCache};
use crate::layers::linear::Linear;
use crate::layers::mla::Mla;
use crate::layers::mlp::Mlp;
use crate::layers::moe::{router::RouterSpec, MoeBlock};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::loader::Weights;

#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Mla,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
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
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("router", &self.router)
            .field("progress", &self.progress.is_some())
            .field("reference_experts", &self.reference_experts)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct DeepseekModel {
    config: ModelConfig,
    /// `[vocab, hidden]`.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]` (the embedding when `tie_word_embeddings`).
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl DeepseekModel {
    /// Builds the model from `weights`, reading only the tensors it uses.
    pub fn load(config: &ModelConfig, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let cfg = config;
        let h = cfg.hidden_size;
        let embed_tokens = weights.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mlp = if cfg.is_moe_layer(i) {
                FeedForward::Moe(MoeBlock::load(weights, i, cfg, options)?)
            } else {
                FeedForward::Dense(Mlp::load(
                    weights,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?)
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(weights, &format!("{p}.input_layernorm.weight"), h, cfg.rms_norm_eps)?,
                self_attn: Mla::load(weights, &format!("{p}.self_attn"), cfg)?,
                post_attention_layernorm: RmsNorm::load(
                    weights,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                mlp,
            });
            if let Some(progress) = &options.progress {
                progress(i + 1, cfg.num_hidden_layers);
            }
        }
        let lm_head = if cfg.tie_word_embeddings {
            Linear {
                weight: embed_tokens.clone(),
                bias: None,
            }
        } else {
            Linear::load(weights, "lm_head", h, cfg.vocab_size, false)?
        };
        Ok(DeepseekModel {
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::load(weights, "model.norm.weight", h, cfg.rms_norm_eps)?,
            lm_head,
            rope: Rope::new(&cfg.rope, cfg.qk_rope_head_dim),
            dtype: weights.dtype(),
            device: weights.device().clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Descriptions of the router of each MoE layer (`(layer, description)`).
    pub fn routers(&self) -> Vec<(usize, String)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.mlp {
                FeedForward::Moe(m) => Some((i, m.router().describe())),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    /// A latent cache for this model with `num_blocks` blocks of `block_size` tokens.
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<LatentCache> {
        LatentCache::new(
            self.config.num_hidden_layers,
            num_blocks,
            block_size,
            self.config.latent_cache_dim(),
            self.dtype,
            &self.device,
        )
    }

    /// Runs the batch in `ctx`, writing its latents into `cache`.
    /// Returns f32 logits `[rows, vocab]` for `ctx.logits_rows` (all rows when `None`).
    pub fn forward(&self, ctx: &ForwardCtx<'_>, cache: &LatentCache) -> Result<Tensor> {
        let tokens = ctx.num_tokens()?;
        if ctx.positions.dims1()? != tokens || ctx.slot_mapping.dims1()? != tokens {
            return Err(ModelError::Input(
                "token_ids, positions and slot_mapping must have one entry per token".into(),
            ));
        }
        if cache.layers.len() != self.layers.len() || cache.latent_dim != self.config.latent_cache_dim() {
            return Err(ModelError::Input("the cache was not made for this model".into()));
        }
        let ids = ctx.token_ids.to_vec1::<u32>()?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let cos_sin = self.rope.cos_sin(ctx.positions)?;
        let mut x = self.embed_tokens.index_select(ctx.token_ids, 0)?; // [T, H]
        for (layer, cache_layer) in self.layers.iter().zip(&cache.layers) {
            let attn = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x)?,
                ctx,
                &self.rope,
                &cos_sin,
                cache_layer,
            )?;
            x = (x + attn)?;
            let normed = layer.post_attention_layernorm.forward(&x)?;
            let ff = match &layer.mlp {
                FeedForward::Dense(m) => m.forward(&normed)?,
                FeedForward::Moe(m) => m.forward(&normed, ctx.routing_trace)?,
            };
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
