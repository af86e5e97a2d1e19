//! bf16 products on Intel AMX tiles (`tdpbf16ps`), for CPUs that have them (Sapphire Rapids
//! and later; checked at run time, Linux only, `MOE_CPU_AMX=0` turns it off).
//!
//! The weight is the left operand, read in place: a tile is 16 weight rows by 32 bf16
//! columns, loaded with the weight's own row stride. The right operand is `x` packed once per
//! product ([`PackedX`]): bf16-rounded (exact for a bf16 model, whose activations are bf16
//! already), in AMX's pair-interleaved layout, zero-padded to whole tiles. An accumulator tile
//! is 16 weight rows by 16 rows of `x`, in f32; a micro-kernel keeps 2 x 2 (or 2 x 1 for a
//! last odd tile of `x`, which is every tile of a decode-sized batch) of them in the 8 tile
//! registers across the whole inner dimension.
//!
//! Each output element is the same sequence of `tdpbf16ps` steps whatever the other rows of
//! `x` are, so a row's result does not depend on its batch.
//!
//! Requirements: the inner dimension a multiple of [`K_BLOCK`] (other products take the
//! other paths); weight rows past a multiple of 32 are copied into a zero-padded scratch.

use half::bf16;
use rayon::prelude::*;

/// bf16 columns per tile (64 bytes, one tile row).
pub const K_BLOCK: usize = 32;
/// Rows per tile, of the weight or of `x`.
const TILE: usize = 16;
/// u32 pairs per packed tile of `x`.
const TILE_PAIRS: usize = TILE * TILE;
/// Tiles of `x` (16 rows each) per block of the loop over weight rows.
const X_CHUNK_TILES: usize = 8;

/// Whether this CPU and OS run AMX bf16 tiles (asked once; the first call also asks Linux
/// for the tile state, `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var("MOE_CPU_AMX").is_ok_and(|v| v == "0");
        !off && imp::detect()
    })
}

/// Whether a product of inner dimension `k` over bf16 weights goes through AMX.
pub fn applies(k: usize) -> bool {
    k > 0 && k.is_multiple_of(K_BLOCK) && available()
}

/// `x` `[m, k]` in AMX's right-operand layout: per tile of 16 rows of `x` and block of 32
/// columns, 16 lines of 16 u32, line `p`'s entry `c` holding `x[c, 2p]` (low half) and
/// `x[c, 2p + 1]` (high half) as bf16.
pub struct PackedX {
    data: Vec<u32>,
    m: usize,
    k_blocks: usize,
}

impl PackedX {
    /// Packs `x` `[m, k]` (`k` a multiple of [`K_BLOCK`]), rounding to bf16 (nearest even).
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(
            k > 0 && k.is_multiple_of(K_BLOCK),
            "PackedX: k = {k} is not a positive multiple of 32"
        );
        assert!(x.len() >= m * k, "PackedX: x holds {} values, not {m} x {k}", x.len());
        let k_blocks = k / K_BLOCK;
        let x_tiles = m.div_ceil(TILE);
        let mut data = vec![0u32; x_tiles * k_blocks * TILE_PAIRS];
        // Tiles of `x` pack in parallel (a prefill's `x` is megabytes): each owns its chunk.
        data.par_chunks_mut(k_blocks * TILE_PAIRS).enumerate().for_each_init(
            || vec![bf16::ZERO; k],
            |row, (tile, chunk)| {
                for c in 0..TILE.min(m - tile * TILE) {
                    let i = tile * TILE + c;
                    for (dst, &v) in row.iter_mut().zip(&x[i * k..(i + 1) * k]) {
                        *dst = bf16::from_f32(v);
                    }
                    for (kb, block) in row.chunks_exact(K_BLOCK).enumerate() {
                        let base = kb * TILE_PAIRS + c;
                        for (p, pair) in block.chunks_exact(2).enumerate() {
                            chunk[base + p * TILE] = pair[0].to_bits() as u32 | (pair[1].to_bits() as u32) << 16;
                        }
                    }
                }
            },
        );
        PackedX { data, m, k_blocks }
    }

    /// Rows of `x`.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// The first packed tile of `x`-tile `t` (its `k_blocks` tiles follow one another).
    fn tile(&self, t: usize) -> *const u32 {
        self.data[t * self.k_blocks * TILE_PAIRS..].as_ptr()
    }
}

