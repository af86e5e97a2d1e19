//! Paged GQA on the GPU: the K/V cache write (the latent cache-write kernel over flattened
//! rows) and decode attention, one query token per sequence, with split-KV and a log-sum-exp
//! merge. Kernel: `kernels/cuda/paged_gqa_decode.cu`; the splits are merged by
//! `paged_mla_decode.cu`'s merge kernel (the workspace layout is the same).

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

use super::args::{Args, Held, OutBuf};
use super::ops::{scatter_rows, RowPart};
use super::{cfg, check, cuda_device, launch_err, load, ptx, suffix};

/// Threads per CTA and KV tokens per tile (`THREADS`, `TILE` in the kernel).
const THREADS: u32 = 128;
const TILE: usize = 32;
/// Head dims the kernel is compiled for (keys and values alike).
pub const GQA_HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// Fewest KV tokens worth a split of their own (not tuned on a GPU yet); at most
/// `decode::MAX_SPLITS` splits.
const MIN_TOKENS_PER_SPLIT: usize = 128;

/// Arguments of [`paged_gqa_decode`] besides the tensors.
#[derive(Debug, Clone)]
pub struct GqaDecodeParams {
    /// Softmax scale (usually `head_dim^-0.5`).
    pub scale: f64,
    /// Largest `context_lens` entry (the scheduler knows it; sizes the split plan). Positions
    /// past it are not visited, so it must not be an underestimate; it is clamped to the
    /// block table's reach.
    pub max_context_len: usize,
    /// Forces the number of KV splits (tests, benchmarks); `None` picks one so that about two
    /// CTAs per SM are busy (see [`gqa_decode_split_plan`]).
    pub num_splits: Option<usize>,
}

/// How a kv head's `group` query heads map onto CTAs: `(compiled heads per CTA (a power of
/// two), heads per CTA, CTAs per kv head)`. Up to 16 heads (8 at head dim 256) share one CTA,
/// so each K/V row is read once per group; larger groups split into equal chunks.
fn head_plan(group: usize, head_dim: usize) -> (usize, usize, usize) {
    let max = if head_dim == 256 { 8 } else { 16 };
    let chunks = group.div_ceil(max).max(1);
    let per_cta = group.div_ceil(chunks).max(1);
    (per_cta.next_power_of_two(), per_cta, chunks)
}

/// `(num_splits, tokens_per_split)` for `num_seqs` sequences of `num_heads` query heads over
/// `kv_heads` kv heads of `head_dim`, contexts up to `max_context_len`, on a GPU with
/// `sm_count` SMs: enough splits that `seqs * kv_heads * chunks * splits` is about
/// `2 * sm_count`, none shorter than 128 tokens, at most 64; `tokens_per_split` is a
/// multiple of the 32-token tile. `forced` fixes the number of splits (some may be empty).
pub fn gqa_decode_split_plan(
    num_seqs: usize,
    num_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_context_len: usize,
    sm_count: usize,
    forced: Option<usize>,
) -> (usize, usize) {
    let group = num_heads.checked_div(kv_heads).unwrap_or(1).max(1);
    let (_, _, chunks) = head_plan(group, head_dim);
    let ctas = (num_seqs * kv_heads * chunks).max(1);
    super::decode::split_kv(ctas, max_context_len, MIN_TOKENS_PER_SPLIT, TILE, sm_count, forced)
}

/// Grouped-query attention of one query token per sequence over its paged K/V cache: query
/// head `h` reads kv head `h / (num_heads / kv_heads)`.
///
/// * `q`: `[S, H, D]` bf16 or f32, rotated, last dim contiguous (token and head strides free).
/// * `k_cache`: `[num_blocks, block_size, kv_heads, D]`, `v_cache`: `[num_blocks, block_size,
///   kv_heads, D]` (the kernel needs `v_head_dim == head_dim`), same dtype as `q`,
///   contiguous, 16-byte aligned; `D` is 64, 128 or 256; `H` a multiple of `kv_heads`.
/// * `block_tables`: `[S, max_blocks]` u32, contiguous; row `s` lists the blocks of sequence
///   `s` in order (as [`crate::PagedSeq::block_table`]).
/// * `context_lens`: `[S]` u32 (cached tokens including this step's, each `<=
///   p.max_context_len`). The kernel clamps a context to `max_blocks * block_size` and skips
///   tokens in blocks `>= num_blocks`; a sequence with nothing to attend gets a zero row.
///
/// Returns `[S, H, D]` in `q`'s dtype; agrees with [`crate::paged_gqa_attention`] for
/// `query_len = 1` up to accumulation order and the output's rounding.
pub fn paged_gqa_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    p: &GqaDecodeParams,
) -> Result<Tensor> {
    launch(q, k_cache, v_cache, block_tables, None, context_lens, p)
}

