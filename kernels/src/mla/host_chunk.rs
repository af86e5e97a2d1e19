//! Long prompt chunks of paged MLA attention on the CPU as GEMMs: the sequence's visible
//! latents are gathered once into a dense `[context, dim]` f32 block, then each job of query
//! tokens takes scores `Q Kᵀ` and values `P V` from the `gemm` crate, the causal limit applied
//! in the softmax (no mask tensor). Jobs (runs of query tokens) go in parallel; each holds at
//! most [`MAX_JOB_SCORES`] scores, so a long context does not hold a `[tokens * heads,
//! context]` matrix at once.

use rayon::prelude::*;

use super::host_attention::Shape;
use crate::dense::dots::WeightElem;
use crate::dense::{gemm_strided, Strided};
use crate::paged::{softmax_visible, PagedSeq};

/// Scores one job holds at most (8 MiB of f32).
const MAX_JOB_SCORES: usize = 1 << 21;
/// Jobs per worker thread a chunk is cut into when its scores allow (the last query tokens
/// see the most positions, so a few jobs a thread even the load out).
const JOBS_PER_THREAD: usize = 2;

/// Attention of the query rows of `seq` in `q` (`[num_tokens, heads, dim]` f32) over its
/// cached rows in `cache`, into `out` (the sequence's `[query_len, heads, value_dim]` rows).
pub(super) fn attend_chunk<W: WeightElem>(q: &[f32], cache: &[W], seq: &PagedSeq, s: &Shape, out: &mut [f32]) {
    let (heads, dim, value_dim) = (s.heads, s.dim, s.value_dim);
    let context = seq.context_len;
    // The context's rows, position by position: [context, dim] f32.
    let mut keys = vec![0f32; context * dim];
    keys.par_chunks_mut(s.block_size * dim)
        .enumerate()
        .for_each(|(b, rows)| {
            for (r, dst) in rows.chunks_mut(dim).enumerate() {
                let slot = seq.slot(b * s.block_size + r, s.block_size);
                for (d, &v) in dst.iter_mut().zip(&cache[slot * dim..][..dim]) {
                    *d = v.widen();
                }
            }
        });
    let by_memory = (MAX_JOB_SCORES / (heads * context).max(1)).max(1);
    let by_threads = seq.query_len.div_ceil(JOBS_PER_THREAD * rayon::current_num_threads());
    let job_tokens = by_memory.min(by_threads).max(1);
    let q_seq = &q[seq.query_start * heads * dim..][..seq.query_len * heads * dim];
    out.par_chunks_mut(job_tokens * heads * value_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores, (n, out)| {
            let t0 = n * job_tokens;
            let tokens = out.len() / (heads * value_dim);
            let rows = tokens * heads;
            // Query token t0 + t sees positions < offset + t + 1.
            let offset = context - seq.query_len + t0;
            let span = offset + tokens;
            scores.clear();
            scores.resize(rows * span, 0.0);
            let x = &q_seq[t0 * heads * dim..][..rows * dim];
            // scores[row, p] = q_row · key_p: the keys read as a dim x span matrix.
            gemm_strided(
                (rows, span, dim),
                Strided::new(&mut scores[..], span, 1),
                Strided::new(x, dim, 1),
                Strided::new(&keys[..span * dim], 1, dim),
                gemm::Parallelism::None,
            );
            softmax_visible(scores, span, s.scale, |row| offset + row / heads + 1);
            // out[row] = Σ_p probs[row, p] · value_p, a value being a key's first columns.
            gemm_strided(
                (rows, value_dim, span),
                Strided::new(out, value_dim, 1),
                Strided::new(&scores[..], span, 1),
                Strided::new(&keys[..span * dim], dim, 1),
                gemm::Parallelism::None,
            );
        });
}
