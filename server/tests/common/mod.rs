//! Helpers shared by the `moe serve` tests: a server process on a free loopback port,
//! SSE and metrics parsing, golden fixtures and the CLI for comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use moe_tests::fixture;
use serde_json::{json, Value};

pub const NAME: &str = "tiny";

/// Runs the `moe` binary with `args` (offline) and returns its output.
pub fn run_moe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run moe")
}

pub fn model_dir() -> PathBuf {
    fixture("deepseek-v3")
}

/// A `moe serve` child process on a free port; SIGTERM (then SIGKILL) on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub stderr: Arc<Mutex<String>>,
    pub client: reqwest::Client,
}

impl Server {
    /// Starts `moe serve --model <fixture> --port 0 --served-model-name tiny <extra>`.
    pub fn start(extra: &[&str]) -> Server {
        let mut args = vec!["--served-model-name", NAME];
        args.extend_from_slice(extra);
        Self::start_raw(&args)
    }

    pub fn start_raw(extra: &[&str]) -> Server {
        Self::start_model(&model_dir(), extra)
    }

    /// Starts `moe serve --model <dir> --port 0 <extra>`.
    pub fn start_model(dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moe"))
            .args(["serve", "--model", dir.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moe serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().unwrap();
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "moe serve printed no listening line within 60 s; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let base = line
            .strip_prefix("moe serve: listening on ")
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"))
            .trim()
            .to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        let port: u16 = base.rsplit(':').next().unwrap().parse().expect("port");
        assert_ne!(port, 0);
        Server {
            child,
            base,
            stderr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("POST")
    }

    /// POSTs and returns (status, JSON body).
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.post(path, body).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, v)
    }

    /// A request that must succeed: its JSON body.
    pub async fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post_json(path, body).await;
        assert_eq!(status, 200, "{path} {body}: {v}\nserver log:\n{}", self.logs());
        v
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    /// `/metrics` parsed into `name{labels} -> value`.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        let r = self.get("/metrics").await;
        assert_eq!(r.status().as_u16(), 200);
        parse_metrics(&r.text().await.unwrap())
    }

    pub async fn gauge(&self, name: &str) -> f64 {
        *self
            .metrics()
            .await
            .get(name)
            .unwrap_or_else(|| panic!("/metrics has no {name}"))
    }

    /// Polls `/metrics` until `pred` holds (or panics after `timeout`).
    pub async fn wait_metrics(&self, what: &str, timeout: Duration, pred: impl Fn(&HashMap<String, f64>) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics().await;
            if pred(&m) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; metrics: {m:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:").map(|d| d.strip_prefix(' ').unwrap_or(d)))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// POSTs a streamed request; returns its JSON chunks (checking the SSE framing and `[DONE]`).
pub async fn stream_chunks(server: &Server, path: &str, body: &Value) -> Vec<Value> {
    let r = server.post(path, body).await;
    assert_eq!(r.status().as_u16(), 200, "{path} {body}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]: {text}"
    );
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {d}")))
        .collect()
}

/// Golden prompts and greedy continuations of a fixture.
pub fn golden(dir: &Path) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let g = moe_tests::golden(dir);
    (g.prompts, g.greedy)
}

pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// `moe generate --json` greedy output for token ids: (token ids, text).
pub fn cli_generate(ids: &[u32], max_tokens: usize) -> (Vec<u32>, String) {
    let dir = model_dir();
    let o = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg(ids),
        ])
        .args(["--max-tokens", &max_tokens.to_string(), "--ignore-eos", "--json"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run moe generate");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let got = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    (got, v["text"].as_str().expect("text").to_string())
}

/// Asserts an OpenAI-style error: status, `error.type`, `error.param`, `error.code`.
pub fn assert_error(status: u16, body: &Value, want_status: u16, kind: &str, param: Option<&str>, code: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(e.is_object(), "no error object: {body}");
    let message = e["message"].as_str().unwrap_or_else(|| panic!("no message: {body}"));
    assert!(!message.is_empty());
    assert_eq!(e["type"], kind, "{body}");
    for key in ["param", "code"] {
        assert!(
            e.get(key).is_some(),
            "error.{key} must be present (null allowed): {body}"
        );
    }
    assert_eq!(e["param"].as_str(), param, "{body}");
    assert_eq!(e["code"].as_str(), code, "{body}");
}

pub fn chat_body(extra: Value) -> Value {
    let mut b = json!({
        "model": NAME,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Héllo wörld, 你好 🙂 — how are you?"}
        ],
        "temperature": 0,
        "max_tokens": 16,
        "ignore_eos": true,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}
