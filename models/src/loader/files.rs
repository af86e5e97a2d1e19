//! Where a model's files are: a local directory or a Hugging Face repo id (through hf-hub's
//! cache), single-file or sharded safetensors. Owns [`ModelFiles`]; reads no tensors.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
