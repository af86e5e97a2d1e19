//! Prefix caching in the scheduler on hand-traced scenarios: what a repeated prompt computes,
//! sharing while both requests run, the partial last block, aborts of sharers, eviction.

use super::tests::{config, fake_token, request, shares, step};
use super::*;

/// Blocks of 4 tokens, caching on.
fn caching(num_blocks: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        enable_prefix_caching: true,
        ..config(64, 4, num_blocks)
    })
    .unwrap()
}

/// A request with the given prompt.
fn with_prompt(id: u64, prompt: &[u32], max_tokens: usize) -> NewRequest {
    NewRequest {
        prompt_token_ids: prompt.to_vec(),
        ..request(id, 0, max_tokens)
    }
}

fn run_to_completion(s: &mut Scheduler) {
    while s.has_unfinished_requests() {
        step(s);
    }
}

#[test]
fn a_repeated_prompt_computes_only_the_tokens_past_its_last_full_cached_block() {
    let mut s = caching(16);
    let prompt: Vec<u32> = (100..110).collect(); // 2 full blocks + 2 tokens
    s.add_request(with_prompt(1, &prompt, 3)).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 0, 10)]);
    run_to_completion(&mut s);
    assert_eq!(s.num_used_blocks(), 0);
    // Full blocks of the prompt *and* of the generated tokens stay cached.
    assert_eq!(s.num_cached_blocks(), 3);

    s.add_request(with_prompt(2, &prompt, 3)).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(2, 8, 2)], "only the partial block is computed");
    assert_eq!(
        s.prefix_cache_stats(),
        PrefixCacheStats {
            queried_tokens: 20,
            hit_tokens: 8
        }
    );

    // A prompt of whole blocks still computes its last block: its last token's logits are
    // needed to sample.
    let whole: Vec<u32> = (100..108).collect();
    s.add_request(with_prompt(3, &whole, 1)).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(2, 10, 1), (3, 4, 4)]);
}

#[test]
fn concurrent_requests_share_full_blocks_but_never_the_partial_last_one() {
    let mut s = caching(16);
    let prompt: Vec<u32> = (0..6).collect();
    s.add_request(with_prompt(1, &prompt, 8)).unwrap();
    step(&mut s); // request 1 computes 6 tokens: block 0 full, block 1 half written
    s.add_request(with_prompt(2, &prompt, 8)).unwrap();
    let (plan, _) = step(&mut s);
    let one = &plan.scheduled[0];
    let two = &plan.scheduled[1];
    assert_eq!((two.start_position, two.num_tokens), (4, 2));
    assert_eq!(two.block_table[0], one.block_table[0], "the full block is shared");
    assert_ne!(two.block_table[1], one.block_table[1], "the partial one is not");
    assert_eq!(s.kv_blocks().pool().ref_count(one.block_table[0]), Ok(2));
    assert_eq!(s.num_used_blocks(), 3);
}

#[test]
fn aborting_a_sharer_keeps_the_blocks_the_other_request_holds() {
    let mut s = caching(16);
    let prompt: Vec<u32> = (0..9).collect();
    s.add_request(with_prompt(1, &prompt, 20)).unwrap();
    step(&mut s);
    s.add_request(with_prompt(2, &prompt, 20)).unwrap();
    step(&mut s);
    let shared: Vec<_> = s.request(RequestId(2)).unwrap().block_table()[..2].to_vec();
    assert_eq!(shared, s.request(RequestId(1)).unwrap().block_table()[..2]);

    s.abort(RequestId(1)).unwrap();
    for &b in &shared {
        assert_eq!(s.kv_blocks().pool().ref_count(b), Ok(1), "block {b} still held by 2");
    }
    assert_eq!(
        s.num_used_blocks(),
        s.request(RequestId(2)).unwrap().block_table().len()
    );
    // Request 2 runs on undisturbed: its tokens follow the fake model.
    let (plan, _) = step(&mut s);
    assert_eq!(plan.scheduled[0].token_ids, vec![fake_token(RequestId(2), 9)]);
    run_to_completion(&mut s);
    assert_eq!(s.num_used_blocks(), 0);
    assert_eq!(s.num_free_blocks(), 16);
}

#[test]
fn cached_blocks_are_evicted_least_recently_used_when_space_is_needed() {
    // 6 blocks of 4 tokens: two finished 8-token prompts leave 4 cached blocks.
    let mut s = caching(6);
    let a: Vec<u32> = (0..8).collect();
    let b: Vec<u32> = (50..58).collect();
    for (id, prompt) in [(1, &a), (2, &b)] {
        s.add_request(with_prompt(id, prompt, 1)).unwrap();
        run_to_completion(&mut s);
    }
    assert_eq!(s.num_cached_blocks(), 4);

    // A 12-token stranger takes 3 blocks: the 2 plain ones, then A's last block (A was freed
    // before B, and a sequence is freed last block first).
    let stranger: Vec<u32> = (200..212).collect();
    s.add_request(with_prompt(3, &stranger, 2)).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(s.num_cached_blocks(), 3);
    // Its first decode token needs a fourth block: A's first block goes too.
    step(&mut s);
    assert!(!s.has_unfinished_requests());
    assert!(plan.scheduled[0].block_table.len() == 3);

    // B is still cached, A is gone: B's repeat skips a block, A's computes everything.
    s.add_request(with_prompt(4, &b, 1)).unwrap();
    s.add_request(with_prompt(5, &a, 1)).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(4, 4, 4), (5, 0, 8)]);
}

#[test]
fn a_preempted_request_resumes_from_its_own_cached_blocks() {
    let mut s = Scheduler::new(SchedulerConfig {
        enable_prefix_caching: true,
        ..config(64, 2, 8)
    })
    .unwrap();
    // Each needs 6 blocks of the 8 by the end: the second one is preempted on the way, and
    // the first one's growth evicts only the *end* of its cached blocks.
    s.add_request(request(1, 4, 8)).unwrap();
    s.add_request(request(2, 4, 8)).unwrap();
    let mut preempted = None;
    for _ in 0..10 {
        let (plan, _) = step(&mut s);
        if let Some(&p) = plan.preempted.first() {
            preempted = Some(p);
            break;
        }
    }
    assert_eq!(preempted, Some(RequestId(2)));
    // Once request 1 finishes, request 2 comes back: its full blocks are still cached.
    let resumed = loop {
        let (plan, _) = step(&mut s);
        if let Some(entry) = plan.scheduled.iter().find(|e| e.id == RequestId(2)) {
            break entry.clone();
        }
    };
    assert!(resumed.start_position > 0, "recomputed from scratch: {resumed:?}");
    assert!(s.prefix_cache_stats().hit_tokens > 0);
}
