//! `moe serve` under overload: 300 concurrent streaming requests against a KV cache a small
//! fraction of their demand, a seeded random third of the clients hanging up mid-stream.
//! Afterwards every request that was not abandoned has exactly its quiet-run output, no KV
//! block is held, nothing panicked, and the process's memory is back near where it started.
//!
//! Only requests whose greedy choices are clear are used: where the two best logprobs of a
//! step are within float noise (this random model has ties to 5e-7), a different batch
//! composition legitimately reorders the f32 sums and may pick the other token.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const DISTINCT: usize = 60;
/// Smallest gap between the two best logprobs of any step for a request to be used.
const MIN_MARGIN: f64 = 1e-3;
const CLIENTS: usize = 300;

/// A number in `0..m` that depends only on `key` (so clients and requests are reproducible).
fn pick(key: u64, m: u64) -> u64 {
    moe_tests::TestRng::new(key.wrapping_mul(0x9e37_79b9_7f4a_7c15)).below(m)
}

/// Distinct greedy streaming requests of 5-124 prompt tokens and 8-57 output tokens.
fn request_bodies() -> Vec<Value> {
    (0..DISTINCT as u64)
        .map(|i| {
            let len = 5 + pick(i, 120);
            let prompt: Vec<u64> = (0..len).map(|p| 2 + pick(i * 1000 + p, 318)).collect();
            let max_tokens = 8 + pick(i + 77_000, 50);
            json!({
                "model": NAME, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true},
            })
        })
        .collect()
}

/// A request alone on the server, not streamed, with logprobs: its (text, completion tokens)
/// and the smallest gap between the two best logprobs over its steps.
async fn quiet_run(server: &Server, body: &Value) -> ((String, u64), f64) {
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain["logprobs"] = json!(2);
    let v = server.ok("/v1/completions", &plain).await;
    let choice = &v["choices"][0];
    let margin = choice["logprobs"]["top_logprobs"]
        .as_array()
        .expect("top_logprobs")
        .iter()
        .map(|top| {
            let mut lps: Vec<f64> = top.as_object().unwrap().values().map(|x| x.as_f64().unwrap()).collect();
            lps.sort_by(|a, b| b.total_cmp(a));
            lps.get(1).map_or(f64::INFINITY, |second| lps[0] - second)
        })
        .fold(f64::INFINITY, f64::min);
    let text = choice["text"].as_str().unwrap().to_string();
    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    ((text, tokens), margin)
}

/// Reads a stream to its end: (text, completion tokens from usage).
async fn read_stream(server: &Server, body: &Value) -> (String, u64) {
    let chunks = stream_chunks(server, "/v1/completions", body).await;
    let text = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    let usage = chunks
        .iter()
        .find_map(|c| c["usage"]["completion_tokens"].as_u64())
        .expect("usage chunk");
    (text, usage)
}

/// Reads `chunks` pieces of a stream, then hangs up.
async fn abandon_stream(server: &Server, body: &Value, chunks: usize) {
    let mut r = server.post("/v1/completions", body).await;
    assert_eq!(r.status().as_u16(), 200);
    for _ in 0..chunks {
        if r.chunk().await.ok().flatten().is_none() {
            break;
        }
    }
    drop(r);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_streams_with_disconnects_on_a_tiny_cache() {
    // 1 MiB of f32 latent cache is ~2200 tokens, against ~27k tokens of demand.
    let server = Arc::new(Server::start(&[
        "--kv-cache-memory",
        "1MiB",
        "--max-num-seqs",
        "64",
        "--max-num-batched-tokens",
        "512",
    ]));
    let mut bodies = Vec::new();
    let mut quiet = Vec::new();
    for body in request_bodies() {
        let (output, margin) = quiet_run(&server, &body).await;
        if margin >= MIN_MARGIN {
            bodies.push(body);
            quiet.push(output);
        }
    }
    assert!(bodies.len() >= DISTINCT * 2 / 3, "only {} clear requests", bodies.len());
    let distinct = bodies.len();
    let bodies = Arc::new(bodies);
    let pid = server.child.id();
    let rss_before = rss_kib(pid);

    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (server, bodies) = (server.clone(), bodies.clone());
        let hangs_up = pick(client as u64 + 1_000_000, 3) == 0;
        let after_chunks = 1 + pick(client as u64 + 2_000_000, 5) as usize;
        tasks.push(tokio::spawn(async move {
            let body = &bodies[client % distinct];
            if hangs_up {
                abandon_stream(&server, body, after_chunks).await;
                None
            } else {
                Some(read_stream(&server, body).await)
            }
        }));
    }
    let mut completed = 0;
    for (client, task) in tasks.into_iter().enumerate() {
        if let Some(output) = task.await.expect("client task") {
            assert_eq!(output, quiet[client % distinct], "client {client}");
            completed += 1;
        }
    }
    assert!(completed > CLIENTS / 2, "{completed} completed");

    server
        .wait_metrics("the cache to empty", Duration::from_secs(30), |m| {
            m["moe_kv_cache_blocks_used"] == 0.0 && m["moe_num_requests_running"] == 0.0
        })
        .await;
    let m = server.metrics().await;
    assert!(m["moe_preemptions_total"] > 0.0, "the cache should be too small: {m:?}");
    assert_eq!(m["moe_num_requests_waiting"], 0.0);
    let logs = server.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    let rss_after = rss_kib(pid);
    eprintln!("RSS before load {rss_before} KiB, after {rss_after} KiB; {completed} streams completed");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
}
