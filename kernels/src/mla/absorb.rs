//! The absorbed products around MLA attention, per head: queries into the latent space
//! (`q_nope · W_UK`, joined with the rotated `q_pe`), and the attention's latent output back
//! to value space (`· W_UV`). On the CPU every (head, tile of weight rows) pair is one job of
//! [`crate::dense::grouped`] reading the activations in place; other devices run candle's
//! batched matmuls.

use candle_core::{DType, Result, Tensor};

use crate::dense::grouped::{grouped_product, GroupLayout};
use crate::dense::{host_f32, with_weight_rows};

/// The absorbed queries of [`super::paged_mla_attention`].
///
/// * `q_nope`: `[tokens, heads, nope]` (any layout, any float dtype).
/// * `q_pe`: `[tokens, heads, rope]`, already rotated.
/// * `w_uk_t`: `W_UK` per head, transposed: `[heads, latent, nope]`.
///
/// Returns `[tokens, heads, latent + rope]` f32: `q_nope[t, h] · W_UK[h]`, then `q_pe[t, h]`.
pub fn absorb_queries(q_nope: &Tensor, q_pe: &Tensor, w_uk_t: &Tensor) -> Result<Tensor> {
    let (tokens, heads, nope) = q_nope.dims3()?;
    let (_, _, rope) = q_pe.dims3()?;
    let (w_heads, latent, w_nope) = w_uk_t.dims3()?;
    if w_heads != heads || w_nope != nope || q_pe.dims()[..2] != [tokens, heads] {
        candle_core::bail!(
            "absorb_queries: q_nope {:?}, q_pe {:?} and W_UKᵀ {:?} disagree",
            q_nope.shape(),
            q_pe.shape(),
            w_uk_t.shape()
        );
    }
    if !(q_nope.device().is_cpu() && w_uk_t.device().is_cpu()) {
        // [heads, tokens, nope] x [heads, nope, latent] -> [tokens, heads, latent].
        let q_latent = q_nope
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&w_uk_t.transpose(1, 2)?)?
            .transpose(0, 1)?;
        return Tensor::cat(&[q_latent.to_dtype(DType::F32)?, q_pe.to_dtype(DType::F32)?], 2);
    }
    let width = latent + rope;
    let mut out = per_head_product(q_nope, w_uk_t, width)?;
    let pe = host_f32(q_pe)?;
    for (dst, src) in out.chunks_exact_mut(width).zip(pe.chunks_exact(rope.max(1))) {
        dst[latent..].copy_from_slice(&src[..rope]);
    }
    Tensor::from_vec(out, (tokens, heads, width), q_nope.device())
}

/// The attention's output back to value space: `attn` `[tokens, heads, latent]` (f32) times
/// `W_UV` per head, `w_uv` `[heads, value, latent]` (the rows `kv_b_proj` holds), as
/// `[tokens, heads * value]` in `dtype`.
pub fn expand_values(attn: &Tensor, w_uv: &Tensor, dtype: DType) -> Result<Tensor> {
    let (tokens, heads, latent) = attn.dims3()?;
    let (w_heads, value, w_latent) = w_uv.dims3()?;
    if w_heads != heads || w_latent != latent {
        candle_core::bail!(
            "expand_values: attention {:?} and W_UV {:?} disagree",
            attn.shape(),
            w_uv.shape()
        );
    }
    if !(attn.device().is_cpu() && w_uv.device().is_cpu()) {
        // [heads, tokens, latent] x [heads, latent, value] -> [tokens, heads * value].
        return attn
            .to_dtype(dtype)?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&w_uv.transpose(1, 2)?)?
            .transpose(0, 1)?
            .reshape((tokens, heads * value));
    }
    let out = per_head_product(attn, w_uv, value)?;
    Tensor::from_vec(out, (tokens, heads * value), attn.device())?.to_dtype(dtype)
}

/// `x` `[tokens, heads, k]` times each head's rows of `w` `[heads, n, k]` on the CPU, as
/// `[tokens, heads, width]` f32 (`width >= n`; each head's columns past `n` left zero).
fn per_head_product(x: &Tensor, w: &Tensor, width: usize) -> Result<Vec<f32>> {
    let (tokens, heads, k) = x.dims3()?;
    let n = w.dims3()?.1;
    let x = host_f32(x)?;
    let mut out = vec![0f32; tokens * heads * width];
    let layout = GroupLayout {
        x_rs: heads * k,
        x_gs: k,
        out_rs: heads * width,
        out_gs: width,
    };
    with_weight_rows(w, |w| grouped_product(&x, tokens, heads, k, w, n, layout, &mut out))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::test_values::values;

    /// The CPU path against candle's batched matmuls (what other devices run) on DeepSeek's
    /// per-head widths, at a decode batch and a prompt chunk, f32 and bf16 weights.
    #[test]
    fn cpu_products_match_candles_batched_matmuls() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, nope, rope, latent, value) = (4usize, 128usize, 64usize, 512usize, 128usize);
        for dtype in [DType::F32, DType::BF16] {
            let w_uk_t =
                Tensor::from_vec(values(heads * latent * nope, 1), (heads, latent, nope), &dev)?.to_dtype(dtype)?;
            let w_uv =
                Tensor::from_vec(values(heads * value * latent, 2), (heads, value, latent), &dev)?.to_dtype(dtype)?;
            for tokens in [1usize, 3, 40] {
                // q_nope as the model has it: a narrow view of [tokens, heads, nope + rope].
                let q = Tensor::from_vec(
                    values(tokens * heads * (nope + rope), 3),
                    (tokens, heads, nope + rope),
                    &dev,
                )?
                .to_dtype(dtype)?;
                let q_nope = q.narrow(2, 0, nope)?;
                let q_pe = q.narrow(2, nope, rope)?.contiguous()?;
                let got = absorb_queries(&q_nope, &q_pe, &w_uk_t)?;
                let want = Tensor::cat(
                    &[
                        q_nope
                            .to_dtype(DType::F32)?
                            .transpose(0, 1)?
                            .contiguous()?
                            .matmul(&w_uk_t.to_dtype(DType::F32)?.transpose(1, 2)?)?
                            .transpose(0, 1)?,
                        q_pe.to_dtype(DType::F32)?,
                    ],
                    2,
                )?;
                assert_close(&got, &want, dtype, "absorb")?;

                let attn = Tensor::from_vec(values(tokens * heads * latent, 4), (tokens, heads, latent), &dev)?;
                let got = expand_values(&attn, &w_uv, DType::F32)?;
                let want = attn
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .matmul(&w_uv.to_dtype(DType::F32)?.transpose(1, 2)?)?
                    .transpose(0, 1)?
                    .reshape((tokens, heads * value))?;
                assert_close(&got, &want, dtype, "expand")?;
            }
        }
        Ok(())
    }

    fn assert_close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) -> Result<()> {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let (got, want) = (
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?,
        );
        // Sums of 128-512 products of values in [-1, 1]: f32 reorderings stay far below 1e-3;
        // bf16 weights on AMX meet the activations rounded to bf16 (the expand's f32 input).
        let tol = if dtype == DType::F32 { 1e-3 } else { 0.25 };
        for (n, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= tol, "{what} {dtype:?} element {n}: {a} vs {b}");
        }
        Ok(())
    }
}
