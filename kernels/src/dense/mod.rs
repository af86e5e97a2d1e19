//! `y = x Wᵀ` for a Hugging Face `[out, in]` weight, with one CPU path for every weight
//! dtype: the weight's rows are split into tiles that run in parallel on rayon's pool, and each
//! tile is read once per call, whatever the batch.
//!
//! Decode-sized batches (up to [`skinny_rows`] rows of `x`) go through the register-blocked
//! dot kernels of [`dots`]: f32 and bf16 weight rows are read in place (bf16 widened in
//! registers), so a step is one sweep over the weights. Larger batches multiply each tile
//! with the `gemm` crate's f32 kernel, the tile widened to f32 first in a thread-local buffer
//! when the weight is not f32 (f32 weights on AVX-512 take [`outer`]'s outer-product kernel
//! from [`outer::OUTER_MIN_ROWS`] to [`outer::OUTER_MAX_ROWS`] rows over inner dimensions
//! up to [`outer::OUTER_MAX_DEPTH`] instead, the weight read in place); past [`WHOLE_GEMM_ROWS`] (prefill) one multithreaded gemm
//! call takes the whole f32 weight, or chunks of a widened one. f16 and quantized
//! ([`crate::quant`]) weights are decoded a tile or chunk at a time, never whole. Other
//! devices go through candle's matmul.
//!
//! On CPUs with AMX (Intel Sapphire Rapids and later), bf16 weights take [`amx`]'s tiles
//! at every batch size instead: `x` is packed once per product as bf16 (which a bf16
//! model's activations already are) and the weight is read in place.
//!
//! (candle 0.11's CPU matmul has no bf16 kernel: it widens the *whole storage* of both
//! operands to f32 first, which for a view into a stacked `[E, N, K]` expert tensor is every
//! expert's weights on every call.)
//!
//! [`Weight`] is a projection weight as models hold it: plain, or quantized.

pub mod amx;
pub mod dots;
pub mod grouped;
pub mod outer;
pub mod pages;

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::quant::QuantTensor;

/// Weight rows per tile of a skinny product: 32 rows of a 2048-wide f32 weight are 256 KiB.
pub const TILE_ROWS: usize = 32;
/// Weight rows per tile of a GEMM-sized product (fewer repacks of `x` per weight).
pub const GEMM_TILE_ROWS: usize = 128;
/// Past this many rows of `x`, one multithreaded gemm call takes the whole weight (measured
/// with `benches/cpu_matmul`: gemm's own threading loses to parallel tiles at 32 rows, wins
/// at 128).
pub const WHOLE_GEMM_ROWS: usize = 64;
/// Weight rows per parallel job of a GEMM-sized product on AMX tiles.
pub const AMX_TILE_ROWS: usize = 128;
/// Up to this many rows of `x`, products use the skinny dot kernels ([`skinny_rows`] says
/// where f32 weights stop sooner).
pub const SKINNY_ROWS: usize = 32;
/// The same for f32 weights where gemm runs its AVX-512 kernels: `cpu_matmul` on this
/// project's AVX-512 build machine had gemm tiles 1.3x faster at 32 rows, level at 24 and
/// slower at 16 (expert and lm_head shapes).
pub const SKINNY_ROWS_F32_AVX512: usize = 24;

/// Weight rows per tile of a product on [`outer`]'s kernel: a multiple of every register
/// block's weight rows (24, 12, 8, 6).
pub const OUTER_TILE_ROWS: usize = 48;

/// Weight rows per parallel job of a product of `m` rows of `x` `[m, k]` with `w` (not on AMX
/// tiles).
pub fn tile_rows(m: usize, k: usize, w: WeightRows<'_>) -> usize {
    if matches!(w, WeightRows::F32(_)) && outer::applies(m, k) {
        OUTER_TILE_ROWS
    } else if m <= skinny_rows(w) {
        TILE_ROWS
    } else {
        GEMM_TILE_ROWS
    }
}

