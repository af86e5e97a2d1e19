//! Routed experts in one canonical stacked layout, whatever the checkpoint stores:
//! `gate_up: [E, 2I, H]` (gate rows first, then up) and `down: [E, H, I]`.
//!
//! Owns expert weights and the expert computation only; it does not carry the gate (routing
//! lives in `router`). Experts that receive no tokens cost nothing.

use candle_core::{Tensor, D};

use super::router::Routing;
use crate::error::{ModelError, Result};
use crate::loader::Weights;

#[derive(Debug, Clone)]
pub struct Experts {
    /// `[E, 2I, H]`.
    pub gate_up: Tensor,
    /// `[E, H, I]`.
    pub down: Tensor,
    pub num_experts: usize,
    pub intermediate: usize,
}

impl Experts {
    /// Loads `{prefix}.experts`: either per-expert `{prefix}.experts.{e}.{gate,up,down}_proj.weight`
    /// (the Hub's layout) or fused `{prefix}.experts.gate_up_proj` / `down_proj` (`[E,2I,H]`,
    /// `[E,H,I]`, the in-memory layout of transformers 5).
    pub fn load(w: &Weights, prefix: &str, num_experts: usize, hidden: usize, intermediate: usize) -> Result<Self> {
        let fused = format!("{prefix}.experts.gate_up_proj");
        let (gate_up, down) = if w.contains(&fused) {
            (
                w.get(&fused, &[num_experts, 2 * intermediate, hidden])?,
                w.get(
                    &format!("{prefix}.experts.down_proj"),
                    &[num_experts, hidden, intermediate],
                )?,
            )
        } else {
            let mut gate_up = Vec::with_capacity(num_experts);
            let mut down = Vec::with_capacity(num_experts);
            for e in 0..num_experts {
                let p = format!("{prefix}.experts.{e}");
                let gate = w.get(&format!("{p}.gate_proj.weight"), &[intermediate, hidden])?;
                let up = w.get(&format!("{p}.up_proj.weight"), &[intermediate, hidden])?;
                gate_up.push(Tensor::cat(&[gate, up], 0)?);
                down.push(w.get(&format!("{p}.down_proj.weight"), &[hidden, intermediate])?);
            }
            (Tensor::stack(&gate_up, 0)?, Tensor::stack(&down, 0)?)
        };
        Ok(Experts {
            gate_up,
            down,
            num_experts,
            intermediate,
        })
    }

    /// `x`: `[tokens, H]`; returns `Σ_j weight_j · expert_{id_j}(x)` per token, `[tokens, H]`.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let k = routing.top_k;
        if routing.expert_ids.len() != tokens * k {
            return Err(ModelError::Input(format!(
                "routing covers {} slots, expected {}",
                routing.expert_ids.len(),
                tokens * k
            )));
        }
        // Group (token, weight) pairs by expert on the host.
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.num_experts];
        for (slot, (&e, &wt)) in routing.expert_ids.iter().zip(&routing.weights).enumerate() {
            let e = e as usize;
            if e >= self.num_experts {
                return Err(ModelError::Input(format!(
                    "router chose expert {e} of {}",
                    self.num_experts
                )));
            }
            per_expert[e].0.push((slot / k) as u32);
            per_expert[e].1.push(wt);
        }
        let device = x.device();
        let mut rows = Vec::new();
        let mut outputs = Vec::new();
        for (e, (token_ids, weights)) in per_expert.into_iter().enumerate() {
            if token_ids.is_empty() {
                continue;
            }
            let n = token_ids.len();
            let idx = Tensor::from_vec(token_ids.clone(), n, device)?;
            let xs = x.index_select(&idx, 0)?; // [n, H]
            let gu = xs.matmul(&self.gate_up.get(e)?.t()?)?; // [n, 2I]
            let gate = gu.narrow(D::Minus1, 0, self.intermediate)?;
            let up = gu.narrow(D::Minus1, self.intermediate, self.intermediate)?;
            let h = (candle_nn::ops::silu(&gate)? * up)?;
            let y = h.matmul(&self.down.get(e)?.t()?)?; // [n, H]
            let wt = Tensor::from_vec(weights, (n, 1), device)?.to_dtype(y.dtype())?;
            outputs.push(y.broadcast_mul(&wt)?);
            rows.extend(token_ids);
        }
        let out = Tensor::zeros((tokens, hidden), x.dtype(), device)?;
        if outputs.is_empty() {
            return Ok(out);
        }
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, device)?;
        Ok(out.index_add(&rows, &Tensor::cat(&outputs, 0)?, 0)?)
    }
}
