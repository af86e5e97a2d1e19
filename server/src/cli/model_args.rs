//! Options every model-running subcommand shares (`--model`, `--dtype`, `--router`,
//! `--device`, the parallel layout) and the loading they drive.

use std::io::IsTerminal;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;
use moe_engine::TextTokenizer;
use moe_models::config::QuantConfig;
use moe_models::parallel::{comm, load_sharded};
use moe_models::synthetic::{synthetic_config, synthetic_name};
use moe_models::{
    load_model, parse_dtype, LoadOptions, LoadProgress, Model, ModelConfig, ModelFiles, ParallelLayout, RouterSpec,
    Weights,
};

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local model directory, a Hugging Face repo id (org/name[@revision]; repo files come
    /// from the Hugging Face cache when present, else they are downloaded), or
    /// synthetic:NAME for a released model's real shapes with random weights made on the
    /// device (NAME: deepseek-v2-lite, deepseek-v2, deepseek-v3, deepseek-v3.2, glm-5, kimi-k2, kimi-k2.5,
    /// moonlight-16b-a3b, glm-4.7-flash, glm-4.7, minimax-m2.7, qwen3-30b-a3b,
    /// qwen3-235b-a22b, mixtral-8x7b).
    #[arg(long)]
    pub model: String,

    /// Keep only the first N layers of a synthetic model (quick runs at real widths).
    #[arg(long)]
    pub num_layers: Option<usize>,

    /// Compute dtype: f32, bf16 or f16 (weights on disk may be any of these).
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// Replace the checkpoint's expert routing: NAME[:key=value,...], NAME one of greedy,
    /// group_limited_greedy, noaux_tc; keys top_k, scoring, n_group, topk_group, normalize,
    /// scale, bias. Example: --router greedy:top_k=4
    #[arg(long)]
    pub router: Option<String>,

    /// Device to run on: cpu, or cuda[:N] in a binary built with --features cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// How routed experts run: grouped (the GPU's routing, permutation and grouped-GEMM
    /// kernels where they apply: bf16 on CUDA) or reference (host routing and a loop of
    /// per-expert matmuls, the CPU path; for A/B comparisons). Same on the CPU.
    #[arg(long, default_value = "grouped", value_parser = ["grouped", "reference"])]
    pub expert_backend: String,

    /// Make a synthetic model's projections in a shipped quantized format: fp8 (e4m3 with
    /// 128x128 block scales, as DeepSeek-V3 ships; routers and lm_head plain) or int4
    /// (symmetric groups of 32, routed experts only, as Kimi K2.5 ships). Checkpoints say
    /// their own format in config.json.
    #[arg(long, value_parser = ["fp8", "int4"])]
    pub quantization: Option<String>,

    /// Split the model over N ranks (vLLM's flag): attention heads, dense MLPs, shared
    /// experts and the vocabulary over all of them, and the routed experts by their width
    /// unless expert parallelism is on. With --device cuda, rank r runs on cuda:r (from the
    /// --device ordinal on) and the ranks talk over NCCL; on the CPU they are threads.
    #[arg(long, short = 't', alias = "tp", default_value_t = 1)]
    pub tensor_parallel_size: usize,

    /// Partition the routed experts over the ranks (vLLM's flag): each rank holds whole
    /// experts, and tokens travel to their experts' ranks and back (all-to-all).
    #[arg(long)]
    pub enable_expert_parallel: bool,

    /// Partition the routed experts into E groups (E divides --tensor-parallel-size), each
    /// group's experts sliced by width over its ranks: TP x EP. --enable-expert-parallel is
    /// E = --tensor-parallel-size.
    #[arg(long, value_name = "E")]
    pub expert_parallel_size: Option<usize>,
}

pub struct LoadedModel {
    /// The checkpoint's files (`None` for a synthetic model).
    pub files: Option<ModelFiles>,
    /// What `--model` named, for messages.
    pub name: String,
    pub model: Model,
    pub tokenizer: Option<TextTokenizer>,
}

