//! The NCCL path on GPUs (feature `cuda`; run by the GPU bundle from the repository root).
//! One GPU: fixtures loaded as a group of one rank on cuda:0, every collective of the layers
//! going through NCCL, give transformers' f32 logits and greedy tokens. Two or more GPUs:
//! TP 2 and EP 2 as well. The CPU tests (tests/parallel.rs) cover every layout with threads.

use candle_core::{DType, Device};
use moe_engine::runner::ModelRunner;
use moe_engine::{Engine, EngineConfig, GenerationRequest, PromptScorer};
use moe_models::parallel::{comm, load_sharded};
use moe_models::{LoadOptions, ModelConfig, ModelFiles, ParallelLayout, ShardedModel, Weights};
use moe_tests::{fixture, golden, max_abs_diff};

/// f32 on the GPU sums in other orders than the CPU (cuBLAS tiles, the MoE and attention
/// reductions): well within the golden tests' 1e-4 on these 64-wide fixtures is not promised,
/// 1e-3 is (logits are O(1..10); a wrong head, slice or routing moves them by > 0.1).
const GPU_F32_ATOL: f32 = 1e-3;

fn cuda_sharded(name: &str, layout: ParallelLayout) -> ShardedModel {
    let dir = fixture(name);
    let files = ModelFiles::from_dir(&dir).expect("model files");
    let config = ModelConfig::from_file(&files.config).expect("config");
    let devices: Vec<Device> = (0..layout.ranks())
        .map(|r| Device::new_cuda(r).expect("cuda device"))
        .collect();
    let open = |rank: usize| Ok(Weights::open(&files, DType::F32, &devices[rank])?.for_config(&config));
    let comms = comm::group_for(&devices).expect("NCCL group");
    assert_eq!(comms[0].transport(), "nccl");
    load_sharded(&config, layout, &open, &LoadOptions::default(), comms).expect("sharded model")
}

fn check(name: &str, layout: ParallelLayout) {
    let g = golden(&fixture(name));
    let model = cuda_sharded(name, layout);
    let got = PromptScorer::new(&model, 3, 5)
        .unwrap()
        .prompt_logits(&g.prompts, None)
        .unwrap();
    for (i, (got, want)) in got.iter().zip(&g.logits).enumerate() {
        let diff = max_abs_diff(&got.to_device(&Device::Cpu).unwrap(), want);
        eprintln!(
            "{name} {} over NCCL prompt {i}: max |logit diff| {diff:.2e}",
            layout.describe()
        );
        assert!(diff < GPU_F32_ATOL, "{name} {} prompt {i}: {diff}", layout.describe());
    }
    let runner = ModelRunner::new(Box::new(model), 64, 4).unwrap();
    let engine = Engine::start(
        runner,
        None,
        EngineConfig {
            max_num_batched_tokens: 16,
            max_num_seqs: 8,
            max_model_len: 256,
            enable_prefix_caching: true,
        },
    )
    .unwrap();
    for (prompt, want) in g.prompts.iter().zip(&g.greedy) {
        let out = engine
            .submit(GenerationRequest {
                prompt_token_ids: prompt.clone(),
                max_tokens: want.len(),
                ignore_eos: true,
                ..Default::default()
            })
            .unwrap()
            .collect()
            .unwrap();
        assert_eq!(&out.token_ids, want, "{name} {} greedy", layout.describe());
    }
}

#[test]
fn one_gpu_through_nccl_matches_transformers() {
    for name in ["deepseek-v3", "qwen3-moe", "minimax-m2"] {
        check(name, ParallelLayout::single());
    }
}

#[test]
fn two_gpus_split_tp_and_ep_when_present() {
    if Device::new_cuda(1).is_err() {
        eprintln!("one GPU: the two-GPU layouts are not run here");
        return;
    }
    for name in ["deepseek-v3", "qwen3-moe"] {
        check(name, ParallelLayout::new(2, 1).unwrap());
        check(name, ParallelLayout::new(2, 2).unwrap());
    }
}
