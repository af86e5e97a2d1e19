//! Paged GQA attention, one entry point for every device: the CPU kernel of [`super::host`]
//! for CPU caches, the CUDA kernel (`kernels/cuda/paged_gqa_decode.cu`, every row of a mixed
//! step in one launch) for bf16 or f32 caches on a GPU, and a reference in candle ops for
//! anything else (per sequence, one gather of its K/V blocks and one batched matmul per kv
//! head for the scores and one for the output).

use candle_core::{bail, DType, Result, Tensor};

use super::host::{host_gqa_attention, Dims};
use crate::paged::{causal_bias, check_seq, softmax_last_dim, PagedBatch, PagedSeq};

/// At most this many f32 scores (`rows * num_heads * context_len`) are materialized at once
/// by the reference; longer prompt chunks are split into groups of query rows (rows are
/// independent).
const MAX_SCORES: usize = 1 << 22;
/// At most this many scores per job of the CPU kernel (8 MiB of f32; jobs run in parallel).
const HOST_JOB_SCORES: usize = 1 << 21;

/// Causal paged attention, grouped-query: query head `h` reads kv head `h / (num_heads /
/// kv_heads)`.
///
/// * `q`: `[T, num_heads, head_dim]`, rotated queries, rows grouped by sequence as `seqs` says
///   (like [`crate::paged_mla_attention`]): sequences with queries tile the rows in order from
///   row 0; a sequence with `query_len == 0` is skipped.
/// * `k_cache`: `[num_blocks, block_size, kv_heads, head_dim]`; `v_cache`: `[num_blocks,
///   block_size, kv_heads, v_head_dim]` (any dtype, any layout; see [`crate::gqa`]).
/// * `seqs`: each sequence's rows, context length (this step's tokens included, `>= query_len`)
///   and block table (covering the context, ids `< num_blocks`).
/// * `scale`: softmax scale (usually `head_dim^-0.5`).
///
/// Returns `[T, num_heads, v_head_dim]` f32; scores and softmax run in f32 whatever the dtypes
/// (on a GPU the queries are rounded to the cache dtype first). Rows not covered by `seqs` are
/// zero. Bad arguments are errors, never panics.
pub fn paged_gqa_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &PagedBatch,
    scale: f64,
) -> Result<Tensor> {
    if q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() {
        if let Some(out) = host_in_chunks(q, k_cache, v_cache, seqs, scale, HOST_JOB_SCORES)? {
            return Ok(out);
        }
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda_gqa_attention(q, k_cache, v_cache, seqs, scale)? {
        return Ok(out);
    }
    attention_in_chunks(q, k_cache, v_cache, seqs, scale, MAX_SCORES)
}

/// The CUDA kernel's answer where it applies (bf16 or f32 caches on a GPU, contiguous, head
/// dims equal and one of the kernel's), after the same host checks as the reference; `None`
/// elsewhere. The batch's row tables are uploaded once a step.
#[cfg(feature = "cuda")]
fn cuda_gqa_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &PagedBatch,
    scale: f64,
) -> Result<Option<Tensor>> {
    let dtype = k_cache.dtype();
    let applies = k_cache.device().is_cuda()
        && matches!(dtype, DType::BF16 | DType::F32)
        && v_cache.dtype() == dtype
        && k_cache.is_contiguous()
        && v_cache.is_contiguous();
    if !applies {
        return Ok(None);
    }
    let dims = validate(q, k_cache, v_cache, seqs)?;
    if dims.head_dim != dims.v_head_dim || !crate::cuda::GQA_HEAD_DIMS.contains(&dims.head_dim) {
        return Ok(None);
    }
    let rows = seqs.device_rows(dims.num_tokens, k_cache.device())?;
    let q = q.to_dtype(dtype)?;
    let q = if q.stride()[2] == 1 { q } else { q.contiguous()? };
    let out = crate::cuda::paged_gqa_rows(&q, k_cache, v_cache, &rows, scale)?;
    Ok(Some(out.to_dtype(DType::F32)?))
}

/// The CPU kernel with a budget of `max_scores` scores a job (tests force small ones); `None`
/// where it does not apply (cache dtypes other than f32 and bf16).
pub(super) fn host_in_chunks(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq],
    scale: f64,
    max_scores: usize,
) -> Result<Option<Tensor>> {
    let dims = validate(q, k_cache, v_cache, seqs)?;
    host_gqa_attention(q, k_cache, v_cache, seqs, scale, &dims, max_scores)
}

