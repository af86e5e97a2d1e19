//! Paged MLA decode (absorbed, one query token per sequence) with split-KV and a
//! log-sum-exp merge, dense or over DSA's selected positions ([`sparse_mla_decode`]: the same
//! kernel reading positions through an index list). Kernel: `kernels/cuda/paged_mla_decode.cu`.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

use super::args::{Args, Held, OutBuf};
use super::{cfg, check, cuda_device, launch_err, load, ptx, suffix};

/// Heads per CTA, KV tokens per shared-memory tile and threads per CTA (`HPC`, `TILE`,
/// `THREADS` in the kernel).
const HEADS_PER_CTA: usize = 16;
const TILE: usize = 32;
const THREADS: u32 = 256;
/// Largest value dim the kernel's per-thread accumulators hold (`2 * TPH * MAX_VK`).
const MAX_VALUE_DIM: usize = 512;
/// Fewest KV tokens worth a split of their own, and the most splits (both decode kernels).
const MIN_TOKENS_PER_SPLIT: usize = 256;
const MAX_SPLITS: usize = 64;

/// Arguments of [`paged_mla_decode`] besides the tensors.
#[derive(Debug, Clone)]
pub struct MlaDecodeParams {
    /// Value dim (`kv_lora_rank`, 512 for DeepSeek-V2/V3); values are the first `value_dim`
    /// columns of each cache row. Must be a multiple of 32, at most 512.
    pub value_dim: usize,
    /// Softmax scale (including YaRN's mscale²).
    pub scale: f64,
    /// Largest `context_lens` entry (the scheduler knows it; sizes the split plan). Larger
    /// contexts would be cut short, so it must not be an underestimate.
    pub max_context_len: usize,
    /// Forces the number of KV splits (tests, benchmarks); `None` picks one so that about two
    /// CTAs per SM are busy (see [`decode_split_plan`]).
    pub num_splits: Option<usize>,
}

/// `(num_splits, tokens_per_split)` for `num_seqs` sequences of `num_heads` heads and
/// contexts up to `max_context_len` on a GPU with `sm_count` SMs: enough splits that
/// `seqs * head_groups * splits` is about `2 * sm_count`, none shorter than 256 tokens, at
/// most 64; `tokens_per_split` is a multiple of the 32-token tile.
pub fn decode_split_plan(
    num_seqs: usize,
    num_heads: usize,
    max_context_len: usize,
    sm_count: usize,
    forced: Option<usize>,
) -> (usize, usize) {
    let ctas = (num_seqs * num_heads.div_ceil(HEADS_PER_CTA)).max(1);
    split_kv(ctas, max_context_len, MIN_TOKENS_PER_SPLIT, TILE, sm_count, forced)
}

/// The split-KV plan both decode kernels use: `(num_splits, tokens_per_split)` so that
/// `ctas * splits` is about `2 * sm_count`, no split shorter than `min_tokens`, at most 64
/// splits, `tokens_per_split` a multiple of `tile`; `forced` fixes the number of splits
/// (some may then be empty).
pub(super) fn split_kv(
    ctas: usize,
    max_context_len: usize,
    min_tokens: usize,
    tile: usize,
    sm_count: usize,
    forced: Option<usize>,
) -> (usize, usize) {
    let by_length = max_context_len.div_ceil(min_tokens).max(1);
    let wanted = forced
        .unwrap_or_else(|| (2 * sm_count).div_ceil(ctas.max(1)).min(by_length).min(MAX_SPLITS))
        .max(1);
    let tokens_per_split = max_context_len.div_ceil(wanted).max(1).next_multiple_of(tile);
    let splits = max_context_len.div_ceil(tokens_per_split).max(1);
    (if forced.is_some() { wanted } else { splits }, tokens_per_split)
}

/// Attention of one absorbed query token per sequence over its paged latent cache.
///
/// * `q`: `[S, H, D]` bf16 or f32 (`D` = `kv_lora_rank + rope_dim`, 576 for DeepSeek), last dim
///   contiguous (token and head strides free).
/// * `cache`: `[num_blocks, block_size, D]`, same dtype as `q`, contiguous, 16-byte aligned.
/// * `block_tables`: `[S, max_blocks]` u32, contiguous; row `s` lists the blocks of sequence `s`
///   in order (as [`crate::PagedSeq::block_table`]).
/// * `context_lens`: `[S]` u32 (cached tokens including this step's, each `<=
///   p.max_context_len`; 0 gives a zero output row).
///
/// Returns `[S, H, value_dim]` in `q`'s dtype; agrees with [`crate::paged_mla_attention`] for
/// `query_len = 1` up to bf16 rounding of the output.
pub fn paged_mla_decode(
    q: &Tensor,
    cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    p: &MlaDecodeParams,
) -> Result<Tensor> {
    launch(q, cache, block_tables, None, context_lens, None, p)
}

