//! Unit tests of the scheduler's policy on small hand-traced scenarios (no model, no tensors).

use super::*;
use crate::block_pool::BlockId;

pub(super) fn config(max_num_batched_tokens: usize, block_size: usize, num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens,
        max_num_seqs: 16,
        max_model_len: block_size * num_blocks,
        block_size,
        num_blocks,
        enable_prefix_caching: false,
    }
}

pub(super) fn request(id: u64, prompt_len: usize, max_tokens: usize) -> NewRequest {
    NewRequest {
        id: RequestId(id),
        prompt_token_ids: (0..prompt_len as u32).map(|i| 1000 * id as u32 + i).collect(),
        max_tokens,
        stop_token_ids: Vec::new(),
    }
}

/// The fake model: the token sampled after `position` tokens of request `id`.
pub(super) fn fake_token(id: RequestId, position: usize) -> u32 {
    (id.0 * 100 + position as u64) as u32
}

/// Runs one scheduled step with the fake model.
pub(super) fn step(scheduler: &mut Scheduler) -> (SchedulerOutput, Vec<FinishedRequest>) {
    let plan = scheduler.schedule().unwrap();
    let sampled: Vec<SampledToken> = plan
        .scheduled
        .iter()
        .filter(|s| s.needs_sample)
        .map(|s| SampledToken {
            id: s.id,
            token_id: fake_token(s.id, s.start_position + s.num_tokens),
            finish: None,
        })
        .collect();
    let finished = scheduler.update(&sampled).unwrap();
    (plan, finished)
}

/// `(id, start_position, num_tokens)` of each scheduled entry.
pub(super) fn shares(plan: &SchedulerOutput) -> Vec<(u64, usize, usize)> {
    plan.scheduled
        .iter()
        .map(|s| (s.id.0, s.start_position, s.num_tokens))
        .collect()
}

pub(super) fn ids(list: &[RequestId]) -> Vec<u64> {
    list.iter().map(|id| id.0).collect()
}

#[test]
fn config_rejects_zero_fields_and_a_pool_smaller_than_one_request() {
    let good = config(8, 4, 4);
    assert!(Scheduler::new(good).is_ok());
    for zeroed in [
        SchedulerConfig {
            max_num_batched_tokens: 0,
            ..good
        },
        SchedulerConfig {
            max_num_seqs: 0,
            ..good
        },
        SchedulerConfig {
            max_model_len: 0,
            ..good
        },
        SchedulerConfig { block_size: 0, ..good },
        SchedulerConfig { num_blocks: 0, ..good },
    ] {
        assert!(
            matches!(Scheduler::new(zeroed), Err(SchedulerError::InvalidConfig(_))),
            "{zeroed:?}"
        );
    }
    let too_long = SchedulerConfig {
        max_model_len: 17,
        ..good
    };
    assert!(matches!(
        Scheduler::new(too_long),
        Err(SchedulerError::InvalidConfig(_))
    ));
}

