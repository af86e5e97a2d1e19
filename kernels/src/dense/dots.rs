//! Skinny products for decode-sized batches: `out[i, j] = x_i · w_j` for a few f32 rows `x_i`
//! against weight rows `w_j` stored as f32 or bf16 (widened in registers, never in memory).
//!
//! Register-blocked: a block of `BX` rows of `x` by `BW` weight rows keeps one
//! [`LANES`]-wide accumulator per dot product in registers (4 x 4 with AVX-512's 32
//! registers, 2 x 2 with AVX2's 16), so each weight vector loaded (from memory, once per call)
//! feeds `BX` FMAs and each `x` vector `BW`. AVX-512
//! and AVX2+FMA variants are picked at run time; other targets run the same loops in scalar
//! code. Every dot product, whatever block computed it, sums its lanes in one fixed order
//! ([`fold`]), so a row's result does not depend on the other rows of the batch.

use half::bf16;

/// Accumulator lanes of one dot product (one AVX-512 register, two AVX2 registers).
pub const LANES: usize = 16;

/// `out[i * si + j * sj] = x[i * k..][..k] · w[j * k..][..k]` for `i < m`, `j < rows`.
#[allow(clippy::too_many_arguments)]
pub fn dots<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], rows: usize, out: &mut [f32], si: usize, sj: usize) {
    assert!(
        x.len() >= m * k && w.len() >= rows * k,
        "dots: operands shorter than m x k / rows x k"
    );
    if m == 0 || rows == 0 {
        return;
    }
    assert!(
        out.len() > (m - 1) * si + (rows - 1) * sj,
        "dots: output shorter than m x rows"
    );
    let args = Args {
        x,
        m,
        k,
        w,
        rows,
        si,
        sj,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected on this CPU just above; `args` was checked.
            return unsafe { simd::dots_avx512(&args, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { simd::dots_avx2(&args, out) };
        }
    }
    dots_portable(&args, out)
}

/// The operands of one [`dots`] call, checked.
struct Args<'a, W> {
    x: &'a [f32],
    m: usize,
    k: usize,
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
    unsafe fn zero() -> Self::V;
    unsafe fn load_x(p: *const f32) -> Self::V;
    unsafe fn load_w<W: WeightElem>(p: *const W) -> Self::V;
    unsafe fn fma(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
    unsafe fn lanes(v: Self::V) -> [f32; LANES];
}

/// Walks the output in `BX` x `BW` register blocks (single rows at the edges); `L` supplies
/// the vector operations.
#[inline(always)]
unsafe fn dots_blocked<L: Lanes, W: WeightElem, const BX: usize, const BW: usize>(a: &Args<'_, W>, out: &mut [f32]) {
    let mut j = 0;
    while j < a.rows {
        if j + BW <= a.rows {
            rows_of_x::<L, W, BX, BW>(a, j, out);
            j += BW;
        } else {
            rows_of_x::<L, W, BX, 1>(a, j, out);
            j += 1;
        }
    }
}

/// All rows of `x` against weight rows `j0..j0 + RW`, `BX` at a time.
#[inline(always)]
unsafe fn rows_of_x<L: Lanes, W: WeightElem, const BX: usize, const RW: usize>(
    a: &Args<'_, W>,
    j0: usize,
    out: &mut [f32],
) {
    let mut i = 0;
    while i < a.m {
        if i + BX <= a.m {
            block::<L, W, BX, RW>(a, i, j0, out);
            i += BX;
        } else {
            block::<L, W, 1, RW>(a, i, j0, out);
            i += 1;
        }
    }
}

/// Dots of `x` rows `i0..i0 + RX` with weight rows `j0..j0 + RW`, one accumulator each.
#[inline(always)]
unsafe fn block<L: Lanes, W: WeightElem, const RX: usize, const RW: usize>(
    a: &Args<'_, W>,
    i0: usize,
    j0: usize,
    out: &mut [f32],
) {
    let k = a.k;
    let full = k / LANES * LANES;
    let (xp, wp) = (a.x.as_ptr(), a.w.as_ptr());
    let mut acc = [[L::zero(); RW]; RX];
    let mut c = 0;
    while c < full {
        // SAFETY: c + LANES <= full <= k, inside rows checked by `dots`.
        let wv: [L::V; RW] = std::array::from_fn(|r| L::load_w(wp.add((j0 + r) * k + c)));
        for (i, row) in acc.iter_mut().enumerate() {
            let xv = L::load_x(xp.add((i0 + i) * k + c));
            for (r, acc) in row.iter_mut().enumerate() {
                *acc = L::fma(xv, wv[r], *acc);
            }
        }
        c += LANES;
    }
    for (i, row) in acc.iter().enumerate() {
        let xr = &a.x[(i0 + i) * k + full..(i0 + i + 1) * k];
        for (r, acc) in row.iter().enumerate() {
            let wr = &a.w[(j0 + r) * k + full..(j0 + r + 1) * k];
            out[(i0 + i) * a.si + (j0 + r) * a.sj] = fold(L::lanes(*acc)) + tail(xr, wr);
        }
    }
}

/// The portable variant: plain arrays of [`LANES`] floats.
struct Scalar;

impl Lanes for Scalar {
    type V = [f32; LANES];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; LANES]
    }
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
    #[inline(always)]
    unsafe fn lanes(v: Self::V) -> [f32; LANES] {
        v
    }
}

