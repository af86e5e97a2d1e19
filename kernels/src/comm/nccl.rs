//! [`NcclComm`]: the collectives over NCCL for ranks on the CUDA devices of one process
//! (`ncclCommInitAll`), enqueued on each device's candle stream so they order with the
//! kernels around them. Multi-node groups join with a unique id from rank 0
//! (`ncclCommInitRank`; see the README's "Beyond one GPU"), which this module does not do yet.
//!
//! A failed rank cannot be waited out: [`Communicator::abort`] on any rank aborts every
//! communicator of the group (`ncclCommAbort`, which also ends collectives stuck waiting on
//! the GPU for the failed rank), and the group then refuses every collective;
//! [`Communicator::recover`] says so, and the server must be restarted.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{bail, DType, Device, Result, Shape, Tensor};

use super::{check_counts, Communicator};
use crate::cuda::dev_ptr;

/// The raw communicator handle. Each rank's handle is used for collectives by that rank's
/// thread alone; other threads only abort it.
struct RawComm(sys::ncclComm_t);

// SAFETY: see above: one thread enqueues on a handle; aborting from another thread is what
// ncclCommAbort is for.
unsafe impl Send for RawComm {}

/// The communicators of one group, in rank order (`None` once aborted).
struct Group {
    comms: Vec<Mutex<Option<RawComm>>>,
}

impl Group {
    fn lock(&self, rank: usize) -> MutexGuard<'_, Option<RawComm>> {
        self.comms[rank].lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for rank in 0..self.comms.len() {
            if let Some(comm) = self.lock(rank).take() {
                // SAFETY: nothing uses the handle after this (it was taken out).
                let _ = unsafe { result::comm_destroy(comm.0) };
            }
        }
    }
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    group: Arc<Group>,
    rank: usize,
    size: usize,
    device: CudaDevice,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.size)
    }
}

fn nccl_err(op: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {op}: {e:?}"))
}

/// One communicator per device, rank `r` on `devices[r]` (distinct CUDA devices).
pub fn nccl_group(devices: &[Device]) -> Result<Vec<NcclComm>> {
    let cuda: Vec<CudaDevice> = devices
        .iter()
        .map(|d| match d {
            Device::Cuda(c) => Ok(c.clone()),
            other => bail!("NCCL ranks must be CUDA devices, not {other:?}"),
        })
        .collect::<Result<_>>()?;
    let ordinals: Vec<i32> = cuda
        .iter()
        .map(|d| d.cuda_stream().context().ordinal() as i32)
        .collect();
    let mut raw: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); cuda.len()];
    // SAFETY: `raw` has room for one handle per device in `ordinals`.
    unsafe { result::comm_init_all(raw.as_mut_ptr(), ordinals.len() as i32, ordinals.as_ptr()) }
        .map_err(|e| nccl_err("ncclCommInitAll", e))?;
    let size = cuda.len();
    let group = Arc::new(Group {
        comms: raw.into_iter().map(|c| Mutex::new(Some(RawComm(c)))).collect(),
    });
    Ok(cuda
        .into_iter()
        .enumerate()
        .map(|(rank, device)| NcclComm {
            group: group.clone(),
            rank,
            size,
            device,
        })
        .collect())
}

fn nccl_dtype(dtype: DType) -> Result<sys::ncclDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
        DType::U32 => sys::ncclDataType_t::ncclUint32,
        DType::I64 => sys::ncclDataType_t::ncclInt64,
        DType::U8 => sys::ncclDataType_t::ncclUint8,
        other => bail!("NCCL collectives of {other:?} are not wired"),
    })
}

