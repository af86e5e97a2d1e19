//! `moe serve`: the OpenAI-compatible HTTP server (tokio + axum). It takes a started engine
//! and built options (the CLI's `cli::serve` makes them from flags); the engine keeps its own
//! thread, and handlers talk to it through its submit/abort API and per-request channels.

pub mod agent;
mod anthropic;
mod chat;
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
use moe_engine::{Engine, TextTokenizer};

use crate::chat_template::ChatTemplate;
use crate::energy::EnergyMeter;
use error::ApiError;
use listener::{ConnectionLimits, Drain};
use metrics::Metrics;

/// What `moe serve` serves: the running engine and what requests are checked against.
pub struct ServedModel {
    pub engine: Engine,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub chat_template: Option<ChatTemplate>,
    /// The name clients must send.
    pub name: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Cache bytes a token keeps over all layers (the model's KV-cache spec), for /metrics.
    pub kv_bytes_per_token: usize,
    pub block_size: usize,
    /// How outputs are read for tools, reasoning and structured outputs.
    pub agent: agent::AgentConfig,
    /// NVML indices of the GPUs the model runs on (none on the CPU), for the energy metrics.
    pub gpus: Vec<u32>,
}

/// How the HTTP server listens and what it lets clients do.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub addr: SocketAddr,
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    pub api_key: Option<String>,
    /// Serve /metrics without the key.
    pub public_metrics: bool,
    /// Waiting requests at most; beyond it new requests get 503 with Retry-After.
    pub max_waiting: usize,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// How long requests in flight may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
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
    pub agent: agent::AgentConfig,
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

/// Checks the API key: `Authorization: Bearer KEY` (OpenAI) or `x-api-key: KEY` (Anthropic).
/// A refusal on an Anthropic endpoint comes in Anthropic's error shape.
async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let headers = request.headers();
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let x_api_key = headers.get(X_API_KEY).and_then(|v| v.to_str().ok()).unwrap_or("");
        let matches = |given: &str| constant_time_eq(given.as_bytes(), key.as_bytes());
        if !(matches(bearer) || matches(x_api_key)) {
            if request.uri().path().starts_with("/v1/messages") {
                return anthropic::AnthropicError(ApiError::unauthorized()).into_response();
            }
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

const X_API_KEY: &str = "x-api-key";

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
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
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
        // Outermost, so it also sees the answers of the layers above.
        .layer(middleware::from_fn(handlers::close_after_refused_body))
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

/// Resolves once the engine's device has failed (checked twice a second): the server then
/// stops taking connections and exits with an error instead of answering 503 forever.
async fn device_failed(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Some(failure) = state.engine.device_failure() {
            tracing::error!("the device failed ({failure}); shutting down");
            return;
        }
    }
}

/// Serves `model` until SIGINT/SIGTERM (or until its device fails: then an error), then
/// drains the requests in flight.
pub fn run(model: ServedModel, options: ServerOptions) -> anyhow::Result<()> {
    let state = Arc::new(AppState {
        engine: model.engine,
        tokenizer: model.tokenizer,
        chat_template: model.chat_template,
        model_name: model.name,
        api_key: options.api_key.clone(),
        max_model_len: model.max_model_len,
        vocab_size: model.vocab_size,
        max_waiting: options.max_waiting,
        max_body_bytes: options.max_body_bytes,
        max_header_bytes: options.max_header_bytes,
        body_read_timeout: options.body_read_timeout,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        metrics: Metrics::new(
            model.kv_bytes_per_token,
            model.block_size,
            EnergyMeter::open_all(&model.gpus),
        ),
        agent: model.agent,
    });
    let addr = options.addr;
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
            header_read_timeout: options.header_read_timeout,
            max_header_bytes: options.max_header_bytes,
            max_headers: 100,
            drain_timeout: options.drain_timeout,
        };
        if state.metrics.has_energy() {
            // Readings every second keep the last minute's tokens per joule current between
            // scrapes.
            let sampled = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let state = sampled.clone();
                    // NVML calls block: keep them off the async workers.
                    let _ = tokio::task::spawn_blocking(move || {
                        let tokens = state.engine.stats().generation_tokens;
                        state.metrics.sample_energy(tokens);
                    })
                    .await;
                }
            });
        }
        let app = router(state.clone(), options.public_metrics);
        let stop = {
            let state = state.clone();
            async move {
                tokio::select! {
                    _ = shutdown_signal() => {},
                    _ = device_failed(state) => {},
                }
            }
        };
        match listener::serve(listener, app, limits, stop)
            .await
            .context("the HTTP server failed")?
        {
            Drain::Complete => tracing::info!("all requests finished; exiting"),
            Drain::TimedOut => tracing::warn!(
                "--drain-timeout {} s ran out with requests in flight; exiting anyway",
                options.drain_timeout.as_secs()
            ),
        }
        if let Some(failure) = state.engine.device_failure() {
            anyhow::bail!("the device failed: {failure}");
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
