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
