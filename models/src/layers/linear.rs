//! A dense projection `y = x Wᵀ (+ b)` with Hugging Face's `[out, in]` weight layout.

use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::loader::Weights;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(w: &Weights, prefix: &str, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_features, in_features])?;
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
        let y = moe_kernels::dense::matmul_nt(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
