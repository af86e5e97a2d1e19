//! Reading part of a stored tensor: a box of index ranges (a rank's rows, columns or experts
//! under tensor and expert parallelism), fetched with one positioned read per contiguous run,
//! so a rank never reads or holds more of a tensor than its part.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::{read_exact_at, Plain, WeightSource, Weights};
use crate::error::{ModelError, Result};

/// Every index of every dimension of `shape`.
pub fn whole(shape: &[usize]) -> Vec<Range<usize>> {
    shape.iter().map(|&d| 0..d).collect()
}

/// The contiguous runs of a row-major box: `(first element, elements)` each, in order.
/// `shape` and `part` have one entry per dimension and each range lies inside its dimension.
pub(super) fn box_runs(shape: &[usize], part: &[Range<usize>]) -> Vec<(usize, usize)> {
    debug_assert_eq!(shape.len(), part.len());
    if part.iter().any(|r| r.is_empty()) {
        return Vec::new();
    }
    // Trailing whole dimensions fold into one run with the last partial one.
    let mut d = shape.len();
    let mut run = 1usize;
    while d > 0 && part[d - 1] == (0..shape[d - 1]) {
        run *= shape[d - 1];
        d -= 1;
    }
    if d == 0 {
        return vec![(0, run)];
    }
    let cut = d - 1;
    let inner: usize = shape[cut + 1..].iter().product();
    let run = part[cut].len() * inner;
    let strides: Vec<usize> = (0..shape.len()).map(|i| shape[i + 1..].iter().product()).collect();
    let mut runs = Vec::new();
    let mut index: Vec<usize> = part[..cut].iter().map(|r| r.start).collect();
    loop {
        let start: usize =
            index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>() + part[cut].start * strides[cut];
        runs.push((start, run));
        // Next outer index, last dimension fastest.
        let mut i = cut;
        loop {
            if i == 0 {
                return runs;
            }
            i -= 1;
            index[i] += 1;
            if index[i] < part[i].end {
                break;
            }
            index[i] = part[i].start;
        }
    }
}

impl Weights {
    /// The part `part` (one range per dimension) of `name`, which must have `shape`,
    /// converted to `dtype` and placed on this device. Reads only the part from disk.
    pub fn get_part_as(&self, name: &str, shape: &[usize], part: &[Range<usize>], dtype: DType) -> Result<Tensor> {
        check_part(name, shape, part)?;
        let dims: Vec<usize> = part.iter().map(|r| r.len()).collect();
        let t = match &self.source {
            WeightSource::Checkpoint { .. } => {
                let entry = self.checked_entry(name, shape)?;
                let cpu = &Device::Cpu;
                let t = match entry.dtype.as_str() {
                    "F32" => Tensor::from_vec(self.read_part::<f32>(name, shape, part)?, dims.as_slice(), cpu)?,
                    "BF16" => Tensor::from_vec(self.read_part::<bf16>(name, shape, part)?, dims.as_slice(), cpu)?,
                    "F16" => Tensor::from_vec(self.read_part::<f16>(name, shape, part)?, dims.as_slice(), cpu)?,
                    "F64" => Tensor::from_vec(self.read_part::<f64>(name, shape, part)?, dims.as_slice(), cpu)?,
                    other => {
                        let reason = if other.starts_with("F8") || other == "I32" {
                            "a quantized projection's weight; its quantization_config does not cover this tensor"
                        } else {
                            "weights must be f32, f16 or bf16"
                        };
                        return Err(ModelError::TensorDtype {
                            name: name.into(),
                            dtype: other.to_string(),
                            reason: reason.into(),
                        });
                    }
                };
                t.to_dtype(dtype)?.to_device(&self.device)?
            }
            WeightSource::Random { .. } => {
                let whole = part.iter().zip(shape).all(|(r, &d)| r.start == 0 && r.end == d);
                self.random_tensor(name, &dims, shape.last().copied().unwrap_or(1), whole, dtype)?
            }
        };
        self.count(t.elem_count() * dtype.size_in_bytes());
        Ok(t)
    }

    /// [`Weights::get_part_as`] in the compute dtype.
    pub fn get_part(&self, name: &str, shape: &[usize], part: &[Range<usize>]) -> Result<Tensor> {
        self.get_part_as(name, shape, part, self.dtype)
    }

