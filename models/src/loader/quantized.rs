//! Projections stored quantized: FP8 `weight` + `weight_scale_inv` blocks, INT4
//! `weight_packed` + `weight_scale` + `weight_shape` (compressed-tensors), read straight into
//! the packed buffers the model keeps (`moe_kernels::quant` layout), and checked against the
//! config's `quantization_config` so a tensor it does not cover is an error naming it.
//! Synthetic (random) weights are made in the same formats.

use std::ops::Range;

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use moe_kernels::dense::Weight;
use moe_kernels::quant::{QuantScheme, QuantTensor};

use super::{WeightSource, Weights};
use crate::config::ModuleQuant;
use crate::error::{ModelError, Result};

/// How one projection is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Storage {
    Plain,
    /// The scheme, and for FP8 the block's row count (scales are expanded per row).
    Quant(QuantScheme, usize),
}

/// The scales of a stack being built, in the dtype they are kept in.
enum Scales {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Weights {
    /// How `{module}.weight` (`[n, k]`) is stored: what the checkpoint holds, which must
    /// agree with the config's `quantization_config`.
    pub(super) fn storage_of(&self, module: &str) -> Result<Storage> {
        let declared = self.quant.as_ref().and_then(|q| q.scheme_for(module));
        let quant = |m: ModuleQuant| match m {
            ModuleQuant::Fp8 { block_rows, block_cols } => {
                Storage::Quant(QuantScheme::Fp8E4m3 { group: block_cols }, block_rows)
            }
            ModuleQuant::Int4 { group_size } => Storage::Quant(QuantScheme::Int4 { group: group_size }, 1),
        };
        if matches!(self.source, WeightSource::Random { .. }) {
            return Ok(declared.map_or(Storage::Plain, quant));
        }
        let weight = format!("{module}.weight");
        let packed = format!("{module}.weight_packed");
        let uncovered = |tensor: &str, what: &str| {
            ModelError::TensorDtype {
            name: tensor.to_string(),
            dtype: self.stored_dtype(tensor).unwrap_or("?").to_string(),
            reason: format!(
                "{what}, but the config's quantization_config does not cover module `{module}` (quant_method, ignore/targets or modules_to_not_convert)"
            ),
        }
        };
        if self.contains(&packed) {
            return match declared {
                Some(m @ ModuleQuant::Int4 { .. }) => Ok(quant(m)),
                _ => Err(uncovered(&packed, "an INT4-packed weight")),
            };
        }
        match self.stored_dtype(&weight) {
            Some("F8_E4M3") => match declared {
                Some(m @ ModuleQuant::Fp8 { .. }) => Ok(quant(m)),
                _ => Err(uncovered(&weight, "an FP8 weight")),
            },
            Some(d) if d.starts_with("F8") => Err(ModelError::TensorDtype {
                name: weight,
                dtype: d.to_string(),
                reason: "only float8 e4m3 weights are supported".into(),
            }),
            _ => match declared {
                // compressed-tensors quantizes every module its targets/ignore select.
                Some(ModuleQuant::Int4 { .. }) => Err(ModelError::MissingTensor {
                    name: format!("{packed} (quantization_config's targets/ignore make `{module}` INT4)"),
                    dir: self.dir(),
                }),
                // FP8 checkpoints keep some linears (lm_head) in their dtype without saying so.
                _ => Ok(Storage::Plain),
            },
        }
    }

    fn dir(&self) -> std::path::PathBuf {
        match &self.source {
            WeightSource::Checkpoint { dir, .. } => dir.clone(),
            WeightSource::Random { .. } => "synthetic".into(),
        }
    }

