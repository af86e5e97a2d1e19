//! Test inputs shared by the reference tests: deterministic pseudo-random values.

/// Deterministic pseudo-random values in [-1, 1) (a 32-bit LCG), so the test needs no RNG crate.
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// `x Wᵀ` summed in f64: `x` `[m, k]`, `w` `[rows, k]` -> `[m, rows]`.
pub(crate) fn naive_nt(x: &[f32], m: usize, k: usize, w: &[f32], rows: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * rows];
    for i in 0..m {
        for j in 0..rows {
            out[i * rows + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32;
        }
    }
    out
}

/// The largest `|a - b|` over two tensors of one shape (any float dtype).
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let diff = (a.to_dtype(candle_core::DType::F32).unwrap() - b.to_dtype(candle_core::DType::F32).unwrap()).unwrap();
    max_abs(&diff)
}

/// The largest `|t|` (any float dtype).
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}
