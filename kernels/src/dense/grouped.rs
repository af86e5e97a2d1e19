//! Products of many small groups that share a token axis, `out[t, g, :] = x[t, g, :] · W_gᵀ`
//! (MLA's per-head `W_UK` and `W_UV`): every (group, tile of weight rows) pair is one job on
//! rayon's pool over the tiled kernels of [`super`], so a step reads each group's weight
//! once, whatever its dtype, and the operands are read and written in place through strides.

use rayon::prelude::*;

use super::{tile_product, tile_rows, Lhs, TileScratch, WeightRows};

/// Groups per worker thread from which each group is one job.
const GROUPS_PER_THREAD: usize = 2;

/// Tokens per block of the final placement (one cache line of each row of the transposed
/// result).
const PLACE_TOKENS: usize = 16;

/// Where the operands of a [`grouped_product`] lie in their slices: element `(t, g, c)` of
/// `x` at `t * x_rs + g * x_gs + c`, and output `(t, g, j)` at `t * out_rs + g * out_gs + j`.
#[derive(Clone, Copy, Debug)]
pub struct GroupLayout {
    pub x_rs: usize,
    pub x_gs: usize,
    pub out_rs: usize,
    pub out_gs: usize,
}

/// For `groups` groups of `k`-wide rows of `x` (`tokens` of them) and `w` the rows of a
/// `[groups, n, k]` stack: `out[t, g, j] = x[t, g, :] · w[g * n + j, :]`, placed as `layout`
/// says (other elements of `out` are left alone).
///
/// Panics if `x`, `w` or `out` is too short for the layout.
#[allow(clippy::too_many_arguments)]
pub fn grouped_product(
    x: &[f32],
    tokens: usize,
    groups: usize,
    k: usize,
    w: WeightRows<'_>,
    n: usize,
    layout: GroupLayout,
    out: &mut [f32],
) {
    if tokens == 0 || groups == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, gs: usize, width: usize| (tokens - 1) * rs + (groups - 1) * gs + width;
    assert!(
        x.len() >= last(layout.x_rs, layout.x_gs, k) && out.len() >= last(layout.out_rs, layout.out_gs, n),
        "grouped_product: x or out shorter than its layout"
    );
    assert!(
        layout.out_gs >= n || groups == 1,
        "grouped_product: output groups overlap"
    );
    // Each group's rows of `x`, gathered: [tokens, k].
    let xs: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let mut rows = vec![0f32; tokens * k];
            for (t, dst) in rows.chunks_exact_mut(k.max(1)).enumerate() {
                dst.copy_from_slice(&x[t * layout.x_rs + g * layout.x_gs..][..k]);
            }
            rows
        })
        .collect();
    let lhs: Vec<Lhs> = xs.par_iter().map(|rows| Lhs::new(rows, tokens, k, w)).collect();
    // Jobs write their tile of the transposed result, `[groups * n, tokens]`: a whole group
    // each when there are enough groups to share out (a head's `W_UK` at decode is a few
    // microseconds of work, less than a job's overhead), else the product's usual tiles.
    let tile = if groups >= GROUPS_PER_THREAD * rayon::current_num_threads() {
        n
    } else {
        tile_rows(tokens, k, w)
    };
    let mut out_t = vec![0f32; groups * n * tokens];
    let mut jobs = Vec::with_capacity(groups * n.div_ceil(tile));
    let mut rest = &mut out_t[..];
    for g in 0..groups {
        let mut r0 = 0;
        while r0 < n {
            let rows = tile.min(n - r0);
            let (job, tail) = std::mem::take(&mut rest).split_at_mut(rows * tokens);
            jobs.push((g, r0, job));
            rest = tail;
            r0 += rows;
        }
    }
    jobs.into_par_iter()
        .for_each_init(TileScratch::default, |scratch, (g, r0, job)| {
            let rows = job.len() / tokens;
            tile_product(&lhs[g], w, g * n + r0, rows, job, 1, tokens, scratch);
        });
    // Placed a block of tokens at a time: each row of `out_t` gives a line of `PLACE_TOKENS`
    // values, one for each of the block's output rows (all of which stay in L1 meanwhile).
    let place = |t0: usize, rows: &mut [f32]| {
        let block = PLACE_TOKENS.min(tokens - t0);
        for g in 0..groups {
            for j in 0..n {
                let src = &out_t[(g * n + j) * tokens + t0..][..block];
                for (dt, &v) in src.iter().enumerate() {
                    rows[dt * layout.out_rs + g * layout.out_gs + j] = v;
                }
            }
        }
    };
    if layout.out_rs >= last(0, layout.out_gs, n) {
        // Token rows are disjoint: place blocks of them in parallel.
        out.par_chunks_mut(PLACE_TOKENS * layout.out_rs)
            .take(tokens.div_ceil(PLACE_TOKENS))
            .enumerate()
            .for_each(|(b, rows)| place(b * PLACE_TOKENS, rows));
    } else {
        for t0 in (0..tokens).step_by(PLACE_TOKENS) {
            place(t0, &mut out[t0 * layout.out_rs..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::test_values::values;

    /// Every kernel the tiles can take (1 token: dots; 20: the outer-product kernel or gemm
    /// tiles; 70: gemm tiles), f32 and bf16 weights, strided `x` and an output with gaps
    /// between its groups, against a naive loop.
    #[test]
    fn grouped_products_match_a_naive_loop() {
        let (groups, k, n) = (3usize, 40usize, 37usize);
        for tokens in [1usize, 20, 70] {
            // x: [tokens, groups, k + 5] (5 unused columns a group); out: [tokens, groups, n + 4].
            let layout = GroupLayout {
                x_rs: groups * (k + 5),
                x_gs: k + 5,
                out_rs: groups * (n + 4),
                out_gs: n + 4,
            };
            let x = values(tokens * layout.x_rs, 1);
            let w32 = values(groups * n * k, 2);
            let w16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let w16_wide: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            for (w, wide) in [(WeightRows::F32(&w32), &w32), (WeightRows::Bf16(&w16), &w16_wide)] {
                let mut out = vec![f32::NAN; tokens * layout.out_rs];
                grouped_product(&x, tokens, groups, k, w, n, layout, &mut out);
                for t in 0..tokens {
                    for g in 0..groups {
                        for j in 0..n {
                            let xr = &x[t * layout.x_rs + g * layout.x_gs..][..k];
                            let wr = &wide[(g * n + j) * k..][..k];
                            let want: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                            let got = out[t * layout.out_rs + g * layout.out_gs + j];
                            // bf16 weights on AMX meet x rounded to bf16.
                            let tol = if matches!(w, WeightRows::Bf16(_)) { 2e-2 } else { 1e-4 };
                            assert!(
                                (got - want).abs() <= tol,
                                "tokens {tokens} [{t},{g},{j}]: {got} vs {want}"
                            );
                        }
                        // The gap columns are left alone.
                        assert!(out[t * layout.out_rs + g * layout.out_gs + n].is_nan());
                    }
                }
            }
        }
    }
}
