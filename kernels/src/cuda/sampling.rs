//! Greedy token choice on the device (kernel: `kernels/cuda/argmax_rows.cu`): each row's
//! argmax, so a greedy step downloads one id a row instead of the whole vocabulary.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

use super::args::{Args, Held, OutBuf};
use super::{cfg, cuda_device, launch_err, load, ptx};

/// `[rows]` u32: the index of each row's largest value of `logits` (`[rows, vocab]` f32, last
/// dim contiguous), the lowest index among ties, NaN never chosen (0 for a row of NaNs): the
/// host sampler's `argmax`, row by row.
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(logits)?;
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || logits.stride()[1] != 1 {
        bail!("argmax_rows: logits must be f32 with a contiguous last dim");
    }
    if rows == 0 {
        return Tensor::zeros(0, DType::U32, logits.device());
    }
    let mut ids = OutBuf::uninit(&dev, rows, DType::U32)?;
    let func = load(&dev, "argmax_rows", ptx::ARGMAX_ROWS, "argmax_rows_f32")?;
    let stream = dev.cuda_stream();
    let held = Held::new(&[logits]);
    let mut args = Args::new(&stream);
    let p_logits = args.input(&held, 0)?;
    let p_ids = args.output(&mut ids);
    let (ld, vocab_i) = (logits.stride()[0] as i64, vocab as i64);
    let mut b = stream.launch_builder(&func);
    b.arg(&p_logits).arg(&ld).arg(&vocab_i).arg(&p_ids);
    unsafe { b.launch(cfg((rows as u32, 1, 1), 512, 0)) }.map_err(launch_err)?;
    drop(args);
    Ok(ids.into_tensor())
}
