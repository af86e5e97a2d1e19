//! `moe serve` against hostile clients: a barrage of malformed, absurd and oversized requests
//! (each answered with its 4xx and an OpenAI error body) while good requests run beside it
//! with output identical to a quiet run; slow-loris heads and bodies cut off; oversized
//! headers refused; /metrics behind the key unless `--public-metrics`; SIGTERM with a stuck
//! client still exits 0 within `--drain-timeout`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Greedy requests whose output must not change whatever else the server is sent.
fn good_requests() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/completions",
            json!({"model": NAME, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
        ),
        (
            "/v1/completions",
            json!({"model": NAME, "prompt": (1..90).collect::<Vec<u32>>(), "max_tokens": 16, "temperature": 0, "ignore_eos": true}),
        ),
        ("/v1/chat/completions", chat_body(json!({"max_tokens": 20}))),
        (
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": 12, "stream": true})),
        ),
    ]
}

/// The text a good request produced (streamed ones reassembled).
async fn output_of(server: &Server, path: &str, body: &Value) -> String {
    if body["stream"] == true {
        let chunks = stream_chunks(server, path, body).await;
        return chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
    }
    let v = server.ok(path, body).await;
    let choice = &v["choices"][0];
    choice["text"]
        .as_str()
        .or_else(|| choice["message"]["content"].as_str())
        .expect("text")
        .to_string()
}

/// Sends raw bytes as a request body; returns (status, JSON body, whether the server closes
/// the connection after answering).
async fn post_raw(server: &Server, path: &str, body: Vec<u8>) -> (u16, Value, bool) {
    let r = server
        .client
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    let closes = r.headers().get("connection").is_some_and(|v| v == "close");
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"));
    (status, v, closes)
}

