//! Models of moe-engine: `config.json` parsing, safetensors loading, the shared layers (one
//! MLA, one MoE with pluggable routers, RMSNorm, RoPE/YaRN) and the model families built from
//! them. Computes logits for a flat batch described by a [`ForwardCtx`]; owns no scheduling,
//! sampling or request state.

pub mod config;
pub mod deepseek;
pub mod error;
pub mod forward;
pub mod inspect;
pub mod layers;
pub mod loader;
pub mod synthetic;

pub use config::{Architecture, ModelConfig};
pub use deepseek::DeepseekModel;
pub use error::{ModelError, Result};
pub use forward::{ForwardCtx, LatentCache, RoutingTrace};
pub use layers::moe::router::{Router, RouterSpec};
pub use loader::{ModelFiles, Weights};
pub use moe_kernels::PagedSeq;

use candle_core::DType;

/// Parses a `--dtype` value.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Ok(DType::F16),
        other => Err(ModelError::UnsupportedValue {
            field: "dtype".into(),
            value: format!("{other:?}"),
            reason: "supported: f32, bf16, f16".into(),
        }),
    }
}
