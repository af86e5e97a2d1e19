//! The CPU projection `x · Wᵀ` (`moe_kernels::dense::matmul_nt`) against candle's own matmul,
//! at one DeepSeek-V2-Lite expert's gate+up shape (`[2816, 2048]`) and its lm_head's
//! (`[102400, 2048]`), for f32 and bf16 weights at batch rows 1 to 128.
//! `cargo bench -p moe-kernels --bench cpu_matmul`; prints a table (median ms and the
//! weight-read GB/s it implies). Timings vary with the machine: quote ratios of one run.
//! On a CPU with AMX the bf16 rows take its tiles; `MOE_CPU_AMX=0` times the AVX path there.

mod cpu_timing;
use candle_core::{DType, Device, Result, Tensor};
use cpu_timing::median_ms;
use moe_kernels::dense::matmul_nt;

fn main() -> Result<()> {
    let dev = Device::Cpu;
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
            for m in [1usize, 4, 8, 16, 32, 128] {
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
    Ok(())
}
