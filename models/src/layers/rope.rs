//! Rotary position embedding of the rotated part of q and k (MLA's `qk_rope_head_dim`, or the
//! first `rotary_dim` values of a GQA head), with YaRN.
//!
//! Frequencies follow YaRN (arXiv:2309.00071) as transformers computes them: a linear ramp
//! between extrapolated and interpolated frequencies over the correction range, and cos/sin
//! multiplied by the attention factor (mscale ratio). DeepSeek rotates interleaved pairs
//! `(x[2i], x[2i+1])`; with `rope_interleave = false` the pairs are `(x[i], x[i + d/2])`.
//! Output keeps the input layout, so q and k stay comparable however the pairs are laid out.

use candle_core::{DType, Device, Tensor};

use crate::config::{yarn_mscale, RopeConfig, YarnScaling};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[dim / 2]` inverse frequencies.
    inv_freq: Vec<f32>,
    /// Multiplier of cos and sin (YaRN's attention factor; 1 without YaRN).
    attention_factor: f32,
    interleaved: bool,
    dim: usize,
}

impl Rope {
    pub fn new(cfg: &RopeConfig, dim: usize) -> Self {
        let half = dim / 2;
        // As transformers: base^(2i/d) in f32.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| (cfg.theta as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        let (inv_freq, attention_factor) = match &cfg.yarn {
            None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            Some(y) => yarn_frequencies(y, &pos_freqs, cfg.theta, dim),
        };
        Rope {
            inv_freq,
            attention_factor: attention_factor as f32,
            interleaved: cfg.interleaved,
            dim,
        }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    /// cos and sin tables for `positions` (`[tokens]` u32): each `[tokens, dim/2]` f32, on
    /// `positions`' device. Built once a step and read by every layer; on a GPU they are
    /// computed there (no host round trip), the same f32 products and functions as here.
    pub fn cos_sin(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let half = self.dim / 2;
        if !positions.device().is_cpu() {
            let inv_freq = Tensor::from_slice(&self.inv_freq, (1, half), positions.device())?;
            let angles = positions.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&inv_freq)?;
            let af = self.attention_factor as f64;
            return Ok(((angles.cos()? * af)?, (angles.sin()? * af)?));
        }
        let pos = positions.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut cos = Vec::with_capacity(pos.len() * half);
        let mut sin = Vec::with_capacity(pos.len() * half);
        for p in &pos {
            for f in &self.inv_freq {
                let angle = p * f;
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
            }
        }
        let device: &Device = positions.device();
        Ok((
            Tensor::from_vec(cos, (pos.len(), half), device)?,
            Tensor::from_vec(sin, (pos.len(), half), device)?,
        ))
    }

    /// Rotates `x`: `[tokens, heads, dim]` (any float dtype) with tables from [`Rope::cos_sin`].
    /// Computed in f32, returned in `x`'s dtype (contiguous on a GPU).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.apply_pairs(x, cos, sin, self.interleaved)
    }

    /// [`Rope::apply`] with the pair layout given (DSA's indexer rotates its own way,
    /// whatever the attention does).
    pub fn apply_pairs(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
        Ok(moe_kernels::rope(x, cos, sin, interleaved)?)
    }
}

/// YaRN inverse frequencies and attention factor.
fn yarn_frequencies(y: &YarnScaling, pos_freqs: &[f32], base: f64, dim: usize) -> (Vec<f32>, f64) {
    let attention_factor = match (y.attention_factor, y.mscale, y.mscale_all_dim) {
        (Some(af), _, _) => af,
        (None, Some(m), Some(mad)) if m != 0.0 && mad != 0.0 => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, mad),
        _ => yarn_mscale(y.factor, 1.0),
    };
    let d = dim as f64;
    let correction_dim = |rotations: f64| {
        d * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(d - 1.0);
    if low == high {
        high += 0.001;
    }
    let inv_freq = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
            let extrapolation_weight = 1.0 - ramp;
            let extrapolated = 1.0 / p;
            let interpolated = 1.0 / (y.factor as f32 * p);
            interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight
        })
        .collect();
    (inv_freq, attention_factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn_cfg() -> RopeConfig {
        RopeConfig {
            theta: 10000.0,
            interleaved: true,
            partial_rotary_factor: 1.0,
            yarn: Some(YarnScaling {
                factor: 4.0,
                original_max_position_embeddings: 64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: Some(0.8),
                attention_factor: None,
                truncate: true,
            }),
        }
    }

    #[test]
    fn yarn_frequencies_follow_the_ramp() {
        // d = 8, L = 64, base 1e4: correction dims floor(0.18..)=0 and ceil(1.4..)=2, so
        // i = 0 keeps the original frequency, i >= 2 is fully interpolated (divided by 4).
        let rope = Rope::new(&yarn_cfg(), 8);
        let f = rope.inv_freq();
        let plain = [1.0f32, 0.1, 0.01, 0.001];
        assert!((f[0] - plain[0]).abs() < 1e-7);
        assert!((f[1] - (0.5 * plain[1] / 4.0 + 0.5 * plain[1])).abs() < 1e-7);
        assert!((f[2] - plain[2] / 4.0).abs() < 1e-9);
        assert!((f[3] - plain[3] / 4.0).abs() < 1e-9);
        let expected_af = (0.1 * 4f64.ln() + 1.0) / (0.08 * 4f64.ln() + 1.0);
        assert!((rope.attention_factor() as f64 - expected_af).abs() < 1e-6);
    }

    #[test]
    fn interleaved_and_half_split_rotate_the_same_pairs_differently() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = RopeConfig {
            theta: 10000.0,
            interleaved: true,
            partial_rotary_factor: 1.0,
            yarn: None,
        };
        let rope = Rope::new(&cfg, 4);
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &dev)?;
        let pos = Tensor::new(&[3u32], &dev)?;
        let (cos, sin) = rope.cos_sin(&pos)?;
        let y = rope.apply(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
        // Pair (1,2) at angle 3 rad, pair (3,4) at 3 * 0.01 rad.
        let (c0, s0) = (3f32.cos(), 3f32.sin());
        let (c1, s1) = (0.03f32.cos(), 0.03f32.sin());
        let want = [
            1. * c0 - 2. * s0,
            1. * s0 + 2. * c0,
            3. * c1 - 4. * s1,
            3. * s1 + 4. * c1,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        let half = Rope::new(
            &RopeConfig {
                interleaved: false,
                ..cfg
            },
            4,
        );
        let y = half.apply(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
        let want = [
            1. * c0 - 3. * s0,
            2. * c1 - 4. * s1,
            1. * s0 + 3. * c0,
            2. * s1 + 4. * c1,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        Ok(())
    }
}
