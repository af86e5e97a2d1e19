//! Prefix caching end to end on the V3 fixture: outputs are identical with and without it
//! (shared and unshared prefixes, prefixes ending mid-block, concurrent and in waves), a
//! repeated prompt computes only what follows its last full cached block (seen in the
//! counters), eviction under memory pressure keeps outputs right, an aborted sharer leaves the
//! other request's blocks alone, and no block leaks.

use std::time::{Duration, Instant};

use moe_engine::engine::{Engine, EngineStats, GenerationRequest, RequestOutput};
use moe_tests::{v3_engine, EngineLimits, TestRng};

const LIMITS: EngineLimits = EngineLimits {
    block_size: 4,
    num_blocks: 1024,
    max_num_batched_tokens: 64,
    max_num_seqs: 16,
    prefix_caching: true,
};

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt_token_ids: prompt,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// 48 requests: most start with one of three shared "system prompts" (37 tokens: ends
/// mid-block; 64: block-aligned; 5: shorter than a 16-token block) followed by their own
/// tokens, some repeat an earlier prompt exactly, the rest share nothing.
fn agent_like_requests() -> Vec<GenerationRequest> {
    let mut rng = TestRng::new(777);
    let mut next = |m: u64| rng.below(m);
    let systems: Vec<Vec<u32>> = [37usize, 64, 5]
        .iter()
        .map(|&len| (0..len).map(|_| 2 + next(318) as u32).collect())
        .collect();
    let mut out: Vec<GenerationRequest> = Vec::new();
    for i in 0..48 {
        let max_tokens = 1 + next(10) as usize;
        let prompt = if i % 8 == 7 {
            out[next(out.len() as u64) as usize].prompt_token_ids.clone()
        } else {
            let mut p = if i % 6 == 5 { Vec::new() } else { systems[i % 3].clone() };
            let own = 1 + next(40) as usize;
            p.extend((0..own).map(|_| 2 + next(318) as u32));
            p
        };
        out.push(greedy(prompt, max_tokens));
    }
    out
}

fn run_all(engine: &Engine, requests: &[GenerationRequest]) -> Vec<RequestOutput> {
    let streams: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    streams.into_iter().map(|s| s.collect().expect("finished")).collect()
}

/// Waves of 8 requests, each submitted after the previous wave finished (like agent turns).
fn run_in_waves(engine: &Engine, requests: &[GenerationRequest]) -> Vec<RequestOutput> {
    requests.chunks(8).flat_map(|wave| run_all(engine, wave)).collect()
}

fn assert_same_outputs(label: &str, got: &[RequestOutput], want: &[RequestOutput]) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.token_ids, b.token_ids, "{label}: tokens of request {i}");
        assert_eq!(a.text, b.text, "{label}: text of request {i}");
        assert_eq!(a.usage, b.usage, "{label}: usage of request {i}");
    }
}

