//! `moe serve`: the OpenAI-compatible HTTP server (tokio + axum). The engine keeps its own
//! thread; handlers talk to it through its submit/abort API and per-request channels.

pub mod error;
mod handlers;
mod listener;
mod metrics;
pub mod protocol;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use moe_engine::{Engine, TextTokenizer};

use super::cli::{EngineArgs, ModelArgs};
use crate::chat_template::ChatTemplate;
use error::ApiError;
use listener::{ConnectionLimits, Drain};
use metrics::Metrics;

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

    /// Fraction of GPU memory for weights and KV cache (used by the CUDA build; ignored on
    /// the CPU, where --kv-cache-memory sizes the cache).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
}

pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub chat_template: Option<ChatTemplate>,
    pub model_name: String,
    pub api_key: Option<String>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub max_waiting: usize,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub body_read_timeout: Duration,
    pub started: u64,
    pub metrics: Metrics,
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Refuses a request head larger than `--max-header-bytes` with a JSON 431 (hyper itself cuts
/// off heads far beyond it, without a body).
async fn limit_headers(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let head_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + request.uri().to_string().len();
    if head_bytes > state.max_header_bytes {
        return ApiError {
            status: axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            code: Some("headers_too_large"),
            ..ApiError::bad_request(
                format!(
                    "request headers are {head_bytes} bytes, more than the {} allowed",
                    state.max_header_bytes
                ),
                None,
            )
        }
        .into_response();
    }
    next.run(request).await
}

async fn not_found() -> Response {
    ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        ..ApiError::bad_request("no such endpoint", None)
    }
    .into_response()
}

async fn method_not_allowed() -> Response {
    ApiError {
        status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request("method not allowed on this endpoint", None)
    }
    .into_response()
}

pub fn router(state: Arc<AppState>, public_metrics: bool) -> Router {
    let mut protected = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models));
    let metrics = Router::new().route("/metrics", get(handlers::metrics));
    let open = if public_metrics {
        metrics
    } else {
        protected = protected.merge(metrics);
        Router::new()
    };
    let protected = protected.route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(protected)
        .merge(open)
        .route("/health", get(handlers::health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), limit_headers))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
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
    let engine = Engine::start(runner, tokenizer.clone(), config)?;
    let state = Arc::new(AppState {
        engine,
        tokenizer,
        chat_template,
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.model.clone()),
        api_key: args.api_key.clone(),
        max_model_len: config.max_model_len,
        vocab_size,
        max_waiting: args.max_waiting,
        max_body_bytes: args.max_body_bytes,
        max_header_bytes: args.max_header_bytes,
        body_read_timeout: Duration::from_secs(args.body_read_timeout),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        metrics: Metrics::new(),
    });
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {} is not a socket address", args.host, args.port))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        // One machine-readable line so scripts and tests can find the port (with --port 0).
        println!("moe serve: listening on http://{local}");
        tracing::info!("serving {} on http://{local}", state.model_name);
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(args.header_read_timeout),
            max_header_bytes: args.max_header_bytes,
            max_headers: 100,
            drain_timeout: Duration::from_secs(args.drain_timeout),
        };
        let app = router(state.clone(), args.public_metrics);
        match listener::serve(listener, app, limits, shutdown_signal())
            .await
            .context("the HTTP server failed")?
        {
            Drain::Complete => tracing::info!("all requests finished; exiting"),
            Drain::TimedOut => tracing::warn!(
                "--drain-timeout {} s ran out with requests in flight; exiting anyway",
                args.drain_timeout
            ),
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
