//! f32 products of mid-sized batches on AVX-512 as outer products: `out[i, j] = x_i · w_j`
//! for `x` `[m, k]` and f32 weight rows `w_j` as the model holds them (no packed copy).
//!
//! `x` is packed once per product, transposed: [`PackedX`] holds `[k][m_pad]` (rows of `x`
//! zero-padded to whole 16-lane vectors). A register block keeps `MV` vectors of 16 rows of
//! `x` against `NW` weight rows (`MV x NW` accumulators, 24 of AVX-512's 32 registers): per
//! inner position it loads `MV` vectors of packed `x` and broadcasts one weight element per
//! weight row, each feeding `MV` FMAs. The block's weight rows are copied 128 positions at a
//! time into a small panel whose rows sit in different L1 sets (a weight's rows are often a
//! multiple of 4 KiB apart), the next 128 prefetched into L2 meanwhile. There are no
//! horizontal sums (the dot kernels' cost) and no per-call repacking of the whole weight
//! (the `gemm` crate's); the cost is the zero lanes of a last partial vector of `x`, which
//! is why decode batches of a few rows keep the dot kernels ([`OUTER_MIN_ROWS`]).
//!
//! Each output is one lane summing `x[i, p] · w[j, p]` for `p = 0, 1, ..` in order, so a
//! row's result does not depend on the other rows of its batch. `MOE_CPU_OUTER=0` turns the
//! path off (for A/B timings).

use super::dots::Line;

/// Rows of `x` from which f32 products take this path (below, the dot kernels: a partial
/// vector of `x` wastes lanes of every FMA). `cpu_matmul -- cold` (weights streamed from
/// DRAM, huge pages), expert gate_up `[2816, 2048]`, 2 threads: 16 rows 1.52 ms on the dots
/// against 1.64 here, 24 rows 2.02 against 2.01; warm, 32 rows 1.89 against gemm tiles' 2.01,
/// 64 rows 3.55 against 4.30.
pub const OUTER_MIN_ROWS: usize = 24;
/// Rows of `x` up to which f32 products take this path; past it, `gemm`'s cache blocking of
/// `x` wins (this path reads all of the packed `x`, `k * m` floats, once per block of weight
/// rows): level at 128 rows (7.97 ms against 7.54), 2.4x slower at 256.
pub const OUTER_MAX_ROWS: usize = 128;

/// Lanes of one vector of `x`.
const LANES: usize = 16;
/// Vectors of `x` per register block at most (64 rows).
const MAX_MV: usize = 4;
/// Inner positions per pass over `x`: 64 rows of packed `x` and a 48-row weight tile are
/// 512 + 384 KiB at 2048, in L2. (Unblocked, a `[2048, 10944]` down projection at 128 rows
/// re-read 2.8 MiB of `x` from L3 for every 6 weight rows: 2.5x slower than `gemm`.)
const K_BLOCK: usize = 2048;

/// Inner dimensions up to which this path is taken; past it `gemm`, which blocks `x` for
/// every cache level, wins. `cpu_matmul -- cold`, f32 weights streamed from DRAM, 64 rows,
/// against `MOE_CPU_OUTER=0`: `[2048, 4096]` 5.6 against 6.8 ms, `[2048, 8192]` 13.2 against
/// 11.8, `[2048, 10944]` 16.7 against 12.7.
pub const OUTER_MAX_DEPTH: usize = 4096;

/// Whether f32 products of `m` rows of `x` over an inner dimension `k` take this path on this
/// CPU.
pub fn applies(m: usize, k: usize) -> bool {
    (OUTER_MIN_ROWS..=OUTER_MAX_ROWS).contains(&m) && k <= OUTER_MAX_DEPTH && available()
}

/// AVX-512F on this CPU, and not turned off with `MOE_CPU_OUTER=0`.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var("MOE_CPU_OUTER").is_ok_and(|v| v == "0");
        #[cfg(target_arch = "x86_64")]
        let detected = is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let detected = false;
        !off && detected
    })
}

