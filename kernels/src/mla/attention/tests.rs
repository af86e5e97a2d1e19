//! Paged attention against a plain triple loop over a dense copy of each sequence's latents,
//! on awkward shapes: one token, many heads, contexts that end mid-block, shuffled block ids,
//! a chunk of queries after a cached prefix, and an empty sequence.

use candle_core::{Device, Tensor};

use super::*;
use crate::mla::write_latent_cache;

use crate::test_values::values;

/// Dense reference: for each query row, softmax over keys at positions <= its own.
fn reference(
    q: &[f32],
    heads: usize,
    dim: usize,
    value_dim: usize,
    latents: &[Vec<f32>],
    seq: &PagedSeq,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; seq.query_len * heads * value_dim];
    let offset = seq.context_len - seq.query_len;
    for i in 0..seq.query_len {
        for h in 0..heads {
            let qrow = &q[((seq.query_start + i) * heads + h) * dim..][..dim];
            let visible = offset + i + 1;
            let scores: Vec<f32> = (0..visible)
                .map(|j| qrow.iter().zip(&latents[j]).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = exps.iter().sum();
            for (j, e) in exps.iter().enumerate() {
                for d in 0..value_dim {
                    out[(i * heads + h) * value_dim + d] += e / total * latents[j][d];
                }
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_dense_reference_on_awkward_shapes() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (num_blocks, block_size, value_dim, rope) = (32usize, 4usize, 12usize, 4usize);
    let dim = value_dim + rope;
    // (query_len, context_len, heads) per sequence; heads is shared, so run per head count.
    for heads in [1usize, 3, 7] {
        // The last is a prompt chunk after a cached prefix, long enough for the GEMM path.
        let plans = [(1usize, 1usize), (1, 20), (5, 5), (3, 14), (0, 0), (9, 17), (21, 30)];
        let cache = Tensor::zeros((num_blocks, block_size, dim), candle_core::DType::F32, &dev)?;
        // Hand out blocks in a scrambled order so tables are not contiguous.
        let mut free: Vec<u32> = (0..num_blocks as u32).map(|b| (b * 7) % num_blocks as u32).collect();
        let mut seqs = Vec::new();
        let mut all_latents = Vec::new();
        let mut start = 0;
        for (n, &(qlen, ctx)) in plans.iter().enumerate() {
            let blocks: Vec<u32> = free.drain(..ctx.div_ceil(block_size)).collect();
            let seq = PagedSeq {
                query_start: start,
                query_len: qlen,
                context_len: ctx,
                block_table: blocks,
            };
            let latents: Vec<Vec<f32>> = (0..ctx).map(|p| values(dim, (n * 100 + p) as u32)).collect();
            let slots: Vec<u32> = (0..ctx).map(|p| seq.slot(p, block_size) as u32).collect();
            if ctx > 0 {
                let flat: Vec<f32> = latents.concat();
                write_latent_cache(
                    &cache,
                    &Tensor::from_vec(flat, (ctx, dim), &dev)?,
                    &Tensor::from_vec(slots, ctx, &dev)?,
                )?;
            }
            start += qlen;
            seqs.push(seq);
            all_latents.push(latents);
        }
        let q_host = values(start * heads * dim, 99 + heads as u32);
        let q = Tensor::from_vec(q_host.clone(), (start, heads, dim), &dev)?;
        let scale = 0.37f32;
        // The CPU kernel (what `paged_mla_attention` runs here) and the candle-ops reference.
        for got in [
            paged_mla_attention(&q, &cache, &PagedBatch::from(seqs.to_vec()), value_dim, scale as f64)?,
            reference_paged_mla_attention(&q, &cache, &seqs, value_dim, scale as f64)?,
        ] {
            assert_eq!(got.dims(), &[start, heads, value_dim]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            for (seq, latents) in seqs.iter().zip(&all_latents) {
                if seq.query_len == 0 {
                    continue;
                }
                let want = reference(&q_host, heads, dim, value_dim, latents, seq, scale);
                let got_rows = &got[seq.query_start * heads * value_dim..][..want.len()];
                // f32 dot products of length <= 16 and sums of <= 20 terms: 1e-5 absolute covers
                // reordering error with a wide margin while catching any masking or slot mix-up.
                for (a, b) in got_rows.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "heads {heads} seq {seq:?}: {a} vs {b}");
                }
            }
        }
    }
    Ok(())
}

/// DeepSeek's widths (576-wide keys, 512-wide values, 16 heads, 16-token blocks) in f32 and
/// bf16 caches: the CPU kernel agrees with the candle reference on decode tokens, on a
/// prefill chunk longer than one job, and on long chunks that take the GEMM path (one after a
/// cached prefix, cut into several jobs), and a sequence's rows are the same bits alone or
/// batched.
#[test]
fn cpu_kernel_matches_the_reference_at_real_widths_and_ignores_the_batch() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (heads, value_dim, dim, block_size, num_blocks) = (16usize, 512usize, 576usize, 16usize, 48usize);
    for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
        let rows = num_blocks * block_size;
        let latents = Tensor::from_vec(values(rows * dim, 7), (num_blocks, block_size, dim), &dev)?.to_dtype(dtype)?;
        // (query_len, context_len), blocks handed out back to front.
        let plans = [(1usize, 37usize), (11, 50), (1, 1), (20, 41), (1, 64), (40, 90)];
        let mut next = num_blocks;
        let mut start = 0;
        let seqs: Vec<PagedSeq> = plans
            .iter()
            .map(|&(query_len, context_len)| {
                let blocks = context_len.div_ceil(block_size);
                let table = (next - blocks..next).rev().map(|b| b as u32).collect();
                next -= blocks;
                let seq = PagedSeq {
                    query_start: start,
                    query_len,
                    context_len,
                    block_table: table,
                };
                start += query_len;
                seq
            })
            .collect();
        let q = Tensor::from_vec(values(start * heads * dim, 8), (start, heads, dim), &dev)?;
        let scale = 1.0 / (dim as f64).sqrt();
        let got = paged_mla_attention(&q, &latents, &PagedBatch::from(seqs.to_vec()), value_dim, scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = reference_paged_mla_attention(&q, &latents, &seqs, value_dim, scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (n, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{dtype:?} element {n}: {a} vs {b}"
            );
        }
        for seq in &seqs {
            let alone = PagedSeq {
                query_start: 0,
                ..seq.clone()
            };
            let q_seq = q.narrow(0, seq.query_start, seq.query_len)?;
            let one = paged_mla_attention(&q_seq, &latents, &PagedBatch::from([alone].to_vec()), value_dim, scale)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let width = heads * value_dim;
            assert_eq!(
                one,
                got[seq.query_start * width..][..seq.query_len * width],
                "{dtype:?} {seq:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn bad_arguments_are_errors_not_panics() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let cache = Tensor::zeros((2, 4, 8), candle_core::DType::F32, &dev)?;
    let q = Tensor::zeros((2, 1, 8), candle_core::DType::F32, &dev)?;
    let beyond = PagedSeq {
        query_start: 0,
        query_len: 2,
        context_len: 9,
        block_table: vec![0, 1],
    };
    assert!(paged_mla_attention(&q, &cache, &PagedBatch::from([beyond].to_vec()), 4, 1.0).is_err());
    let bad_block = PagedSeq {
        query_start: 0,
        query_len: 2,
        context_len: 2,
        block_table: vec![5],
    };
    assert!(paged_mla_attention(&q, &cache, &PagedBatch::from([bad_block].to_vec()), 4, 1.0).is_err());
    let latents = Tensor::zeros((1, 8), candle_core::DType::F32, &dev)?;
    let slot = Tensor::new(&[8u32], &dev)?;
    assert!(write_latent_cache(&cache, &latents, &slot).is_err());
    Ok(())
}
