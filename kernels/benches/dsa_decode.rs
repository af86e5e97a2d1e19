//! DeepSeek Sparse Attention decode against dense MLA decode, on whatever device the
//! references run (the CPU here): one query token at DeepSeek-V3.2's shapes (128 heads,
//! latent 512 + 64, indexer 64 heads x 128, index_topk 2048) over 8k, 32k and 128k tokens of
//! paged context. Dense: `paged_mla_attention` over every position. Sparse: `indexer_topk`
//! (scores every position, keeps 2048) then `sparse_mla_attention` over the kept ones.
//! `cargo bench -p moe-kernels --bench dsa_decode`; prints one line per context and a JSON
//! line per row. Timings are medians of a few runs and vary with the machine: quote the
//! sparse / dense ratio of one run, never the absolute times of a shared machine.

mod cpu_timing;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use cpu_timing::median_ms;
use moe_kernels::{indexer_topk, paged_mla_attention, sparse_mla_attention, PagedBatch, PagedSeq};

const HEADS: usize = 128;
const LATENT: usize = 576;
const VALUE: usize = 512;
const INDEX_HEADS: usize = 64;
const INDEX_DIM: usize = 128;
const TOPK: usize = 2048;
const BLOCK: usize = 64;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let scale = (192f64).powf(-0.5);
    println!("context  dense ms  sparse ms (indexer + attention)  sparse/dense");
    for ctx in [8192usize, 32768, 131072] {
        let blocks = ctx.div_ceil(BLOCK);
        let latents = Tensor::randn(0f32, 1.0, (blocks, BLOCK, LATENT), &dev)?;
        let keys = Tensor::randn(0f32, 1.0, (blocks, BLOCK, INDEX_DIM), &dev)?;
        let q = Tensor::randn(0f32, 1.0, (1, HEADS, LATENT), &dev)?;
        let qi = Tensor::randn(0f32, 1.0, (1, INDEX_HEADS, INDEX_DIM), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (1, INDEX_HEADS), &dev)?.to_dtype(DType::F32)?;
        let seqs = PagedBatch::new(vec![PagedSeq {
            query_start: 0,
            query_len: 1,
            context_len: ctx,
            block_table: (0..blocks as u32).rev().collect(),
        }]);
        let reps = if ctx > 65536 { 3 } else { 5 };
        let dense = median_ms(reps, || {
            paged_mla_attention(&q, &latents, &seqs, VALUE, scale).map(|_| ())
        })?;
        let mut index_ms = 0.0;
        let sparse = median_ms(reps, || {
            let t = Instant::now();
            let sel = indexer_topk(&qi, &w, &keys, &seqs, TOPK, (INDEX_DIM as f64).powf(-0.5))?;
            index_ms = t.elapsed().as_secs_f64() * 1e3;
            sparse_mla_attention(&q, &latents, &seqs, &sel, VALUE, scale).map(|_| ())
        })?;
        println!(
            "{ctx:>7}  {dense:>8.2}  {sparse:>9.2} ({index_ms:.2} + {:.2})  {:>12.3}",
            sparse - index_ms,
            sparse / dense
        );
        println!(
            "{{\"context\":{ctx},\"dense_ms\":{dense:.3},\"sparse_ms\":{sparse:.3},\"indexer_ms\":{index_ms:.3},\"ratio\":{:.4}}}",
            sparse / dense
        );
    }
    Ok(())
}
