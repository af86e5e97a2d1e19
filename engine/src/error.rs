//! Typed errors of the engine crate.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] moe_models::ModelError),

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("the engine has stopped")]
    Stopped,

    /// The model's device failed a health check after a failed step (a sticky CUDA error):
    /// the engine has stopped and the server should exit.
    #[error("the device failed ({0}); the engine has stopped")]
    DeviceFailed(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;
