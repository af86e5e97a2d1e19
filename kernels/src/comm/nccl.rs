//! [`NcclComm`]: the collectives over NCCL for ranks on the CUDA devices of one process
//! (`ncclCommInitAll`), enqueued on each device's candle stream so they order with the
//! kernels around them. Multi-node groups join with a unique id from rank 0
//! (`ncclCommInitRank`; see the README's "Beyond one device"), which this module does not do
//! yet.
//!
//! A failed rank cannot be waited out: [`Communicator::abort`] on any rank aborts every
//! communicator of the group (`ncclCommAbort`, which also ends collectives stuck waiting on
//! the GPU for the failed rank), and the group then refuses every collective;
//! [`Communicator::recover`] says so, and the server must be restarted.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{bail, DType, Device, Result, Tensor};

use super::{check_counts, Communicator};
use crate::cuda::dev_ptr;

/// The raw communicator handle. Each rank's handle is used for collectives by that rank's
/// thread alone, under a read lock for the length of the call; an abort takes it out under
/// the write lock (see [`Group::abort_all`]).
struct RawComm(sys::ncclComm_t);

// SAFETY: see above: one thread enqueues on a handle; aborting from another thread is what
// ncclCommAbort is for.
unsafe impl Send for RawComm {}
// SAFETY: shared access (the read lock) only copies the handle value.
unsafe impl Sync for RawComm {}

/// How long an abort waits for a rank's call in progress to return before aborting under it
/// (a call waiting for a rank that failed may never return by itself; ncclCommAbort ends it).
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// The communicators of one group, in rank order (`None` once aborted).
struct Group {
    comms: Vec<RwLock<Option<RawComm>>>,
    /// The rank whose abort came first.
    aborted_by: Mutex<Option<usize>>,
}

impl Group {
    /// Aborts every communicator: each as soon as its rank's call in progress returns, or
    /// under a call still in progress after [`ABORT_WAIT`] (stuck on the failed rank).
    fn abort_all(&self) {
        for (rank, slot) in self.comms.iter().enumerate() {
            let start = Instant::now();
            let handle = loop {
                match slot.try_write() {
                    Ok(mut guard) => break guard.take().map(|c| c.0),
                    Err(TryLockError::Poisoned(p)) => break p.into_inner().take().map(|c| c.0),
                    Err(TryLockError::WouldBlock) if start.elapsed() < ABORT_WAIT => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    // Stuck: abort the handle under the call. The slot keeps it, so `Drop`
                    // must not abort it again: `aborted_by` marks the group.
                    Err(TryLockError::WouldBlock) => break stuck_handle(slot),
                }
            };
            if let Some(comm) = handle {
                // SAFETY: the handle came from ncclCommInitAll and is aborted once here.
                if let Err(e) = unsafe { result::comm_abort(comm) } {
                    eprintln!("moe-kernels: ncclCommAbort on rank {rank}: {e:?}");
                }
            }
        }
    }
}

/// The handle in `slot` while another thread holds its read lock.
fn stuck_handle(slot: &RwLock<Option<RawComm>>) -> Option<sys::ncclComm_t> {
    slot.read().ok().and_then(|g| g.as_ref().map(|c| c.0))
}

