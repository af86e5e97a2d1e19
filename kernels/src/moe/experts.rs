//! The grouped expert MLP: on the CPU through [`super::host_experts`], elsewhere in candle
//! ops. For every expert with slots,
//! `y = (silu(x W_gate^T) * (x W_up^T)) W_down^T` on its tokens, each slot's output scaled by
//! its routing weight, then the `top_k` slots of a token summed in slot order. Summing per
//! token in a fixed order (rather than scatter-adding) makes the result independent of how the
//! batch is composed, and it is the order the CUDA combine kernel uses.

use candle_core::{bail, DType, Result, Tensor, D};

use super::host_experts::host_expert_mlp;
use super::permute::ExpertPermutation;
use crate::dense::Weight;

/// Stacked expert weights in the canonical layout, plain or quantized.
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// `[E, 2I, H]`: the gate projection's `I` rows, then the up projection's.
    pub gate_up: &'a Weight,
    /// `[E, H, I]`.
    pub down: &'a Weight,
}

/// `x`: `[T, H]`; `perm`: the grouping of the `T * top_k` slots; `slot_weights`: `[T * top_k]`
/// routing weights. Returns `[T, H]` in `x`'s dtype (weighting and the sum over slots in f32).
/// Slots that own no row (out-of-range ids) contribute nothing.
pub fn grouped_expert_mlp(
    x: &Tensor,
    w: ExpertWeights<'_>,
    perm: &ExpertPermutation,
    slot_weights: &[f32],
    top_k: usize,
) -> Result<Tensor> {
    let (tokens, hidden) = x.dims2()?;
    let &[num_experts, two_i, h2] = w.gate_up.dims() else {
        bail!("grouped_expert_mlp: gate_up {:?} is not a stack", w.gate_up.dims());
    };
    let intermediate = two_i / 2;
    if h2 != hidden || w.down.dims() != [num_experts, hidden, intermediate] || perm.counts.len() != num_experts {
        bail!(
            "grouped_expert_mlp: x {:?}, gate_up {:?}, down {:?}, {} experts routed",
            x.shape(),
            w.gate_up.dims(),
            w.down.dims(),
            perm.counts.len()
        );
    }
    let slots = tokens * top_k;
    if slot_weights.len() != slots {
        bail!("grouped_expert_mlp: {} weights for {slots} slots", slot_weights.len());
    }
    let device = x.device();
    if device.is_cpu() {
        let xs = crate::dense::host_f32(x)?;
        let out = w.gate_up.with_rows(|gate_up| {
            w.down
                .with_rows(|down| host_expert_mlp(&xs, hidden, intermediate, perm, slot_weights, top_k, gate_up, down))
        })??;
        return Tensor::from_vec(out, (tokens, hidden), device)?.to_dtype(x.dtype());
    }
    candle_expert_mlp(x, w, perm, slot_weights, top_k, intermediate)
}

