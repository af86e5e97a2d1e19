//! GPU tests of the attention entry points as the model calls them ([`paged_mla_attention`],
//! [`paged_gqa_attention`] with a [`PagedBatch`]): one mixed step of decode tokens, a prompt
//! chunk after a cached prefix, a whole prompt and uncovered trailing rows, all in one launch
//! of the row kernels, against the CPU's answer on the same (pre-rounded) inputs. Also: the
//! batch's device tables are uploaded once and reused by later calls of the step.
//!
//! Tolerances as [`crate::ops`]' decode checks: the kernels sum in another order and, in bf16,
//! see queries rounded to bf16 (the CPU reads them in f32): abs error <= 2e-2 + 1e-2 |ref| and
//! cosine >= 0.9999 per row. A wrong row-to-sequence mapping or causal limit moves rows by far
//! more.
use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::{paged_gqa_attention, paged_mla_attention, PagedBatch, PagedSeq};

use crate::common::{gpu, host, Rng};

/// `(query_len, context_len)` of each sequence of the mixed step, then 3 uncovered rows.
const STEP: [(usize, usize); 5] = [(1, 1), (1, 300), (40, 100), (17, 17), (1, 2049)];
const TRAILING_ROWS: usize = 3;

/// The step's sequences over scrambled blocks of `block_size`, and the pool size.
fn mixed_step(block_size: usize, rng: &mut Rng) -> (Vec<PagedSeq>, usize, usize) {
    let needed: usize = STEP.iter().map(|&(_, c)| c.div_ceil(block_size)).sum();
    let num_blocks = needed + 5;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut ids);
    let (mut seqs, mut row, mut next) = (Vec::new(), 0, 0);
    for &(query_len, context_len) in &STEP {
        let nb = context_len.div_ceil(block_size);
        seqs.push(PagedSeq {
            query_start: row,
            query_len,
            context_len,
            block_table: ids[next..next + nb].to_vec(),
        });
        row += query_len;
        next += nb;
    }
    (seqs, num_blocks, row + TRAILING_ROWS)
}

/// Rows of `row` values within `2e-2 + 1e-2 |ref|` and cosine >= 0.9999 of the reference.
pub(crate) fn assert_rows_close(case: &str, got: &[f32], want: &[f32], row: usize) {
    assert_eq!(got.len(), want.len(), "{case}");
    for (i, (g, w)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() <= 2e-2 + 1e-2 * b.abs(), "{case} row {i}: {a} vs {b}");
        }
        let dot: f64 = g.iter().zip(w).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        let n = (g.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
            * w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>())
        .sqrt();
        assert!(n == 0.0 || dot / n >= 0.9999, "{case} row {i}: cosine {}", dot / n);
    }
}

#[test]
fn mla_mixed_step_matches_the_cpu() -> Result<()> {
    let dev = gpu();
    for (dtype, block_size) in [(DType::BF16, 16), (DType::F32, 64)] {
        let mut rng = Rng(91 + block_size as u64);
        let (seqs, num_blocks, rows) = mixed_step(block_size, &mut rng);
        let (heads, d, dv) = (16usize, 576usize, 512usize);
        let cache = Tensor::from_vec(
            rng.vec(num_blocks * block_size * d, 1.0),
            (num_blocks, block_size, d),
            &Device::Cpu,
        )?
        .to_dtype(dtype)?;
        // Queries in f32 as absorb_queries gives them, pre-rounded to the cache dtype so both
        // devices read the same values.
        let q = Tensor::from_vec(rng.vec(rows * heads * d, 1.0), (rows, heads, d), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?;
        let scale = 1.0 / 192f64.sqrt();
        let batch = PagedBatch::new(seqs);
        let want = host(&paged_mla_attention(&q, &cache, &batch, dv, scale)?);
        let (q_gpu, cache_gpu) = (q.to_device(&dev)?, cache.to_device(&dev)?);
        let got = paged_mla_attention(&q_gpu, &cache_gpu, &batch, dv, scale)?;
        assert_eq!(got.dims(), &[rows, heads, dv]);
        assert_eq!(got.dtype(), DType::F32);
        let got = host(&got);
        assert_rows_close(&format!("mla {dtype:?} block {block_size}"), &got, &want, heads * dv);
        assert!(got[(rows - TRAILING_ROWS) * heads * dv..].iter().all(|&v| v == 0.0));
        // A second layer of the step reuses the uploaded tables: same answer.
        let again = host(&paged_mla_attention(&q_gpu, &cache_gpu, &batch, dv, scale)?);
        assert_eq!(again, got, "mla {dtype:?}: second call of the step");
    }
    Ok(())
}

#[test]
fn gqa_mixed_step_matches_the_cpu() -> Result<()> {
    let dev = gpu();
    for (dtype, block_size, heads, kv_heads, d) in [
        (DType::BF16, 16, 32, 4, 128),
        (DType::F32, 32, 12, 12, 64),
        (DType::BF16, 16, 8, 1, 256),
    ] {
        let mut rng = Rng(57 + (heads + d) as u64);
        let (seqs, num_blocks, rows) = mixed_step(block_size, &mut rng);
        let shape = (num_blocks, block_size, kv_heads, d);
        let n = num_blocks * block_size * kv_heads * d;
        let k = Tensor::from_vec(rng.vec(n, 1.0), shape, &Device::Cpu)?.to_dtype(dtype)?;
        let v = Tensor::from_vec(rng.vec(n, 1.0), shape, &Device::Cpu)?.to_dtype(dtype)?;
        let q = Tensor::from_vec(rng.vec(rows * heads * d, 1.0), (rows, heads, d), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?;
        let scale = 1.0 / (d as f64).sqrt();
        let batch = PagedBatch::new(seqs);
        let want = host(&paged_gqa_attention(&q, &k, &v, &batch, scale)?);
        let got = paged_gqa_attention(
            &q.to_device(&dev)?,
            &k.to_device(&dev)?,
            &v.to_device(&dev)?,
            &batch,
            scale,
        )?;
        assert_eq!(got.dims(), &[rows, heads, d]);
        let got = host(&got);
        let case = format!("gqa {dtype:?} {heads}/{kv_heads} heads of {d}, block {block_size}");
        assert_rows_close(&case, &got, &want, heads * d);
        assert!(
            got[(rows - TRAILING_ROWS) * heads * d..].iter().all(|&v| v == 0.0),
            "{case}"
        );
    }
    Ok(())
}
