//! GPU tests of DeepSeek Sparse Attention (feature `cuda`, need a CUDA device): the indexer's
//! scoring + top-k (`dsa_indexer_topk`) and sparse MLA decode (`sparse_mla_decode`) against
//! their references (`indexer_topk`, `sparse_mla_attention`) on pseudo-random paged caches:
//! contexts below, at and far above `index_topk`, scrambled block tables, bf16 and f32.
//!
//! Tolerances: the selection must be identical in f32; in bf16 the kernel and the reference
//! read the same rounded keys but sum in another order, so a score within rounding of the
//! k-th may swap: at most 0.5% of the selected positions may differ. Sparse decode: abs
//! error <= 2e-2 + 1e-2 * |ref| on the bf16 output (f32: 1e-4), as the dense decode test.
use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::cuda::{dsa_indexer_topk, sparse_mla_decode, MlaDecodeParams};
use moe_kernels::{indexer_topk, sparse_mla_attention, PagedSeq};

use crate::common::{gpu, host, Rng};

struct Paged {
    seqs: Vec<PagedSeq>,
    table: Tensor,
    lens: Tensor,
}

/// One decode row per sequence of the given contexts, blocks handed out shuffled.
fn paged(contexts: &[usize], block_size: usize, rng: &mut Rng, dev: &Device) -> Result<(Paged, usize)> {
    let max_blocks = contexts.iter().map(|c| c.div_ceil(block_size)).max().unwrap();
    let num_blocks = contexts.iter().map(|c| c.div_ceil(block_size)).sum::<usize>() + 1;
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut free);
    let mut rows = Vec::new();
    let mut seqs = Vec::new();
    for (i, &ctx) in contexts.iter().enumerate() {
        let mut t: Vec<u32> = free.drain(..ctx.div_ceil(block_size)).collect();
        seqs.push(PagedSeq {
            query_start: i,
            query_len: 1,
            context_len: ctx,
            block_table: t.clone(),
        });
        t.resize(max_blocks, 0);
        rows.extend(t);
    }
    let table = Tensor::from_vec(rows, (contexts.len(), max_blocks), dev)?;
    let lens = Tensor::from_vec(
        contexts.iter().map(|&c| c as u32).collect::<Vec<_>>(),
        contexts.len(),
        dev,
    )?;
    Ok((Paged { seqs, table, lens }, num_blocks))
}

fn rows_of(selected: &[f32], lens: &[f32], width: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(s, &n)| {
            selected[s * width..s * width + n as usize]
                .iter()
                .map(|&p| p as u32)
                .collect()
        })
        .collect()
}

#[test]
fn indexer_topk_matches_reference() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(17);
    let contexts = [1usize, 100, 2048, 2049, 5000, 40000];
    let (topk, block_size) = (2048usize, 64usize);
    for (dtype, heads, dim) in [
        (DType::F32, 64usize, 128usize),
        (DType::BF16, 64, 128),
        (DType::F32, 8, 32),
    ] {
        let (p, num_blocks) = paged(&contexts, block_size, &mut rng, &dev)?;
        let s = contexts.len();
        let keys = Tensor::from_vec(
            rng.vec(num_blocks * block_size * dim, 1.0),
            (num_blocks, block_size, dim),
            &Device::Cpu,
        )?
        .to_dtype(dtype)?;
        let q = Tensor::from_vec(rng.vec(s * heads * dim, 1.0), (s, heads, dim), &Device::Cpu)?.to_dtype(dtype)?;
        let w = Tensor::from_vec(rng.vec(s * heads, 1.0), (s, heads), &Device::Cpu)?;
        let scale = (dim as f64).powf(-0.5);
        let want = indexer_topk(&q, &w, &keys, &p.seqs, topk, scale)?;
        let max_ctx = *contexts.iter().max().unwrap();
        let (sel, lens) = dsa_indexer_topk(
            &q.to_device(&dev)?,
            &w.to_device(&dev)?,
            &keys.to_device(&dev)?,
            &p.table,
            &p.lens,
            max_ctx,
            topk,
            scale,
        )?;
        let got = rows_of(&host(&sel), &host(&lens), topk);
        for (i, g) in got.iter().enumerate() {
            let w = want.of(i);
            assert_eq!(g.len(), w.len(), "{dtype:?} seq {i}: count");
            assert!(g.windows(2).all(|x| x[0] < x[1]), "{dtype:?} seq {i}: not ascending");
            let differ = g.iter().filter(|x| w.binary_search(x).is_err()).count();
            let allowed = if dtype == DType::F32 { 0 } else { w.len() / 200 };
            assert!(
                differ <= allowed,
                "{dtype:?} heads {heads} seq {i} (ctx {}): {differ} positions differ",
                contexts[i]
            );
        }
    }
    Ok(())
}

#[test]
fn sparse_decode_matches_reference() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(5);
    let contexts = [1usize, 300, 2048, 9000];
    let (topk, block_size, d, dv, heads) = (2048usize, 64usize, 576usize, 512usize, 16usize);
    for dtype in [DType::BF16, DType::F32] {
        let (p, num_blocks) = paged(&contexts, block_size, &mut rng, &dev)?;
        let s = contexts.len();
        let cache = Tensor::from_vec(
            rng.vec(num_blocks * block_size * d, 1.0),
            (num_blocks, block_size, d),
            &Device::Cpu,
        )?
        .to_dtype(dtype)?;
        let q = Tensor::from_vec(rng.vec(s * heads * d, 1.0), (s, heads, d), &Device::Cpu)?.to_dtype(dtype)?;
        // A selection no score would make: every other position, capped at topk, unsorted.
        let mut rows = vec![0u32; s * topk];
        let mut counts = Vec::new();
        let mut per_seq = Vec::new();
        for (i, &ctx) in contexts.iter().enumerate() {
            let mut sel: Vec<u32> = (0..ctx as u32).step_by(2).take(topk).collect();
            rng.shuffle(&mut sel);
            rows[i * topk..i * topk + sel.len()].copy_from_slice(&sel);
            counts.push(sel.len() as u32);
            let mut sorted = sel.clone();
            sorted.sort_unstable();
            per_seq.push(sorted);
        }
        let selection = moe_kernels::TokenSelection::from_rows(per_seq);
        let scale = 0.07;
        let want = host(&sparse_mla_attention(&q, &cache, &p.seqs, &selection, dv, scale)?);
        let params = MlaDecodeParams {
            value_dim: dv,
            scale,
            max_context_len: topk,
            num_splits: None,
        };
        let got = host(&sparse_mla_decode(
            &q.to_device(&dev)?,
            &cache.to_device(&dev)?,
            &p.table,
            &Tensor::from_vec(rows, (s, topk), &dev)?,
            &Tensor::from_vec(counts, s, &dev)?,
            &params,
        )?);
        let (abs, rel) = if dtype == DType::F32 { (1e-4, 0.0) } else { (2e-2, 1e-2) };
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= abs + rel * w.abs(),
                "{dtype:?} element {i}: {g} vs {w}"
            );
        }
    }
    Ok(())
}
