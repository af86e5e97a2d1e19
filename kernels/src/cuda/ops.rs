//! Element-wise hot-path kernels: latent cache write, fused residual add + RMSNorm, RoPE.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

use super::args::{Args, Held, OutBuf};
use super::{cfg, check, cuda_device, launch_err, load, ptx, suffix};

/// Writes `[c_kv[t] ++ k_pe[t]]` into cache row `slots[t]`, in place (the CUDA counterpart of
/// [`crate::write_latent_cache`] without the concatenation).
///
/// * `cache`: `[num_blocks, block_size, kv_lora + rope]` bf16 or f32, contiguous, updated in place.
/// * `c_kv`: `[T, kv_lora]`, `k_pe`: `[T, rope]`, the cache dtype; rows may be strided (views of a
///   wider projection output) but each row must be contiguous.
/// * `slots`: `[T]` i64 (negative = padding, skipped) or u32 (`u32::MAX` = padding, skipped).
///   Slots beyond the cache are skipped by the kernel; duplicates are a caller error.
pub fn latent_cache_write(cache: &Tensor, c_kv: &Tensor, k_pe: &Tensor, slots: &Tensor) -> Result<()> {
    cuda_device(cache)?;
    let (_, _, dim) = cache.dims3()?;
    let (t, kv_lora) = c_kv.dims2()?;
    let (t2, rope) = k_pe.dims2()?;
    if t2 != t || slots.dims1()? != t || kv_lora + rope != dim {
        bail!(
            "latent_cache_write: c_kv {:?}, k_pe {:?}, slots {:?}, cache {:?}",
            c_kv.shape(),
            k_pe.shape(),
            slots.shape(),
            cache.shape()
        );
    }
    if t == 0 {
        return Ok(());
    }
    for (x, name) in [(c_kv, "c_kv"), (k_pe, "k_pe")] {
        if x.dtype() != cache.dtype() || x.stride()[1] != 1 {
            bail!(
                "latent_cache_write: {name} must be {:?} with contiguous rows",
                cache.dtype()
            );
        }
    }
    let parts = [
        RowPart {
            src: c_kv,
            row_stride: c_kv.stride()[0],
            width: kv_lora,
        },
        RowPart {
            src: k_pe,
            row_stride: k_pe.stride()[0],
            width: rope,
        },
    ];
    scatter_rows("latent_cache_write", cache, &parts, slots)
}

/// `width` values a row of `src`, rows `row_stride` elements apart (each row contiguous).
pub(crate) struct RowPart<'a> {
    pub src: &'a Tensor,
    pub row_stride: usize,
    pub width: usize,
}

/// Writes row `t` of the concatenation of `parts` (one or two; their widths sum to the cache
/// row) into cache row `slots[t]`, in place, with the `latent_cache_write_*` kernel: the
/// latent cache writes `c_kv ++ k_pe`, the GQA caches one part per cache
/// ([`super::kv_cache_write`]). `cache` is `[num_blocks, block_size, dim]`, contiguous (a
/// flattened view of a contiguous 4-d cache shares its storage); `slots` as in
/// [`latent_cache_write`]. The parts have the cache dtype (checked by the callers).
pub(crate) fn scatter_rows(op: &str, cache: &Tensor, parts: &[RowPart], slots: &Tensor) -> Result<()> {
    let dev = cuda_device(cache)?;
    let (num_blocks, block_size, dim) = cache.dims3()?;
    let t = slots.dims1()?;
    if parts.is_empty() || parts.len() > 2 || parts.iter().map(|p| p.width).sum::<usize>() != dim {
        bail!("{op}: row parts do not add up to cache rows of {dim}");
    }
    if t == 0 {
        return Ok(());
    }
    let dtype = cache.dtype();
    check(cache, "cache", dtype, &dev)?;
    let slot_kind = match slots.dtype() {
        DType::I64 => "i64",
        DType::U32 => "u32",
        dt => bail!("{op}: slots must be i64 or u32, not {dt:?}"),
    };
    check(slots, "slots", slots.dtype(), &dev)?;
    let func = load(
        &dev,
        "latent_cache_write",
        ptx::LATENT_CACHE_WRITE,
        &format!("latent_cache_write_{}_{slot_kind}", suffix(dtype)?),
    )?;
    let stream = dev.cuda_stream();
    // The cache is written in place (ordered by the stream; see `args`).
    let mut inputs = vec![slots, cache];
    inputs.extend(parts.iter().map(|p| p.src));
    let held = Held::new(&inputs);
    let mut args = Args::new(&stream);
    let (p_slots, p_cache) = (args.input(&held, 0)?, args.input(&held, 1)?);
    let p_a = args.input(&held, 2)?;
    let s_a = parts[0].row_stride as i64;
    let w_a = parts[0].width as i32;
    // One part: the second source is empty (width 0, never dereferenced).
    let (p_b, s_b, w_b) = match parts.get(1) {
        Some(b) => (args.input(&held, 3)?, b.row_stride as i64, b.width as i32),
        None => (p_a, 0i64, 0i32),
    };
    let num_slots = (num_blocks * block_size) as i64;
    let mut b = stream.launch_builder(&func);
    b.arg(&p_a).arg(&s_a).arg(&p_b).arg(&s_b).arg(&p_slots).arg(&p_cache);
    b.arg(&w_a).arg(&w_b).arg(&num_slots);
    unsafe { b.launch(cfg((t as u32, 1, 1), 128, 0)) }.map_err(launch_err)?;
    Ok(())
}

