//! DeepSeek Sparse Attention at long context: the tiny DSA fixtures (random weights) with
//! `index_topk` raised to 64, scored over 4096 tokens. Every way of reaching a position
//! (chunked prefill, a prefix-cache hit that reuses another sequence's blocks, one token at a
//! time as decode computes it) must give the same logits: the indexer keys and latents a
//! later step reads were written by earlier steps, and the selection past the top-k boundary
//! may not drift. A prefix-cache hit reproduces chunked prefill bit for bit; one-token steps
//! round differently, which can flip a near-tie of the indexer (see the test). Also: the engine's greedy output for a long prompt is the same with and
//! without a cached prefix.

use candle_core::{DType, Device, Tensor};
use moe_engine::runner::ModelRunner;
use moe_engine::{BatchBuilder, Engine, EngineConfig, GenerationRequest, LogitRows, PromptScorer, SeqChunk};
use moe_models::{KvCache, LoadOptions, Model};
use moe_tests::{copy_fixture, load_model, max_abs_diff, TestRng};

const CONTEXT: usize = 4096;
const TOPK: usize = 64;
const BLOCK: usize = 16;
/// Same bound as the golden tests: different chunkings reorder the same f32 sums.
const ATOL: f32 = 1e-4;

/// The fixture `name` with `index_topk` 64 and room for 8192 positions.
fn long_context_model(name: &str) -> (tempfile::TempDir, Model) {
    let dir = copy_fixture(name);
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["index_topk"] = TOPK.into();
    cfg["max_position_embeddings"] = 8192.into();
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let model = load_model(dir.path(), DType::F32, &LoadOptions::default());
    (dir, model)
}

fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut rng = TestRng::new(seed);
    (0..len).map(|_| 2 + rng.below(318) as u32).collect()
}

/// Computes positions `start..end` of `tokens` in one step over blocks `table`, returning
/// the logits of every computed row, `[end - start, vocab]`.
fn run(model: &Model, cache: &KvCache, tokens: &[u32], start: usize, end: usize, table: &[u32]) -> Tensor {
    let mut batch = BatchBuilder::new(BLOCK);
    batch
        .push(&SeqChunk {
            tokens: tokens[start..end].to_vec(),
            start_pos: start,
            block_table: table[..end.div_ceil(BLOCK)].to_vec(),
            logits: LogitRows::All,
        })
        .unwrap();
    let t = batch.tensors(&Device::Cpu).unwrap();
    model.forward(&t.ctx(None), cache).unwrap()
}

fn check_paths_agree(name: &str) {
    let (_dir, model) = long_context_model(name);
    let tokens = prompt(4242, CONTEXT);

    // Chunked prefill: chunks of 1000 over 16-token blocks (they end mid-block).
    let chunked = PromptScorer::new(&model, BLOCK, 1000)
        .unwrap()
        .prompt_logits(std::slice::from_ref(&tokens), None)
        .unwrap()
        .remove(0);

    // Prefix-cache hit: a first sequence computes 2500 tokens; a second one takes over its
    // first 156 full blocks (2496 tokens) and computes only the remaining 1600 positions.
    let blocks = CONTEXT.div_ceil(BLOCK);
    let cache = model.new_cache(2 * blocks, BLOCK).unwrap();
    let first: Vec<u32> = (0..blocks as u32).rev().collect();
    run(&model, &cache, &tokens, 0, 2500, &first);
    let shared = 2500 / BLOCK;
    let second: Vec<u32> = first[..shared]
        .iter()
        .copied()
        .chain((blocks..2 * blocks - shared).map(|b| b as u32))
        .collect();
    let reused = shared * BLOCK;
    let hit = run(&model, &cache, &tokens, reused, CONTEXT, &second);
    let diff = max_abs_diff(&hit, &chunked.narrow(0, reused, CONTEXT - reused).unwrap());
    eprintln!("{name}: prefix-cache hit vs chunked prefill: max |logit diff| {diff:.2e}");
    assert!(diff < ATOL, "{name}: prefix-cache hit differs by {diff}");

    // One token at a time, as decode computes them, over the whole context. A one-row step
    // rounds its projections differently from a 1000-row chunk (~2e-6 in the logits), and an
    // indexer score that close to the k-th best can then fall on the other side of the
    // boundary, as it would between transformers' own cached and uncached passes. So: every
    // position within the tolerance up to the first such flip, and after it at most 1% of
    // positions off (a drift in what decode sees past the boundary moves all of them).
    let cache = model.new_cache(blocks, BLOCK).unwrap();
    let table: Vec<u32> = (0..blocks as u32).map(|b| (b * 37) % blocks as u32).collect();
    let diffs: Vec<f32> = (0..CONTEXT)
        .map(|p| {
            let row = run(&model, &cache, &tokens, p, p + 1, &table);
            max_abs_diff(&row, &chunked.narrow(0, p, 1).unwrap())
        })
        .collect();
    let off: Vec<usize> = (0..CONTEXT).filter(|&p| diffs[p] >= ATOL).collect();
    let mut sorted = diffs.clone();
    sorted.sort_by(f32::total_cmp);
    eprintln!(
        "{name}: token-at-a-time vs chunked prefill: median |logit diff| {:.2e}, {} of {CONTEXT} positions >= {ATOL:.0e} (first at {:?})",
        sorted[CONTEXT / 2],
        off.len(),
        off.first()
    );
    assert!(
        off.first().is_none_or(|&p| p > 4 * TOPK),
        "{name}: a difference at {:?}",
        off.first()
    );
    assert!(off.len() * 100 <= CONTEXT, "{name}: {} positions differ", off.len());
    assert!(
        sorted[CONTEXT / 2] < 1e-5,
        "{name}: median diff {}",
        sorted[CONTEXT / 2]
    );
}

#[test]
fn deepseek_v32_long_context_is_the_same_through_every_path() {
    check_paths_agree("deepseek-v32");
}

#[test]
fn glm5_long_context_is_the_same_through_every_path() {
    check_paths_agree("glm5");
}

#[test]
fn greedy_output_of_a_long_prompt_is_the_same_with_a_cached_prefix() {
    let (_dir, model) = long_context_model("glm5");
    let runner = ModelRunner::new(model, 600, BLOCK).unwrap();
    let config = EngineConfig {
        max_num_batched_tokens: 512,
        max_num_seqs: 4,
        max_model_len: 4096,
        enable_prefix_caching: true,
    };
    let engine = Engine::start(runner, None, config).unwrap();
    let system = prompt(7, 1500);
    let request = |own: u64| GenerationRequest {
        prompt_token_ids: system.iter().copied().chain(prompt(own, 300)).collect(),
        max_tokens: 24,
        ignore_eos: true,
        ..Default::default()
    };
    let first = engine.submit(request(1)).unwrap().collect().unwrap();
    let again = engine.submit(request(1)).unwrap().collect().unwrap();
    let other = engine.submit(request(2)).unwrap().collect().unwrap();
    assert_eq!(
        first.token_ids, again.token_ids,
        "a repeated prompt continues the same way"
    );
    // The repeat reuses all 112 full blocks of its 1800 tokens, the other request the 93 of
    // the shared system prompt.
    assert!(
        engine.stats().prefix_cache_hits >= 1792 + 1488,
        "the system prompt was reused: {:?}",
        engine.stats()
    );
    assert_eq!(other.token_ids.len(), 24);
}
