//! `moe bench` (in process) and `moe bench serve` (against a spawned `moe serve`) on the tiny
//! DeepSeek-V3 fixture: every field of the moe-bench/1 JSON is present and sane, token counts
//! are exact, the plot is SVG, the expert load adds up, and bad flags fail in one line.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use serde_json::Value;

fn moe(args: &[&str]) -> Output {
    run_moe(args)
}

/// Runs `moe <args> --output-json <tmp>` and returns the report.
fn bench_json(args: &[&str], dir: &Path) -> Value {
    let json = dir.join("report.json");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--output-json", json.to_str().unwrap()]);
    let o = moe(&all);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "moe {all:?} failed:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("out tok/s"), "no table on stdout:\n{stdout}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn fixture_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap()).unwrap()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {v}"))
}

fn int(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a whole number: {v}"))
}

/// Top-level fields every report has.
fn check_header(report: &Value, tool: &str) {
    assert_eq!(report["schema"], "moe-bench/1");
    assert_eq!(report["tool"], tool);
    let started = report["started_at"].as_str().unwrap();
    assert!(
        started.len() >= 20 && started.ends_with('Z') && started.contains('T'),
        "{started}"
    );
    let device = &report["device"];
    assert!(["cpu", "cuda"].contains(&device["kind"].as_str().unwrap()), "{device}");
    assert!(device["name"].is_string());
    assert!(device.get("gpu_index").is_some());
    for key in ["name", "path", "dtype"] {
        assert!(report["model"].get(key).is_some(), "model.{key}");
    }
    assert!(report["model"]["name"].is_string());
    for key in [
        "kind",
        "input_len",
        "output_len",
        "num_prompts",
        "range_ratio",
        "sessions",
        "turns",
        "agent_prefix_len",
        "turn_input_len",
        "seed",
    ] {
        assert!(
            report["workload"].get(key).is_some(),
            "workload.{key}: {}",
            report["workload"]
        );
    }
    assert!(report.get("engine").is_some());
}

/// Fields and sanity of one run: all requests done, exact token counts, ordered percentiles.
fn check_run(run: &Value, requests: u64, input_tokens: u64, output_len: u64) {
    check_run_sampled(run, requests, input_tokens, output_len, true)
}

/// `kv_sampled_often`: the KV use was sampled often enough to see a short run's peak
/// (in process every 5 ms; `/metrics` is scraped every 25 ms and a run may be shorter).
fn check_run_sampled(run: &Value, requests: u64, input_tokens: u64, output_len: u64, kv_sampled_often: bool) {
    assert_eq!(int(run, "num_requests"), requests, "{run}");
    assert_eq!(int(run, "completed"), requests, "{run}");
    assert_eq!(int(run, "failed"), 0, "{run}");
    assert_eq!(int(run, "input_tokens"), input_tokens, "{run}");
    assert_eq!(int(run, "output_tokens"), requests * output_len, "{run}");
    assert_eq!(int(run, "expected_output_tokens"), requests * output_len, "{run}");
    assert_eq!(
        int(run, "usage_output_tokens"),
        requests * output_len,
        "client count vs usage: {run}"
    );
    assert_eq!(int(run, "token_count_mismatches"), 0);
    for key in [
        "duration_s",
        "requests_per_s",
        "input_tokens_per_s",
        "output_tokens_per_s",
        "total_tokens_per_s",
    ] {
        assert!(num(run, key) > 0.0, "{key}: {run}");
    }
    let total = num(run, "total_tokens_per_s");
    let parts = num(run, "input_tokens_per_s") + num(run, "output_tokens_per_s");
    assert!((total - parts).abs() <= 1e-6 * total);
    for key in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        let s = &run[key];
        let v: Vec<f64> = ["min", "p50", "p90", "p99", "max"].iter().map(|k| num(s, k)).collect();
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{key} not ordered: {s}");
        assert!(
            v[0] >= 0.0 && num(s, "mean") >= v[0] && num(s, "mean") <= v[4],
            "{key}: {s}"
        );
    }
    assert!(num(&run["e2e_ms"], "min") > 0.0);
    let steady = &run["steady_decode"];
    if !steady.is_null() {
        // A window inside the run, holding some of its output tokens, at the rate they imply.
        let (tokens, window) = (int(steady, "tokens"), num(steady, "window_s"));
        assert!(tokens >= 1 && tokens <= requests * output_len, "{run}");
        assert!(window > 0.0 && window <= num(run, "duration_s"), "{run}");
        assert!((num(steady, "tokens_per_s") - tokens as f64 / window).abs() < 1e-6 * tokens as f64 / window);
    }
    assert!(num(&run["ttft_ms"], "max") <= num(&run["e2e_ms"], "max"));
    let kv = num(run, "peak_kv_cache_usage");
    assert!((0.0..=1.0).contains(&kv), "{run}");
    if kv_sampled_often {
        assert!(kv > 0.0, "{run}");
    }
    assert_eq!(int(run, "preemptions"), 0);
    let pc = &run["prefix_cache"];
    assert!(int(pc, "hit_tokens") <= int(pc, "queried_tokens"), "{pc}");
    assert!((0.0..=1.0).contains(&num(pc, "hit_rate")));
    assert!(run["energy"].is_null(), "no GPU here: {run}");
    assert!(run.get("expert_load").is_some());
    let load = &run["load"];
    assert!(["all-at-once", "rate", "concurrency"].contains(&load["mode"].as_str().unwrap()));
    assert!(load.get("concurrency").is_some() && load.get("request_rate").is_some());
}

