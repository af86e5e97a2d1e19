//! Shared helpers of the integration tests: fixture paths, golden tensors, model loading.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_engine::runner::ModelRunner;
use moe_engine::{Engine, EngineConfig, GenerationRequest, TextTokenizer};
use moe_models::parallel::{comm, load_sharded};
use moe_models::{load_model as build_model, Model, ModelConfig, ModelFiles, Weights};
use moe_models::{LoadOptions, ParallelLayout, ShardedModel};

/// `tests/fixtures/<name>`: in the source tree the test was built from, or, where that is
/// gone (a test binary carried to a GPU machine), under the current directory's
/// `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let root = if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    };
    root.join(name)
}

/// `models/demo`: the trained demo model (see models/demo/README.md).
pub fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

/// The golden outputs of one fixture directory (see tests/fixtures/README.md).
pub struct Golden {
    pub prompts: Vec<Vec<u32>>,
    /// `[len, vocab]` f32 per prompt.
    pub logits: Vec<Tensor>,
    pub greedy: Vec<Vec<u32>>,
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

pub fn golden(dir: &Path) -> Golden {
    let tensors =
        candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).expect("golden.safetensors");
    let mut g = Golden {
        prompts: vec![],
        logits: vec![],
        greedy: vec![],
    };
    for i in 0.. {
        let Some(p) = tensors.get(&format!("prompt.{i}")) else {
            break;
        };
        g.prompts.push(ids(p));
        g.logits.push(tensors[&format!("logits.{i}")].clone());
        g.greedy.push(ids(&tensors[&format!("greedy.{i}")]));
    }
    assert!(!g.prompts.is_empty(), "no prompts in {}", dir.display());
    g
}

pub fn load_model(dir: &Path, dtype: DType, options: &LoadOptions) -> Model {
    let files = ModelFiles::from_dir(dir).expect("model files");
    let config = ModelConfig::from_file(&files.config).expect("config");
    let weights = Weights::open(&files, dtype, &Device::Cpu)
        .expect("weights")
        .for_config(&config);
    build_model(&config, &weights, options).expect("model")
}

/// The model in `dir` split over the ranks of `layout`, ranks as threads on the CPU.
pub fn load_sharded_model(dir: &Path, dtype: DType, layout: ParallelLayout) -> ShardedModel {
    let files = ModelFiles::from_dir(dir).expect("model files");
    let config = ModelConfig::from_file(&files.config).expect("config");
    let open = |_rank: usize| Ok(Weights::open(&files, dtype, &Device::Cpu)?.for_config(&config));
    let comms = comm::group_for(&vec![Device::Cpu; layout.ranks()]).expect("group");
    load_sharded(&config, layout, &open, &LoadOptions::default(), comms).expect("sharded model")
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Copies a fixture directory into a fresh temporary directory, so a test can break it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    for e in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let e = e.expect("dir entry");
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).expect("copy fixture file");
    }
    tmp
}

/// One tensor of a safetensors file as owned data: (dtype, shape, little-endian bytes).
pub type OwnedTensor = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `dir/model.safetensors`, passing every tensor through `edit`, which may change
/// it or drop it (`None`). For tests that break checkpoints on purpose.
pub fn rewrite_safetensors(dir: &Path, mut edit: impl FnMut(&str, OwnedTensor) -> Option<OwnedTensor>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse model.safetensors");
    let owned: Vec<(String, OwnedTensor)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, t)| {
            let kept = edit(&name, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))?;
            Some((name, kept))
        })
        .collect();
    let views: Vec<_> = owned
        .iter()
        .map(|(name, (dtype, shape, data))| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).expect("tensor view");
            (name.clone(), view)
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &path).expect("write model.safetensors");
}

/// The tokenizer of a model directory (`tokenizer.json` with its config files).
pub fn dir_tokenizer(dir: &Path) -> Arc<TextTokenizer> {
    Arc::new(
        TextTokenizer::load(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
            Some(&dir.join("generation_config.json")),
        )
        .unwrap(),
    )
}

/// The fixture tokenizer (byte-level BPE with a chat template).
pub fn fixture_tokenizer() -> Arc<TextTokenizer> {
    dir_tokenizer(&fixture("deepseek-v3"))
}

/// Greedy requests for `prompts`, `max_tokens` each, EOS ignored (the fixtures' goldens
/// continue through it).
pub fn greedy_requests(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<GenerationRequest> {
    prompts
        .iter()
        .map(|p| GenerationRequest {
            prompt_token_ids: p.clone(),
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        })
        .collect()
}

/// Cache and step limits of a test engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub prefix_caching: bool,
}

/// A batching engine over the f32 V3 fixture with its tokenizer. `max_model_len` is the
/// fixture's 256 positions, or what the cache holds if less.
pub fn v3_engine(limits: EngineLimits) -> Engine {
    model_engine(&fixture("deepseek-v3"), DType::F32, limits, 256)
}

/// A batching engine over the model in `dir`, computing in `dtype`, with the directory's
/// tokenizer; `max_model_len` is capped by what the cache holds.
pub fn model_engine(dir: &Path, dtype: DType, limits: EngineLimits, max_model_len: usize) -> Engine {
    let model = load_model(dir, dtype, &LoadOptions::default());
    let runner = ModelRunner::new(model, limits.num_blocks, limits.block_size).unwrap();
    let config = EngineConfig {
        max_num_batched_tokens: limits.max_num_batched_tokens,
        max_num_seqs: limits.max_num_seqs,
        max_model_len: max_model_len.min(limits.block_size * limits.num_blocks),
        enable_prefix_caching: limits.prefix_caching,
    };
    Engine::start(runner, Some(dir_tokenizer(dir)), config).unwrap()
}

/// A small seeded generator for test data (a 64-bit LCG; the high bits are used).
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed)
    }

    /// Uniform in `0..m`.
    pub fn below(&mut self, m: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % m
    }
}
