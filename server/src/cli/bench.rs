//! `moe bench` (the engine in this process, no HTTP) and `moe bench serve --url` (any
//! OpenAI-compatible server): flag parsing and validation, then the shared benchmark code of
//! `crate::bench` runs the workload and writes the table, JSON and plot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use moe_engine::Engine;
use serde_json::json;

use super::model_args::model_gpus;
use super::{EngineArgs, ModelArgs};
use crate::bench::http::HttpBackend;
use crate::bench::in_process::InProcessBackend;
use crate::bench::load::LoadPolicy;
use crate::bench::report::{now_rfc3339, write_table, BenchReport, DeviceInfo, ModelInfo, WorkloadInfo, SCHEMA};
use crate::bench::workload::{Workload, WorkloadKind, WorkloadSpec, LOWEST_TOKEN_ID};
use crate::bench::{plot, run_suite, RunHooks};
use crate::energy::EnergyMeter;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: Option<BenchTarget>,

    #[command(flatten)]
    pub model: Option<ModelArgs>,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub options: BenchOptions,
}

#[derive(Debug, Subcommand)]
pub enum BenchTarget {
    /// Benchmark a running OpenAI-compatible server (moe serve, vLLM, SGLang, llama.cpp).
    Serve(BenchServeArgs),
}

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted).
    #[arg(long)]
    pub url: String,

    /// Model name to send in requests (the server's served model name).
    #[arg(long)]
    pub model: String,

    /// Bearer token for the server.
    #[arg(long)]
    pub api_key: Option<String>,

    /// Prompt ids are drawn from [10, vocab-size): keep it at most the model's vocabulary.
    #[arg(long, default_value_t = 1000)]
    pub vocab_size: usize,

    /// Do not ask for generated token ids (`return_token_ids`); agent turns then resend
    /// seeded stand-in tokens as the reply.
    #[arg(long)]
    pub no_token_ids: bool,

    #[command(flatten)]
    pub options: BenchOptions,
}

/// Workload, load and output flags both commands share.
#[derive(Debug, Clone, Args)]
pub struct BenchOptions {
    /// fixed, random or agent.
    #[arg(long, value_enum, default_value = "fixed")]
    pub workload: WorkloadKind,

    /// Prompt tokens per request (fixed; the mean for random).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,

    /// Output tokens per request (greedy, EOS ignored; the mean for random).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,

    /// Requests of a fixed or random workload.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,

    /// random: lengths uniform in [mean*(1-r), mean*(1+r)].
    #[arg(long, default_value_t = 0.5)]
    pub range_ratio: f64,

    /// agent: concurrent multi-turn sessions.
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,

    /// agent: turns per session; each resends the whole history.
    #[arg(long, default_value_t = 4)]
    pub turns: usize,

    /// agent: system-prompt tokens shared by every session.
    #[arg(long, default_value_t = 512)]
    pub agent_prefix_len: usize,

    /// agent: new user tokens per turn.
    #[arg(long, default_value_t = 64)]
    pub turn_input_len: usize,

    /// Seed of the prompts and of Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Poisson arrivals at this many requests (agent: sessions) per second instead of all at once.
    #[arg(long, allow_negative_numbers = true, conflicts_with = "concurrency")]
    pub request_rate: Option<f64>,

    /// Requests (agent: sessions) in flight at most; a list like 1,8,64 runs once per value.
    #[arg(long, allow_negative_numbers = true)]
    pub concurrency: Option<String>,

    /// `moe bench serve` on a server without its own energy counter in /metrics: energy from
    /// this GPU's NVML counter (`moe bench` meters the GPUs its model runs on).
    #[arg(long, default_value_t = 0)]
    pub gpu: u32,

    /// Skip the one short warm-up request before the runs.
    #[arg(long)]
    pub no_warmup: bool,

    /// Write every figure, the configuration and the device as JSON.
    #[arg(long)]
    pub output_json: Option<PathBuf>,

