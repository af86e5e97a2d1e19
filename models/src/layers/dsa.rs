//! The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1; GLM-5), shared by
//! every DSA family. Per token it writes one key (`k_norm(wk · x)`, first `qk_rope_head_dim`
//! values rotated) into the layer's paged indexer key cache, then scores each query against
//! every earlier key, `sum_h w_h · relu(q_h · k) / sqrt(index_head_dim)` with `q = wq_b ·
//! q_resid` (the MLA query's low-rank residual) and `w = weights_proj · x / sqrt(heads)`, and
//! keeps the `index_topk` best positions ([`moe_kernels::indexer_topk`]).

use candle_core::{DType, Module, Tensor, D};
use moe_kernels::{indexer_topk, write_index_keys, TokenSelection};

use super::linear::Linear;
use super::rope::Rope;
use crate::config::DsaConfig;
use crate::error::Result;
use crate::forward::ForwardCtx;
use crate::loader::Weights;

/// `k_norm` is an `nn.LayerNorm` built with eps 1e-6 in both reference classes.
const K_NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Indexer {
    /// `[heads * head_dim, q_lora_rank]`.
    wq_b: Linear,
    /// `[head_dim, hidden]`.
    wk: Linear,
    /// LayerNorm weight and bias, `[head_dim]` each.
    k_norm_weight: Tensor,
    k_norm_bias: Tensor,
    /// `[heads, hidden]`, kept in f32 as the reference keeps it whatever the model dtype.
    weights_proj: Tensor,
    heads: usize,
    head_dim: usize,
    rope_dim: usize,
    topk: usize,
    interleaved: bool,
}

impl Indexer {
    /// Loads `{prefix}.indexer.*` (`prefix` = `model.layers.{i}.self_attn`).
    pub fn load(
        w: &Weights,
        prefix: &str,
        cfg: &DsaConfig,
        hidden: usize,
        q_lora_rank: usize,
        rope_dim: usize,
    ) -> Result<Self> {
        let p = format!("{prefix}.indexer");
        let (heads, dim) = (cfg.index_n_heads, cfg.index_head_dim);
        Ok(Indexer {
            wq_b: Linear::load(w, &format!("{p}.wq_b"), q_lora_rank, heads * dim, false)?,
            wk: Linear::load(w, &format!("{p}.wk"), hidden, dim, false)?,
            k_norm_weight: w.get(&format!("{p}.k_norm.weight"), &[dim])?,
            k_norm_bias: w.get(&format!("{p}.k_norm.bias"), &[dim])?,
            weights_proj: w.get_as(&format!("{p}.weights_proj.weight"), &[heads, hidden], DType::F32)?,
            heads,
            head_dim: dim,
            rope_dim,
            topk: cfg.index_topk,
            interleaved: cfg.rope_interleaved,
        })
    }

    /// Rotates the first `rope_dim` values of `x`: `[tokens, heads, head_dim]`.
    fn rotate(&self, x: &Tensor, rope: &Rope, cos_sin: &(Tensor, Tensor)) -> Result<Tensor> {
        let rot = rope.apply_pairs(
            &x.narrow(2, 0, self.rope_dim)?,
            &cos_sin.0,
            &cos_sin.1,
            self.interleaved,
        )?;
        if self.rope_dim == self.head_dim {
            return Ok(rot);
        }
        let pass = x.narrow(2, self.rope_dim, self.head_dim - self.rope_dim)?;
        Ok(Tensor::cat(&[rot, pass], 2)?)
    }

    /// LayerNorm over the last dim, in f32, back in `x`'s dtype.
    fn k_norm(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + K_NORM_EPS)?.sqrt()?)?;
        let out = normed
            .broadcast_mul(&self.k_norm_weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.k_norm_bias.to_dtype(DType::F32)?)?;
        Ok(out.to_dtype(x.dtype())?)
    }

    /// `x`: `[tokens, hidden]` (the layer's normed input), `q_resid`: `[tokens, q_lora_rank]`.
    /// Writes this step's keys into `key_cache` (`[num_blocks, block_size, index_head_dim]`)
    /// at `ctx.slot_mapping`, then picks each query's positions.
    pub fn forward(
        &self,
        x: &Tensor,
        q_resid: &Tensor,
        ctx: &ForwardCtx<'_>,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
        key_cache: &Tensor,
    ) -> Result<TokenSelection> {
        let tokens = x.dims2()?.0;
        let k = self.k_norm(&self.wk.forward(x)?)?.reshape((tokens, 1, self.head_dim))?;
        let k = self.rotate(&k, rope, cos_sin)?.reshape((tokens, self.head_dim))?;
        write_index_keys(key_cache, &k, ctx.slot_mapping)?;
        if ctx.seqs.iter().all(|s| s.context_len <= self.topk) {
            // Nobody sees more than index_topk positions: everything visible is selected.
            return Ok(TokenSelection::all_visible(ctx.seqs, tokens));
        }
        let q = self
            .wq_b
            .forward(q_resid)?
            .reshape((tokens, self.heads, self.head_dim))?;
        let q = self.rotate(&q, rope, cos_sin)?;
        let weights = (x.to_dtype(DType::F32)?.matmul(&self.weights_proj.t()?)? * (self.heads as f64).powf(-0.5))?;
        let scale = (self.head_dim as f64).powf(-0.5);
        Ok(indexer_topk(&q, &weights, key_cache, ctx.seqs, self.topk, scale)?)
    }
}
