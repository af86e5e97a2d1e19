//! The GPU bundle's runner (`scripts/gpu-run.sh`, `.gpu/run.sh` in the bundle) on the CPU:
//! phases 2 and 3 with `MOE_GPU_DEVICE=cpu` run every command they run on a GPU, with the
//! same flags but tiny shapes (this `moe` binary, the committed bf16 fixture as the
//! checkpoint, transformers on it when torch is installed, else its argument check), so a GPU
//! lease is never lost to an argument error, and phase 3's summary holds phase 2's figures;
//! without a driver the runner stops with the reason and the commands each phase would run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn run(phase: &str, out: &Path, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg("scripts/gpu-run.sh")
        .arg(phase)
        .current_dir(repo_root())
        .env("OUT", out)
        .env("MOE_GPU_RESULTS", out.join("results"))
        .env("MOE_BIN", env!("CARGO_BIN_EXE_moe"))
        .env("MOE_GPU_WORK", out.join("work"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("bash runs")
}

fn torch_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn summary_of(out: &Path) -> String {
    std::fs::read_to_string(out.join("summary.txt")).unwrap_or_default()
}

#[test]
fn phases_two_and_three_run_every_command_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (two, three) = (dir.path().join("two"), dir.path().join("three"));
    for (phase, out) in [("2", &two), ("3", &three)] {
        std::fs::create_dir_all(out).unwrap();
        let o = run(
            phase,
            out,
            &[
                ("MOE_GPU_DEVICE", "cpu"),
                ("MOE_GPU_RESULTS", dir.path().to_str().unwrap()),
            ],
        );
        let summary = summary_of(out);
        assert!(
            o.status.success(),
            "phase {phase}: {summary}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!summary.contains("FAILED"), "phase {phase}: {summary}");
    }
    let summary = summary_of(&two);
    for step in [
        "memory sizing",
        "checkpoint arguments",
        "moe bench, grouped experts, concurrency 1",
        "moe bench, grouped experts, concurrency 2",
        "moe bench, reference experts, concurrency 1",
        "summary",
    ] {
        assert!(
            summary.contains(&format!("== {step}")),
            "{step} did not run:\n{summary}"
        );
    }
    assert!(std::fs::read_to_string(two.join("checkpoint.log"))
        .unwrap()
        .contains("arguments ok"));
    let summary = summary_of(&three);
    for step in ["checkpoint arguments", "transformers baseline", "summary"] {
        assert!(
            summary.contains(&format!("== {step}")),
            "{step} did not run:\n{summary}"
        );
    }
    // Phase 3's summary holds phase 2's runs: one row per engine and concurrency.
    let table: Value = serde_json::from_str(&std::fs::read_to_string(three.join("summary.json")).unwrap()).unwrap();
    let rows = table["rows"].as_array().unwrap();
    let row = |engine: &str, c: u64| {
        rows.iter()
            .find(|r| r["engine"] == engine && r["concurrency"] == c)
            .unwrap_or_else(|| panic!("no {engine} row at {c}: {table}"))
    };
    for (engine, c) in [("moe grouped", 1), ("moe grouped", 2), ("moe reference", 1)] {
        let r = row(engine, c);
        assert_eq!(r["completed"], 4, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        // A CPU run has no NVML: no energy, not zero.
        assert!(r["output_tokens_per_joule"].is_null(), "{r}");
    }
    if torch_installed() {
        assert_eq!(row("transformers", 2)["completed"], 2);
        assert!(row("moe grouped", 2)["vs_transformers"].as_f64().unwrap() > 0.0);
    } else {
        assert!(std::fs::read_to_string(three.join("hf.log"))
            .unwrap()
            .contains("arguments ok"));
    }
}

#[test]
fn without_a_driver_the_runner_stops_and_lists_what_it_would_run() {
    if Command::new("nvidia-smi").output().is_ok_and(|o| o.status.success()) {
        return; // a machine with a GPU: the runner would run, not stop
    }
    let dir = tempfile::tempdir().unwrap();
    let o = run("all", dir.path(), &[]);
    assert_eq!(o.status.code(), Some(2));
    let summary = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
    assert!(summary.contains("no usable NVIDIA driver or GPU"), "{summary}");
    for planned in [
        "would run [checkpoint: synthetic deepseek-v2-lite, 27 layers, bf16 (transformers)]",
        "would run [moe bench, grouped experts, concurrency 256]",
        "--input-len 512 --output-len 128",
        "would run [transformers baseline, concurrency 1,16,64]",
        "would run [kernel times, batch 64 decode (nsys)]",
        "would run [summary]",
    ] {
        assert!(summary.contains(planned), "{planned} not listed:\n{summary}");
    }
    assert!(!summary.contains("== "), "nothing runs without a driver:\n{summary}");
}
