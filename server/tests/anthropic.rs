//! Anthropic's Messages API over loopback HTTP: a whole response equals the streamed event
//! sequence (order, text, usage, stop reason), stop sequences, count_tokens, `x-api-key`, and
//! errors in Anthropic's shape. (`tests/anthropic_client.py` checks the same with the official
//! client in CI.)

mod common;

use common::*;
use serde_json::{json, Value};

fn body(extra: Value) -> Value {
    let mut b = json!({
        "model": NAME, "max_tokens": 10, "temperature": 0, "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// `(event name, data)` of every event of an SSE body.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let field = |name: &str| {
                e.lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                    .unwrap_or_default()
            };
            (
                field("event:"),
                serde_json::from_str(&field("data:")).unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_whole_and_streamed_agree_and_errors_take_anthropics_shape() {
    let server = Server::start(&["--api-key", "sekret"]);
    let post = |path: &'static str, b: Value, key: &'static str| {
        let client = reqwest::Client::new();
        let url = server.url(path);
        async move {
            let r = client.post(url).header("x-api-key", key).json(&b).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, text) = post("/v1/messages", body(json!({})), "sekret").await;
    assert_eq!(status, 200, "{text}");
    let whole: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (whole["type"].as_str(), whole["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    let answer = whole["content"][0]["text"].as_str().unwrap().to_string();
    let output_tokens = whole["usage"]["output_tokens"].as_u64().unwrap();
    assert!(whole["usage"]["input_tokens"].as_u64().unwrap() > 0 && output_tokens >= 1);

    let (status, text) = post("/v1/messages", body(json!({"stream": true})), "sekret").await;
    assert_eq!(status, 200);
    let evs = events(&text);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["message_start", "content_block_start", "ping"],
        "{names:?}"
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        names[3..names.len() - 3].iter().all(|n| *n == "content_block_delta"),
        "{names:?}"
    );
    let streamed: String = evs
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, answer);
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], whole["stop_reason"]);
    assert_eq!(delta["usage"]["output_tokens"].as_u64(), Some(output_tokens));
    // Every data payload names its own event type.
    assert!(evs.iter().all(|(n, d)| d["type"] == n.as_str()));

    // count_tokens agrees with the usage of the same conversation.
    let (status, text) = post("/v1/messages/count_tokens", body(json!({})), "sekret").await;
    assert_eq!(status, 200);
    let counted: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(counted["input_tokens"], whole["usage"]["input_tokens"]);

    // A stop sequence from inside the answer ends it there, and says which.
    if let Some(stop) = answer.chars().skip(1).find(|c| c.is_alphanumeric()) {
        let stop = stop.to_string();
        let (_, text) = post("/v1/messages", body(json!({"stop_sequences": [stop]})), "sekret").await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["stop_reason"], "stop_sequence");
        assert_eq!(v["stop_sequence"], stop.as_str());
        assert_eq!(v["content"][0]["text"], answer[..answer.find(&stop).unwrap()]);
    }

    // Errors: Anthropic's body, the field named, the status Anthropic uses.
    let cases = [
        (
            body(json!({"max_tokens": null})),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            body(json!({"temperature": 1.5})),
            400,
            "invalid_request_error",
            "temperature",
        ),
        (
            body(json!({"tools": [{"name": "f"}]})),
            400,
            "invalid_request_error",
            "tools",
        ),
        (
            body(json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})),
            400,
            "invalid_request_error",
            "messages.0.content.0.type",
        ),
        (
            body(json!({"messages": [{"role": "user"}]})),
            400,
            "invalid_request_error",
            "messages.0.content",
        ),
        (body(json!({"model": "nope"})), 404, "not_found_error", "model"),
    ];
    for (b, want_status, kind, field) in cases {
        let (status, text) = post("/v1/messages", b.clone(), "sekret").await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status, want_status, "{b}: {text}");
        assert_eq!(v["type"], "error", "{text}");
        assert_eq!(v["error"]["type"], kind, "{text}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {text}"
        );
    }
    let (status, text) = post("/v1/messages", body(json!({})), "wrong").await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
        "authentication_error"
    );
}

fn weather_tool() -> Value {
    json!({"name": "get_weather", "description": "Weather for a city.", "input_schema": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city", "days"], "additionalProperties": false}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_forced_calls_tool_results_and_thinking() {
    let server = Server::start(&[]);
    // The Messages API has no seed: five unseeded samples at temperature 1.
    let forced = || {
        body(json!({"max_tokens": 80, "temperature": 1.0,
            "tools": [weather_tool()], "tool_choice": {"type": "tool", "name": "get_weather"}}))
    };
    for _ in 0..5 {
        let (status, v) = server.post_json("/v1/messages", &forced()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["stop_reason"], "tool_use", "{v}");
        let block = v["content"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "tool_use")
            .unwrap()
            .clone();
        assert_eq!(block["name"], "get_weather");
        assert!(block["id"].as_str().unwrap().starts_with("toolu_"));
        let input = &block["input"];
        assert!(
            input["city"].as_str().is_some_and(|c| c.chars().count() <= 6),
            "{input}"
        );
        assert!(input["days"].as_i64().is_some_and(|d| (1..=14).contains(&d)), "{input}");
    }

    // The streamed forced call: a tool_use block whose input_json_delta pieces parse to an
    // object of the same shape, and stop_reason tool_use.
    let mut streamed = forced();
    streamed["stream"] = json!(true);
    let text = server.post("/v1/messages", &streamed).await.text().await.unwrap();
    let evs = events(&text);
    let start = evs.iter().find(|(n, _)| n == "content_block_start").unwrap();
    assert_eq!(start.1["content_block"]["type"], "tool_use", "{text}");
    let partial: String = evs
        .iter()
        .filter(|(n, d)| n == "content_block_delta" && d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_string())
        .collect();
    let input: Value = serde_json::from_str(&partial).unwrap_or_else(|e| panic!("{partial:?}: {e}"));
    assert!(input["days"].is_i64(), "{input}");
    let delta = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");

    // A conversation carrying a tool use and its result (and earlier thinking) renders.
    let conversation = json!([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Call the tool.", "signature": ""},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "days": 2}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}, {"type": "text", "text": "Thanks"}]}
    ]);
    let ok = body(
        json!({"messages": conversation, "tools": [weather_tool()], "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    );
    let (status, v) = server.post_json("/v1/messages", &ok).await;
    assert_eq!(status, 200, "{v}");

    let mut unknown = conversation.clone();
    unknown[2]["content"][0]["tool_use_id"] = json!("toolu_9");
    let cases = [
        (
            body(json!({"messages": unknown, "tools": [weather_tool()]})),
            "messages.2.content.0.tool_use_id",
        ),
        (
            body(json!({"tools": [weather_tool()], "tool_choice": {"type": "tool", "name": "nope"}})),
            "tool_choice",
        ),
        (
            body(json!({"tools": [{"name": "f", "input_schema": {"type": "objekt"}}]})),
            "tools.0.input_schema.type",
        ),
        (body(json!({"thinking": {"type": "sometimes"}})), "thinking.type"),
        (body(json!({"tool_choice": {"type": "any"}})), "tool_choice"),
    ];
    for (b, field) in cases {
        let (status, v) = server.post_json("/v1/messages", &b).await;
        assert_eq!(status, 400, "{b}: {v}");
        assert_eq!(v["type"], "error");
        assert!(v["error"]["message"].as_str().unwrap().contains(field), "{field}: {v}");
    }
}
