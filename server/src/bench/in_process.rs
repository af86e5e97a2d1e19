//! The in-process backend of `moe bench`: requests go straight to an [`Engine`] (no HTTP),
//! timed from submission to each streamed token; counters come from `Engine::stats()`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_engine::{Engine, GenerationRequest, SamplingParams};

use super::load::{Backend, Completion, Counters};

pub struct InProcessBackend {
    pub engine: Arc<Engine>,
}

impl Backend for InProcessBackend {
    fn send(&self, prompt: Vec<u32>, max_tokens: usize) -> impl Future<Output = Result<Completion, String>> + Send {
        let engine = self.engine.clone();
        async move {
            let start = Instant::now();
            let request = GenerationRequest {
                prompt_token_ids: prompt,
                max_tokens,
                sampling: SamplingParams::default(), // greedy
                ignore_eos: true,
                ..Default::default()
            };
            let mut stream = engine.submit(request).map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let mut done = Completion::default();
                let mut ids = Vec::new();
                let mut finished = false;
                while let Some(piece) = stream.recv().await {
                    if !piece.token_ids.is_empty() {
                        done.pieces.push((start.elapsed().as_secs_f64(), piece.token_ids.len()));
                        ids.extend_from_slice(&piece.token_ids);
                    }
                    if piece.finish_reason.is_some() {
                        done.usage_output_tokens = Some(piece.usage.completion_tokens);
                        finished = true;
                    }
                }
                done.e2e_s = start.elapsed().as_secs_f64();
                done.token_ids = Some(ids);
                if finished {
                    Ok(done)
                } else {
                    Err("the engine stopped before the request finished".to_string())
                }
            })
            .await
            .map_err(|e| format!("request task failed: {e}"))?
        }
    }

    fn counters(&self) -> impl Future<Output = Counters> + Send {
        let s = self.engine.stats();
        async move {
            Counters {
                kv_blocks_used: Some(s.blocks_used as f64),
                kv_blocks_total: Some(s.blocks_total as f64),
                preemptions: Some(s.preemptions),
                prefix_cache_queries: Some(s.prefix_cache_queries),
                prefix_cache_hits: Some(s.prefix_cache_hits),
                gpu_energy_joules: None,
            }
        }
    }

    fn sample_every(&self) -> Duration {
        Duration::from_millis(5)
    }
}