/// `x` `[m, k]` transposed to `[k][m_pad]`, `m_pad` the rows rounded up to 16, zero-padded.
pub struct PackedX {
    data: Vec<Line>,
    m: usize,
    m_pad: usize,
    k: usize,
}

impl PackedX {
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k, "outer: x shorter than m x k");
        let m_pad = m.div_ceil(LANES) * LANES;
        let mut data = vec![Line::default(); k * m_pad / LANES];
        // SAFETY: `data` is k * m_pad floats long, as a slice of f32 (Line is 16 f32s).
        let dst = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut f32, k * m_pad) };
        // Blocks of 16 positions keep the reads of each row of `x` sequential.
        for p0 in (0..k).step_by(LANES) {
            let len = LANES.min(k - p0);
            for i in 0..m {
                for (d, &v) in x[i * k + p0..][..len].iter().enumerate() {
                    dst[(p0 + d) * m_pad + i] = v;
                }
            }
        }
        PackedX { data, m, m_pad, k }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    fn ptr(&self) -> *const f32 {
        self.data.as_ptr() as *const f32
    }
}

/// `out[i * si + j * sj] = x_i · w_j` for `i < m`, `j < rows` (`w`: `rows * k` f32).
pub fn tile_product(x: &PackedX, w: &[f32], rows: usize, out: &mut [f32], si: usize, sj: usize) {
    let m = x.m;
    if m == 0 || rows == 0 {
        return;
    }
    assert!(
        out.len() > (m - 1) * si + (rows - 1) * sj,
        "outer: output shorter than m x rows"
    );
    // SAFETY: every element written is inside `out` (checked just above).
    unsafe { tile_product_into(x, w, rows, out.as_mut_ptr(), si, sj) }
}

