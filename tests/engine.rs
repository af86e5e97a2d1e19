//! The batching engine end to end on the V3 fixture: continuous batching with chunked
//! prefill gives every request exactly the tokens it gets alone (1, 7 and 64 concurrent
//! requests of mixed lengths), preemption under a too-small cache changes nothing, seeded
//! sampling does not depend on the batch, stop strings and aborts behave, no block leaks;
//! the memory-profiling step runs and leaves the model as it was.

use candle_core::DType;
use moe_engine::engine::{Engine, EngineConfig, GenerationRequest, RequestOutput};
use moe_engine::memory::{profile_steps, ProfileChunk};
use moe_engine::runner::ModelRunner;
use moe_engine::{FinishReason, SamplingParams};
use moe_models::LoadOptions;
use moe_tests::{fixture, golden, load_model, v3_engine, EngineLimits, TestRng};

/// An engine over the V3 fixture with the given cache and step limits (prefix caching on).
fn engine(block_size: usize, num_blocks: usize, max_num_batched_tokens: usize, max_num_seqs: usize) -> Engine {
    v3_engine(EngineLimits {
        block_size,
        num_blocks,
        max_num_batched_tokens,
        max_num_seqs,
        prefix_caching: true,
    })
}

/// 64 requests: the 4 golden prompts, then mixed lengths up to 150 tokens (many span
/// several prefill chunks), with 1 to 12 output tokens.
fn requests() -> Vec<GenerationRequest> {
    let g = golden(&fixture("deepseek-v3"));
    let mut prompts = g.prompts.clone();
    let mut rng = TestRng::new(12345);
    let mut next = |m: u64| rng.below(m);
    while prompts.len() < 64 {
        let len = 1 + next(150) as usize;
        prompts.push((0..len).map(|_| 2 + next(318) as u32).collect());
    }
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt_token_ids: p,
            max_tokens: if i < 4 { 12 } else { 1 + i % 12 },
            ignore_eos: true,
            ..Default::default()
        })
        .collect()
}

fn run_all(engine: &Engine, requests: &[GenerationRequest]) -> Vec<RequestOutput> {
    let streams: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    streams.into_iter().map(|s| s.collect().expect("finished")).collect()
}

fn alone(requests: &[GenerationRequest]) -> Vec<RequestOutput> {
    let e = engine(16, 64, 4096, 1);
    requests
        .iter()
        .map(|r| run_all(&e, std::slice::from_ref(r)).remove(0))
        .collect()
}

#[test]
fn batched_outputs_equal_each_request_alone_for_1_7_and_64_requests() {
    let reqs = requests();
    let solo = alone(&reqs);
    let g = golden(&fixture("deepseek-v3"));
    for (i, (alone, want)) in solo.iter().zip(&g.greedy).enumerate() {
        assert_eq!(&alone.token_ids, want, "golden prompt {i} alone");
    }
    for n in [1usize, 7, 64] {
        // Budget of 48 tokens a step: long prompts are chunked and share steps with decodes.
        let e = engine(16, 1024, 48, 64);
        let out = run_all(&e, &reqs[..n]);
        for (i, (a, b)) in out.iter().zip(&solo).enumerate() {
            assert_eq!(a.token_ids, b.token_ids, "{n} concurrent: request {i}");
            assert_eq!(a.text, b.text);
            assert_eq!(a.finish_reason, Some(FinishReason::Length));
            assert_eq!(a.usage.completion_tokens, reqs[i].max_tokens);
            assert_eq!(a.usage.prompt_tokens, reqs[i].prompt_token_ids.len());
        }
        let stats = e.stats();
        assert_eq!(stats.blocks_used, 0, "every block returns to the pool");
        assert_eq!(
            stats.generation_tokens as usize,
            reqs[..n].iter().map(|r| r.max_tokens).sum::<usize>()
        );
    }
}

#[test]
fn preemption_under_a_small_cache_keeps_outputs_identical() {
    let reqs: Vec<_> = requests().into_iter().take(24).collect();
    let solo = alone(&reqs);
    // 44 blocks of 4 tokens hold 176 tokens, far below what 24 requests want at once.
    let e = engine(4, 44, 64, 24);
    let out = run_all(&e, &reqs);
    for (i, (a, b)) in out.iter().zip(&solo).enumerate() {
        assert_eq!(a.token_ids, b.token_ids, "request {i} after preemptions");
    }
    let stats = e.stats();
    assert!(stats.preemptions > 0, "the cache was meant to be too small: {stats:?}");
    assert_eq!(stats.blocks_used, 0);
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let mut reqs = requests();
    for (i, r) in reqs.iter_mut().enumerate() {
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(1000 + i as u64),
            ..Default::default()
        };
        r.max_tokens = 10;
    }
    let solo = alone(&reqs[..8]);
    let e = engine(4, 60, 32, 64);
    let together = run_all(&e, &reqs[..8]);
    for (a, b) in together.iter().zip(&solo) {
        assert_eq!(a.token_ids, b.token_ids);
    }
    // Different seeds give different samples (over 8 requests x 10 tokens).
    let mut other = reqs[..8].to_vec();
    other
        .iter_mut()
        .for_each(|r| r.sampling.seed = r.sampling.seed.map(|s| s + 1));
    let shifted = run_all(&e, &other);
    assert!(shifted.iter().zip(&solo).any(|(a, b)| a.token_ids != b.token_ids));
}