/// Rows of `x` up to which products with `w` take the dot kernels.
pub fn skinny_rows(w: WeightRows<'_>) -> usize {
    match w {
        WeightRows::F32(_) if has_avx512() => SKINNY_ROWS_F32_AVX512,
        _ => SKINNY_ROWS,
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The rows of a CPU weight `[rows, k]` (a matrix, or a stack's matrices one after the
/// other), as the tiled products read them.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    /// Rows decoded on demand: `decode(r0, rows, dst)` writes rows `r0..r0 + rows` as f32.
    Decode(&'a (dyn Fn(usize, usize, &mut [f32]) + Sync)),
}

/// `x Wᵀ`: `x` `[m, k]` (any float dtype), `w` `[n, k]` -> `[m, n]` in `x`'s dtype.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !w.device().is_cpu() || !x.device().is_cpu() || x.rank() != 2 || w.rank() != 2 {
        return x.matmul(&w.t()?);
    }
    let (m, k) = x.dims2()?;
    let (n, k_w) = w.dims2()?;
    if k != k_w {
        candle_core::bail!(
            "matmul_nt: x {:?} and w {:?} disagree on the inner dimension",
            x.shape(),
            w.shape()
        );
    }
    let xs = host_f32(x)?;
    let out = with_weight_rows(w, |rows| product(&xs, m, k, n, rows))?;
    Tensor::from_vec(out, (m, n), x.device())?.to_dtype(x.dtype())
}

/// `x` as a host f32 vector, row-major.
pub fn host_f32(x: &Tensor) -> Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Runs `body` over the rows of the CPU weight `w` (f32, bf16 or f16, any rank; a
/// non-contiguous view is made contiguous first).
pub fn with_weight_rows<R>(w: &Tensor, body: impl FnOnce(WeightRows<'_>) -> R) -> Result<R> {
    let w = if w.layout().contiguous_offsets().is_some() {
        w.clone()
    } else {
        w.contiguous()?
    };
    let k = w.dims().last().copied().unwrap_or(1);
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("with_weight_rows: weight not contiguous after contiguous()");
    };
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => body(WeightRows::F32(&v[start..end])),
        Storage::Cpu(CpuStorage::BF16(v)) => body(WeightRows::Bf16(&v[start..end])),
        Storage::Cpu(CpuStorage::F16(v)) => {
            let v = &v[start..end];
            let decode = move |r0: usize, rows: usize, dst: &mut [f32]| {
                v[r0 * k..(r0 + rows) * k].convert_to_f32_slice(&mut dst[..rows * k])
            };
            body(WeightRows::Decode(&decode))
        }
        other => candle_core::bail!("with_weight_rows: a {:?} weight on the CPU", other.dtype()),
    })
}

/// `x` `[m, k]` f32 times the transpose of the `[n, k]` weight `w`, as `[m, n]`. A bf16
/// weight on AMX meets `x` rounded to bf16 (exact when `x` comes from a bf16 tensor, as a
/// bf16 model's activations do).
pub fn product(x: &[f32], m: usize, k: usize, n: usize, w: WeightRows<'_>) -> Vec<f32> {
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    if let WeightRows::Bf16(v) = w {
        if amx::applies(k) {
            return amx_product(x, m, k, n, v);
        }
    }
    if let WeightRows::F32(v) = w {
        if outer::applies(m, k) {
            return outer_product(x, m, k, n, v);
        }
    }
    if m > WHOLE_GEMM_ROWS {
        return gemm_product(x, m, k, n, w);
    }
    // Tiles write disjoint chunks of the transposed output `[n, m]`.
    let tile = tile_rows(m, k, w);
    let lhs = Lhs::new(x, m, k, w);
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(tile * m)
        .enumerate()
        .for_each_init(TileScratch::default, |scratch, (t, chunk)| {
            let rows = chunk.len() / m;
            tile_product(&lhs, w, t * tile, rows, chunk, 1, m, scratch);
        });
    if m == 1 {
        return out_t;
    }
    transpose(&out_t, m, n)
}

