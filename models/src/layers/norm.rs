//! RMSNorm as DeepSeek defines it: normalize in f32, cast back, then scale by the weight.

use candle_core::Tensor;

use crate::error::Result;
use crate::loader::Weights;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[dim]`.
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(name, &[dim])?,
            eps,
        })
    }

    /// `x`: `[tokens, dim]` -> same shape and dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, normed) = moe_kernels::rmsnorm_residual(x, None, &self.weight, self.eps)?;
        Ok(normed)
    }

    /// The residual stream's add and this norm in one op: `(x + residual, norm(x +
    /// residual))`, or `(x, norm(x))` without a residual. `x`, `residual`: `[tokens, dim]`.
    pub fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        Ok(moe_kernels::rmsnorm_residual(x, residual, &self.weight, self.eps)?)
    }
}
