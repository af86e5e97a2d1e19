//! CPU generation throughput of the batching engine at several batch sizes.
//!
//! `cargo bench -p moe-benches --bench cpu_generate [-- MODEL_DIR]` (default: the tiny
//! DeepSeek-V3 fixture). Each batch size submits `batch` requests of 32 prompt tokens and 32
//! greedy output tokens at once and reports output tokens per second (prefill included)
//! and the speed-up over batch 1. The tiny fixture measures per-step overhead more than
//! arithmetic; point it at a larger checkpoint for compute-bound figures.

use std::time::Instant;

use candle_core::{DType, Device};
use moe_engine::runner::ModelRunner;
use moe_engine::{Engine, EngineConfig, GenerationRequest};
use moe_models::LoadOptions;
use moe_models::{load_model, ModelConfig, ModelFiles, Weights};

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
    println!(
        "model: {} (f32, CPU, {} threads)",
        dir.display(),
        std::thread::available_parallelism()?
    );
    println!("{:>6} {:>12} {:>10} {:>9}", "batch", "out tok/s", "seconds", "speed-up");
    let mut base = None;
    for batch in [1usize, 8, 32, 64] {
        let weights = Weights::open(&files, DType::F32, &Device::Cpu)?.for_config(&config);
        let model = load_model(&config, &weights, &LoadOptions::default())?;
        let blocks = batch * (PROMPT_LEN + OUTPUT_LEN).div_ceil(16) + 1;
        let runner = ModelRunner::new(model, blocks, 16)?;
        let limits = EngineConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_model_len: PROMPT_LEN + OUTPUT_LEN,
            enable_prefix_caching: false,
        };
        let engine = Engine::start(runner, None, limits)?;
        let request = |r: usize| GenerationRequest {
            prompt_token_ids: (0..PROMPT_LEN)
                .map(|i| (2 + (r * 31 + i * 7) % (config.vocab_size - 2)) as u32)
                .collect(),
            max_tokens: OUTPUT_LEN,
            ignore_eos: true,
            ..Default::default()
        };
        engine.submit(request(0))?.collect(); // warm-up
        let start = Instant::now();
        let streams = (0..batch)
            .map(|r| engine.submit(request(r)))
            .collect::<Result<Vec<_>, _>>()?;
        let tokens: usize = streams
            .into_iter()
            .filter_map(|s| s.collect())
            .map(|o| o.token_ids.len())
            .sum();
        let secs = start.elapsed().as_secs_f64();
        let rate = tokens as f64 / secs;
        let base_rate = *base.get_or_insert(rate);
        println!("{batch:>6} {rate:>12.1} {secs:>10.3} {:>8.2}x", rate / base_rate);
    }
    Ok(())
}
