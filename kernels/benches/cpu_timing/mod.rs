//! Wall-clock timing shared by the CPU benchmarks.

use std::time::Instant;

use candle_core::Result;

/// Median milliseconds of `reps` calls of `f`, after one warm-up call.
pub fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}
