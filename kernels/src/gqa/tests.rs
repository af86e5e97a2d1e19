//! The GQA cache write and attention against a plain per-token, per-head loop (in f64) over a
//! dense copy of each sequence's keys and values, on awkward shapes: one token, 7 query heads
//! over 1 kv head, 8 over 2, MHA, key and value dims that differ, contexts of 1, 20 and 140
//! tokens ending mid-block, block sizes 1, 3 and 16, scrambled block tables, sequences without
//! queries, a prefill chunk after a cached prefix next to decode rows, bf16 caches; then every
//! bad argument as an error.

use candle_core::{DType, Device, Tensor};

use super::attention::{attention_in_chunks, host_in_chunks};
use super::*;

use crate::test_values::values;
use crate::PagedBatch;

/// `x` rounded through `dtype` (what a cache of that dtype holds).
fn rounded(x: Vec<f32>, dtype: DType) -> Vec<f32> {
    let n = x.len();
    Tensor::from_vec(x, n, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// A permutation of `0..n` (Fisher-Yates on the LCG), for scrambled block tables.
fn scrambled(n: usize, seed: u32) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    let r = values(n, seed);
    for i in (1..n).rev() {
        let j = (((r[i] + 1.0) / 2.0) * (i + 1) as f32) as usize;
        ids.swap(i, j.min(i));
    }
    ids
}

struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    v_head_dim: usize,
    block_size: usize,
    /// `(query_len, context_len)` per sequence.
    plans: Vec<(usize, usize)>,
    /// Query rows after the last sequence's (must come back zero).
    extra_rows: usize,
    dtype: DType,
    scale: f64,
    /// Scores materialized at once (`usize::MAX`: the public entry point's default).
    max_scores: usize,
}

/// Builds the caches with `write_kv_cache`, runs the attention (the CPU kernel and the candle
/// reference, each with the case's score budget) and returns the largest absolute difference
/// of either from the naive loop.
fn run(case: &Case) -> candle_core::Result<f64> {
    let dev = Device::Cpu;
    let (h, kvh, d, dv, bs) = (
        case.heads,
        case.kv_heads,
        case.head_dim,
        case.v_head_dim,
        case.block_size,
    );
    let num_blocks: usize = case.plans.iter().map(|&(_, c)| c.div_ceil(bs)).sum::<usize>() + 3;
    let k_cache = Tensor::zeros((num_blocks, bs, kvh, d), case.dtype, &dev)?;
    let v_cache = Tensor::zeros((num_blocks, bs, kvh, dv), case.dtype, &dev)?;
    let mut free = scrambled(num_blocks, 5 + num_blocks as u32);
    let mut seqs = Vec::new();
    let mut dense = Vec::new(); // per sequence: (keys [ctx][kvh][d], values [ctx][kvh][dv])
    let mut start = 0;
    for (n, &(qlen, ctx)) in case.plans.iter().enumerate() {
        let seq = PagedSeq {
            query_start: start,
            query_len: qlen,
            context_len: ctx,
            block_table: free.drain(..ctx.div_ceil(bs)).collect(),
        };
        let k = rounded(values(ctx * kvh * d, 1000 + n as u32), case.dtype);
        let v = rounded(values(ctx * kvh * dv, 2000 + n as u32), case.dtype);
        // Written in two calls, as a cached prefix and this step's tokens would be.
        let cut = ctx - qlen.min(ctx);
        for (from, len) in [(0, cut), (cut, ctx - cut)] {
            let slots: Vec<u32> = (from..from + len).map(|p| seq.slot(p, bs) as u32).collect();
            write_kv_cache(
                &k_cache,
                &v_cache,
                &Tensor::from_vec(k[from * kvh * d..(from + len) * kvh * d].to_vec(), (len, kvh, d), &dev)?,
                &Tensor::from_vec(
                    v[from * kvh * dv..(from + len) * kvh * dv].to_vec(),
                    (len, kvh, dv),
                    &dev,
                )?,
                &Tensor::from_vec(slots, len, &dev)?,
            )?;
        }
        start += qlen;
        seqs.push(seq);
        dense.push((k, v));
    }
    let rows = start + case.extra_rows;
    let q_host = rounded(values(rows * h * d, 99 + h as u32 + bs as u32), case.dtype);
    let q = Tensor::from_vec(q_host.clone(), (rows, h, d), &dev)?.to_dtype(case.dtype)?;
    let reference = attention_in_chunks(&q, &k_cache, &v_cache, &seqs, case.scale, case.max_scores)?;
    let mut worst = 0f64;
    // The CPU kernel takes f32 and bf16 caches (f16 goes to the reference).
    let host = host_in_chunks(&q, &k_cache, &v_cache, &seqs, case.scale, case.max_scores)?;
    assert_eq!(host.is_some(), case.dtype != DType::F16, "{:?}", case.dtype);
    for got in std::iter::once(reference).chain(host) {
        worst = worst.max(compare(case, &got, &q_host, &seqs, &dense, start, rows)?);
    }
    Ok(worst)
}

