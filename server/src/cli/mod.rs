//! Command-line interface: subcommands and the options they share.

mod bench;
mod engine_args;
mod generate;
mod inspect;
mod logits;
mod model_args;
mod serve;

use clap::{Parser, Subcommand};

pub use engine_args::EngineArgs;
pub use model_args::ModelArgs;

#[derive(Debug, Parser)]
#[command(
    name = "moe",
    version,
    about = "Inference engine for Mixture-of-Experts transformers (DeepSeek, Kimi, GLM, MiniMax, Qwen3-MoE, Mixtral)"
)]
pub struct Cli {
    /// Log more (-v: info, -vv: debug) on stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the logits at every position of a prompt as JSON.
    Logits(logits::LogitsArgs),
    /// Generate text (or token ids) for one or more prompts.
    Generate(generate::GenerateArgs),
    /// Describe a model: architecture, sizes, routing, KV bytes per token.
    Inspect(inspect::InspectArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Benchmark throughput, latency and energy: the engine in process, or `bench serve --url`.
    Bench(Box<bench::BenchArgs>),
}

pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Logits(a) => logits::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(*a),
    }
}

/// Parses `1,2,3` into token ids.
pub fn parse_ids(s: &str) -> anyhow::Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--prompt-ids: {t:?} is not a token id"))
        })
        .collect()
}