/// Waits for the engine loop to publish its final stats, then checks nothing is held.
fn settled_stats(engine: &Engine) -> EngineStats {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 && s.blocks_used == 0 {
            assert!(s.blocks_cached <= s.blocks_total, "{s:?}");
            return s;
        }
        assert!(Instant::now() < deadline, "blocks still held: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn outputs_are_identical_with_and_without_prefix_caching() {
    let requests = agent_like_requests();
    let off = v3_engine(EngineLimits {
        prefix_caching: false,
        ..LIMITS
    });
    let reference = run_in_waves(&off, &requests);
    let off_stats = settled_stats(&off);
    assert_eq!(
        (
            off_stats.prefix_cache_queries,
            off_stats.prefix_cache_hits,
            off_stats.blocks_cached
        ),
        (0, 0, 0)
    );

    let on = v3_engine(LIMITS);
    assert_same_outputs("waves", &run_in_waves(&on, &requests), &reference);
    let waves = settled_stats(&on);
    assert!(waves.blocks_cached > 0);
    let prompt_tokens: usize = requests.iter().map(|r| r.prompt_token_ids.len()).sum();
    assert_eq!(waves.prefix_cache_queries as usize, prompt_tokens);
    assert!(
        waves.prefix_cache_hits * 4 > waves.prefix_cache_queries,
        "most prompts share a prefix: {waves:?}"
    );

    // All at once, and again on a warm cache: still the same outputs.
    for pass in ["concurrent, cold", "concurrent, warm"] {
        let fresh;
        let engine = if pass.ends_with("cold") {
            fresh = v3_engine(LIMITS);
            &fresh
        } else {
            &on
        };
        assert_same_outputs(pass, &run_all(engine, &requests), &reference);
        settled_stats(engine);
    }
}

#[test]
fn a_repeated_prompt_computes_only_the_tokens_after_its_last_full_cached_block() {
    let engine = v3_engine(EngineLimits {
        block_size: 16,
        ..LIMITS
    });
    for (len, reused) in [(70usize, 64u64), (64, 48), (16, 0), (17, 16)] {
        let prompt: Vec<u32> = (0..len as u32).map(|i| 2 + (i * 37 + len as u32) % 318).collect();
        let first = run_all(&engine, &[greedy(prompt.clone(), 5)]);
        let before = settled_stats(&engine);
        let second = run_all(&engine, &[greedy(prompt, 5)]);
        let after = settled_stats(&engine);
        assert_same_outputs(&format!("{len} tokens"), &second, &first);
        assert_eq!(after.prefix_cache_queries - before.prefix_cache_queries, len as u64);
        assert_eq!(
            after.prefix_cache_hits - before.prefix_cache_hits,
            reused,
            "{len}-token prompt: only the tokens past the last full shared block are computed"
        );
    }
}

#[test]
fn eviction_under_memory_pressure_keeps_outputs_correct() {
    let requests = agent_like_requests();
    let reference = run_in_waves(
        &v3_engine(EngineLimits {
            prefix_caching: false,
            ..LIMITS
        }),
        &requests,
    );
    // 80 blocks of 4 tokens: far less than the ~2700 prompt tokens, so cached blocks are
    // evicted all the time and requests get preempted.
    let small = EngineLimits {
        num_blocks: 80,
        ..LIMITS
    };
    let engine = v3_engine(small);
    assert_same_outputs("waves, small cache", &run_in_waves(&engine, &requests), &reference);
    assert_same_outputs("concurrent, small cache", &run_all(&engine, &requests), &reference);
    let stats = settled_stats(&engine);
    assert!(stats.prefix_cache_hits > 0, "{stats:?}");
    assert!(stats.preemptions > 0, "the cache should be too small: {stats:?}");
    assert!(stats.blocks_cached <= 80);
}

#[test]
fn aborting_a_request_that_shares_blocks_leaves_the_other_one_intact() {
    let system: Vec<u32> = (0..96).map(|i| 2 + (i * 11) % 318).collect();
    let mut a_prompt = system.clone();
    a_prompt.extend([7, 8, 9]);
    let mut b_prompt = system;
    b_prompt.extend([40, 41, 42, 43, 44]);
    let b = greedy(b_prompt, 30);
    let reference = run_all(
        &v3_engine(EngineLimits {
            prefix_caching: false,
            ..LIMITS
        }),
        std::slice::from_ref(&b),
    );

    let engine = v3_engine(LIMITS);
    let mut a_stream = engine.submit(greedy(a_prompt, 150)).unwrap();
    assert!(a_stream.next().is_some(), "A is running and its prefix is cached");
    let before = engine.stats();
    let mut b_stream = engine.submit(b).unwrap();
    let b_first = b_stream.next().expect("B started");
    engine.abort(a_stream.id);
    let mut b_tokens = b_first.token_ids;
    while let Some(piece) = b_stream.next() {
        b_tokens.extend(piece.token_ids);
    }
    assert_eq!(b_tokens, reference[0].token_ids);
    let after = settled_stats(&engine);
    assert_eq!(
        after.prefix_cache_hits - before.prefix_cache_hits,
        96,
        "B reused A's 24 full blocks"
    );
}
