//! The trained demo model (`models/demo`: a tiny DeepSeek-V3 trained on addition and string
//! reversal by `models/demo/train.py`) answers its 500 held-out problems through the batched,
//! paged engine exactly as transformers' `generate()` answered them on the same checkpoint
//! (`heldout.jsonl` records both), whether the prompts are chunked, preempted, or found in
//! the prefix cache, raw or through the chat template; at least 99% of the answers are right,
//! and bf16 compute stays within one point of f32. A correctness signal that does not sit on
//! float ties, unlike the random-weight fixtures'.

use std::collections::HashMap;

use candle_core::DType;
use moe_engine::engine::{Engine, GenerationRequest};
use moe_tests::{demo_model, dir_tokenizer, model_engine, EngineLimits};

/// Output tokens of every request: the longest answer (10 characters) and its EOS, as
/// `train.py` (`ANSWER_TOKENS`) gave transformers.
const ANSWER_TOKENS: usize = 11;

/// Where transformers' best and second-best logits were closer than this at some step of an
/// answer, rounding may legitimately pick the other token; elsewhere we must agree.
const TIE_MARGIN: f64 = 1e-4;

/// One held-out problem and transformers' greedy answers to it (raw text and chat), with
/// each answer's smallest top-1 / top-2 logit gap.
struct Problem {
    prompt: String,
    answer: String,
    transformers_raw: String,
    raw_margin: f64,
    transformers_chat: String,
    chat_margin: f64,
}

fn problems() -> Vec<Problem> {
    let path = demo_model().join("heldout.jsonl");
    let text = std::fs::read_to_string(&path).expect("models/demo/heldout.jsonl");
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("heldout.jsonl line");
            let field = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} in {line}")).to_string();
            let margin = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {line}"));
            Problem {
                prompt: field("prompt"),
                answer: field("answer"),
                transformers_raw: field("transformers_raw"),
                raw_margin: margin("raw_margin"),
                transformers_chat: field("transformers_chat"),
                chat_margin: margin("chat_margin"),
            }
        })
        .collect()
}

/// The prompt the chat template renders for one user message (checked against the
/// template itself by server/tests/demo.rs: 14 prompt tokens for `12345+67890=`).
fn chat(prompt: &str) -> String {
    format!("<|user|>{prompt}<|assistant|>")
}

/// Submits every prompt at once, greedy, up to EOS (or ANSWER_TOKENS); the answers' texts
/// in prompt order.
fn answers(engine: &Engine, prompts: &[String]) -> Vec<String> {
    let tokenizer = dir_tokenizer(&demo_model());
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            let request = GenerationRequest {
                prompt_token_ids: tokenizer.encode(p).unwrap(),
                max_tokens: ANSWER_TOKENS,
                ..Default::default()
            };
            engine.submit(request).unwrap()
        })
        .collect();
    streams
        .into_iter()
        .map(|s| s.collect().expect("finished").text)
        .collect()
}

fn accuracy<S: AsRef<str>>(answers: &[S], problems: &[Problem]) -> f64 {
    let right = answers
        .iter()
        .zip(problems)
        .filter(|(a, p)| a.as_ref() == p.answer)
        .count();
    right as f64 / problems.len() as f64
}

/// Checks our answers against transformers': equal wherever transformers' margin was clear,
/// and the accuracies equal up to the near-ties. Returns our accuracy.
fn agree_with_transformers(ours: &[String], problems: &[Problem], chat: bool) -> f64 {
    fn theirs(p: &Problem, chat: bool) -> (&String, f64) {
        if chat {
            (&p.transformers_chat, p.chat_margin)
        } else {
            (&p.transformers_raw, p.raw_margin)
        }
    }
    let mut near_ties = 0;
    for (a, p) in ours.iter().zip(problems) {
        let (want, margin) = theirs(p, chat);
        if margin < TIE_MARGIN {
            near_ties += 1;
            if a != want {
                eprintln!(
                    "{} (chat: {chat}): {:?} vs transformers' {want:?} at a margin of {margin:.1e}",
                    p.prompt, a
                );
            }
            continue;
        }
        assert_eq!(
            a, want,
            "{} (chat: {chat}); transformers' margin {margin:.1e}",
            p.prompt
        );
    }
    let ours_right = accuracy(ours, problems);
    let theirs_right = accuracy(
        &problems.iter().map(|p| theirs(p, chat).0.as_str()).collect::<Vec<_>>(),
        problems,
    );
    assert!(
        (ours_right - theirs_right).abs() * problems.len() as f64 <= near_ties as f64 + 1e-9,
        "accuracy {ours_right} vs transformers' {theirs_right} (chat: {chat}, {near_ties} near-ties)"
    );
    ours_right
}

