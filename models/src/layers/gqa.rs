//! Grouped-query attention over a paged per-head K/V cache, shared by every GQA family
//! (Qwen3-MoE, Mixtral, MiniMax-M2, GLM-4.5): q/k/v projections with optional biases,
//! optional QK-norm (per head, or over the whole projection), RoPE on the first
//! `rotary_dim` values of each head, then causal attention of each query head over its kv
//! head's cached keys and values (`moe_kernels::paged_gqa_attention`). Under tensor
//! parallelism a rank holds its query heads, the kv heads they read (split, or replicated
//! when there are fewer kv heads than ranks) and its columns of `o_proj`; a QK-norm over the
//! whole projection sums its squares over the ranks.

use candle_core::{DType, Module, Tensor};
use moe_kernels::{paged_gqa_attention, write_kv_cache};

use super::linear::{Linear, RowParallelLinear};
use super::norm::RmsNorm;
use super::rope::Rope;
use crate::config::{GqaConfig, QkNorm};
use crate::error::Result;
use crate::forward::ForwardCtx;
use crate::loader::Weights;
use crate::parallel::Shard;

#[derive(Debug, Clone)]
enum QkNorms {
    None,
    /// `[head_dim]` each, applied to every head.
    PerHead {
        q: RmsNorm,
        k: RmsNorm,
    },
    /// `[num_heads * head_dim]` and `[num_kv_heads * head_dim]`, over the whole projections
    /// (this rank's part of each under tensor parallelism).
    Whole {
        q: RmsNorm,
        k: RmsNorm,
    },
}

#[derive(Debug, Clone)]
pub struct Gqa {
    /// `[heads * head_dim, hidden]` (this rank's heads, as every projection here).
    q_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`.
    k_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`.
    v_proj: Linear,
    /// `[hidden, heads * head_dim]`: this rank's columns, summed over the ranks.
    o_proj: RowParallelLinear,
    norms: QkNorms,
    heads: usize,
    kv_heads: usize,
    /// Values the whole-projection QK-norms average over (all ranks' heads).
    whole_q_dim: usize,
    whole_k_dim: usize,
    shard: Shard,
    head_dim: usize,
    rotary_dim: usize,
    scale: f64,
}