/// `[n, m]` -> `[m, n]`.
fn transpose(out_t: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// The product over a bf16 weight on AMX tiles: `x` packed once, then tiles of weight rows in
/// parallel, each writing its own columns of the output `[m, n]`.
fn amx_product(x: &[f32], m: usize, k: usize, n: usize, w: &[bf16]) -> Vec<f32> {
    let packed = amx::PackedX::new(x, m, k);
    let tile = if m <= SKINNY_ROWS { TILE_ROWS } else { AMX_TILE_ROWS };
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    (0..n.div_ceil(tile))
        .into_par_iter()
        .for_each_init(Vec::new, |scratch, t| {
            let (r0, rows) = (t * tile, tile.min(n - t * tile));
            // SAFETY: job t writes out[i * n + r0 + j] for i < m, j < rows: inside `out`
            // (m * n long), and columns r0..r0 + rows belong to this job alone.
            unsafe { amx::tile_product_into(&packed, k, &w[r0 * k..(r0 + rows) * k], rows, dst.at(r0), n, 1, scratch) };
        });
    out
}

/// The product over an f32 weight on [`outer`]'s kernel: `x` packed once, then tiles of
/// weight rows in parallel, each writing its own columns of the output `[m, n]`.
fn outer_product(x: &[f32], m: usize, k: usize, n: usize, w: &[f32]) -> Vec<f32> {
    let packed = outer::PackedX::new(x, m, k);
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    (0..n.div_ceil(OUTER_TILE_ROWS)).into_par_iter().for_each(|t| {
        let (r0, rows) = (t * OUTER_TILE_ROWS, OUTER_TILE_ROWS.min(n - t * OUTER_TILE_ROWS));
        // SAFETY: job t writes out[i * n + r0 + j] for i < m, j < rows: inside `out`
        // (m * n long), and columns r0..r0 + rows belong to this job alone.
        unsafe { outer::tile_product_into(&packed, &w[r0 * k..(r0 + rows) * k], rows, dst.at(r0), n, 1) };
    });
    out
}

/// The output of parallel jobs that write disjoint elements of it.
struct SharedOut(*mut f32);
// SAFETY: the jobs sharing it write disjoint elements (see `amx_product`).
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Weight elements widened per GEMM chunk of a non-f32 weight (16 MiB of f32).
const WIDEN_CHUNK: usize = 4 << 20;

/// GEMM-sized products: one multithreaded gemm over the whole f32 weight (gemm blocks and
/// packs it for its caches), or over chunks of a non-f32 weight widened in parallel first;
/// widening is `n * k` work against the product's `m * n * k`.
fn gemm_product(x: &[f32], m: usize, k: usize, n: usize, w: WeightRows<'_>) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    if let WeightRows::F32(v) = w {
        gemm_f32(x, m, k, &v[..n * k], n, &mut out, n, 1, threads);
        return out;
    }
    let chunk = (WIDEN_CHUNK / k.max(1)).max(TILE_ROWS).min(n);
    let mut buf = vec![0f32; chunk * k];
    let mut r0 = 0;
    while r0 < n {
        let rows = chunk.min(n - r0);
        buf[..rows * k]
            .par_chunks_mut(TILE_ROWS * k)
            .enumerate()
            .for_each(|(t, dst)| widen(w, r0 + t * TILE_ROWS, dst.len() / k, k, dst));
        gemm_f32(x, m, k, &buf[..rows * k], rows, &mut out[r0..], n, 1, threads);
        r0 += rows;
    }
    out
}

/// Weight rows `r0..r0 + rows` as f32 into `dst`.
fn widen(w: WeightRows<'_>, r0: usize, rows: usize, k: usize, dst: &mut [f32]) {
    match w {
        WeightRows::F32(v) => dst.copy_from_slice(&v[r0 * k..(r0 + rows) * k]),
        WeightRows::Bf16(v) => v[r0 * k..(r0 + rows) * k].convert_to_f32_slice(dst),
        WeightRows::Decode(decode) => decode(r0, rows, dst),
    }
}

