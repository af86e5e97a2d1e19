//! The CPU projection `x · Wᵀ` (`moe_kernels::dense::matmul_nt`) against candle's own matmul,
//! at one DeepSeek-V2-Lite expert's gate+up shape (`[2816, 2048]`) and its lm_head's
//! (`[102400, 2048]`), for f32 and bf16 weights at batch rows 1 to 128.
//! `cargo bench -p moe-kernels --bench cpu_matmul`; prints a table (median ms and the
//! weight-read GB/s it implies). Timings vary with the machine: quote ratios of one run.
//! On a CPU with AMX the bf16 rows take its tiles; `MOE_CPU_AMX=0` times the AVX path there.
//! Then the routed experts of one DeepSeek-V2-Lite MoE layer (64 experts of `[2816, 2048]` +
//! `[2048, 1408]`, top-6) for 1 to 32 tokens, in GB/s of the active experts' weights.

mod cpu_timing;
use candle_core::{DType, Device, Result, Tensor};
use cpu_timing::median_ms;
use moe_kernels::dense::pages::prefer_huge_pages;
use moe_kernels::dense::{matmul_nt, Weight};
use moe_kernels::moe::{grouped_expert_mlp, permute_by_expert, ExpertWeights};

fn main() -> Result<()> {
    let dev = Device::Cpu;
    if std::env::args().any(|a| a == "cold") {
        return cold_weights(&dev);
    }
    let bf16_path = if moe_kernels::dense::amx::available() {
        "AMX tiles"
    } else {
        "AVX dot kernels and gemm"
    };
    println!("bf16 weights: {bf16_path}");
    println!("weight          dtype  rows  ours ms  GB/s  candle ms  candle/ours");
    for (name, n, k, reps) in [
        ("expert gate_up", 2816usize, 2048usize, 15usize),
        ("lm_head", 102400, 2048, 3),
    ] {
        let w32 = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        for dtype in [DType::F32, DType::BF16] {
            let w = w32.to_dtype(dtype)?;
            for m in [1usize, 4, 8, 12, 16, 24, 32, 64, 128, 256] {
                if name == "lm_head" && m > 32 {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
                let ours = median_ms(reps, || matmul_nt(&x, &w).map(|_| ()))?;
                // candle's bf16 CPU matmul widens the whole weight per call: skip the big ones.
                let candle = if dtype == DType::F32 || n * k <= 8 << 20 {
                    Some(median_ms(reps.min(5), || x.matmul(&w.t()?).map(|_| ()))?)
                } else {
                    None
                };
                let gbs = (n * k * dtype.size_in_bytes()) as f64 / (ours * 1e-3) / 1e9;
                let (c, r) = match candle {
                    Some(c) => (format!("{c:9.2}"), format!("{:.2}x", c / ours)),
                    None => ("        -".into(), "-".into()),
                };
                println!(
                    "{name:<15} {:<5} {m:>5}  {ours:7.2}  {gbs:4.1}  {c}  {r}",
                    format!("{dtype:?}")
                );
            }
        }
    }
    routed_experts(&dev)?;
    cold_weights(&dev)
}

/// One MoE layer's routed experts at decode-sized batches: each token picks 6 of 64
/// experts (a fixed spread), every active expert's weights are read once per call.
fn routed_experts(dev: &Device) -> Result<()> {
    let (experts, hidden, inter, top_k) = (64usize, 2048usize, 1408usize, 6usize);
    println!("routed experts  dtype  tokens  active  ms     GB/s");
    for dtype in [DType::F32, DType::BF16] {
        let gate_up = Weight::Dense(Tensor::randn(0f32, 0.02, (experts, 2 * inter, hidden), dev)?.to_dtype(dtype)?);
        let down = Weight::Dense(Tensor::randn(0f32, 0.02, (experts, hidden, inter), dev)?.to_dtype(dtype)?);
        for tokens in [1usize, 8, 32] {
            let ids: Vec<u32> = (0..tokens * top_k)
                .map(|s| ((s * 37 + s / top_k * 11) % experts) as u32)
                .collect();
            let perm = permute_by_expert(&ids, experts, 16);
            let active = perm.counts.iter().filter(|&&c| c > 0).count();
            let weights = vec![1.0 / top_k as f32; tokens * top_k];
            let x = Tensor::randn(0f32, 1.0, (tokens, hidden), dev)?.to_dtype(dtype)?;
            let w = ExpertWeights {
                gate_up: &gate_up,
                down: &down,
            };
            let ms = median_ms(7, || grouped_expert_mlp(&x, w, &perm, &weights, top_k).map(|_| ()))?;
            let bytes = active * 3 * inter * hidden * dtype.size_in_bytes();
            let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
            println!(
                "routed experts  {:<5}  {tokens:>6}  {active:>6}  {ms:6.2}  {gbs:5.1}",
                format!("{dtype:?}")
            );
        }
    }
    Ok(())
}

/// Products whose weight is not in any cache: for an expert's gate+up shape and the dense
/// MLP's down projection (`[2048, 10944]`, where the inner dimension outgrows L2), one product
/// on each of enough distinct weights to pass 0.9 GB (a 480 MiB L3 here), in turn, each in
/// huge pages as a loaded model's are (`MOE_CPU_HUGE_PAGES=0`: not).
fn cold_weights(dev: &Device) -> Result<()> {
    println!("cold weights    shape          dtype  rows  ms/product  GFLOP/s  GB/s");
    for (n, k) in [(2816usize, 2048usize), (2048, 10944)] {
        for dtype in [DType::F32, DType::BF16] {
            let copies = (900 << 20) / (n * k * dtype.size_in_bytes());
            let weights = (0..copies)
                .map(|_| Tensor::randn(0f32, 0.02, (n, k), dev)?.to_dtype(dtype))
                .collect::<Result<Vec<_>>>()?;
            // In 2 MiB pages where the OS allows, as the model's weights are after load.
            for w in &weights {
                prefer_huge_pages(&Weight::Dense(w.clone()));
            }
            for m in [1usize, 4, 8, 12, 16, 24, 32, 64, 128] {
                let x = Tensor::randn(0f32, 1.0, (m, k), dev)?.to_dtype(dtype)?;
                let pass = median_ms(3, || weights.iter().try_for_each(|w| matmul_nt(&x, w).map(|_| ())))?;
                let ms = pass / copies as f64;
                let gflops = (2 * m * n * k) as f64 / (ms * 1e-3) / 1e9;
                let gbs = (n * k * dtype.size_in_bytes()) as f64 / (ms * 1e-3) / 1e9;
                println!(
                    "cold weights    {:<13}  {:<5}  {m:>4}  {ms:10.2}  {gflops:7.1}  {gbs:4.1}",
                    format!("[{n}, {k}]"),
                    format!("{dtype:?}")
                );
            }
        }
    }
    Ok(())
}