impl NcclComm {
    fn lock(&self) -> MutexGuard<'_, Option<RawComm>> {
        self.group.lock(self.rank)
    }

    /// `x` contiguous on this rank's device, and a zeroed output of `shape`.
    fn prepare(&self, op: &str, x: &Tensor, shape: impl Into<Shape>) -> Result<(Tensor, Tensor)> {
        match x.device() {
            Device::Cuda(d) if d.id() == self.device.id() => {}
            other => bail!("NCCL {op}: rank {} got a tensor on {other:?}", self.rank),
        }
        let x = x.contiguous()?;
        let out = Tensor::zeros(shape, x.dtype(), x.device())?;
        Ok((x, out))
    }

    /// Runs `body(comm, stream)` with the communicator, failing once the group was aborted.
    fn with_comm(&self, op: &str, body: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<()>) -> Result<()> {
        // The lock is not held during the call: an abort from another rank's thread must be
        // able to end a call that waits for a rank that failed (NCCL allows ncclCommAbort
        // from another thread for this). Only this rank's thread enqueues on this handle.
        let Some(comm) = self.lock().as_ref().map(|c| c.0) else {
            bail!("NCCL {op}: the collective was aborted (another rank failed; the NCCL group is gone)");
        };
        let stream = self.device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("binding the device", e))?;
        body(comm, stream.cu_stream() as sys::cudaStream_t)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let (x, out) = self.prepare("all_reduce", x, x.shape().clone())?;
        if x.elem_count() == 0 {
            return Ok(out);
        }
        let dtype = nccl_dtype(x.dtype())?;
        let stream = self.device.cuda_stream();
        let (src, dst) = (dev_ptr(&x, &stream)?, dev_ptr(&out, &stream)?);
        self.with_comm("all_reduce", |comm, s| {
            // SAFETY: src and dst hold `elem_count` elements of `dtype` on this device; both
            // tensors outlive the enqueue and candle's stream orders later reads after it.
            unsafe {
                result::all_reduce(
                    src as *const c_void,
                    dst as *mut c_void,
                    x.elem_count(),
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    s,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("all_reduce", e))
        })?;
        Ok(out)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if dims.is_empty() {
            bail!("all_gather: a scalar has no rows");
        }
        dims[0] *= self.size;
        let (x, out) = self.prepare("all_gather", x, dims)?;
        if x.elem_count() == 0 {
            return Ok(out);
        }
        let dtype = nccl_dtype(x.dtype())?;
        let stream = self.device.cuda_stream();
        let (src, dst) = (dev_ptr(&x, &stream)?, dev_ptr(&out, &stream)?);
        self.with_comm("all_gather", |comm, s| {
            // SAFETY: dst holds `size` times src's elements.
            unsafe { result::all_gather(src as *const c_void, dst as *mut c_void, x.elem_count(), dtype, comm, s) }
                .map(|_| ())
                .map_err(|e| nccl_err("all_gather", e))
        })?;
        Ok(out)
    }

    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if dims.is_empty() || dims[0] % self.size != 0 {
            bail!(
                "reduce_scatter: {:?} does not split into {} row blocks",
                x.dims(),
                self.size
            );
        }
        dims[0] /= self.size;
        let (x, out) = self.prepare("reduce_scatter", x, dims)?;
        if out.elem_count() == 0 {
            return Ok(out);
        }
        let dtype = nccl_dtype(x.dtype())?;
        let stream = self.device.cuda_stream();
        let (src, dst) = (dev_ptr(&x, &stream)?, dev_ptr(&out, &stream)?);
        self.with_comm("reduce_scatter", |comm, s| {
            // SAFETY: src holds `size` times dst's elements.
            unsafe {
                result::reduce_scatter(
                    src as *const c_void,
                    dst as *mut c_void,
                    out.elem_count(),
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    s,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("reduce_scatter", e))
        })?;
        Ok(out)
    }

    fn all_to_all(&self, x: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        check_counts(x, send_counts, self.size)?;
        if recv_counts.len() != self.size {
            bail!(
                "all_to_all: {} receive counts among {} ranks",
                recv_counts.len(),
                self.size
            );
        }
        let mut dims = x.dims().to_vec();
        let row: usize = dims[1..].iter().product();
        dims[0] = recv_counts.iter().sum();
        let (x, out) = self.prepare("all_to_all", x, dims)?;
        let dtype = nccl_dtype(x.dtype())?;
        let elem = x.dtype().size_in_bytes() as u64;
        let stream = self.device.cuda_stream();
        let src = if x.elem_count() > 0 { dev_ptr(&x, &stream)? } else { 0 };
        let dst = if out.elem_count() > 0 {
            dev_ptr(&out, &stream)?
        } else {
            0
        };
        self.with_comm("all_to_all", |comm, s| {
            result::group_start().map_err(|e| nccl_err("group_start", e))?;
            let (mut sent, mut got) = (0u64, 0u64);
            let mut status = Ok(());
            for peer in 0..self.size {
                let (ns, nr) = ((send_counts[peer] * row) as u64, (recv_counts[peer] * row) as u64);
                // SAFETY: the offsets stay inside x and out (the counts were checked).
                if ns > 0 && status.is_ok() {
                    status = unsafe {
                        result::send(
                            (src + sent * elem) as *const c_void,
                            ns as usize,
                            dtype,
                            peer as i32,
                            comm,
                            s,
                        )
                    }
                    .map(|_| ());
                }
                if nr > 0 && status.is_ok() {
                    status = unsafe {
                        result::recv(
                            (dst + got * elem) as *mut c_void,
                            nr as usize,
                            dtype,
                            peer as i32,
                            comm,
                            s,
                        )
                    }
                    .map(|_| ());
                }
                sent += ns;
                got += nr;
            }
            let end = result::group_end();
            status.map_err(|e| nccl_err("all_to_all", e))?;
            end.map(|_| ()).map_err(|e| nccl_err("group_end", e))
        })?;
        Ok(out)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.size {
            bail!("broadcast: root {root} of {} ranks", self.size);
        }
        let (x, out) = self.prepare("broadcast", x, x.shape().clone())?;
        if x.elem_count() == 0 {
            return Ok(out);
        }
        let dtype = nccl_dtype(x.dtype())?;
        let stream = self.device.cuda_stream();
        let (src, dst) = (dev_ptr(&x, &stream)?, dev_ptr(&out, &stream)?);
        self.with_comm("broadcast", |comm, s| {
            // SAFETY: src and dst hold `elem_count` elements on this device.
            unsafe {
                result::broadcast(
                    src as *const c_void,
                    dst as *mut c_void,
                    x.elem_count(),
                    dtype,
                    root as i32,
                    comm,
                    s,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("broadcast", e))
        })?;
        Ok(out)
    }

    fn abort(&self) {
        for rank in 0..self.size {
            if let Some(comm) = self.group.lock(rank).take() {
                // SAFETY: the handle came from ncclCommInitAll and is aborted once (taken out).
                if let Err(e) = unsafe { result::comm_abort(comm.0) } {
                    eprintln!("moe-kernels: ncclCommAbort on rank {rank}: {e:?}");
                }
            }
        }
    }

    fn recover(&self) -> Result<()> {
        if self.lock().is_none() {
            bail!("the NCCL group was aborted after a rank failed; restart to serve again");
        }
        Ok(())
    }

    fn transport(&self) -> &'static str {
        "nccl"
    }
}