    /// A stack `[E, Σ rows, k]`: matrix `e` is the row concatenation of the projections
    /// `modules[e]` (e.g. an expert's gate then up), projection `j` having `rows[j]` rows.
    /// Quantized projections are read straight into one packed buffer; every projection of
    /// the stack must be stored the same way.
    pub fn stacked(&self, modules: &[Vec<String>], rows: &[usize], k: usize) -> Result<Weight> {
        let parts: Vec<Range<usize>> = rows.iter().map(|&n| 0..n).collect();
        self.stacked_part(modules, rows, k, &parts, 0..k)
    }

    /// Part of a stack (see [`Weights::stacked`]): rows `row_parts[j]` of projection `j` (of
    /// `rows[j]`) and columns `cols` (of `k`) of each, read alone from disk. Quantized
    /// columns that start inside a scale group keep exact scales by regrouping them
    /// ([`part_scheme`]).
    pub fn stacked_part(
        &self,
        modules: &[Vec<String>],
        rows: &[usize],
        k: usize,
        row_parts: &[Range<usize>],
        cols: Range<usize>,
    ) -> Result<Weight> {
        let first = &modules[0][0];
        let storage = self.storage_of(first)?;
        for m in modules.iter().flatten() {
            let s = self.storage_of(m)?;
            if s != storage {
                return Err(ModelError::Checkpoint {
                    path: self.dir(),
                    message: format!(
                        "module `{m}` is stored as {s:?} but `{first}` as {storage:?}; one stack must share one format"
                    ),
                });
            }
        }
        let Storage::Quant(scheme, block_rows) = storage else {
            let mut stack = Vec::with_capacity(modules.len());
            for ms in modules {
                let parts = ms
                    .iter()
                    .zip(rows)
                    .zip(row_parts)
                    .map(|((m, &n), r)| self.get_part(&format!("{m}.weight"), &[n, k], &[r.clone(), cols.clone()]))
                    .collect::<Result<Vec<_>>>()?;
                stack.push(Tensor::cat(&parts, 0)?);
            }
            return Ok(Weight::Dense(Tensor::stack(&stack, 0)?));
        };
        let held = part_scheme(scheme, &cols, first)?;
        let n_total: usize = row_parts.iter().map(Range::len).sum();
        let width = cols.len();
        let (row_bytes, groups) = (held.row_bytes(width), held.groups(width));
        let experts = modules.len();
        let mut data = vec![0u8; experts * n_total * row_bytes];
        let mut scales = match scheme {
            QuantScheme::Fp8E4m3 { .. } => Scales::F32(Vec::with_capacity(experts * n_total * groups)),
            QuantScheme::Int4 { .. } => match self.int4_scale_dtype(first) {
                "F32" => Scales::F32(Vec::with_capacity(experts * n_total * groups)),
                "F16" => Scales::F16(Vec::with_capacity(experts * n_total * groups)),
                _ => Scales::Bf16(Vec::with_capacity(experts * n_total * groups)),
            },
        };
        let mut offset = 0;
        for ms in modules {
            for ((m, &n), r) in ms.iter().zip(rows).zip(row_parts) {
                let dst = &mut data[offset..offset + r.len() * row_bytes];
                let part = ProjectionPart {
                    module: m,
                    n,
                    k,
                    rows: r.clone(),
                    cols: cols.clone(),
                    scheme,
                    held,
                    block_rows,
                };
                self.read_projection(&part, dst, &mut scales)?;
                offset += r.len() * row_bytes;
            }
        }
        let cpu = &Device::Cpu;
        let shape = [experts, n_total, width];
        let data = Tensor::from_vec(data, (experts, n_total, row_bytes), cpu)?;
        let scale_shape = (experts, n_total, groups);
        let scales = match scales {
            Scales::F32(v) => Tensor::from_vec(v, scale_shape, cpu)?,
            Scales::Bf16(v) => Tensor::from_vec(v, scale_shape, cpu)?,
            Scales::F16(v) => Tensor::from_vec(v, scale_shape, cpu)?,
        };
        let q = QuantTensor::new(held, data, scales, &shape)?;
        if self.device.is_cpu() {
            self.count(q.resident_bytes());
            return Ok(Weight::Quant(q));
        }
        // No quantized GPU kernels yet: the device holds the decoded weights.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "quantized weights are decoded to {:?} on {:?}: the W8A16/W4A16 GPU kernels are not in this build yet",
                self.dtype,
                self.device
            )
        });
        let dense = q.dequantize(self.dtype)?.to_device(&self.device)?;
        self.count(dense.elem_count() * self.dtype.size_in_bytes());
        Ok(Weight::Dense(dense))
    }

    fn int4_scale_dtype(&self, module: &str) -> &str {
        self.stored_dtype(&format!("{module}.weight_scale")).unwrap_or("BF16")
    }

    /// Reads one projection's part: its packed rows into `dst` (`rows * row_bytes`), and
    /// appends one scale row per row read.
    fn read_projection(&self, p: &ProjectionPart<'_>, dst: &mut [u8], scales: &mut Scales) -> Result<()> {
        let (module, n, k) = (p.module, p.n, p.k);
        let groups = p.held.groups(p.cols.len());
        let read_rows = p.rows.len();
        if matches!(self.source, WeightSource::Random { .. }) {
            random_rows(module, p.held, dst);
            // Decoded weights of std ~ 1/sqrt(k), as the plain random weights have.
            let s = match p.scheme {
                QuantScheme::Fp8E4m3 { .. } => 1.0 / (k as f32).sqrt(),
                QuantScheme::Int4 { .. } => 1.0 / (4.6 * (k as f32).sqrt()),
            };
            match scales {
                Scales::F32(v) => v.extend(std::iter::repeat_n(s, read_rows * groups)),
                Scales::Bf16(v) => v.extend(std::iter::repeat_n(bf16::from_f32(s), read_rows * groups)),
                Scales::F16(v) => v.extend(std::iter::repeat_n(f16::from_f32(s), read_rows * groups)),
            }
            return Ok(());
        }
        match p.scheme {
            QuantScheme::Fp8E4m3 { group } => {
                let weight = format!("{module}.weight");
                self.checked_entry(&weight, &[n, k])?;
                self.read_part_bytes(&weight, &[n, k], &[p.rows.clone(), p.cols.clone()], 1, dst)?;
                let scale = format!("{module}.weight_scale_inv");
                let grid = [n.div_ceil(p.block_rows), k.div_ceil(group)];
                let block = self.float_vec(&scale, &grid)?;
                let Scales::F32(v) = scales else {
                    unreachable!("FP8 scales are f32")
                };
                v.extend(regrouped_scales(&block, grid[1], p, group));
            }
            QuantScheme::Int4 { group } => {
                let zero_point = format!("{module}.weight_zero_point");
                if self.contains(&zero_point) {
                    return Err(ModelError::TensorDtype {
                        name: zero_point,
                        dtype: self
                            .stored_dtype(&format!("{module}.weight_zero_point"))
                            .unwrap_or("?")
                            .into(),
                        reason: "asymmetric INT4 (zero points) is not supported".into(),
                    });
                }
                let packed = format!("{module}.weight_packed");
                let words = k.div_ceil(8);
                let entry = self.checked_entry(&packed, &[n, words])?;
                if entry.dtype != "I32" {
                    return Err(ModelError::TensorDtype {
                        name: packed,
                        dtype: entry.dtype.clone(),
                        reason: "packed INT4 weights are int32 words".into(),
                    });
                }
                // part_scheme made the columns start on a word.
                let word_cols = p.cols.start / 8..p.cols.end.div_ceil(8);
                self.read_part_bytes(&packed, &[n, words], &[p.rows.clone(), word_cols], 4, dst)?;
                self.check_weight_shape(module, n, k)?;
                let scale = format!("{module}.weight_scale");
                let stored_groups = k.div_ceil(group);
                let want = [n, stored_groups];
                let entry = self.checked_entry(&scale, &want)?;
                let rows = [p.rows.clone(), 0..stored_groups];
                // One scale row per weight row: the regrouping treats each row as a block.
                let per_row = ProjectionPart {
                    rows: 0..p.rows.len(),
                    block_rows: 1,
                    ..p.clone()
                };
                match (scales, entry.dtype.as_str()) {
                    (Scales::F32(v), "F32") => v.extend(regrouped_scales(
                        &self.read_part::<f32>(&scale, &want, &rows)?,
                        stored_groups,
                        &per_row,
                        group,
                    )),
                    (Scales::Bf16(v), "BF16") => v.extend(regrouped_scales(
                        &self.read_part::<bf16>(&scale, &want, &rows)?,
                        stored_groups,
                        &per_row,
                        group,
                    )),
                    (Scales::F16(v), "F16") => v.extend(regrouped_scales(
                        &self.read_part::<f16>(&scale, &want, &rows)?,
                        stored_groups,
                        &per_row,
                        group,
                    )),
                    (_, d) => {
                        return Err(ModelError::TensorDtype {
                            name: scale.clone(),
                            dtype: d.to_string(),
                            reason: format!(
                                "scales must be f32, bf16 or f16, and all of one stack alike (the first is {})",
                                self.int4_scale_dtype(module)
                            ),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// `{module}.weight_shape` (int32/int64 `[2]`) must say `[n, k]`.
    fn check_weight_shape(&self, module: &str, n: usize, k: usize) -> Result<()> {
        let name = format!("{module}.weight_shape");
        let entry = self.checked_entry(&name, &[2])?;
        let dims: Vec<u64> = match entry.dtype.as_str() {
            "I64" => {
                let mut b = [0u8; 16];
                self.read_into(&name, &mut b)?;
                b.chunks(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u64)
                    .collect()
            }
            "I32" => {
                let mut b = [0u8; 8];
                self.read_into(&name, &mut b)?;
                b.chunks(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u64)
                    .collect()
            }
            other => {
                return Err(ModelError::TensorDtype {
                    name,
                    dtype: other.into(),
                    reason: "weight_shape must be integers".into(),
                })
            }
        };
        if dims != [n as u64, k as u64] {
            return Err(ModelError::TensorShape {
                name: format!("{name} (its values)"),
                expected: vec![n, k],
                found: dims.iter().map(|&d| d as usize).collect(),
            });
        }
        Ok(())
    }

    /// A float tensor of `shape` as f32 (scales ship in f32, some in bf16).
    fn float_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.checked_entry(name, shape)?;
        Ok(match entry.dtype.as_str() {
            "F32" => self.read_vec::<f32>(name)?,
            "BF16" => self.read_vec::<bf16>(name)?.iter().map(|x| x.to_f32()).collect(),
            "F16" => self.read_vec::<f16>(name)?.iter().map(|x| x.to_f32()).collect(),
            other => {
                return Err(ModelError::TensorDtype {
                    name: name.into(),
                    dtype: other.into(),
                    reason: "scales must be f32, bf16 or f16".into(),
                })
            }
        })
    }
}

/// Random packed rows for synthetic models: FP8 bytes of magnitude 2^-2..2^1 (exponent
/// fields 5..=8, any sign and mantissa: never NaN), INT4 nibbles uniform over -8..7.
fn random_rows(module: &str, scheme: QuantScheme, dst: &mut [u8]) {
    let mut s = module.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    }) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    match scheme {
        QuantScheme::Fp8E4m3 { .. } => {
            for chunk in dst.chunks_mut(8) {
                let r = next().to_le_bytes();
                for (d, b) in chunk.iter_mut().zip(r) {
                    *d = (b & 0x87) | ((5 + (b >> 3) % 4) << 3);
                }
            }
        }
        QuantScheme::Int4 { .. } => {
            for chunk in dst.chunks_mut(8) {
                for (d, b) in chunk.iter_mut().zip(next().to_le_bytes()) {
                    *d = b;
                }
            }
        }
    }
}

/// One projection's part as [`Weights::read_projection`] reads it.
#[derive(Clone)]
struct ProjectionPart<'a> {
    module: &'a str,
    /// The stored matrix is `[n, k]`.
    n: usize,
    k: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    /// As stored, and as held for these columns ([`part_scheme`]).
    scheme: QuantScheme,
    held: QuantScheme,
    /// FP8: rows per scale block (1 for INT4's per-row scales).
    block_rows: usize,
}

/// The scheme a column part `cols` of a `scheme` matrix is held in: the same, or, when the
/// part starts inside a scale group, groups of `gcd(group, cols.start)` columns so that each
/// held group lies inside one stored group (its scale copied). INT4 parts start on a packed
/// word (a multiple of 8 columns).
pub(super) fn part_scheme(scheme: QuantScheme, cols: &Range<usize>, module: &str) -> Result<QuantScheme> {
    let c0 = cols.start;
    if c0 == 0 {
        return Ok(scheme);
    }
    Ok(match scheme {
        QuantScheme::Fp8E4m3 { group } => QuantScheme::Fp8E4m3 { group: gcd(group, c0) },
        QuantScheme::Int4 { group } => {
            if !c0.is_multiple_of(8) {
                return Err(ModelError::Parallel(format!(
                    "`{module}` is INT4 with 8 weights per int32 word; a rank's columns must start on a word, not at column {c0}"
                )));
            }
            QuantScheme::Int4 { group: gcd(group, c0) }
        }
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Scale rows for `p.rows` and `p.cols` in `p.held`'s grouping, from stored scales `block`
/// (`[blocks of p.block_rows rows, grid_cols]`, one per stored group of `group` columns).
fn regrouped_scales<T: Copy>(block: &[T], grid_cols: usize, p: &ProjectionPart<'_>, group: usize) -> Vec<T> {
    let held_group = p.held.group();
    let groups = p.held.groups(p.cols.len());
    let mut out = Vec::with_capacity(p.rows.len() * groups);
    for r in p.rows.clone() {
        let row = &block[(r / p.block_rows) * grid_cols..][..grid_cols];
        out.extend((0..groups).map(|j| row[(p.cols.start + j * held_group) / group]));
    }
    out
}

#[cfg(test)]
mod part_tests {
    use super::*;

    #[test]
    fn column_parts_regroup_scales_exactly() {
        let cols = 16..32;
        let held = part_scheme(QuantScheme::Fp8E4m3 { group: 40 }, &cols, "m").unwrap();
        assert_eq!(held, QuantScheme::Fp8E4m3 { group: 8 });
        // 3 rows in blocks of 2 rows, stored groups of 40 columns over k = 80: 2 per block.
        let block = [1.0f32, 2.0, 3.0, 4.0];
        let p = ProjectionPart {
            module: "m",
            n: 3,
            k: 80,
            rows: 1..3,
            cols: 32..56,
            scheme: QuantScheme::Fp8E4m3 { group: 40 },
            held: part_scheme(QuantScheme::Fp8E4m3 { group: 40 }, &(32..56), "m").unwrap(),
            block_rows: 2,
        };
        assert_eq!(p.held.group(), 8);
        // Held groups start at columns 32, 40, 48: stored groups 0, 1, 1.
        assert_eq!(regrouped_scales(&block, 2, &p, 40), vec![1.0, 2.0, 2.0, 3.0, 4.0, 4.0]);
        assert!(part_scheme(QuantScheme::Int4 { group: 16 }, &(4..8), "m").is_err());
        assert_eq!(
            part_scheme(QuantScheme::Int4 { group: 32 }, &(8..16), "m").unwrap(),
            QuantScheme::Int4 { group: 8 }
        );
    }
}
