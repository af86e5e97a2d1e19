//! CPU generation throughput of the batched, paged path at several batch sizes.
//!
//! `cargo bench -p moe-benches --bench cpu_generate [-- MODEL_DIR]` (default: the tiny
//! DeepSeek-V3 fixture). Each batch size runs `batch` requests of 32 prompt tokens and 32
//! greedy output tokens together and reports output tokens per second (prefill included)
//! and the speed-up over batch 1. The tiny fixture measures framework overhead more than
//! arithmetic; point it at a larger checkpoint for compute-bound figures.

use std::time::Instant;

use candle_core::{DType, Device};
use moe_engine::generate::GenerateRequest;
use moe_engine::{Generator, SamplingParams};
use moe_models::deepseek::LoadOptions;
use moe_models::{DeepseekModel, ModelConfig, ModelFiles, Weights};

const PROMPT_LEN: usize = 32;
const OUTPUT_LEN: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(Into::into)
        .unwrap_or_else(|| moe_benches::fixture("deepseek-v3"));
    let files = ModelFiles::from_dir(&dir)?;
    let config = ModelConfig::from_file(&files.config)?;
    let weights = Weights::open(&files, DType::F32, &Device::Cpu)?;
    let model = DeepseekModel::load(&config, &weights, &LoadOptions::default())?;
    let generator = Generator::new(&model, 16, 512)?;
    println!("model: {} (f32, CPU)", dir.display());
    println!("{:>6} {:>12} {:>10} {:>9}", "batch", "out tok/s", "seconds", "speed-up");
    let mut base = None;
    for batch in [1usize, 8, 32, 64] {
        let requests: Vec<GenerateRequest> = (0..batch)
            .map(|r| GenerateRequest {
                prompt: (0..PROMPT_LEN)
                    .map(|i| (2 + (r * 31 + i * 7) % (config.vocab_size - 2)) as u32)
                    .collect(),
                max_tokens: OUTPUT_LEN,
                sampling: SamplingParams::default(),
                stop_ids: vec![],
            })
            .collect();
        generator.generate(&requests[..1], None)?; // warm-up
        let start = Instant::now();
        let out = generator.generate(&requests, None)?;
        let secs = start.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|g| g.token_ids.len()).sum();
        let rate = tokens as f64 / secs;
        let base_rate = *base.get_or_insert(rate);
        println!("{batch:>6} {rate:>12.1} {secs:>10.3} {:>8.2}x", rate / base_rate);
    }
    Ok(())
}
