//! Seeded randomized simulation of the scheduler: thousands of requests with random lengths,
//! arrivals and aborts on a small KV pool, a fake model and a shadow KV cache. Checks the
//! scheduler's invariants every step and that preemption never changes any request's output;
//! run once without and once with prefix caching (prompts then share random prefixes, and the
//! shadow cache proves every reused block holds exactly the prefix the request needs).

use std::collections::HashMap;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

const NUM_REQUESTS: usize = 2000;
const VOCAB: u64 = 64;
/// Odd request ids stop on this token (about one chance in `VOCAB` per generated token).
const STOP_TOKEN: u32 = 0;

const CONFIG: SchedulerConfig = SchedulerConfig {
    max_num_batched_tokens: 256,
    max_num_seqs: 16,
    max_model_len: 350,
    block_size: 16,
    // 2048 token slots against prompts of up to 300 tokens: preemption is routine.
    num_blocks: 128,
    enable_prefix_caching: false,
};

/// Steps a request may spend at the head of the queue without being admitted. While it is
/// the head nobody else is admitted, so it waits at most for the running requests (at most
/// `max_num_seqs`) to free enough blocks; each needs at most 50 decode steps plus a couple of
/// prefill chunks once it is the oldest. Generous on purpose: a starving head overshoots it
/// by orders of magnitude.
const HEAD_WAIT_BOUND: usize = CONFIG.max_num_seqs * 60;
/// A livelocked simulation trips this long before it would hang the test run.
const MAX_STEPS: usize = 50_000;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The fake model: the token it samples after `position` tokens of request `id`. Depends on
/// nothing else, like a greedy model over a correctly filled cache.
fn model_token(id: RequestId, position: usize) -> u32 {
    (splitmix64(id.0.wrapping_mul(1_000_003) ^ position as u64) % VOCAB) as u32
}

struct SimRequest {
    arrival_step: usize,
    new: NewRequest,
    /// Step at which the client aborts, and whether it does so while the step is in flight.
    abort: Option<(usize, bool)>,
    /// Prompt followed by what an uninterrupted run generates.
    expected_tokens: Vec<u32>,
    /// `fingerprints[p]` identifies `expected_tokens[..=p]`: what the KV at position `p` is a
    /// function of. The shadow cache stores it.
    fingerprints: Vec<u64>,
}

/// Prompts of up to 300 tokens; with `shared_prefixes`, most start with one of a few common
/// prefixes (of 0 to 200 tokens, many ending mid-block) followed by their own tokens.
fn make_requests(rng: &mut ChaCha8Rng, shared_prefixes: bool) -> Vec<SimRequest> {
    let prefixes: Vec<Vec<u32>> = (0..6)
        .map(|_| {
            let len = rng.random_range(0..200);
            (0..len).map(|_| rng.random_range(0..VOCAB as u32)).collect()
        })
        .collect();
    let mut arrival_step = 0;
    (0..NUM_REQUESTS as u64)
        .map(|n| {
            arrival_step += rng.random_range(0..=4);
            let id = RequestId(n);
            let prompt_len = rng.random_range(1..300);
            let max_tokens = rng.random_range(1..50);
            let mut prompt: Vec<u32> = Vec::with_capacity(prompt_len);
            if shared_prefixes && rng.random_bool(0.8) {
                let prefix = &prefixes[rng.random_range(0..prefixes.len())];
                prompt.extend(prefix.iter().take(prompt_len));
            }
            while prompt.len() < prompt_len {
                prompt.push(rng.random_range(0..VOCAB as u32));
            }
            let stop_token_ids = if n % 2 == 1 { vec![STOP_TOKEN] } else { vec![] };
            let mut expected_tokens = prompt.clone();
            for _ in 0..max_tokens {
                let token = model_token(id, expected_tokens.len());
                expected_tokens.push(token);
                if stop_token_ids.contains(&token) {
                    break;
                }
            }
            let abort = rng
                .random_bool(0.05)
                .then(|| (arrival_step + rng.random_range(0..100), rng.random_bool(0.5)));
            let mut fingerprint = 0u64;
            let fingerprints = expected_tokens
                .iter()
                .map(|&t| {
                    fingerprint = splitmix64(fingerprint ^ u64::from(t));
                    fingerprint
                })
                .collect();
            SimRequest {
                arrival_step,
                new: NewRequest {
                    id,
                    prompt_token_ids: prompt,
                    max_tokens,
                    stop_token_ids,
                },
                abort,
                expected_tokens,
                fingerprints,
            }
        })
        .collect()
}