/// Per MoE layer, the counts sum to (tokens computed) * top_k.
fn check_expert_load(run: &Value) {
    let cfg = fixture_config();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap();
    let dense = cfg["first_k_dense_replace"].as_u64().unwrap();
    let experts = cfg["n_routed_experts"].as_u64().unwrap() as usize;
    let top_k = cfg["num_experts_per_tok"].as_u64().unwrap();
    // Every prompt token not found in the prefix cache and every output token but the last
    // of each request passes through the model once (no preemptions here).
    let computed = int(run, "input_tokens") - int(&run["prefix_cache"], "hit_tokens") + int(run, "output_tokens")
        - int(run, "completed");
    let load = &run["expert_load"];
    let entries = load["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no expert load: {run}"));
    assert_eq!(entries.len() as u64, layers - dense, "one entry per MoE layer: {load}");
    let mut worst: f64 = 0.0;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(int(e, "layer"), dense + i as u64);
        let counts: Vec<u64> = e["tokens_per_expert"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(counts.len(), experts);
        assert_eq!(counts.iter().sum::<u64>(), computed * top_k, "layer {i}: {e}");
        let imbalance = num(e, "imbalance");
        let mean = (computed * top_k) as f64 / experts as f64;
        let want = *counts.iter().max().unwrap() as f64 / mean;
        assert!((imbalance - want).abs() < 1e-9, "{e}");
        worst = worst.max(imbalance);
    }
    assert!((num(load, "max_imbalance") - worst).abs() < 1e-9);
    assert!(num(load, "mean_imbalance") >= 1.0 && num(load, "mean_imbalance") <= worst);
}

/// Prompt tokens of an agent workload: turn t (from 1) resends prefix + t new inputs + t-1 replies.
fn agent_input_tokens(sessions: u64, turns: u64, prefix: u64, turn_input: u64, output: u64) -> u64 {
    sessions
        * (1..=turns)
            .map(|t| prefix + t * turn_input + (t - 1) * output)
            .sum::<u64>()
}

const FIXED: [&str; 10] = [
    "--input-len",
    "16",
    "--output-len",
    "8",
    "--num-prompts",
    "6",
    "--seed",
    "3",
    "--concurrency",
    "1,4",
];

const AGENT: [&str; 12] = [
    "--workload",
    "agent",
    "--sessions",
    "2",
    "--turns",
    "3",
    "--agent-prefix-len",
    "24",
    "--turn-input-len",
    "6",
    "--output-len",
    "8",
];

