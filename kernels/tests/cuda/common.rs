//! Helpers shared by the GPU tests: a deterministic RNG and device transfers.

use candle_core::{DType, Device, Tensor};

/// xorshift64*: deterministic values in [-1, 1).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

pub fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Cache slots as the write kernels take them: i64 as given, or u32 with the negative
/// (padding) slots as `u32::MAX`.
pub fn slot_tensor(slots: &[i64], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    match dtype {
        DType::I64 => Tensor::from_vec(slots.to_vec(), slots.len(), dev),
        _ => Tensor::from_vec(
            slots
                .iter()
                .map(|&s| if s < 0 { u32::MAX } else { s as u32 })
                .collect::<Vec<_>>(),
            slots.len(),
            dev,
        ),
    }
}