#[derive(Default)]
struct Stats {
    steps: usize,
    preempted: usize,
    resumed: usize,
    aborted: usize,
    finished: usize,
    batched_tokens: usize,
    max_head_wait: usize,
    max_running: usize,
    max_latency: usize,
    prefix_cache: PrefixCacheStats,
}

/// The fake model's step over a plan: checks each entry against the shadow KV cache, writes
/// its tokens there (only ever into blocks the request holds alone) and samples where asked.
fn run_model(
    scheduler: &Scheduler,
    plan: &SchedulerOutput,
    requests: &[SimRequest],
    kv: &mut [Option<(usize, u64)>],
) -> Vec<SampledToken> {
    let block_size = CONFIG.block_size;
    let mut sampled = Vec::new();
    for entry in &plan.scheduled {
        let end = entry.start_position + entry.num_tokens;
        assert!(entry.num_tokens >= 1);
        assert_eq!(
            entry.block_table.len(),
            end.div_ceil(block_size),
            "lazy allocation for {}",
            entry.id
        );
        let request = &requests[entry.id.0 as usize];
        let expected = &request.expected_tokens;
        assert_eq!(
            entry.token_ids,
            expected[entry.start_position..end],
            "tokens of {}",
            entry.id
        );
        let slot = |p: usize| entry.block_table[p / block_size].index() * block_size + p % block_size;
        for position in entry.start_position..end {
            let block = entry.block_table[position / block_size];
            assert_eq!(
                scheduler.kv_blocks().pool().ref_count(block),
                Ok(1),
                "{} writes position {position} into shared block {block}",
                entry.id
            );
            kv[slot(position)] = Some((position, request.fingerprints[position]));
        }
        if entry.needs_sample {
            // Attention reads the whole context: all of it must be this request's, in place.
            for position in 0..end {
                assert_eq!(
                    kv[slot(position)],
                    Some((position, request.fingerprints[position])),
                    "cache of {} at {position}",
                    entry.id
                );
            }
            sampled.push(SampledToken {
                id: entry.id,
                token_id: model_token(entry.id, end),
                finish: None,
            });
        }
    }
    sampled
}

/// The client aborts `id`; a request that already finished is unknown to the scheduler.
fn abort_if_live(scheduler: &mut Scheduler, id: RequestId, done: &mut [bool], live: &mut usize, aborted: &mut usize) {
    if done[id.0 as usize] {
        assert_eq!(scheduler.abort(id), Err(SchedulerError::UnknownRequest(id)));
        return;
    }
    scheduler.abort(id).unwrap();
    done[id.0 as usize] = true;
    *live -= 1;
    *aborted += 1;
}

