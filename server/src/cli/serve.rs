//! `moe serve`'s flags and the startup they drive: load the model, size the cache, start the
//! engine, then hand built values to [`crate::serve::run`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use moe_engine::{Engine, GrammarCompiler, TextTokenizer};

use super::model_args::model_gpus;
use super::{EngineArgs, ModelArgs};
use crate::agent::reasoning::REASONING_PARSERS;
use crate::agent::tool_calls::TOOL_CALL_PARSERS;
use crate::agent::{ReasoningFormat, ToolCallFormat};
use crate::chat_template::ChatTemplate;
use crate::serve::agent::AgentConfig;
use crate::serve::{ServedModel, ServerOptions};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Address to listen on (loopback by default; use 0.0.0.0 to listen on every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Model name clients must send (default: the --model argument).
    #[arg(long)]
    pub served_model_name: Option<String>,

    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    #[arg(long)]
    pub api_key: Option<String>,

    /// Serve /metrics without the API key (for a Prometheus scraper on a trusted network).
    #[arg(long)]
    pub public_metrics: bool,

    /// Waiting requests at most; beyond it new requests get 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,

    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,

    /// Largest request head (request line and headers) accepted, in bytes; larger get 431.
    #[arg(long, default_value_t = 64 << 10)]
    pub max_header_bytes: usize,

    /// Seconds a client has to send its request head; slower connections are closed.
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout: u64,

    /// Seconds a client has to send its whole request body; slower ones get 408.
    #[arg(long, default_value_t = 30)]
    pub body_read_timeout: u64,

    /// Seconds requests in flight may take to finish after SIGTERM/SIGINT before the server
    /// exits anyway.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,

    /// How tool calls are read out of the model's output: `auto` (from the chat template's
    /// markup), `none`, or one of deepseek_v3, deepseek_v31, deepseek_r1, deepseek_v32,
    /// deepseek_v4, kimi_k2, glm45,
    /// glm47, minimax_m2, hermes, qwen3, qwen3_coder.
    #[arg(long, default_value = "auto")]
    pub tool_call_parser: String,

    /// How reasoning is split off into `reasoning_content`: `auto` (when the chat template
    /// writes `</think>`), `none`, or one of deepseek_r1, deepseek_v3, qwen3, glm45,
    /// minimax_m2, kimi_k2.
    #[arg(long, default_value = "auto")]
    pub reasoning_parser: String,

    /// Accepted for vLLM compatibility: tool_choice "auto" is always enabled.
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
}

/// The tool-call and reasoning formats the flags pick (`auto`: from the template `source`).
fn parser_formats(args: &ServeArgs, source: &str) -> anyhow::Result<(Option<ToolCallFormat>, Option<ReasoningFormat>)> {
    let tool_format = match args.tool_call_parser.as_str() {
        "auto" => ToolCallFormat::detect(source),
        "none" => None,
        name => Some(ToolCallFormat::from_name(name).with_context(|| {
            let names: Vec<&str> = TOOL_CALL_PARSERS.iter().map(|(n, _)| *n).collect();
            format!(
                "--tool-call-parser {name:?} is not one of auto, none, {}",
                names.join(", ")
            )
        })?),
    };
    let reasoning = match args.reasoning_parser.as_str() {
        "auto" => ReasoningFormat::detect(source),
        "none" => None,
        name => Some(ReasoningFormat::from_name(name).with_context(|| {
            format!(
                "--reasoning-parser {name:?} is not one of auto, none, {}",
                REASONING_PARSERS.join(", ")
            )
        })?),
    };
    Ok((tool_format, reasoning))
}

/// The output parsers and the structured-output compiler for the served model.
fn agent_config(
    args: &ServeArgs,
    template: Option<&ChatTemplate>,
    tokenizer: Option<&Arc<TextTokenizer>>,
    vocab_size: usize,
    eos_ids: &[u32],
) -> anyhow::Result<AgentConfig> {
    let (tool_format, reasoning) = parser_formats(args, template.map(ChatTemplate::source).unwrap_or_default())?;
    let grammars = match tokenizer {
        Some(t) => match GrammarCompiler::new(t.clone(), vocab_size, eos_ids) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!("structured outputs are off: {e}");
                None
            }
        },
        None => None,
    };
    tracing::info!(
        tool_call_parser = ?tool_format,
        reasoning_parser = reasoning.map(|r| r.name),
        structured_outputs = grammars.is_some(),
        "agent output handling"
    );
    Ok(AgentConfig {
        tool_format,
        reasoning,
        grammars,
    })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {} is not a socket address", args.host, args.port))?;
    // Refuse a misspelt parser before spending minutes loading weights.
    parser_formats(&args, "")?;
    let loaded = args.model.load()?;
    let chat_template = match &loaded.files {
        Some(files) => ChatTemplate::from_model_dir(&files.dir).context("reading the chat template")?,
        None => None,
    };
    if chat_template.is_none() {
        tracing::warn!(
            "{} has no chat template: /v1/chat/completions will answer 400",
            loaded.name
        );
    }
    let tokenizer = loaded.tokenizer.map(Arc::new);
    let vocab_size = loaded.model.config().vocab_size;
    let (runner, config) = args.engine.build(loaded.model)?;
    let kv_bytes_per_token = runner.model().config().kv_bytes_per_token(runner.model().dtype());
    let block_size = runner.block_size();
    let gpus = model_gpus(runner.model());
    let engine = Engine::start(runner, tokenizer.clone(), config)?;
    let agent = agent_config(
        &args,
        chat_template.as_ref(),
        tokenizer.as_ref(),
        vocab_size,
        engine.eos_ids(),
    )?;
    let model = ServedModel {
        engine,
        tokenizer,
        chat_template,
        name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.model.clone()),
        max_model_len: config.max_model_len,
        vocab_size,
        kv_bytes_per_token,
        block_size,
        agent,
        gpus,
    };
    let options = ServerOptions {
        addr,
        api_key: args.api_key.clone(),
        public_metrics: args.public_metrics,
        max_waiting: args.max_waiting,
        max_body_bytes: args.max_body_bytes,
        max_header_bytes: args.max_header_bytes,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        body_read_timeout: Duration::from_secs(args.body_read_timeout),
        drain_timeout: Duration::from_secs(args.drain_timeout),
    };
    crate::serve::run(model, options)
}
