//! A launch's device addresses with cudarc's access guards held across the launch.
//!
//! cudarc tracks each buffer's last read and write with events when a context runs several
//! streams: taking an address makes the stream wait for the buffer's pending writes (reads,
//! for a write), and dropping the address's guard records the access. Recorded before the
//! launch, that event would let another stream use the buffer while the kernel still runs,
//! so a launch takes its addresses through an [`Args`] and drops it after launching.
//!
//! Inputs are borrowed from candle tensors ([`Held`] keeps their storage locked); outputs are
//! fresh device buffers ([`OutBuf`], written through mutable addresses, so their write is
//! recorded) that become tensors after the launch. Tensors a kernel updates in place (caches,
//! RoPE) can only be reached through a read lock: their writes are ordered by candle's stream
//! (every op of a model runs on it), not recorded as writes.

use std::ops::Deref;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::launch_err;

/// The storage of a launch's input tensors, locked for reading until dropped (declare it
/// before the [`Args`] that borrows it).
pub(crate) struct Held<'t> {
    /// Each tensor's storage read lock (candle's lock type, held opaquely), layout and dtype.
    parts: Vec<(Box<dyn Deref<Target = Storage> + 't>, &'t Layout, DType)>,
}

impl<'t> Held<'t> {
    pub(crate) fn new(tensors: &[&'t Tensor]) -> Self {
        Held {
            parts: tensors
                .iter()
                .map(|t| {
                    let (storage, layout) = t.storage_and_layout();
                    let storage: Box<dyn Deref<Target = Storage> + 't> = Box::new(storage);
                    (storage, layout, t.dtype())
                })
                .collect(),
        }
    }
}

/// Device addresses taken for one launch; dropping it (after the launch) records the accesses.
pub(crate) struct Args<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Args<'a> {
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        Args {
            stream,
            guards: Vec::new(),
        }
    }

    /// Address of the first element of `held`'s `i`-th tensor (its layout offset included),
    /// read by the kernel (or written in place: see the module notes).
    pub(crate) fn input(&mut self, held: &'a Held<'_>, i: usize) -> Result<u64> {
        let Some((storage, layout, dtype)) = held.parts.get(i) else {
            bail!("moe-kernels cuda: no input {i}")
        };
        let Storage::Cuda(cs) = &***storage else {
            bail!("moe-kernels cuda: tensor not on a CUDA device")
        };
        let (base, guard) = match cs.dtype() {
            DType::BF16 => cs.as_cuda_slice::<bf16>()?.device_ptr(self.stream),
            DType::F16 => cs.as_cuda_slice::<f16>()?.device_ptr(self.stream),
            DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(self.stream),
            DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(self.stream),
            DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(self.stream),
            DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(self.stream),
            dt => bail!("moe-kernels cuda: unsupported dtype {dt:?}"),
        };
        self.guards.push(guard);
        Ok(base + (layout.start_offset() * dtype.size_in_bytes()) as u64)
    }

    /// Address of an output buffer, written by the kernel.
    pub(crate) fn output(&mut self, buf: &'a mut OutBuf) -> u64 {
        let (ptr, guard) = match &mut buf.slice {
            Slice::BF16(s) => s.device_ptr_mut(self.stream),
            Slice::F32(s) => s.device_ptr_mut(self.stream),
            Slice::U32(s) => s.device_ptr_mut(self.stream),
        };
        self.guards.push(guard);
        ptr
    }
}

enum Slice {
    BF16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
    U32(CudaSlice<u32>),
}

/// A kernel's output buffer on one device, of a shape and dtype; a tensor after the launch.
pub(crate) struct OutBuf {
    slice: Slice,
    shape: Shape,
    device: CudaDevice,
}

impl OutBuf {
    /// A buffer the kernel writes whole: left uninitialized (no memset).
    pub(crate) fn uninit(dev: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<Self> {
        Self::make(dev, shape.into(), dtype, false)
    }

    /// A buffer the kernel writes only in part, or accumulates into: zero-filled.
    pub(crate) fn zeroed(dev: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<Self> {
        Self::make(dev, shape.into(), dtype, true)
    }

    fn make(dev: &CudaDevice, shape: Shape, dtype: DType, zero: bool) -> Result<Self> {
        let n = shape.elem_count().max(1);
        let stream = dev.cuda_stream();
        // SAFETY (uninit): the caller's kernel writes every element before anything reads it.
        let slice = match (dtype, zero) {
            (DType::BF16, true) => Slice::BF16(stream.alloc_zeros(n).map_err(launch_err)?),
            (DType::BF16, false) => Slice::BF16(unsafe { stream.alloc(n) }.map_err(launch_err)?),
            (DType::F32, true) => Slice::F32(stream.alloc_zeros(n).map_err(launch_err)?),
            (DType::F32, false) => Slice::F32(unsafe { stream.alloc(n) }.map_err(launch_err)?),
            (DType::U32, true) => Slice::U32(stream.alloc_zeros(n).map_err(launch_err)?),
            (DType::U32, false) => Slice::U32(unsafe { stream.alloc(n) }.map_err(launch_err)?),
            (dt, _) => bail!("moe-kernels cuda: no output buffers of {dt:?}"),
        };
        Ok(OutBuf {
            slice,
            shape,
            device: dev.clone(),
        })
    }

    /// The buffer as a contiguous tensor of its shape (call after the [`Args`] that wrote it
    /// is dropped).
    pub(crate) fn into_tensor(self) -> Tensor {
        let storage = match self.slice {
            Slice::BF16(s) => CudaStorage::wrap_cuda_slice(s, self.device),
            Slice::F32(s) => CudaStorage::wrap_cuda_slice(s, self.device),
            Slice::U32(s) => CudaStorage::wrap_cuda_slice(s, self.device),
        };
        Tensor::from_storage(Storage::Cuda(storage), self.shape, BackpropOp::none(), false)
    }
}
