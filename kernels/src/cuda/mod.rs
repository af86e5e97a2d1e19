//! CUDA kernels (feature `cuda`): PTX compiled by `build.rs` from `kernels/cuda/*.cu`,
//! embedded here, loaded through candle's CUDA device (cudarc) and launched on candle's stream.
//!
//! Every function takes candle `Tensor`s on one CUDA device and checks dtypes, shapes and
//! contiguity at this boundary. Launches take their addresses through [`args`] (cudarc's
//! access guards held across the launch; outputs allocated as fresh buffers, uninitialized
//! where the kernel writes them whole). Kernels compute in f32 and round once on store; bf16 and f32
//! variants exist for each. Tensors documented as "updated in place" are written through
//! their storage (like [`crate::write_latent_cache`]); the caller must not rely on any other
//! tensor sharing that storage staying unchanged.
//!
//! Nothing here has run on a GPU yet: the modules of `tests/cuda/` (one test binary, `cuda`)
//! compare each kernel with its reference; those of `benches/cuda/` (one bench binary) time
//! the MLA, GQA and DSA decode kernels and one
//! MoE layer.

mod args;
mod decode;
mod dsa;
mod gqa;
mod moe;
mod ops;
mod sampling;

pub use decode::{decode_split_plan, paged_mla_decode, paged_mla_rows, sparse_mla_decode, MlaDecodeParams};
pub use dsa::dsa_indexer_topk;
pub use gqa::{
    gqa_decode_split_plan, kv_cache_write, paged_gqa_decode, paged_gqa_rows, GqaDecodeParams, GQA_HEAD_DIMS,
};
pub use moe::{
    moe_combine, moe_down_weighted, moe_experts, moe_gate_up_silu, moe_permute, moe_route, routing_supported,
    DeviceExpertBatches, MAX_GROUPS, MAX_ROUTED_EXPERTS, MAX_TOP_K, TILE_ROWS,
};
pub use ops::{latent_cache_write, rmsnorm_residual, rope_inplace};
pub(crate) use ops::{scatter_rows, RowPart};
pub use sampling::argmax_rows;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, DevicePtr, LaunchConfig};
use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::DeviceId;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};

/// Embedded PTX modules, one per `.cu` file.
pub(crate) mod ptx {
    pub const LATENT_CACHE_WRITE: &str = include_str!(concat!(env!("OUT_DIR"), "/latent_cache_write.ptx"));
    pub const RMSNORM_RESIDUAL: &str = include_str!(concat!(env!("OUT_DIR"), "/rmsnorm_residual.ptx"));
    pub const ROPE: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
    pub const DSA_INDEXER: &str = include_str!(concat!(env!("OUT_DIR"), "/dsa_indexer.ptx"));
    pub const PAGED_MLA_DECODE: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_mla_decode.ptx"));
    pub const PAGED_GQA_DECODE: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_gqa_decode.ptx"));
    pub const MOE_ROUTE: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_route.ptx"));
    pub const MOE_PERMUTE: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_permute.ptx"));
    pub const MOE_GROUPED_GEMM: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_grouped_gemm.ptx"));
    pub const ARGMAX_ROWS: &str = include_str!(concat!(env!("OUT_DIR"), "/argmax_rows.ptx"));
}

/// The CUDA device `t` lives on.
pub(crate) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => bail!("moe-kernels cuda: tensor on {d:?}, expected a CUDA device"),
    }
}

/// Loads `func` from the embedded module `module` (cached per device by candle).
pub(crate) fn load(dev: &CudaDevice, module: &str, ptx: &str, func: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(func, &format!("moe_kernels_{module}"), ptx)?
        .into_cuda_function())
}