/// [`tile_product`] into a raw output, for parallel jobs writing disjoint elements of one
/// buffer.
///
/// # Safety
/// `out + i * si + j * sj` must be valid for writes for `i < m`, `j < rows`, and written by
/// no one else meanwhile.
pub unsafe fn tile_product_into(x: &PackedX, w: &[f32], rows: usize, out: *mut f32, si: usize, sj: usize) {
    let (m, k) = (x.m, x.k);
    assert!(w.len() >= rows * k, "outer: weight shorter than rows x k");
    if m == 0 || rows == 0 {
        return;
    }
    assert!(available(), "outer: AVX-512F not available");
    #[cfg(target_arch = "x86_64")]
    {
        // Past `K_BLOCK` positions the inner dimension goes a block at a time, every chunk of
        // `x` through each block, so that the block of packed `x` and of the tile's weight rows
        // stay in L2; the outputs carry the running sums from block to block.
        let mut p0 = 0;
        while p0 < k {
            let depth = K_BLOCK.min(k - p0);
            let mut i0 = 0;
            while i0 < m {
                let live = (m - i0).min(MAX_MV * LANES);
                let mv = live.div_ceil(LANES);
                let args = Chunk {
                    x: x.ptr().wrapping_add(p0 * x.m_pad + i0),
                    m_pad: x.m_pad,
                    k,
                    depth,
                    w: w.as_ptr().wrapping_add(p0),
                    rows,
                    out: out.wrapping_add(i0 * si),
                    si,
                    sj,
                    live,
                    accumulate: p0 > 0,
                };
                // SAFETY: AVX-512F was checked above; the chunk's reads stay inside the packed
                // `x` (rows i0..i0 + mv * 16 of m_pad, positions p0..p0 + depth) and `w` (rows *
                // k), its reads and writes of the output inside the caller's (rows i0..i0 +
                // live, columns 0..rows).
                unsafe {
                    match mv {
                        1 => simd::chunk::<1, 24>(&args),
                        2 => simd::chunk::<2, 12>(&args),
                        3 => simd::chunk::<3, 8>(&args),
                        _ => simd::chunk::<4, 6>(&args),
                    }
                }
                i0 += live;
            }
            p0 += depth;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (out, si, sj);
}

/// Up to 64 rows of `x` against every weight row of a tile, over one block of the inner
/// dimension.
struct Chunk {
    /// The packed `x` at the chunk's first row and the block's first position.
    x: *const f32,
    m_pad: usize,
    /// Distance between weight rows.
    k: usize,
    /// Positions in the block.
    depth: usize,
    /// The weight's first row at the block's first position.
    w: *const f32,
    rows: usize,
    /// The output at the chunk's first row.
    out: *mut f32,
    si: usize,
    sj: usize,
    /// Rows of `x` in the chunk (the rest of its vectors are padding).
    live: usize,
    /// Whether the output holds the sums of the positions before the block (added to, in
    /// position order), or is written afresh.
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Chunk, LANES};
    use std::arch::x86_64::*;

    /// Inner positions per step of a block: its weight rows' next `KC` elements are copied
    /// into [`Panel`] first.
    const KC: usize = 128;
    /// Floats between the panel's rows: `KC` plus one cache line, so that the rows of a block
    /// sit in different L1 sets. (A weight's own rows are often a multiple of 4 KiB apart:
    /// read in place, a block's 24 rows would compete for one set's 12 ways.)
    const STRIDE: usize = KC + LANES;
    /// Weight rows of the widest block.
    const MAX_NW: usize = 24;

    /// A block's weight rows, `KC` positions of each, `STRIDE` apart.
    #[repr(C, align(64))]
    struct Panel([f32; MAX_NW * STRIDE]);

    /// The chunk in blocks of `NW` weight rows (then 4, then 1 at the tile's edge).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chunk<const MV: usize, const NW: usize>(c: &Chunk) {
        let mut panel = Panel([0.0; MAX_NW * STRIDE]);
        let panel = panel.0.as_mut_ptr();
        let mut j = 0;
        while j + NW <= c.rows {
            block::<MV, NW>(c, j, panel);
            j += NW;
        }
        while j + 4 <= c.rows {
            block::<MV, 4>(c, j, panel);
            j += 4;
        }
        while j < c.rows {
            block::<MV, 1>(c, j, panel);
            j += 1;
        }
    }

    /// `kc` positions of a block: `acc[r][v] += x[p][v] * panel[r][p]`. Kept out of line so
    /// that its accumulators live in registers for the whole loop (inlined into the block,
    /// whose panel copies store through raw pointers, they were stored back after every FMA).
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn step<const MV: usize, const NW: usize>(
        acc: &mut [[__m512; MV]; NW],
        x: *const f32,
        m_pad: usize,
        panel: *const f32,
        kc: usize,
    ) {
        let mut regs = *acc;
        for pp in 0..kc {
            let xp = x.add(pp * m_pad);
            let xv: [__m512; MV] = std::array::from_fn(|v| _mm512_loadu_ps(xp.add(v * LANES)));
            for (r, row) in regs.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*panel.add(r * STRIDE + pp));
                for (a, &xv) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(xv, wv, *a);
                }
            }
        }
        *acc = regs;
    }

    /// Weight rows `j0..j0 + NW` against the chunk's `MV` vectors of `x`, over the whole
    /// inner dimension, `KC` positions at a time, then stored.
    #[inline(always)]
    unsafe fn block<const MV: usize, const NW: usize>(c: &Chunk, j0: usize, panel: *mut f32) {
        let (k, depth) = (c.k, c.depth);
        let w = c.w.add(j0 * k);
        let mut acc = [[_mm512_setzero_ps(); MV]; NW];
        if c.accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                let out = c.out.add((j0 + r) * c.sj);
                for (v, a) in acc.iter_mut().enumerate() {
                    let live = c.live.saturating_sub(v * LANES).min(LANES);
                    if live == 0 {
                        break;
                    }
                    let mut lanes = [0f32; LANES];
                    for (l, val) in lanes[..live].iter_mut().enumerate() {
                        *val = *out.add((v * LANES + l) * c.si);
                    }
                    *a = _mm512_loadu_ps(lanes.as_ptr());
                }
            }
        }
        let mut p0 = 0;
        while p0 < depth {
            let kc = KC.min(depth - p0);
            for r in 0..NW {
                let (src, dst) = (w.add(r * k + p0), panel.add(r * STRIDE));
                let mut q = 0;
                while q + LANES <= kc {
                    _mm512_store_ps(dst.add(q), _mm512_loadu_ps(src.add(q)));
                    q += LANES;
                }
                while q < kc {
                    *dst.add(q) = *src.add(q);
                    q += 1;
                }
                // The row's next step, into L2 while this one computes.
                let ahead = (depth - p0 - kc).min(KC);
                let mut q = 0;
                while q < ahead {
                    _mm_prefetch::<_MM_HINT_T1>(src.add(kc + q) as *const i8);
                    q += LANES;
                }
            }
            step::<MV, NW>(&mut acc, c.x.add(p0 * c.m_pad), c.m_pad, panel, kc);
            p0 += kc;
        }
        for (r, acc) in acc.iter().enumerate() {
            let out = c.out.add((j0 + r) * c.sj);
            for (v, &a) in acc.iter().enumerate() {
                let live = c.live.saturating_sub(v * LANES).min(LANES);
                if live == 0 {
                    break;
                }
                if c.si == 1 {
                    let mask: __mmask16 = if live == LANES { !0 } else { (1u16 << live) - 1 };
                    _mm512_mask_storeu_ps(out.add(v * LANES), mask, a);
                } else {
                    let mut lanes = [0f32; LANES];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), a);
                    for (l, &val) in lanes[..live].iter().enumerate() {
                        *out.add((v * LANES + l) * c.si) = val;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values::{naive_nt as naive, values};

    /// Every chunk width (1 to 4 vectors, and two chunks), weight rows that are and are not
    /// block multiples, odd inner dimensions, several blocks of it, both output layouts.
    #[test]
    fn outer_products_match_a_naive_product() {
        if !available() {
            eprintln!("no AVX-512F: skipped");
            return;
        }
        for (m, k, rows) in [
            (8, 40, 5),
            (16, 33, 30),
            (20, 17, 29),
            (40, 70, 13),
            (64, 16, 7),
            (100, 35, 61),
            (130, 9, 3),
            // Past one block of the inner dimension: running sums carried in the output.
            (20, 2 * K_BLOCK + 100, 7),
        ] {
            let x = values(m * k, 1);
            let w = values(rows * k, 2);
            let want = naive(&x, m, k, &w, rows);
            let packed = PackedX::new(&x, m, k);
            // Row-major [m, rows].
            let mut out = vec![f32::NAN; m * rows];
            tile_product(&packed, &w, rows, &mut out, rows, 1);
            // Transposed [rows, m].
            let mut out_t = vec![f32::NAN; m * rows];
            tile_product(&packed, &w, rows, &mut out_t, 1, m);
            for i in 0..m {
                for j in 0..rows {
                    let e = want[i * rows + j];
                    let tol = 1e-5 * k as f32;
                    assert!((out[i * rows + j] - e).abs() <= tol, "{m}x{k}x{rows} [{i},{j}]");
                    assert!((out_t[j * m + i] - e).abs() <= tol, "{m}x{k}x{rows} t[{i},{j}]");
                }
            }
        }
    }

    /// A row's result is the same bits whatever the other rows of its batch.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        if !available() {
            return;
        }
        let (k, rows) = (K_BLOCK + 100, 31);
        let x = values(70 * k, 3);
        let w = values(rows * k, 4);
        let alone = {
            let mut out = vec![0f32; rows];
            tile_product(&PackedX::new(&x[5 * k..6 * k], 1, k), &w, rows, &mut out, 1, 1);
            out
        };
        for m in [8, 16, 37, 70] {
            let mut out = vec![0f32; m * rows];
            tile_product(&PackedX::new(&x[..m * k], m, k), &w, rows, &mut out, rows, 1);
            assert_eq!(&out[5 * rows..6 * rows], &alone[..], "batch {m}");
        }
    }
}