/// Invariants that hold between steps and right after `schedule`: queue and table shapes,
/// every block's reference count equals the tables holding it, and free + cached + used =
/// total.
fn check_pool_and_tables(scheduler: &Scheduler, num_live: usize) {
    let block_size = CONFIG.block_size;
    assert_eq!(scheduler.num_running() + scheduler.num_waiting(), num_live);
    assert!(scheduler.num_running() <= CONFIG.max_num_seqs);
    let mut holders: HashMap<BlockId, u32> = HashMap::new();
    for id in scheduler.waiting_ids() {
        let request = scheduler.request(id).unwrap();
        assert_eq!(request.status(), RequestStatus::Waiting);
        assert_eq!(
            (request.num_computed_tokens(), request.block_table().len()),
            (0, 0),
            "waiting {id}"
        );
    }
    for id in scheduler.running_ids() {
        let request = scheduler.request(id).unwrap();
        assert_eq!(request.status(), RequestStatus::Running);
        let covered = request.num_computed_tokens() + request.num_scheduled_tokens();
        assert_eq!(
            request.block_table().len(),
            covered.div_ceil(block_size),
            "blocks of {id}"
        );
        assert!(covered <= request.token_ids().len());
        assert!(request.token_ids().len() <= CONFIG.max_model_len);
        for &block in request.block_table() {
            *holders.entry(block).or_default() += 1;
        }
    }
    let pool = scheduler.kv_blocks().pool();
    for (&block, &count) in &holders {
        assert_eq!(pool.ref_count(block), Ok(count), "references to block {block}");
    }
    assert_eq!(scheduler.num_used_blocks(), holders.len(), "used blocks");
    assert_eq!(
        scheduler.num_free_blocks() + scheduler.num_used_blocks(),
        CONFIG.num_blocks,
        "free (cached included) + used blocks"
    );
    assert!(scheduler.num_cached_blocks() <= scheduler.num_free_blocks());
    assert!(scheduler.kv_blocks().num_indexed() <= CONFIG.num_blocks);
}

#[test]
fn thousands_of_random_requests_keep_every_invariant_and_output() {
    let stats = simulate(CONFIG, false);
    assert_eq!(stats.prefix_cache, PrefixCacheStats::default());
}

#[test]
fn prefix_caching_under_random_load_reuses_blocks_and_changes_no_output() {
    let config = SchedulerConfig {
        enable_prefix_caching: true,
        ..CONFIG
    };
    let stats = simulate(config, true);
    let cache = stats.prefix_cache;
    assert!(
        cache.hit_tokens * 10 > cache.queried_tokens,
        "shared prefixes should hit often: {cache:?}"
    );
}

