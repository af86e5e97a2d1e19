//! Checkpoint resolution and weight loading: a local directory or a Hugging Face repo id,
//! single-file or sharded safetensors, memory-mapped.
//!
//! Owns [`ModelFiles`] (where config, weights and tokenizer live) and [`Weights`] (typed,
//! shape-checked tensor fetches). It never decides what a model needs: the model asks for
//! tensors by their Hugging Face names, and anything it does not ask for (such as DeepSeek-V3's
//! multi-token-prediction layer) is never read from disk.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The files of one model on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

impl ModelFiles {
    /// Resolves `model`: an existing local directory, else a Hugging Face repo id
    /// (`org/name`, optionally `org/name@revision`) fetched through hf-hub, which reuses its
    /// cache and so works offline once the files are there.
    pub fn resolve(model: &str) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if path.exists() {
            return Err(ModelError::Resolve {
                model: model.into(),
                message: "is a file; pass the model's directory (the one holding config.json)".into(),
            });
        }
        Self::from_hub(model)
    }

    /// A local directory holding `config.json` and `model.safetensors` (or an index + shards).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(ModelError::Resolve {
                model: dir.display().to_string(),
                message: "no config.json in this directory".into(),
            });
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let weights = if index.is_file() {
            shard_files(&index)?
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(ModelError::Resolve {
                model: dir.display().to_string(),
                message: "no model.safetensors or model.safetensors.index.json in this directory".into(),
            });
        };
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer: optional("tokenizer.json"),
            tokenizer_config: optional("tokenizer_config.json"),
            generation_config: optional("generation_config.json"),
        })
    }

    fn from_hub(model: &str) -> Result<Self> {
        let looks_like_repo = model.split('/').count() == 2 && !model.starts_with('.') && !model.contains("..");
        if !looks_like_repo {
            return Err(ModelError::Resolve {
                model: model.into(),
                message: "not a local directory, nor a Hugging Face repo id of the form org/name".into(),
            });
        }
        let (repo_id, revision) = match model.split_once('@') {
            Some((r, rev)) => (r.to_string(), rev.to_string()),
            None => (model.to_string(), "main".to_string()),
        };
        let hub_err = |message: String| ModelError::Resolve {
            model: model.into(),
            message,
        };
        let repo = hf_hub::Repo::with_revision(repo_id, hf_hub::RepoType::Model, revision);
        // Offline first: the hub cache answers without a network when the files are there.
        let cache = hf_hub::Cache::from_env().repo(repo.clone());
        let cached = |name: &str| cache.get(name);
        let fetch = |name: &str| -> Result<PathBuf> {
            if let Some(p) = cached(name) {
                return Ok(p);
            }
            // The Hub's own convention for "never touch the network".
            if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
                return Err(hub_err(format!(
                    "{name} is not in the hub cache and HF_HUB_OFFLINE is set"
                )));
            }
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| hub_err(format!("cannot start the Hub client: {e}")))?;
            api.repo(repo.clone()).get(name).map_err(|e| {
                hub_err(format!(
                    "cannot fetch {name} (not in the hub cache, and the Hub said: {e})"
                ))
            })
        };
        let config = fetch("config.json")?;
        let weights = match fetch("model.safetensors.index.json") {
            Ok(index) => {
                let names = shard_names(&index)?;
                let mut paths = Vec::with_capacity(names.len());
                for n in names {
                    paths.push(fetch(&n)?);
                }
                paths
            }
            Err(_) => vec![fetch("model.safetensors")?],
        };
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(ModelFiles {
            dir,
            config,
            weights,
            tokenizer: fetch("tokenizer.json").ok(),
            tokenizer_config: fetch("tokenizer_config.json").ok(),
            generation_config: fetch("generation_config.json").ok(),
        })
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let bad = |message: String| ModelError::Checkpoint {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("has no `weight_map` object".into()))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry for `{tensor}` is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(bad(format!(
                "weight_map entry for `{tensor}` names {file:?}, which is not a plain file name"
            )));
        }
        names.insert(file.to_string());
    }
    if names.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(names.into_iter().collect())
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for name in shard_names(index)? {
        let p = dir.join(&name);
        if !p.is_file() {
            return Err(ModelError::Checkpoint {
                path: index.to_path_buf(),
                message: format!("names shard {name}, which is not in {}", dir.display()),
            });
        }
        out.push(p);
    }
    Ok(out)
}

/// A model's weights fetched by name with shape checks and dtype conversion: from
/// memory-mapped safetensors, or made up on the device for synthetic models.
pub struct Weights {
    source: WeightSource,
    device: Device,
    dtype: DType,
}

enum WeightSource {
    Checkpoint {
        tensors: MmapedSafetensors,
        /// Tensor name -> (shape, dtype name), from the headers.
        index: HashMap<String, (Vec<usize>, String)>,
        dir: PathBuf,
    },
    /// Every tensor asked for is generated: normal with std `1/sqrt(fan_in)` for matrices,
    /// ones for norm scales, zeros for biases (what a freshly initialised model holds).
    Random,
}