/// Fused residual add + RMSNorm: `h = x + residual` (the new residual stream, rounded to the
/// dtype) and `y = dtype(h / sqrt(mean(h²) + eps)) * weight` (the rounding order of
/// [`crate::reference::rmsnorm_residual`]), in one pass. Returns `(h, y)`; with `residual =
/// None` it is a plain RMSNorm and `h` is `x` itself. Nothing is written in place.
///
/// * `x`: `[rows, dim]` bf16 or f32, contiguous; `residual`: same; `weight`: `[dim]`, same dtype.
pub fn rmsnorm_residual(x: &Tensor, residual: Option<&Tensor>, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(x)?;
    let (rows, dim) = x.dims2()?;
    let dtype = x.dtype();
    check(x, "x", dtype, &dev)?;
    check(weight, "weight", dtype, &dev)?;
    if weight.dims1()? != dim {
        bail!("rmsnorm_residual: weight {:?} for rows of {dim}", weight.shape());
    }
    if let Some(r) = residual {
        check(r, "residual", dtype, &dev)?;
        if r.dims() != x.dims() {
            bail!("rmsnorm_residual: residual {:?} vs x {:?}", r.shape(), x.shape());
        }
    }
    if rows == 0 {
        let empty = Tensor::zeros((0, dim), dtype, x.device())?;
        return Ok((if residual.is_some() { empty.clone() } else { x.clone() }, empty));
    }
    // Both outputs are written whole.
    let mut out = OutBuf::uninit(&dev, (rows, dim), dtype)?;
    let mut h = match residual {
        Some(_) => Some(OutBuf::uninit(&dev, (rows, dim), dtype)?),
        None => None,
    };
    let func = load(
        &dev,
        "rmsnorm_residual",
        ptx::RMSNORM_RESIDUAL,
        &format!("rmsnorm_residual_{}", suffix(dtype)?),
    )?;
    let stream = dev.cuda_stream();
    let mut inputs = vec![x, weight];
    inputs.extend(residual);
    let held = Held::new(&inputs);
    let mut args = Args::new(&stream);
    let (p_x, p_w) = (args.input(&held, 0)?, args.input(&held, 1)?);
    let p_r = match residual {
        Some(_) => args.input(&held, 2)?,
        None => 0u64,
    };
    let p_h = h.as_mut().map_or(0u64, |h| args.output(h));
    let p_out = args.output(&mut out);
    let (dim_i, eps_f) = (dim as i32, eps as f32);
    let threads = if dim >= 4096 {
        512
    } else if dim >= 1024 {
        256
    } else {
        128
    };
    let mut b = stream.launch_builder(&func);
    b.arg(&p_x)
        .arg(&p_r)
        .arg(&p_h)
        .arg(&p_w)
        .arg(&p_out)
        .arg(&dim_i)
        .arg(&eps_f);
    unsafe { b.launch(cfg((rows as u32, 1, 1), threads, 0)) }.map_err(launch_err)?;
    drop(args);
    let h = h.map_or_else(|| x.clone(), OutBuf::into_tensor);
    Ok((h, out.into_tensor()))
}

