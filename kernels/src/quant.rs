//! Weights kept in their shipped quantized format and widened to f32 a few rows at a time:
//! FP8 e4m3 with block scales (DeepSeek-V3, MiniMax-M2, GLM-5) and INT4 group-quantized
//! (compressed-tensors `pack-quantized`, Kimi K2 Thinking / K2.5 experts).
//!
//! Both formats share one layout, so concatenating projections (gate then up rows) and
//! stacking experts are row concatenations:
//! - `data`: u8 `[.., n, row_bytes]`, the packed row as stored on disk;
//! - `scales`: `[.., n, groups]`, one scale per row and run of `group` columns.
//!
//! FP8 block scales `[ceil(n/Bm), ceil(k/Bn)]` are expanded to one scale row per weight row
//! at load ([`expand_block_scales`]), which keeps ragged edge blocks exact and costs 4 bytes
//! per `Bn` weights. This module owns decoding only: it knows no config or tensor names.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};

/// How the bytes of a row decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantScheme {
    /// One float8 e4m3fn byte per weight; `w = fp8_to_f32(byte) * scale` (the checkpoint's
    /// `weight_scale_inv`). `group` = the block's column count `Bn`.
    Fp8E4m3 { group: usize },
    /// Signed 4-bit integers, symmetric, stored as `q + 8` in nibbles: weight `c` of a row is
    /// the low nibble of byte `c / 2` when `c` is even, the high one when odd (the
    /// little-endian bytes of compressed-tensors' int32 words, which put weight `8j + i` at
    /// bits `4i..4i+4` of word `j`). `w = (nibble - 8) * scale`.
    Int4 { group: usize },
}

impl QuantScheme {
    /// Columns sharing one scale.
    pub fn group(self) -> usize {
        match self {
            QuantScheme::Fp8E4m3 { group } | QuantScheme::Int4 { group } => group,
        }
    }

    /// Stored bytes of a row of `k` weights (INT4 rows are whole int32 words).
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            QuantScheme::Fp8E4m3 { .. } => k,
            QuantScheme::Int4 { .. } => k.div_ceil(8) * 4,
        }
    }

    /// Scales in a row of `k` weights.
    pub fn groups(self, k: usize) -> usize {
        k.div_ceil(self.group())
    }

    /// `fp8` or `int4`.
    pub fn name(self) -> &'static str {
        match self {
            QuantScheme::Fp8E4m3 { .. } => "fp8",
            QuantScheme::Int4 { .. } => "int4",
        }
    }
}

/// A quantized `[n, k]` matrix or a stack `[E, n, k]` of them (experts).
#[derive(Debug, Clone)]
pub struct QuantTensor {
    pub scheme: QuantScheme,
    /// u8 `[.., n, row_bytes]`.
    pub data: Tensor,
    /// f32, bf16 or f16 `[.., n, groups]`.
    pub scales: Tensor,
    /// The logical shape, `[n, k]` or `[E, n, k]`.
    shape: Vec<usize>,
}

impl QuantTensor {
    /// Checks that `data` and `scales` have the layout `shape` needs under `scheme`.
    pub fn new(scheme: QuantScheme, data: Tensor, scales: Tensor, shape: &[usize]) -> Result<Self> {
        let Some((&k, lead)) = shape.split_last() else {
            bail!("quantized tensor: empty shape");
        };
        if !(1..=2).contains(&lead.len()) || scheme.group() == 0 {
            bail!("quantized tensor: shape {shape:?} with {scheme:?}");
        }
        let want_data: Vec<usize> = lead.iter().copied().chain([scheme.row_bytes(k)]).collect();
        let want_scales: Vec<usize> = lead.iter().copied().chain([scheme.groups(k)]).collect();
        if data.dtype() != DType::U8 || data.dims() != want_data.as_slice() {
            bail!(
                "quantized {shape:?} ({}): data is {:?} {:?}, expected u8 {want_data:?}",
                scheme.name(),
                data.dtype(),
                data.dims()
            );
        }
        if !matches!(scales.dtype(), DType::F32 | DType::BF16 | DType::F16) || scales.dims() != want_scales.as_slice() {
            bail!(
                "quantized {shape:?} ({}): scales are {:?} {:?}, expected float {want_scales:?}",
                scheme.name(),
                scales.dtype(),
                scales.dims()
            );
        }
        Ok(QuantTensor {
            scheme,
            data,
            scales,
            shape: shape.to_vec(),
        })
    }

    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    pub fn device(&self) -> &Device {
        self.data.device()
    }

