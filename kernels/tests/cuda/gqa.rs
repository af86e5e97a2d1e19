//! GPU tests (feature `cuda`, need a CUDA device) of the paged GQA kernels against the CPU
//! references [`write_kv_cache`] and [`paged_gqa_attention`], on deterministic inputs with
//! awkward shapes: one sequence of context 1; 7 query heads over 1 kv head; 32 over 8 and 32
//! over 4 (Qwen3-30B-A3B); groups of 1, 12 and 16 heads and a 64-head MQA group (chunked);
//! head dims 64, 128, 256; contexts 1, 20, 140, 4097 ending mid-block; block sizes 16 and 1;
//! scrambled block tables; forced splits with empty ones; q as a strided view of a fused
//! projection; contexts beyond the block table and blocks beyond the pool.
//!
//! Tolerances. The cache write is a copy: bit-exact. Decode reads the same (pre-rounded)
//! inputs as the reference and computes in f32, in another order (tiles, splits, online
//! softmax in the log2 domain with `exp2f`): with scores of magnitude <= ~5 that moves
//! outputs (weighted means of values in [-1, 1]) by ~1e-6. The bf16 kernel then rounds its
//! output once (round to nearest even: at most 2^-9 relative), so bf16 allows
//! `1e-4 + 2^-8 |ref|` per element (2x the rounding, plus an absolute floor far above the f32
//! noise) and cosine >= 0.99999 per sequence (bf16 rounding alone gives ~1 - 1e-6); f32 allows
//! `2e-5 + 1e-4 |ref|` and cosine >= 0.999999. A wrong head mapping, mask, slot or merge moves
//! outputs by >= 1e-2.
use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::cuda::{kv_cache_write, paged_gqa_decode, GqaDecodeParams};
use moe_kernels::{paged_gqa_attention, write_kv_cache, PagedBatch, PagedSeq};

use crate::common::{gpu, host, slot_tensor, Rng};

/// One decode batch: caches written on both devices, block tables, the reference's sequences.
struct Batch {
    seqs: Vec<PagedSeq>,
    k_cpu: Tensor,
    v_cpu: Tensor,
    k_gpu: Tensor,
    v_gpu: Tensor,
    /// `[S, max_blocks]` u32 on the GPU, padded with `u32::MAX`, and its host copy.
    tables: Tensor,
    table: Vec<u32>,
    max_blocks: usize,
}

/// `n` values in [-scale, scale) rounded through `dtype`, on the CPU in that dtype.
fn random(rng: &mut Rng, shape: &[usize], scale: f32, dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(rng.vec(n, scale), shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Caches for sequences of `contexts` tokens (each written with `write_kv_cache` on the CPU and
/// `kv_cache_write` on the GPU, u32 and i64 slots alternating), checked bit-identical.
fn build(
    dtype: DType,
    kv_heads: usize,
    d: usize,
    block_size: usize,
    contexts: &[usize],
    rng: &mut Rng,
) -> Result<Batch> {
    let dev = gpu();
    let blocks: Vec<usize> = contexts.iter().map(|c| c.div_ceil(block_size).max(1)).collect();
    let num_blocks = blocks.iter().sum::<usize>() + 3;
    let max_blocks = *blocks.iter().max().unwrap();
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut ids);
    let shape = (num_blocks, block_size, kv_heads, d);
    let (k_cpu, v_cpu) = (
        Tensor::zeros(shape, dtype, &Device::Cpu)?,
        Tensor::zeros(shape, dtype, &Device::Cpu)?,
    );
    let (k_gpu, v_gpu) = (Tensor::zeros(shape, dtype, &dev)?, Tensor::zeros(shape, dtype, &dev)?);
    let mut table = vec![u32::MAX; contexts.len() * max_blocks];
    let mut seqs = Vec::new();
    let mut next = 0;
    for (i, (&ctx, &nb)) in contexts.iter().zip(&blocks).enumerate() {
        let bt = ids[next..next + nb].to_vec();
        next += nb;
        table[i * max_blocks..i * max_blocks + nb].copy_from_slice(&bt);
        let seq = PagedSeq {
            query_start: i,
            query_len: 1,
            context_len: ctx,
            block_table: bt,
        };
        let k = random(rng, &[ctx, kv_heads, d], 1.0, dtype)?;
        let v = random(rng, &[ctx, kv_heads, d], 1.0, dtype)?;
        let slots: Vec<u32> = (0..ctx).map(|p| seq.slot(p, block_size) as u32).collect();
        write_kv_cache(
            &k_cpu,
            &v_cpu,
            &k,
            &v,
            &Tensor::from_vec(slots.clone(), ctx, &Device::Cpu)?,
        )?;
        let slots_gpu = if i % 2 == 0 {
            Tensor::from_vec(slots, ctx, &dev)?
        } else {
            Tensor::from_vec(slots.iter().map(|&s| s as i64).collect::<Vec<_>>(), ctx, &dev)?
        };
        kv_cache_write(&k_gpu, &v_gpu, &k.to_device(&dev)?, &v.to_device(&dev)?, &slots_gpu)?;
        seqs.push(seq);
    }
    assert_eq!(host(&k_gpu), host(&k_cpu), "k cache write");
    assert_eq!(host(&v_gpu), host(&v_cpu), "v cache write");
    Ok(Batch {
        seqs,
        k_cpu,
        v_cpu,
        k_gpu,
        v_gpu,
        tables: Tensor::from_vec(table.clone(), (contexts.len(), max_blocks), &dev)?,
        table,
        max_blocks,
    })
}

/// Compares decode rows `got` with reference rows `want` (`row` values per sequence).
fn assert_close(dtype: DType, case: &str, got: &[f32], want: &[f32], row: usize) {
    let (abs, rel, cos) = match dtype {
        DType::BF16 => (1e-4f32, 1.0 / 256.0, 0.99999f64),
        _ => (2e-5, 1e-4, 0.999999),
    };
    assert_eq!(got.len(), want.len(), "{case}");
    for (i, (g, w)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() <= abs + rel * b.abs(), "{case} seq {i}: {a} vs {b}");
        }
        let dot: f64 = g.iter().zip(w).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        let n = (g.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
            * w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>())
        .sqrt();
        assert!(n == 0.0 || dot / n >= cos, "{case} seq {i}: cosine {}", dot / n);
    }
}

