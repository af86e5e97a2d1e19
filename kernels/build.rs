//! With the `cuda` feature: compiles every `cuda/*.cu` to PTX with nvcc into `OUT_DIR`, where
//! `src/cuda/mod.rs` embeds it. Without the feature it does nothing, so CPU builds and CI need
//! no CUDA toolkit.
//!
//! nvcc is `$CUDA_HOME/bin/nvcc` (or `$CUDA_PATH`), else `nvcc` on PATH. The PTX targets
//! `compute_80` by default (runs on A100 and newer through the driver's JIT);
//! `CUDA_COMPUTE_CAP=90` (for example) targets that architecture instead.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src_dir = Path::new("cuda");
    let nvcc = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .map(|home| home.join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_start_matches("sm_").replace('.', ""))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "80".to_string());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(src_dir)
        .expect("kernels/cuda")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    for src in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=sm_{cap}"))
            .args(["-O3", "-std=c++17", "-lineinfo"])
            .arg("-I")
            .arg(src_dir)
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} failed ({e}); install a CUDA toolkit or \
                     `eval \"$(scripts/cuda-toolkit.sh)\"`",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on {}", src.display());
        }
    }
}
