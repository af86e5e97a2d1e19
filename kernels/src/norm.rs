//! RMSNorm with an optional fused residual add, one entry point for every device: the CUDA
//! kernel (`kernels/cuda/rmsnorm_residual.cu`, one pass) for bf16 or f32 on a GPU, the
//! reference of [`crate::reference::rmsnorm_residual`] anywhere else.

use candle_core::{Result, Tensor};

/// `h = x + residual` (rounded to `x`'s dtype; `x` itself without a residual) and `y =
/// dtype(h / sqrt(mean(h²) + eps)) * weight`, the order DeepSeek's RMSNorm rounds in.
///
/// * `x`, `residual`: `[rows, dim]`, one dtype; `weight`: `[dim]`, the same dtype.
///
/// Returns `(h, y)`, both `[rows, dim]`. Neither input is written.
pub fn rmsnorm_residual(x: &Tensor, residual: Option<&Tensor>, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && matches!(x.dtype(), candle_core::DType::BF16 | candle_core::DType::F32)
        && weight.dtype() == x.dtype()
        && residual.is_none_or(|r| r.dtype() == x.dtype())
    {
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        return crate::cuda::rmsnorm_residual(&x.contiguous()?, residual.as_ref(), &weight.contiguous()?, eps);
    }
    crate::reference::rmsnorm_residual(x, residual, weight, eps)
}
