//! Multi-head Latent Attention (DeepSeek-V2 §2.1), shared by every MLA model family.
//!
//! Owns the attention projections and the absorbed per-head matrices. Each step it writes the
//! normalized `c_kv` and rotated `k_pe` of the new tokens into the paged latent cache, then
//! attends in absorbed form: `q_nope · W_UK` turns each head's query into the latent space, so
//! attention is MQA over the cache rows (key dim `kv_lora_rank + rope`, value dim
//! `kv_lora_rank`), and the result goes through `W_UV` and `o_proj`. It never expands the
//! cache into per-head keys and values. With DeepSeek Sparse Attention ([`super::dsa`]) each
//! query attends only to the positions its layer's indexer (or, in GLM-5's shared layers, the
//! previous layer's) selected.

use candle_core::{Module, Tensor};
use moe_kernels::{
    absorb_queries, expand_values, paged_mla_attention, sparse_mla_attention, write_latent_cache, TokenSelection,
};

use super::dsa::Indexer;
use super::linear::{Linear, RowParallelLinear};
use super::norm::RmsNorm;
use super::rope::Rope;
use crate::config::MlaConfig;
use crate::error::{ModelError, Result};
use crate::forward::ForwardCtx;
use crate::loader::Weights;
use crate::parallel::Shard;

