//! The `moe` binary end to end on the committed fixtures: logits and greedy output equal the
//! transformers goldens, text in/out through the real tokenizer, `inspect`, a Hub repo id
//! served from an offline hub cache, and clean failures (message naming the culprit,
//! non-zero exit, no panic) for broken configs and checkpoints.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::run_moe;
use moe_tests::{copy_fixture, fixture, rewrite_safetensors};

fn moe(args: &[&str]) -> Output {
    run_moe(args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Prompts, per-prompt flattened logits and greedy continuations.
type Goldens = (Vec<Vec<u32>>, Vec<Vec<f32>>, Vec<Vec<u32>>);

/// Golden prompts, all-position logits (flattened) and greedy continuations of a fixture.
fn golden(dir: &Path) -> Goldens {
    let g = moe_tests::golden(dir);
    let logits = g
        .logits
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (g.prompts, logits, g.greedy)
}

/// The `token_ids` array of a `--json` output line.
fn token_ids(v: &serde_json::Value) -> Vec<u32> {
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Asserts a failed run: non-zero exit, no panic, and stderr mentioning every `needle`.
fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

#[test]
fn logits_command_matches_transformers() {
    for m in ["deepseek-v2-lite", "deepseek-v3-hubconfig"] {
        let dir = fixture(m);
        let (prompts, logits, _) = golden(&dir);
        let o = moe(&[
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg(&prompts[2]),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let rows = v["logits"].as_array().unwrap();
        assert_eq!(rows.len(), prompts[2].len());
        let got: Vec<f32> = rows
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect();
        assert_eq!(got.len(), logits[2].len());
        let max = got
            .iter()
            .zip(&logits[2])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Same tolerance and reasoning as tests/golden.rs.
        assert!(max < 1e-4, "{m}: max |diff| {max}");
    }
}

#[test]
fn generate_json_reproduces_the_greedy_golden() {
    let dir = fixture("deepseek-v2");
    let (prompts, _, greedy) = golden(&dir);
    let o = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids_arg(&prompts[3]),
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ids = token_ids(&v);
    assert_eq!(ids, greedy[3]);
    assert_eq!(v["finish_reason"], "length");
    // The fixture has a tokenizer, so the text is its decoding.
    assert!(v["text"].is_string());
}

#[test]
fn generate_from_text_with_the_real_tokenizer() {
    let dir = fixture("deepseek-v3");
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Héllo wörld, 你好 🙂",
        "--max-tokens",
        "6",
        "--json",
    ];
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let n = v["token_ids"].as_array().unwrap().len();
    assert!((1..=6).contains(&n));
    // Greedy and deterministic: same text twice.
    assert_eq!(stdout(&moe(&args)), stdout(&o));
    // Seeded sampling is reproducible, and differs from another seed over 16 tokens.
    let sample = |seed: &str| {
        stdout(&moe(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]))
    };
    assert_eq!(sample("11"), sample("11"));
    assert_ne!(sample("11"), sample("12"));
}

/// `moe logits --model DIR --prompt-ids IDS FLAG VALUE`.
fn logits_with(dir: &Path, ids: &str, flag: &str, value: &str) -> Output {
    moe(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        ids,
        flag,
        value,
    ])
}

#[test]
fn expert_backend_reference_matches_grouped_on_the_cpu_and_bad_values_fail() {
    let dir = fixture("deepseek-v3");
    let (prompts, _, _) = golden(&dir);
    let logits = |backend: &str| {
        let o = logits_with(&dir, &ids_arg(&prompts[2]), "--expert-backend", backend);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    // On the CPU both name the same path: the JSON is byte-identical.
    assert_eq!(logits("grouped"), logits("reference"));
    let o = logits_with(&dir, "1", "--expert-backend", "fast");
    assert_clean_failure(&o, &["--expert-backend", "grouped", "reference"]);
}

#[test]
fn router_override_changes_the_output_and_bad_specs_fail() {
    let dir = fixture("deepseek-v3");
    let (prompts, logits, _) = golden(&dir);
    let run = |router: &str| {
        let o = logits_with(&dir, &ids_arg(&prompts[2]), "--router", router);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect::<Vec<f32>>()
    };
    let diff = |got: &[f32]| {
        got.iter()
            .zip(&logits[2])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    // Naming the checkpoint's own router changes nothing.
    assert!(diff(&run("noaux_tc")) < 1e-4);
    // Other strategies do.
    assert!(diff(&run("greedy:top_k=2,scoring=softmax")) > 1e-2);
    assert!(diff(&run("noaux_tc:bias=false")) > 1e-2);
    assert_clean_failure(&logits_with(&dir, "1", "--router", "fancy"), &["fancy", "greedy"]);
    assert_clean_failure(&logits_with(&dir, "1", "--router", "greedy:top_k=99"), &["top_k"]);
}

#[test]
fn inspect_reports_sizes_and_routing() {
    let o = moe(&["inspect", "--model", fixture("deepseek-v3").to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["architecture"], "DeepseekV3ForCausalLM");
    // 3 layers x (32 + 8) latent values x 4 bytes.
    assert_eq!(v["kv_bytes_per_token"], 480);
    let total = v["sizes"]["total_params"].as_u64().unwrap();
    // Count the checkpoint's tensors directly: every parameter but the layer-3 MTP extras.
    let bytes = std::fs::read(fixture("deepseek-v3").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let counted: u64 = st
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
        .sum();
    // The correction bias is a buffer in transformers but is counted here as a parameter too.
    assert_eq!(total, counted);
    // Active = total minus the 5 unchosen of 8 experts in each of the 2 MoE layers.
    let expert = 3 * 64 * 32;
    assert_eq!(
        v["sizes"]["active_params_per_token"].as_u64().unwrap(),
        total - 2 * 5 * expert
    );
    assert!(v["router"].as_str().unwrap().starts_with("noaux_tc"));
}

#[test]
fn inspect_counts_every_family_exactly_and_sizes_its_cache_by_its_spec() {
    // (fixture, KV bytes a token in f32: MLA 3 layers x 40 latent values; GQA 3 (Mixtral and
    // MiniMax: 2) layers x 2 kv heads x (16 + 16)).
    for (name, kv_bytes) in [
        ("kimi-k25", 480),
        ("glm4-moe-lite", 480),
        ("glm4-moe", 768),
        ("minimax-m2", 512),
        ("qwen3-moe", 768),
        ("mixtral", 512),
        // head_dim 24: 3 layers x 2 kv heads x (24 + 24) x 4 bytes.
        ("qwen3-moe-yarn", 1152),
        ("glm4-moe-qknorm", 1152),
        // DSA: + 16 indexer-key values in each layer with an indexer (GLM-5's layer 1 shares).
        ("deepseek-v32", 3 * (40 + 16) * 4),
        ("glm5", (3 * 40 + 2 * 16) * 4),
    ] {
        let dir = fixture(name);
        let o = moe(&["inspect", "--model", dir.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["kv_bytes_per_token"], kv_bytes, "{name}");
        let layers = v["layers"].as_u64().unwrap();
        // Every tensor of the checkpoint but the stray ones the model never reads (GLM's MTP
        // layer, Kimi's vision tower) is a parameter inspect must count.
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let stray = |n: &str| {
            n.starts_with(&format!("model.layers.{layers}."))
                || n.starts_with("vision_tower.")
                || n.starts_with("mm_projector.")
        };
        let counted: u64 = st
            .tensors()
            .iter()
            .filter(|(n, _)| !stray(n))
            .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
            .sum();
        assert_eq!(v["sizes"]["total_params"].as_u64().unwrap(), counted, "{name}");
    }
}

#[test]
fn quantized_checkpoints_are_described_run_and_checked_against_their_config() {
    // Inspect names the format and the resident bytes; generate runs the packed weights.
    let dir = fixture("kimi-k25-int4");
    let o = moe(&["inspect", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["quantization"].as_str().unwrap().starts_with("int4"), "{v}");
    assert_eq!(v["weights"]["format"], "int4");
    assert!(v["weights"]["quantized_params"].as_u64().unwrap() > 0);
    for name in ["kimi-k25-int4", "deepseek-v3-fp8"] {
        let o = moe(&[
            "generate",
            "--model",
            fixture(name).to_str().unwrap(),
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "3",
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
    }
    // A config that says the experts are INT4 over plain f32 weights: one line naming the
    // packed tensor it expected, exit 1.
    let tmp = copy_fixture("qwen3-moe");
    edit_config(tmp.path(), |c| {
        c.insert(
            "quantization_config".into(),
            serde_json::json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"g": {"targets": ["re:.*experts.*"],
                    "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": true}}}}),
        );
    });
    let o = moe(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]);
    assert_clean_failure(&o, &["weight_packed", "targets/ignore"]);
    let o = moe(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--quantization",
        "fp8",
        "--prompt-ids",
        "1",
    ]);
    assert_clean_failure(&o, &["--quantization", "synthetic"]);
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_config_field_and_unknown_architecture_fail_cleanly() {
    let tmp = copy_fixture("deepseek-v2-lite");
    edit_config(tmp.path(), |c| {
        c.remove("kv_lora_rank");
    });
    let o = moe(&["logits", "--model", tmp.path().to_str().unwrap(), "--prompt-ids", "1,2"]);
    assert_clean_failure(&o, &["kv_lora_rank", "missing"]);

    let tmp = copy_fixture("deepseek-v2-lite");
    edit_config(tmp.path(), |c| {
        c.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
    });
    let o = moe(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]);
    assert_clean_failure(&o, &["LlamaForCausalLM", "DeepseekV3ForCausalLM"]);

    let tmp = copy_fixture("deepseek-v2-lite");
    edit_config(tmp.path(), |c| {
        c.insert("n_routed_experts".into(), serde_json::json!(1_000_000_000_000u64));
    });
    let o = moe(&["inspect", "--model", tmp.path().to_str().unwrap()]);
    assert_clean_failure(&o, &["n_routed_experts"]);
}

#[test]
fn truncated_safetensors_fails_cleanly() {
    let tmp = copy_fixture("deepseek-v3");
    let p = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    let o = moe(&["logits", "--model", tmp.path().to_str().unwrap(), "--prompt-ids", "1,2"]);
    assert_clean_failure(&o, &["model.safetensors", "truncated"]);
}

/// Rewrites `model.safetensors` with `name` replaced by a zero f32 tensor of `shape` (or removed).
fn rewrite_tensor(dir: &Path, name: &str, shape: Option<&[usize]>) {
    rewrite_safetensors(dir, |n, t| {
        if n != name {
            return Some(t);
        }
        let shape = shape?;
        let numel: usize = shape.iter().product();
        Some((safetensors::Dtype::F32, shape.to_vec(), vec![0u8; numel * 4]))
    });
}

#[test]
fn misshaped_and_missing_tensors_fail_naming_the_tensor() {
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    let tmp = copy_fixture("deepseek-v2-lite");
    rewrite_tensor(tmp.path(), name, Some(&[128, 31]));
    let o = moe(&["logits", "--model", tmp.path().to_str().unwrap(), "--prompt-ids", "1,2"]);
    assert_clean_failure(&o, &[name, "[128, 31]", "[128, 32]"]);

    let tmp = copy_fixture("deepseek-v2-lite");
    rewrite_tensor(tmp.path(), "model.layers.2.mlp.experts.7.down_proj.weight", None);
    let o = moe(&["logits", "--model", tmp.path().to_str().unwrap(), "--prompt-ids", "1,2"]);
    assert_clean_failure(&o, &["model.layers.2.mlp.experts.7.down_proj.weight", "missing"]);
}

#[test]
fn bad_prompts_fail_cleanly() {
    let dir = fixture("deepseek-v2-lite");
    let d = dir.to_str().unwrap();
    assert_clean_failure(
        &moe(&["logits", "--model", d, "--prompt-ids", "1,99999"]),
        &["99999", "vocabulary"],
    );
    assert_clean_failure(&moe(&["logits", "--model", d, "--prompt-ids", "1,x"]), &["\"x\""]);
    assert_clean_failure(
        &moe(&["logits", "--model", "/nonexistent/model", "--prompt-ids", "1"]),
        &["/nonexistent/model"],
    );
    assert_clean_failure(
        &moe(&["logits", "--model", d, "--prompt-ids", "1", "--dtype", "f8"]),
        &["dtype", "f8"],
    );
    assert_clean_failure(
        &moe(&["generate", "--model", d, "--prompt-ids", "1", "--max-tokens", "1000"]),
        &["maximum model length", "1000"],
    );
}

#[test]
fn hub_repo_ids_resolve_from_an_offline_hub_cache() {
    // hf-hub's cache layout: $HF_HOME/hub/models--org--name/{refs/main, snapshots/<commit>/...}.
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--moe-engine--tiny-deepseek-v3");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for e in std::fs::read_dir(fixture("deepseek-v3-sharded")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    let (prompts, _, greedy) = golden(&fixture("deepseek-v3-sharded"));
    let o = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args([
            "generate",
            "--model",
            "moe-engine/tiny-deepseek-v3",
            "--prompt-ids",
            &ids_arg(&prompts[1]),
        ])
        .args(["--max-tokens", "12", "--ignore-eos", "--json"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ids = token_ids(&v);
    assert_eq!(ids, greedy[1]);

    // A repo that is not in the cache fails with a message naming it, without a network.
    let o = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["inspect", "--model", "moe-engine/not-there"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_clean_failure(&o, &["moe-engine/not-there", "HF_HUB_OFFLINE"]);
}

#[test]
fn prompts_file_runs_requests_together_and_prints_them_in_order() {
    let dir = fixture("deepseek-v3");
    let (prompts, _, greedy) = golden(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompts.jsonl");
    let mut lines = String::new();
    for p in &prompts {
        lines += &format!("{}\n", serde_json::json!({ "prompt_ids": p, "max_tokens": 12 }));
    }
    lines += &format!(
        "{}\n",
        serde_json::json!({ "prompt": "Hello there", "max_tokens": 3, "stop": ["zzz"] })
    );
    lines += &format!(
        "{}\n",
        serde_json::json!({ "prompt_ids": [5, 6], "temperature": 0.7, "seed": 3, "max_tokens": 5 })
    );
    std::fs::write(&file, lines).unwrap();
    let o = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompts-file",
        file.to_str().unwrap(),
        "--ignore-eos",
        "--json",
        "--max-num-batched-tokens",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6);
    for (i, g) in greedy.iter().enumerate() {
        assert_eq!(&token_ids(&rows[i]), g, "line {}", i + 1);
        assert_eq!(rows[i]["finish_reason"], "length");
    }
    assert_eq!(rows[4]["token_ids"].as_array().unwrap().len(), 3);
    assert!(rows[4]["text"].is_string());
    assert_eq!(rows[5]["token_ids"].as_array().unwrap().len(), 5);

    // A bad line is reported with its number.
    std::fs::write(&file, "{\"prompt_ids\": [5]}\n{\"prompt\": 7}\n").unwrap();
    let o = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompts-file",
        file.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["line 2"]);
    std::fs::write(&file, "{\"prompt_ids\": [5], \"temprature\": 1}\n").unwrap();
    let o = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompts-file",
        file.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["line 1", "temprature"]);
}

/// Asserts the documented failure of a hostile checkpoint: exit status 1 and exactly one line
/// on stderr, mentioning every `needle` (the file or field at fault).
fn assert_one_line_failure(o: &Output, needles: &[&str]) {
    assert_clean_failure(o, needles);
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err}");
}

#[test]
fn absurd_config_sizes_fail_in_one_line_naming_the_field() {
    let cases = [
        ("n_routed_experts", serde_json::json!(1_000_000_000_000u64)),
        ("hidden_size", serde_json::json!(1u64 << 40)),
        ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
        ("vocab_size", serde_json::json!(0)),
        ("max_position_embeddings", serde_json::json!(0)),
    ];
    for (key, value) in cases {
        let tmp = copy_fixture("deepseek-v3");
        edit_config(tmp.path(), |c| {
            c.insert(key.into(), value.clone());
        });
        let d = tmp.path().to_str().unwrap();
        assert_one_line_failure(&moe(&["inspect", "--model", d]), &[key, "config.json"]);
        assert_one_line_failure(
            &moe(&["generate", "--model", d, "--prompt-ids", "1,2", "--max-tokens", "2"]),
            &[key],
        );
    }
}

#[test]
fn hostile_safetensors_fail_in_one_line_naming_the_file() {
    // (description, bytes of model.safetensors, what the message must say)
    let raw = |header: &str, data_len: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data_len));
        b
    };
    let mut huge_prefix = u64::MAX.to_le_bytes().to_vec();
    huge_prefix.extend_from_slice(b"{}");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty file", vec![], "truncated"),
        (
            "u64::MAX header length",
            huge_prefix,
            "header claims 18446744073709551615 bytes",
        ),
        (
            "offsets past the end",
            raw(
                r#"{"model.norm.weight":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}"#,
                100,
            ),
            "model.norm.weight",
        ),
        (
            "element count overflows",
            raw(
                r#"{"model.norm.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,256]}}"#,
                256,
            ),
            "overflows",
        ),
        (
            "shape disagrees with its bytes",
            raw(
                r#"{"model.norm.weight":{"dtype":"F32","shape":[65],"data_offsets":[0,256]}}"#,
                256,
            ),
            "needs 260 bytes",
        ),
        (
            "unknown dtype",
            raw(
                r#"{"model.norm.weight":{"dtype":"F4","shape":[64],"data_offsets":[0,32]}}"#,
                32,
            ),
            "F4",
        ),
    ];
    for (what, bytes, needle) in cases {
        let tmp = copy_fixture("deepseek-v2-lite");
        std::fs::write(tmp.path().join("model.safetensors"), &bytes).unwrap();
        let d = tmp.path().to_str().unwrap();
        eprintln!("case: {what}");
        let o = moe(&["generate", "--model", d, "--prompt-ids", "1,2", "--max-tokens", "2"]);
        assert_one_line_failure(&o, &["model.safetensors", needle]);
    }
    // A weight stored as integers loads no further than the tensor that has them.
    let tmp = copy_fixture("deepseek-v2-lite");
    rewrite_safetensors(tmp.path(), |n, t| {
        if n == "model.norm.weight" {
            Some((safetensors::Dtype::I32, vec![64], vec![0u8; 256]))
        } else {
            Some(t)
        }
    });
    let d = tmp.path().to_str().unwrap();
    let o = moe(&["generate", "--model", d, "--prompt-ids", "1,2", "--max-tokens", "2"]);
    assert_one_line_failure(&o, &["model.norm.weight", "I32"]);
}