/// The largest absolute difference of `got` from the naive loop over `dense`.
fn compare(
    case: &Case,
    got: &Tensor,
    q_host: &[f32],
    seqs: &[PagedSeq],
    dense: &[(Vec<f32>, Vec<f32>)],
    start: usize,
    rows: usize,
) -> candle_core::Result<f64> {
    let (h, kvh, d, dv) = (case.heads, case.kv_heads, case.head_dim, case.v_head_dim);
    let group = h / kvh;
    assert_eq!(got.dims(), &[rows, h, dv]);
    assert_eq!(got.dtype(), DType::F32);
    let got = got.flatten_all()?.to_vec1::<f32>()?;

    let mut worst = 0f64;
    for (seq, (k, v)) in seqs.iter().zip(dense) {
        let offset = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            let row = seq.query_start + i;
            for head in 0..h {
                let kv = head / group;
                let qr = &q_host[(row * h + head) * d..][..d];
                let visible = offset + i + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|p| {
                        let kr = &k[(p * kvh + kv) * d..][..d];
                        qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * case.scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for c in 0..dv {
                    let want: f64 = exps
                        .iter()
                        .enumerate()
                        .map(|(p, e)| e / total * v[(p * kvh + kv) * dv + c] as f64)
                        .sum();
                    let g = got[(row * h + head) * dv + c] as f64;
                    worst = worst.max((g - want).abs());
                }
            }
        }
    }
    assert!(
        got[start * h * dv..].iter().all(|&x| x == 0.0),
        "rows past the sequences must be zero"
    );
    Ok(worst)
}

/// Mixed batches: decode rows of contexts 1, 20 and 140, a sequence without queries (empty and
/// with a cached context), a whole 5-token prompt, and a 7-token prefill chunk after 133 cached
/// tokens.
fn mixed() -> Vec<(usize, usize)> {
    vec![(1, 1), (1, 20), (0, 0), (5, 5), (1, 140), (0, 9), (7, 140), (3, 14)]
}

