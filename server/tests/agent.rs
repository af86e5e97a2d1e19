//! Structured outputs and forced tool calls over loopback HTTP with the tiny random-weight
//! fixture: whatever the seed, what comes back parses and obeys the schema; a streamed forced
//! call assembles to the non-streamed one; unconstrained requests batched with constrained
//! ones are unchanged; bad tool and schema input is a 400 naming the field.

mod common;

use common::*;
use serde_json::{json, Value};

/// Bounded so a random model finishes well inside max_tokens.
fn weather_schema() -> Value {
    json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["c", "f"]}},
        "required": ["city", "days", "unit"], "additionalProperties": false})
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": weather_schema()}},
        {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": false}}}
    ])
}

/// Checks `v` against [`weather_schema`] by hand.
fn assert_weather(v: &Value, what: &str) {
    let obj = v.as_object().unwrap_or_else(|| panic!("{what}: not an object: {v}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["city", "days", "unit"], "{what}: {v}");
    assert!(
        obj["city"].as_str().is_some_and(|c| c.chars().count() <= 6),
        "{what}: {v}"
    );
    assert!(
        obj["days"].as_i64().is_some_and(|d| (1..=14).contains(&d)),
        "{what}: {v}"
    );
    assert!(matches!(obj["unit"].as_str(), Some("c" | "f")), "{what}: {v}");
}

fn chat(extra: Value) -> Value {
    let mut b = json!({"model": NAME, "max_tokens": 120, "temperature": 1.0,
        "messages": [{"role": "user", "content": "Weather in Oslo for 3 days?"}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_and_forced_tool_calls_parse_for_every_seed() {
    let server = Server::start(&[]);
    for seed in 0..20u64 {
        let body = chat(json!({"seed": seed, "response_format": {"type": "json_schema",
            "json_schema": {"name": "weather", "strict": true, "schema": weather_schema()}}}));
        let r = server.ok("/v1/chat/completions", &body).await;
        let content = r["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("seed {seed}: {content:?}: {e}"));
        assert_weather(&v, &format!("json_schema seed {seed}"));
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "seed {seed}");

        let body = chat(json!({"seed": seed, "tools": tools(),
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}));
        let r = server.ok("/v1/chat/completions", &body).await;
        let choice = &r["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "seed {seed}: {r}");
        assert!(choice["message"]["content"].is_null(), "{r}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_weather(&args, &format!("named tool seed {seed}"));

        let body =
            chat(json!({"seed": seed, "tools": tools(), "tool_choice": "required", "parallel_tool_calls": false}));
        let r = server.ok("/v1/chat/completions", &body).await;
        let calls = r["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("seed {seed}: {r}"));
        assert_eq!(calls.len(), 1, "{r}");
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        match calls[0]["function"]["name"].as_str().unwrap() {
            "get_weather" => assert_weather(&args, &format!("required seed {seed}")),
            "ping" => assert!(args["n"].as_i64().is_some_and(|n| (0..=9).contains(&n)), "{args}"),
            other => panic!("unknown tool {other}"),
        }
    }
    let r = server
        .ok(
            "/v1/chat/completions",
            &chat(json!({"seed": 1, "response_format": {"type": "json_object"}})),
        )
        .await;
    let content = r["choices"][0]["message"]["content"].as_str().unwrap();
    // A random model may run out of tokens inside an object; what it wrote is a JSON prefix.
    if r["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(content).unwrap().is_object(), "{content}");
    } else {
        assert!(content.starts_with('{'), "{content}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_forced_call_assembles_to_the_whole_one_and_free_requests_are_unchanged() {
    let server = Server::start(&[]);
    let forced = chat(
        json!({"seed": 7, "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    );
    let whole = server.ok("/v1/chat/completions", &forced).await;
    let mut streamed = forced.clone();
    streamed["stream"] = json!(true);
    let text = server
        .post("/v1/chat/completions", &streamed)
        .await
        .text()
        .await
        .unwrap();
    let (mut name, mut args, mut finish) = (String::new(), String::new(), String::new());
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
            for c in calls {
                assert_eq!(c["index"], 0);
                name += c["function"]["name"].as_str().unwrap_or_default();
                args += c["function"]["arguments"].as_str().unwrap_or_default();
            }
        }
        assert!(
            choice["delta"]["content"].as_str().unwrap_or_default().is_empty(),
            "content leaked: {line}"
        );
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    let call = &whole["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(name, call["name"].as_str().unwrap());
    assert_eq!(args, call["arguments"].as_str().unwrap());
    assert_eq!(finish, "tool_calls");

    // A greedy free request alone, then batched with constrained ones: the same text.
    let free = json!({"model": NAME, "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a story"}]});
    let alone = server.ok("/v1/chat/completions", &free).await["choices"][0]["message"]["content"].clone();
    let mut jobs = Vec::new();
    for seed in 0..4u64 {
        let body = chat(
            json!({"seed": seed, "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": weather_schema()}}}),
        );
        let client = reqwest::Client::new();
        let url = server.url("/v1/chat/completions");
        jobs.push(tokio::spawn(async move {
            client.post(url).json(&body).send().await.unwrap().status().as_u16()
        }));
    }
    let batched = server.ok("/v1/chat/completions", &free).await["choices"][0]["message"]["content"].clone();
    for j in jobs {
        assert_eq!(j.await.unwrap(), 200);
    }
    assert_eq!(alone, batched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tools_schemas_and_messages_are_400s_naming_the_field() {
    let server = Server::start(&[]);
    let cases = [
        (
            chat(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]})),
            "tools[0].function.parameters.type",
        ),
        (
            chat(json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "missing"}}})),
            "tool_choice",
        ),
        (
            chat(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}}),
            ),
            "response_format.json_schema.schema.properties.a.type",
        ),
        // Well-formed, but llguidance cannot compile it: an unclosed regex group.
        (
            chat(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(ab"}}}}}}),
            ),
            "response_format",
        ),
        (
            chat(json!({"response_format": {"type": "yaml"}})),
            "response_format.type",
        ),
        (json!({"model": NAME, "messages": [{"role": "user"}]}), "messages"),
        (
            json!({"model": NAME, "messages": [{"role": "system", "content": null}, {"role": "user", "content": "x"}]}),
            "messages",
        ),
        (
            json!({"model": NAME, "messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_9", "content": "1"}]}),
            "messages",
        ),
    ];
    for (body, param) in cases {
        let (status, v) = server.post_json("/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // A conversation with a tool call and its result is accepted.
    let body = json!({"model": NAME, "max_tokens": 4, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{\"n\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "pong"}], "tools": tools()});
    let (status, v) = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
}

/// The tiny fixture's weights and tokenizer behind a real chat template (`templates/<name>`).
fn fixture_with_template(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = model_dir();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::os::unix::fs::symlink(src.join(f), dir.path().join(f)).unwrap();
    }
    let template = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/templates");
    std::fs::copy(
        format!("{template}/{name}/chat_template.jinja"),
        dir.path().join("chat_template.jinja"),
    )
    .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

/// GLM-4.7-Flash's template opens `<think>` at the end of the prompt, so everything the model
/// writes (it never closes the block) is reasoning; `enable_thinking: false` closes it in the
/// prompt, and the same text comes back as content. Streamed deltas assemble the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_split_by_the_real_template_and_kwargs_reach_it() {
    let dir = fixture_with_template("glm-4.7-flash");
    let server = Server::start_model(dir.path(), &["--served-model-name", NAME]);
    let ask = |extra: Value| {
        let mut b = json!({"model": NAME, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": "2+2?"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let thinking = server.ok("/v1/chat/completions", &ask(json!({}))).await;
    let m = &thinking["choices"][0]["message"];
    let reasoning = m["reasoning_content"]
        .as_str()
        .unwrap_or_else(|| panic!("no reasoning: {thinking}"));
    assert!(!reasoning.is_empty());
    assert_eq!(m["content"], "", "{thinking}");

    let mut streamed = ask(json!({}));
    streamed["stream"] = json!(true);
    let text = server
        .post("/v1/chat/completions", &streamed)
        .await
        .text()
        .await
        .unwrap();
    let (mut r, mut c) = (String::new(), String::new());
    for line in text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
    {
        let chunk: Value = serde_json::from_str(line).unwrap();
        r += chunk["choices"][0]["delta"]["reasoning_content"]
            .as_str()
            .unwrap_or_default();
        c += chunk["choices"][0]["delta"]["content"].as_str().unwrap_or_default();
    }
    assert_eq!((r.as_str(), c.as_str()), (reasoning, ""));

    let plain = server
        .ok(
            "/v1/chat/completions",
            &ask(json!({"chat_template_kwargs": {"enable_thinking": false}})),
        )
        .await;
    let m = &plain["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{plain}");
    assert!(!m["content"].as_str().unwrap().is_empty(), "{plain}");
    assert_ne!(
        plain["usage"]["prompt_tokens"], thinking["usage"]["prompt_tokens"],
        "the kwarg did not reach the template"
    );
}
