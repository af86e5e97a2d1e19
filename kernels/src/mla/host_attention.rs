//! Paged MLA attention on the CPU: scores straight from the cache's rows with the dot
//! kernels, softmax and the value sum in place, every (sequence, group of query rows) a
//! parallel job. No gathered copy of the context, no mask tensor, no per-sequence tensor ops.
//! Long prompt chunks (more than [`MAX_DOT_QUERY`] tokens) are GEMM-shaped and take
//! [`super::host_chunk`] instead.

use candle_core::{CpuStorage, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::dense::dots::{dots_with, DotsLhs, Line, WeightElem};
use crate::dense::host_f32;
use crate::paged::{check_seq, softmax_visible, PagedSeq};

use super::host_chunk::attend_chunk;

/// Query tokens per parallel job (a short chunk splits into jobs of this many tokens; decode
/// has one per sequence).
const JOB_TOKENS: usize = 4;
/// Sequences with more query tokens than this take [`attend_chunk`]'s GEMMs.
const MAX_DOT_QUERY: usize = 16;

/// [`crate::paged_mla_attention`] for a CPU cache in f32 or bf16; `None` for other dtypes.
/// Same arguments, checks and result: `[num_tokens, num_heads, value_dim]` f32, rows not
/// covered by `seqs` zero.
pub(super) fn host_paged_mla_attention(
    q: &Tensor,
    cache: &Tensor,
    seqs: &[PagedSeq],
    value_dim: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (num_tokens, num_heads, latent_dim) = q.dims3()?;
    let (num_blocks, block_size, _) = cache.dims3()?;
    if num_heads == 0 || value_dim == 0 {
        // Degenerate widths: nothing to gain here; the reference handles them.
        return Ok(None);
    }
    let (storage, layout) = cache.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let mut covered = 0usize;
    for seq in seqs.iter().filter(|s| s.query_len > 0) {
        check_seq("paged_mla_attention", seq, covered, num_tokens, num_blocks, block_size)?;
        covered += seq.query_len;
    }
    let shape = Shape {
        heads: num_heads,
        dim: latent_dim,
        value_dim,
        block_size,
        scale: scale as f32,
    };
    let q_host = host_f32(q)?;
    let out = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => attend(&q_host, &v[start..end], seqs, num_tokens, &shape),
        Storage::Cpu(CpuStorage::BF16(v)) => attend(&q_host, &v[start..end], seqs, num_tokens, &shape),
        _ => return Ok(None),
    };
    drop(storage);
    Tensor::from_vec(out, (num_tokens, num_heads, value_dim), cache.device()).map(Some)
}

/// The widths every job shares.
pub(super) struct Shape {
    pub heads: usize,
    /// Key width: `kv_lora_rank + rope_dim`.
    pub dim: usize,
    /// Value width: the first `value_dim` columns of a key.
    pub value_dim: usize,
    pub block_size: usize,
    pub scale: f32,
}

/// One job: query tokens `t0..t0 + tokens` of `seq`, writing their `[tokens, heads, value_dim]`
/// rows of the output.
struct Job<'a> {
    seq: &'a PagedSeq,
    t0: usize,
    out: &'a mut [f32],
}

/// Attention of `q` (`[num_tokens, heads, dim]` f32) over `cache` (`[blocks * block_size,
/// dim]` rows), as `[num_tokens, heads, value_dim]` f32: short query runs as dot-kernel jobs
/// here, longer ones through [`attend_chunk`], one sequence after another.
fn attend<W: WeightElem>(q: &[f32], cache: &[W], seqs: &[PagedSeq], num_tokens: usize, s: &Shape) -> Vec<f32> {
    let row_out = s.heads * s.value_dim;
    let mut out = vec![0f32; num_tokens * row_out];
    let mut jobs = Vec::new();
    let mut long = Vec::new();
    let mut rest = &mut out[..];
    for seq in seqs.iter().filter(|s| s.query_len > 0) {
        let (mine, tail) = rest.split_at_mut(seq.query_len * row_out);
        rest = tail;
        if seq.query_len > MAX_DOT_QUERY {
            long.push((seq, mine));
            continue;
        }
        for (n, chunk) in mine.chunks_mut(JOB_TOKENS * row_out).enumerate() {
            jobs.push(Job {
                seq,
                t0: n * JOB_TOKENS,
                out: chunk,
            });
        }
    }
    jobs.into_par_iter()
        .for_each_init(Scratch::default, |scratch, job| attend_job(q, cache, s, job, scratch));
    for (seq, rows) in long {
        attend_chunk(q, cache, seq, s, rows);
    }
    out
}

/// Reusable buffers of one worker.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<Line>,
}

fn attend_job<W: WeightElem>(q: &[f32], cache: &[W], s: &Shape, job: Job<'_>, scratch: &mut Scratch) {
    let seq = job.seq;
    let tokens = job.out.len() / (s.heads * s.value_dim);
    let rows = tokens * s.heads;
    let first = seq.query_start + job.t0;
    let x = &q[first * s.heads * s.dim..(first + tokens) * s.heads * s.dim];
    // Query token t sees positions < offset + t + 1.
    let offset = seq.context_len - seq.query_len + job.t0;
    let visible = |row: usize| offset + row / s.heads + 1;
    let span = offset + tokens;
    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(rows * span, 0.0);
    // Scores block by block: the block's rows are `w` for the dot kernels.
    let lhs = DotsLhs::new(x, rows, s.dim);
    for (b, p0) in (0..span).step_by(s.block_size).enumerate() {
        let n = s.block_size.min(span - p0);
        let base = seq.block_table[b] as usize * s.block_size * s.dim;
        dots_with(
            &lhs,
            &cache[base..base + n * s.dim],
            n,
            &mut scores[p0..],
            span,
            1,
            &mut scratch.acc,
        );
    }
    softmax_visible(scores, span, s.scale, visible);
    // out[row] = sum over positions of p[row, pos] * value(pos): token by token (its heads'
    // outputs stay in L1), each visible cache row read once for all the token's heads.
    for (t, out_t) in job.out.chunks_mut(s.heads * s.value_dim).enumerate() {
        for pos in 0..visible(t * s.heads) {
            let slot = seq.slot(pos, s.block_size);
            let value = &cache[slot * s.dim..][..s.value_dim];
            for (h, out) in out_t.chunks_mut(s.value_dim).enumerate() {
                add_scaled(out, scores[(t * s.heads + h) * span + pos], value);
            }
        }
    }
}

/// `out += p * value`.
#[inline]
fn add_scaled<W: WeightElem>(out: &mut [f32], p: f32, value: &[W]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected just above.
        return unsafe { add_scaled_avx512(out, p, value) };
    }
    add_scaled_plain(out, p, value)
}

#[inline(always)]
fn add_scaled_plain<W: WeightElem>(out: &mut [f32], p: f32, value: &[W]) {
    for (o, &v) in out.iter_mut().zip(value) {
        *o += p * v.widen();
    }
}

/// The same loop, vectorised by the compiler for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn add_scaled_avx512<W: WeightElem>(out: &mut [f32], p: f32, value: &[W]) {
    add_scaled_plain(out, p, value)
}