#[test]
fn in_process_bench_reports_every_figure() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir();
    let svg = tmp.path().join("plot.svg");
    let mut args = vec!["bench", "--model", model.to_str().unwrap()];
    args.extend(FIXED);
    args.extend(["--plot", svg.to_str().unwrap()]);
    let report = bench_json(&args, tmp.path());
    check_header(&report, "moe bench");
    assert_eq!(report["device"]["kind"], "cpu");
    assert_eq!(report["model"]["dtype"], "f32");
    assert_eq!(report["workload"]["kind"], "fixed");
    assert_eq!(report["workload"]["input_len"], 16);
    assert_eq!(report["workload"]["num_prompts"], 6);
    assert!(report["workload"]["sessions"].is_null());
    assert_eq!(report["engine"]["block_size"], 16);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, c) in runs.iter().zip([1, 4]) {
        assert_eq!(run["load"]["mode"], "concurrency");
        assert_eq!(run["load"]["concurrency"], c);
        check_run(run, 6, 6 * 16, 8);
        check_expert_load(run);
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    let head = svg.trim_start();
    assert!(head.starts_with("<svg") || head.starts_with("<?xml"), "{}", &svg[..80]);
    assert!(svg.trim_end().ends_with("</svg>"));

    // Agent sessions: every turn resends the history, so prompts grow turn by turn.
    let mut args = vec!["bench", "--model", model.to_str().unwrap()];
    args.extend(AGENT);
    let report = bench_json(&args, tmp.path());
    check_header(&report, "moe bench");
    assert_eq!(report["workload"]["kind"], "agent");
    assert_eq!(report["workload"]["sessions"], 2);
    assert!(report["workload"]["input_len"].is_null());
    let run = &report["runs"][0];
    assert_eq!(run["load"]["mode"], "all-at-once");
    check_run(run, 6, agent_input_tokens(2, 3, 24, 6, 8), 8);
    assert_eq!(int(run, "stand_in_replies"), 0, "in process the real replies are known");
    check_expert_load(run);
}

#[test]
fn generate_writes_routing_stats() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("routing.json");
    let model = model_dir();
    let o = moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "11,12,13,14,15",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--routing-stats",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // 5 prompt tokens + 5 fed-back outputs (the 6th is never computed), no prefix cache.
    let run = serde_json::json!({
        "input_tokens": 5, "output_tokens": 6, "completed": 1,
        "prefix_cache": {"hit_tokens": 0}, "expert_load": stats,
    });
    check_expert_load(&run);
}

#[test]
fn bench_serve_against_moe_serve_counts_tokens_exactly() {
    let server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let vocab = fixture_config()["vocab_size"].as_u64().unwrap().to_string();
    let common = [
        "bench",
        "serve",
        "--url",
        &server.base,
        "--model",
        NAME,
        "--vocab-size",
        &vocab,
    ];
    let mut args = common.to_vec();
    args.extend(FIXED);
    let report = bench_json(&args, tmp.path());
    check_header(&report, "moe bench serve");
    assert_eq!(report["server"]["url"], server.base.as_str());
    assert_eq!(report["server"]["models"]["data"][0]["id"], NAME);
    assert!(report["engine"].is_null());
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        check_run_sampled(run, 6, 6 * 16, 8, false);
        assert!(run["expert_load"].is_null());
    }

    let mut args = common.to_vec();
    args.extend(AGENT);
    args.extend(["--request-rate", "50"]);
    let report = bench_json(&args, tmp.path());
    let run = &report["runs"][0];
    assert_eq!(run["load"]["mode"], "rate");
    assert_eq!(run["load"]["request_rate"], 50.0);
    check_run_sampled(run, 6, agent_input_tokens(2, 3, 24, 6, 8), 8, false);
    assert_eq!(int(run, "stand_in_replies"), 0, "moe serve returns the token ids");
}

#[test]
fn bad_flags_fail_in_one_line() {
    let model = model_dir();
    let m = model.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["bench", "--model", m, "--concurrency", "0"], "--concurrency"),
        (&["bench", "--model", m, "--request-rate", "-1"], "--request-rate"),
        (&["bench", "--model", m, "--num-prompts", "0"], "--num-prompts"),
        (&["bench", "--model", m, "--input-len", "300"], "--max-model-len"),
        (
            &[
                "bench",
                "serve",
                "--url",
                "http://127.0.0.1:9",
                "--model",
                "x",
                "--num-prompts",
                "1",
            ],
            "--url",
        ),
    ];
    for (args, flag) in cases {
        let o = moe(args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(flag),
            "{args:?}: {stderr}"
        );
    }
}
