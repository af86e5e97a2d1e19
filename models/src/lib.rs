//! Models of moe-engine: `config.json` parsing, safetensors loading, the shared layers (MLA
//! and GQA attention, one MoE block with pluggable routers, RMSNorm, RoPE/YaRN), the shared
//! decoder, and the model families (one folder each) registered in [`registry`]. Computes
//! logits for a flat batch described by a [`ForwardCtx`]; owns no scheduling, sampling or
//! request state. Everything outside this crate sees only the [`CausalLm`] interface.

pub mod config;
pub mod decoder;
pub mod error;
pub mod forward;
pub mod inspect;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod model;
pub mod parallel;
pub mod registry;
pub mod synthetic;

// Model families: one folder each, plus one line in `registry::FAMILIES`.
pub mod deepseek;
pub mod deepseek_v32;
pub mod glm4_moe;
pub mod glm4_moe_lite;
pub mod glm_moe_dsa;
pub mod kimi_k25;
pub mod minimax_m2;
pub mod mixtral;
pub mod qwen3_moe;

pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use forward::{ForwardCtx, RoutingTrace};
pub use kv_cache::{IndexKeys, KvCache, KvCacheSpec};
pub use layers::moe::router::{Router, RouterSpec};
pub use loader::{ModelFiles, Weights};
pub use model::{CausalLm, LoadOptions, LoadProgress, Model};
pub use moe_kernels::{PagedBatch, PagedSeq};
pub use parallel::{ParallelLayout, Shard, ShardedModel};
pub use registry::load_model;

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