    /// Draw output tokens/s (and tokens per joule when measured) against concurrency as SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Parses `--concurrency 1,8,64`.
pub fn parse_concurrency(s: &str) -> anyhow::Result<Vec<usize>> {
    let values = s
        .split(',')
        .map(str::trim)
        .map(|t| match t.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(anyhow::anyhow!(
                "--concurrency: {t:?} is not a positive whole number (e.g. --concurrency 1,8,64)"
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if values.is_empty() {
        anyhow::bail!("--concurrency is empty");
    }
    Ok(values)
}

impl BenchOptions {
    fn spec(&self, vocab_size: usize) -> anyhow::Result<WorkloadSpec> {
        let spec = WorkloadSpec {
            kind: self.workload,
            input_len: self.input_len,
            output_len: self.output_len,
            num_prompts: self.num_prompts,
            range_ratio: self.range_ratio,
            sessions: self.sessions,
            turns: self.turns,
            agent_prefix_len: self.agent_prefix_len,
            turn_input_len: self.turn_input_len,
            seed: self.seed,
            vocab_size,
        };
        spec.validate().map_err(anyhow::Error::msg)?;
        Ok(spec)
    }

    fn loads(&self) -> anyhow::Result<Vec<LoadPolicy>> {
        if let Some(rate) = self.request_rate {
            if !(rate.is_finite() && rate > 0.0) {
                anyhow::bail!("--request-rate must be a positive number of requests per second, got {rate}");
            }
            return Ok(vec![LoadPolicy::Rate(rate)]);
        }
        match &self.concurrency {
            Some(c) => Ok(parse_concurrency(c)?.into_iter().map(LoadPolicy::Concurrency).collect()),
            None => Ok(vec![LoadPolicy::AllAtOnce]),
        }
    }

    /// Checks the output paths can be written before the (long) runs, not after.
    fn check_outputs(&self) -> anyhow::Result<()> {
        for (flag, path) in [("--output-json", &self.output_json), ("--plot", &self.plot)] {
            if let Some(p) = path {
                let dir = p
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !dir.is_dir() {
                    anyhow::bail!("{flag} {}: the folder {} does not exist", p.display(), dir.display());
                }
            }
        }
        Ok(())
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .map_or_else(
            || "cpu".to_string(),
            |n| {
                let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
                format!("{n} ({threads} threads)")
            },
        )
}

/// Prints the table, then writes the JSON and the plot when asked.
fn emit(report: &BenchReport, options: &BenchOptions, sessions: usize) -> anyhow::Result<()> {
    write_table(&mut std::io::stdout().lock(), &report.runs)?;
    if let Some(path) = &options.output_json {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("--output-json: writing {}", path.display()))?;
    }
    if let Some(path) = &options.plot {
        let title = format!("{} ({}, {})", report.model.name, report.tool, report.device.name);
        plot::write_plot(path, &title, &report.runs, sessions)?;
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        Some(BenchTarget::Serve(serve)) => run_serve(serve),
        None => {
            let model = args.model.ok_or_else(|| {
                anyhow::anyhow!("moe bench needs --model (or use `moe bench serve --url URL --model NAME`)")
            })?;
            run_in_process(model, args.engine, args.options)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_in_process(model_args: ModelArgs, engine_args: EngineArgs, options: BenchOptions) -> anyhow::Result<()> {
    let loads = options.loads()?;
    options.check_outputs()?;
    // The workload is checked before any weight is read (synthetic models have no files).
    let spec = options.spec(model_args.config()?.vocab_size)?;
    let layout = model_args.layout()?;
    let loaded = model_args.load()?;
    let model_path = loaded.files.as_ref().map(|f| f.dir.display().to_string());
    let (runner, engine_config) = engine_args.build(loaded.model)?;
    let gpus = model_gpus(runner.model());
    let needed = spec.max_prompt_len() + spec.max_output_len();
    if needed > engine_config.max_model_len {
        anyhow::bail!(
            "the workload's longest request needs {needed} tokens (prompt + output) but the model length is {} (--max-model-len)",
            engine_config.max_model_len
        );
    }
    let engine_flags = json!({
        "max_num_seqs": engine_config.max_num_seqs,
        "max_num_batched_tokens": engine_config.max_num_batched_tokens,
        "max_model_len": engine_config.max_model_len,
        "kv_cache_memory": engine_args.kv_cache_memory,
        "block_size": runner.block_size(),
        "num_blocks": runner.num_blocks(),
        "enable_prefix_caching": engine_config.enable_prefix_caching,
        "dtype": model_args.dtype,
        "router": model_args.router,
        "device": model_args.device,
        "tensor_parallel_size": layout.tensor_parallel(),
        "expert_parallel_size": layout.expert_parallel(),
    });
    let engine = Arc::new(Engine::start(runner, None, engine_config)?);
    let workload = Workload::generate(&spec);
    let on_gpu = !gpus.is_empty();
    let meter = EnergyMeter::open_all(&gpus);
    let device = if on_gpu {
        DeviceInfo {
            kind: "cuda",
            name: meter
                .as_ref()
                .and_then(EnergyMeter::gpu_name)
                .unwrap_or_else(|| model_args.device.clone()),
            gpu_index: gpus.first().copied(),
        }
    } else {
        DeviceInfo {
            kind: "cpu",
            name: cpu_name(),
            gpu_index: None,
        }
    };
    let backend = Arc::new(InProcessBackend { engine: engine.clone() });
    let started_at = now_rfc3339();
    let runs = runtime()?.block_on(async {
        if !options.no_warmup {
            warm_up(&*backend, &workload).await?;
        }
        let restart = || engine.enable_expert_load_stats();
        let expert_load = || engine.expert_load();
        anyhow::Ok(
            run_suite(
                backend.clone(),
                &workload,
                &loads,
                meter.as_ref(),
                RunHooks {
                    before_run: &restart,
                    expert_load: &expert_load,
                    expert_groups: layout.expert_parallel(),
                },
            )
            .await,
        )
    })?;
    let report = BenchReport {
        schema: SCHEMA,
        tool: "moe bench",
        started_at,
        device,
        model: ModelInfo {
            name: model_args.model.clone(),
            path: model_path,
            dtype: Some(model_args.dtype.clone()),
        },
        workload: WorkloadInfo::of(&spec),
        engine: Some(engine_flags),
        server: None,
        runs,
    };
    drop(backend);
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.shutdown();
    }
    emit(&report, &options, workload.sessions.len())
}

/// One short request so the first run does not pay for cold caches and lazy setup. Its
/// prompt is not a prefix of the workload's, so it seeds no prefix-cache hits.
async fn warm_up<B: crate::bench::load::Backend>(backend: &B, workload: &Workload) -> anyhow::Result<()> {
    let prompt = vec![LOWEST_TOKEN_ID; 8];
    backend
        .send(prompt, workload.spec.output_len.min(4))
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("the warm-up request failed: {e}"))
}

fn run_serve(args: BenchServeArgs) -> anyhow::Result<()> {
    let options = &args.options;
    let loads = options.loads()?;
    options.check_outputs()?;
    let spec = options.spec(args.vocab_size)?;
    let workload = Workload::generate(&spec);
    let backend = Arc::new(HttpBackend::new(
        &args.url,
        &args.model,
        args.api_key.clone(),
        !args.no_token_ids,
    )?);
    let meter = EnergyMeter::open(options.gpu);
    let started_at = now_rfc3339();
    let (models, runs) = runtime()?.block_on(async {
        let models = backend.models().await?;
        if !options.no_warmup {
            warm_up(&*backend, &workload).await?;
        }
        let runs = run_suite(
            backend.clone(),
            &workload,
            &loads,
            meter.as_ref(),
            RunHooks {
                before_run: &|| {},
                expert_load: &|| None,
                expert_groups: 1,
            },
        )
        .await;
        anyhow::Ok((models, runs))
    })?;
    let device = match &meter {
        Some(m) => DeviceInfo {
            kind: "cuda",
            name: m.gpu_name().unwrap_or_else(|| "NVIDIA GPU".into()),
            gpu_index: Some(m.gpu_index()),
        },
        None => DeviceInfo {
            kind: "cpu",
            name: format!(
                "unknown: no NVIDIA GPU seen on this machine; server at {}",
                backend.base()
            ),
            gpu_index: None,
        },
    };
    let report = BenchReport {
        schema: SCHEMA,
        tool: "moe bench serve",
        started_at,
        device,
        model: ModelInfo {
            name: args.model.clone(),
            path: None,
            dtype: None,
        },
        workload: WorkloadInfo::of(&spec),
        engine: None,
        server: Some(json!({ "url": backend.base(), "models": models })),
        runs,
    };
    emit(&report, options, workload.sessions.len())
}

#[cfg(test)]
mod tests {
    use super::parse_concurrency;

    #[test]
    fn concurrency_lists_parse_and_reject_zero() {
        assert_eq!(parse_concurrency("1,8, 64").unwrap(), vec![1, 8, 64]);
        assert!(parse_concurrency("0")
            .unwrap_err()
            .to_string()
            .contains("--concurrency"));
        assert!(parse_concurrency("1,x").is_err());
        assert!(parse_concurrency("").is_err());
    }
}
