//! Tensor and expert parallelism on the CPU (ranks as threads): every family's fixture split
//! TP 2 and 4, EP 2 and 4, and TP 4 x EP 2 gives one rank's logits (and transformers') and
//! its greedy tokens, through chunked prefill, preemption and prefix-cache hits; each rank
//! holds 1/N of what is split (measured); a rank that fails fails the step on every rank,
//! and the next step runs.

use candle_core::{DType, Tensor};
use moe_engine::runner::ModelRunner;
use moe_engine::{Engine, EngineConfig, GenerationRequest, PromptScorer};
use moe_models::{CausalLm, ForwardCtx, LoadOptions, Model, ModelConfig, ParallelLayout};
use moe_tests::{fixture, golden, greedy_requests, load_model, load_sharded_model, max_abs_diff};

/// Same bound as the golden tests (tests/golden.rs): a split model sums the same products
/// in another order (partial sums over ranks), which moves f32 logits by ~1e-6.
const F32_ATOL: f32 = 1e-4;

/// Every family's f32 fixture, then the quantized ones (FP8 blocks whole and ragged, INT4).
const MODELS: &[&str] = &[
    "deepseek-v2-lite",
    "deepseek-v2",
    "deepseek-v3",
    "kimi-k25",
    "glm4-moe-lite",
    "glm4-moe",
    "glm4-moe-qknorm",
    "minimax-m2",
    "qwen3-moe",
    "qwen3-moe-yarn",
    "mixtral",
    "deepseek-v32",
    "glm5",
    "deepseek-v3-fp8",
    "deepseek-v3-fp8-ragged",
    "minimax-m2-fp8",
    "kimi-k25-int4",
];

/// One rank through the group (every collective run, as one GPU runs NCCL), TP 2, TP 4,
/// EP 2, EP 4 (each rank whole experts), TP 4 x EP 2 (experts in 2 groups, each sliced over
/// 2 ranks).
fn layouts() -> Vec<ParallelLayout> {
    [(1, 1), (2, 1), (4, 1), (2, 2), (4, 4), (4, 2)]
        .into_iter()
        .map(|(tp, ep)| ParallelLayout::new(tp, ep).unwrap())
        .collect()
}

/// Logits at every position of every golden prompt, prompts batched together in chunks of 5
/// tokens over blocks of 3 (every chunk after the first reads what earlier steps cached).
fn chunked_logits(model: &dyn CausalLm, prompts: &[Vec<u32>]) -> Vec<Tensor> {
    PromptScorer::new(model, 3, 5)
        .unwrap()
        .prompt_logits(prompts, None)
        .unwrap()
}

#[test]
fn split_models_give_one_ranks_logits_in_every_family_and_layout() {
    for m in MODELS {
        let dir = fixture(m);
        let g = golden(&dir);
        let one = load_model(&dir, DType::F32, &LoadOptions::default());
        let want = chunked_logits(&one, &g.prompts);
        for layout in layouts() {
            let split = load_sharded_model(&dir, DType::F32, layout);
            let got = chunked_logits(&split, &g.prompts);
            // Same input, same output: a second run gives the same bits.
            let again = chunked_logits(&split, &g.prompts);
            for (a, b) in got.iter().zip(&again) {
                assert_eq!(max_abs_diff(a, b), 0.0, "{m} {}: not deterministic", layout.describe());
            }
            for (i, ((got, one), golden)) in got.iter().zip(&want).zip(&g.logits).enumerate() {
                let vs_one = max_abs_diff(got, one);
                let vs_golden = max_abs_diff(got, golden);
                eprintln!(
                    "{m} {} prompt {i}: vs one rank {vs_one:.1e}, vs transformers {vs_golden:.1e}",
                    layout.describe()
                );
                assert!(
                    vs_one < F32_ATOL,
                    "{m} {} prompt {i}: {vs_one} from one rank",
                    layout.describe()
                );
                assert!(
                    vs_golden < F32_ATOL,
                    "{m} {} prompt {i}: {vs_golden} from transformers",
                    layout.describe()
                );
            }
        }
    }
}