#[test]
fn gqa_attention_matches_naive_loop_on_awkward_shapes() -> candle_core::Result<()> {
    // (heads, kv_heads, head_dim, v_head_dim)
    let shapes = [
        (1, 1, 8, 8),
        (7, 1, 16, 16),
        (8, 2, 32, 32),
        (4, 4, 8, 8),
        (6, 2, 16, 12),
    ];
    for &(heads, kv_heads, head_dim, v_head_dim) in &shapes {
        for block_size in [1, 3, 16] {
            for (plans, extra_rows) in [(vec![(1, 1)], 0), (mixed(), 2)] {
                let case = Case {
                    heads,
                    kv_heads,
                    head_dim,
                    v_head_dim,
                    block_size,
                    plans: plans.clone(),
                    extra_rows,
                    dtype: DType::F32,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    max_scores: usize::MAX,
                };
                let worst = run(&case)?;
                // f32 dot products of <= 32 terms and weighted sums of <= 140 values in [-1, 1],
                // against an f64 loop: the reordering and rounding error is ~1e-7; 2e-6 keeps a
                // wide margin and still catches any mask, slot or head-mapping mistake (those
                // are >= 1e-3 here). The model goldens need |logit err| <= 1e-4.
                assert!(
                    worst <= 2e-6,
                    "heads {heads}/{kv_heads} dims {head_dim}/{v_head_dim} block {block_size} plans {plans:?}: {worst}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn gqa_attention_chunks_long_prompts_and_stays_stable() -> candle_core::Result<()> {
    // Tiny score budgets split the prompt rows into chunks of 1 and 3 rows; a large scale makes
    // scores of ~±30 (exp would overflow f32 without the max subtraction).
    for (max_scores, scale) in [(1, 0.25), (3 * 8 * 140, 6.0), (usize::MAX, 6.0)] {
        let case = Case {
            heads: 8,
            kv_heads: 2,
            head_dim: 32,
            v_head_dim: 32,
            block_size: 16,
            plans: mixed(),
            extra_rows: 0,
            dtype: DType::F32,
            scale,
            max_scores,
        };
        let worst = run(&case)?;
        // Peaky softmax: relative score error ~1e-7 * 30 moves weights by ~3e-6 at most.
        assert!(worst <= 2e-5, "budget {max_scores} scale {scale}: {worst}");
    }
    Ok(())
}

#[test]
fn gqa_attention_reads_bf16_caches_in_f32() -> candle_core::Result<()> {
    for dtype in [DType::BF16, DType::F16] {
        let case = Case {
            heads: 8,
            kv_heads: 2,
            head_dim: 32,
            v_head_dim: 32,
            block_size: 3,
            plans: mixed(),
            extra_rows: 1,
            dtype,
            scale: 0.2,
            max_scores: usize::MAX,
        };
        // Inputs are pre-rounded, so the f32 computation sees exactly what the loop sees.
        let worst = run(&case)?;
        assert!(worst <= 2e-6, "{dtype:?}: {worst}");
    }
    Ok(())
}

#[test]
fn write_kv_cache_scatters_rows_and_converts() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (nb, bs, kvh, d, dv) = (3usize, 2usize, 2usize, 4usize, 3usize);
    let k_cache = Tensor::zeros((nb, bs, kvh, d), DType::BF16, &dev)?;
    let v_cache = Tensor::zeros((nb, bs, kvh, dv), DType::BF16, &dev)?;
    // k as a non-contiguous view ([kvh, T, d] transposed), f32 into a bf16 cache.
    let k = Tensor::from_vec(values(kvh * 2 * d, 1), (kvh, 2, d), &dev)?.transpose(0, 1)?;
    let v = Tensor::from_vec(values(2 * kvh * dv, 2), (2, kvh, dv), &dev)?;
    write_kv_cache(&k_cache, &v_cache, &k, &v, &Tensor::new(&[5u32, 0], &dev)?)?;
    let kc = k_cache.to_dtype(DType::F32)?.reshape((nb * bs, kvh, d))?;
    let vc = v_cache.to_dtype(DType::F32)?.reshape((nb * bs, kvh, dv))?;
    let kb = k.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    let vb = v.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    for (t, slot) in [(0usize, 5usize), (1, 0)] {
        assert_eq!(kc.get(slot)?.to_vec2::<f32>()?, kb.get(t)?.to_vec2::<f32>()?);
        assert_eq!(vc.get(slot)?.to_vec2::<f32>()?, vb.get(t)?.to_vec2::<f32>()?);
    }
    for slot in 1..5 {
        assert!(kc.get(slot)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|&x| x == 0.0));
        assert!(vc.get(slot)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|&x| x == 0.0));
    }
    // No tokens: nothing to do.
    let none = Tensor::zeros((0, kvh, d), DType::F32, &dev)?;
    let none_v = Tensor::zeros((0, kvh, dv), DType::F32, &dev)?;
    write_kv_cache(&k_cache, &v_cache, &none, &none_v, &Tensor::zeros(0, DType::U32, &dev)?)?;
    Ok(())
}

#[test]
fn write_kv_cache_rejects_bad_arguments_before_writing() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let k_cache = Tensor::zeros((2, 4, 2, 8), DType::F32, &dev)?;
    let v_cache = Tensor::zeros((2, 4, 2, 6), DType::F32, &dev)?;
    let k = Tensor::ones((1, 2, 8), DType::F32, &dev)?;
    let v = Tensor::ones((1, 2, 6), DType::F32, &dev)?;
    let slot = Tensor::new(&[3u32], &dev)?;
    let untouched = |c: &Tensor| {
        c.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    };
    // Slot beyond the cache, wrong slot dtype, wrong slot count.
    assert!(write_kv_cache(&k_cache, &v_cache, &k, &v, &Tensor::new(&[8u32], &dev)?).is_err());
    assert!(write_kv_cache(&k_cache, &v_cache, &k, &v, &Tensor::new(&[3i64], &dev)?).is_err());
    assert!(write_kv_cache(&k_cache, &v_cache, &k, &v, &Tensor::new(&[3u32, 4], &dev)?).is_err());
    // Shapes: v of the wrong width (k is fine, and must not be written), k with 1 head, k and v
    // token counts apart, caches that disagree.
    let v_bad = Tensor::ones((1, 2, 8), DType::F32, &dev)?;
    assert!(write_kv_cache(&k_cache, &v_cache, &k, &v_bad, &slot).is_err());
    let k_bad = Tensor::ones((1, 1, 8), DType::F32, &dev)?;
    assert!(write_kv_cache(&k_cache, &v_cache, &k_bad, &v, &slot).is_err());
    let v_two = Tensor::ones((2, 2, 6), DType::F32, &dev)?;
    assert!(write_kv_cache(&k_cache, &v_cache, &k, &v_two, &slot).is_err());
    let v_cache_bad = Tensor::zeros((3, 4, 2, 6), DType::F32, &dev)?;
    assert!(write_kv_cache(&k_cache, &v_cache_bad, &k, &v, &slot).is_err());
    // A non-contiguous cache would take the write in a copy: refused.
    let k_cache_t = Tensor::zeros((2, 4, 8, 2), DType::F32, &dev)?.transpose(2, 3)?;
    assert!(write_kv_cache(&k_cache_t, &v_cache, &k, &v, &slot).is_err());
    assert!(untouched(&k_cache) && untouched(&v_cache));
    write_kv_cache(&k_cache, &v_cache, &k, &v, &slot)?;
    assert!(!untouched(&k_cache) && !untouched(&v_cache));
    Ok(())
}

