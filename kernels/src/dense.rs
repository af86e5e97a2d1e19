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
//!
//! [`Weight`] is a projection weight as models hold it: plain, or quantized
//! ([`crate::quant`]), whose CPU tiles are decoded the same way inside the product.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::quant::QuantTensor;

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
            let v = &v[start..end];
            tiled(&xs, m, k, n, &|r0, rows, dst| {
                v[r0 * k..(r0 + rows) * k].convert_to_f32_slice(dst)
            })
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            let v = &v[start..end];
            tiled(&xs, m, k, n, &|r0, rows, dst| {
                v[r0 * k..(r0 + rows) * k].convert_to_f32_slice(dst)
            })
        }
        _ => candle_core::bail!("matmul_nt: expected a bf16/f16 CPU weight"),
    };
    drop(storage);
    Tensor::from_vec(out, (m, n), x.device())?.to_dtype(x.dtype())
}

/// A projection weight `[n, k]` (or a stack `[E, n, k]` of expert weights): a plain tensor in
/// the compute dtype, or one kept in its shipped quantized format.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quant(QuantTensor),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quant(q) => q.dims(),
        }
    }

    /// Matrix `e` of a stack.
    pub fn get(&self, e: usize) -> Result<Weight> {
        Ok(match self {
            Weight::Dense(t) => Weight::Dense(t.get(e)?),
            Weight::Quant(q) => Weight::Quant(q.get(e)?),
        })
    }

    /// The plain tensor, when this weight is one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        }
    }

    /// The weight as a plain tensor in `dtype` (a quantized one decoded exactly).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Quant(q) => q.dequantize(dtype),
        }
    }

    /// Bytes the weight holds in memory.
    pub fn resident_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.resident_bytes(),
        }
    }

    /// `x Wᵀ`: `x` `[m, k]` -> `[m, n]` in `x`'s dtype.
    pub fn matmul_nt(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => matmul_nt(x, t),
            Weight::Quant(q) => quant_matmul_nt(x, q),
        }
    }
}

/// `x Wᵀ` for a quantized `[n, k]` weight: on the CPU each tile of [`TILE_ROWS`] rows is
/// decoded to f32 inside the product (never the whole matrix); elsewhere the weight is
/// decoded whole first (the GPU path dequantizes at load instead, see the models' loader).
pub fn quant_matmul_nt(x: &Tensor, w: &QuantTensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let &[n, k_w] = w.dims() else {
        candle_core::bail!("quant_matmul_nt: weight {:?} is not a matrix", w.dims());
    };
    if k != k_w {
        candle_core::bail!(
            "quant_matmul_nt: x {:?} and w {:?} disagree on the inner dimension",
            x.shape(),
            w.dims()
        );
    }
    if !w.device().is_cpu() || !x.device().is_cpu() {
        return x.matmul(&w.dequantize(x.dtype())?.t()?);
    }
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let out = crate::quant::with_rows(w, |decode| tiled(&xs, m, k, n, decode))?;
    Tensor::from_vec(out, (m, n), x.device())?.to_dtype(x.dtype())
}

/// `x` `[m, k]` f32 times the transpose of a `[n, k]` weight whose rows `r0..r0 + rows`
/// `widen` writes as f32 into its buffer, as `[m, n]`.
fn tiled(x: &[f32], m: usize, k: usize, n: usize, widen: &(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> Vec<f32> {
    let tiles = n.div_ceil(TILE_ROWS);
    let parts: Vec<Vec<f32>> = (0..tiles)
        .into_par_iter()
        .map_init(Vec::new, |buf: &mut Vec<f32>, t| {
            let r0 = t * TILE_ROWS;
            let rows = TILE_ROWS.min(n - r0);
            buf.resize(rows * k, 0.0);
            widen(r0, rows, &mut buf[..rows * k]);
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

#[cfg(test)]
mod quant_tests {
    use super::*;
    use crate::quant::{QuantScheme, QuantTensor};
    use candle_core::Device;

    /// Deterministic bytes; FP8 bytes avoid the two NaN codes.
    fn bytes(len: usize, salt: u64, fp8: bool) -> Vec<u8> {
        let mut s = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let b = (s >> 24) as u8;
                if fp8 && b & 0x7f == 0x7f {
                    b & 0xf0
                } else {
                    b
                }
            })
            .collect()
    }

    /// The tiled quantized product equals candle's f32 matmul on the decoded weights, for FP8
    /// and INT4 (bf16 scales), with widths that are not tile or group multiples and for a
    /// matrix of an expert stack.
    #[test]
    fn quantized_tiles_match_the_dequantized_matmul() {
        let dev = Device::Cpu;
        for (m, k, n, group) in [(1usize, 64usize, 32usize, 16usize), (5, 100, 70, 32), (17, 40, 33, 8)] {
            for scheme in [QuantScheme::Fp8E4m3 { group }, QuantScheme::Int4 { group }] {
                let experts = 3;
                let rb = scheme.row_bytes(k);
                let data = Tensor::from_vec(bytes(experts * n * rb, k as u64, true), (experts, n, rb), &dev).unwrap();
                let groups = scheme.groups(k);
                let scales = (Tensor::rand(0.5f32, 2.0, (experts, n, groups), &dev).unwrap() * 0.01)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let stack = QuantTensor::new(scheme, data, scales, &[experts, n, k]).unwrap();
                let w = Weight::Quant(stack).get(1).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let got = w.matmul_nt(&x).unwrap();
                let dense = w.to_dense(DType::F32).unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let err: f32 = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                // The same f32 products, summed in another order.
                assert!(
                    err <= 1e-5 * scale.max(1.0),
                    "{scheme:?} {m}x{k}x{n}: err {err} at {scale}"
                );
            }
        }
    }
}