/// `out[i * si + j * sj] = x_i · tile_j` for the f32 rows of `tile` (`rows * k`).
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    x: &[f32],
    m: usize,
    k: usize,
    tile: &[f32],
    rows: usize,
    out: &mut [f32],
    si: usize,
    sj: usize,
    parallelism: gemm::Parallelism,
) {
    // The right-hand side is the tile read as a k x rows matrix: column j = weight row j.
    gemm_strided(
        (m, rows, k),
        Strided::new(out, si, sj),
        Strided::new(x, k, 1),
        Strided::new(tile, 1, k),
        parallelism,
    );
}

/// A matrix in a slice: element `(i, j)` at `data[i * rs + j * cs]`.
pub struct Strided<S> {
    pub data: S,
    pub rs: usize,
    pub cs: usize,
}

impl<S> Strided<S> {
    pub fn new(data: S, rs: usize, cs: usize) -> Self {
        Strided { data, rs, cs }
    }
}

/// Whether a `rows x cols` matrix with these strides fits in `len` elements.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst = lhs · rhs` with the `gemm` crate's f32 kernel, for `(m, n, k)`: `dst` `m x n`, `lhs`
/// `m x k`, `rhs` `k x n`, each with its own strides (so a head's columns of a wider
/// activation, or a transposed operand, go in without a copy). Panics if a matrix does not
/// fit its slice.
pub fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: Strided<&mut [f32]>,
    lhs: Strided<&[f32]>,
    rhs: Strided<&[f32]>,
    parallelism: gemm::Parallelism,
) {
    assert!(
        fits(dst.data.len(), m, n, dst.rs, dst.cs)
            && fits(lhs.data.len(), m, k, lhs.rs, lhs.cs)
            && fits(rhs.data.len(), k, n, rhs.rs, rhs.cs),
        "gemm_strided: an operand does not fit its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                dst.data[i * dst.rs + j * dst.cs] = 0.0;
            }
        }
        return;
    }
    // SAFETY: each matrix was checked above to lie inside its slice with the strides given,
    // and `dst` is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The left operand of [`tile_product`]: `x` `[m, k]` f32, with its AMX packing when the
/// weight it meets takes that path (packed once, shared by every tile).
pub struct Lhs<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    packed: Option<amx::PackedX>,
    /// For the outer-product kernel (f32 weights, mid-sized batches, AVX-512).
    outer: Option<outer::PackedX>,
    /// For the dot kernels (decode-sized batches on other paths).
    dots: Option<dots::DotsLhs<'a>>,
}

impl<'a> Lhs<'a> {
    /// `x` `[m, k]` for products with `w`.
    pub fn new(x: &'a [f32], m: usize, k: usize, w: WeightRows<'_>) -> Self {
        let amx = matches!(w, WeightRows::Bf16(_)) && amx::applies(k);
        let outer = matches!(w, WeightRows::F32(_)) && outer::applies(m, k);
        Lhs {
            x,
            m,
            k,
            packed: amx.then(|| amx::PackedX::new(x, m, k)),
            outer: outer.then(|| outer::PackedX::new(x, m, k)),
            dots: (!amx && !outer && m <= skinny_rows(w)).then(|| dots::DotsLhs::new(x, m, k)),
        }
    }
}

/// Reusable buffers of one worker of the tiled products.
#[derive(Default)]
pub struct TileScratch {
    /// Decoded or widened weight rows.
    rows: Vec<f32>,
    /// Zero-padded bf16 weight rows (AMX).
    padded: Vec<bf16>,
    /// The dot kernels' parked accumulators.
    acc: Vec<dots::Line>,
}