/// transformers and DeepSeek's code build `q_a_layernorm` and `kv_a_layernorm` with their
/// default epsilon, not `rms_norm_eps`.
const LORA_NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
enum QueryProj {
    /// `q_proj`: `[heads * qk_head_dim, hidden]`.
    Direct(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// DSA in one layer: its own indexer, or none (it reuses the selection of the layer before).
#[derive(Debug, Clone)]
struct Sparse {
    indexer: Option<Box<Indexer>>,
}

#[derive(Debug, Clone)]
pub struct Mla {
    sparse: Option<Sparse>,
    q: QueryProj,
    /// `[kv_lora_rank + rope_dim, hidden]`.
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    /// `W_UK` per head (this rank's heads), transposed: `[heads, kv_lora_rank,
    /// qk_nope_head_dim]`, rows along the product's inner dimension.
    w_uk_t: Tensor,
    /// `W_UV` per head as `kv_b_proj` holds it: `[heads, v_head_dim, kv_lora_rank]`.
    w_uv: Tensor,
    /// This rank's heads' columns of `o_proj`, summed over the ranks.
    o_proj: RowParallelLinear,
    /// Heads on this rank.
    heads: usize,
    nope_dim: usize,
    rope_dim: usize,
    kv_lora_rank: usize,
    scale: f64,
}

impl Mla {
    /// Loads `{prefix}.*` (`prefix` = `model.layers.{layer}.self_attn`) for a model of width
    /// `hidden`: the heads `shard` holds (the low-rank down-projections, norms and DSA
    /// indexer whole).
    pub fn load(
        w: &Weights,
        prefix: &str,
        cfg: &MlaConfig,
        hidden: usize,
        layer: usize,
        shard: &Shard,
    ) -> Result<Self> {
        let all_heads = cfg.num_heads;
        let mine = shard.split(all_heads, "num_attention_heads")?;
        let heads = mine.len();
        let qk = cfg.qk_head_dim();
        let bias = cfg.bias;
        let q_rows = mine.start * qk..mine.end * qk;
        let q = match cfg.q_lora_rank {
            None => QueryProj::Direct(Linear::load_rows(
                w,
                &format!("{prefix}.q_proj"),
                hidden,
                all_heads * qk,
                false,
                q_rows,
            )?),
            Some(rank) => QueryProj::LowRank {
                a: Linear::load(w, &format!("{prefix}.q_a_proj"), hidden, rank, bias)?,
                norm: RmsNorm::load(w, &format!("{prefix}.q_a_layernorm.weight"), rank, LORA_NORM_EPS)?,
                b: Linear::load_rows(w, &format!("{prefix}.q_b_proj"), rank, all_heads * qk, false, q_rows)?,
            },
        };
        let sparse = match &cfg.sparse {
            None => None,
            Some(d) => Some(Sparse {
                indexer: match (d.own_indexer.get(layer).copied().unwrap_or(true), cfg.q_lora_rank) {
                    (false, _) => None,
                    (true, Some(rank)) => Some(Box::new(Indexer::load(
                        w,
                        prefix,
                        d,
                        hidden,
                        rank,
                        cfg.qk_rope_head_dim,
                    )?)),
                    (true, None) => {
                        return Err(ModelError::Input(
                            "DSA's indexer reads the query's low-rank residual: q_lora_rank must be set".into(),
                        ))
                    }
                },
            }),
        };
        let r = cfg.kv_lora_rank;
        // The absorbed form needs W_UK and W_UV as plain matrices: a quantized kv_b_proj
        // (FP8 checkpoints) is decoded once here (0.1-2% of a model's weights).
        let per_head = cfg.qk_nope_head_dim + cfg.v_head_dim;
        let kv_b = w
            .matrix_part(
                &format!("{prefix}.kv_b_proj"),
                [all_heads * per_head, r],
                mine.start * per_head..mine.end * per_head,
                0..r,
            )?
            .to_dense(w.dtype())?;
        let kv_b = kv_b.reshape((heads, cfg.qk_nope_head_dim + cfg.v_head_dim, r))?;
        let w_uk_t = kv_b.narrow(1, 0, cfg.qk_nope_head_dim)?.transpose(1, 2)?.contiguous()?;
        let w_uv = kv_b.narrow(1, cfg.qk_nope_head_dim, cfg.v_head_dim)?.contiguous()?;
        Ok(Mla {
            sparse,
            q,
            kv_a_proj_with_mqa: Linear::load(
                w,
                &format!("{prefix}.kv_a_proj_with_mqa"),
                hidden,
                r + cfg.qk_rope_head_dim,
                bias,
            )?,
            kv_a_layernorm: RmsNorm::load(w, &format!("{prefix}.kv_a_layernorm.weight"), r, LORA_NORM_EPS)?,
            w_uk_t,
            w_uv,
            o_proj: RowParallelLinear::load(
                w,
                &format!("{prefix}.o_proj"),
                all_heads * cfg.v_head_dim,
                hidden,
                bias,
                mine.start * cfg.v_head_dim..mine.end * cfg.v_head_dim,
                shard,
            )?,
            heads,
            nope_dim: cfg.qk_nope_head_dim,
            rope_dim: cfg.qk_rope_head_dim,
            kv_lora_rank: r,
            scale: cfg.softmax_scale,
        })
    }

    /// `x`: `[tokens, hidden]` (normed) -> `[tokens, hidden]`. Writes the tokens' latents into
    /// `cache` (`[num_blocks, block_size, kv_lora_rank + rope]`) at `ctx.slot_mapping` first, so
    /// each token attends to itself and everything cached before it in its sequence.
    ///
    /// With DSA, `index_keys` is this layer's indexer key cache (a layer with its own
    /// indexer), and `selection` carries the positions picked from layer to layer: a layer
    /// with an indexer replaces it, a shared layer reads it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx<'_>,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
        cache: &Tensor,
        index_keys: Option<&Tensor>,
        selection: &mut Option<TokenSelection>,
    ) -> Result<Tensor> {
        let tokens = x.dims2()?.0;
        let dtype = x.dtype();
        let (q, q_resid) = match &self.q {
            QueryProj::Direct(p) => (p.forward(x)?, None),
            QueryProj::LowRank { a, norm, b } => {
                let resid = norm.forward(&a.forward(x)?)?;
                (b.forward(&resid)?, Some(resid))
            }
        };
        let q = q.reshape((tokens, self.heads, self.nope_dim + self.rope_dim))?;
        let q_nope = q.narrow(2, 0, self.nope_dim)?;
        let q_pe = rope.apply(&q.narrow(2, self.nope_dim, self.rope_dim)?, &cos_sin.0, &cos_sin.1)?;

        let kv = self.kv_a_proj_with_mqa.forward(x)?;
        let c_kv = self
            .kv_a_layernorm
            .forward(&kv.narrow(1, 0, self.kv_lora_rank)?.contiguous()?)?;
        let k_pe = kv
            .narrow(1, self.kv_lora_rank, self.rope_dim)?
            .reshape((tokens, 1, self.rope_dim))?;
        let k_pe = rope
            .apply(&k_pe, &cos_sin.0, &cos_sin.1)?
            .reshape((tokens, self.rope_dim))?;
        let latents = Tensor::cat(&[c_kv, k_pe], 1)?;
        write_latent_cache(cache, &latents, ctx.slot_mapping)?;

        // Absorb W_UK: [tokens, heads, nope] -> [tokens, heads, r + rope] f32, q_pe appended.
        let q_full = absorb_queries(&q_nope, &q_pe, &self.w_uk_t)?;
        let attn = match &self.sparse {
            None => paged_mla_attention(&q_full, cache, ctx.seqs, self.kv_lora_rank, self.scale)?,
            Some(sparse) => {
                if let Some(indexer) = &sparse.indexer {
                    let (Some(keys), Some(resid)) = (index_keys, q_resid.as_ref()) else {
                        return Err(ModelError::Input(
                            "a DSA layer needs its indexer key cache and a low-rank query".into(),
                        ));
                    };
                    *selection = Some(indexer.forward(x, resid, ctx, rope, cos_sin, keys)?);
                }
                let chosen = selection.as_ref().ok_or_else(|| {
                    ModelError::Input("a shared DSA layer needs the selection of an earlier layer".into())
                })?;
                // Always the sparse kernel, even when every position is selected: it computes
                // each row alone, so a position's result cannot depend on how the batch was cut
                // (chunked prefill, a prefix hit, decode), and no rounding difference can move
                // a later layer's indexer across a top-k boundary.
                sparse_mla_attention(&q_full, cache, ctx.seqs, chosen, self.kv_lora_rank, self.scale)?
            }
        }; // [T, H, r] f32

        // Apply W_UV: [tokens, heads, r] -> [tokens, heads * v].
        let out = expand_values(&attn, &self.w_uv, dtype)?;
        self.o_proj.forward(&out)
    }
}