/// Device address of the first element of `t` (its layout offset included). `t` must stay
/// alive until the kernel using the address has been launched (candle's stream orders the
/// rest).
pub(crate) fn dev_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("moe-kernels cuda: tensor not on a CUDA device")
    };
    let base = match cs.dtype() {
        DType::BF16 => cs.as_cuda_slice::<bf16>()?.device_ptr(stream).0,
        DType::F16 => cs.as_cuda_slice::<f16>()?.device_ptr(stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(stream).0,
        DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(stream).0,
        DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(stream).0,
        dt => bail!("moe-kernels cuda: unsupported dtype {dt:?}"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// Checks that `t` is contiguous, has dtype `dtype` and lives on `dev`.
pub(crate) fn check(t: &Tensor, name: &str, dtype: DType, dev: &CudaDevice) -> Result<()> {
    if t.dtype() != dtype {
        bail!("moe-kernels cuda: {name} is {:?}, expected {dtype:?}", t.dtype());
    }
    if !t.is_contiguous() {
        bail!("moe-kernels cuda: {name} must be contiguous");
    }
    match t.device() {
        Device::Cuda(d) if d.id() == dev.id() => Ok(()),
        _ => bail!("moe-kernels cuda: {name} is not on the same CUDA device"),
    }
}

/// Kernel-name suffix of a float dtype.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F32 => Ok("f32"),
        dt => bail!("moe-kernels cuda: kernels exist for bf16 and f32, not {dt:?}"),
    }
}

/// Most query rows one attention launch takes (they are the grid's z dimension).
pub(crate) const MAX_LAUNCH_ROWS: usize = 65535;

/// `launch(q rows, row_seq rows, visible rows)` over runs of at most [`MAX_LAUNCH_ROWS`] rows
/// of `q` (`[R, ...]`) and `rows`, the outputs joined along dim 0: a step of more tokens than
/// one grid holds takes several launches.
pub(crate) fn in_row_chunks(
    q: &Tensor,
    rows: &crate::paged::DeviceRows,
    launch: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let total = rows.num_rows;
    if total <= MAX_LAUNCH_ROWS {
        return launch(q, &rows.row_seq, &rows.visible);
    }
    let mut outs = Vec::with_capacity(total.div_ceil(MAX_LAUNCH_ROWS));
    for start in (0..total).step_by(MAX_LAUNCH_ROWS) {
        let n = MAX_LAUNCH_ROWS.min(total - start);
        outs.push(launch(
            &q.narrow(0, start, n)?,
            &rows.row_seq.narrow(0, start, n)?,
            &rows.visible.narrow(0, start, n)?,
        )?);
    }
    Tensor::cat(&outs, 0)
}

/// The SM count of `dev`'s GPU, queried once per device (split plans read it every launch).
pub(crate) fn sm_count(dev: &CudaDevice) -> Result<usize> {
    static SM_COUNTS: OnceLock<Mutex<HashMap<DeviceId, usize>>> = OnceLock::new();
    let counts = SM_COUNTS.get_or_init(Default::default);
    if let Some(&n) = counts.lock().map_err(launch_err)?.get(&dev.id()) {
        return Ok(n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(launch_err)? as usize;
    counts.lock().map_err(launch_err)?.insert(dev.id(), n);
    Ok(n)
}

/// Lets `func` take `bytes` of dynamic shared memory (past the default 48 KiB). The driver
/// call is made only when `bytes` exceeds what was allowed before for this function.
pub(crate) fn allow_dynamic_smem(func: &CudaFunction, bytes: usize) -> Result<()> {
    static ALLOWED: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    // A loaded function's handle identifies it for the module's (the process's) life.
    let key = func.cu_function() as usize;
    let allowed = ALLOWED.get_or_init(Default::default);
    let mut allowed = allowed.lock().map_err(launch_err)?;
    if allowed.get(&key).is_some_and(|&a| a >= bytes) {
        return Ok(());
    }
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(launch_err)?;
    allowed.insert(key, bytes);
    Ok(())
}

pub(crate) fn launch_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("moe-kernels cuda launch: {e}"))
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}
