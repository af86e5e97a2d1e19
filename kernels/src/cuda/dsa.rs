//! DeepSeek Sparse Attention's lightning indexer on the GPU, for decode: scores of every
//! cached position (`dsa_index_scores_*`) and the top-k selection (`dsa_topk`). Kernel:
//! `kernels/cuda/dsa_indexer.cu`; [`super::sparse_mla_decode`] then attends to the selection.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

use super::args::{Args, Held, OutBuf};
use super::{cfg, check, cuda_device, launch_err, load, ptx, suffix};

const THREADS: u32 = 256;
const POS_PER_CTA: usize = 64;
const MAX_HEADS: usize = 64;
const MAX_DIM: usize = 128;
const TOPK_THREADS: u32 = 1024;

/// The indexer's choice for one query token per sequence.
///
/// * `q`: `[S, heads, dim]` bf16 or f32, contiguous (rotated indexer queries); `heads <= 64`,
///   `dim` a multiple of 32, at most 128.
/// * `weights`: `[S, heads]` f32 (`weights_proj(x) / sqrt(heads)`).
/// * `key_cache`: `[num_blocks, block_size, dim]`, `q`'s dtype, contiguous.
/// * `block_tables`: `[S, max_blocks]` u32; `context_lens`: `[S]` u32, each `<=
///   max_context_len`.
///
/// Returns `(selected [S, topk] u32, selected_lens [S] u32)`: per sequence its positions in
/// ascending order (all of them when the context is at most `topk`, else the `topk` best,
/// ties to the earlier position), as [`crate::indexer_topk`] chooses for a decode row.
#[allow(clippy::too_many_arguments)]
pub fn dsa_indexer_topk(
    q: &Tensor,
    weights: &Tensor,
    key_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    max_context_len: usize,
    topk: usize,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(q)?;
    let (s, heads, dim) = q.dims3()?;
    let (_nb, block_size, kd) = key_cache.dims3()?;
    let (bs, max_blocks) = block_tables.dims2()?;
    if kd != dim || bs != s || context_lens.dims1()? != s || weights.dims() != [s, heads] {
        bail!(
            "dsa_indexer_topk: q {:?}, weights {:?}, keys {:?}, block_tables {:?}",
            q.shape(),
            weights.shape(),
            key_cache.shape(),
            block_tables.shape()
        );
    }
    if heads == 0 || heads > MAX_HEADS || dim == 0 || dim > MAX_DIM || !dim.is_multiple_of(32) {
        bail!("dsa_indexer_topk: {heads} heads of {dim} (at most {MAX_HEADS} of a multiple of 32 up to {MAX_DIM})");
    }
    if topk == 0 || max_context_len > max_blocks * block_size || s > 65535 {
        bail!("dsa_indexer_topk: topk {topk}, max context {max_context_len}, {s} sequences");
    }
    let dtype = q.dtype();
    check(q, "q", dtype, &dev)?;
    check(weights, "weights", DType::F32, &dev)?;
    check(key_cache, "key_cache", dtype, &dev)?;
    check(block_tables, "block_tables", DType::U32, &dev)?;
    check(context_lens, "context_lens", DType::U32, &dev)?;
    if s == 0 || max_context_len == 0 {
        let selected = Tensor::zeros((s, topk), DType::U32, q.device())?;
        return Ok((selected, Tensor::zeros(s, DType::U32, q.device())?));
    }
    // Zero-filled: the selection's unused entries and the scores past a context stay zero.
    let mut selected = OutBuf::zeroed(&dev, (s, topk), DType::U32)?;
    let mut selected_lens = OutBuf::zeroed(&dev, s, DType::U32)?;
    let mut scores = OutBuf::zeroed(&dev, (s, max_context_len), DType::F32)?;
    let stream = dev.cuda_stream();
    let held = Held::new(&[q, weights, key_cache, block_tables, context_lens]);
    let mut args = Args::new(&stream);
    let (p_q, p_w, p_k) = (args.input(&held, 0)?, args.input(&held, 1)?, args.input(&held, 2)?);
    let (p_bt, p_cl) = (args.input(&held, 3)?, args.input(&held, 4)?);
    let p_sc = args.output(&mut scores);
    let (p_sel, p_len) = (args.output(&mut selected), args.output(&mut selected_lens));
    let (bt_stride, score_stride, sel_stride) = (max_blocks as i64, max_context_len as i64, topk as i64);
    let (heads_i, dim_i, bsz_i, topk_i) = (heads as i32, dim as i32, block_size as i32, topk as i32);
    let scale_f = scale as f32;

    let func = load(
        &dev,
        "dsa_indexer",
        ptx::DSA_INDEXER,
        &format!("dsa_index_scores_{}", suffix(dtype)?),
    )?;
    let mut b = stream.launch_builder(&func);
    b.arg(&p_q).arg(&p_w).arg(&p_k).arg(&p_bt).arg(&bt_stride).arg(&p_cl);
    b.arg(&p_sc)
        .arg(&score_stride)
        .arg(&heads_i)
        .arg(&dim_i)
        .arg(&bsz_i)
        .arg(&scale_f);
    let grid = (max_context_len.div_ceil(POS_PER_CTA) as u32, s as u32, 1);
    unsafe { b.launch(cfg(grid, THREADS, 0)) }.map_err(launch_err)?;

    let func = load(&dev, "dsa_indexer", ptx::DSA_INDEXER, "dsa_topk")?;
    let mut b = stream.launch_builder(&func);
    b.arg(&p_sc).arg(&score_stride).arg(&p_cl).arg(&p_sel).arg(&sel_stride);
    b.arg(&p_len).arg(&topk_i);
    unsafe { b.launch(cfg((s as u32, 1, 1), TOPK_THREADS, 0)) }.map_err(launch_err)?;
    drop(args);
    Ok((selected.into_tensor(), selected_lens.into_tensor()))
}