impl Drop for Group {
    fn drop(&mut self) {
        let aborted = self.aborted_by.lock().map(|b| b.is_some()).unwrap_or(true);
        for slot in &self.comms {
            if let Some(comm) = slot.write().unwrap_or_else(|p| p.into_inner()).take() {
                if aborted {
                    continue; // aborted under a stuck call already
                }
                // Abort, not destroy: destroying the communicators of ncclCommInitAll one
                // after another from one thread may wait on each other.
                // SAFETY: nothing uses the handle after this (it was taken out).
                let _ = unsafe { result::comm_abort(comm.0) };
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
        comms: raw.into_iter().map(|c| RwLock::new(Some(RawComm(c)))).collect(),
        aborted_by: Mutex::new(None),
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

/// What one call of a one-buffer collective gets: source and destination device addresses,
/// the element type, the communicator and the stream.
struct Call {
    src: *const c_void,
    dst: *mut c_void,
    dtype: sys::ncclDataType_t,
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
}

impl NcclComm {
    /// `x` contiguous on this rank's device, and a zeroed output of `dims`.
    fn prepare(&self, op: &str, x: &Tensor, dims: Vec<usize>) -> Result<(Tensor, Tensor)> {
        match x.device() {
            Device::Cuda(d) if d.id() == self.device.id() => {}
            other => bail!("NCCL {op}: rank {} got a tensor on {other:?}", self.rank),
        }
        let x = x.contiguous()?;
        let out = Tensor::zeros(dims, x.dtype(), x.device())?;
        Ok((x, out))
    }

    /// Runs `body(comm, stream)` with the communicator, failing once the group was aborted.
    fn with_comm(&self, op: &str, body: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<()>) -> Result<()> {
        // The read lock is held for the call: an abort waits for it to return (or, if it is
        // stuck waiting for a rank that failed, aborts under it after ABORT_WAIT).
        let guard = self.group.comms[self.rank].read().unwrap_or_else(|p| p.into_inner());
        let comm = match (guard.as_ref(), self.aborted_by()) {
            (Some(c), None) => c.0,
            (_, by) => {
                let by = by.map_or("another rank".to_string(), |r| format!("rank {r}"));
                bail!("NCCL {op}: the collective was aborted ({by} failed; the NCCL group is gone)");
            }
        };
        let stream = self.device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("binding the device", e))?;
        body(comm, stream.cu_stream() as sys::cudaStream_t)
    }

    /// A collective from `x` into a new zeroed tensor of `out_dims` (nothing to do when either
    /// is empty, on every rank alike): `enqueue` makes the NCCL call.
    fn one_buffer(
        &self,
        op: &str,
        x: &Tensor,
        out_dims: Vec<usize>,
        enqueue: impl FnOnce(&Call) -> std::result::Result<result::NcclStatus, result::NcclError>,
    ) -> Result<Tensor> {
        let (x, out) = self.prepare(op, x, out_dims)?;
        if x.elem_count() == 0 || out.elem_count() == 0 {
            return Ok(out);
        }
        let dtype = nccl_dtype(x.dtype())?;
        let stream = self.device.cuda_stream();
        // Both tensors live until this function returns, after the enqueue; candle's one
        // stream per device orders every later read of `out` after the collective.
        let (src, dst) = (dev_ptr(&x, &stream)?, dev_ptr(&out, &stream)?);
        self.with_comm(op, |comm, stream| {
            let call = Call {
                src: src as *const c_void,
                dst: dst as *mut c_void,
                dtype,
                comm,
                stream,
            };
            enqueue(&call).map(|_| ()).map_err(|e| nccl_err(op, e))
        })?;
        Ok(out)
    }
}

/// `x`'s dims with the first multiplied (`Some(n)`) or divided by `n`.
fn rows_scaled(op: &str, x: &Tensor, times: Option<usize>, by: usize) -> Result<Vec<usize>> {
    let mut dims = x.dims().to_vec();
    let Some(first) = dims.first_mut() else {
        bail!("{op}: a scalar has no rows");
    };
    match times {
        Some(n) => *first *= n,
        None if *first % by == 0 => *first /= by,
        None => bail!("{op}: {:?} does not split into {by} row blocks", x.dims()),
    }
    Ok(dims)
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        // SAFETY (every enqueue below): the addresses hold the element counts passed, on
        // this rank's device, per `one_buffer`.
        self.one_buffer("all_reduce", x, x.dims().to_vec(), |c| unsafe {
            result::all_reduce(c.src, c.dst, n, c.dtype, sys::ncclRedOp_t::ncclSum, c.comm, c.stream)
        })
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let dims = rows_scaled("all_gather", x, Some(self.size), 1)?;
        self.one_buffer("all_gather", x, dims, |c| unsafe {
            result::all_gather(c.src, c.dst, n, c.dtype, c.comm, c.stream)
        })
    }

    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        let dims = rows_scaled("reduce_scatter", x, None, self.size)?;
        let n = dims.iter().product();
        self.one_buffer("reduce_scatter", x, dims, |c| unsafe {
            result::reduce_scatter(c.src, c.dst, n, c.dtype, sys::ncclRedOp_t::ncclSum, c.comm, c.stream)
        })
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.size {
            bail!("broadcast: root {root} of {} ranks", self.size);
        }
        let n = x.elem_count();
        self.one_buffer("broadcast", x, x.dims().to_vec(), |c| unsafe {
            result::broadcast(c.src, c.dst, n, c.dtype, root as i32, c.comm, c.stream)
        })
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
        let mut dims = rows_scaled("all_to_all", x, Some(1), 1)?;
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

    fn abort(&self) {
        {
            let mut by = self.group.aborted_by.lock().unwrap_or_else(|p| p.into_inner());
            if by.is_some() {
                return;
            }
            *by = Some(self.rank);
        }
        self.group.abort_all();
    }

    fn aborted_by(&self) -> Option<usize> {
        *self.group.aborted_by.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recover(&self) -> Result<()> {
        if let Some(rank) = self.aborted_by() {
            bail!("the NCCL group was aborted after rank {rank} failed; restart to serve again");
        }
        Ok(())
    }

    fn transport(&self) -> &'static str {
        "nccl"
    }
}