/// Paged GQA attention of every query row of a step, decode tokens and prompt chunks in any
/// mix (the CUDA path of [`crate::paged_gqa_attention`]): row `r` attends over the first
/// `rows.visible[r]` positions of sequence `rows.row_seq[r]`'s blocks. `q`: `[R, H, D]` in
/// the cache dtype (`R = rows.num_rows`), caches as in [`paged_gqa_decode`]. Returns `[R, H,
/// D]` in `q`'s dtype (zero rows where `visible` is 0).
pub fn paged_gqa_rows(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    rows: &crate::paged::DeviceRows,
    scale: f64,
) -> Result<Tensor> {
    let p = GqaDecodeParams {
        scale,
        max_context_len: rows.max_visible,
        num_splits: None,
    };
    super::in_row_chunks(q, rows, |q, row_seq, visible| {
        launch(q, k_cache, v_cache, &rows.block_tables, Some(row_seq), visible, &p)
    })
}

/// `row_seq`: `[S]` u32, the `block_tables` row each query row reads (`None`: row `s` reads
/// row `s`).
fn launch(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_tables: &Tensor,
    row_seq: Option<&Tensor>,
    context_lens: &Tensor,
    p: &GqaDecodeParams,
) -> Result<Tensor> {
    const OP: &str = "paged_gqa_decode";
    let dev = cuda_device(q)?;
    let (s, h, d) = q.dims3()?;
    let (num_blocks, block_size, kv_heads, kd) = k_cache.dims4()?;
    let (vb, vbs, vh, vd) = v_cache.dims4()?;
    let (table_rows, max_blocks) = block_tables.dims2()?;
    let rows_ok = match row_seq {
        Some(r) => r.dims1()? == s,
        None => table_rows == s,
    };
    if (vb, vbs, vh) != (num_blocks, block_size, kv_heads) || kd != d || !rows_ok || context_lens.dims1()? != s {
        bail!(
            "{OP}: q {:?}, k_cache {:?}, v_cache {:?}, block_tables {:?}, context_lens {:?}",
            q.shape(),
            k_cache.shape(),
            v_cache.shape(),
            block_tables.shape(),
            context_lens.shape()
        );
    }
    if vd != d || !GQA_HEAD_DIMS.contains(&d) {
        bail!("{OP}: head dims {d} (keys) and {vd} (values) unsupported: both must be one of {GQA_HEAD_DIMS:?}");
    }
    if kv_heads == 0 || h == 0 || !h.is_multiple_of(kv_heads) {
        bail!("{OP}: {h} query heads do not group over {kv_heads} kv heads");
    }
    let dtype = q.dtype();
    let sfx = suffix(dtype)?;
    if q.stride()[2] != 1 {
        bail!("{OP}: q must have a contiguous last dim");
    }
    check(k_cache, "k_cache", dtype, &dev)?;
    check(v_cache, "v_cache", dtype, &dev)?;
    check(block_tables, "block_tables", DType::U32, &dev)?;
    check(context_lens, "context_lens", DType::U32, &dev)?;
    if let Some(r) = row_seq {
        check(r, "row_seq", DType::U32, &dev)?;
    }
    if s > 65535 {
        bail!("{OP}: {s} sequences in one launch (at most 65535)");
    }
    if block_size == 0 || block_size > i32::MAX as usize {
        bail!("{OP}: block size {block_size}");
    }
    if s == 0 {
        return Tensor::zeros((s, h, d), dtype, q.device());
    }
    // Every element of the output (and, with splits, of the workspace) is written.
    let mut out = OutBuf::uninit(&dev, (s, h, d), dtype)?;
    let stream = dev.cuda_stream();
    let sm_count = super::sm_count(&dev)?;
    let group = h / kv_heads;
    let (compiled, per_cta, chunks) = head_plan(group, d);
    let max_ctx = p.max_context_len.min(max_blocks * block_size);
    let (splits, tokens_per_split) = gqa_decode_split_plan(s, h, kv_heads, d, max_ctx, sm_count, p.num_splits);
    if splits > 65535 || tokens_per_split > i32::MAX as usize {
        bail!("{OP}: {splits} splits of {tokens_per_split} tokens");
    }
    // Workspace (unused with one split): partial outputs and per-head (max, sum).
    let ws_n = if splits > 1 { s * splits * h } else { 1 };
    let mut ws_acc = OutBuf::uninit(&dev, ws_n * d, DType::F32)?;
    let mut ws_ml = OutBuf::uninit(&dev, ws_n * 2, DType::F32)?;

    let func = load(
        &dev,
        "paged_gqa_decode",
        ptx::PAGED_GQA_DECODE,
        &format!("paged_gqa_decode_{sfx}_d{d}_g{compiled}"),
    )?;
    let mut inputs: Vec<&Tensor> = vec![q, k_cache, v_cache, block_tables, context_lens];
    inputs.extend(row_seq);
    let held = Held::new(&inputs);
    let mut args = Args::new(&stream);
    let (p_q, p_k, p_v) = (args.input(&held, 0)?, args.input(&held, 1)?, args.input(&held, 2)?);
    if p_k % 16 != 0 || p_v % 16 != 0 {
        bail!("{OP}: caches must be 16-byte aligned");
    }
    let (p_bt, p_cl) = (args.input(&held, 3)?, args.input(&held, 4)?);
    let p_rows = match row_seq {
        Some(_) => args.input(&held, 5)?,
        None => 0u64,
    };
    let (p_out, p_wa, p_wm) = (args.output(&mut out), args.output(&mut ws_acc), args.output(&mut ws_ml));
    let (q_seq, q_head, bt_stride) = (q.stride()[0] as i64, q.stride()[1] as i64, max_blocks as i64);
    let (h_i, kvh_i, group_i, per_cta_i, chunks_i) =
        (h as i32, kv_heads as i32, group as i32, per_cta as i32, chunks as i32);
    let (bsz_i, nb_i, tps_i) = (block_size as i32, num_blocks as i64, tokens_per_split as i32);
    let scale_log2 = (p.scale * std::f64::consts::LOG2_E) as f32;
    let mut b = stream.launch_builder(&func);
    b.arg(&p_q).arg(&q_seq).arg(&q_head).arg(&p_k).arg(&p_v);
    b.arg(&p_bt)
        .arg(&bt_stride)
        .arg(&p_rows)
        .arg(&p_cl)
        .arg(&p_out)
        .arg(&p_wa)
        .arg(&p_wm);
    b.arg(&h_i).arg(&kvh_i).arg(&group_i).arg(&per_cta_i).arg(&chunks_i);
    b.arg(&bsz_i).arg(&nb_i).arg(&tps_i).arg(&scale_log2);
    let grid = ((kv_heads * chunks) as u32, splits as u32, s as u32);
    unsafe { b.launch(cfg(grid, THREADS, 0)) }.map_err(launch_err)?;

    if splits > 1 {
        let merge = load(
            &dev,
            "paged_mla_decode",
            ptx::PAGED_MLA_DECODE,
            &format!("paged_mla_decode_merge_{sfx}"),
        )?;
        let (d_i, splits_i) = (d as i32, splits as i32);
        let mut b = stream.launch_builder(&merge);
        b.arg(&p_wa).arg(&p_wm).arg(&p_out).arg(&h_i).arg(&d_i).arg(&splits_i);
        unsafe { b.launch(cfg((h as u32, s as u32, 1), 128, 0)) }.map_err(launch_err)?;
    }
    drop(args);
    Ok(out.into_tensor())
}

