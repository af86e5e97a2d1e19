//! Skinny products for decode-sized batches: `out[i, j] = x_i · w_j` for a few f32 rows `x_i`
//! against weight rows `w_j` stored as f32 or bf16 (widened in registers, never in memory).
//!
//! Register-blocked: a block of `BX` rows of `x` by `BW` weight rows keeps one
//! [`LANES`]-wide accumulator per dot product in registers (4 x 6 with AVX-512's 32
//! registers, 2 x 2 with AVX2's 16), so each weight vector loaded (from memory, once per call)
//! feeds `BX` FMAs and each `x` vector `BW`; past `BX` rows of `x` the inner dimension is
//! walked in chunks that keep `x` in L1 (see [`dots_blocked`]), each weight group's last
//! block prefetching the next group into L2. AVX-512
//! and AVX2+FMA variants are picked at run time; other targets run the same loops in scalar
//! code. Every dot product, whatever block computed it, sums its lanes in one fixed order
//! ([`fold`]), so a row's result does not depend on the other rows of the batch.

use half::bf16;

/// Accumulator lanes of one dot product (one AVX-512 register, two AVX2 registers).
pub const LANES: usize = 16;

/// `out[i * si + j * sj] = x[i * k..][..k] · w[j * k..][..k]` for `i < m`, `j < rows`.
/// (Products over many weight tiles prepare `x` once with [`DotsLhs`] and call [`dots_with`].)
#[allow(clippy::too_many_arguments)]
pub fn dots<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], rows: usize, out: &mut [f32], si: usize, sj: usize) {
    let lhs = DotsLhs::new(x, m, k);
    dots_with(&lhs, w, rows, out, si, sj, &mut Vec::new())
}

/// Sixteen floats on a cache line of their own: one accumulator, or one packed vector of `x`.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub struct Line(pub [f32; LANES]);

/// The left operand of [`dots_with`], prepared once per product: `x` `[m, k]` f32, and, past
/// one register block of rows, a copy of its whole vectors packed chunk by chunk
/// (`[chunk][m][len]`, [`CHUNK`] positions a chunk): rows of `x` are often a multiple of
/// 4 KiB apart, and would evict each other from L1's sets while a chunk is reused.
pub struct DotsLhs<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    packed: Vec<Line>,
}

impl<'a> DotsLhs<'a> {
    pub fn new(x: &'a [f32], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k, "dots: x shorter than m x k");
        let full = k / LANES * LANES;
        let mut packed = Vec::new();
        if m > block_rows() && full > 0 {
            packed = vec![Line::default(); m * full / LANES];
            // SAFETY: `packed` is m * full floats long, as a slice of f32 (Line is 16 f32s).
            let dst = unsafe { std::slice::from_raw_parts_mut(packed.as_mut_ptr() as *mut f32, m * full) };
            let mut c0 = 0;
            while c0 < full {
                let len = CHUNK.min(full - c0);
                for i in 0..m {
                    dst[c0 * m + i * len..][..len].copy_from_slice(&x[i * k + c0..][..len]);
                }
                c0 += len;
            }
        }
        DotsLhs { x, m, k, packed }
    }

    /// The packed floats of chunk `c0` (`[m][len]`), when packed.
    fn chunk(&self, c0: usize) -> Option<*const f32> {
        (!self.packed.is_empty()).then(|| (self.packed.as_ptr() as *const f32).wrapping_add(c0 * self.m))
    }
}

/// `out[i * si + j * sj] = x_i · w_j` for the rows `x_i` of `lhs` and `w_j` of `w` (`rows * k`);
/// `acc` is a reusable buffer for the k-blocked walk's accumulators.
pub fn dots_with<W: WeightElem>(
    lhs: &DotsLhs<'_>,
    w: &[W],
    rows: usize,
    out: &mut [f32],
    si: usize,
    sj: usize,
    acc: &mut Vec<Line>,
) {
    let (m, k) = (lhs.m, lhs.k);
    assert!(w.len() >= rows * k, "dots: weight shorter than rows x k");
    if m == 0 || rows == 0 {
        return;
    }
    assert!(
        out.len() > (m - 1) * si + (rows - 1) * sj,
        "dots: output shorter than m x rows"
    );
    let args = Args { lhs, w, rows, si, sj };
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected on this CPU just above; `args` was checked.
            return unsafe { simd::dots_avx512(&args, out, acc) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { simd::dots_avx2(&args, out, acc) };
        }
    }
    dots_portable(&args, out, acc)
}

