//! The OpenAI wire format: request bodies of `/v1/completions` and `/v1/chat/completions`,
//! their validation into engine requests, and the response and stream-chunk bodies.

use moe_engine::engine::TokenLogprobs;
use moe_engine::{GenerationRequest, SamplingParams, TextTokenizer};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::chat_template::ChatMessage;

/// Most choices one request may ask for.
pub const MAX_N: u32 = 16;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    /// Number of top alternatives to return per token (0..=20).
    pub logprobs: Option<u32>,
    /// Add each choice's generated `token_ids` (vLLM's extension of the same name).
    #[serde(default)]
    pub return_token_ids: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    /// OpenAI tool definitions, checked by `agent::AgentRequest`.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    /// Extra chat-template variables (`enable_thinking`, `thinking`, ...), as vLLM takes them.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Parses a JSON body, turning serde's message into a 400.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::bad_request(format!("{what}: {e}"), None)
    })
}

impl CompletionRequest {
    /// Validates the request into an engine request: the prompt (text goes through `encode`,
    /// ids are checked against `vocab_size`), then the sampling fields. Only single prompts
    /// are served; the model name and `n` are checked by the caller.
    pub fn to_engine_request(
        &self,
        encode: impl FnOnce(&str) -> Result<Vec<u32>, ApiError>,
        vocab_size: usize,
        max_model_len: usize,
    ) -> Result<GenerationRequest, ApiError> {
        let is_empty_text = match &self.prompt {
            PromptInput::Text(t) => t.is_empty(),
            PromptInput::Texts(v) => v.len() == 1 && v[0].is_empty(),
            _ => false,
        };
        if is_empty_text {
            // Only a BOS token would remain: refuse rather than generate from nothing.
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        let prompt = match &self.prompt {
            PromptInput::Text(t) => encode(t)?,
            PromptInput::Ids(ids) => ids.clone(),
            PromptInput::Texts(v) if v.len() == 1 => encode(&v[0])?,
            PromptInput::IdLists(v) if v.len() == 1 => v[0].clone(),
            _ => {
                return Err(ApiError::bad_request(
                    "send one prompt per request (batch prompts are not supported)",
                    Some("prompt"),
                ))
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(ApiError::bad_request(
                format!("token id {bad} is outside the vocabulary of {vocab_size}"),
                Some("prompt"),
            ));
        }
        let mut request =
            self.sampling
                .to_request(self.sampling.max_tokens, self.logprobs, prompt.len(), max_model_len)?;
        request.prompt_token_ids = prompt;
        Ok(request)
    }
}

impl ChatRequest {
    /// Validates the request into an engine request for `prompt`, the token ids of the
    /// rendered chat template. The model name and `n` are checked by the caller.
    pub fn to_engine_request(&self, prompt: Vec<u32>, max_model_len: usize) -> Result<GenerationRequest, ApiError> {
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::bad_request(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ));
        }
        if let Some(t) = self.top_logprobs.filter(|&t| t > 20) {
            return Err(ApiError::bad_request(
                format!("top_logprobs must be at most 20, got {t}"),
                Some("top_logprobs"),
            ));
        }
        let top = if self.logprobs {
            Some(self.top_logprobs.unwrap_or(0))
        } else {
            None
        };
        let max_tokens = self.max_completion_tokens.or(self.sampling.max_tokens);
        let mut request = self.sampling.to_request(max_tokens, top, prompt.len(), max_model_len)?;
        request.prompt_token_ids = prompt;
        Ok(request)
    }
}

impl SamplingFields {
    pub fn n(&self) -> Result<u32, ApiError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_N => Ok(n),
            n => Err(ApiError::bad_request(
                format!("n must be between 1 and {MAX_N}, got {n}"),
                Some("n"),
            )),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    /// Validates the sampling fields into an engine request (prompt filled in by the caller).
    /// `max_tokens` defaults to what is left of the model length after the prompt.
    pub fn to_request(
        &self,
        max_tokens: Option<i64>,
        logprobs: Option<u32>,
        prompt_len: usize,
        max_model_len: usize,
    ) -> Result<GenerationRequest, ApiError> {
        let max_tokens = match max_tokens {
            Some(m) if m < 1 => {
                return Err(ApiError::bad_request(
                    format!("max_tokens must be at least 1, got {m}"),
                    Some("max_tokens"),
                ))
            }
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
            None => max_model_len.saturating_sub(prompt_len).max(1),
        };
        if prompt_len >= max_model_len || prompt_len + max_tokens > max_model_len {
            return Err(ApiError::bad_request(
                format!(
                    "this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} and max_tokens asks for {max_tokens}"
                ),
                Some(if prompt_len >= max_model_len { "prompt" } else { "max_tokens" }),
            ));
        }
        let check = |ok: bool, param: &str, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(ApiError::bad_request(msg, Some(param)))
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        check(
            temperature.is_finite() && (0.0..=2.0).contains(&temperature),
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        )?;
        let top_p = self.top_p.unwrap_or(1.0);
        check(
            top_p > 0.0 && top_p <= 1.0,
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        )?;
        let top_k = self.top_k.unwrap_or(-1);
        check(
            top_k == -1 || top_k >= 0,
            "top_k",
            format!("top_k must be -1 (off) or >= 0, got {top_k}"),
        )?;
        let min_p = self.min_p.unwrap_or(0.0);
        check(
            (0.0..=1.0).contains(&min_p),
            "min_p",
            format!("min_p must be in [0, 1], got {min_p}"),
        )?;
        let presence = self.presence_penalty.unwrap_or(0.0);
        check(
            (-2.0..=2.0).contains(&presence),
            "presence_penalty",
            format!("presence_penalty must be in [-2, 2], got {presence}"),
        )?;
        let frequency = self.frequency_penalty.unwrap_or(0.0);
        check(
            (-2.0..=2.0).contains(&frequency),
            "frequency_penalty",
            format!("frequency_penalty must be in [-2, 2], got {frequency}"),
        )?;
        if let Some(l) = logprobs {
            check(l <= 20, "logprobs", format!("logprobs must be at most 20, got {l}"))?;
        }
        let stop = match &self.stop {
            None => vec![],
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        check(
            stop.len() <= 16,
            "stop",
            format!("at most 16 stop strings, got {}", stop.len()),
        )?;
        Ok(GenerationRequest {
            prompt_token_ids: vec![],
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k: if top_k < 0 { 0 } else { top_k as usize },
                min_p,
                presence_penalty: presence,
                frequency_penalty: frequency,
                seed: self.seed,
                logprobs: logprobs.map(|l| l as usize),
            },
            stop_token_ids: vec![],
            stop,
            ignore_eos: self.ignore_eos,
            constraint: None,
        })
    }
}

