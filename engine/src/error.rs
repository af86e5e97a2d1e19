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
}

pub type Result<T> = std::result::Result<T, EngineError>;
