//! Paged GQA attention on the CPU without candle ops: per sequence, each kv head's keys and
//! values are gathered once into f32 blocks (`[context, dim]`), then every (kv head, run of
//! query tokens) pair is a job on rayon's pool: the head's query rows side by side (token by
//! token, the `group` query heads of each), scores and value sum as two gemm calls, the causal
//! limit applied in the softmax. No mask tensor, no per-head tensor ops; a job holds at most
//! the caller's budget of scores.

use candle_core::{CpuStorage, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::dense::dots::WeightElem;
use crate::dense::{gemm_strided, host_f32, Strided};
use crate::paged::{softmax_visible, PagedSeq};

/// Jobs per worker thread a sequence's query tokens are cut into when the budget allows (the
/// last tokens of a chunk see the most positions, so a few jobs a thread even the load out).
const JOBS_PER_THREAD: usize = 2;

/// The widths of one call, checked by the caller.
pub(super) struct Dims {
    pub num_tokens: usize,
    pub num_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub block_size: usize,
}

/// [`super::paged_gqa_attention`] for CPU caches in f32 or bf16 (`None` for other dtypes or
/// non-contiguous caches): `[num_tokens, num_heads, v_head_dim]` f32, rows outside `seqs`
/// zero. `seqs` must have been checked against the caches; each job materializes at most
/// `max_scores` scores.
pub(super) fn host_gqa_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq],
    scale: f64,
    dims: &Dims,
    max_scores: usize,
) -> Result<Option<Tensor>> {
    let (k_storage, k_layout) = k_cache.storage_and_layout();
    let (v_storage, v_layout) = v_cache.storage_and_layout();
    let (Some((k0, k1)), Some((v0, v1))) = (k_layout.contiguous_offsets(), v_layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let q_host = host_f32(q)?;
    let mut out = vec![0f32; dims.num_tokens * dims.num_heads * dims.v_head_dim];
    let call = Call {
        q: &q_host,
        dims,
        scale: scale as f32,
        max_scores: max_scores.max(1),
    };
    match (&*k_storage, &*v_storage) {
        (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
            call.attend(&k[k0..k1], &v[v0..v1], seqs, &mut out)
        }
        (Storage::Cpu(CpuStorage::BF16(k)), Storage::Cpu(CpuStorage::BF16(v))) => {
            call.attend(&k[k0..k1], &v[v0..v1], seqs, &mut out)
        }
        _ => return Ok(None),
    }
    drop((k_storage, v_storage));
    let shape = (dims.num_tokens, dims.num_heads, dims.v_head_dim);
    Tensor::from_vec(out, shape, q.device()).map(Some)
}

/// What every sequence of one call shares.
struct Call<'a> {
    /// `[num_tokens, num_heads, head_dim]` f32.
    q: &'a [f32],
    dims: &'a Dims,
    scale: f32,
    max_scores: usize,
}

impl Call<'_> {
    fn attend<W: WeightElem>(&self, k_cache: &[W], v_cache: &[W], seqs: &[PagedSeq], out: &mut [f32]) {
        for seq in seqs.iter().filter(|s| s.query_len > 0) {
            self.attend_seq(k_cache, v_cache, seq, out);
        }
    }

    /// One sequence's rows of `out` (`[num_tokens, num_heads, v_head_dim]`).
    fn attend_seq<W: WeightElem>(&self, k_cache: &[W], v_cache: &[W], seq: &PagedSeq, out: &mut [f32]) {
        let d = self.dims;
        let (kvh, group) = (d.kv_heads, d.num_heads / d.kv_heads);
        let context = seq.context_len;
        // Each kv head's keys and values over the context: [kv_heads][context][dim] f32.
        let gather = |cache: &[W], dim: usize| -> Vec<f32> {
            let mut dense = vec![0f32; kvh * context * dim];
            dense
                .par_chunks_mut((context * dim).max(1))
                .enumerate()
                .for_each(|(g, head)| {
                    for (p, dst) in head.chunks_exact_mut(dim.max(1)).enumerate() {
                        let row = (seq.slot(p, d.block_size) * kvh + g) * dim;
                        for (x, &c) in dst.iter_mut().zip(&cache[row..row + dim]) {
                            *x = c.widen();
                        }
                    }
                });
            dense
        };
        let (keys, values) = (gather(k_cache, d.head_dim), gather(v_cache, d.v_head_dim));
        let by_budget = (self.max_scores / (group * context).max(1)).max(1);
        let by_threads = (seq.query_len * kvh).div_ceil(JOBS_PER_THREAD * rayon::current_num_threads());
        let job_tokens = by_budget.min(by_threads).clamp(1, seq.query_len);
        let runs = seq.query_len.div_ceil(job_tokens);
        let results: Vec<(usize, usize, Vec<f32>)> = (0..kvh * runs)
            .into_par_iter()
            .map_init(Vec::new, |scores, job| {
                let (g, t0) = (job / runs, job % runs * job_tokens);
                let tokens = job_tokens.min(seq.query_len - t0);
                let rows = self.job(seq, g, t0, tokens, &keys, &values, scores);
                (g, t0, rows)
            })
            .collect();
        // Each job's rows ([tokens][group][v_head_dim]) to their heads' places.
        let row_out = d.num_heads * d.v_head_dim;
        let width = group * d.v_head_dim;
        for (g, t0, rows) in results {
            for (t, src) in rows.chunks_exact(width.max(1)).enumerate() {
                let at = (seq.query_start + t0 + t) * row_out + g * width;
                out[at..at + width].copy_from_slice(src);
            }
        }
    }

    /// Query tokens `t0..t0 + tokens` of `seq` against kv head `g`: `[tokens][group][v_head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn job(
        &self,
        seq: &PagedSeq,
        g: usize,
        t0: usize,
        tokens: usize,
        keys: &[f32],
        values: &[f32],
        scores: &mut Vec<f32>,
    ) -> Vec<f32> {
        let d = self.dims;
        let group = d.num_heads / d.kv_heads;
        let (dim, v_dim, context) = (d.head_dim, d.v_head_dim, seq.context_len);
        let rows = tokens * group;
        // Query token t0 + t sees positions < offset + t + 1.
        let offset = context - seq.query_len + t0;
        let span = offset + tokens;
        // The head group's query rows, token by token: [rows, dim].
        let mut x = Vec::with_capacity(rows * dim);
        for t in 0..tokens {
            let first = ((seq.query_start + t0 + t) * d.num_heads + g * group) * dim;
            x.extend_from_slice(&self.q[first..first + group * dim]);
        }
        let k = &keys[g * context * dim..][..span * dim];
        let v = &values[g * context * v_dim..][..span * v_dim];
        scores.clear();
        scores.resize(rows * span, 0.0);
        // scores[row, p] = q_row · key_p: the keys read as a dim x span matrix.
        gemm_strided(
            (rows, span, dim),
            Strided::new(&mut scores[..], span, 1),
            Strided::new(&x[..], dim, 1),
            Strided::new(k, 1, dim),
            gemm::Parallelism::None,
        );
        softmax_visible(scores, span, self.scale, |row| offset + row / group + 1);
        let mut out = vec![0f32; rows * v_dim];
        gemm_strided(
            (rows, v_dim, span),
            Strided::new(&mut out[..], v_dim, 1),
            Strided::new(&scores[..], span, 1),
            Strided::new(v, v_dim, 1),
            gemm::Parallelism::None,
        );
        out
    }
}