/// Hostile bodies: (path, raw body, status, error.param).
fn hostile_bodies() -> Vec<(&'static str, Vec<u8>, u16, Option<&'static str>)> {
    let c = "/v1/completions";
    let ch = "/v1/chat/completions";
    let j = |v: Value| v.to_string().into_bytes();
    let prompt = |extra: Value| {
        let mut b = json!({"model": NAME, "prompt": [1, 2, 3], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        j(b)
    };
    let chat = |extra: Value| {
        let mut b = json!({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        j(b)
    };
    let many_stops: Vec<String> = (0..100_000).map(|i| format!("s{i}")).collect();
    vec![
        // Broken JSON and bytes.
        (c, b"{\"model\": \"tiny\", \"prompt\": [1, 2".to_vec(), 400, None),
        (c, b"\xff\xfe\x00{\"model\"".to_vec(), 400, None),
        (
            c,
            b"{\"model\": \"tiny\", \"prompt\": \"\xff\xfe\", \"max_tokens\": 2}".to_vec(),
            400,
            None,
        ),
        (c, b"[]".to_vec(), 400, None),
        (c, b"null".to_vec(), 400, None),
        (
            c,
            b"{\"model\": \"tiny\", \"prompt\": [1], \"temperature\": NaN}".to_vec(),
            400,
            None,
        ),
        (
            c,
            b"{\"model\": \"tiny\", \"prompt\": [1], \"max_tokens\": 1e999}".to_vec(),
            400,
            None,
        ),
        // Missing and wrongly typed fields.
        (c, j(json!({"prompt": [1]})), 400, None),
        (c, j(json!({"model": NAME})), 400, None),
        (ch, j(json!({"model": NAME})), 400, None),
        (c, prompt(json!({"prompt": {"text": "hi"}})), 400, None),
        (
            c,
            b"{\"model\": \"tiny\", \"prompt\": [1], \"max_tokens\": 18446744073709551616}".to_vec(),
            400,
            None,
        ),
        (c, prompt(json!({"n": "many"})), 400, None),
        // Empty inputs.
        (c, prompt(json!({"prompt": ""})), 400, Some("prompt")),
        (c, prompt(json!({"prompt": [""]})), 400, Some("prompt")),
        (c, prompt(json!({"prompt": []})), 400, Some("prompt")),
        (ch, chat(json!({"messages": []})), 400, Some("messages")),
        // Out-of-range values.
        (c, prompt(json!({"prompt": [1, 4_000_000_000u32]})), 400, Some("prompt")),
        (
            c,
            prompt(json!({"max_tokens": 1_000_000_000_000u64})),
            400,
            Some("max_tokens"),
        ),
        (c, prompt(json!({"n": 1_000_000})), 400, Some("n")),
        (c, prompt(json!({"top_k": -7})), 400, Some("top_k")),
        (c, prompt(json!({"logprobs": 100000})), 400, Some("logprobs")),
        (c, prompt(json!({"temperature": -1e-9})), 400, Some("temperature")),
        (c, prompt(json!({"temperature": 1e308})), 400, Some("temperature")),
        (c, prompt(json!({"top_p": -0.5})), 400, Some("top_p")),
        (c, prompt(json!({"min_p": 7})), 400, Some("min_p")),
        (
            c,
            prompt(json!({"presence_penalty": -1e9})),
            400,
            Some("presence_penalty"),
        ),
        (
            c,
            prompt(json!({"frequency_penalty": 3})),
            400,
            Some("frequency_penalty"),
        ),
        (c, prompt(json!({"seed": -1})), 400, None),
        (c, prompt(json!({"stop": many_stops})), 400, Some("stop")),
        (
            ch,
            chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            Some("messages"),
        ),
        (
            ch,
            chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
            400,
            Some("messages"),
        ),
        (
            ch,
            chat(json!({"top_logprobs": 50, "logprobs": true})),
            400,
            Some("top_logprobs"),
        ),
        // Oversized body (the limit is 1 MiB in this test).
        (c, vec![b' '; 2 << 20], 413, None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_4xx_while_good_requests_run_unchanged() {
    let server = Server::start(&["--max-body-bytes", "1048576"]);
    let good = good_requests();
    let mut quiet = Vec::new();
    for (path, body) in &good {
        quiet.push(output_of(&server, path, body).await);
    }

    // The same good requests, three times over, concurrently with the barrage.
    let server = std::sync::Arc::new(server);
    let mut runs = Vec::new();
    for _ in 0..3 {
        for (path, body) in good.clone() {
            let s = server.clone();
            runs.push(tokio::spawn(async move { output_of(&s, path, &body).await }));
        }
    }
    for (path, body, status, param) in hostile_bodies() {
        let (got, v, closes) = post_raw(&server, path, body).await;
        // A refused body was not read whole, so that connection must not be reused; a
        // request that was read whole keeps its connection.
        assert_eq!(closes, status == 413, "Connection: close on a {status}");
        let kind = "invalid_request_error";
        let code = match status {
            413 => Some("request_too_large"),
            _ => None,
        };
        assert_error(got, &v, status, kind, param, code);
    }
    for (i, run) in runs.into_iter().enumerate() {
        assert_eq!(run.await.unwrap(), quiet[i % good.len()], "good request {i}");
    }
    assert_eq!(server.get("/health").await.status().as_u16(), 200);
    server
        .wait_metrics("blocks freed", Duration::from_secs(10), |m| {
            m["moe_kv_cache_blocks_used"] == 0.0
        })
        .await;
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_big_headers_refused() {
    let server = Server::start(&[
        "--header-read-timeout",
        "1",
        "--body-read-timeout",
        "1",
        "--max-header-bytes",
        "16384",
    ]);
    let addr = server.base.trim_start_matches("http://").to_string();

    // A head dripped a line at a time never completes: the connection is closed.
    let mut head = TcpStream::connect(&addr).await.unwrap();
    let start = Instant::now();
    head.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut dripping = true;
    while dripping && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        dripping = head.write_all(b"X-Drip: 1\r\n").await.is_ok();
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(10), head.read_to_end(&mut buf)).await {
            let _ = n;
            break;
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a slow head held the connection for {:?}",
        start.elapsed()
    );

    // A body that stops half way gets a 408 with an OpenAI error.
    let body = br#"{"model": "tiny", "prompt": [1, 2], "max_tokens": 2}"#;
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(request.as_bytes()).await.unwrap();
    slow.write_all(&body[..10]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer))
        .await
        .expect("answered within the body deadline")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");

    // Headers over --max-header-bytes: 431 with an OpenAI error body.
    let r = server
        .client
        .get(server.url("/v1/models"))
        .header("x-big", "a".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 431);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "headers_too_large", "{v}");

    // And good requests still work.
    let v = server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1, 2], "max_tokens": 2}),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_metrics_opens_only_metrics() {
    let server = Server::start(&["--api-key", "k3y", "--public-metrics"]);
    assert_eq!(server.get("/metrics").await.status().as_u16(), 200);
    let refused = server.get("/v1/models").await;
    assert_eq!(refused.status().as_u16(), 401);
    // No body to leave unread: the connection stays open.
    assert!(refused.headers().get("connection").is_none());
    // A body refused unread (no key): the connection closes, so a pooling client opens a
    // fresh one for its next request instead of writing into a closing socket.
    let (status, v, closes) = post_raw(&server, "/v1/completions", vec![b' '; 64 << 10]).await;
    assert_eq!(status, 401, "{v}");
    assert!(closes, "a 401 to a request with an unread body keeps its connection");
    assert_eq!(server.get("/metrics").await.status().as_u16(), 200);
    let keyed = server
        .client
        .get(server.url("/v1/models"))
        .bearer_auth("k3y")
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stuck_client_exits_within_the_drain_time() {
    let mut server = Server::start(&["--drain-timeout", "2", "--body-read-timeout", "600"]);
    let addr = server.base.trim_start_matches("http://").to_string();
    // A request whose body never finishes keeps its connection busy.
    let mut stuck = TcpStream::connect(&addr).await.unwrap();
    stuck
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let status = server
        .terminate(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM; log:\n{}", server.logs()));
    let took = start.elapsed();
    assert!(status.success(), "exit status {status:?}; log:\n{}", server.logs());
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "the drain should wait for the stuck request about 2 s, took {took:?}"
    );
    assert!(server.logs().contains("drain-timeout"), "{}", server.logs());
    drop(stuck);
}