    /// The elements of `part` of the stored tensor `name` (of `shape`, stored as `T`), row-major.
    pub(super) fn read_part<T: Plain>(&self, name: &str, shape: &[usize], part: &[Range<usize>]) -> Result<Vec<T>> {
        let total: usize = part.iter().map(|r| r.len()).product();
        let mut out = vec![T::ZERO; total];
        self.read_part_bytes(name, shape, part, std::mem::size_of::<T>(), T::bytes_mut(&mut out))?;
        Ok(out)
    }

    /// The bytes of `part` of the stored tensor `name` (of `shape`, `elem` bytes an element)
    /// into `dst`, which must be exactly their size.
    pub(super) fn read_part_bytes(
        &self,
        name: &str,
        shape: &[usize],
        part: &[Range<usize>],
        elem: usize,
        dst: &mut [u8],
    ) -> Result<()> {
        let WeightSource::Checkpoint { files, index, dir } = &self.source else {
            unreachable!("read_part_bytes is only called for checkpoints")
        };
        check_part(name, shape, part)?;
        let (file, entry) = index.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: dir.clone(),
        })?;
        let elems: usize = shape.iter().product();
        let wanted: usize = part.iter().map(|r| r.len()).product::<usize>() * elem;
        if entry.len != (elems * elem) as u64 || dst.len() != wanted {
            return Err(ModelError::Checkpoint {
                path: dir.clone(),
                message: format!(
                    "tensor `{name}` holds {} bytes, expected {} (reading {} of them)",
                    entry.len,
                    elems * elem,
                    dst.len()
                ),
            });
        }
        let mut at = 0;
        for (first, len) in box_runs(shape, part) {
            let bytes = len * elem;
            read_exact_at(
                &files[*file],
                &mut dst[at..at + bytes],
                entry.start + (first * elem) as u64,
            )
            .map_err(|e| ModelError::Checkpoint {
                path: dir.clone(),
                message: format!("reading tensor `{name}`: {e}"),
            })?;
            at += bytes;
        }
        Ok(())
    }
}

/// Checks that `part` has one range per dimension of `shape`, each inside it.
fn check_part(name: &str, shape: &[usize], part: &[Range<usize>]) -> Result<()> {
    if part.len() != shape.len() || part.iter().zip(shape).any(|(r, &d)| r.start > r.end || r.end > d) {
        return Err(ModelError::Input(format!(
            "part {part:?} of tensor `{name}` lies outside its shape {shape:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_runs_fold_trailing_whole_dimensions() {
        // Whole tensor: one run.
        assert_eq!(box_runs(&[4, 6], &whole(&[4, 6])), vec![(0, 24)]);
        // Rows 1..3: one run.
        assert_eq!(box_runs(&[4, 6], &[1..3, 0..6]), vec![(6, 12)]);
        // Columns 2..5: one run per row.
        assert_eq!(box_runs(&[3, 6], &[0..3, 2..5]), vec![(2, 3), (8, 3), (14, 3)]);
        // A stack [E=3, n=4, k=2]: experts 1..3, rows 2..4, whole rows.
        assert_eq!(box_runs(&[3, 4, 2], &[1..3, 2..4, 0..2]), vec![(12, 4), (20, 4)]);
        // Empty part.
        assert!(box_runs(&[3, 4], &[0..0, 0..4]).is_empty());
    }

    #[test]
    fn random_weights_held_whole_are_the_same_on_every_rank() {
        // Two ranks' synthetic weights: a router gate (held whole) comes out alike, another
        // tensor differently, and a part keeps the whole tensor's scale.
        let (a, b) = (
            Weights::random(DType::F32, &Device::Cpu, 0),
            Weights::random(DType::F32, &Device::Cpu, 0),
        );
        let gate = |w: &Weights, name: &str| {
            w.get(name, &[8, 64])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let g = gate(&a, "model.layers.1.mlp.gate.weight");
        assert_eq!(g, gate(&b, "model.layers.1.mlp.gate.weight"));
        assert_ne!(g, gate(&a, "model.layers.2.mlp.gate.weight"));
        let std = (g.iter().map(|x| x * x).sum::<f32>() / g.len() as f32).sqrt();
        assert!((std - 1.0 / 8.0).abs() < 0.02, "std {std}");
        let part = a
            .get_part("model.layers.1.self_attn.o_proj.weight", &[64, 64], &[0..64, 0..16])
            .unwrap();
        assert_eq!(part.dims(), &[64, 16]);
    }
}