/// Rows of `x` in the register block of the variant this CPU runs (past them, [`dots_with`]
/// walks the inner dimension in chunks of a packed `x`).
fn block_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        return 4;
    }
    MIN_BLOCK_ROWS
}

/// The operands of one [`dots_with`] call, checked.
struct Args<'a, W> {
    lhs: &'a DotsLhs<'a>,
    w: &'a [W],
    rows: usize,
    si: usize,
    sj: usize,
}

/// A weight element type the kernels widen to f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    #[cfg(target_arch = "x86_64")]
    /// # Safety
    /// `p..p + 16` readable; AVX-512F available.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    #[cfg(target_arch = "x86_64")]
    /// # Safety
    /// `p..p + 8` readable; AVX2 available.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
            16,
        ))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        ))
    }
}

/// One vector ISA: a [`LANES`]-wide f32 accumulator and its operations.
trait Lanes {
    type V: Copy;
    unsafe fn load_x(p: *const f32) -> Self::V;
    unsafe fn load_w<W: WeightElem>(p: *const W) -> Self::V;
    unsafe fn fma(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
}

/// Weight rows per panel of the k-blocked walk: a panel's accumulators against every row of
/// `x` wait in a buffer between chunks (32 rows of `x` by 36 weight rows: 72 KiB, in L2).
const PANEL_ROWS: usize = 36;
/// Inner positions per chunk of the k-blocked walk: 32 rows of `x` by 256 floats are 32 KiB,
/// so a chunk of `x` stays in L1 while every weight group of the panel passes over it.
const CHUNK: usize = 256;
/// Accumulators of the largest register block (4 rows of `x` by 6 weight rows).
const MAX_BLOCK: usize = 24;
/// The fewest rows of `x` in a register block of any variant (AVX2's and the portable 2 x 2).
const MIN_BLOCK_ROWS: usize = 2;

/// Walks the output in `BX` x `BW` register blocks (smaller ones at the edges); `L` supplies
/// the vector operations.
///
/// Up to `BX` rows of `x`, each block runs over the whole inner dimension with its
/// accumulators in registers: one sweep over the weights. With more rows, re-reading all of
/// `x` for every group of weight rows would make the kernel wait on L2, so the walk is
/// k-blocked: per panel of [`PANEL_ROWS`] weight rows, the inner dimension goes [`CHUNK`]
/// positions at a time through every block of the panel, reading `x`'s packed chunk (see
/// [`DotsLhs`]), the accumulators parked in `acc` between chunks. Only a group's first block
/// reads its weights from memory; the group's last block prefetches the next group's into L2
/// as it goes, so that the memory stream keeps moving while the blocks in between compute
/// (`cpu_matmul -- cold`: 5-10% at 8-12 rows). Either way each accumulator sums its lanes in
/// the same order, so a row's result is the same bits whatever the batch.
#[inline(always)]
unsafe fn dots_blocked<L: Lanes, W: WeightElem, const BX: usize, const BW: usize>(
    a: &Args<'_, W>,
    out: &mut [f32],
    acc: &mut Vec<Line>,
) {
    const {
        assert!(
            std::mem::size_of::<L::V>() == std::mem::size_of::<Line>() && BX * BW <= MAX_BLOCK && BX >= MIN_BLOCK_ROWS
        )
    };
    let (k, m) = (a.lhs.k, a.lhs.m);
    let full = k / LANES * LANES;
    let wp = a.w.as_ptr();
    let packed = a.lhs.chunk(0);
    if m <= BX || packed.is_none() {
        let mut j0 = 0;
        while j0 < a.rows {
            let rw = group_rows(a.rows - j0, BW);
            let mut i = 0;
            while i < m {
                let rx = BX.min(m - i);
                let mut regs = [Line::default(); MAX_BLOCK];
                let ops = Operands {
                    x: a.lhs.x.as_ptr().add(i * k),
                    ldx: k,
                    w: wp.add(j0 * k),
                    ldw: k,
                    vectors: full / LANES,
                    next: None,
                };
                span::<L, W>(&ops, rx, rw, regs.as_mut_ptr() as *mut L::V, rw);
                finish(a, i, rx, j0, rw, &regs, rw, out);
                i += rx;
            }
            j0 += rw;
        }
        return;
    }
    acc.clear();
    acc.resize(m * PANEL_ROWS.min(a.rows), Line::default());
    let mut p0 = 0;
    while p0 < a.rows {
        let panel = PANEL_ROWS.min(a.rows - p0);
        acc.fill(Line::default());
        let mut c0 = 0;
        while c0 < full {
            let len = CHUNK.min(full - c0);
            let x = a.lhs.chunk(c0).expect("packed above");
            let mut j = 0;
            while j < panel {
                let rw = group_rows(panel - j, BW);
                // The weight group after this one: the panel's next, else the next chunk's
                // first, else the next panel's (none past the tile).
                let next = if j + rw < panel {
                    Some(wp.add((p0 + j + rw) * k + c0))
                } else if c0 + len < full {
                    Some(wp.add(p0 * k + c0 + len))
                } else if p0 + panel < a.rows {
                    Some(wp.add((p0 + panel) * k))
                } else {
                    None
                };
                let mut i = 0;
                while i < m {
                    let rx = BX.min(m - i);
                    let ops = Operands {
                        x: x.add(i * len),
                        ldx: len,
                        w: wp.add((p0 + j) * k + c0),
                        ldw: k,
                        vectors: len / LANES,
                        // The group's last block, which reads its weights from L1, fetches
                        // the next group's into L2 meanwhile, so that the memory stream
                        // does not wait for the compute.
                        next: if i + rx == m { next } else { None },
                    };
                    span::<L, W>(&ops, rx, rw, acc.as_mut_ptr().add(i * panel + j) as *mut L::V, panel);
                    i += rx;
                }
                j += rw;
            }
            c0 += len;
        }
        finish(a, 0, m, p0, panel, acc, panel, out);
        p0 += panel;
    }
}

/// Weight rows of the next group when `left` remain: `bw`, else the largest of 4, 2, 1 that fits.
#[inline(always)]
fn group_rows(left: usize, bw: usize) -> usize {
    match left {
        l if l >= bw => bw,
        l if l >= 4 => 4,
        l if l >= 2 => 2,
        _ => 1,
    }
}

/// One block's operands: rows of `x` from `x` (`ldx` apart) and weight rows from `w` (`ldw`
/// apart), `vectors` whole vectors of each.
struct Operands<W> {
    x: *const f32,
    ldx: usize,
    w: *const W,
    ldw: usize,
    vectors: usize,
    /// Weight rows (`ldw` apart, as many as the block's) to prefetch into L2 meanwhile, a
    /// vector of each per step.
    next: Option<*const W>,
}

/// Adds `rx` rows of `x` times `rw` weight rows into `acc[i * ld + j]`.
#[inline(always)]
unsafe fn span<L: Lanes, W: WeightElem>(ops: &Operands<W>, rx: usize, rw: usize, acc: *mut L::V, ld: usize) {
    macro_rules! blocks {
        ($(($x:literal, $w:literal)),*) => {
            match (rx, rw) {
                $(($x, $w) => block::<L, W, $x, $w>(ops, acc, ld),)*
                _ => unreachable!("dots: no {rx} x {rw} block"),
            }
        };
    }
    blocks!(
        (4, 6),
        (4, 4),
        (4, 2),
        (4, 1),
        (3, 6),
        (3, 4),
        (3, 2),
        (3, 1),
        (2, 6),
        (2, 4),
        (2, 2),
        (2, 1),
        (1, 6),
        (1, 4),
        (1, 2),
        (1, 1)
    )
}

/// One `RX` x `RW` register block of [`span`].
#[inline(always)]
unsafe fn block<L: Lanes, W: WeightElem, const RX: usize, const RW: usize>(
    ops: &Operands<W>,
    acc: *mut L::V,
    ld: usize,
) {
    // SAFETY (every pointer read below): the caller's operands hold `RX` / `RW` rows of
    // `vectors` whole vectors, and its accumulators `RX` rows of `ld`.
    let mut regs: [[L::V; RW]; RX] = std::array::from_fn(|i| std::array::from_fn(|j| *acc.add(i * ld + j)));
    let xr: [*const f32; RX] = std::array::from_fn(|i| ops.x.add(i * ops.ldx));
    let wr: [*const W; RW] = std::array::from_fn(|j| ops.w.add(j * ops.ldw));
    if let Some(next) = ops.next {
        for v in 0..ops.vectors {
            let c = v * LANES;
            for j in 0..RW {
                prefetch_l2(next.wrapping_add(j * ops.ldw + c));
            }
            step::<L, W, RX, RW>(&mut regs, &xr, &wr, c);
        }
    } else {
        for v in 0..ops.vectors {
            step::<L, W, RX, RW>(&mut regs, &xr, &wr, v * LANES);
        }
    }
    for (i, row) in regs.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            *acc.add(i * ld + j) = v;
        }
    }
}