/// Rotates `q_pe` and `k_pe` in place by the step's per-token tables (row `t` rotates token
/// `t`; every token is rotated).
///
/// * `q_pe`: `[T, H, rot]` (any token / head strides, last dim contiguous) or `None`.
/// * `k_pe`: `[T, rot]` (any token stride, last dim contiguous) or `None`.
/// * `cos`, `sin`: `[T, rot/2]` f32, contiguous, YaRN frequencies and attention factor already
///   applied (as `moe-models`' `Rope::cos_sin` computes them for a step's positions).
/// * `interleaved`: pairs `(x[2i], x[2i+1])` (DeepSeek) or `(x[i], x[i + rot/2])`.
pub fn rope_inplace(
    q_pe: Option<&Tensor>,
    k_pe: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<()> {
    let first = q_pe
        .or(k_pe)
        .ok_or_else(|| candle_core::Error::Msg("rope_inplace: no q_pe or k_pe".into()))?;
    let dev = cuda_device(first)?;
    let dtype = first.dtype();
    let (t, half) = cos.dims2()?;
    let rot = 2 * half;
    check(cos, "cos", DType::F32, &dev)?;
    check(sin, "sin", DType::F32, &dev)?;
    if sin.dims() != cos.dims() {
        bail!("rope_inplace: cos {:?} vs sin {:?}", cos.shape(), sin.shape());
    }
    let (mut heads, mut q_tok, mut q_head) = (0usize, 0i64, 0i64);
    if let Some(q) = q_pe {
        let (tq, h, r) = q.dims3()?;
        if tq != t || r != rot || q.dtype() != dtype || q.stride()[2] != 1 {
            bail!(
                "rope_inplace: q_pe {:?} ({:?}) for tables of {t} tokens, rot {rot}",
                q.shape(),
                q.dtype()
            );
        }
        heads = h;
        q_tok = q.stride()[0] as i64;
        q_head = q.stride()[1] as i64;
    }
    let mut k_tok = 0i64;
    if let Some(k) = k_pe {
        let (tk, r) = k.dims2()?;
        if tk != t || r != rot || k.dtype() != dtype || k.stride()[1] != 1 {
            bail!(
                "rope_inplace: k_pe {:?} ({:?}) for tables of {t} tokens, rot {rot}",
                k.shape(),
                k.dtype()
            );
        }
        k_tok = k.stride()[0] as i64;
    }
    if t == 0 || half == 0 {
        return Ok(());
    }
    let func = load(&dev, "rope", ptx::ROPE, &format!("rope_{}", suffix(dtype)?))?;
    let stream = dev.cuda_stream();
    // q_pe and k_pe are rotated in place (ordered by the stream; see `args`).
    let mut inputs = vec![cos, sin];
    inputs.extend(q_pe);
    inputs.extend(k_pe);
    let held = Held::new(&inputs);
    let mut args = Args::new(&stream);
    let (p_cos, p_sin) = (args.input(&held, 0)?, args.input(&held, 1)?);
    let p_q = match q_pe {
        Some(_) => args.input(&held, 2)?,
        None => 0u64,
    };
    let p_k = match k_pe {
        Some(_) => args.input(&held, 2 + q_pe.is_some() as usize)?,
        None => 0u64,
    };
    let (heads_i, rot_i, inter_i) = (heads as i32, rot as i32, interleaved as i32);
    let pairs = (heads + k_pe.is_some() as usize) * half;
    let threads = pairs.next_multiple_of(32).clamp(32, 512) as u32;
    let mut b = stream.launch_builder(&func);
    b.arg(&p_q).arg(&q_tok).arg(&q_head).arg(&heads_i).arg(&p_k).arg(&k_tok);
    b.arg(&p_cos).arg(&p_sin).arg(&rot_i).arg(&inter_i);
    unsafe { b.launch(cfg((t as u32, 1, 1), threads, 0)) }.map_err(launch_err)?;
    Ok(())
}