/// Checks the operands and every sequence against them (see [`paged_gqa_attention`]).
fn validate(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, seqs: &[PagedSeq]) -> Result<Dims> {
    const OP: &str = "paged_gqa_attention";
    let (num_tokens, num_heads, head_dim) = q.dims3()?;
    let (num_blocks, block_size, kv_heads, k_dim, v_head_dim) = super::cache_dims(OP, k_cache, v_cache)?;
    if k_dim != head_dim {
        bail!("{OP}: q head dim {head_dim}, k_cache head dim {k_dim}");
    }
    if kv_heads == 0 || num_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
        bail!("{OP}: {num_heads} query heads do not group over {kv_heads} kv heads");
    }
    let mut covered = 0usize;
    for seq in seqs.iter().filter(|s| s.query_len > 0) {
        check_seq(OP, seq, covered, num_tokens, num_blocks, block_size)?;
        covered += seq.query_len;
    }
    Ok(Dims {
        num_tokens,
        num_heads,
        kv_heads,
        head_dim,
        v_head_dim,
        block_size,
    })
}

/// [`paged_gqa_attention`] materializing at most `max_scores` scores at once (tests force
/// small chunks through it).
pub(super) fn attention_in_chunks(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq],
    scale: f64,
    max_scores: usize,
) -> Result<Tensor> {
    let Dims {
        num_tokens,
        num_heads,
        kv_heads,
        head_dim,
        v_head_dim,
        block_size,
    } = validate(q, k_cache, v_cache, seqs)?;
    let group = num_heads / kv_heads;
    let device = q.device();
    let mut outputs = Vec::with_capacity(seqs.len() + 1);
    let mut covered = 0usize;
    for seq in seqs {
        if seq.query_len == 0 {
            continue;
        }
        let ctx = seq.context_len;
        // Gather the sequence's blocks once: [kv_heads, ctx, dim] in f32 for each cache.
        let needed = ctx.div_ceil(block_size);
        let blocks = Tensor::from_vec(seq.block_table[..needed].to_vec(), needed, device)?;
        let gather = |cache: &Tensor, dim: usize| -> Result<Tensor> {
            cache
                .index_select(&blocks, 0)? // [needed, block_size, kv_heads, dim]
                .reshape((needed * block_size, kv_heads, dim))?
                .narrow(0, 0, ctx)?
                .to_dtype(DType::F32)?
                .transpose(0, 1)?
                .contiguous()
        };
        let keys_t = gather(k_cache, head_dim)?.t()?; // [kv_heads, head_dim, ctx]
        let values = gather(v_cache, v_head_dim)?; // [kv_heads, ctx, v_head_dim]
        let q_seq = q.narrow(0, seq.query_start, seq.query_len)?.to_dtype(DType::F32)?;
        let rows_per_chunk = (max_scores / (num_heads * ctx)).max(1);
        let mut first = 0;
        while first < seq.query_len {
            let rows = rows_per_chunk.min(seq.query_len - first);
            // [rows, H, D] -> [kv_heads, rows * group, D]: a kv head's queries side by side.
            let qg = q_seq
                .narrow(0, first, rows)?
                .reshape((rows, kv_heads, group, head_dim))?
                .permute((1, 0, 2, 3))?
                .reshape((kv_heads, rows * group, head_dim))?;
            let scores = (qg.matmul(&keys_t)? * scale)? // [kv_heads, rows * group, ctx]
                .reshape((kv_heads, rows, group, ctx))?
                .broadcast_add(&causal_bias(seq, first, rows, device)?.unsqueeze(0)?)?;
            let probs = softmax_last_dim(&scores)?.reshape((kv_heads, rows * group, ctx))?;
            let out = probs
                .matmul(&values)? // [kv_heads, rows * group, v_head_dim]
                .reshape((kv_heads, rows, group, v_head_dim))?
                .permute((1, 0, 2, 3))?
                .reshape((rows, num_heads, v_head_dim))?;
            outputs.push(out);
            first += rows;
        }
        covered += seq.query_len;
    }
    if covered < num_tokens || outputs.is_empty() {
        outputs.push(Tensor::zeros(
            (num_tokens - covered, num_heads, v_head_dim),
            DType::F32,
            device,
        )?);
    }
    Tensor::cat(&outputs, 0)
}
