//! The parallel flags end to end: `moe generate` and `moe serve` split over CPU ranks
//! (`--tensor-parallel-size`, `--enable-expert-parallel`, `--expert-parallel-size`) give the
//! transformers greedy tokens, and layouts a model cannot take fail in one clean message
//! naming the flag and the config field.

mod common;

use common::*;
use moe_tests::fixture;
use serde_json::json;

fn generate_ids(dir: &std::path::Path, prompt: &[u32], layout: &[&str]) -> Vec<u32> {
    let ids = ids_arg(prompt);
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids,
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(layout);
    let o = run_moe(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{layout:?}: {err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn generate_split_over_ranks_gives_the_greedy_golden() {
    for (m, layout) in [
        ("deepseek-v3", &["--tensor-parallel-size", "4"][..]),
        ("deepseek-v3", &["-t", "2", "--enable-expert-parallel"][..]),
        (
            "qwen3-moe",
            &["--tensor-parallel-size", "4", "--expert-parallel-size", "2"][..],
        ),
        (
            "kimi-k25-int4",
            &["--tensor-parallel-size", "4", "--enable-expert-parallel"][..],
        ),
    ] {
        let dir = fixture(m);
        let (prompts, greedy) = golden(&dir);
        assert_eq!(generate_ids(&dir, &prompts[3], layout), greedy[3], "{m} {layout:?}");
    }
}

#[test]
fn layouts_a_model_cannot_take_fail_naming_the_flag_and_field() {
    let dir = fixture("deepseek-v3");
    let cases: [(&[&str], &[&str]); 3] = [
        // 4 heads do not split over 3 ranks.
        (
            &["--tensor-parallel-size", "3"],
            &["--tensor-parallel-size", "num_attention_heads = 4"],
        ),
        // 3 expert groups do not divide 4 ranks.
        (
            &["--tensor-parallel-size", "4", "--expert-parallel-size", "3"],
            &["--expert-parallel-size", "divide"],
        ),
        (
            &[
                "--tensor-parallel-size",
                "4",
                "--enable-expert-parallel",
                "--expert-parallel-size",
                "2",
            ],
            &["--enable-expert-parallel", "--expert-parallel-size 4"],
        ),
    ];
    for (flags, needles) in cases {
        let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "5,6,7"];
        args.extend_from_slice(flags);
        let o = run_moe(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flags:?} should fail");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{flags:?}: stderr should mention {n:?}: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_split_over_ranks_answers_like_one_rank() {
    let dir = model_dir();
    let (prompts, greedy) = golden(&dir);
    let server = Server::start(&["--tensor-parallel-size", "4", "--expert-parallel-size", "2"]);
    for (prompt, want) in prompts.iter().zip(&greedy) {
        // One rank's CLI output (its tokens are transformers').
        let (ids, text) = cli_generate(prompt, 12);
        assert_eq!(&ids, want);
        let body = json!({
            "model": NAME, "prompt": prompt, "temperature": 0, "max_tokens": 12, "ignore_eos": true,
        });
        let v = server.ok("/v1/completions", &body).await;
        assert_eq!(v["choices"][0]["text"], text.as_str());
    }
    assert!(server.logs().contains("TP 4, EP 2"), "{}", server.logs());
}

/// A JSON array of counts.
fn u64s(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// `moe generate --routing-stats` on the V3 fixture with `layout`: the stats JSON.
fn routing_stats(layout: &[&str]) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("routing.json");
    let dir = model_dir();
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "11,12,13,14,15,16,17",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--routing-stats",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(layout);
    let o = run_moe(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn routing_stats_under_expert_parallelism_add_up_per_rank() {
    let one = routing_stats(&[]);
    assert!(one["expert_parallel"].is_null());
    let split = routing_stats(&["--tensor-parallel-size", "4", "--enable-expert-parallel"]);
    // Every rank routes every token alike: the per-expert counts are one rank's.
    assert_eq!(split["layers"], one["layers"]);
    let ep = &split["expert_parallel"];
    assert_eq!(ep["groups"], 4);
    for (layer, groups) in one["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(ep["layers"].as_array().unwrap())
    {
        let (experts, per_group) = (u64s(&layer["tokens_per_expert"]), u64s(&groups["tokens_per_group"]));
        // 8 experts over 4 ranks: rank r computed the tokens of experts 2r and 2r + 1.
        let want: Vec<u64> = experts.chunks(2).map(|c| c.iter().sum()).collect();
        assert_eq!(per_group, want, "layer {}", layer["layer"]);
        let max = *want.iter().max().unwrap() as f64;
        let mean = want.iter().sum::<u64>() as f64 / 4.0;
        assert!((groups["imbalance"].as_f64().unwrap() - max / mean).abs() < 1e-9);
    }
}

#[test]
fn bench_reports_the_load_of_each_expert_parallel_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("report.json");
    let dir = model_dir();
    let o = run_moe(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--tensor-parallel-size",
        "2",
        "--enable-expert-parallel",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--num-prompts",
        "4",
        "--concurrency",
        "4",
        "--output-json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("expert-parallel load over 2 groups"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["engine"]["tensor_parallel_size"], 2);
    assert_eq!(report["engine"]["expert_parallel_size"], 2);
    let load = &report["runs"][0]["expert_load"];
    let ep = &load["expert_parallel"];
    assert_eq!(ep["groups"], 2);
    // Each layer's groups add up to its experts' tokens.
    for (experts, groups) in load["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(ep["layers"].as_array().unwrap())
    {
        let total = |v: &serde_json::Value| u64s(v).iter().sum::<u64>();
        assert_eq!(total(&experts["tokens_per_expert"]), total(&groups["tokens_per_group"]));
        assert!(groups["imbalance"].as_f64().unwrap() >= 1.0);
    }
}

#[test]
fn cpu_ranks_share_the_kv_cache_budget() {
    // CPU ranks share the host's memory: --kv-cache-memory is the total, split over them.
    let dir = fixture("qwen3-moe");
    let o = run_moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "2",
        "--tensor-parallel-size",
        "4",
        "--kv-cache-memory",
        "8MiB",
        "-v",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // 2 MiB a rank; a rank keeps 1 of the 2 kv heads: 3 layers x (16 + 16) x 4 bytes a token.
    let per_token = 3 * 32 * 4;
    let blocks = (2 << 20) / (per_token * 16);
    let mib = (blocks * 16 * per_token) >> 20;
    assert!(
        err.contains(&format!(
            "KV cache: {blocks} blocks of 16 tokens, {} tokens ({mib} MiB a rank, on each of 4 ranks",
            blocks * 16
        )),
        "{err}"
    );
}