/// One vector position of a block: `regs[i][j] += x_i[c..] * w_j[c..]`.
#[inline(always)]
unsafe fn step<L: Lanes, W: WeightElem, const RX: usize, const RW: usize>(
    regs: &mut [[L::V; RW]; RX],
    xr: &[*const f32; RX],
    wr: &[*const W; RW],
    c: usize,
) {
    {
        let wv: [L::V; RW] = std::array::from_fn(|j| L::load_w(wr[j].add(c)));
        for (i, row) in regs.iter_mut().enumerate() {
            let xv = L::load_x(xr[i].add(c));
            for (j, acc) in row.iter_mut().enumerate() {
                *acc = L::fma(xv, wv[j], *acc);
            }
        }
    }
}

/// Asks for the cache line at `p` in L2 (a hint: it reads nothing and cannot fault).
#[inline(always)]
fn prefetch_l2<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads no memory and cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Writes the dots of `x` rows `i0..i0 + rx` and weight rows `j0..j0 + rw` from their
/// accumulators `acc[i * ld + j]`, plus the inner positions past the last whole vector.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn finish<W: WeightElem>(
    a: &Args<'_, W>,
    i0: usize,
    rx: usize,
    j0: usize,
    rw: usize,
    acc: &[Line],
    ld: usize,
    out: &mut [f32],
) {
    let k = a.lhs.k;
    let full = k / LANES * LANES;
    for i in 0..rx {
        let xr = &a.lhs.x[(i0 + i) * k + full..(i0 + i + 1) * k];
        for j in 0..rw {
            let wr = &a.w[(j0 + j) * k + full..(j0 + j + 1) * k];
            out[(i0 + i) * a.si + (j0 + j) * a.sj] = fold(acc[i * ld + j].0) + tail(xr, wr);
        }
    }
}

