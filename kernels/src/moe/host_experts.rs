//! The grouped expert MLP on the CPU in one pass over the active experts' weights:
//! every (expert, tile of output rows) pair is a job on rayon's pool, so the work is spread
//! across experts and rows at once, and each active expert's weights are read once per call
//! whatever the number of its tokens (the dot kernels of [`crate::dense`] for decode-sized
//! groups, the GEMM tiles for larger ones, AMX tiles for bf16 weights where the CPU has them,
//! each group's tokens packed for them once).
//!
//! Two phases: gate and up rows of a tile are multiplied together and leave
//! `silu(gate) * up` for the tile's intermediate columns; then the down projection. Everything
//! is f32 on the host; a token's output sums its `top_k` slots in slot order, as
//! [`super::grouped_expert_mlp`] does on other devices.

use rayon::prelude::*;

use super::permute::ExpertPermutation;
use crate::dense::{tile_product, tile_rows, Lhs, TileScratch, WeightRows};

/// The tokens routed to one expert, in ascending slot order.
struct Group<'a> {
    expert: usize,
    slots: &'a [u32],
}

/// `x`: `[tokens, hidden]` f32. `gate_up`: the rows of `[E, 2I, H]`, `down`: of `[E, H, I]`.
/// Returns `[tokens, hidden]` f32: `Σ_j slot_weights[t * top_k + j] · expert_{id}(x_t)`.
#[allow(clippy::too_many_arguments)]
pub fn host_expert_mlp(
    x: &[f32],
    hidden: usize,
    intermediate: usize,
    perm: &ExpertPermutation,
    slot_weights: &[f32],
    top_k: usize,
    gate_up: WeightRows<'_>,
    down: WeightRows<'_>,
) -> Vec<f32> {
    let tokens = x.len() / hidden;
    let groups: Vec<Group> = (0..perm.counts.len())
        .filter(|&e| perm.counts[e] > 0)
        .map(|e| {
            let start = perm.offsets[e] as usize;
            Group {
                expert: e,
                slots: &perm.sorted_slots[start..start + perm.counts[e] as usize],
            }
        })
        .collect();
    // Each group's tokens gathered into consecutive rows: [rows, H].
    let rows: usize = groups.iter().map(|g| g.slots.len()).sum();
    let mut gathered = vec![0f32; rows * hidden];
    let mut first_row = Vec::with_capacity(groups.len());
    let mut r = 0;
    for g in &groups {
        first_row.push(r);
        for &s in g.slots {
            let t = s as usize / top_k;
            gathered[r * hidden..(r + 1) * hidden].copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
            r += 1;
        }
    }

    // Phase 1: act_t, each group's activations transposed ([I, count]), tile by tile.
    let lhs = group_operands(&gathered, &groups, &first_row, hidden, gate_up);
    let mut act_t = vec![0f32; rows * intermediate];
    let jobs = split_jobs(&mut act_t, &groups, intermediate, hidden, gate_up);
    jobs.into_par_iter()
        .for_each_init(Scratch::default, |scratch, (gi, r0, out)| {
            let (g, count) = (&groups[gi], groups[gi].slots.len());
            let n = out.len() / count;
            let base = g.expert * 2 * intermediate;
            scratch.gate.resize(n * count, 0.0);
            scratch.up.resize(n * count, 0.0);
            let w = &mut scratch.tiles;
            tile_product(&lhs[gi], gate_up, base + r0, n, &mut scratch.gate, 1, count, w);
            tile_product(
                &lhs[gi],
                gate_up,
                base + intermediate + r0,
                n,
                &mut scratch.up,
                1,
                count,
                w,
            );
            for ((o, &gv), &uv) in out.iter_mut().zip(&scratch.gate).zip(&scratch.up) {
                *o = gv / (1.0 + (-gv).exp()) * uv;
            }
        });
    // The down projection reads each group's activations as rows: [count, I].
    let mut act = vec![0f32; rows * intermediate];
    for (gi, g) in groups.iter().enumerate() {
        let (r0, count) = (first_row[gi], g.slots.len());
        let src = &act_t[r0 * intermediate..(r0 + count) * intermediate];
        let dst = &mut act[r0 * intermediate..(r0 + count) * intermediate];
        for (c, col) in src.chunks_exact(count).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                dst[i * intermediate + c] = v;
            }
        }
    }

    // Phase 2: y_t, each group's outputs transposed ([H, count]).
    let lhs = group_operands(&act, &groups, &first_row, intermediate, down);
    let mut y_t = vec![0f32; rows * hidden];
    let jobs = split_jobs(&mut y_t, &groups, hidden, intermediate, down);
    jobs.into_par_iter()
        .for_each_init(TileScratch::default, |scratch, (gi, r0, out)| {
            let (g, count) = (&groups[gi], groups[gi].slots.len());
            let n = out.len() / count;
            tile_product(&lhs[gi], down, g.expert * hidden + r0, n, out, 1, count, scratch);
        });

    // Combine: each token sums its slots in slot order.
    let mut where_is = vec![None; tokens * top_k];
    for (gi, g) in groups.iter().enumerate() {
        for (pos, &s) in g.slots.iter().enumerate() {
            if let Some(w) = where_is.get_mut(s as usize) {
                *w = Some((gi, pos));
            }
        }
    }
    let mut out = vec![0f32; tokens * hidden];
    out.par_chunks_mut(hidden).enumerate().for_each(|(t, row)| {
        for j in 0..top_k {
            let slot = t * top_k + j;
            let Some((gi, pos)) = where_is[slot] else { continue };
            let (count, wt) = (groups[gi].slots.len(), slot_weights[slot]);
            let y = &y_t[first_row[gi] * hidden..(first_row[gi] + count) * hidden];
            for (h, o) in row.iter_mut().enumerate() {
                *o += wt * y[h * count + pos];
            }
        }
    });
    out
}

#[derive(Default)]
struct Scratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    tiles: TileScratch,
}

/// Each group's rows of `x` (`[rows, width]`, groups one after the other) as the left
/// operand of its products with `w` (packed in parallel when the products need it).
fn group_operands<'x>(
    x: &'x [f32],
    groups: &[Group],
    first_row: &[usize],
    width: usize,
    w: WeightRows<'_>,
) -> Vec<Lhs<'x>> {
    (0..groups.len())
        .into_par_iter()
        .map(|gi| {
            let count = groups[gi].slots.len();
            let r0 = first_row[gi];
            Lhs::new(&x[r0 * width..(r0 + count) * width], count, width, w)
        })
        .collect()
}

/// Cuts `buf` (each group's `[width, count]` block, groups one after the other) into jobs of
/// [`tile_rows`] output rows for the group's products with `w` (`depth` its rows' length):
/// `(group, first row, the job's part of buf)`.
fn split_jobs<'b>(
    buf: &'b mut [f32],
    groups: &[Group],
    width: usize,
    depth: usize,
    w: WeightRows<'_>,
) -> Vec<(usize, usize, &'b mut [f32])> {
    let mut jobs = Vec::new();
    let mut rest = buf;
    for (gi, g) in groups.iter().enumerate() {
        let count = g.slots.len();
        let tile = tile_rows(count, depth, w);
        let mut r0 = 0;
        while r0 < width {
            let n = tile.min(width - r0);
            let (job, tail) = std::mem::take(&mut rest).split_at_mut(n * count);
            jobs.push((gi, r0, job));
            rest = tail;
            r0 += n;
        }
    }
    jobs
}
