//! `y = x Wᵀ` for a Hugging Face `[out, in]` weight, with a CPU path for
//! bf16 and f16 weights that widens the weight to f32 one tile of rows at a
//! time, inside the product.
//!
//! candle 0.11's CPU matmul has no bf16 kernel: it widens the *whole storage*
//! of both operands to f32 first. For a view into a stacked `[E, N, K]` expert
//! tensor that is every expert's weights, on every call, which made bf16
//! decoding hundreds of times slower than f32. Here each tile of
//! [`TILE_ROWS`] weight rows is widened into a thread-local buffer (it stays
//! in cache) and multiplied by the `gemm` crate's f32 kernel; tiles run in
//! parallel on rayon's pool. The weight is read once per call, at half the
//! bytes of f32. Other devices and dtypes go through candle's matmul.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Weight rows per tile: 32 rows of a 2048-wide weight widen to 256 KiB of f32.
pub const TILE_ROWS: usize = 32;

/// `x Wᵀ`: `x` `[m, k]` (any float dtype), `w` `[n, k]` -> `[m, n]` in `x`'s dtype.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let half_on_cpu = w.device().is_cpu() && matches!(w.dtype(), DType::BF16 | DType::F16);
    if !half_on_cpu || x.rank() != 2 || w.rank() != 2 {
        return x.matmul(&w.t()?);
    }
    let (m, k) = x.dims2()?;
    let (n, k_w) = w.dims2()?;
    if k != k_w {
        candle_core::bail!(
            "matmul_nt: x {:?} and w {:?} disagree on the inner dimension",
            x.shape(),
            w.shape()
        );
    }
    let w = if w.layout().contiguous_offsets().is_some() {
        w.clone()
    } else {
        w.contiguous()?
    };
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("matmul_nt: weight not contiguous after contiguous()");
    };
    let out = match &*storage {
        Storage::Cpu(CpuStorage::BF16(v)) => {
            tiled(&xs, m, k, &v[start..end], n, |src, dst| src.convert_to_f32_slice(dst))
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            tiled(&xs, m, k, &v[start..end], n, |src, dst| src.convert_to_f32_slice(dst))
        }
        _ => candle_core::bail!("matmul_nt: expected a bf16/f16 CPU weight"),
    };
    drop(storage);
    Tensor::from_vec(out, (m, n), x.device())?.to_dtype(x.dtype())
}

/// `x` `[m, k]` f32 times the transpose of `w` `[n, k]` (rows widened by `widen`), as `[m, n]`.
fn tiled<T: Sync>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, widen: fn(&[T], &mut [f32])) -> Vec<f32> {
    let tiles = n.div_ceil(TILE_ROWS);
    let parts: Vec<Vec<f32>> = (0..tiles)
        .into_par_iter()
        .map_init(Vec::new, |buf: &mut Vec<f32>, t| {
            let r0 = t * TILE_ROWS;
            let rows = TILE_ROWS.min(n - r0);
            buf.resize(rows * k, 0.0);
            widen(&w[r0 * k..(r0 + rows) * k], buf);
            let mut dst = vec![0f32; m * rows];
            // SAFETY: dst is m x rows (row stride `rows`), x is m x k (row stride k), and the
            // right-hand side is the tile read as a k x rows matrix (column j = weight row j,
            // column stride k); every pointer covers exactly the extent those strides reach.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    buf.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            dst
        })
        .collect();
    let mut out = vec![0f32; m * n];
    for (t, part) in parts.iter().enumerate() {
        let r0 = t * TILE_ROWS;
        let rows = TILE_ROWS.min(n - r0);
        for i in 0..m {
            out[i * n + r0..i * n + r0 + rows].copy_from_slice(&part[i * rows..(i + 1) * rows]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's own (whole-storage-widening) matmul, on shapes that are and are not
    /// tile multiples, for a view into a stacked tensor and for f16.
    #[test]
    fn tiled_half_matmul_matches_candle() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 64, 32), (3, 96, 70), (17, 128, 33), (64, 40, 130)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let stacked = Tensor::randn(0f32, 1.0, (3, n, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let w = stacked.get(1).unwrap();
            let got = matmul_nt(&x, &w).unwrap().to_dtype(DType::F32).unwrap();
            let want = x
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            let err: f32 = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            // Both accumulate in f32; the only rounding that differs is the final bf16 one.
            assert!(err <= scale * 2f32.powi(-7), "{m}x{k}x{n}: err {err} at scale {scale}");
            assert_eq!(matmul_nt(&x, &w).unwrap().dtype(), DType::BF16);

            let xf = x.to_dtype(DType::F32).unwrap();
            let wf16 = w.to_dtype(DType::F16).unwrap();
            let got = matmul_nt(&xf, &wf16).unwrap();
            let want = xf.matmul(&wf16.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let err: f32 = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err <= 1e-3 * scale.max(1.0), "f16 {m}x{k}x{n}: err {err}");
        }
    }

    #[test]
    fn f32_weights_take_candles_path() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let got = matmul_nt(&x, &w).unwrap().to_vec2::<f32>().unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, want);
    }
}
