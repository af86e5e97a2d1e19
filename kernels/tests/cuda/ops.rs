//! GPU tests (feature `cuda`, need a CUDA device): each kernel against its reference on
//! deterministic pseudo-random inputs.
//!
//! Tolerances: copies (cache write) must be bit-exact. RMSNorm and RoPE compute in f32 and
//! round once, like the references, so they may differ only where f32 results straddle a
//! bf16 rounding boundary: at most one bf16 ulp (2^-8 relative) of the value. Decode
//! accumulates in a different order (tiles, splits, online softmax) and rounds its output to
//! bf16: abs error <= 2e-2 + 1e-2 * |ref| and cosine similarity >= 0.9999 per sequence.
use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::cuda::{latent_cache_write, paged_mla_decode, rmsnorm_residual, rope_inplace, MlaDecodeParams};
use moe_kernels::{paged_mla_attention, reference, write_latent_cache, PagedBatch, PagedSeq};

use crate::common::{gpu, host, slot_tensor, Rng};

fn max_ulp_violation(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() - w.abs().max(1e-30) / 128.0)
        .fold(f32::NEG_INFINITY, f32::max)
}

#[test]
fn latent_cache_write_matches_reference() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(7);
    for dtype in [DType::BF16, DType::F32] {
        let (num_blocks, block_size, kv_lora, rope, t) = (10, 16, 512, 64, 37);
        let ckv = Tensor::from_vec(rng.vec(t * kv_lora, 2.0), (t, kv_lora), &Device::Cpu)?.to_dtype(dtype)?;
        let kpe = Tensor::from_vec(rng.vec(t * rope, 2.0), (t, rope), &Device::Cpu)?.to_dtype(dtype)?;
        let mut all: Vec<i64> = (0..(num_blocks * block_size) as i64).collect();
        rng.shuffle(&mut all);
        let mut slots: Vec<i64> = all[..t].to_vec();
        for i in [0, 5, 36] {
            slots[i] = -1; // padding
        }
        let cache_cpu = Tensor::zeros((num_blocks, block_size, kv_lora + rope), dtype, &Device::Cpu)?;
        let keep: Vec<usize> = (0..t).filter(|&i| slots[i] >= 0).collect();
        let keep_idx = Tensor::from_vec(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            keep.len(),
            &Device::Cpu,
        )?;
        let latents = Tensor::cat(&[&ckv, &kpe], 1)?.index_select(&keep_idx, 0)?;
        let keep_slots: Vec<u32> = keep.iter().map(|&i| slots[i] as u32).collect();
        write_latent_cache(
            &cache_cpu,
            &latents,
            &Tensor::from_vec(keep_slots, keep.len(), &Device::Cpu)?,
        )?;

        for slot_dtype in [DType::I64, DType::U32] {
            let cache = Tensor::zeros((num_blocks, block_size, kv_lora + rope), dtype, &dev)?;
            let s = slot_tensor(&slots, slot_dtype, &dev)?;
            latent_cache_write(&cache, &ckv.to_device(&dev)?, &kpe.to_device(&dev)?, &s)?;
            assert_eq!(host(&cache), host(&cache_cpu), "{dtype:?} {slot_dtype:?}");
        }
    }
    Ok(())
}

#[test]
fn rmsnorm_residual_matches_reference() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(11);
    for dtype in [DType::BF16, DType::F32] {
        for (rows, dim) in [(1, 7), (5, 512), (3, 2048), (2, 7168)] {
            let x = Tensor::from_vec(rng.vec(rows * dim, 3.0), (rows, dim), &Device::Cpu)?.to_dtype(dtype)?;
            let r = Tensor::from_vec(rng.vec(rows * dim, 3.0), (rows, dim), &Device::Cpu)?.to_dtype(dtype)?;
            let w = Tensor::from_vec(rng.vec(dim, 1.5), dim, &Device::Cpu)?.to_dtype(dtype)?;
            let (h_ref, y_ref) = reference::rmsnorm_residual(&x, Some(&r), &w, 1e-6)?;
            let xg = x.to_device(&dev)?;
            let (h, y) = rmsnorm_residual(&xg, Some(&r.to_device(&dev)?), &w.to_device(&dev)?, 1e-6)?;
            assert_eq!(host(&h), host(&h_ref), "residual sum {dtype:?} {rows}x{dim}");
            assert_eq!(host(&xg), host(&x), "x is not written {dtype:?} {rows}x{dim}");
            let v = max_ulp_violation(&host(&y), &host(&y_ref));
            assert!(v <= 1e-6, "{dtype:?} {rows}x{dim}: beyond one bf16 ulp by {v}");
            // Plain RMSNorm of the new stream.
            let (_, y2) = rmsnorm_residual(&h, None, &w.to_device(&dev)?, 1e-6)?;
            let (_, y2_ref) = reference::rmsnorm_residual(&h_ref, None, &w, 1e-6)?;
            assert!(max_ulp_violation(&host(&y2), &host(&y2_ref)) <= 1e-6);
        }
    }
    Ok(())
}