/// Paged MLA attention of every query row of a step, decode tokens and prompt chunks in any
/// mix (the CUDA path of [`crate::paged_mla_attention`]): row `r` attends over the first
/// `rows.visible[r]` positions of sequence `rows.row_seq[r]`'s blocks.
///
/// * `q`: `[R, H, D]` absorbed queries in the cache dtype (`R = rows.num_rows`), last dim
///   contiguous; `cache` as in [`paged_mla_decode`].
///
/// Returns `[R, H, value_dim]` in `q`'s dtype (zero rows where `visible` is 0).
pub fn paged_mla_rows(
    q: &Tensor,
    cache: &Tensor,
    rows: &crate::paged::DeviceRows,
    value_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    let p = MlaDecodeParams {
        value_dim,
        scale,
        max_context_len: rows.max_visible,
        num_splits: None,
    };
    super::in_row_chunks(q, rows, |q, row_seq, visible| {
        launch(q, cache, &rows.block_tables, Some(row_seq), visible, None, &p)
    })
}

/// DeepSeek Sparse Attention decode: [`paged_mla_decode`] over the positions `selected`
/// lists instead of the whole context.
///
/// * `selected`: `[S, max_selected]` u32 positions (within each sequence, covered by its
///   block table; any order), as [`super::dsa_indexer_topk`] returns them.
/// * `selected_lens`: `[S]` u32, how many entries of each row count (0: a zero output row);
///   `p.max_context_len` bounds them (the indexer's `index_topk`).
///
/// Agrees with [`crate::sparse_mla_attention`] up to bf16 rounding of the output.
pub fn sparse_mla_decode(
    q: &Tensor,
    cache: &Tensor,
    block_tables: &Tensor,
    selected: &Tensor,
    selected_lens: &Tensor,
    p: &MlaDecodeParams,
) -> Result<Tensor> {
    let (rows, width) = selected.dims2()?;
    if rows != q.dims3()?.0 || p.max_context_len > width {
        bail!(
            "sparse_mla_decode: selected {:?} for q {:?} and at most {} positions",
            selected.shape(),
            q.shape(),
            p.max_context_len
        );
    }
    launch(q, cache, block_tables, None, selected_lens, Some(selected), p)
}

