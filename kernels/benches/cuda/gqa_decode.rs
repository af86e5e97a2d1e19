//! Times `paged_gqa_decode` (bf16) with CUDA events at the Qwen3-30B-A3B attention shape (32
//! query heads over 4 kv heads, head dim 128, block size 16) and prints the achieved bandwidth.
//! Needs a GPU: `cargo bench -p moe-kernels --features cuda --bench cuda gqa_decode`
//! (or build with `--no-run` and run the binary on the GPU machine).
//! GB/s counts the K and V bytes read (S * context * kv_heads * 128 * 2 bytes each; q and the
//! output add < 0.1% at context 1k); the H200 copies at about 4.3 TB/s.

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::cuda::{gqa_decode_split_plan, paged_gqa_decode, GqaDecodeParams};

use crate::timing::time_ms;

pub fn run() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let Device::Cuda(cuda) = &dev else { unreachable!() };
    let sms = cuda
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(candle_core::Error::wrap)? as usize;
    let (heads, kv_heads, d, block_size) = (32usize, 4usize, 128usize, 16usize);
    println!("paged_gqa_decode bf16, {heads} q heads / {kv_heads} kv heads, head dim {d}, block {block_size}");
    println!("seqs context splits(auto)  us/iter   GB/s (K+V read)");
    for &ctx in &[1024usize, 8192] {
        for &s in &[1usize, 16, 64, 256] {
            let blocks = ctx.div_ceil(block_size);
            let num_blocks = s * blocks;
            let shape = (num_blocks, block_size, kv_heads, d);
            let k = Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(DType::BF16)?;
            let v = Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(DType::BF16)?;
            let q = Tensor::randn(0f32, 1.0, (s, heads, d), &dev)?.to_dtype(DType::BF16)?;
            // Each sequence's blocks in reverse pool order (tables are not contiguous runs).
            let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
            let bt = Tensor::from_vec(table, (s, blocks), &dev)?;
            let cl = Tensor::from_vec(vec![ctx as u32; s], s, &dev)?;
            let p = GqaDecodeParams {
                scale: 1.0 / (d as f64).sqrt(),
                max_context_len: ctx,
                num_splits: None,
            };
            let ms = time_ms(&dev, 20, || paged_gqa_decode(&q, &k, &v, &bt, &cl, &p))?;
            let bytes = (2 * s * ctx * kv_heads * d * 2) as f64;
            println!(
                "{s:4} {ctx:7} {:>12} {:9.1} {:8.0}",
                gqa_decode_split_plan(s, heads, kv_heads, d, ctx, sms, None).0,
                ms * 1e3,
                bytes / (ms * 1e-3) / 1e9
            );
        }
    }
    Ok(())
}
