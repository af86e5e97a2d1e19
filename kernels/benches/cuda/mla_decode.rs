//! Times `paged_mla_decode` (bf16) with CUDA events and prints achieved cache bandwidth.
//! Needs a GPU: `cargo bench -p moe-kernels --features cuda --bench cuda mla_decode`
//! (or build with `--no-run` and run the binary on the GPU machine).
//! GB/s counts the latent rows read once (S * context * 576 * 2 bytes) plus q and the output;
//! H100 SXM copies at about 3.0 TB/s.

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::cuda::{decode_split_plan, paged_mla_decode, MlaDecodeParams};

use crate::timing::time_ms;

pub fn run() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let Device::Cuda(cuda) = &dev else { unreachable!() };
    let stream = cuda.cuda_stream();
    let sms = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(candle_core::Error::wrap)? as usize;
    let (d, dv, block_size) = (576usize, 512usize, 64usize);
    println!("seqs heads context splits(auto)  us/iter  GB/s");
    for &(s, heads, ctx) in &[
        (1usize, 16usize, 4096usize),
        (1, 128, 32768),
        (8, 16, 4096),
        (32, 16, 4096),
        (64, 128, 4096),
        (128, 16, 16384),
    ] {
        let blocks = ctx.div_ceil(block_size);
        let num_blocks = s * blocks;
        let cache = Tensor::randn(0f32, 1.0, (num_blocks, block_size, d), &dev)?.to_dtype(DType::BF16)?;
        let q = Tensor::randn(0f32, 1.0, (s, heads, d), &dev)?.to_dtype(DType::BF16)?;
        let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
        let bt = Tensor::from_vec(table, (s, blocks), &dev)?;
        let cl = Tensor::from_vec(vec![ctx as u32; s], s, &dev)?;
        let p = MlaDecodeParams {
            value_dim: dv,
            scale: 0.07,
            max_context_len: ctx,
            num_splits: None,
        };
        let ms = time_ms(&dev, 20, || paged_mla_decode(&q, &cache, &bt, &cl, &p))?;
        let bytes = (s * ctx * d * 2 + s * heads * (d + dv) * 2) as f64;
        println!(
            "{s:4} {heads:5} {ctx:7} {:>12} {:8.1} {:6.0}",
            decode_split_plan(s, heads, ctx, sms, None).0,
            ms * 1e3,
            bytes / (ms * 1e-3) / 1e9
        );
    }
    Ok(())
}