impl Gqa {
    /// Loads `{prefix}.{q,k,v,o}_proj` (and `q_norm`/`k_norm`) for a model of width
    /// `hidden`, the heads `shard` holds; `eps` is the QK-norm epsilon (the model's
    /// `rms_norm_eps`).
    pub fn load(w: &Weights, prefix: &str, cfg: &GqaConfig, hidden: usize, eps: f64, shard: &Shard) -> Result<Self> {
        let (h, kv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads = shard.split(h, "num_attention_heads")?;
        let kv_heads = shard.kv_heads(kv)?;
        let q_rows = heads.start * d..heads.end * d;
        let kv_rows = kv_heads.start * d..kv_heads.end * d;
        let norm = |name: &str, dim: usize| RmsNorm::load(w, &format!("{prefix}.{name}.weight"), dim, eps);
        let part_norm = |name: &str, dim: usize, rows: std::ops::Range<usize>| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get_part(&format!("{prefix}.{name}.weight"), &[dim], &[rows])?,
                eps,
            })
        };
        let norms = match cfg.qk_norm {
            QkNorm::None => QkNorms::None,
            QkNorm::PerHead => QkNorms::PerHead {
                q: norm("q_norm", d)?,
                k: norm("k_norm", d)?,
            },
            QkNorm::Whole => QkNorms::Whole {
                q: part_norm("q_norm", h * d, q_rows.clone())?,
                k: part_norm("k_norm", kv * d, kv_rows.clone())?,
            },
        };
        let bias = cfg.qkv_bias;
        Ok(Gqa {
            q_proj: Linear::load_rows(w, &format!("{prefix}.q_proj"), hidden, h * d, bias, q_rows.clone())?,
            k_proj: Linear::load_rows(w, &format!("{prefix}.k_proj"), hidden, kv * d, bias, kv_rows.clone())?,
            v_proj: Linear::load_rows(w, &format!("{prefix}.v_proj"), hidden, kv * d, bias, kv_rows)?,
            o_proj: RowParallelLinear::load(w, &format!("{prefix}.o_proj"), h * d, hidden, cfg.o_bias, q_rows, shard)?,
            norms,
            heads: heads.len(),
            kv_heads: kv_heads.len(),
            whole_q_dim: h * d,
            whole_k_dim: kv * d,
            shard: shard.clone(),
            head_dim: d,
            rotary_dim: cfg.rotary_dim,
            scale: cfg.softmax_scale,
        })
    }

    /// Rotates the first `rotary_dim` values of each head of `x`: `[tokens, heads, head_dim]`.
    fn rotate(&self, x: &Tensor, rope: &Rope, cos_sin: &(Tensor, Tensor)) -> Result<Tensor> {
        if self.rotary_dim == self.head_dim {
            return rope.apply(x, &cos_sin.0, &cos_sin.1);
        }
        let rotated = rope.apply(&x.narrow(2, 0, self.rotary_dim)?, &cos_sin.0, &cos_sin.1)?;
        let pass = x.narrow(2, self.rotary_dim, self.head_dim - self.rotary_dim)?;
        Ok(Tensor::cat(&[rotated, pass], 2)?)
    }

    /// `x`: `[tokens, hidden]` (normed) -> `[tokens, hidden]`. Writes the tokens' K and V into
    /// `k_cache` / `v_cache` (`[num_blocks, block_size, kv_heads, head_dim]`) at
    /// `ctx.slot_mapping` first, so each token attends to itself and its sequence's past.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx<'_>,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Tensor> {
        let tokens = x.dims2()?.0;
        let (mut q, mut k) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?);
        let v = self.v_proj.forward(x)?;
        if let QkNorms::Whole { q: qn, k: kn } = &self.norms {
            if self.shard.is_single() {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            } else {
                // Replicated kv heads count once in the sum over all heads.
                let counts = self.shard.first_kv_replica(self.whole_k_dim / self.head_dim);
                q = self.split_norm(&q, qn, self.whole_q_dim, true)?;
                k = self.split_norm(&k, kn, self.whole_k_dim, counts)?;
            }
        }
        let mut q = q.reshape((tokens, self.heads, self.head_dim))?;
        let mut k = k.reshape((tokens, self.kv_heads, self.head_dim))?;
        if let QkNorms::PerHead { q: qn, k: kn } = &self.norms {
            q = qn
                .forward(&q.reshape((tokens * self.heads, self.head_dim))?)?
                .reshape((tokens, self.heads, self.head_dim))?;
            k = kn
                .forward(&k.reshape((tokens * self.kv_heads, self.head_dim))?)?
                .reshape((tokens, self.kv_heads, self.head_dim))?;
        }
        let q = self.rotate(&q, rope, cos_sin)?;
        let k = self.rotate(&k, rope, cos_sin)?;
        let v = v.reshape((tokens, self.kv_heads, self.head_dim))?;
        write_kv_cache(k_cache, v_cache, &k, &v, ctx.slot_mapping)?;
        let attn = paged_gqa_attention(&q, k_cache, v_cache, ctx.seqs, self.scale)?; // [T, H, D] f32
        let out = attn
            .to_dtype(x.dtype())?
            .reshape((tokens, self.heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    /// RMSNorm over a projection split across the ranks: `x` (`[tokens, part]`) is this
    /// rank's part of `whole` values; the squares are summed over the ranks (`counts`: this
    /// rank's part is not a replica already counted by another rank). Same arithmetic as
    /// [`RmsNorm::forward`] otherwise.
    fn split_norm(&self, x: &Tensor, norm: &RmsNorm, whole: usize, counts: bool) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let local = xf.sqr()?.sum_keepdim(1)?;
        let local = if counts { local } else { local.zeros_like()? };
        let mean_sq = (self.shard.all_reduce(&local)? / whole as f64)?;
        let normed = xf.broadcast_div(&(mean_sq + norm.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(x.dtype())?.broadcast_mul(&norm.weight)?)
    }
}