/// One tile: `out[i * si + j * sj] = x_i · w_{r0 + j}` for `i < m`, `j < rows`.
#[allow(clippy::too_many_arguments)]
pub fn tile_product(
    lhs: &Lhs<'_>,
    w: WeightRows<'_>,
    r0: usize,
    rows: usize,
    out: &mut [f32],
    si: usize,
    sj: usize,
    scratch: &mut TileScratch,
) {
    let (x, m, k) = (lhs.x, lhs.m, lhs.k);
    if let (Some(packed), WeightRows::Bf16(v)) = (&lhs.packed, w) {
        amx::tile_product(
            packed,
            k,
            &v[r0 * k..(r0 + rows) * k],
            rows,
            out,
            si,
            sj,
            &mut scratch.padded,
        );
        return;
    }
    if let (Some(packed), WeightRows::F32(v)) = (&lhs.outer, w) {
        outer::tile_product(packed, &v[r0 * k..(r0 + rows) * k], rows, out, si, sj);
        return;
    }
    let buf = &mut scratch.rows;
    if let Some(lhs) = &lhs.dots {
        let acc = &mut scratch.acc;
        match w {
            WeightRows::F32(v) => dots::dots_with(lhs, &v[r0 * k..(r0 + rows) * k], rows, out, si, sj, acc),
            WeightRows::Bf16(v) => dots::dots_with(lhs, &v[r0 * k..(r0 + rows) * k], rows, out, si, sj, acc),
            WeightRows::Decode(decode) => {
                buf.resize(rows * k, 0.0);
                decode(r0, rows, &mut buf[..rows * k]);
                dots::dots_with(lhs, &buf[..rows * k], rows, out, si, sj, acc)
            }
        }
        return;
    }
    let tile: &[f32] = match w {
        WeightRows::F32(v) => &v[r0 * k..(r0 + rows) * k],
        _ => {
            buf.resize(rows * k, 0.0);
            widen(w, r0, rows, k, &mut buf[..rows * k]);
            &buf[..rows * k]
        }
    };
    gemm_f32(x, m, k, tile, rows, out, si, sj, gemm::Parallelism::None);
}

/// A projection weight `[n, k]` (or a stack `[E, n, k]` of expert weights): a plain tensor in
/// the compute dtype, or one kept in its shipped quantized format.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quant(QuantTensor),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quant(q) => q.dims(),
        }
    }

    /// Matrix `e` of a stack.
    pub fn get(&self, e: usize) -> Result<Weight> {
        Ok(match self {
            Weight::Dense(t) => Weight::Dense(t.get(e)?),
            Weight::Quant(q) => Weight::Quant(q.get(e)?),
        })
    }

    /// The plain tensor, when this weight is one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        }
    }

    /// The weight as a plain tensor in `dtype` (a quantized one decoded exactly).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Quant(q) => q.dequantize(dtype),
        }
    }

    /// Bytes the weight holds in memory.
    pub fn resident_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.resident_bytes(),
        }
    }

    /// Runs `body` over this CPU weight's rows, all matrices of a stack one after the other
    /// (`[E, n, k]` as `E * n` rows of `k`): plain rows read in place, quantized ones decoded
    /// on demand.
    pub fn with_rows<R>(&self, body: impl FnOnce(WeightRows<'_>) -> R) -> Result<R> {
        match self {
            Weight::Dense(t) => with_weight_rows(t, body),
            Weight::Quant(q) => crate::quant::with_rows(&q.as_rows()?, |decode| body(WeightRows::Decode(decode))),
        }
    }

    /// `x Wᵀ`: `x` `[m, k]` -> `[m, n]` in `x`'s dtype.
    pub fn matmul_nt(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => matmul_nt(x, t),
            Weight::Quant(q) => quant_matmul_nt(x, q),
        }
    }
}