fn check_decode(
    dtype: DType,
    (heads, kv_heads, d): (usize, usize, usize),
    block_size: usize,
    contexts: &[usize],
    splits: Option<usize>,
) -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(31 + (heads * 7 + kv_heads * 5 + d + block_size) as u64);
    let b = build(dtype, kv_heads, d, block_size, contexts, &mut rng)?;
    let s = contexts.len();
    // q as the first `heads` heads of a fused [S, heads + 2 * kv_heads, d] projection (head and
    // token strides of the fused tensor); x3 makes the softmax peaky.
    let fused = random(&mut rng, &[s, heads + 2 * kv_heads, d], 3.0, dtype)?;
    let q_cpu = fused.narrow(1, 0, heads)?;
    let q_gpu = fused.to_device(&dev)?.narrow(1, 0, heads)?;
    let scale = 1.0 / (d as f64).sqrt();
    let want = host(&paged_gqa_attention(
        &q_cpu,
        &b.k_cpu,
        &b.v_cpu,
        &PagedBatch::from(b.seqs.clone()),
        scale,
    )?);
    let params = GqaDecodeParams {
        scale,
        max_context_len: *contexts.iter().max().unwrap(),
        num_splits: splits,
    };
    let lens: Vec<u32> = contexts.iter().map(|&c| c as u32).collect();
    let got = paged_gqa_decode(
        &q_gpu,
        &b.k_gpu,
        &b.v_gpu,
        &b.tables,
        &Tensor::from_vec(lens, s, &dev)?,
        &params,
    )?;
    assert_eq!(got.dims(), &[s, heads, d]);
    assert_eq!(got.dtype(), dtype);
    let case =
        format!("{dtype:?} heads={heads}/{kv_heads} d={d} block={block_size} contexts={contexts:?} splits={splits:?}");
    assert_close(dtype, &case, &host(&got), &want, heads * d);
    Ok(())
}

#[test]
fn paged_gqa_decode_matches_reference() -> Result<()> {
    let mixed = [20usize, 140, 4097, 1, 64];
    for dtype in [DType::BF16, DType::F32] {
        check_decode(dtype, (32, 8, 128), 16, &[1], None)?; // one sequence, context 1
        check_decode(dtype, (32, 8, 128), 16, &mixed, None)?;
        check_decode(dtype, (7, 1, 64), 1, &[20, 140, 1], None)?; // 7 heads over 1, block size 1
        check_decode(dtype, (32, 4, 128), 16, &[4097, 140], None)?; // Qwen3-30B-A3B
    }
    // Forced splits: one (the whole context in one CTA) and seven (empty splits for the short ones).
    check_decode(DType::BF16, (32, 8, 128), 16, &[4097, 300, 1], Some(1))?;
    check_decode(DType::BF16, (32, 8, 128), 16, &[4097, 300, 1], Some(7))?;
    // Groups of 1 (MHA), 12 (padded to 16 heads a CTA) and 16; 64 heads over 1 (4 chunks of 16).
    check_decode(DType::BF16, (4, 4, 64), 16, &[20, 140], None)?;
    check_decode(DType::BF16, (96, 8, 128), 16, &[140, 20], None)?;
    check_decode(DType::BF16, (64, 4, 128), 16, &[140, 4097], None)?;
    check_decode(DType::BF16, (64, 4, 64), 1, &[140, 20], None)?;
    check_decode(DType::BF16, (64, 1, 128), 16, &[300, 1], None)?;
    // Head dim 256: 16 heads a group run as two chunks of 8.
    check_decode(DType::BF16, (16, 1, 256), 16, &[140, 20], None)?;
    check_decode(DType::F32, (8, 2, 256), 16, &[4097, 20], None)?;
    Ok(())
}

