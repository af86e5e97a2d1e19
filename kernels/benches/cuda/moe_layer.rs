//! One DeepSeek-V2-Lite MoE layer's routed experts (64 experts, top-6, hidden 2048, expert
//! width 1408, bf16) at 1, 16, 64, 256 and 1024 tokens: the grouped path (`moe_experts`:
//! permute + gate/up-SiLU + down + combine, no host round trip) against a loop of per-expert
//! cuBLAS GEMMs through candle (host-side grouping done before timing; per active expert a
//! gather, the gate/up GEMM, SiLU-and-multiply, the down GEMM, the weighting and an
//! index-add). Both run on the same GPU in one process; times from CUDA events.
//!
//! Needs a GPU: `cargo bench -p moe-kernels --features cuda --bench cuda moe_layer` (or build
//! with `--no-run` and run the binary on the GPU machine). TFLOP/s counts 6 * slots * H * I;
//! GB/s counts the active experts' weights read once plus the activations each path moves.
//! H100 SXM: ~3.0 TB/s measured copy, ~800 TFLOP/s bf16 dense.

use candle_core::{DType, Device, Result, Tensor, D};
use moe_kernels::cuda::moe_experts;

use crate::timing::time_ms;

const EXPERTS: usize = 64;
const TOP_K: usize = 6;
const HIDDEN: usize = 2048;
const INTER: usize = 1408;

/// xorshift64* for the routing.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

pub fn run() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let gate_up = (Tensor::randn(0f32, 1.0, (EXPERTS, 2 * INTER, HIDDEN), &dev)? * 0.02)?.to_dtype(DType::BF16)?;
    let down = (Tensor::randn(0f32, 1.0, (EXPERTS, HIDDEN, INTER), &dev)? * 0.02)?.to_dtype(DType::BF16)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    println!("tokens experts | grouped us  TFLOP/s  GB/s | per-expert loop us  TFLOP/s  GB/s | speed-up");
    for tokens in [1usize, 16, 64, 256, 1024] {
        // Uniform routing: top_k distinct experts per token.
        let mut ids = Vec::with_capacity(tokens * TOP_K);
        for _ in 0..tokens {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < TOP_K {
                let e = rng.below(EXPERTS) as u32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            ids.extend(chosen);
        }
        let weights: Vec<f32> = (0..tokens * TOP_K).map(|s| 0.1 + (s % 7) as f32 * 0.05).collect();
        let x = Tensor::randn(0f32, 1.0, (tokens, HIDDEN), &dev)?.to_dtype(DType::BF16)?;
        let ids_g = Tensor::from_vec(ids.clone(), (tokens, TOP_K), &dev)?;
        let w_g = Tensor::from_vec(weights.clone(), (tokens, TOP_K), &dev)?;

        // The loop's host-side grouping, outside the timed region.
        let mut groups: Vec<(usize, Tensor, Tensor)> = Vec::new();
        for e in 0..EXPERTS {
            let slots: Vec<usize> = (0..ids.len()).filter(|&s| ids[s] as usize == e).collect();
            if slots.is_empty() {
                continue;
            }
            let n = slots.len();
            let toks: Vec<u32> = slots.iter().map(|&s| (s / TOP_K) as u32).collect();
            let wts: Vec<f32> = slots.iter().map(|&s| weights[s]).collect();
            groups.push((
                e,
                Tensor::from_vec(toks, n, &dev)?,
                Tensor::from_vec(wts, (n, 1), &dev)?.to_dtype(DType::BF16)?,
            ));
        }
        let active = groups.len();
        let iters = if tokens >= 256 { 20 } else { 50 };
        let grouped = time_ms(&dev, iters, || moe_experts(&x, &gate_up, &down, &ids_g, &w_g, None))?;
        let looped = time_ms(&dev, iters, || {
            let mut out = Tensor::zeros((tokens, HIDDEN), DType::BF16, &dev)?;
            for (e, idx, wt) in &groups {
                let xs = x.index_select(idx, 0)?;
                let gu = xs.matmul(&gate_up.get(*e)?.t()?)?;
                let h = (gu.narrow(D::Minus1, 0, INTER)?.silu()? * gu.narrow(D::Minus1, INTER, INTER)?)?;
                let y = h.matmul(&down.get(*e)?.t()?)?.broadcast_mul(wt)?;
                out = out.index_add(idx, &y, 0)?;
            }
            Ok(out)
        })?;
        let slots = (tokens * TOP_K) as f64;
        let flops = 6.0 * slots * (HIDDEN * INTER) as f64;
        let weight_bytes = (active * 3 * HIDDEN * INTER * 2) as f64;
        // Grouped: x read per slot, h written and read, f32 slot outputs written and read, out.
        let grouped_bytes =
            weight_bytes + slots * (HIDDEN * 2 + INTER * 4 + HIDDEN * 8) as f64 + (tokens * HIDDEN * 2) as f64;
        // Loop: gathered x, gate/up output, h, y and the index-add, all bf16.
        let loop_bytes =
            weight_bytes + slots * (HIDDEN * 4 + INTER * 2 * 3 + HIDDEN * 4) as f64 + (tokens * HIDDEN * 4) as f64;
        let rate = |ms: f64, bytes: f64| (flops / (ms * 1e-3) / 1e12, bytes / (ms * 1e-3) / 1e9);
        let (gt, gb) = rate(grouped, grouped_bytes);
        let (lt, lb) = rate(looped, loop_bytes);
        println!(
            "{tokens:6} {active:7} | {:10.1} {gt:8.1} {gb:5.0} | {:18.1} {lt:8.1} {lb:5.0} | {:7.2}x",
            grouped * 1e3,
            looped * 1e3,
            looped / grouped
        );
    }
    Ok(())
}