/// The portable variant: plain arrays of [`LANES`] floats.
struct Scalar;

impl Lanes for Scalar {
    type V = [f32; LANES];
    #[inline(always)]
    unsafe fn load_x(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const [f32; LANES])
    }
    #[inline(always)]
    unsafe fn load_w<W: WeightElem>(p: *const W) -> Self::V {
        std::array::from_fn(|l| (*p.add(l)).widen())
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, acc: Self::V) -> Self::V {
        std::array::from_fn(|l| acc[l] + a[l] * b[l])
    }
}

fn dots_portable<W: WeightElem>(a: &Args<'_, W>, out: &mut [f32], acc: &mut Vec<Line>) {
    // SAFETY: `dots_with` checked every extent the blocks read and write.
    unsafe { dots_blocked::<Scalar, W, 2, 2>(a, out, acc) }
}

/// The lanes summed pairwise, halves first: the one order every variant uses.
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

#[inline(always)]
fn tail<W: WeightElem>(xr: &[f32], wr: &[W]) -> f32 {
    xr.iter().zip(wr).map(|(&x, &w)| x * w.widen()).sum()
}

/// The x86-64 variants: one AVX-512 register, or two AVX2 registers, per accumulator.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{dots_blocked, Args, Lanes, Line, WeightElem};

    struct Avx512;

    impl Lanes for Avx512 {
        type V = __m512;
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_w<W: WeightElem>(p: *const W) -> __m512 {
            W::load16(p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, acc)
        }
    }

    struct Avx2;

    impl Lanes for Avx2 {
        type V = [__m256; 2];
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> [__m256; 2] {
            [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
        }
        #[inline(always)]
        unsafe fn load_w<W: WeightElem>(p: *const W) -> [__m256; 2] {
            [W::load8(p), W::load8(p.add(8))]
        }
        #[inline(always)]
        unsafe fn fma(a: [__m256; 2], b: [__m256; 2], acc: [__m256; 2]) -> [__m256; 2] {
            [_mm256_fmadd_ps(a[0], b[0], acc[0]), _mm256_fmadd_ps(a[1], b[1], acc[1])]
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dots_avx512<W: WeightElem>(a: &Args<'_, W>, out: &mut [f32], acc: &mut Vec<Line>) {
        dots_blocked::<Avx512, W, 4, 6>(a, out, acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_avx2<W: WeightElem>(a: &Args<'_, W>, out: &mut [f32], acc: &mut Vec<Line>) {
        dots_blocked::<Avx2, W, 2, 2>(a, out, acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values::naive_nt as naive;

    #[test]
    fn f32_and_bf16_rows_match_a_naive_product() {
        let val = |n: usize, salt: usize| (((n * 7919 + salt * 104_729) % 2003) as f32 / 2003.0 - 0.5) * 2.0;
        for (m, k, rows) in [
            (1usize, 16usize, 1usize),
            (3, 37, 5),
            (4, 64, 7),
            (9, 130, 3),
            (5, 15, 2),
            // k-blocked: several chunks with a ragged end, a panel and a half of weight rows.
            (9, 600, 41),
            (32, 272, 38),
            (3, 530, 13),
        ] {
            let x: Vec<f32> = (0..m * k).map(|n| val(n, 1)).collect();
            let w: Vec<f32> = (0..rows * k).map(|n| val(n, 2)).collect();
            let ldo = rows + 3;
            let mut out = vec![f32::NAN; m * ldo];
            dots(&x, m, k, &w, rows, &mut out, ldo, 1);
            let want = naive(&x, m, k, &w, rows);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let mut out_b = vec![0f32; m * ldo];
            dots(&x, m, k, &wb, rows, &mut out_b, ldo, 1);
            let want_b = naive(&x, m, k, &wbf, rows);
            for i in 0..m {
                for j in 0..rows {
                    let (g, e) = (out[i * ldo + j], want[i * rows + j]);
                    assert!((g - e).abs() <= 1e-5 * k as f32, "{m}x{k}x{rows} [{i},{j}]: {g} vs {e}");
                    let (g, e) = (out_b[i * ldo + j], want_b[i * rows + j]);
                    assert!(
                        (g - e).abs() <= 1e-5 * k as f32,
                        "bf16 {m}x{k}x{rows} [{i},{j}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// A row's dots are the same bits whatever other rows share its batch.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        // k = 100: whole rows per block; k = 700: chunks once the batch passes a block.
        for (k, rows, m) in [(100usize, 6usize, 7usize), (700, 40, 11)] {
            let x: Vec<f32> = (0..m * k).map(|n| ((n * 31 % 97) as f32 - 48.0) / 17.0).collect();
            let w: Vec<f32> = (0..rows * k).map(|n| ((n * 53 % 89) as f32 - 44.0) / 13.0).collect();
            let mut all = vec![0f32; m * rows];
            dots(&x, m, k, &w, rows, &mut all, rows, 1);
            for i in 0..m {
                let mut one = vec![0f32; rows];
                dots(&x[i * k..(i + 1) * k], 1, k, &w, rows, &mut one, rows, 1);
                assert_eq!(one, all[i * rows..(i + 1) * rows], "k {k}, row {i}");
            }
        }
    }
}