impl ModelArgs {
    pub fn device(&self) -> anyhow::Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            other if other.starts_with("cuda") => cuda_device(other),
            other => anyhow::bail!("--device {other:?}: expected cpu or cuda[:N]"),
        }
    }

    pub fn dtype(&self) -> anyhow::Result<DType> {
        Ok(parse_dtype(&self.dtype)?)
    }

    /// The parallel layout the flags ask for.
    pub fn layout(&self) -> anyhow::Result<ParallelLayout> {
        let tp = self.tensor_parallel_size;
        let ep = match (self.expert_parallel_size, self.enable_expert_parallel) {
            (Some(e), true) if e != tp => anyhow::bail!(
                "--enable-expert-parallel means --expert-parallel-size {tp} (--tensor-parallel-size), not {e}"
            ),
            (Some(e), _) => e,
            (None, true) => tp,
            (None, false) => 1,
        };
        ParallelLayout::new(tp, ep).map_err(|e| anyhow::anyhow!("--tensor-parallel-size / --expert-parallel-size: {e}"))
    }

    pub fn router(&self) -> anyhow::Result<Option<RouterSpec>> {
        self.router
            .as_deref()
            .map(|s| s.parse::<RouterSpec>())
            .transpose()
            .map_err(Into::into)
    }

    pub fn resolve(&self) -> anyhow::Result<(ModelFiles, ModelConfig)> {
        let files = ModelFiles::resolve(&self.model)?;
        let config =
            ModelConfig::from_file(&files.config).with_context(|| format!("reading {}", files.config.display()))?;
        Ok((files, config))
    }

    /// The model's config without reading weights: a synthetic model's, or the resolved
    /// checkpoint's.
    pub fn config(&self) -> anyhow::Result<ModelConfig> {
        match synthetic_name(&self.model) {
            Some(name) => self.synthetic(name),
            None => {
                self.check_real_model_flags()?;
                Ok(self.resolve()?.1)
            }
        }
    }

    /// A synthetic model's config, in the `--quantization` format.
    pub fn synthetic(&self, name: &str) -> anyhow::Result<ModelConfig> {
        let mut config = synthetic_config(name, self.num_layers).with_context(|| format!("--model {}", self.model))?;
        config.quantization = self.quantization.as_deref().and_then(QuantConfig::synthetic);
        Ok(config)
    }

    fn check_real_model_flags(&self) -> anyhow::Result<()> {
        if self.num_layers.is_some() {
            anyhow::bail!("--num-layers applies to synthetic:NAME models only");
        }
        if self.quantization.is_some() {
            anyhow::bail!(
                "--quantization applies to synthetic:NAME models only (a checkpoint's config.json says its format)"
            );
        }
        Ok(())
    }

    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let (dtype, device, router) = (self.dtype()?, self.device()?, self.router()?);
        let layout = self.layout()?;
        let (files, config) = match synthetic_name(&self.model) {
            Some(name) => (None, self.synthetic(name)?),
            None => {
                self.check_real_model_flags()?;
                let (files, config) = self.resolve()?;
                (Some(files), config)
            }
        };
        layout
            .check(&config)
            .map_err(|e| anyhow::anyhow!("--tensor-parallel-size / --expert-parallel-size: {e}"))?;
        let devices = rank_devices(&device, layout.ranks())?;
        let open = |rank: usize| -> moe_models::Result<Weights> {
            let weights = match &files {
                // One seed for every rank: the tensors every rank holds whole come out alike.
                None => Weights::random(dtype, &devices[rank], 0),
                Some(files) => Weights::open(files, dtype, &devices[rank])?,
            };
            Ok(weights.for_config(&config))
        };
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(config.num_hidden_layers as u64);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} layers {elapsed}")
            {
                bar.set_style(style);
            }
            bar
        });
        let progress: Option<LoadProgress> = bar
            .clone()
            .map(|b| std::sync::Arc::new(move |done: usize, _total: usize| b.set_position(done as u64)) as _);
        let options = LoadOptions {
            router,
            progress,
            reference_experts: self.expert_backend == "reference",
            shard: Default::default(),
        };
        let (model, resident): (Model, Vec<u64>) = if layout.is_single() {
            let weights = open(0)?;
            let model = load_model(&config, &weights, &options).with_context(|| format!("loading {}", self.model))?;
            (model, vec![weights.resident_bytes()])
        } else {
            let comms = comm::group_for(&devices)?;
            let sharded = load_sharded(&config, layout, &open, &options, comms)
                .with_context(|| format!("loading {} ({})", self.model, layout.describe()))?;
            let resident = sharded.resident_bytes_per_rank().to_vec();
            (Box::new(sharded), resident)
        };
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let quant = config
            .quantization
            .as_ref()
            .map_or(String::new(), |q| format!(" ({})", q.describe()));
        if layout.is_single() {
            tracing::info!("weights loaded: {} bytes resident{quant}", resident[0]);
        } else {
            tracing::info!(
                "weights loaded over {} ranks ({}): {} bytes resident per rank{quant}",
                layout.ranks(),
                layout.describe(),
                resident.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ")
            );
        }
        let tokenizer = match files.as_ref().and_then(|f| f.tokenizer.as_ref().map(|t| (f, t))) {
            Some((f, t)) => Some(TextTokenizer::load(
                t,
                f.tokenizer_config.as_deref(),
                f.generation_config.as_deref(),
            )?),
            None => None,
        };
        Ok(LoadedModel {
            files,
            name: self.model.clone(),
            model,
            tokenizer,
        })
    }
}