    /// Matrix `e` of a stack: `[n, k]`.
    pub fn get(&self, e: usize) -> Result<Self> {
        if self.shape.len() != 3 {
            bail!("quantized tensor {:?} is not a stack", self.shape);
        }
        Ok(QuantTensor {
            scheme: self.scheme,
            data: self.data.get(e)?,
            scales: self.scales.get(e)?,
            shape: self.shape[1..].to_vec(),
        })
    }

    /// The same weights as one matrix of rows: `[E, n, k]` as `[E * n, k]` (no copy).
    pub fn as_rows(&self) -> Result<Self> {
        let k = *self.shape.last().expect("checked in new");
        let rows = self.shape.iter().rev().skip(1).product::<usize>();
        Ok(QuantTensor {
            scheme: self.scheme,
            data: self.data.clone(),
            scales: self.scales.clone(),
            shape: vec![rows, k],
        })
    }

    /// Bytes held: packed weights plus scales.
    pub fn resident_bytes(&self) -> usize {
        self.data.elem_count() + self.scales.elem_count() * self.scales.dtype().size_in_bytes()
    }

    /// The full-precision matrix (`[n, k]` or `[E, n, k]` in `dtype`, on this tensor's
    /// device), decoded exactly in f32 first. For the few weights that must be dense (MLA's
    /// absorbed `kv_b_proj`) and for devices without quantized kernels.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let k = *self.shape.last().expect("checked in new");
        let rows = self.shape.iter().rev().skip(1).product::<usize>();
        let host = QuantTensor {
            scheme: self.scheme,
            data: self.data.to_device(&Device::Cpu)?,
            scales: self.scales.to_device(&Device::Cpu)?,
            shape: vec![rows, k],
        };
        let mut out = vec![0f32; rows * k];
        with_rows(&host, |rows_of| rows_of(0, rows, &mut out))?;
        Tensor::from_vec(out, self.shape.as_slice(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(self.device())
    }
}

/// Runs `body` with a function that decodes weight rows `r0..r0 + rows` of the CPU matrix
/// `q` (`[n, k]`, contiguous views) into `dst` (`rows * k` f32, row-major).
pub fn with_rows<R>(q: &QuantTensor, body: impl FnOnce(&(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> R) -> Result<R> {
    let (n, k) = match q.shape.as_slice() {
        &[n, k] => (n, k),
        s => bail!("with_rows: {s:?} is not a matrix"),
    };
    let (data_s, data_l) = q.data.storage_and_layout();
    let (scale_s, scale_l) = q.scales.storage_and_layout();
    let (Some((d0, d1)), Some((s0, s1))) = (data_l.contiguous_offsets(), scale_l.contiguous_offsets()) else {
        bail!("with_rows: quantized views must be contiguous");
    };
    let data = match &*data_s {
        Storage::Cpu(CpuStorage::U8(v)) => &v[d0..d1],
        _ => bail!("with_rows: quantized data must be u8 on the CPU"),
    };
    let scales = match &*scale_s {
        Storage::Cpu(CpuStorage::F32(v)) => Scales::F32(&v[s0..s1]),
        Storage::Cpu(CpuStorage::BF16(v)) => Scales::Bf16(&v[s0..s1]),
        Storage::Cpu(CpuStorage::F16(v)) => Scales::F16(&v[s0..s1]),
        _ => bail!("with_rows: scales must be f32/bf16/f16 on the CPU"),
    };
    let (row_bytes, groups, group) = (q.scheme.row_bytes(k), q.scheme.groups(k), q.scheme.group());
    let scheme = q.scheme;
    let decode = move |r0: usize, rows: usize, dst: &mut [f32]| {
        debug_assert!(r0 + rows <= n && dst.len() >= rows * k);
        for r in 0..rows {
            let row = &data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
            let out = &mut dst[r * k..(r + 1) * k];
            let scale_row = (r0 + r) * groups;
            match scheme {
                QuantScheme::Fp8E4m3 { .. } => {
                    let lut = fp8_e4m3_table();
                    for (g, (w, o)) in row.chunks(group).zip(out.chunks_mut(group)).enumerate() {
                        let s = scales.at(scale_row + g);
                        for (o, &b) in o.iter_mut().zip(w) {
                            *o = lut[b as usize] * s;
                        }
                    }
                }
                QuantScheme::Int4 { .. } => {
                    for (g, o) in out.chunks_mut(group).enumerate() {
                        let s = scales.at(scale_row + g);
                        let c0 = g * group;
                        for (j, o) in o.iter_mut().enumerate() {
                            let c = c0 + j;
                            let nibble = (row[c / 2] >> ((c & 1) * 4)) & 0xF;
                            *o = (nibble as i32 - 8) as f32 * s;
                        }
                    }
                }
            }
        }
    };
    Ok(body(&decode))
}

#[derive(Clone, Copy)]
enum Scales<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl Scales<'_> {
    #[inline]
    fn at(self, i: usize) -> f32 {
        match self {
            Scales::F32(v) => v[i],
            Scales::Bf16(v) => v[i].to_f32(),
            Scales::F16(v) => v[i].to_f32(),
        }
    }
}

/// The 256 values of float8 e4m3fn (bias 7, subnormals, no infinities, NaN at `0x7f`/`0xff`).
pub fn fp8_e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| float8::F8E4M3::from_bits(b as u8).to_f32()))
}

