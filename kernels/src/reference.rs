//! Plain implementations of the fused ops that have no counterpart in [`crate::mla`]: residual
//! add + RMSNorm and rotary embedding. `moe-models`' `RmsNorm` and `Rope` run these (so the
//! model and the CUDA kernels' tests share one reference).

use candle_core::{DType, Result, Tensor, D};

/// `h = x + residual` (rounded to `x`'s dtype) and `y = dtype(h / sqrt(mean(h²) + eps)) * w`.
///
/// * `x`, `residual`: `[rows, dim]`; `weight`: `[dim]`. Returns `(h, y)`, both `[rows, dim]`.
pub fn rmsnorm_residual(x: &Tensor, residual: Option<&Tensor>, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let dtype = x.dtype();
    let h = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let hf = h.to_dtype(DType::F32)?;
    let mean_sq = hf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = hf.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    let y = normed.to_dtype(dtype)?.broadcast_mul(weight)?;
    Ok((h, y))
}

/// Rotates `x`: `[tokens, heads, rot]` by per-token tables `cos`, `sin`: `[tokens, rot/2]` f32,
/// interleaved pairs `(x[2i], x[2i+1])` or, with `interleaved == false`, `(x[i], x[i + rot/2])`.
/// Computed in f32, returned in `x`'s dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (tokens, heads, dim) = x.dims3()?;
    let half = dim / 2;
    let xf = x.to_dtype(DType::F32)?;
    let cos = cos.reshape((tokens, 1, half))?;
    let sin = sin.reshape((tokens, 1, half))?;
    let out = if interleaved {
        let pairs = xf.reshape((tokens, heads, half, 2))?;
        let a = pairs.narrow(3, 0, 1)?.squeeze(3)?;
        let b = pairs.narrow(3, 1, 1)?.squeeze(3)?;
        let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
        Tensor::stack(&[ra, rb], 3)?.reshape((tokens, heads, dim))?
    } else {
        let a = xf.narrow(2, 0, half)?;
        let b = xf.narrow(2, half, half)?;
        let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
        Tensor::cat(&[ra, rb], 2)?
    };
    out.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rmsnorm_residual_adds_then_normalizes() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?;
        let r = Tensor::new(&[[1f32, 0.], [0., 0.]], &dev)?;
        let w = Tensor::new(&[1f32, 2.], &dev)?;
        let (h, y) = rmsnorm_residual(&x, Some(&r), &w, 0.0)?;
        assert_eq!(h.to_vec2::<f32>()?, vec![vec![2., 2.], vec![3., 4.]]);
        let y = y.to_vec2::<f32>()?;
        assert!((y[0][0] - 1.0).abs() < 1e-6 && (y[0][1] - 2.0).abs() < 1e-6);
        let n = (12.5f32).sqrt();
        assert!((y[1][0] - 3.0 / n).abs() < 1e-6 && (y[1][1] - 8.0 / n).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn rope_rotates_interleaved_pairs() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 0., 0., 1.]]], &dev)?;
        let cos = Tensor::new(&[[0f32, 1.]], &dev)?;
        let sin = Tensor::new(&[[1f32, 0.]], &dev)?;
        let y = rope(&x, &cos, &sin, true)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![0., 1., 0., 1.]);
        Ok(())
    }
}