/// NVML indices of the GPUs `model` runs on (consecutive CUDA ordinals, one a rank; none on
/// the CPU), for its energy figures.
pub fn model_gpus(model: &dyn moe_models::CausalLm) -> Vec<u32> {
    match cuda_ordinal(model.device()) {
        Some(first) => crate::energy::nvml_indices(
            first as u32,
            model.ranks() as u32,
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        ),
        None => Vec::new(),
    }
}

/// The CUDA ordinal of `device`; `None` for other devices.
pub(crate) fn cuda_ordinal(device: &Device) -> Option<usize> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
        _ => None,
    }
}

/// One device per rank: the CPU for every rank, or consecutive CUDA devices from `first`'s
/// ordinal.
pub(crate) fn rank_devices(first: &Device, ranks: usize) -> anyhow::Result<Vec<Device>> {
    match first {
        Device::Cpu => Ok(vec![Device::Cpu; ranks]),
        Device::Cuda(_) => {
            let base = cuda_ordinal(first).unwrap_or(0);
            let mut devices = vec![first.clone()];
            for r in 1..ranks {
                devices.push(Device::new_cuda(base + r).map_err(|e| {
                    anyhow::anyhow!(
                        "--tensor-parallel-size {ranks} needs cuda:{} for rank {r}: {e}",
                        base + r
                    )
                })?);
            }
            Ok(devices)
        }
        other => anyhow::bail!("--tensor-parallel-size runs on the CPU or CUDA devices, not {other:?}"),
    }
}

/// `cuda` or `cuda:N`: the N-th CUDA device (0 by default).
fn cuda_device(spec: &str) -> anyhow::Result<Device> {
    let ordinal = match spec.strip_prefix("cuda").unwrap_or_default() {
        "" => 0,
        rest => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| anyhow::anyhow!("--device {spec:?}: expected cpu or cuda[:N]"))?,
    };
    if cfg!(feature = "cuda") {
        Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("--device {spec}: {e}"))
    } else {
        anyhow::bail!("--device {spec}: this binary was built without CUDA support (build with --features cuda)")
    }
}

#[cfg(test)]
mod tests {
    use super::cuda_device;

    #[test]
    fn device_specs_name_the_flag_when_wrong() {
        for bad in ["cuda:x", "cuda1", "cuda:-1"] {
            let err = cuda_device(bad).unwrap_err().to_string();
            assert!(err.contains("--device") && err.contains("cuda[:N]"), "{bad}: {err}");
        }
        #[cfg(not(feature = "cuda"))]
        for spec in ["cuda", "cuda:1"] {
            let err = cuda_device(spec).unwrap_err().to_string();
            assert!(err.contains("built without CUDA support"), "{spec}: {err}");
        }
    }
}
