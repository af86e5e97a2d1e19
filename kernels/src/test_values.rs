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
