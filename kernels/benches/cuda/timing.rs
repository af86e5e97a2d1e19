//! Timing shared by the GPU benchmarks: CUDA events on candle's stream.

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{Device, Result};

/// Milliseconds per call of `f` on `dev`'s stream, averaged over `iters` calls after 3
/// warm-up calls. Host time spent launching counts as far as it leaves the GPU idle.
pub fn time_ms<T>(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let Device::Cuda(cuda) = dev else {
        candle_core::bail!("time_ms needs a CUDA device")
    };
    let stream = cuda.cuda_stream();
    for _ in 0..3 {
        f()?;
    }
    let event = || {
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(candle_core::Error::wrap)
    };
    let start = event()?;
    for _ in 0..iters {
        f()?;
    }
    let end = event()?;
    Ok(start.elapsed_ms(&end).map_err(candle_core::Error::wrap)? as f64 / iters as f64)
}