#[test]
fn add_request_rejects_bad_requests() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 10,
        ..config(8, 4, 4)
    })
    .unwrap();
    assert_eq!(
        s.add_request(request(1, 0, 1)),
        Err(SchedulerError::EmptyPrompt(RequestId(1)))
    );
    assert_eq!(
        s.add_request(request(1, 3, 0)),
        Err(SchedulerError::ZeroMaxTokens(RequestId(1)))
    );
    let err = s.add_request(request(1, 6, 5)).unwrap_err();
    assert_eq!(
        err,
        SchedulerError::ExceedsMaxModelLen {
            id: RequestId(1),
            num_prompt_tokens: 6,
            max_tokens: 5,
            max_model_len: 10
        }
    );
    assert!(err.to_string().contains("max_model_len 10"));
    s.add_request(request(1, 6, 4)).unwrap();
    assert_eq!(
        s.add_request(request(1, 2, 2)),
        Err(SchedulerError::DuplicateRequest(RequestId(1)))
    );
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn long_prompt_is_split_into_chunks_and_samples_only_after_the_last() {
    let mut s = Scheduler::new(config(4, 4, 8)).unwrap();
    s.add_request(request(1, 10, 2)).unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (plan, finished) = step(&mut s);
        assert!(finished.is_empty());
        let entry = &plan.scheduled[0];
        assert_eq!(
            entry.token_ids,
            request(1, 10, 2).prompt_token_ids[entry.start_position..][..entry.num_tokens]
        );
        assert_eq!(
            entry.block_table.len(),
            (entry.start_position + entry.num_tokens).div_ceil(4)
        );
        seen.push((entry.start_position, entry.num_tokens, entry.needs_sample));
    }
    assert_eq!(seen, vec![(0, 4, false), (4, 4, false), (8, 2, true)]);
    let (plan, finished) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 10, 1)]);
    assert_eq!(plan.scheduled[0].token_ids, vec![fake_token(RequestId(1), 10)]);
    assert_eq!(
        finished[0].generated_token_ids,
        vec![fake_token(RequestId(1), 10), fake_token(RequestId(1), 11)]
    );
    assert_eq!(finished[0].reason, FinishReason::Length);
    assert_eq!(s.num_free_blocks(), 8);
    assert!(!s.has_unfinished_requests());
}

#[test]
fn decode_tokens_and_a_prompt_chunk_share_a_step() {
    let mut s = Scheduler::new(config(5, 4, 8)).unwrap();
    s.add_request(request(1, 3, 5)).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 0, 3)]);
    assert_eq!(ids(&plan.first_scheduled), vec![1]);
    s.add_request(request(2, 10, 5)).unwrap();
    let (plan, _) = step(&mut s);
    // The running request decodes first; the newcomer gets the rest of the budget.
    assert_eq!(shares(&plan), vec![(1, 3, 1), (2, 0, 4)]);
    assert_eq!(plan.num_batched_tokens, 5);
    assert_eq!(ids(&plan.first_scheduled), vec![2]);
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 4, 1), (2, 4, 4)]);
    assert!(plan.first_scheduled.is_empty());
}

#[test]
fn waiting_head_that_does_not_fit_blocks_later_requests() {
    let mut s = Scheduler::new(config(64, 4, 4)).unwrap();
    s.add_request(request(1, 8, 8)).unwrap();
    step(&mut s);
    assert_eq!(s.num_free_blocks(), 2);
    s.add_request(request(2, 12, 1)).unwrap(); // needs 3 blocks: must wait
    s.add_request(request(3, 1, 1)).unwrap(); // would fit, but arrived later
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 8, 1)]);
    assert_eq!(s.waiting_ids().map(|id| id.0).collect::<Vec<_>>(), vec![2, 3]);
    // Once the first finishes, the head goes first.
    let mut order = Vec::new();
    while s.has_unfinished_requests() {
        let (plan, _) = step(&mut s);
        order.extend(ids(&plan.first_scheduled));
    }
    assert_eq!(order, vec![2, 3]);
}

#[test]
fn max_num_seqs_caps_running_requests() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 2,
        ..config(64, 4, 16)
    })
    .unwrap();
    for id in 1..=3 {
        s.add_request(request(id, 2, 3)).unwrap();
    }
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 0, 2), (2, 0, 2)]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
}

#[test]
fn token_budget_stops_running_requests_too() {
    let mut s = Scheduler::new(config(2, 4, 16)).unwrap();
    for id in 1..=3 {
        s.add_request(request(id, 1, 4)).unwrap();
    }
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 0, 1), (2, 0, 1)]);
    let (plan, _) = step(&mut s);
    // The oldest running requests use the whole budget; the third still waits.
    assert_eq!(shares(&plan), vec![(1, 1, 1), (2, 1, 1)]);
    assert_eq!(s.num_waiting(), 1);
}