/// [`grouped_expert_mlp`] in candle ops, one expert at a time (devices without a host path).
fn candle_expert_mlp(
    x: &Tensor,
    w: ExpertWeights<'_>,
    perm: &ExpertPermutation,
    slot_weights: &[f32],
    top_k: usize,
    intermediate: usize,
) -> Result<Tensor> {
    let (tokens, hidden) = x.dims2()?;
    let num_experts = perm.counts.len();
    let slots = tokens * top_k;
    let device = x.device();
    let mut outputs = Vec::new();
    let mut row_of_slot = vec![u32::MAX; slots];
    let mut next_row = 0u32;
    for e in 0..num_experts {
        let (start, count) = (perm.offsets[e] as usize, perm.counts[e] as usize);
        if count == 0 {
            continue;
        }
        let expert_slots = &perm.sorted_slots[start..start + count];
        let token_ids: Vec<u32> = expert_slots.iter().map(|&s| s / top_k as u32).collect();
        let idx = Tensor::from_vec(token_ids, count, device)?;
        let xs = x.index_select(&idx, 0)?; // [n, H]
        let gu = w.gate_up.get(e)?.matmul_nt(&xs)?; // [n, 2I]
        let gate = gu.narrow(D::Minus1, 0, intermediate)?;
        let up = gu.narrow(D::Minus1, intermediate, intermediate)?;
        let h = (gate.silu()? * up)?;
        let y = w.down.get(e)?.matmul_nt(&h)?.to_dtype(DType::F32)?; // [n, H]
        let wt: Vec<f32> = expert_slots.iter().map(|&s| slot_weights[s as usize]).collect();
        outputs.push(y.broadcast_mul(&Tensor::from_vec(wt, (count, 1), device)?)?);
        for &s in expert_slots {
            row_of_slot[s as usize] = next_row;
            next_row += 1;
        }
    }
    // One zero row for slots without an expert, then gather the rows back into slot order.
    outputs.push(Tensor::zeros((1, hidden), DType::F32, device)?);
    let rows = Tensor::cat(&outputs, 0)?;
    let order: Vec<u32> = row_of_slot.iter().map(|&r| r.min(next_row)).collect();
    let by_slot = rows.index_select(&Tensor::from_vec(order, slots, device)?, 0)?;
    by_slot.reshape((tokens, top_k, hidden))?.sum(1)?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::permute_by_expert;
    use candle_core::Device;

    /// One expert computed by hand on plain vectors: `[H]` -> `[H]`.
    fn expert_by_hand(x: &[f32], gate_up: &[f32], down: &[f32], h: usize, i: usize) -> Vec<f32> {
        let dot = |row: &[f32], v: &[f32]| row.iter().zip(v).map(|(a, b)| a * b).sum::<f32>();
        let act: Vec<f32> = (0..i)
            .map(|n| {
                let g = dot(&gate_up[n * h..(n + 1) * h], x);
                let u = dot(&gate_up[(i + n) * h..(i + n + 1) * h], x);
                g / (1.0 + (-g).exp()) * u
            })
            .collect();
        (0..h).map(|n| dot(&down[n * i..(n + 1) * i], &act)).collect()
    }

    #[test]
    fn matches_a_per_token_loop_including_idle_experts() -> Result<()> {
        let (t, h, i, e, k) = (5usize, 8usize, 6usize, 4usize, 2usize);
        let val = |n: usize, salt: usize| (((n * 7919 + salt * 104_729) % 2003) as f32 / 2003.0 - 0.5) * 0.8;
        let xv: Vec<f32> = (0..t * h).map(|n| val(n, 1)).collect();
        let guv: Vec<f32> = (0..e * 2 * i * h).map(|n| val(n, 2)).collect();
        let dv: Vec<f32> = (0..e * h * i).map(|n| val(n, 3)).collect();
        // Expert 1 gets nothing; expert 3 gets most slots.
        let ids = [3u32, 0, 3, 2, 0, 3, 3, 2, 3, 0];
        let wts: Vec<f32> = (0..t * k).map(|n| 0.1 + n as f32 * 0.05).collect();
        let dev = Device::Cpu;
        let x = Tensor::from_vec(xv.clone(), (t, h), &dev)?;
        let gate_up = Weight::Dense(Tensor::from_vec(guv.clone(), (e, 2 * i, h), &dev)?);
        let down = Weight::Dense(Tensor::from_vec(dv.clone(), (e, h, i), &dev)?);
        let perm = permute_by_expert(&ids, e, 4);
        let got = grouped_expert_mlp(
            &x,
            ExpertWeights {
                gate_up: &gate_up,
                down: &down,
            },
            &perm,
            &wts,
            k,
        )?;
        let candle = candle_expert_mlp(
            &x,
            ExpertWeights {
                gate_up: &gate_up,
                down: &down,
            },
            &perm,
            &wts,
            k,
            i,
        )?;
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        let candle = candle.flatten_all()?.to_vec1::<f32>()?;
        for (n, (a, b)) in got.iter().zip(&candle).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "host {a} vs candle {b} at {n}");
        }
        for tok in 0..t {
            let mut want = vec![0f32; h];
            for j in 0..k {
                let ex = ids[tok * k + j] as usize;
                let y = expert_by_hand(
                    &xv[tok * h..(tok + 1) * h],
                    &guv[ex * 2 * i * h..(ex + 1) * 2 * i * h],
                    &dv[ex * h * i..(ex + 1) * h * i],
                    h,
                    i,
                );
                want.iter_mut().zip(y).for_each(|(a, b)| *a += wts[tok * k + j] * b);
            }
            for (n, w) in want.iter().enumerate() {
                let g = got[tok * h + n];
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "token {tok} dim {n}: {g} vs {w}"
                );
            }
        }
        Ok(())
    }

    /// Groups larger than the skinny kernels take (GEMM tiles) and decode-sized ones, widths
    /// that are not tile multiples and ones AMX takes (multiples of 32), bf16 weights on the
    /// host against candle on the same values in f32.
    #[test]
    fn host_path_matches_candle_for_large_groups_and_bf16_weights() -> Result<()> {
        for (t, h, i) in [(128usize, 72usize, 40usize), (128, 64, 96), (5, 96, 64)] {
            let (e, k) = (3usize, 2usize);
            let dev = Device::Cpu;
            // bf16-exact activations, as a bf16 model's are.
            let x = Tensor::randn(0f32, 1.0, (t, h), &dev)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?;
            let gate_up = Tensor::randn(0f32, 0.2, (e, 2 * i, h), &dev)?.to_dtype(DType::BF16)?;
            let down = Tensor::randn(0f32, 0.2, (e, h, i), &dev)?.to_dtype(DType::BF16)?;
            let ids: Vec<u32> = (0..t * k).map(|s| ((s * 7 + s / 5) % e) as u32).collect();
            let wts: Vec<f32> = (0..t * k).map(|s| 0.2 + (s % 7) as f32 * 0.1).collect();
            let perm = permute_by_expert(&ids, e, 1);
            let large = perm.counts.iter().all(|&c| c as usize > crate::dense::SKINNY_ROWS);
            assert_eq!(large, t > 64, "{t} tokens: group sizes {:?}", perm.counts);
            let (gu_half, d_half) = (Weight::Dense(gate_up.clone()), Weight::Dense(down.clone()));
            let host = grouped_expert_mlp(
                &x,
                ExpertWeights {
                    gate_up: &gu_half,
                    down: &d_half,
                },
                &perm,
                &wts,
                k,
            )?;
            let (gu32, d32) = (
                Weight::Dense(gate_up.to_dtype(DType::F32)?),
                Weight::Dense(down.to_dtype(DType::F32)?),
            );
            let want = candle_expert_mlp(
                &x,
                ExpertWeights {
                    gate_up: &gu32,
                    down: &d32,
                },
                &perm,
                &wts,
                k,
                i,
            )?;
            let err = crate::test_values::max_abs_diff(&host, &want);
            let scale = crate::test_values::max_abs(&want);
            // On AMX the down projection's input (the f32 activation) is rounded to bf16
            // once; otherwise both sides are f32 products summed in another order.
            let tol = if crate::dense::amx::applies(i) {
                scale * 2f32.powi(-7)
            } else {
                1e-5 * scale.max(1.0) * h as f32
            };
            assert!(err <= tol, "{t}x{h}x{i}: err {err} at scale {scale}");
        }
        Ok(())
    }
}