/// `row_seq`: `[S]` u32, the `block_tables` row each query row reads (`None`: row `s` reads
/// row `s`).
fn launch(
    q: &Tensor,
    cache: &Tensor,
    block_tables: &Tensor,
    row_seq: Option<&Tensor>,
    context_lens: &Tensor,
    selected: Option<&Tensor>,
    p: &MlaDecodeParams,
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (s, h, d) = q.dims3()?;
    let (num_blocks, block_size, cd) = cache.dims3()?;
    let (table_rows, max_blocks) = block_tables.dims2()?;
    let dtype = q.dtype();
    let dv = p.value_dim;
    let rows_ok = match row_seq {
        Some(r) => r.dims1()? == s,
        None => table_rows == s,
    };
    if cd != d || !rows_ok || context_lens.dims1()? != s {
        bail!(
            "paged_mla_decode: q {:?}, cache {:?}, block_tables {:?}, context_lens {:?}",
            q.shape(),
            cache.shape(),
            block_tables.shape(),
            context_lens.shape()
        );
    }
    if dv == 0 || dv > MAX_VALUE_DIM || !dv.is_multiple_of(32) || dv > d || !d.is_multiple_of(2) {
        bail!("paged_mla_decode: value dim {dv} (multiple of 32, <= {MAX_VALUE_DIM}, <= {d}) unsupported");
    }
    if !(d * dtype.size_in_bytes()).is_multiple_of(16) {
        bail!("paged_mla_decode: cache rows of {d} {dtype:?} are not a multiple of 16 bytes");
    }
    if p.max_context_len > max_blocks * block_size {
        bail!(
            "paged_mla_decode: max context {} beyond {max_blocks} blocks of {block_size}",
            p.max_context_len
        );
    }
    if q.dtype() != cache.dtype() || q.stride()[2] != 1 {
        bail!("paged_mla_decode: q must match the cache dtype and have a contiguous last dim");
    }
    check(cache, "cache", dtype, &dev)?;
    check(block_tables, "block_tables", DType::U32, &dev)?;
    check(context_lens, "context_lens", DType::U32, &dev)?;
    if let Some(r) = row_seq {
        check(r, "row_seq", DType::U32, &dev)?;
    }
    if let Some(sel) = selected {
        check(sel, "selected", DType::U32, &dev)?;
    }
    if s > 65535 {
        bail!("paged_mla_decode: {s} sequences in one launch (at most 65535)");
    }
    if s == 0 || h == 0 {
        return Tensor::zeros((s, h, dv), dtype, q.device());
    }
    // Every element of the output (and, with splits, of the workspace) is written.
    let mut out = OutBuf::uninit(&dev, (s, h, dv), dtype)?;
    let stream = dev.cuda_stream();
    let sm_count = super::sm_count(&dev)?;
    let (splits, tokens_per_split) = decode_split_plan(s, h, p.max_context_len, sm_count, p.num_splits);
    let head_groups = h.div_ceil(HEADS_PER_CTA);
    // Workspace (unused with one split): partial outputs and per-head (max, sum).
    let ws_n = if splits > 1 { s * splits * h } else { 1 };
    let mut ws_acc = OutBuf::uninit(&dev, ws_n * dv, DType::F32)?;
    let mut ws_ml = OutBuf::uninit(&dev, ws_n * 2, DType::F32)?;

    // Dynamic shared memory, laid out as in the kernel.
    let elem = dtype.size_in_bytes();
    let dp = d + 16 / elem;
    let head = TILE * 8 + (HEADS_PER_CTA * (d + 1) + HEADS_PER_CTA * TILE) * 4;
    let smem = head.next_multiple_of(16) + TILE * dp * elem;
    let sfx = suffix(dtype)?;
    let func = load(
        &dev,
        "paged_mla_decode",
        ptx::PAGED_MLA_DECODE,
        &format!("paged_mla_decode_{sfx}"),
    )?;
    super::allow_dynamic_smem(&func, smem)?;

    let mut inputs: Vec<&Tensor> = vec![q, cache, block_tables, context_lens];
    inputs.extend(row_seq);
    inputs.extend(selected);
    let held = Held::new(&inputs);
    let mut args = Args::new(&stream);
    let (p_q, p_cache) = (args.input(&held, 0)?, args.input(&held, 1)?);
    if p_cache % 16 != 0 {
        bail!("paged_mla_decode: cache is not 16-byte aligned");
    }
    let (p_bt, p_cl) = (args.input(&held, 2)?, args.input(&held, 3)?);
    // The optional inputs follow the four fixed ones, in this order.
    let p_rows = match row_seq {
        Some(_) => args.input(&held, 4)?,
        None => 0u64,
    };
    let num_blocks_i = num_blocks as i64;
    let (p_sel, sel_stride) = match selected {
        Some(sel) => (
            args.input(&held, 4 + row_seq.is_some() as usize)?,
            sel.dims2()?.1 as i64,
        ),
        None => (0u64, 0i64),
    };
    let (p_out, p_wa, p_wm) = (args.output(&mut out), args.output(&mut ws_acc), args.output(&mut ws_ml));
    let (q_seq, q_head, bt_stride) = (q.stride()[0] as i64, q.stride()[1] as i64, max_blocks as i64);
    let (h_i, d_i, dv_i, bsz_i, tps_i) = (
        h as i32,
        d as i32,
        dv as i32,
        block_size as i32,
        tokens_per_split as i32,
    );
    let scale_log2 = (p.scale * std::f64::consts::LOG2_E) as f32;
    let mut b = stream.launch_builder(&func);
    b.arg(&p_q)
        .arg(&q_seq)
        .arg(&q_head)
        .arg(&p_cache)
        .arg(&p_bt)
        .arg(&bt_stride)
        .arg(&p_rows)
        .arg(&num_blocks_i);
    b.arg(&p_cl)
        .arg(&p_sel)
        .arg(&sel_stride)
        .arg(&p_out)
        .arg(&p_wa)
        .arg(&p_wm)
        .arg(&h_i)
        .arg(&d_i)
        .arg(&dv_i);
    b.arg(&bsz_i).arg(&tps_i).arg(&scale_log2);
    let grid = (head_groups as u32, splits as u32, s as u32);
    unsafe { b.launch(cfg(grid, THREADS, smem as u32)) }.map_err(launch_err)?;

    if splits > 1 {
        let merge = load(
            &dev,
            "paged_mla_decode",
            ptx::PAGED_MLA_DECODE,
            &format!("paged_mla_decode_merge_{sfx}"),
        )?;
        let splits_i = splits as i32;
        let mut b = stream.launch_builder(&merge);
        b.arg(&p_wa).arg(&p_wm).arg(&p_out).arg(&h_i).arg(&dv_i).arg(&splits_i);
        unsafe { b.launch(cfg((h as u32, s as u32, 1), 128, 0)) }.map_err(launch_err)?;
    }
    drop(args);
    Ok(out.into_tensor())
}