#[test]
fn rope_matches_reference() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(13);
    let (max_pos, rot) = (4096usize, 64usize);
    let half = rot / 2;
    // A YaRN-like table: any frequencies and factor do, the kernel only reads the table.
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / rot as f32) / if i > 8 { 40.0 } else { 1.0 })
        .collect();
    let af = 1.2f32;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for f in &inv_freq {
            cos.push((p as f32 * f).cos() * af);
            sin.push((p as f32 * f).sin() * af);
        }
    }
    let cos_t = Tensor::from_vec(cos, (max_pos, half), &Device::Cpu)?;
    let sin_t = Tensor::from_vec(sin, (max_pos, half), &Device::Cpu)?;
    for dtype in [DType::BF16, DType::F32] {
        for interleaved in [true, false] {
            for (t, heads) in [(1usize, 1usize), (9, 16), (4, 3)] {
                let positions: Vec<u32> = (0..t).map(|_| (rng.next() % max_pos as u64) as u32).collect();
                let pos = Tensor::from_vec(positions.clone(), t, &Device::Cpu)?;
                let c = cos_t.index_select(&pos, 0)?;
                let s = sin_t.index_select(&pos, 0)?;
                // q_pe as the strided tail of a [T, H, 192] q, k_pe as the tail of a [T, 576] row.
                let q_full =
                    Tensor::from_vec(rng.vec(t * heads * 192, 2.0), (t, heads, 192), &Device::Cpu)?.to_dtype(dtype)?;
                let k_full = Tensor::from_vec(rng.vec(t * 576, 2.0), (t, 576), &Device::Cpu)?.to_dtype(dtype)?;
                let q_ref = reference::rope(&q_full.narrow(2, 128, rot)?, &c, &s, interleaved)?;
                let k_ref = reference::rope(&k_full.narrow(1, 512, rot)?.unsqueeze(1)?, &c, &s, interleaved)?;
                let qg = q_full.to_device(&dev)?;
                let kg = k_full.to_device(&dev)?;
                rope_inplace(
                    Some(&qg.narrow(2, 128, rot)?),
                    Some(&kg.narrow(1, 512, rot)?),
                    &c.to_device(&dev)?,
                    &s.to_device(&dev)?,
                    interleaved,
                )?;
                let case = format!("{dtype:?} interleaved={interleaved} t={t} h={heads}");
                assert!(
                    max_ulp_violation(&host(&qg.narrow(2, 128, rot)?), &host(&q_ref)) <= 1e-5,
                    "q {case}"
                );
                assert!(
                    max_ulp_violation(&host(&kg.narrow(1, 512, rot)?), &host(&k_ref)) <= 1e-5,
                    "k {case}"
                );
                // The nope parts are untouched.
                assert_eq!(host(&qg.narrow(2, 0, 128)?), host(&q_full.narrow(2, 0, 128)?), "{case}");
                assert_eq!(host(&kg.narrow(1, 0, 512)?), host(&k_full.narrow(1, 0, 512)?), "{case}");
            }
        }
    }
    Ok(())
}