#[test]
fn stop_strings_end_the_text_and_are_not_returned() {
    let e = engine(16, 256, 256, 8);
    let base = GenerationRequest {
        prompt_token_ids: moe_tests::fixture_tokenizer().encode("The quick brown fox").unwrap(),
        max_tokens: 24,
        ignore_eos: true,
        ..Default::default()
    };
    let full = run_all(&e, std::slice::from_ref(&base)).remove(0);
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 6, "need some text to cut: {:?}", full.text);
    // Stop on a piece from the middle of the text.
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let stopped = run_all(
        &e,
        &[GenerationRequest {
            stop: vec![stop.clone()],
            ..base.clone()
        }],
    )
    .remove(0);
    assert_eq!(stopped.text, full.text[..cut], "stop {stop:?}");
    assert_eq!(stopped.finish_reason, Some(FinishReason::Stop));
    assert!(stopped.token_ids.len() <= full.token_ids.len());
    assert_eq!(e.stats().blocks_used, 0);
}

#[test]
fn eos_ends_generation_unless_ignored() {
    let g = golden(&fixture("deepseek-v3"));
    // Find a golden continuation that contains EOS (id 1), if the fixture has one.
    let Some((i, pos)) = g
        .greedy
        .iter()
        .enumerate()
        .find_map(|(i, c)| c.iter().position(|&t| t == 1).map(|p| (i, p)))
    else {
        return;
    };
    let e = engine(16, 256, 256, 8);
    let out = run_all(
        &e,
        &[GenerationRequest {
            prompt_token_ids: g.prompts[i].clone(),
            max_tokens: 12,
            ..Default::default()
        }],
    )
    .remove(0);
    assert_eq!(out.token_ids, g.greedy[i][..=pos]);
    assert_eq!(out.finish_reason, Some(FinishReason::Stop));
}

#[test]
fn aborting_and_dropping_streams_free_blocks() {
    let e = engine(4, 200, 16, 8);
    let long = GenerationRequest {
        prompt_token_ids: (2..120).collect(),
        max_tokens: 100,
        ignore_eos: true,
        ..Default::default()
    };
    let mut a = e.submit(long.clone()).unwrap();
    let mut b = e.submit(long.clone()).unwrap();
    // Wait until both produce output, then abort one and drop the other.
    assert!(a.next().is_some());
    assert!(b.next().is_some());
    e.abort(a.id);
    drop(b);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while e.stats().blocks_used > 0 || e.stats().running > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "blocks not freed: {:?}",
            e.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The aborted stream ends without a finish reason.
    while let Some(p) = a.next() {
        assert!(p.finish_reason.is_none());
    }
}

#[test]
fn invalid_requests_are_rejected_at_submit() {
    let e = engine(16, 64, 64, 4);
    let bad = |r: GenerationRequest| e.submit(r).err().map(|e| e.to_string()).unwrap_or_default();
    let ok = GenerationRequest {
        prompt_token_ids: vec![5, 6],
        max_tokens: 4,
        ..Default::default()
    };
    assert!(bad(GenerationRequest {
        prompt_token_ids: vec![],
        ..ok.clone()
    })
    .contains("empty"));
    assert!(bad(GenerationRequest {
        prompt_token_ids: vec![5, 320],
        ..ok.clone()
    })
    .contains("320"));
    assert!(bad(GenerationRequest {
        max_tokens: 0,
        ..ok.clone()
    })
    .contains("max_tokens"));
    assert!(bad(GenerationRequest {
        max_tokens: 300,
        ..ok.clone()
    })
    .contains("maximum model length"));
    let mut hot = ok.clone();
    hot.sampling.temperature = -1.0;
    assert!(bad(hot).contains("temperature"));
    assert!(e.submit(ok).unwrap().collect().is_some());
}

/// The profiling step that sizes the cache under `--gpu-memory-utilization` runs the model at
/// the engine's largest step (here on the CPU, where nothing is read), refuses a cache too
/// small for it, and hands back a model that serves exactly as a fresh one.
#[test]
fn the_memory_profiling_step_runs_and_leaves_the_model_as_it_was() {
    let steps = profile_steps(300, 4, 256);
    assert_eq!(steps[0], vec![ProfileChunk { start: 0, len: 75 }; 4]);
    assert_eq!(steps[1], vec![ProfileChunk { start: 0, len: 256 }]);
    let model = load_model(&fixture("deepseek-v3"), DType::F32, &LoadOptions::default());
    let blocks = steps.iter().map(|s| ModelRunner::profile_blocks(s, 16)).max().unwrap();
    assert_eq!(blocks, 4 * 5);
    let runner = ModelRunner::new(model, blocks, 16).unwrap();
    for step in &steps {
        runner.profile_step(step).unwrap();
    }
    // A chunk late in a long context needs the blocks before it too.
    let late = [ProfileChunk { start: 300, len: 75 }];
    let err = runner.profile_step(&late).unwrap_err().to_string();
    assert!(err.contains("needs 24 cache blocks, the cache has 20"), "{err}");
    let runner = ModelRunner::new(runner.into_model(), 64, 16).unwrap();
    let config = EngineConfig {
        max_num_batched_tokens: 4096,
        max_num_seqs: 8,
        max_model_len: 256,
        enable_prefix_caching: true,
    };
    let profiled = Engine::start(runner, None, config).unwrap();
    let reqs: Vec<GenerationRequest> = requests().into_iter().take(8).collect();
    let after = run_all(&profiled, &reqs);
    for ((a, b), r) in after.iter().zip(alone(&reqs)).zip(&reqs) {
        assert_eq!(a.token_ids, b.token_ids, "prompt {:?}", r.prompt_token_ids);
    }
}
