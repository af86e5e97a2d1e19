//! Rotary embedding with a step's per-token tables, one entry point for every device: the
//! CUDA kernel (`kernels/cuda/rope.cu`, on a copy) for bf16 or f32 on a GPU, the reference of
//! [`crate::reference::rope`] anywhere else.

use candle_core::{Result, Tensor};

/// Rotates `x`: `[tokens, heads, rot]` (any float dtype, any layout) by `cos`, `sin`:
/// `[tokens, rot/2]` f32 (row `t` for token `t`), interleaved pairs `(x[2i], x[2i+1])` or, with
/// `interleaved == false`, `(x[i], x[i + rot/2])`. Computed in f32; returns a new contiguous
/// tensor in `x`'s dtype (`x` is not written).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && matches!(x.dtype(), candle_core::DType::BF16 | candle_core::DType::F32)
        && x.dims3()?.2.is_multiple_of(2)
    {
        use candle_core::DType;
        // A fresh buffer for the kernel to rotate in place: a contiguous `x` shares its storage
        // with its clone, so it is copied explicitly.
        let y = if x.is_contiguous() { x.copy()? } else { x.contiguous()? };
        let (cos, sin) = (
            cos.to_dtype(DType::F32)?.contiguous()?,
            sin.to_dtype(DType::F32)?.contiguous()?,
        );
        crate::cuda::rope_inplace(Some(&y), None, &cos, &sin, interleaved)?;
        return Ok(y);
    }
    crate::reference::rope(x, cos, sin, interleaved)
}
