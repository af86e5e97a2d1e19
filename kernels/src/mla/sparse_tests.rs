//! The DSA references against plain loops: the indexer's top-k against scoring every pair
//! and sorting, sparse MLA against a softmax over exactly the selected positions, and
//! sparse MLA over every visible position against the dense paged attention. Shapes are
//! awkward on purpose: scrambled block tables, a chunk after a cached prefix, a decode row,
//! more query rows than one scoring pass takes, an empty sequence.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::mla::{paged_mla_attention, write_index_keys, write_latent_cache};

use crate::test_values::values;
use crate::PagedBatch;

struct Batch {
    seqs: Vec<PagedSeq>,
    /// Per sequence, per position: the cached row.
    rows: Vec<Vec<Vec<f32>>>,
    cache: Tensor,
    num_tokens: usize,
}

/// Sequences `(query_len, context_len)` over a scrambled pool, their rows (`dim` values,
/// seeded by `seed`) written through `write`.
fn batch(
    plans: &[(usize, usize)],
    dim: usize,
    seed: u32,
    write: fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<()>,
) -> Batch {
    let dev = Device::Cpu;
    let block_size = 4usize;
    let num_blocks: usize = plans.iter().map(|p| p.1.div_ceil(block_size)).sum::<usize>() + 3;
    let cache = Tensor::zeros((num_blocks, block_size, dim), DType::F32, &dev).unwrap();
    let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
    free.swap(0, 2);
    let (mut seqs, mut rows, mut start) = (Vec::new(), Vec::new(), 0);
    for (n, &(qlen, ctx)) in plans.iter().enumerate() {
        let seq = PagedSeq {
            query_start: start,
            query_len: qlen,
            context_len: ctx,
            block_table: free.drain(..ctx.div_ceil(block_size)).collect(),
        };
        let r: Vec<Vec<f32>> = (0..ctx).map(|p| values(dim, seed + (n * 1000 + p) as u32)).collect();
        if ctx > 0 {
            let slots: Vec<u32> = (0..ctx).map(|p| seq.slot(p, block_size) as u32).collect();
            let src = Tensor::from_vec(r.concat(), (ctx, dim), &dev).unwrap();
            write(&cache, &src, &Tensor::new(slots, &dev).unwrap()).unwrap();
        }
        start += qlen;
        seqs.push(seq);
        rows.push(r);
    }
    Batch {
        seqs,
        rows,
        cache,
        num_tokens: start,
    }
}

const PLANS: &[(usize, usize)] = &[(1, 1), (1, 40), (6, 6), (5, 30), (0, 0), (150, 170), (3, 9)];

