//! Accepting and serving HTTP connections: hyper's HTTP/1 and HTTP/2 with the limits a
//! public endpoint needs (a deadline for the request head, a cap on header bytes and count),
//! and a graceful shutdown that stops accepting, lets requests in flight finish, and gives up
//! after a bounded drain time.

use std::future::Future;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Limits on each connection and on shutdown.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A client must send its whole request head (request line and headers) within this.
    pub header_read_timeout: Duration,
    /// Bytes of request head: hyper buffers up to twice this (a backstop that answers a bare
    /// 431); the router refuses heads above it with an OpenAI-style 431.
    pub max_header_bytes: usize,
    /// Header lines per request at most; more are refused with 431.
    pub max_headers: usize,
    /// After the shutdown signal, how long requests in flight may take to finish.
    pub drain_timeout: Duration,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished its requests.
    Complete,
    /// The drain time ran out with connections still open; they are dropped.
    TimedOut,
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<Drain> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper needs at least 8 KiB of buffer.
        .max_buf_size(limits.max_header_bytes.saturating_mul(2).max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Stream each token as soon as it is written: without TCP_NODELAY, Nagle's algorithm
        // holds small SSE events back until the client's (delayed, ~40 ms) ACK arrives.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = app
            .clone()
            .map_request(|request: Request<Incoming>| request.map(axum::body::Body::new));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => Ok(Drain::Complete),
        () = tokio::time::sleep(limits.drain_timeout) => Ok(Drain::TimedOut),
    }
}