/// `out[i * si + j * sj] = x_i · w_j` for `i < x.rows()`, `j < rows`: `w` holds `rows`
/// bf16 rows of `k` (`k` as packed). `scratch` holds zero-padded copies of a last partial
/// block of weight rows.
#[allow(clippy::too_many_arguments)]
pub fn tile_product(
    x: &PackedX,
    k: usize,
    w: &[bf16],
    rows: usize,
    out: &mut [f32],
    si: usize,
    sj: usize,
    scratch: &mut Vec<bf16>,
) {
    if x.m == 0 || rows == 0 {
        return;
    }
    let last = (x.m - 1)
        .checked_mul(si)
        .zip((rows - 1).checked_mul(sj))
        .and_then(|(a, b)| a.checked_add(b));
    assert!(last.is_some_and(|last| last < out.len()), "amx: output too short");
    // SAFETY: every index written, i * si + j * sj for i < m, j < rows, is inside `out`
    // (checked just above), which this call borrows exclusively.
    unsafe { tile_product_into(x, k, w, rows, out.as_mut_ptr(), si, sj, scratch) }
}

/// [`tile_product`] writing through a raw pointer, for parallel jobs that fill disjoint
/// columns of one output.
///
/// # Safety
/// `out.add(i * si + j * sj)` must be valid for writes, and written by nobody else during
/// the call, for every `i < x.rows()` and `j < rows`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_product_into(
    x: &PackedX,
    k: usize,
    w: &[bf16],
    rows: usize,
    out: *mut f32,
    si: usize,
    sj: usize,
    scratch: &mut Vec<bf16>,
) {
    let m = x.m;
    assert!(
        k == x.k_blocks * K_BLOCK && w.len() >= rows * k,
        "amx: operands disagree"
    );
    if m == 0 || rows == 0 {
        return;
    }
    assert!(available(), "amx: tile_product without AMX");
    let x_tiles = m.div_ceil(TILE);
    let mut acc = [0f32; 4 * TILE_PAIRS];
    // Blocks of x-tiles outer, 32-row weight blocks inner: a block of packed `x` (128 rows)
    // and the caller's weight rows both stay in L2 while every pair of them meets.
    for chunk in (0..x_tiles).step_by(X_CHUNK_TILES) {
        let chunk_end = (chunk + X_CHUNK_TILES).min(x_tiles);
        let mut j0 = 0;
        while j0 < rows {
            let block = (2 * TILE).min(rows - j0);
            let a: &[bf16] = if block == 2 * TILE {
                &w[j0 * k..(j0 + block) * k]
            } else {
                scratch.clear();
                scratch.extend_from_slice(&w[j0 * k..(j0 + block) * k]);
                scratch.resize(2 * TILE * k, bf16::ZERO);
                scratch
            };
            let mut t = chunk;
            while t < chunk_end {
                let pair = t + 1 < chunk_end;
                // SAFETY: AMX is available (asserted); `a` holds 32 rows of k bf16 and the
                // packed tiles t (and t + 1 when `pair`) hold k_blocks tiles each, which is
                // what the kernels read; `acc` has room for four 16 x 16 f32 tiles.
                unsafe {
                    if pair {
                        imp::block_2x2(a.as_ptr(), k, x.tile(t), x.tile(t + 1), x.k_blocks, &mut acc);
                    } else {
                        imp::block_2x1(a.as_ptr(), k, x.tile(t), x.k_blocks, &mut acc);
                    }
                }
                // acc slot (x-tile d, row half h) is [16 weight rows][16 rows of x].
                for d in 0..1 + pair as usize {
                    let i0 = (t + d) * TILE;
                    let xs = TILE.min(m - i0);
                    for h in 0..2 {
                        let tile = &acc[(2 * d + h) * TILE_PAIRS..][..TILE_PAIRS];
                        let nr = TILE.min(block.saturating_sub(h * TILE));
                        // SAFETY (both orders): i0 + c < m and j0 + h * 16 + r < rows, the
                        // caller's promise; the inner loop walks the smaller output stride.
                        let at = |c: usize, r: usize| unsafe { out.add((i0 + c) * si + (j0 + h * TILE + r) * sj) };
                        if sj <= si {
                            for c in 0..xs {
                                for r in 0..nr {
                                    unsafe { *at(c, r) = tile[r * TILE + c] };
                                }
                            }
                        } else {
                            for r in 0..nr {
                                for c in 0..xs {
                                    unsafe { *at(c, r) = tile[r * TILE + c] };
                                }
                            }
                        }
                    }
                }
                t += 1 + pair as usize;
            }
            j0 += block;
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;

    use super::{TILE, TILE_PAIRS};

    /// arch_prctl's request for an extended state component, and AMX's tile data component.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    pub fn detect() -> bool {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): without it the first tile
        // instruction faults; kernels without AMX support refuse it.
        // SAFETY: arch_prctl with integer arguments only.
        let ret = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        ret == 0
    }

    /// Loads the tile configuration: palette 1, all eight tiles 16 rows of 64 bytes. Done at
    /// the start of every block (a few dozen cycles against the block's thousands), so no
    /// other tile user on the thread can leave a configuration these kernels do not expect.
    fn configure() {
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = TILE as u8;
        }
        // SAFETY: AMX was detected and permitted (callers hold `available()`); the
        // configuration is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
    }

    /// Stores tile `tmm{t}` into slot `slot` of `acc` (16 x 16 f32 each), for each pair.
    macro_rules! store {
        ($acc:expr, $(($t:literal, $slot:literal)),+) => {
            $(asm!(concat!("tilestored [{p} + {s}*1], tmm", $t),
                   p = in(reg) $acc.as_mut_ptr().add($slot * TILE_PAIRS), s = in(reg) 64usize,
                   options(nostack));)+
        };
    }

    /// Weight rows `a[0..32]` (row stride `k` bf16) against two packed tiles of `x`: tmm0/1
    /// (rows 0-15, x-tiles b0/b1), tmm2/3 (rows 16-31).
    ///
    /// # Safety
    /// AMX available; `a` readable for 32 rows of `k`, `b0`/`b1` for `k_blocks` tiles each,
    /// `acc` for four tiles.
    pub unsafe fn block_2x2(
        a: *const half::bf16,
        k: usize,
        b0: *const u32,
        b1: *const u32,
        k_blocks: usize,
        acc: &mut [f32; 4 * TILE_PAIRS],
    ) {
        configure();
        let stride = k * 2;
        let a1 = a.add(TILE * k);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        );
        for kb in 0..k_blocks {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(kb * 32),
                a1 = in(reg) a1.add(kb * 32),
                b0 = in(reg) b0.add(kb * TILE_PAIRS),
                b1 = in(reg) b1.add(kb * TILE_PAIRS),
                s = in(reg) stride,
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        // acc slots: x-tile 0 (rows 0-15, rows 16-31), then x-tile 1 (the same).
        store!(acc, (0, 0), (2, 1), (1, 2), (3, 3));
    }

    /// Weight rows `a[0..32]` against one packed tile of `x`: tmm0 (rows 0-15), tmm1
    /// (rows 16-31).
    ///
    /// # Safety
    /// As [`block_2x2`], with one tile of `x`.
    pub unsafe fn block_2x1(
        a: *const half::bf16,
        k: usize,
        b0: *const u32,
        k_blocks: usize,
        acc: &mut [f32; 4 * TILE_PAIRS],
    ) {
        configure();
        let stride = k * 2;
        let a1 = a.add(TILE * k);
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack));
        for kb in 0..k_blocks {
            asm!(
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm1, tmm5, tmm6",
                a0 = in(reg) a.add(kb * 32),
                a1 = in(reg) a1.add(kb * 32),
                b0 = in(reg) b0.add(kb * TILE_PAIRS),
                s = in(reg) stride,
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        store!(acc, (0, 0), (1, 1));
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::TILE_PAIRS;

    pub fn detect() -> bool {
        false
    }

    pub unsafe fn block_2x2(
        _: *const half::bf16,
        _: usize,
        _: *const u32,
        _: *const u32,
        _: usize,
        _: &mut [f32; 4 * TILE_PAIRS],
    ) {
        unreachable!("AMX is never available off x86_64 Linux")
    }

    pub unsafe fn block_2x1(_: *const half::bf16, _: usize, _: *const u32, _: usize, _: &mut [f32; 4 * TILE_PAIRS]) {
        unreachable!("AMX is never available off x86_64 Linux")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 product of the same bf16 values, for batches that are and are not tile
    /// multiples and weight blocks with a partial last block; and batch invariance: a row's
    /// result has the same bits alone and in a batch.
    #[test]
    fn amx_tiles_match_a_reference_and_do_not_depend_on_the_batch() {
        if !available() {
            eprintln!("skipped: this CPU (or OS) has no AMX bf16 tiles");
            return;
        }
        let mut s = 7u64;
        let mut rand = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        };
        for (m, k, rows) in [
            (1, 32, 32),
            (3, 64, 40),
            (16, 96, 32),
            (17, 128, 70),
            (40, 64, 33),
            (130, 64, 40),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rand().to_f32()).collect();
            let w: Vec<bf16> = (0..rows * k).map(|_| rand()).collect();
            let packed = PackedX::new(&x, m, k);
            let mut out = vec![f32::NAN; m * rows];
            tile_product(&packed, k, &w, rows, &mut out, rows, 1, &mut Vec::new());
            for i in 0..m {
                for j in 0..rows {
                    let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c].to_f64()).sum();
                    let got = out[i * rows + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * k as f64,
                        "{m}x{k}x{rows} [{i},{j}]: {got} vs {want}"
                    );
                }
            }
            let last = &x[(m - 1) * k..];
            let mut alone = vec![0f32; rows];
            tile_product(
                &PackedX::new(last, 1, k),
                k,
                &w,
                rows,
                &mut alone,
                rows,
                1,
                &mut Vec::new(),
            );
            assert_eq!(alone, out[(m - 1) * rows..], "{m}x{k}x{rows}: batch-dependent bits");
        }
    }
}