/// One scale row per weight row: `[ceil(n/block_rows), groups]` block scales (f32) ->
/// `[n, groups]`, row `r` taking block row `r / block_rows` (ragged last blocks included).
pub fn expand_block_scales(block: &[f32], n: usize, block_rows: usize, groups: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * groups);
    for r in 0..n {
        let br = r / block_rows;
        out.extend_from_slice(&block[br * groups..(br + 1) * groups]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_table_is_e4m3fn() {
        let t = fp8_e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0); // exponent 7 = bias
        assert_eq!(t[0x7e], 448.0); // the largest finite value
        assert_eq!(t[0xfe], -448.0);
        assert_eq!(t[0x01], 2f32.powi(-9)); // the smallest subnormal
        assert!(t[0x7f].is_nan() && t[0xff].is_nan());
        assert_eq!(t[0x3c], 1.5);
    }

    #[test]
    fn int4_nibbles_decode_in_compressed_tensors_order() {
        // One int32 word 0x76543210 packs weights 0..8 as nibbles 0..7 (values -8..-1), the
        // little-endian bytes being 0x10 0x32 0x54 0x76.
        let word: u32 = 0x7654_3210;
        let data = Tensor::from_vec(word.to_le_bytes().to_vec(), (1, 4), &Device::Cpu).unwrap();
        let scales = Tensor::from_vec(vec![0.5f32], (1, 1), &Device::Cpu).unwrap();
        let q = QuantTensor::new(QuantScheme::Int4 { group: 8 }, data, scales, &[1, 8]).unwrap();
        let w = q
            .dequantize(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f32> = (0..8).map(|i| (i as f32 - 8.0) * 0.5).collect();
        assert_eq!(w, want);
    }

    #[test]
    fn ragged_fp8_blocks_expand_per_row() {
        // n = 5 rows, blocks of 2 rows: block rows 0,0,1,1,2.
        let block = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rows = expand_block_scales(&block, 5, 2, 2);
        assert_eq!(rows, vec![1., 2., 1., 2., 3., 4., 3., 4., 5., 6.]);
    }

    #[test]
    fn layouts_are_checked() {
        let dev = Device::Cpu;
        let data = Tensor::zeros((4, 6), DType::U8, &dev).unwrap();
        let scales = Tensor::zeros((4, 2), DType::F32, &dev).unwrap();
        assert!(QuantTensor::new(QuantScheme::Fp8E4m3 { group: 4 }, data.clone(), scales.clone(), &[4, 6]).is_ok());
        assert!(QuantTensor::new(QuantScheme::Fp8E4m3 { group: 4 }, data.clone(), scales.clone(), &[4, 7]).is_err());
        assert!(QuantTensor::new(QuantScheme::Fp8E4m3 { group: 2 }, data, scales, &[4, 6]).is_err());
        // 10 int4 weights take two int32 words.
        let data = Tensor::zeros((3, 8), DType::U8, &dev).unwrap();
        let scales = Tensor::zeros((3, 4), DType::BF16, &dev).unwrap();
        assert!(QuantTensor::new(QuantScheme::Int4 { group: 3 }, data, scales, &[3, 10]).is_ok());
    }
}
