//! Typed errors of the models crate: bad configs, bad checkpoints, and tensor failures.
//! Every variant names the file, field or tensor at fault so a user can act on it.

use std::path::PathBuf;

/// Errors raised while reading configs, loading checkpoints or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },

    #[error("config {path}: {message}")]
    ConfigSyntax { path: PathBuf, message: String },

    #[error("config field `{field}` is missing (required for {architecture})")]
    MissingField { field: String, architecture: String },

    #[error("config field `{field}` has an unsupported value {value}: {reason}")]
    UnsupportedValue {
        field: String,
        value: String,
        reason: String,
    },

    #[error("unknown architecture {found:?}; supported: {supported}")]
    UnknownArchitecture { found: String, supported: String },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },

    #[error("tensor `{name}` has shape {found:?} in the checkpoint, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` has dtype {dtype}, which moe-engine cannot load ({reason})")]
    TensorDtype {
        name: String,
        dtype: String,
        reason: String,
    },

    #[error("model {model:?}: {message}")]
    Resolve { model: String, message: String },

    #[error("invalid router spec {spec:?}: {message}")]
    RouterSpec { spec: String, message: String },

    #[error("cannot split the model this way: {0}")]
    Parallel(String),

    #[error("invalid forward input: {0}")]
    Input(String),

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