/// Two requests in lockstep on `num_blocks` blocks of 2 tokens; runs until one is preempted.
fn lockstep_until_preemption(num_blocks: usize) -> (Scheduler, SchedulerOutput) {
    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 8,
        ..config(64, 2, num_blocks)
    })
    .unwrap();
    s.add_request(request(1, 2, 6)).unwrap();
    s.add_request(request(2, 2, 6)).unwrap();
    loop {
        let (plan, finished) = step(&mut s);
        assert!(finished.is_empty());
        if !plan.preempted.is_empty() {
            return (s, plan);
        }
    }
}

#[test]
fn preemption_picks_the_newest_and_recomputes_its_generated_tokens() {
    let (mut s, plan) = lockstep_until_preemption(4);
    // Both held 2 blocks at 4 tokens each; the older one needs a third.
    assert_eq!(shares(&plan), vec![(1, 4, 1)]);
    assert_eq!(ids(&plan.preempted), vec![2]);
    assert_eq!(s.num_preemptions(), 1);
    let victim = s.request(RequestId(2)).unwrap();
    assert_eq!(
        (
            victim.status(),
            victim.num_computed_tokens(),
            victim.block_table().len()
        ),
        (RequestStatus::Waiting, 0, 0)
    );
    let replay = victim.token_ids().to_vec();
    assert_eq!(replay.len(), 5, "prompt 2 + 3 generated");

    let mut finished = Vec::new();
    let mut resumed_entry = None;
    while s.has_unfinished_requests() {
        let (plan, done) = step(&mut s);
        if plan.resumed.contains(&RequestId(2)) {
            resumed_entry = plan.scheduled.iter().find(|e| e.id == RequestId(2)).cloned();
        }
        finished.extend(done);
    }
    let resumed = resumed_entry.expect("the victim resumes");
    assert_eq!(
        (resumed.start_position, resumed.num_tokens, resumed.needs_sample),
        (0, 5, true)
    );
    assert_eq!(resumed.token_ids, replay);
    let victim = finished.iter().find(|f| f.id == RequestId(2)).unwrap();
    let uninterrupted: Vec<u32> = (2..8).map(|p| fake_token(RequestId(2), p)).collect();
    assert_eq!(victim.generated_token_ids, uninterrupted);
    assert_eq!(victim.num_preemptions, 1);
    assert_eq!(s.num_free_blocks(), 4);
}

#[test]
fn newest_request_preempts_itself_when_an_older_one_took_the_last_block() {
    let (s, plan) = lockstep_until_preemption(5);
    assert_eq!(shares(&plan), vec![(1, 4, 1)]);
    assert_eq!(ids(&plan.preempted), vec![2]);
    assert_eq!(s.num_free_blocks(), 2);
}

#[test]
fn newest_request_takes_a_smaller_chunk_before_preempting_itself() {
    let mut s = Scheduler::new(config(8, 4, 4)).unwrap();
    s.add_request(request(1, 4, 4)).unwrap();
    step(&mut s);
    s.add_request(request(2, 12, 1)).unwrap();
    let (plan, _) = step(&mut s);
    assert_eq!(shares(&plan), vec![(1, 4, 1), (2, 0, 7)]);
    assert_eq!(s.num_free_blocks(), 0);
    let (plan, _) = step(&mut s);
    // Request 2 would want 5 more tokens, but only its second block's last slot is free.
    assert_eq!(shares(&plan), vec![(1, 5, 1), (2, 7, 1)]);
    assert!(plan.preempted.is_empty());
}

#[test]
fn abort_frees_blocks_of_waiting_running_and_in_flight_requests() {
    let mut s = Scheduler::new(config(64, 4, 4)).unwrap();
    s.add_request(request(1, 5, 4)).unwrap();
    s.add_request(request(2, 9, 4)).unwrap();
    step(&mut s);
    s.add_request(request(3, 2, 2)).unwrap();
    assert_eq!((s.num_running(), s.num_waiting(), s.num_free_blocks()), (1, 2, 2));
    s.abort(RequestId(3)).unwrap();
    assert_eq!(s.num_waiting(), 1);
    s.abort(RequestId(1)).unwrap();
    assert_eq!((s.num_running(), s.num_free_blocks()), (0, 4));
    assert_eq!(s.abort(RequestId(1)), Err(SchedulerError::UnknownRequest(RequestId(1))));

    let plan = s.schedule().unwrap();
    assert_eq!(shares(&plan), vec![(2, 0, 9)]);
    s.abort(RequestId(2)).unwrap();
    assert_eq!(s.num_free_blocks(), 4);
    // The runner may still report the aborted request's token; it is ignored.
    let token = SampledToken {
        id: RequestId(2),
        token_id: 5,
        finish: None,
    };
    assert_eq!(s.update(&[token]), Ok(vec![]));
    assert!(!s.has_unfinished_requests());
}

