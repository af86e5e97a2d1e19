//! The HTTP backend of `moe bench serve`: streamed `/v1/completions` requests with token-id
//! prompts to any OpenAI-compatible server, counting tokens from the stream and reading the
//! server's `usage`; optional counters scraped from a Prometheus `/metrics` (ours).

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use super::load::{Backend, Completion, Counters};

pub struct HttpBackend {
    client: reqwest::Client,
    /// `scheme://host:port` (a trailing `/v1` of the given URL removed).
    base: String,
    model: String,
    api_key: Option<String>,
    /// Ask for the generated token ids (`return_token_ids`, as vLLM and `moe serve` name it).
    return_token_ids: bool,
}

/// Lines of a Prometheus text exposition parsed into `name{labels} -> value`.
pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Tokens one stream chunk carries: the length of `choices[0].token_ids` when the server
/// sends ids, else one per chunk unless it only closes the stream (a finish reason and no
/// text).
fn tokens_in_chunk(chunk: &Value) -> (usize, Option<Vec<u32>>) {
    let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
        return (0, None);
    };
    if let Some(ids) = choice["token_ids"].as_array() {
        let ids: Vec<u32> = ids.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect();
        return (ids.len(), Some(ids));
    }
    let text_empty = choice["text"].as_str().is_none_or(str::is_empty);
    let closing = !choice["finish_reason"].is_null() && text_empty;
    (usize::from(!closing), None)
}

impl HttpBackend {
    pub fn new(url: &str, model: &str, api_key: Option<String>, return_token_ids: bool) -> anyhow::Result<Self> {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
        if parsed.scheme() != "http" {
            anyhow::bail!("--url {url}: only http:// URLs are supported");
        }
        let base = url.trim_end_matches('/').trim_end_matches("/v1").to_string();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(HttpBackend {
            client,
            base,
            model: model.to_string(),
            api_key,
            return_token_ids,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// `GET /v1/models`; fails with a message naming `--url` when the server is unreachable.
    pub async fn models(&self) -> anyhow::Result<Value> {
        let r = self
            .request(reqwest::Method::GET, "/v1/models")
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("--url {}: cannot reach the server ({e})", self.base))?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!(
                "--url {}: GET /v1/models answered {status}: {}",
                self.base,
                text.chars().take(200).collect::<String>()
            );
        }
        serde_json::from_str(&text).with_context(|| format!("--url {}: /v1/models did not answer JSON", self.base))
    }

    async fn scrape(&self) -> Option<HashMap<String, f64>> {
        let r = self
            .request(reqwest::Method::GET, "/metrics")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        Some(parse_prometheus(&r.text().await.ok()?))
    }

    async fn complete(&self, prompt: Vec<u32>, max_tokens: usize) -> Result<Completion, String> {
        let mut body = json!({
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
        });
        if self.return_token_ids {
            body["return_token_ids"] = json!(true);
        }
        let start = Instant::now();
        let mut response = self
            .request(reqwest::Method::POST, "/v1/completions")
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
        }
        let mut done = Completion::default();
        let mut ids: Option<Vec<u32>> = Some(Vec::new());
        let mut buffer = String::new();
        let mut finished = false;
        while !finished {
            let bytes = match response.chunk().await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => return Err(format!("the stream broke: {e}")),
            };
            let at = start.elapsed().as_secs_f64();
            buffer.push_str(&String::from_utf8_lossy(&bytes).replace('\r', ""));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                    let data = data.trim();
                    if data == "[DONE]" {
                        finished = true;
                        continue;
                    }
                    let chunk: Value =
                        serde_json::from_str(data).map_err(|e| format!("a stream chunk is not JSON ({e}): {data}"))?;
                    if let Some(err) = chunk.get("error") {
                        return Err(format!("the server reported an error mid-stream: {err}"));
                    }
                    let (n, chunk_ids) = tokens_in_chunk(&chunk);
                    if n > 0 {
                        done.pieces.push((at, n));
                    }
                    match (chunk_ids, &mut ids) {
                        (Some(c), Some(all)) => all.extend(c),
                        (None, _) if n > 0 => ids = None,
                        _ => {}
                    }
                    if let Some(u) = chunk["usage"]["completion_tokens"].as_u64() {
                        done.usage_output_tokens = Some(u as usize);
                    }
                }
            }
        }
        if !finished {
            return Err("the stream ended before [DONE]".into());
        }
        done.e2e_s = start.elapsed().as_secs_f64();
        done.token_ids = ids.filter(|i| i.len() == done.output_tokens());
        Ok(done)
    }
}

impl Backend for HttpBackend {
    fn send(&self, prompt: Vec<u32>, max_tokens: usize) -> impl Future<Output = Result<Completion, String>> + Send {
        self.complete(prompt, max_tokens)
    }

    async fn counters(&self) -> Counters {
        let Some(m) = self.scrape().await else {
            return Counters::default();
        };
        let get = |name: &str| m.get(name).copied();
        Counters {
            kv_blocks_used: get("moe_kv_cache_blocks_used"),
            kv_blocks_total: get("moe_kv_cache_blocks_total"),
            preemptions: get("moe_preemptions_total").map(|v| v as u64),
            prefix_cache_queries: get("moe_prefix_cache_queries_total").map(|v| v as u64),
            prefix_cache_hits: get("moe_prefix_cache_hits_total").map(|v| v as u64),
            gpu_energy_joules: get("moe_gpu_energy_joules_total"),
        }
    }

    fn sample_every(&self) -> Duration {
        Duration::from_millis(25)
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_prometheus, tokens_in_chunk};
    use serde_json::json;

    #[test]
    fn chunks_count_ids_when_sent_else_one_unless_only_closing() {
        let with_ids = json!({"choices": [{"text": "", "token_ids": [5, 6], "finish_reason": null}]});
        assert_eq!(tokens_in_chunk(&with_ids), (2, Some(vec![5, 6])));
        let empty_text = json!({"choices": [{"text": "", "finish_reason": null}]});
        assert_eq!(tokens_in_chunk(&empty_text).0, 1);
        let last_token = json!({"choices": [{"text": "x", "finish_reason": "length"}]});
        assert_eq!(tokens_in_chunk(&last_token).0, 1);
        let closing = json!({"choices": [{"text": "", "finish_reason": "length"}]});
        assert_eq!(tokens_in_chunk(&closing).0, 0);
        let usage = json!({"choices": [], "usage": {"completion_tokens": 3}});
        assert_eq!(tokens_in_chunk(&usage).0, 0);
    }

    #[test]
    fn prometheus_lines_parse() {
        let m = parse_prometheus("# HELP x y\nmoe_kv_cache_blocks_used 3\nmoe_a_total{le=\"1\"} 2.5\n");
        assert_eq!(m["moe_kv_cache_blocks_used"], 3.0);
        assert_eq!(m["moe_a_total{le=\"1\"}"], 2.5);
    }
}
