//! `moe serve`: the OpenAI-compatible HTTP server (tokio + axum). The engine keeps its own
//! thread; handlers talk to it through its submit/abort API and per-request channels.

pub mod error;
mod handlers;
mod metrics;
pub mod protocol;

use std::net::SocketAddr;
use std::sync::Arc;

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

    /// Waiting requests at most; beyond it new requests get 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,

    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,

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

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models))
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(protected)
        .route("/health", get(handlers::health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
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
    let chat_template = ChatTemplate::from_model_dir(&loaded.files.dir).context("reading the chat template")?;
    if chat_template.is_none() {
        tracing::warn!(
            "{} has no chat template: /v1/chat/completions will answer 400",
            loaded.files.dir.display()
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
        axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the HTTP server failed")?;
        anyhow::Ok(())
    })?;
    Ok(())
}
