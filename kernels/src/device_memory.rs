//! Device memory readings for sizing the KV cache from free memory: the device's free and
//! total bytes, and the peak of live allocations over a stretch of work (a profiling forward).
//! On CUDA, candle allocates through cudarc's stream-ordered allocator (`cuMemAllocAsync`)
//! from the device's current memory pool, whose high watermark of reserved bytes is the peak;
//! the CPU has no device memory to read (`None`). Also the device-wide wait the engine uses
//! after loading and to check a device after a failed step ([`synchronize`]).

use candle_core::{Device, Result};

/// Free and total bytes of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: usize,
    pub total: usize,
}

impl DeviceMemory {
    /// Bytes in use by anything: this process' weights, pools and runtime, and other processes.
    pub fn used(&self) -> usize {
        self.total.saturating_sub(self.free)
    }
}

/// Free and total memory of `device` after its queued work finished and its memory pool gave
/// back what no live allocation holds; `None` on the CPU.
pub fn device_memory(device: &Device) -> Result<Option<DeviceMemory>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::settled_memory(d).map(Some),
        _ => Ok(None),
    }
}

/// Waits for the work every stream of `device`'s context queued (the loading thread's uploads
/// included, whatever stream they used) and returns the error a failed kernel left: a sticky
/// CUDA error fails here. Nothing to wait for on the CPU.
pub fn synchronize(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::synchronize(d),
        d => d.synchronize(),
    }
}

/// Starts measuring `device`'s peak allocation: returns the bytes its pool holds now (the
/// baseline that [`peak_since`] subtracts); `None` on the CPU.
pub fn start_peak(device: &Device) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::reset_pool_peak(d).map(Some),
        _ => Ok(None),
    }
}

/// The most bytes `device`'s pool held at once above `baseline` since [`start_peak`] returned
/// it.
pub fn peak_since(device: &Device, baseline: u64) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::pool_peak(d).map(|high| Some(high.saturating_sub(baseline))),
        _ => {
            let _ = baseline;
            Ok(None)
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::Result;

    fn driver_err(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Msg(format!("{what}: {e}"))
    }

    /// The device's current memory pool (the one `cuMemAllocAsync` draws from); an error on
    /// GPUs without memory pools, where candle allocates outside any pool.
    fn pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let ctx = dev.cuda_stream().context().clone();
        if !ctx.has_async_alloc() {
            return Err(candle_core::Error::Msg(
                "this GPU has no stream-ordered memory pools, so the profiling forward cannot be measured: \
                 give --kv-cache-memory"
                    .into(),
            ));
        }
        ctx.bind_to_thread()
            .map_err(|e| driver_err("binding the CUDA context", e))?;
        // SAFETY: the device handle comes from a live context.
        unsafe { result::device::get_mem_pool(ctx.cu_device()) }.map_err(|e| driver_err("cuDeviceGetMemPool", e))
    }

    fn pool_attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: the used/reserved attributes are cuuint64_t.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast()) }
            .map_err(|e| driver_err("cuMemPoolGetAttribute", e))?;
        Ok(value)
    }

    /// Waits for the work of every stream of the device's context (a split model's rank may
    /// run on another stream than `dev`'s).
    pub(super) fn synchronize(dev: &CudaDevice) -> Result<()> {
        dev.cuda_stream()
            .context()
            .synchronize()
            .map_err(|e| driver_err("synchronizing the device", e))
    }

    pub(super) fn settled_memory(dev: &CudaDevice) -> Result<super::DeviceMemory> {
        synchronize(dev)?;
        let stream = dev.cuda_stream();
        let pool = pool(dev)?;
        // SAFETY: the pool is the device's current one; trimming only releases unused memory.
        unsafe { result::mem_pool::trim_to(pool, 0) }.map_err(|e| driver_err("cuMemPoolTrimTo", e))?;
        let (free, total) = stream
            .context()
            .mem_get_info()
            .map_err(|e| driver_err("cuMemGetInfo", e))?;
        Ok(super::DeviceMemory { free, total })
    }

    /// The peak is of memory the pool reserved from the device (what the GPU must hold,
    /// fragmentation included), from a baseline trimmed to the live allocations.
    pub(super) fn reset_pool_peak(dev: &CudaDevice) -> Result<u64> {
        synchronize(dev)?;
        let pool = pool(dev)?;
        // SAFETY: the pool is the device's current one; trimming only releases unused memory.
        unsafe { result::mem_pool::trim_to(pool, 0) }.map_err(|e| driver_err("cuMemPoolTrimTo", e))?;
        let mut zero: u64 = 0;
        // SAFETY: RESERVED_MEM_HIGH is a cuuint64_t that may only be reset to zero (it then
        // restarts from the bytes reserved now).
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        }
        .map_err(|e| driver_err("resetting the pool's high watermark", e))?;
        pool_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
    }

    pub(super) fn pool_peak(dev: &CudaDevice) -> Result<u64> {
        synchronize(dev)?;
        pool_attribute(pool(dev)?, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::{device_memory, peak_since, start_peak};

    #[test]
    fn the_cpu_has_no_device_memory_to_read() {
        assert_eq!(device_memory(&Device::Cpu).unwrap(), None);
        assert_eq!(start_peak(&Device::Cpu).unwrap(), None);
        assert_eq!(peak_since(&Device::Cpu, 7).unwrap(), None);
    }
}