#[test]
fn paged_gqa_decode_stays_inside_table_and_pool() -> Result<()> {
    let dev = gpu();
    let (heads, kv_heads, d, bs) = (8usize, 2usize, 128usize, 16usize);
    let mut rng = Rng(77);
    for dtype in [DType::BF16, DType::F32] {
        // Real contexts 20 and 140; then a sequence whose table holds only ids beyond the pool
        // and one with context 0.
        let b = build(dtype, kv_heads, d, bs, &[20, 140, 30, 1], &mut rng)?;
        let mut table = b.table.clone();
        let mb = b.max_blocks; // 9 blocks of 16: tables reach 144 positions
        table[2 * mb..3 * mb].fill(123_456);
        let tables = Tensor::from_vec(table, (4, mb), &dev)?;
        // Sequence 0 claims 1000 tokens: clamped to 144, its padding entries (u32::MAX) beyond
        // its 2 blocks are skipped, so it attends over its 2 blocks (32 positions, 12 of them
        // never written: zero keys and values).
        let lens = Tensor::from_vec(vec![1000u32, 140, 30, 0], 4, &dev)?;
        let q = random(&mut rng, &[4, heads, d], 3.0, dtype)?;
        let params = GqaDecodeParams {
            scale: 0.09,
            max_context_len: 1000,
            num_splits: None,
        };
        let got = host(&paged_gqa_decode(
            &q.to_device(&dev)?,
            &b.k_gpu,
            &b.v_gpu,
            &tables,
            &lens,
            &params,
        )?);
        let row = heads * d;
        let mut seq0 = b.seqs[0].clone();
        seq0.context_len = 32;
        for (i, seq) in [(0usize, seq0), (1, b.seqs[1].clone())] {
            let one = PagedSeq { query_start: 0, ..seq };
            let want = host(&paged_gqa_attention(
                &q.narrow(0, i, 1)?,
                &b.k_cpu,
                &b.v_cpu,
                &PagedBatch::from(vec![one]),
                0.09,
            )?);
            assert_close(
                dtype,
                &format!("{dtype:?} clamped seq {i}"),
                &got[i * row..(i + 1) * row],
                &want,
                row,
            );
        }
        assert!(
            got[2 * row..].iter().all(|&x| x == 0.0),
            "{dtype:?}: no valid block / context 0 => zero rows"
        );
    }
    Ok(())
}

#[test]
fn kv_cache_write_matches_reference_with_padding_and_views() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(5);
    let (nb, bs, kvh, d, dv, t) = (7usize, 16usize, 4usize, 128usize, 64usize, 37usize);
    for dtype in [DType::BF16, DType::F32] {
        // k and v as token-strided views of wider f32 projections ([T, 2 + kvh, d] and
        // [T, 1 + kvh + 2, dv]: each token's heads contiguous, no copy), into a cache of `dtype`
        // (converted like the reference).
        let wide_k = Tensor::from_vec(rng.vec(t * (2 + kvh) * d, 2.0), (t, 2 + kvh, d), &Device::Cpu)?;
        let wide_v = Tensor::from_vec(rng.vec(t * (3 + kvh) * dv, 2.0), (t, 3 + kvh, dv), &Device::Cpu)?;
        let k = wide_k.narrow(1, 2, kvh)?;
        let v = wide_v.narrow(1, 1, kvh)?;
        let mut all: Vec<i64> = (0..(nb * bs) as i64).collect();
        rng.shuffle(&mut all);
        let mut slots = all[..t].to_vec();
        for i in [0, 9, 36] {
            slots[i] = -1; // padding
        }
        slots[4] = (nb * bs + 3) as i64; // beyond the cache: skipped
        let keep: Vec<u32> = (0..t)
            .filter(|&i| (0..(nb * bs) as i64).contains(&slots[i]))
            .map(|i| i as u32)
            .collect();
        let keep_idx = Tensor::from_vec(keep.clone(), keep.len(), &Device::Cpu)?;
        let (k_cpu, v_cpu) = (
            Tensor::zeros((nb, bs, kvh, d), dtype, &Device::Cpu)?,
            Tensor::zeros((nb, bs, kvh, dv), dtype, &Device::Cpu)?,
        );
        let keep_slots: Vec<u32> = keep.iter().map(|&i| slots[i as usize] as u32).collect();
        write_kv_cache(
            &k_cpu,
            &v_cpu,
            &k.index_select(&keep_idx, 0)?,
            &v.index_select(&keep_idx, 0)?,
            &Tensor::from_vec(keep_slots, keep.len(), &Device::Cpu)?,
        )?;
        let k_g = wide_k.to_device(&dev)?.narrow(1, 2, kvh)?;
        let v_g = wide_v.to_device(&dev)?.narrow(1, 1, kvh)?;
        assert!(!k_g.is_contiguous() && !v_g.is_contiguous());
        for slot_dtype in [DType::I64, DType::U32] {
            let k_cache = Tensor::zeros((nb, bs, kvh, d), dtype, &dev)?;
            let v_cache = Tensor::zeros((nb, bs, kvh, dv), dtype, &dev)?;
            let s = slot_tensor(&slots, slot_dtype, &dev)?;
            kv_cache_write(&k_cache, &v_cache, &k_g, &v_g, &s)?;
            assert_eq!(host(&k_cache), host(&k_cpu), "k {dtype:?} {slot_dtype:?}");
            assert_eq!(host(&v_cache), host(&v_cpu), "v {dtype:?} {slot_dtype:?}");
        }
    }
    Ok(())
}

