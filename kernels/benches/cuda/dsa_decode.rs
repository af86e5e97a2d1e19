//! DeepSeek Sparse Attention decode against dense MLA decode on the GPU, with CUDA events:
//! DeepSeek-V3.2's shapes (128 heads, latent 576, value 512; indexer 64 heads x 128,
//! index_topk 2048), bf16, 1 and 16 sequences at 8k, 32k and 128k tokens of context.
//! Dense: `paged_mla_decode` over every position. Sparse: `dsa_indexer_topk` (scores every
//! position, keeps 2048) then `sparse_mla_decode` over them, timed together and apart.
//! Needs a GPU: `cargo bench -p moe-kernels --features cuda --bench cuda dsa_decode`.

use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::cuda::{dsa_indexer_topk, paged_mla_decode, sparse_mla_decode, MlaDecodeParams};

use crate::timing::time_ms;

pub fn run() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let (heads, d, dv, ih, id, topk, block) = (128usize, 576usize, 512usize, 64usize, 128usize, 2048usize, 64usize);
    println!("seqs context  dense us  indexer us  sparse attn us  sparse total us  sparse/dense");
    for &(s, ctx) in &[
        (1usize, 8192usize),
        (1, 32768),
        (1, 131072),
        (16, 8192),
        (16, 32768),
        (16, 131072),
    ] {
        let blocks = ctx.div_ceil(block);
        let nb = s * blocks;
        let cache = Tensor::randn(0f32, 1.0, (nb, block, d), &dev)?.to_dtype(DType::BF16)?;
        let keys = Tensor::randn(0f32, 1.0, (nb, block, id), &dev)?.to_dtype(DType::BF16)?;
        let q = Tensor::randn(0f32, 1.0, (s, heads, d), &dev)?.to_dtype(DType::BF16)?;
        let qi = Tensor::randn(0f32, 1.0, (s, ih, id), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 1.0, (s, ih), &dev)?;
        let table: Vec<u32> = (0..nb as u32).rev().collect();
        let bt = Tensor::from_vec(table, (s, blocks), &dev)?;
        let cl = Tensor::from_vec(vec![ctx as u32; s], s, &dev)?;
        let dense_p = MlaDecodeParams {
            value_dim: dv,
            scale: 0.07,
            max_context_len: ctx,
            num_splits: None,
        };
        let sparse_p = MlaDecodeParams {
            max_context_len: topk,
            ..dense_p.clone()
        };
        let scale = (id as f64).powf(-0.5);
        let dense = time_ms(&dev, 20, || paged_mla_decode(&q, &cache, &bt, &cl, &dense_p))?;
        let index = time_ms(&dev, 20, || {
            dsa_indexer_topk(&qi, &w, &keys, &bt, &cl, ctx, topk, scale)
        })?;
        let (sel, lens) = dsa_indexer_topk(&qi, &w, &keys, &bt, &cl, ctx, topk, scale)?;
        let attn = time_ms(&dev, 20, || sparse_mla_decode(&q, &cache, &bt, &sel, &lens, &sparse_p))?;
        let total = time_ms(&dev, 20, || {
            let (sel, lens) = dsa_indexer_topk(&qi, &w, &keys, &bt, &cl, ctx, topk, scale)?;
            sparse_mla_decode(&q, &cache, &bt, &sel, &lens, &sparse_p)
        })?;
        println!(
            "{s:4} {ctx:7} {:9.1} {:11.1} {:15.1} {:16.1} {:13.3}",
            dense * 1e3,
            index * 1e3,
            attn * 1e3,
            total * 1e3,
            total / dense
        );
    }
    Ok(())
}