impl Weights {
    /// Maps the files and validates every header (offsets inside the file, dtypes known).
    pub fn open(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        for p in &files.weights {
            // Read the header on our own first, so a corrupt file gets a precise message.
            check_header(p)?;
        }
        // SAFETY: the files are mapped read-only; as with any mmap, modifying them while the
        // model runs is undefined behaviour, which is the documented contract of safetensors.
        let tensors = unsafe { MmapedSafetensors::multi(&files.weights) }.map_err(|e| ModelError::Checkpoint {
            path: files.dir.clone(),
            message: e.to_string(),
        })?;
        let mut index = HashMap::new();
        for (name, view) in tensors.tensors() {
            index.insert(name, (view.shape().to_vec(), format!("{:?}", view.dtype())));
        }
        Ok(Weights {
            source: WeightSource::Checkpoint {
                tensors,
                index,
                dir: files.dir.clone(),
            },
            device: device.clone(),
            dtype,
        })
    }

    /// Weights generated on `device` as they are asked for (synthetic models: real shapes,
    /// no files). `seed` seeds the device generator where it can be seeded (CUDA); the CPU
    /// generator cannot be, so CPU synthetic weights differ from run to run.
    pub fn random(dtype: DType, device: &Device, seed: u64) -> Self {
        let _ = device.set_seed(seed);
        Weights {
            source: WeightSource::Random,
            device: device.clone(),
            dtype,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype tensors are converted to by [`Weights::get`].
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the checkpoint has `name`. Random weights have exactly what the model asks
    /// for, plus a (zero) routing correction bias, as a freshly made V3 has.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            WeightSource::Checkpoint { index, .. } => index.contains_key(name),
            WeightSource::Random => name.ends_with("e_score_correction_bias"),
        }
    }

    /// Shape of a tensor as stored, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        match &self.source {
            WeightSource::Checkpoint { index, .. } => index.get(name).map(|(s, _)| s.as_slice()),
            WeightSource::Random => None,
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
        let (tensors, index, dir) = match &self.source {
            WeightSource::Checkpoint { tensors, index, dir } => (tensors, index, dir),
            WeightSource::Random => return self.random_tensor(name, shape, dtype),
        };
        let (found, stored) = index.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: dir.clone(),
        })?;
        if found.as_slice() != shape {
            return Err(ModelError::TensorShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: found.clone(),
            });
        }
        if !matches!(stored.as_str(), "F32" | "F16" | "BF16" | "F64") {
            return Err(ModelError::TensorDtype {
                name: name.into(),
                dtype: stored.clone(),
                reason: "weights must be f32, f16 or bf16".into(),
            });
        }
        let t = tensors.load(name, &self.device).map_err(|e| ModelError::Checkpoint {
            path: dir.clone(),
            message: format!("tensor `{name}`: {e}"),
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    fn random_tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, dtype, &self.device)?
        } else if name.ends_with("bias") || shape.len() < 2 {
            Tensor::zeros(shape, dtype, &self.device)?
        } else {
            let fan_in = *shape.last().expect("matrices have a last dimension");
            let std = 1.0 / (fan_in as f32).sqrt();
            Tensor::randn(0f32, std, shape, &self.device)?.to_dtype(dtype)?
        };
        Ok(t)
    }
}

/// Upper bound on a safetensors JSON header; real ones are well under a few MB.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Validates a safetensors file's header against its size before mapping it: a truncated
/// file or a header that points past the end gets a message naming the file and tensor.
pub fn check_header(path: &Path) -> Result<()> {
    let bad = |message: String| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    check_header_from(std::io::BufReader::new(file), file_len, path)
}

/// The checks of [`check_header`] on any reader positioned at the start of a safetensors
/// checkpoint of `file_len` bytes (a file, or bytes in memory: `&[u8]` is a reader). Reads
/// only the length prefix and the header, never more than [`MAX_HEADER_BYTES`]; `path` only
/// names the checkpoint in messages.
pub fn check_header_from(mut reader: impl std::io::Read, file_len: u64, path: &Path) -> Result<()> {
    let bad = |message: String| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if file_len < 8 {
        return Err(bad(format!(
            "truncated: {file_len} bytes, too short for a safetensors header"
        )));
    }
    let mut len_bytes = [0u8; 8];
    reader.read_exact(&mut len_bytes).map_err(|e| bad(e.to_string()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(bad(format!(
            "header claims {header_len} bytes but the file has {} after the length prefix (truncated or not safetensors)",
            file_len - 8
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let map = json
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = file_len - 8 - header_len;
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
        if offsets.0 > offsets.1 || offsets.1 > data_len {
            return Err(bad(format!(
                "tensor `{name}` claims bytes {}..{} but the data section has {data_len} bytes (truncated file?)",
                offsets.0, offsets.1
            )));
        }
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad(format!("tensor `{name}` has no dtype name")))?;
        let elem_bytes: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
            other => return Err(bad(format!("tensor `{name}` has unknown dtype {other:?}"))),
        };
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(elem_bytes))
            .ok_or_else(|| bad(format!("tensor `{name}` has a shape {shape:?} whose size overflows")))?;
        if numel != offsets.1 - offsets.0 {
            return Err(bad(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} needs {numel} bytes but data_offsets span {}",
                offsets.1 - offsets.0
            )));
        }
    }
    Ok(())
}