#[test]
fn indexer_topk_matches_scoring_every_pair_and_sorting() {
    let (heads, dim, topk) = (3usize, 8usize, 7usize);
    let b = batch(PLANS, dim, 7, write_index_keys);
    let q_host = values(b.num_tokens * heads * dim, 99);
    let w_host = values(b.num_tokens * heads, 5);
    let q = Tensor::from_vec(q_host.clone(), (b.num_tokens, heads, dim), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(w_host.clone(), (b.num_tokens, heads), &Device::Cpu).unwrap();
    let scale = 0.35f64;
    let got = indexer_topk(&q, &w, &b.cache, &b.seqs, topk, scale).unwrap();
    assert_eq!(got.num_tokens(), b.num_tokens);
    let mut dropped = 0;
    for (seq, keys) in b.seqs.iter().zip(&b.rows) {
        let offset = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            let visible = offset + i + 1;
            let mut scored: Vec<(f32, u32)> = (0..visible)
                .map(|s| {
                    let score = (0..heads)
                        .map(|h| {
                            let qh = &q_host[(t * heads + h) * dim..][..dim];
                            let dot: f32 = qh.iter().zip(&keys[s]).map(|(a, b)| a * b).sum();
                            w_host[t * heads + h] * (dot * scale as f32).max(0.0)
                        })
                        .sum::<f32>();
                    (score, s as u32)
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut want: Vec<u32> = scored.iter().take(topk).map(|s| s.1).collect();
            want.sort_unstable();
            assert_eq!(got.of(t), want.as_slice(), "row {t} (visible {visible})");
            dropped += visible.saturating_sub(topk);
        }
    }
    assert!(
        dropped > 1000,
        "the plans must make the indexer drop positions ({dropped})"
    );
}

/// Softmax over exactly `chosen` of `rows` for one query head.
fn attend(qh: &[f32], rows: &[Vec<f32>], chosen: &[u32], value_dim: usize, scale: f32) -> Vec<f32> {
    let scores: Vec<f32> = chosen
        .iter()
        .map(|&p| qh.iter().zip(&rows[p as usize]).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = scores.iter().map(|s| (s - max).exp()).sum();
    let mut out = vec![0f32; value_dim];
    for (s, &p) in scores.iter().zip(chosen) {
        for (o, v) in out.iter_mut().zip(&rows[p as usize][..value_dim]) {
            *o += (s - max).exp() / total * v;
        }
    }
    out
}

#[test]
fn sparse_attention_attends_to_exactly_the_selected_positions() {
    let (heads, value_dim, dim) = (4usize, 12usize, 16usize);
    let b = batch(PLANS, dim, 3, write_latent_cache);
    let q_host = values(b.num_tokens * heads * dim, 42);
    let q = Tensor::from_vec(q_host.clone(), (b.num_tokens, heads, dim), &Device::Cpu).unwrap();
    // Every third visible position, plus the last: a selection no top-k of real scores
    // would make, so only the selection decides what is attended.
    let mut rows_sel = vec![Vec::new(); b.num_tokens];
    for seq in &b.seqs {
        let offset = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            let visible = (offset + i + 1) as u32;
            let mut sel: Vec<u32> = (0..visible).filter(|p| p % 3 == 1).collect();
            if sel.last() != Some(&(visible - 1)) {
                sel.push(visible - 1);
            }
            rows_sel[seq.query_start + i] = sel;
        }
    }
    let selection = TokenSelection::from_rows(rows_sel);
    let scale = 0.3f32;
    let got = sparse_mla_attention(&q, &b.cache, &b.seqs, &selection, value_dim, scale as f64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for (seq, rows) in b.seqs.iter().zip(&b.rows) {
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            for h in 0..heads {
                let qh = &q_host[(t * heads + h) * dim..][..dim];
                let want = attend(qh, rows, selection.of(t), value_dim, scale);
                let have = &got[(t * heads + h) * value_dim..][..value_dim];
                for (a, b) in have.iter().zip(&want) {
                    worst = worst.max((a - b).abs());
                }
            }
        }
    }
    assert!(worst < 1e-5, "max |diff| {worst}");
}

#[test]
fn sparse_attention_over_every_visible_position_is_dense_attention() {
    let (heads, value_dim, dim) = (3usize, 12usize, 16usize);
    let b = batch(PLANS, dim, 11, write_latent_cache);
    let q = Tensor::from_vec(
        values(b.num_tokens * heads * dim, 8),
        (b.num_tokens, heads, dim),
        &Device::Cpu,
    )
    .unwrap();
    let all = TokenSelection::all_visible(&b.seqs, b.num_tokens);
    // With a top-k at least as long as every context, the indexer keeps everything too.
    let w = Tensor::ones((b.num_tokens, heads), DType::F32, &Device::Cpu).unwrap();
    let keys = batch(PLANS, 8, 1, write_index_keys);
    let qi = Tensor::ones((b.num_tokens, heads, 8), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(indexer_topk(&qi, &w, &keys.cache, &keys.seqs, 170, 1.0).unwrap(), all);
    let sparse = sparse_mla_attention(&q, &b.cache, &b.seqs, &all, value_dim, 0.25).unwrap();
    let dense = paged_mla_attention(&q, &b.cache, &PagedBatch::from(b.seqs.to_vec()), value_dim, 0.25).unwrap();
    let diff = (sparse - dense)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "max |diff| {diff}");
}

#[test]
fn bad_selections_and_shapes_are_errors() {
    let b = batch(&[(2, 5)], 16, 1, write_latent_cache);
    let q = Tensor::zeros((2, 2, 16), DType::F32, &Device::Cpu).unwrap();
    // Row 0 sits at position 3 and may not select position 4.
    let future = TokenSelection::from_rows(vec![vec![0, 4], vec![1]]);
    let err = sparse_mla_attention(&q, &b.cache, &b.seqs, &future, 12, 1.0).unwrap_err();
    assert!(err.to_string().contains("past its own"), "{err}");
    let short = TokenSelection::from_rows(vec![vec![0]]);
    assert!(sparse_mla_attention(&q, &b.cache, &b.seqs, &short, 12, 1.0).is_err());
    let w = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(indexer_topk(&q, &w, &b.cache, &b.seqs, 4, 1.0).is_err());
    let w = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(indexer_topk(&q, &w, &b.cache, &b.seqs, 0, 1.0).is_err());
}