#[test]
fn gqa_kernels_reject_bad_arguments() -> Result<()> {
    let dev = gpu();
    let z = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &dev);
    let (k, v) = (z(&[4, 16, 2, 128], DType::BF16)?, z(&[4, 16, 2, 128], DType::BF16)?);
    let q = z(&[2, 8, 128], DType::BF16)?;
    let bt = Tensor::from_vec(vec![0u32, 1, 2, 3], (2, 2), &dev)?;
    let cl = Tensor::from_vec(vec![3u32, 20], 2, &dev)?;
    let p = GqaDecodeParams {
        scale: 0.1,
        max_context_len: 20,
        num_splits: None,
    };
    paged_gqa_decode(&q, &k, &v, &bt, &cl, &p)?;
    let bad: Vec<(&str, Result<Tensor>)> = vec![
        (
            "q dtype",
            paged_gqa_decode(&q.to_dtype(DType::F32)?, &k, &v, &bt, &cl, &p),
        ),
        (
            "heads not grouping",
            paged_gqa_decode(&z(&[2, 7, 128], DType::BF16)?, &k, &v, &bt, &cl, &p),
        ),
        ("head dim 96", {
            let k96 = z(&[4, 16, 2, 96], DType::BF16)?;
            paged_gqa_decode(&z(&[2, 8, 96], DType::BF16)?, &k96, &k96, &bt, &cl, &p)
        }),
        (
            "v head dim apart",
            paged_gqa_decode(&q, &k, &z(&[4, 16, 2, 64], DType::BF16)?, &bt, &cl, &p),
        ),
        (
            "non-contiguous cache",
            paged_gqa_decode(
                &q,
                &z(&[4, 2, 16, 128], DType::BF16)?.transpose(1, 2)?,
                &v,
                &bt,
                &cl,
                &p,
            ),
        ),
        (
            "table dtype",
            paged_gqa_decode(&q, &k, &v, &bt.to_dtype(DType::I64)?, &cl, &p),
        ),
        (
            "table rows",
            paged_gqa_decode(&q, &k, &v, &bt.narrow(0, 0, 1)?, &cl, &p),
        ),
        (
            "q on the CPU",
            paged_gqa_decode(&q.to_device(&Device::Cpu)?, &k, &v, &bt, &cl, &p),
        ),
        (
            "q strided last dim",
            paged_gqa_decode(&z(&[2, 128, 8], DType::BF16)?.transpose(1, 2)?, &k, &v, &bt, &cl, &p),
        ),
    ];
    for (what, r) in bad {
        assert!(r.is_err(), "{what} must be an error");
    }
    let kt = z(&[3, 2, 128], DType::BF16)?;
    let slots = Tensor::from_vec(vec![0u32, 1, 2], 3, &dev)?;
    kv_cache_write(&k, &v, &kt, &kt, &slots)?;
    assert!(kv_cache_write(&k, &v, &kt, &z(&[3, 1, 128], DType::BF16)?, &slots).is_err());
    assert!(kv_cache_write(&k, &v, &kt, &kt, &slots.to_dtype(DType::F32)?).is_err());
    assert!(kv_cache_write(&k, &z(&[5, 16, 2, 128], DType::BF16)?, &kt, &kt, &slots).is_err());
    assert!(kv_cache_write(&k, &v, &kt.to_device(&Device::Cpu)?, &kt, &slots).is_err());
    Ok(())
}