/// Runs the whole simulation, checking everything on the way; returns its statistics.
fn simulate(config: SchedulerConfig, shared_prefixes: bool) -> Stats {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_cafe);
    let requests = make_requests(&mut rng, shared_prefixes);
    let mut scheduler = Scheduler::new(config).unwrap();
    let mut kv = vec![None; CONFIG.num_blocks * CONFIG.block_size];
    let mut stats = Stats::default();

    let mut next_arrival = 0;
    let mut live = 0usize;
    let mut done = vec![false; NUM_REQUESTS];
    let mut outputs: HashMap<RequestId, FinishedRequest> = HashMap::new();
    let mut head_wait = vec![0usize; NUM_REQUESTS];
    let mut last_first_scheduled: Option<RequestId> = None;
    let mut aborts_by_step: HashMap<usize, Vec<(RequestId, bool)>> = HashMap::new();
    for (n, request) in requests.iter().enumerate() {
        if let Some((step, in_flight)) = request.abort {
            aborts_by_step
                .entry(step)
                .or_default()
                .push((RequestId(n as u64), in_flight));
        }
    }

    while next_arrival < NUM_REQUESTS || live > 0 {
        let step = stats.steps;
        assert!(step < MAX_STEPS, "no progress: {live} live requests after {step} steps");
        while next_arrival < NUM_REQUESTS && requests[next_arrival].arrival_step <= step {
            scheduler.add_request(requests[next_arrival].new.clone()).unwrap();
            live += 1;
            next_arrival += 1;
        }
        let aborts = aborts_by_step.remove(&step).unwrap_or_default();
        for &(id, _) in aborts.iter().filter(|(_, in_flight)| !in_flight) {
            abort_if_live(&mut scheduler, id, &mut done, &mut live, &mut stats.aborted);
        }
        check_pool_and_tables(&scheduler, live);

        let head = scheduler.waiting_ids().next();
        let plan = scheduler.schedule().unwrap();
        assert!(plan.num_batched_tokens <= CONFIG.max_num_batched_tokens);
        assert_eq!(
            plan.num_batched_tokens,
            plan.scheduled.iter().map(|e| e.num_tokens).sum::<usize>()
        );
        assert!(plan.scheduled.len() <= CONFIG.max_num_seqs);
        if let Some(head) = head.filter(|&h| scheduler.request(h).unwrap().status() == RequestStatus::Waiting) {
            head_wait[head.0 as usize] += 1;
            stats.max_head_wait = stats.max_head_wait.max(head_wait[head.0 as usize]);
            assert!(
                head_wait[head.0 as usize] <= HEAD_WAIT_BOUND,
                "request {head} starves at the head of the queue"
            );
        }
        // First admissions happen strictly in arrival order (FCFS).
        for &id in &plan.first_scheduled {
            assert!(last_first_scheduled < Some(id), "{id} admitted out of arrival order");
            last_first_scheduled = Some(id);
        }
        // Preempted requests wait at the front of the queue, the earliest admitted first.
        let front: Vec<RequestId> = scheduler.waiting_ids().take(plan.preempted.len()).collect();
        assert!(
            front.iter().eq(plan.preempted.iter().rev()),
            "preempted {:?}, queue front {front:?}",
            plan.preempted
        );
        stats.preempted += plan.preempted.len();
        stats.resumed += plan.resumed.len();
        stats.batched_tokens += plan.num_batched_tokens;
        stats.max_running = stats.max_running.max(scheduler.num_running());
        check_pool_and_tables(&scheduler, live);

        let sampled = run_model(&scheduler, &plan, &requests, &mut kv);
        for &(id, _) in aborts.iter().filter(|(_, in_flight)| *in_flight) {
            abort_if_live(&mut scheduler, id, &mut done, &mut live, &mut stats.aborted);
        }
        for finished in scheduler.update(&sampled).unwrap() {
            let n = finished.id.0 as usize;
            assert!(!done[n]);
            done[n] = true;
            live -= 1;
            stats.finished += 1;
            stats.max_latency = stats.max_latency.max(step + 1 - requests[n].arrival_step);
            outputs.insert(finished.id, finished);
        }
        stats.steps += 1;
    }

    check_pool_and_tables(&scheduler, 0);
    assert_eq!(scheduler.num_free_blocks(), CONFIG.num_blocks);
    stats.prefix_cache = scheduler.prefix_cache_stats();
    assert!(!scheduler.has_unfinished_requests());
    assert_eq!(stats.finished + stats.aborted, NUM_REQUESTS);
    assert_eq!(stats.preempted as u64, scheduler.num_preemptions());
    for (id, output) in &outputs {
        let expected = &requests[id.0 as usize].expected_tokens[requests[id.0 as usize].new.prompt_token_ids.len()..];
        assert_eq!(
            output.generated_token_ids, expected,
            "output of {id} (preempted {} times)",
            output.num_preemptions
        );
        let stopped = expected.last() == Some(&STOP_TOKEN) && id.0 % 2 == 1;
        assert_eq!(
            output.reason,
            if stopped {
                FinishReason::Stop
            } else {
                FinishReason::Length
            },
            "reason of {id}"
        );
    }
    // The pool is small enough that the run exercises preemption and recompute heavily.
    assert!(stats.preempted >= 100, "only {} preemptions", stats.preempted);
    assert!(outputs
        .values()
        .any(|o| o.num_preemptions > 0 && o.generated_token_ids.len() > 1));
    eprintln!(
        "simulated {NUM_REQUESTS} requests in {} steps: {} finished, {} aborted, {} preemptions ({} resumed), \
         {:.1} tokens/step, at most {} running, max head-of-queue wait {} steps, max latency {} steps, {:?}",
        stats.steps,
        stats.finished,
        stats.aborted,
        stats.preempted,
        stats.resumed,
        stats.batched_tokens as f64 / stats.steps as f64,
        stats.max_running,
        stats.max_head_wait,
        stats.max_latency,
        started.elapsed()
    );
    eprintln!("prefix cache: {:?}", stats.prefix_cache);
    stats
}
