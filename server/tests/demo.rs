//! The trained demo model (`models/demo`) through the user-facing commands: the README's
//! `moe generate` prints the sum, and `moe serve` answers chat requests (OpenAI and
//! Anthropic shapes, many at once) with the answers transformers gave through the same chat
//! template.

mod common;

use std::path::Path;

use common::*;
use moe_tests::demo_model;
use serde_json::{json, Value};

fn heldout(n: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(demo_model().join("heldout.jsonl")).expect("heldout.jsonl");
    text.lines().take(n).map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn the_readme_command_prints_the_sum() {
    let dir = demo_model();
    let out = run_moe(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "12345+67890="]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "80235");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_chat_requests_like_transformers() {
    let mut server = Server::start_model(&demo_model(), &["--served-model-name", "demo"]);
    let body = json!({
        "model": "demo", "temperature": 0, "max_tokens": 11,
        "messages": [{"role": "user", "content": "12345+67890="}],
    });
    let v = server.ok("/v1/chat/completions", &body).await;
    assert_eq!(v["choices"][0]["message"]["content"], "80235", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // The template renders "<|user|>12345+67890=<|assistant|>": 14 tokens, one a character.
    assert_eq!(v["usage"]["prompt_tokens"], 14, "{v}");

    // 40 held-out problems at once: each answer is transformers' answer to the same chat.
    let problems = heldout(40);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, p) in problems.iter().enumerate() {
        let body = json!({
            "model": "demo", "temperature": 0, "max_tokens": 11,
            "messages": [{"role": "user", "content": p["prompt"]}],
        });
        let request = server.client.post(server.url("/v1/chat/completions")).json(&body);
        tasks.spawn(async move { (i, request.send().await.unwrap().json::<Value>().await.unwrap()) });
    }
    for (i, v) in tasks.join_all().await {
        let p = &problems[i];
        assert_eq!(
            v["choices"][0]["message"]["content"], p["transformers_chat"],
            "{}: {v}",
            p["prompt"]
        );
    }

    // Anthropic's Messages API takes the same chat.
    let body = json!({
        "model": "demo", "max_tokens": 11, "temperature": 0,
        "messages": [{"role": "user", "content": "rev:engine="}],
    });
    let v = server.ok("/v1/messages", &body).await;
    assert_eq!(v["content"][0]["text"], "enigne", "{v}");
    assert_eq!(v["stop_reason"], "end_turn");
    let status = server.terminate(std::time::Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}; {}", server.logs());
}

/// `moe generate` on the demo over a prompts file, expert loads written to `stats`; its stdout.
fn generate_with_routing_stats(prompts: &Path, stats: &Path, extra: &[&str]) -> String {
    let dir = demo_model();
    let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--no-prefix-caching"];
    args.extend([
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--routing-stats",
        stats.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    let out = run_moe(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn routing_stats_show_the_trained_balance() {
    let problems = heldout(200);
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = problems
        .iter()
        .map(|p| json!({"prompt": p["prompt"]}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let stats = dir.path().join("routing.json");
    let stdout = generate_with_routing_stats(&prompts, &stats, &["--json"]);
    let outputs: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // Every token the model computed: the prompt, then each generated token but the last (the
    // default cache holds all 200 at once, so nothing is preempted and computed twice).
    let prompt_tokens: usize = problems
        .iter()
        .map(|p| p["prompt"].as_str().unwrap().chars().count())
        .sum();
    let fed_back: usize = outputs
        .iter()
        .map(|o| o["token_ids"].as_array().unwrap().len() - 1)
        .sum();
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(
        layers.iter().map(|l| l["layer"].as_u64().unwrap()).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for l in layers {
        let counts: Vec<u64> = l["tokens_per_expert"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(
            counts.iter().sum::<u64>() as usize,
            2 * (prompt_tokens + fed_back),
            "top-2 of every token: {l}"
        );
        assert!(counts.iter().all(|&c| c > 0), "an idle expert: {l}");
    }
    eprintln!("demo routing on 200 held-out problems: {report}");

    // The trained correction bias is what balances the load: the same run without it
    // (`--router noaux_tc:bias=false`) spreads tokens less evenly.
    let unbiased = dir.path().join("unbiased.json");
    generate_with_routing_stats(&prompts, &unbiased, &["--router", "noaux_tc:bias=false"]);
    let without: Value = serde_json::from_str(&std::fs::read_to_string(&unbiased).unwrap()).unwrap();
    let (with_bias, without_bias) = (
        report["mean_imbalance"].as_f64().unwrap(),
        without["mean_imbalance"].as_f64().unwrap(),
    );
    assert!(
        with_bias < without_bias,
        "mean imbalance {with_bias} with the trained bias, {without_bias} without"
    );
}