/// Writes `k[t]`, `v[t]` into cache row `slots[t]` of both caches, in place (the CUDA
/// counterpart of [`crate::write_kv_cache`]): a token's row of either cache is `kv_heads *
/// dim` contiguous values, so each cache takes one launch of the latent cache-write kernel
/// over its flattened `[num_blocks, block_size, kv_heads * dim]` view.
///
/// * `k_cache`: `[num_blocks, block_size, kv_heads, head_dim]`, `v_cache`: `[num_blocks,
///   block_size, kv_heads, v_head_dim]`, bf16 or f32 (the same), contiguous, updated in place.
/// * `k`: `[T, kv_heads, head_dim]`, `v`: `[T, kv_heads, v_head_dim]`: converted to the cache
///   dtype if they differ; token strides are free when each token's heads are contiguous
///   (views of a wider projection output), other layouts are copied first.
/// * `slots`: `[T]` i64 (negative = padding, skipped) or u32 (`u32::MAX` = padding, skipped).
///   Slots beyond the cache are skipped by the kernel; duplicates are a caller error.
///
/// Every shape, dtype and layout is checked before either cache is written.
pub fn kv_cache_write(k_cache: &Tensor, v_cache: &Tensor, k: &Tensor, v: &Tensor, slots: &Tensor) -> Result<()> {
    const OP: &str = "kv_cache_write";
    let dev = cuda_device(k_cache)?;
    let (num_blocks, block_size, kv_heads, d) = k_cache.dims4()?;
    let (vb, vbs, vh, dv) = v_cache.dims4()?;
    let (t, kh, kd) = k.dims3()?;
    let (tv, vkh, vdd) = v.dims3()?;
    if (vb, vbs, vh) != (num_blocks, block_size, kv_heads)
        || (kh, kd) != (kv_heads, d)
        || (tv, vkh, vdd) != (t, kv_heads, dv)
        || slots.dims1()? != t
    {
        bail!(
            "{OP}: k {:?}, v {:?}, slots {:?} for k_cache {:?}, v_cache {:?}",
            k.shape(),
            v.shape(),
            slots.shape(),
            k_cache.shape(),
            v_cache.shape()
        );
    }
    let dtype = k_cache.dtype();
    suffix(dtype)?;
    check(k_cache, "k_cache", dtype, &dev)?;
    check(v_cache, "v_cache", dtype, &dev)?;
    if !matches!(slots.dtype(), DType::I64 | DType::U32) {
        bail!("{OP}: slots must be i64 or u32, not {:?}", slots.dtype());
    }
    check(slots, "slots", slots.dtype(), &dev)?;
    if !k.device().same_device(k_cache.device()) || !v.device().same_device(k_cache.device()) {
        bail!("{OP}: k and v must be on the caches' device");
    }
    if t == 0 {
        return Ok(());
    }
    let (k, v) = (token_rows(k, dtype)?, token_rows(v, dtype)?);
    // Views of contiguous caches share their storage, so the writes land in the caches.
    let k_rows = k_cache.reshape((num_blocks, block_size, kv_heads * d))?;
    let v_rows = v_cache.reshape((num_blocks, block_size, kv_heads * dv))?;
    scatter_rows(OP, &k_rows, &[whole_rows(&k, kv_heads * d)], slots)?;
    scatter_rows(OP, &v_rows, &[whole_rows(&v, kv_heads * dv)], slots)
}

/// Each token of `x` (from [`token_rows`]) as one `width`-value part of a cache row.
fn whole_rows(x: &Tensor, width: usize) -> RowPart<'_> {
    RowPart {
        src: x,
        row_stride: x.stride()[0],
        width,
    }
}

/// `x`: `[T, heads, dim]` in `dtype` with each token's `heads * dim` values contiguous (the
/// token stride is free); converted or copied only when it is not already so.
fn token_rows(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = if x.dtype() == dtype {
        x.clone()
    } else {
        x.to_dtype(dtype)?
    };
    let (_, heads, dim) = x.dims3()?;
    let st = x.stride();
    if (dim == 1 || st[2] == 1) && (heads == 1 || st[1] == dim) {
        Ok(x)
    } else {
        x.contiguous()
    }
}
