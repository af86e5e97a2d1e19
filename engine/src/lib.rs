//! Serving core of moe-engine: turning token sequences into model batches, sampling, and the
//! generation loop the CLI (and later the server) drives. Holds no tensor math of its own;
//! the model computes, this crate decides what to compute.

pub mod batch;
pub mod block_pool;
pub mod error;
pub mod generate;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;

pub use batch::{BatchBuilder, SeqChunk};
pub use error::{EngineError, Result};
pub use generate::{all_position_logits, FinishReason, GenerateRequest, Generation, Generator};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::TextTokenizer;
