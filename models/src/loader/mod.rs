//! Checkpoint resolution and weight loading: a local directory or a Hugging Face repo id,
//! single-file or sharded safetensors, plain or quantized (FP8 blocks, INT4 groups).
//!
//! Owns [`ModelFiles`] (where config, weights and tokenizer live) and [`Weights`] (typed,
//! shape-checked tensor fetches). It never decides what a model needs: the model asks for
//! tensors by their Hugging Face names, and anything it does not ask for (such as DeepSeek-V3's
//! multi-token-prediction layer) is never read from disk. Tensors are read with positioned
//! reads straight into the buffers the model keeps (no memory map), so loading holds no
//! second copy of the weights: the page cache may keep the file, but the process does not.

mod files;
mod header;
mod parts;
mod quantized;

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use moe_kernels::dense::Weight;

use crate::config::QuantConfig;
use crate::error::{ModelError, Result};

pub use files::ModelFiles;
pub use header::{check_header, check_header_from, parse_header_from, read_header, HeaderEntry, MAX_HEADER_BYTES};
pub use parts::whole;

/// A model's weights fetched by name with shape checks and dtype conversion: from
/// safetensors files, or made up on the device for synthetic models.
pub struct Weights {
    source: WeightSource,
    device: Device,
    dtype: DType,
    quant: Option<QuantConfig>,
    /// Bytes of every tensor handed out so far (what the model holds once loaded).
    handed_out: Cell<u64>,
}

enum WeightSource {
    Checkpoint {
        files: Vec<File>,
        /// Tensor name -> (file index, header entry).
        index: HashMap<String, (usize, HeaderEntry)>,
        dir: PathBuf,
    },
    /// Every tensor asked for is generated: normal with std `1/sqrt(fan_in)` for matrices,
    /// ones for norm scales, zeros for biases (what a freshly initialised model holds). Each
    /// tensor from its own seed (`seed` and its name), so the ranks of a split model make the
    /// same values for the tensors every rank holds whole.
    Random { seed: u64 },
}

/// Whole random tensors up to this many values are made on the host on the CPU (seeded;
/// candle's CPU generator cannot be), larger ones by candle (unseeded there).
const HOST_RANDOM_MAX: usize = 1 << 24;

impl Weights {
    /// Opens the files and validates every header (offsets inside the file, dtypes known).
    /// Quantized checkpoints also need [`Weights::set_quantization`].
    pub fn open(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let mut index = HashMap::new();
        let mut handles = Vec::with_capacity(files.weights.len());
        for (i, p) in files.weights.iter().enumerate() {
            for entry in read_header(p)? {
                index.insert(entry.name.clone(), (i, entry));
            }
            handles.push(File::open(p).map_err(|e| ModelError::Checkpoint {
                path: p.clone(),
                message: e.to_string(),
            })?);
        }
        Ok(Weights {
            source: WeightSource::Checkpoint {
                files: handles,
                index,
                dir: files.dir.clone(),
            },
            device: device.clone(),
            dtype,
            quant: None,
            handed_out: Cell::new(0),
        })
    }

    /// Weights generated on `device` as they are asked for (synthetic models: real shapes,
    /// no files), each tensor from a seed made of `seed` and its name: the same values every
    /// run on CUDA; on the CPU, whole tensors of up to 16M values too, while larger ones
    /// (and parts of tensors) differ from run to run (candle's CPU generator has no seed).
    pub fn random(dtype: DType, device: &Device, seed: u64) -> Self {
        Weights {
            source: WeightSource::Random { seed },
            device: device.clone(),
            dtype,
            quant: None,
            handed_out: Cell::new(0),
        }
    }

    /// The checkpoint's `quantization_config` (the model config's): which projections are
    /// read as quantized. Random weights then make those projections in that format.
    pub fn set_quantization(&mut self, quant: Option<QuantConfig>) {
        self.quant = quant;
    }

    /// These weights with `config`'s `quantization_config` (see [`Weights::set_quantization`]).
    pub fn for_config(mut self, config: &crate::config::ModelConfig) -> Self {
        self.quant = config.quantization.clone();
        self
    }

