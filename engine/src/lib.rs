//! Serving core of moe-engine: requests, the continuous-batching scheduler and block pool,
//! the model runner, sampling, detokenization and stops, and the engine loop that ties them
//! together. Holds no tensor math of its own: the model computes, this crate decides what.

pub mod batch;
pub mod block_pool;
pub mod constraint;
pub mod detokenizer;
pub mod engine;
pub mod error;
pub mod expert_load;
pub mod memory;
pub mod prefix_cache;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod scoring;
pub mod stop;
pub mod tokenizer;

pub use batch::{BatchBuilder, LogitRows, SeqChunk};
pub use constraint::{ConstraintStep, Grammar, GrammarCompiler, TokenConstraint, TokenMask};
pub use detokenizer::IncrementalDetokenizer;
pub use engine::{Engine, EngineConfig, FinishReason, GenerationRequest, RequestOutput};
pub use error::{EngineError, Result};
pub use expert_load::ExpertLoad;
pub use sampling::{SampledToken, Sampler, SamplingParams};
pub use scoring::{all_position_logits, PromptScorer};
pub use stop::{StopCheck, StopStrings};
pub use tokenizer::TextTokenizer;