#[test]
fn gqa_attention_rejects_bad_arguments() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let k_cache = Tensor::zeros((2, 4, 2, 8), DType::F32, &dev)?;
    let v_cache = Tensor::zeros((2, 4, 2, 8), DType::F32, &dev)?;
    let q = Tensor::zeros((3, 4, 8), DType::F32, &dev)?;
    let seq = |start, qlen, ctx, table: Vec<u32>| PagedSeq {
        query_start: start,
        query_len: qlen,
        context_len: ctx,
        block_table: table,
    };
    let ok = [seq(0, 2, 5, vec![1, 0]), seq(2, 1, 1, vec![0])];
    paged_gqa_attention(&q, &k_cache, &v_cache, &PagedBatch::from(ok.to_vec()), 1.0)?;
    let bad_seqs: Vec<(&str, Vec<PagedSeq>)> = vec![
        (
            "gap between sequences",
            vec![seq(0, 1, 2, vec![0]), seq(2, 1, 1, vec![1])],
        ),
        (
            "overlapping sequences",
            vec![seq(0, 2, 2, vec![0]), seq(1, 1, 1, vec![1])],
        ),
        ("first sequence not at row 0", vec![seq(1, 1, 1, vec![0])]),
        ("context shorter than queries", vec![seq(0, 3, 2, vec![0])]),
        ("rows beyond q", vec![seq(0, 4, 4, vec![0])]),
        ("table too short", vec![seq(0, 1, 5, vec![0])]),
        ("block id beyond the pool", vec![seq(0, 1, 5, vec![0, 2])]),
        ("empty table", vec![seq(0, 1, 1, vec![])]),
    ];
    for (what, seqs) in &bad_seqs {
        assert!(
            paged_gqa_attention(&q, &k_cache, &v_cache, &PagedBatch::from(seqs.to_vec()), 1.0).is_err(),
            "{what}"
        );
    }
    // Shapes: heads that do not group (3 over 2), head dim apart, caches that disagree, wrong ranks.
    let one = [seq(0, 1, 1, vec![0])];
    let q3 = Tensor::zeros((1, 3, 8), DType::F32, &dev)?;
    assert!(paged_gqa_attention(&q3, &k_cache, &v_cache, &PagedBatch::from(one.to_vec()), 1.0).is_err());
    let q_d = Tensor::zeros((1, 4, 6), DType::F32, &dev)?;
    assert!(paged_gqa_attention(&q_d, &k_cache, &v_cache, &PagedBatch::from(one.to_vec()), 1.0).is_err());
    let v_other = Tensor::zeros((2, 4, 1, 8), DType::F32, &dev)?;
    assert!(paged_gqa_attention(&q, &k_cache, &v_other, &PagedBatch::from(one.to_vec()), 1.0).is_err());
    let k_3d = Tensor::zeros((2, 4, 16), DType::F32, &dev)?;
    assert!(paged_gqa_attention(&q, &k_3d, &v_cache, &PagedBatch::from(one.to_vec()), 1.0).is_err());
    let q_2d = Tensor::zeros((1, 32), DType::F32, &dev)?;
    assert!(paged_gqa_attention(&q_2d, &k_cache, &v_cache, &PagedBatch::from(one.to_vec()), 1.0).is_err());
    let q_0h = Tensor::zeros((1, 0, 8), DType::F32, &dev)?;
    assert!(paged_gqa_attention(&q_0h, &k_cache, &v_cache, &PagedBatch::from(one.to_vec()), 1.0).is_err());
    // No query rows at all is fine and empty.
    let q0 = Tensor::zeros((0, 4, 8), DType::F32, &dev)?;
    assert_eq!(
        paged_gqa_attention(&q0, &k_cache, &v_cache, &PagedBatch::default(), 1.0)?.dims(),
        &[0, 4, 8]
    );
    Ok(())
}