#[test]
fn stop_token_and_caller_finish_end_a_request() {
    let mut s = Scheduler::new(config(64, 4, 8)).unwrap();
    let mut stopping = request(1, 2, 10);
    stopping.stop_token_ids = vec![fake_token(RequestId(1), 4)];
    s.add_request(stopping).unwrap();
    s.add_request(request(2, 2, 10)).unwrap();
    let mut finished = Vec::new();
    for _ in 0..3 {
        let plan = s.schedule().unwrap();
        let sampled: Vec<_> = plan
            .scheduled
            .iter()
            .filter(|e| e.needs_sample)
            .map(|e| {
                let position = e.start_position + e.num_tokens;
                let finish = (e.id == RequestId(2) && position == 3).then_some(FinishReason::Stop);
                SampledToken {
                    id: e.id,
                    token_id: fake_token(e.id, position),
                    finish,
                }
            })
            .collect();
        finished.extend(s.update(&sampled).unwrap());
    }
    let summary: Vec<_> = finished
        .iter()
        .map(|f| (f.id.0, f.generated_token_ids.len(), f.reason))
        .collect();
    assert_eq!(summary, vec![(2, 2, FinishReason::Stop), (1, 3, FinishReason::Stop)]);
    assert_eq!(s.num_free_blocks(), 8);
}

#[test]
fn update_rejects_inconsistent_reports_without_changing_state() {
    let mut s = Scheduler::new(config(4, 4, 8)).unwrap();
    s.add_request(request(1, 2, 3)).unwrap();
    s.add_request(request(2, 6, 3)).unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(shares(&plan), vec![(1, 0, 2), (2, 0, 2)]);
    assert_eq!(s.schedule(), Err(SchedulerError::StepInFlight));
    let token = |id| SampledToken {
        id: RequestId(id),
        token_id: 9,
        finish: None,
    };
    assert_eq!(s.update(&[]), Err(SchedulerError::MissingSample(RequestId(1))));
    assert_eq!(
        s.update(&[token(1), token(2)]),
        Err(SchedulerError::UnexpectedSample(RequestId(2)))
    );
    assert_eq!(
        s.update(&[token(1), token(7)]),
        Err(SchedulerError::UnexpectedSample(RequestId(7)))
    );
    assert_eq!(
        s.update(&[token(1), token(1)]),
        Err(SchedulerError::DuplicateSample(RequestId(1)))
    );
    assert_eq!(s.request(RequestId(1)).unwrap().num_computed_tokens(), 0);
    assert_eq!(s.update(&[token(1)]), Ok(vec![]));
    assert_eq!(s.request(RequestId(1)).unwrap().token_ids().len(), 3);
    assert_eq!(s.request(RequestId(2)).unwrap().num_computed_tokens(), 2);
    assert_eq!(
        s.update(&[token(1)]),
        Err(SchedulerError::UnexpectedSample(RequestId(1)))
    );
}

#[test]
fn block_tables_of_running_requests_are_disjoint() {
    let mut s = Scheduler::new(config(6, 2, 16)).unwrap();
    for id in 1..=4 {
        s.add_request(request(id, 3 + id as usize, 4)).unwrap();
    }
    for _ in 0..4 {
        step(&mut s);
        let mut all: Vec<BlockId> = s
            .running_ids()
            .flat_map(|id| s.request(id).unwrap().block_table().to_vec())
            .collect();
        let held = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), held);
        assert_eq!(held + s.num_free_blocks(), 16);
    }
}