fn dots_portable<W: WeightElem>(a: &Args<'_, W>, out: &mut [f32]) {
    // SAFETY: `dots` checked every extent the blocks read and write.
    unsafe { dots_blocked::<Scalar, W, 2, 2>(a, out) }
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

    use super::{dots_blocked, Args, Lanes, WeightElem, LANES};

    struct Avx512;

    impl Lanes for Avx512 {
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
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
        #[inline(always)]
        unsafe fn lanes(v: __m512) -> [f32; LANES] {
            std::mem::transmute(v)
        }
    }

    struct Avx2;

    impl Lanes for Avx2 {
        type V = [__m256; 2];
        #[inline(always)]
        unsafe fn zero() -> [__m256; 2] {
            [_mm256_setzero_ps(); 2]
        }
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
        #[inline(always)]
        unsafe fn lanes(v: [__m256; 2]) -> [f32; LANES] {
            std::mem::transmute(v)
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dots_avx512<W: WeightElem>(a: &Args<'_, W>, out: &mut [f32]) {
        dots_blocked::<Avx512, W, 4, 4>(a, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_avx2<W: WeightElem>(a: &Args<'_, W>, out: &mut [f32]) {
        dots_blocked::<Avx2, W, 2, 2>(a, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * rows];
        for i in 0..m {
            for j in 0..rows {
                out[i * rows + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn f32_and_bf16_rows_match_a_naive_product() {
        let val = |n: usize, salt: usize| (((n * 7919 + salt * 104_729) % 2003) as f32 / 2003.0 - 0.5) * 2.0;
        for (m, k, rows) in [
            (1usize, 16usize, 1usize),
            (3, 37, 5),
            (4, 64, 7),
            (9, 130, 3),
            (5, 15, 2),
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
        let (k, rows) = (100usize, 6usize);
        let x: Vec<f32> = (0..7 * k).map(|n| ((n * 31 % 97) as f32 - 48.0) / 17.0).collect();
        let w: Vec<f32> = (0..rows * k).map(|n| ((n * 53 % 89) as f32 - 44.0) / 13.0).collect();
        let mut all = vec![0f32; 7 * rows];
        dots(&x, 7, k, &w, rows, &mut all, rows, 1);
        for i in 0..7 {
            let mut one = vec![0f32; rows];
            dots(&x[i * k..(i + 1) * k], 1, k, &w, rows, &mut one, rows, 1);
            assert_eq!(one, all[i * rows..(i + 1) * rows], "row {i}");
        }
    }
}