#[test]
fn f32_answers_equal_transformers_through_chunking_preemption_and_the_prefix_cache() {
    let problems = problems();
    assert_eq!(problems.len(), 500);
    let raw: Vec<String> = problems.iter().map(|p| p.prompt.clone()).collect();
    let chats: Vec<String> = problems.iter().map(|p| chat(&p.prompt)).collect();
    let everything: Vec<String> = raw.iter().chain(&chats).cloned().collect();

    // 1000 requests at once, 128 a step, 64 tokens a step (prompts are split across steps
    // and share them with decodes), 40 blocks of 2 tokens (room for about 5 whole requests:
    // admitted prompts outgrow it as they decode, and are preempted and recomputed), prefix
    // caching on.
    let limits = EngineLimits {
        block_size: 2,
        num_blocks: 40,
        max_num_batched_tokens: 64,
        max_num_seqs: 128,
        prefix_caching: true,
    };
    let engine = model_engine(&demo_model(), DType::F32, limits, 64);
    let first = answers(&engine, &everything);
    let (first_raw, first_chat) = first.split_at(raw.len());
    let stats = engine.stats();
    eprintln!("{stats:?}");
    assert!(stats.preemptions > 0, "the cache was meant to be too small: {stats:?}");
    assert_eq!(stats.blocks_used, 0, "every block returns to the pool");
    let raw_accuracy = agree_with_transformers(first_raw, &problems, false);
    let chat_accuracy = agree_with_transformers(first_chat, &problems, true);
    eprintln!("held-out accuracy: raw {raw_accuracy}, chat {chat_accuracy}");
    assert!(raw_accuracy >= 0.99, "raw accuracy {raw_accuracy}");
    assert!(chat_accuracy >= 0.99, "chat accuracy {chat_accuracy}");

    // A cache with room for everything: the raw prompts, then the same prompts again, whose
    // every whole block but the one holding the last prompt token is a prefix-cache hit.
    let limits = EngineLimits {
        block_size: 4,
        num_blocks: 4096,
        max_num_batched_tokens: 512,
        max_num_seqs: 512,
        prefix_caching: true,
    };
    let engine = model_engine(&demo_model(), DType::F32, limits, 64);
    let cold = answers(&engine, &raw);
    let hits_before = engine.stats().prefix_cache_hits;
    let warm = answers(&engine, &raw);
    let hits = engine.stats().prefix_cache_hits - hits_before;
    let cacheable: usize = raw.iter().map(|p| 4 * ((p.len() - 1) / 4)).sum();
    assert_eq!(
        hits as usize, cacheable,
        "prompt tokens found cached on the second pass"
    );
    assert_eq!(engine.stats().preemptions, 0);
    assert_eq!(&cold, first_raw, "answers alongside chats under preemption vs alone");
    assert_eq!(&warm, first_raw, "answers from cached prefixes");

    // Five tokens a step, no prefix cache, a roomy cache: prompts longer than 5 tokens are
    // split across steps, computed beside a few decodes.
    let limits = EngineLimits {
        block_size: 16,
        num_blocks: 512,
        max_num_batched_tokens: 5,
        max_num_seqs: 8,
        prefix_caching: false,
    };
    let chunked = answers(&model_engine(&demo_model(), DType::F32, limits, 64), &raw[..100]);
    assert_eq!(&chunked, &first_raw[..100], "answers from 5-token prefill chunks");
}

#[test]
fn bf16_accuracy_is_within_one_point_of_f32() {
    let problems = problems();
    let limits = EngineLimits {
        block_size: 16,
        num_blocks: 256,
        max_num_batched_tokens: 512,
        max_num_seqs: 256,
        prefix_caching: true,
    };
    let engine = model_engine(&demo_model(), DType::BF16, limits, 64);
    let raw: Vec<String> = problems.iter().map(|p| p.prompt.clone()).collect();
    let chats: Vec<String> = problems.iter().map(|p| chat(&p.prompt)).collect();
    // f32's answers are transformers' (the test above holds them equal).
    for (prompts, f32_answers, form) in [
        (
            &raw,
            problems.iter().map(|p| p.transformers_raw.as_str()).collect::<Vec<_>>(),
            "raw",
        ),
        (
            &chats,
            problems
                .iter()
                .map(|p| p.transformers_chat.as_str())
                .collect::<Vec<_>>(),
            "chat",
        ),
    ] {
        let bf16 = answers(&engine, prompts);
        let (f32_accuracy, bf16_accuracy) = (accuracy(&f32_answers, &problems), accuracy(&bf16, &problems));
        let mut by_task: HashMap<&str, (usize, usize)> = HashMap::new();
        for (a, p) in bf16.iter().zip(&problems) {
            let task = if p.prompt.starts_with("rev:") {
                "reversal"
            } else {
                "addition"
            };
            let e = by_task.entry(task).or_default();
            e.0 += usize::from(*a == p.answer);
            e.1 += 1;
        }
        eprintln!("{form}: bf16 accuracy {bf16_accuracy} (f32 {f32_accuracy}); right/total: {by_task:?}");
        assert!(
            (bf16_accuracy - f32_accuracy).abs() <= 0.01 + 1e-9,
            "{form}: bf16 accuracy {bf16_accuracy} vs f32 {f32_accuracy}"
        );
    }
}
