//! `moe serve` limits and failures: every documented error answers with its status and
//! OpenAI error body, the API key, body limit and waiting-queue limit are enforced, a client
//! that goes away frees its KV blocks, and SIGTERM shuts the server down cleanly.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_openai_errors() {
    let server = Server::start(&[]);
    let c = "/v1/completions";
    let ch = "/v1/chat/completions";
    let p = |extra: Value| {
        let mut b = json!({"model": NAME, "prompt": [1, 2, 3], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let long: Vec<u32> = (0..256).map(|i| i % 300).collect();
    let almost: Vec<u32> = (0..250).map(|i| i % 300).collect();
    let bad = "invalid_request_error";
    // (path, body, error type, error.param, error.code)
    type Case<'a> = (&'a str, Value, &'a str, Option<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (c, p(json!({"max_tokens": 0})), bad, Some("max_tokens"), None),
        (c, p(json!({"max_tokens": -3})), bad, Some("max_tokens"), None),
        (c, p(json!({"temperature": -0.5})), bad, Some("temperature"), None),
        (c, p(json!({"top_p": 0})), bad, Some("top_p"), None),
        (c, p(json!({"top_p": 1.01})), bad, Some("top_p"), None),
        (c, p(json!({"n": 0})), bad, Some("n"), None),
        (c, p(json!({"n": 17})), bad, Some("n"), None),
        (c, p(json!({"logprobs": 21})), bad, Some("logprobs"), None),
        (
            c,
            p(json!({"model": "gpt-4"})),
            bad,
            Some("model"),
            Some("model_not_found"),
        ),
        (c, p(json!({"prompt": [1, 320]})), bad, Some("prompt"), None),
        (c, p(json!({"prompt": []})), bad, Some("prompt"), None),
        (c, p(json!({"prompt": [[1], [2]]})), bad, Some("prompt"), None),
        (
            c,
            p(json!({"prompt": long, "max_tokens": 1})),
            bad,
            Some("prompt"),
            None,
        ),
        (
            c,
            p(json!({"prompt": almost, "max_tokens": 12})),
            bad,
            Some("max_tokens"),
            None,
        ),
        // Wrong field types and missing fields: serde's message, no param.
        (c, p(json!({"temperature": "hot"})), bad, None, None),
        (c, p(json!({"max_tokens": "4"})), bad, None, None),
        (c, p(json!({"prompt": 42})), bad, None, None),
        (c, p(json!({"stream": "yes"})), bad, None, None),
        (c, json!({"prompt": [1]}), bad, None, None),
        (ch, chat_body(json!({"max_tokens": 0})), bad, Some("max_tokens"), None),
        (
            ch,
            chat_body(json!({"max_completion_tokens": 0})),
            bad,
            Some("max_tokens"),
            None,
        ),
        (
            ch,
            chat_body(json!({"temperature": -1})),
            bad,
            Some("temperature"),
            None,
        ),
        (ch, chat_body(json!({"top_p": 0})), bad, Some("top_p"), None),
        (
            ch,
            chat_body(json!({"model": "nope"})),
            bad,
            Some("model"),
            Some("model_not_found"),
        ),
        (ch, chat_body(json!({"messages": "hi"})), bad, None, None),
        (
            ch,
            chat_body(json!({"top_logprobs": 2})),
            bad,
            Some("top_logprobs"),
            None,
        ),
    ];
    for (path, body, kind, param, code) in cases {
        let (status, v) = server.post_json(path, &body).await;
        eprintln!("{path} {body} -> {status} {v}");
        assert_error(status, &v, 400, kind, param, code);
    }

    // Malformed JSON (raw bodies).
    for raw in ["{\"model\": \"tiny\", \"prompt\": [1, 2", "not json", ""] {
        let r = server
            .client
            .post(server.url(c))
            .header("content-type", "application/json")
            .body(raw.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_error(status, &v, 400, bad, None, None);
    }

    // Still serving.
    server.ok(c, &p(json!({}))).await;
    assert!(!server.logs().contains("panicked"), "{}", server.logs());

    // Graceful: a stream in flight at SIGTERM runs to its end, then the process exits 0.
    let mut server = Server::start(&[]);
    let mut r = server
        .post(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1], "n": 4, "max_tokens": 200, "ignore_eos": true, "stream": true}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let mut seen = String::new();
    while sse_data(&seen).len() < 2 {
        let chunk = r.chunk().await.unwrap().expect("stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    while let Some(chunk) = r.chunk().await.expect("stream cut by the shutdown") {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = sse_data(&seen);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let finished = data
        .iter()
        .filter(|d| d.contains("\"finish_reason\":\"length\""))
        .count();
    assert_eq!(finished, 4, "every choice finishes");
    let status = server
        .terminate(Duration::from_secs(10))
        .expect("exits after the stream ends");
    assert!(status.success(), "exit status {status:?}; log:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_v1_and_metrics_but_not_health() {
    let server = Server::start(&["--api-key", "sekret"]);
    let body = json!({"model": NAME, "prompt": [1, 2], "max_tokens": 2});
    let chat = chat_body(json!({"max_tokens": 2}));
    for key in [None, Some("wrong"), Some("sekret2"), Some("")] {
        let with = |rb: reqwest::RequestBuilder| match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        };
        let responses = vec![
            with(server.client.post(server.url("/v1/completions")).json(&body))
                .send()
                .await
                .unwrap(),
            with(server.client.post(server.url("/v1/chat/completions")).json(&chat))
                .send()
                .await
                .unwrap(),
            with(server.client.get(server.url("/v1/models"))).send().await.unwrap(),
            with(server.client.get(server.url("/metrics"))).send().await.unwrap(),
        ];
        for r in responses {
            let url = r.url().to_string();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            assert_eq!(status, 401, "{url} with key {key:?}: {v}");
            assert_eq!(v["error"]["type"], "authentication_error", "{v}");
            assert!(v["error"]["message"].is_string());
        }
    }
    // A key sent another way than `Authorization: Bearer` does not count.
    let r = server
        .client
        .get(server.url("/v1/models"))
        .header("authorization", "sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    assert_eq!(server.get("/health").await.status().as_u16(), 200);
    let ok = |rb: reqwest::RequestBuilder| rb.bearer_auth("sekret").send();
    let r = ok(server.client.post(server.url("/v1/completions")).json(&body))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = ok(server.client.post(server.url("/v1/chat/completions")).json(&chat))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = ok(server.client.get(server.url("/v1/models"))).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = ok(server.client.get(server.url("/metrics"))).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("moe_requests_total 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let server = Server::start(&["--max-body-bytes", "2048"]);
    let big = json!({"model": NAME, "prompt": "x".repeat(4096), "max_tokens": 2});
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let (status, v) = server.post_json(path, &big).await;
        assert_eq!(status, 413, "{path}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // Just under the limit is fine.
    let small = json!({"model": NAME, "prompt": "x".repeat(1500), "max_tokens": 2});
    assert!(small.to_string().len() < 2048);
    let (status, v) = server.post_json("/v1/completions", &small).await;
    // 1500 'x' may tokenize past the model length; either way not 413.
    assert!(status == 200 || status == 400, "{status} {v}");
    server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1], "max_tokens": 1}),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_waiting_queue_answers_503_with_retry_after() {
    let server = Arc::new(Server::start(&["--max-num-seqs", "1", "--max-waiting", "1"]));
    // Two long requests: with one sequence at a time, the second waits for a while.
    let long = json!({"model": NAME, "prompt": [1], "max_tokens": 200, "ignore_eos": true, "temperature": 0});
    let spawn_long =
        |server: Arc<Server>, body: Value| tokio::spawn(async move { server.ok("/v1/completions", &body).await });
    // The probes race the engine: on a loaded machine both long requests may finish between
    // seeing the waiter and probing. That proves nothing either way, so the scenario repeats
    // (a few times at most) until a probe meets the full queue.
    let mut got_503 = 0;
    for _attempt in 0..5 {
        let busy = spawn_long(server.clone(), long.clone());
        server
            .wait_metrics("a running request", Duration::from_secs(20), |m| {
                m["moe_num_requests_running"] >= 1.0
            })
            .await;
        let queued = spawn_long(server.clone(), long.clone());
        // The engine publishes its queue lengths once per step: wait until it shows the waiters.
        server
            .wait_metrics("waiting requests", Duration::from_secs(20), |m| {
                m["moe_num_requests_waiting"] >= 1.0
            })
            .await;
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let body = if path == "/v1/completions" {
                json!({"model": NAME, "prompt": [1, 2], "max_tokens": 2})
            } else {
                chat_body(json!({"max_tokens": 2}))
            };
            let r = server.post(path, &body).await;
            let status = r.status().as_u16();
            if status == 503 {
                got_503 += 1;
                let retry = r.headers().get("retry-after").expect("503 needs Retry-After");
                let secs: u64 = retry.to_str().unwrap().parse().expect("Retry-After in seconds");
                assert!(secs >= 1);
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["type"], "server_error", "{v}");
                assert!(v["error"]["message"].is_string());
            } else {
                // Only acceptable if the busy request drained in the meantime.
                assert_eq!(status, 200);
            }
        }
        for task in [busy, queued] {
            let v = task.await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 200);
        }
        if got_503 > 0 {
            break;
        }
    }
    assert!(got_503 >= 1, "no 503 in 5 attempts with a full waiting queue");
    // One request of n choices may not push the queue past its limit either.
    let (status, v) = server
        .post_json(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1], "n": 3, "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 503, "{v}");
    // Once drained, requests are admitted again.
    server
        .wait_metrics("an empty queue", Duration::from_secs(10), |m| {
            m["moe_num_requests_waiting"] == 0.0 && m["moe_num_requests_running"] == 0.0
        })
        .await;
    server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1], "max_tokens": 2}),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let server = Server::start(&[]);
    let before = server.metrics().await;
    assert_eq!(before["moe_kv_cache_blocks_used"], 0.0);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let gen_before = server.gauge("moe_generation_tokens_total").await;
        let body = if path == "/v1/completions" {
            json!({"model": NAME, "prompt": [1], "max_tokens": 250, "ignore_eos": true, "stream": true})
        } else {
            chat_body(json!({"max_tokens": 200, "stream": true}))
        };
        let mut r = server.post(path, &body).await;
        assert_eq!(r.status().as_u16(), 200);
        let mut seen = String::new();
        while sse_data(&seen).len() < 3 {
            let chunk = r.chunk().await.unwrap().expect("stream ended early");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        drop(r);
        server
            .wait_metrics("freed KV blocks", Duration::from_secs(10), |m| {
                m["moe_kv_cache_blocks_used"] == 0.0
                    && m["moe_num_requests_running"] == 0.0
                    && m["moe_num_requests_waiting"] == 0.0
            })
            .await;
        // Aborted, not run to the end.
        let generated = server.gauge("moe_generation_tokens_total").await - gen_before;
        let full = if path == "/v1/completions" { 250.0 } else { 200.0 };
        assert!(
            generated < full / 2.0,
            "{path}: {generated} of {full} tokens generated; the client left after 3 chunks"
        );
    }
    assert_eq!(
        server.logs().matches("client went away").count(),
        2,
        "both streams aborted; log:\n{}",
        server.logs()
    );
    // Still healthy.
    assert_eq!(server.get("/health").await.status().as_u16(), 200);
    let v = server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": true}),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let m = server.metrics().await;
    assert_eq!(m["moe_kv_cache_blocks_used"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let mut server = Server::start(&[]);
    // A pooled keep-alive connection must not hold the shutdown up.
    server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1], "max_tokens": 2}),
        )
        .await;
    let start = Instant::now();
    let status = server.terminate(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("still running 10 s after SIGTERM; log:\n{}", server.logs()));
    assert!(status.success(), "exit status {status:?}; log:\n{}", server.logs());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        start.elapsed()
    );
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}