/// Greedy outputs through the engine under a cache too small for all requests at once
/// (24 blocks of 4), 16 tokens a step; each prompt submitted twice, the second copy after
/// the first finished, so it starts from cached prefix blocks. Returns the outputs and the
/// engine's preemption and prefix-hit counts.
fn engine_run(model: Model, requests: &[GenerationRequest]) -> (Vec<Vec<u32>>, u64, u64) {
    let runner = ModelRunner::new(model, 24, 4).unwrap();
    let config = EngineConfig {
        max_num_batched_tokens: 16,
        max_num_seqs: 16,
        max_model_len: 96,
        enable_prefix_caching: true,
    };
    let engine = Engine::start(runner, None, config).unwrap();
    let streams: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    let mut outputs: Vec<Vec<u32>> = streams.into_iter().map(|s| s.collect().unwrap().token_ids).collect();
    for r in requests {
        outputs.push(engine.submit(r.clone()).unwrap().collect().unwrap().token_ids);
    }
    let stats = engine.stats();
    (outputs, stats.preemptions, stats.prefix_cache_hits)
}

#[test]
fn split_models_generate_one_ranks_tokens_through_preemption_and_prefix_hits() {
    for m in MODELS {
        let dir = fixture(m);
        let g = golden(&dir);
        let requests = greedy_requests(&g.prompts, g.greedy[0].len());
        for layout in layouts() {
            let split = load_sharded_model(&dir, DType::F32, layout);
            let (outputs, preemptions, hits) = engine_run(Box::new(split), &requests);
            assert!(
                preemptions > 0,
                "{m} {}: the cache was meant to be too small",
                layout.describe()
            );
            assert!(
                hits > 0,
                "{m} {}: the repeated prompts were meant to hit the prefix cache",
                layout.describe()
            );
            for (i, out) in outputs.iter().enumerate() {
                let want = &g.greedy[i % g.prompts.len()];
                assert_eq!(out, want, "{m} {} request {i}", layout.describe());
            }
        }
    }
}

/// Fixtures whose per-rank bytes are checked: MLA, MLA with DSA, GQA with per-head and
/// whole-projection QK-norms, INT4 experts, FP8 blocks.
const BYTES_MODELS: &[&str] = &[
    "deepseek-v3",
    "deepseek-v32",
    "qwen3-moe",
    "minimax-m2",
    "kimi-k25-int4",
    "deepseek-v3-fp8",
];

/// Weight bytes each rank of `layout` holds for the fixture in `dir`.
fn rank_bytes(dir: &std::path::Path, layout: ParallelLayout) -> Vec<u64> {
    load_sharded_model(dir, DType::F32, layout)
        .resident_bytes_per_rank()
        .to_vec()
}

#[test]
fn each_rank_holds_an_nth_of_what_is_split() {
    // A rank holds R + S / N bytes: R what stays whole on every rank (norms, routers, MLA's
    // low-rank down-projections, DSA's indexer), S what is split. One rank (R + S) and two
    // ranks give R and S; every rank of every layout must then hold R + S / N, within 3% (the
    // zero embedding row, and quantization scales whose group is wider than a rank's 8-column
    // slice here). GQA's kv heads, when fewer than the ranks, are held whole by the ranks that
    // read them. (FP8 blocks that a rank's columns cut, as in deepseek-v3-fp8-ragged, cost
    // extra scales: see `part_scheme` in the loader.)
    for m in BYTES_MODELS {
        let dir = fixture(m);
        let bytes = |layout: ParallelLayout| rank_bytes(&dir, layout);
        let whole = bytes(ParallelLayout::single())[0] as f64;
        let two = bytes(ParallelLayout::new(2, 1).unwrap());
        let split = 2.0 * (whole - two[0] as f64);
        let replicated = whole - split;
        eprintln!(
            "{m}: {whole} bytes; {:.0}% stays whole on every rank at this fixture's width (64)",
            100.0 * replicated / whole
        );
        assert!(split > 0.6 * whole, "{m}: only {split} of {whole} bytes split");
        // GQA with fewer kv heads than ranks: each rank keeps one whole kv head of K and V
        // (f32), not 1/N of them.
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let kv_replication = |n: usize| -> f64 {
            let Some(g) = config.gqa() else { return 0.0 };
            if n <= g.num_kv_heads {
                return 0.0;
            }
            let per_head = g.head_dim * (config.hidden_size + usize::from(g.qkv_bias)) * 4 * 2;
            let all = (per_head * g.num_kv_heads * config.num_hidden_layers) as f64;
            all / g.num_kv_heads as f64 - all / n as f64
        };
        for layout in layouts() {
            let per_rank = bytes(layout);
            let want = replicated + split / layout.ranks() as f64 + kv_replication(layout.ranks());
            for (rank, &b) in per_rank.iter().enumerate() {
                let off = (b as f64 - want).abs() / want;
                assert!(
                    off < 0.03,
                    "{m} {} rank {rank}: {b} bytes, expected {want:.0}",
                    layout.describe()
                );
            }
        }
    }
}

