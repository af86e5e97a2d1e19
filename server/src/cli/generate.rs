//! `moe generate`: one prompt (`--prompt`/`--prompt-ids`) or many (`--prompts-file` JSONL),
//! run together through the batching engine; results printed in input order.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use moe_engine::engine::{Engine, GenerationRequest, RequestOutput};
use moe_engine::{SamplingParams, TextTokenizer};
use serde::Deserialize;

use super::engine_args::EngineArgs;
use super::{parse_ids, ModelArgs};
use crate::bench::report::ExpertLoadReport;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, conflicts_with_all = ["prompt_ids", "prompts_file"], required_unless_present_any = ["prompt_ids", "prompts_file"])]
    pub prompt: Option<String>,

    /// Prompt as comma-separated token ids.
    #[arg(long, conflicts_with = "prompts_file")]
    pub prompt_ids: Option<String>,

    /// JSONL file, one request per line: {"prompt": "..."} or {"prompt_ids": [...]}, with
    /// optional max_tokens, temperature, top_p, top_k, min_p, seed, stop (string or list).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,

    /// Tokens to generate at most (per request, unless a line says otherwise).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    /// Drop tokens less likely than min-p times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,

    /// Seed for sampling (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Stop when this text appears (repeatable); the stop text is not printed.
    #[arg(long)]
    pub stop: Vec<String>,

    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Print one JSON object per request: {"token_ids", "text", "finish_reason"}.
    #[arg(long)]
    pub json: bool,

    /// After the run, write the tokens each MoE layer routed to each expert as JSON:
    /// {"layers": [{"layer", "tokens_per_expert", "imbalance"}], "mean_imbalance", "max_imbalance"}.
    #[arg(long)]
    pub routing_stats: Option<PathBuf>,
}

/// One line of `--prompts-file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopField>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

fn encode(tokenizer: Option<&TextTokenizer>, text: &str, model: &str) -> anyhow::Result<Vec<u32>> {
    match tokenizer {
        Some(t) => Ok(t.encode(text)?),
        None => anyhow::bail!(
            "a text prompt needs a tokenizer, but {} has no tokenizer.json; pass token ids instead",
            model
        ),
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer.map(Arc::new);
    let defaults = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let base = GenerationRequest {
        max_tokens: args.max_tokens,
        sampling: defaults.clone(),
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    let model_name = loaded.name.clone();
    let mut requests = Vec::new();
    if let Some(path) = &args.prompts_file {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let where_ = || format!("{} line {}", path.display(), n + 1);
            let p: PromptLine = serde_json::from_str(&line).with_context(where_)?;
            let prompt = match (p.prompt, p.prompt_ids) {
                (Some(text), None) => encode(tokenizer.as_deref(), &text, &model_name).with_context(where_)?,
                (None, Some(ids)) => ids,
                _ => anyhow::bail!("{}: give exactly one of \"prompt\" and \"prompt_ids\"", where_()),
            };
            requests.push(GenerationRequest {
                prompt_token_ids: prompt,
                max_tokens: p.max_tokens.unwrap_or(args.max_tokens),
                sampling: SamplingParams {
                    temperature: p.temperature.unwrap_or(defaults.temperature),
                    top_p: p.top_p.unwrap_or(defaults.top_p),
                    top_k: p.top_k.unwrap_or(defaults.top_k),
                    min_p: p.min_p.unwrap_or(defaults.min_p),
                    seed: p.seed.or(defaults.seed),
                    ..defaults.clone()
                },
                stop: match p.stop {
                    Some(StopField::One(s)) => vec![s],
                    Some(StopField::Many(v)) => v,
                    None => args.stop.clone(),
                },
                ..base.clone()
            });
        }
        if requests.is_empty() {
            anyhow::bail!("{} holds no requests", path.display());
        }
    } else {
        let prompt = match (&args.prompt, &args.prompt_ids) {
            (Some(text), _) => encode(tokenizer.as_deref(), text, &model_name)?,
            (None, Some(ids)) => parse_ids(ids)?,
            (None, None) => anyhow::bail!("pass --prompt, --prompt-ids or --prompts-file"),
        };
        requests.push(GenerationRequest {
            prompt_token_ids: prompt,
            ..base
        });
    }

    let (runner, config) = args.engine.build(loaded.model)?;
    let engine = Engine::start(runner, tokenizer.clone(), config)?;
    if args.routing_stats.is_some() {
        engine.enable_expert_load_stats();
    }
    let mut streams = Vec::with_capacity(requests.len());
    for (n, r) in requests.into_iter().enumerate() {
        let s = engine.submit(r).with_context(|| format!("request {}", n + 1))?;
        streams.push(s);
    }
    for s in streams {
        let out: RequestOutput = s.collect().context("the engine stopped before finishing a request")?;
        let reason = out.finish_reason.map_or("", |r| r.as_str());
        if args.json {
            let mut v = serde_json::json!({ "token_ids": out.token_ids, "finish_reason": reason });
            if tokenizer.is_some() {
                v["text"] = serde_json::Value::String(out.text);
            }
            println!("{v}");
        } else if tokenizer.is_some() {
            println!("{}", out.text);
        } else {
            println!(
                "{}",
                out.token_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            );
        }
    }
    if let Some(path) = &args.routing_stats {
        let load = engine.expert_load().unwrap_or_default();
        let groups = args.model.layout()?.expert_parallel();
        let text = serde_json::to_string_pretty(&ExpertLoadReport::of(&load, groups))?;
        std::fs::write(path, text + "\n").with_context(|| format!("--routing-stats: writing {}", path.display()))?;
    }
    engine.shutdown();
    Ok(())
}