/// `x Wᵀ` for a quantized `[n, k]` weight: on the CPU each tile of [`TILE_ROWS`] rows is
/// decoded to f32 inside the product (never the whole matrix); elsewhere the weight is
/// decoded whole first (the GPU path dequantizes at load instead, see the models' loader).
pub fn quant_matmul_nt(x: &Tensor, w: &QuantTensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let &[n, k_w] = w.dims() else {
        candle_core::bail!("quant_matmul_nt: weight {:?} is not a matrix", w.dims());
    };
    if k != k_w {
        candle_core::bail!(
            "quant_matmul_nt: x {:?} and w {:?} disagree on the inner dimension",
            x.shape(),
            w.dims()
        );
    }
    if !w.device().is_cpu() || !x.device().is_cpu() {
        return x.matmul(&w.dequantize(x.dtype())?.t()?);
    }
    let xs = host_f32(x)?;
    let out = crate::quant::with_rows(w, |decode| product(&xs, m, k, n, WeightRows::Decode(decode)))?;
    Tensor::from_vec(out, (m, n), x.device())?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{max_abs, max_abs_diff};
    use candle_core::Device;

    /// Against candle's own (whole-storage-widening) matmul, on shapes that are and are not
    /// tile multiples, for a view into a stacked tensor and for f16.
    #[test]
    fn tiled_half_matmul_matches_candle() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 64, 32), (3, 96, 70), (17, 128, 33), (64, 40, 130), (70, 40, 300)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let stacked = Tensor::randn(0f32, 1.0, (3, n, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let w = stacked.get(1).unwrap();
            let got = matmul_nt(&x, &w).unwrap().to_dtype(DType::F32).unwrap();
            let want = x
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            let err = max_abs_diff(&got, &want);
            let scale = max_abs(&want);
            // Both accumulate in f32; the only rounding that differs is the final bf16 one.
            assert!(err <= scale * 2f32.powi(-7), "{m}x{k}x{n}: err {err} at scale {scale}");
            assert_eq!(matmul_nt(&x, &w).unwrap().dtype(), DType::BF16);

            let xf = x.to_dtype(DType::F32).unwrap();
            let wf16 = w.to_dtype(DType::F16).unwrap();
            let got = matmul_nt(&xf, &wf16).unwrap();
            let want = xf.matmul(&wf16.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let err = max_abs_diff(&got, &want);
            assert!(err <= 1e-3 * scale.max(1.0), "f16 {m}x{k}x{n}: err {err}");
        }
    }

    /// f32 weights, skinny and GEMM-sized batches, against candle's matmul.
    #[test]
    fn f32_products_match_candle_at_every_batch_size() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 40, 5),
            (2, 64, 70),
            (5, 33, 129),
            (16, 33, 129),
            (17, 33, 129),
            (40, 96, 300),
            (65, 50, 140),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let got = matmul_nt(&x, &w).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let err = max_abs_diff(&got, &want);
            assert!(err <= 1e-5 * k as f32, "{m}x{k}x{n}: err {err}");
        }
    }
}

#[cfg(test)]
mod quant_tests {
    use super::*;
    use crate::quant::{QuantScheme, QuantTensor};
    use crate::test_values::{max_abs, max_abs_diff};
    use candle_core::Device;

    /// Deterministic bytes; FP8 bytes avoid the two NaN codes.
    fn bytes(len: usize, salt: u64, fp8: bool) -> Vec<u8> {
        let mut s = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let b = (s >> 24) as u8;
                if fp8 && b & 0x7f == 0x7f {
                    b & 0xf0
                } else {
                    b
                }
            })
            .collect()
    }

    /// The tiled quantized product equals candle's f32 matmul on the decoded weights, for FP8
    /// and INT4 (bf16 scales), with widths that are not tile or group multiples and for a
    /// matrix of an expert stack.
    #[test]
    fn quantized_tiles_match_the_dequantized_matmul() {
        let dev = Device::Cpu;
        for (m, k, n, group) in [(1usize, 64usize, 32usize, 16usize), (5, 100, 70, 32), (17, 40, 33, 8)] {
            for scheme in [QuantScheme::Fp8E4m3 { group }, QuantScheme::Int4 { group }] {
                let experts = 3;
                let rb = scheme.row_bytes(k);
                let data = Tensor::from_vec(bytes(experts * n * rb, k as u64, true), (experts, n, rb), &dev).unwrap();
                let groups = scheme.groups(k);
                let scales = (Tensor::rand(0.5f32, 2.0, (experts, n, groups), &dev).unwrap() * 0.01)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let stack = QuantTensor::new(scheme, data, scales, &[experts, n, k]).unwrap();
                let w = Weight::Quant(stack).get(1).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let got = w.matmul_nt(&x).unwrap();
                let dense = w.to_dense(DType::F32).unwrap();
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let err = max_abs_diff(&got, &want);
                let scale = max_abs(&want);
                // The same f32 products, summed in another order.
                assert!(
                    err <= 1e-5 * scale.max(1.0),
                    "{scheme:?} {m}x{k}x{n}: err {err} at {scale}"
                );
            }
        }
    }
}