#[test]
fn a_failing_rank_fails_the_step_everywhere_and_the_next_step_runs() {
    let dir = fixture("deepseek-v3");
    let g = golden(&dir);
    let split = load_sharded_model(&dir, DType::F32, ParallelLayout::new(4, 4).unwrap());
    let good = split.new_cache(8, 16).unwrap();
    // Rank 2's part of the cache is made for another model: it fails before its first
    // collective, while ranks 0, 1 and 3 wait in theirs.
    let mut broken = good.clone();
    broken.peer_ranks[1] = load_model(&fixture("qwen3-moe"), DType::F32, &LoadOptions::default())
        .new_cache(8, 16)
        .unwrap();
    let prompt = &g.prompts[1];
    let batch = |cache_blocks: Vec<u32>| {
        let mut b = moe_engine::BatchBuilder::new(16);
        b.push(&moe_engine::SeqChunk {
            tokens: prompt.clone(),
            start_pos: 0,
            block_table: cache_blocks,
            logits: moe_engine::LogitRows::All,
        })
        .unwrap();
        b.tensors(split.device()).unwrap()
    };
    let t = batch(vec![0]);
    let ctx: ForwardCtx<'_> = t.ctx(None);
    let err = split.forward(&ctx, &broken).unwrap_err().to_string();
    assert!(err.contains("rank 2") && err.contains("cache"), "{err}");
    // The group recovered: the same step on the right cache matches transformers.
    let logits = split.forward(&ctx, &good).unwrap();
    assert!(max_abs_diff(&logits, &g.logits[1]) < F32_ATOL);

    // Rank 0 failing alone (a group of one rank, a token outside the vocabulary): the
    // group recovers too, and the next step runs.
    let one = load_sharded_model(&dir, DType::F32, ParallelLayout::single());
    let cache = one.new_cache(8, 16).unwrap();
    let mut b = moe_engine::BatchBuilder::new(16);
    b.push(&moe_engine::SeqChunk {
        tokens: vec![5, 100_000],
        start_pos: 0,
        block_table: vec![0],
        logits: moe_engine::LogitRows::All,
    })
    .unwrap();
    let bad = b.tensors(one.device()).unwrap();
    let err = one.forward(&bad.ctx(None), &cache).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let t = batch(vec![0]);
    let logits = one.forward(&t.ctx(None), &cache).unwrap();
    assert!(max_abs_diff(&logits, &g.logits[1]) < F32_ATOL);
}

#[test]
fn inspects_per_rank_estimate_is_what_the_ranks_hold() {
    // The config-only estimate `moe inspect` prints against the bytes the ranks hold.
    for m in BYTES_MODELS {
        let dir = fixture(m);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        for layout in layouts().into_iter().skip(1) {
            let held = *rank_bytes(&dir, layout).iter().max().unwrap() as f64;
            let estimate = moe_models::inspect::rank_weight_bytes(&config, layout, 4) as f64;
            let off = (estimate - held).abs() / held;
            eprintln!(
                "{m} {}: estimate {estimate}, held {held} ({:.1}%)",
                layout.describe(),
                off * 100.0
            );
            assert!(
                off < 0.05,
                "{m} {}: estimate {estimate}, held {held}",
                layout.describe()
            );
        }
    }
}
