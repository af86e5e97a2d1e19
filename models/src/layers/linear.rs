//! A dense projection `y = x Wᵀ (+ b)` with Hugging Face's `[out, in]` weight layout; the
//! weight plain or kept quantized as the checkpoint ships it. Under tensor parallelism a
//! rank holds rows of it (column-parallel: [`Linear::load_rows`]) or columns of it
//! ([`RowParallelLinear`], whose partial products all ranks sum).

use std::ops::Range;

use candle_core::{Module, Tensor};
use moe_kernels::dense::Weight;

use crate::error::Result;
use crate::loader::Weights;
use crate::parallel::Shard;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Weight,
    /// `[out_features]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (or its quantized form; and `{prefix}.bias` when `bias`).
    pub fn load(w: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Self::load_rows(w, prefix, in_features, out_features, bias, 0..out_features)
    }

    /// Output features `rows` of `{prefix}` (and of its bias): a column-parallel rank's part.
    pub fn load_rows(
        w: &Weights,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        rows: Range<usize>,
    ) -> Result<Self> {
        let weight = w.matrix_part(prefix, [out_features, in_features], rows.clone(), 0..in_features)?;
        let bias = if bias {
            Some(w.get_part(&format!("{prefix}.bias"), &[out_features], &[rows])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Linear {
    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.matmul_nt(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// A projection whose input features are split over the ranks: each rank multiplies its
/// share of `x`'s features by its columns of `W` and the partial products are summed over
/// the ranks ([`RowParallelLinear::reduce`]); the bias is added once, after the sum. On one
/// rank it is a plain [`Linear`].
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    /// This rank's columns `[out, in / ranks]` (with the bias on one rank).
    part: Linear,
    /// `[out]`: the bias, added after the sum when split.
    bias_after_sum: Option<Tensor>,
    shard: Shard,
}

impl RowParallelLinear {
    /// Input features `cols` of `{prefix}` (`[out_features, in_features]`) for `shard`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        cols: Range<usize>,
        shard: &Shard,
    ) -> Result<Self> {
        let weight = w.matrix_part(prefix, [out_features, in_features], 0..out_features, cols)?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        let (part_bias, bias_after_sum) = if shard.is_single() { (bias, None) } else { (None, bias) };
        Ok(RowParallelLinear {
            part: Linear {
                weight,
                bias: part_bias,
            },
            bias_after_sum,
            shard: shard.clone(),
        })
    }

    /// `x`: `[tokens, in / ranks]` -> this rank's partial product `[tokens, out]`.
    pub fn partial(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.part.forward(x)?)
    }

    /// Sums partial products (of this layer, plus anything added to them) over the ranks and
    /// adds the bias: `[tokens, out]`.
    pub fn reduce(&self, partial: &Tensor) -> Result<Tensor> {
        self.finish(self.shard.all_reduce(partial)?)
    }

    /// Adds the bias to a sum already taken over the ranks (e.g. by a reduce-scatter).
    pub fn finish(&self, summed: Tensor) -> Result<Tensor> {
        match &self.bias_after_sum {
            Some(b) => Ok(summed.broadcast_add(b)?),
            None => Ok(summed),
        }
    }

    /// `x`: `[tokens, in / ranks]` -> `[tokens, out]`, summed over the ranks.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.reduce(&self.partial(x)?)
    }
}