    pub fn quantization(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype tensors are converted to by [`Weights::get`].
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of all tensors loaded so far: the model's resident weights once it is built.
    pub fn resident_bytes(&self) -> u64 {
        self.handed_out.get()
    }

    fn count(&self, bytes: usize) {
        self.handed_out.set(self.handed_out.get() + bytes as u64);
    }

    /// Whether the checkpoint has `name`. Random weights have exactly what the model asks
    /// for, plus a (zero) routing correction bias, as a freshly made V3 has.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            WeightSource::Checkpoint { index, .. } => index.contains_key(name),
            WeightSource::Random { .. } => name.ends_with("e_score_correction_bias"),
        }
    }

    /// Shape of a tensor as stored, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.entry(name).map(|e| e.shape.as_slice())
    }

    /// The safetensors dtype name of a stored tensor, if present.
    pub fn stored_dtype(&self, name: &str) -> Option<&str> {
        self.entry(name).map(|e| e.dtype.as_str())
    }

    fn entry(&self, name: &str) -> Option<&HeaderEntry> {
        match &self.source {
            WeightSource::Checkpoint { index, .. } => index.get(name).map(|(_, e)| e),
            WeightSource::Random { .. } => None,
        }
    }

    /// Names of all tensors in the checkpoint (sorted), for diagnostics and inspection.
    pub fn names(&self) -> Vec<&str> {
        let WeightSource::Checkpoint { index, .. } = &self.source else {
            return Vec::new();
        };
        let mut v: Vec<&str> = index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Loads `name`, checks it has `shape`, converts to the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Loads `name`, checks it has `shape`, converts to `dtype`.
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.get_part_as(name, shape, &whole(shape), dtype)
    }

    /// The entry of `name`, which must have `shape`.
    fn checked_entry(&self, name: &str, shape: &[usize]) -> Result<&HeaderEntry> {
        let WeightSource::Checkpoint { index, dir, .. } = &self.source else {
            unreachable!("checked_entry is only called for checkpoints")
        };
        let (_, entry) = index.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: dir.clone(),
        })?;
        if entry.shape.as_slice() != shape {
            return Err(ModelError::TensorShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    /// The stored bytes of `name` into `dst`, which must be exactly their size.
    fn read_into(&self, name: &str, dst: &mut [u8]) -> Result<()> {
        let WeightSource::Checkpoint { files, index, dir } = &self.source else {
            unreachable!("read_into is only called for checkpoints")
        };
        let (file, entry) = index.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: dir.clone(),
        })?;
        if entry.len != dst.len() as u64 {
            return Err(ModelError::Checkpoint {
                path: dir.clone(),
                message: format!("tensor `{name}` holds {} bytes, expected {}", entry.len, dst.len()),
            });
        }
        read_exact_at(&files[*file], dst, entry.start).map_err(|e| ModelError::Checkpoint {
            path: dir.clone(),
            message: format!("reading tensor `{name}`: {e}"),
        })
    }

    /// The stored elements of `name`, whose dtype is `T`'s.
    fn read_vec<T: Plain>(&self, name: &str) -> Result<Vec<T>> {
        let len = self.entry(name).map_or(0, |e| e.len as usize) / std::mem::size_of::<T>();
        let mut v = vec![T::ZERO; len];
        self.read_into(name, T::bytes_mut(&mut v))?;
        Ok(v)
    }

    /// `shape` (all of a tensor when `whole`, else a part of one whose rows have `fan_in`
    /// values) of random weights.
    fn random_tensor(&self, name: &str, shape: &[usize], fan_in: usize, whole: bool, dtype: DType) -> Result<Tensor> {
        let WeightSource::Random { seed } = self.source else {
            unreachable!("random_tensor is only called for random weights")
        };
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, dtype, &self.device)?
        } else if name.ends_with("bias") || shape.len() < 2 {
            Tensor::zeros(shape, dtype, &self.device)?
        } else {
            let std = 1.0 / (fan_in as f32).sqrt();
            let tensor_seed = name.bytes().fold(seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
            });
            let count: usize = shape.iter().product();
            if self.device.is_cpu() && whole && count <= HOST_RANDOM_MAX {
                Tensor::from_vec(host_normals(tensor_seed, count, std), shape, &Device::Cpu)?.to_dtype(dtype)?
            } else {
                let _ = self.device.set_seed(tensor_seed);
                Tensor::randn(0f32, std, shape, &self.device)?.to_dtype(dtype)?
            }
        };
        Ok(t)
    }

    /// The projection `{prefix}.weight` (`shape` = `[out, in]`), quantized when the
    /// checkpoint stores it so (see [`quantized`]).
    pub fn matrix(&self, prefix: &str, shape: [usize; 2]) -> Result<Weight> {
        self.matrix_part(prefix, shape, 0..shape[0], 0..shape[1])
    }

    /// Rows `rows` and columns `cols` of the projection `{prefix}.weight` (`shape` =
    /// `[out, in]`): a rank's share of a column- or row-parallel layer, read alone.
    pub fn matrix_part(
        &self,
        prefix: &str,
        shape: [usize; 2],
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Weight> {
        match self.storage_of(prefix)? {
            quantized::Storage::Plain => {
                let weight = Weight::Dense(self.get_part(&format!("{prefix}.weight"), &shape, &[rows, cols])?);
                moe_kernels::dense::pages::prefer_huge_pages(&weight);
                Ok(weight)
            }
            quantized::Storage::Quant(..) => Ok(self
                .stacked_part(&[vec![prefix.to_string()]], &[shape[0]], shape[1], &[rows], cols)?
                .get(0)?),
        }
    }
}

/// `count` normal values of standard deviation `std` from a generator seeded with `seed`
/// (xorshift64, Box-Muller).
fn host_normals(seed: u64, count: usize, std: f32) -> Vec<f32> {
    let mut state = seed | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // 53 random bits in (0, 1].
        ((state >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let (u, v) = (uniform(), uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let angle = std::f64::consts::TAU * v;
        out.push((r * angle.cos()) as f32 * std);
        if out.len() < count {
            out.push((r * angle.sin()) as f32 * std);
        }
    }
    out
}

/// Element types read straight from a file's little-endian bytes.
trait Plain: Copy {
    const ZERO: Self;
    fn bytes_mut(v: &mut [Self]) -> &mut [u8] {
        // SAFETY: implementors are plain numbers with no padding and no invalid bit patterns;
        // safetensors stores them little-endian, as every platform this engine targets is.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }
}

impl Plain for f32 {
    const ZERO: Self = 0.0;
}
impl Plain for f64 {
    const ZERO: Self = 0.0;
}
impl Plain for bf16 {
    const ZERO: Self = bf16::ZERO;
}
impl Plain for f16 {
    const ZERO: Self = f16::ZERO;
}
impl Plain for u8 {
    const ZERO: Self = 0;
}

#[cfg(unix)]
fn read_exact_at(file: &File, dst: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, dst, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, dst: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(dst)
}