/// Token text for logprobs output.
fn token_text(tokenizer: Option<&TextTokenizer>, id: u32) -> String {
    tokenizer
        .and_then(|t| t.token_display(id))
        .unwrap_or_else(|| format!("token_id:{id}"))
}

/// The bytes of a token for chat logprobs (the token's text bytes when not byte-level).
fn token_bytes(tokenizer: Option<&TextTokenizer>, id: u32) -> Vec<u8> {
    tokenizer
        .and_then(|t| t.token_bytes(id))
        .unwrap_or_else(|| token_text(tokenizer, id).into_bytes())
}

/// The legacy completions `logprobs` object for a list of tokens.
pub fn completion_logprobs(lps: &[TokenLogprobs], tokenizer: Option<&TextTokenizer>) -> Value {
    json!({
        "tokens": lps.iter().map(|l| token_text(tokenizer, l.token)).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|(t, p)| (token_text(tokenizer, *t), json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
    })
}

/// The chat `logprobs` object (`{"content": [...]}`) for a list of tokens.
pub fn chat_logprobs(lps: &[TokenLogprobs], tokenizer: Option<&TextTokenizer>) -> Value {
    let entry =
        |t: u32, p: f32| json!({ "token": token_text(tokenizer, t), "logprob": p, "bytes": token_bytes(tokenizer, t) });
    json!({
        "content": lps.iter().map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|(t, p)| entry(*t, *p)).collect());
            e
        }).collect::<Vec<_>>()
    })
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(text: &str) -> Result<Vec<u32>, ApiError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn completion(body: &str) -> CompletionRequest {
        parse_body(body.as_bytes()).unwrap()
    }

    fn chat(body: &str) -> ChatRequest {
        parse_body(body.as_bytes()).unwrap()
    }

    #[test]
    fn completion_prompts_become_engine_requests_or_name_the_field() {
        let r = completion(r#"{"model":"m","prompt":"ab","max_tokens":3}"#)
            .to_engine_request(encode, 256, 16)
            .unwrap();
        assert_eq!((r.prompt_token_ids, r.max_tokens), (vec![97, 98], 3));
        let r = completion(r#"{"model":"m","prompt":[[5,6,7]]}"#)
            .to_engine_request(encode, 256, 16)
            .unwrap();
        assert_eq!((r.prompt_token_ids, r.max_tokens), (vec![5, 6, 7], 13));
        for (body, needle) in [
            (r#"{"model":"m","prompt":["a","b"]}"#, "one prompt"),
            (r#"{"model":"m","prompt":[[]]}"#, "empty"),
            (r#"{"model":"m","prompt":[1,300]}"#, "token id 300"),
            (
                r#"{"model":"m","prompt":"abc","max_tokens":14}"#,
                "maximum context length is 16",
            ),
            (
                r#"{"model":"m","prompt":"a","max_tokens":-9223372036854775808}"#,
                "at least 1",
            ),
            (
                r#"{"model":"m","prompt":"a","max_tokens":9223372036854775807}"#,
                "maximum context",
            ),
        ] {
            let e = completion(body).to_engine_request(encode, 256, 16).unwrap_err();
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn chat_requests_check_logprobs_and_take_max_completion_tokens_first() {
        let r = chat(
            r#"{"model":"m","messages":[],"max_completion_tokens":2,"max_tokens":5,"logprobs":true,"top_logprobs":3}"#,
        )
        .to_engine_request(vec![1, 2], 16)
        .unwrap();
        assert_eq!((r.max_tokens, r.sampling.logprobs), (2, Some(3)));
        let e = chat(r#"{"model":"m","messages":[],"top_logprobs":3}"#)
            .to_engine_request(vec![1], 16)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
    }
}