fn check_decode(
    dtype: DType,
    heads: usize,
    block_size: usize,
    contexts: &[usize],
    splits: Option<usize>,
) -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(17 + heads as u64 + block_size as u64);
    let (d, dv) = (576usize, 512usize);
    let blocks_per_seq: Vec<usize> = contexts.iter().map(|c| c.div_ceil(block_size).max(1)).collect();
    let num_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut ids); // scrambled block tables
    let max_blocks = *blocks_per_seq.iter().max().unwrap();
    let mut seqs = Vec::new();
    let mut table = vec![0u32; contexts.len() * max_blocks];
    let mut next = 0;
    for (i, (&ctx, &nb)) in contexts.iter().zip(&blocks_per_seq).enumerate() {
        let bt: Vec<u32> = ids[next..next + nb].to_vec();
        next += nb;
        table[i * max_blocks..i * max_blocks + nb].copy_from_slice(&bt);
        seqs.push(PagedSeq {
            query_start: i,
            query_len: 1,
            context_len: ctx,
            block_table: bt,
        });
    }
    let s = contexts.len();
    let cache = Tensor::from_vec(
        rng.vec(num_blocks * block_size * d, 1.0),
        (num_blocks, block_size, d),
        &Device::Cpu,
    )?
    .to_dtype(dtype)?;
    let q = Tensor::from_vec(rng.vec(s * heads * d, 1.0), (s, heads, d), &Device::Cpu)?.to_dtype(dtype)?;
    let scale = 1.0 / (192f64).sqrt();
    let want = host(&paged_mla_attention(
        &q,
        &cache,
        &PagedBatch::from(seqs.clone()),
        dv,
        scale,
    )?);
    let params = MlaDecodeParams {
        value_dim: dv,
        scale,
        max_context_len: *contexts.iter().max().unwrap(),
        num_splits: splits,
    };
    let got = paged_mla_decode(
        &q.to_device(&dev)?,
        &cache.to_device(&dev)?,
        &Tensor::from_vec(table, (s, max_blocks), &dev)?,
        &Tensor::from_vec(contexts.iter().map(|&c| c as u32).collect::<Vec<_>>(), s, &dev)?,
        &params,
    )?;
    assert_eq!(got.dims(), &[s, heads, dv]);
    let got = host(&got);
    let case = format!("{dtype:?} heads={heads} block={block_size} contexts={contexts:?} splits={splits:?}");
    crate::attention::assert_rows_close(&case, &got, &want, heads * dv);
    Ok(())
}

#[test]
fn paged_mla_decode_matches_reference() -> Result<()> {
    let contexts = [1usize, 17, 4096, 300, 64];
    for dtype in [DType::BF16, DType::F32] {
        check_decode(dtype, 16, 16, &contexts, None)?;
        check_decode(dtype, 16, 64, &contexts, Some(1))?;
        check_decode(dtype, 20, 16, &contexts, Some(7))?; // partial head group, empty splits
    }
    check_decode(DType::BF16, 128, 64, &[4096], None)?; // one long sequence, many splits
    check_decode(DType::BF16, 1, 16, &[1], None)?;
    Ok(())
}

#[test]
fn argmax_rows_matches_the_host_rule() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(23);
    // Rows of a 102400-token vocabulary (DeepSeek-V2's) and odd widths, with planted ties at
    // the maximum (the lower index wins), NaNs (never chosen) and an all-NaN row (0).
    for (rows, vocab) in [(1usize, 102400usize), (37, 102400), (5, 1), (3, 1000)] {
        let mut x = rng.vec(rows * vocab, 4.0);
        for r in 0..rows {
            let row = &mut x[r * vocab..(r + 1) * vocab];
            if vocab > 10 {
                let (a, b) = ((r * 7919) % vocab, (r * 104729 + 3) % vocab);
                row[a] = 9.0;
                row[b] = 9.0;
                row[(r * 31) % vocab] = f32::NAN;
            }
            if r == 2 {
                row.fill(f32::NAN);
            }
        }
        let want: Vec<u32> = x.chunks(vocab).map(moe_kernels::sampling::argmax).collect();
        let t = Tensor::from_vec(x, (rows, vocab), &dev)?;
        assert_eq!(moe_kernels::sampling::argmax_rows(&t)?, want, "{rows} x {vocab}");
        // A view without each row's last column (row stride > width) is read in place.
        if vocab > 1 {
            let values = host(&t);
            let want: Vec<u32> = values
                .chunks(vocab)
                .map(|r| moe_kernels::sampling::argmax(&r[..vocab - 1]))
                .collect();
            assert_eq!(moe_kernels::sampling::argmax_rows(&t.narrow(1, 0, vocab - 1)?)?, want);
        }
    }
    Ok(())
}
