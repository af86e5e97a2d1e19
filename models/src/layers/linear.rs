//! A dense projection `y = x Wᵀ (+ b)` with Hugging Face's `[out, in]` weight layout; the
//! weight plain or kept quantized as the checkpoint ships it.

use candle_core::{Module, Tensor};
use moe_kernels::dense::Weight;

use crate::error::Result;
use crate::loader::Weights;

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
        let weight = w.matrix(prefix, [out_features, in_features])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_features])?)
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
