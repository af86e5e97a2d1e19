//! Routed experts in one canonical stacked layout, whatever the checkpoint stores:
//! `gate_up: [E, 2I, H]` (gate rows first, then up) and `down: [E, H, I]`.
//!
//! Owns expert weights and the expert computation only; it does not carry the gate (routing
//! lives in `router`). Experts that receive no tokens cost nothing.

use candle_core::Tensor;
use moe_kernels::dense::Weight;
use moe_kernels::moe::{grouped_expert_mlp, permute_by_expert, ExpertWeights};

use super::router::Routing;
use crate::config::ExpertProjNames;
use crate::error::{ModelError, Result};
use crate::loader::Weights;

#[derive(Debug, Clone)]
pub struct Experts {
    /// `[E, 2I, H]`, plain or quantized.
    pub gate_up: Weight,
    /// `[E, H, I]`, plain or quantized.
    pub down: Weight,
    pub num_experts: usize,
    pub intermediate: usize,
}

impl Experts {
    /// Loads `{prefix}.experts`: either per-expert `{prefix}.experts.{e}.{gate,up,down}.weight`
    /// under the family's projection names (the Hub's layout) or fused
    /// `{prefix}.experts.gate_up_proj` / `down_proj` (`[E,2I,H]`, `[E,H,I]`, the in-memory
    /// layout of transformers 5). Quantized per-expert projections are read straight into
    /// one packed stack.
    pub fn load(
        w: &Weights,
        prefix: &str,
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
        names: ExpertProjNames,
    ) -> Result<Self> {
        let fused = format!("{prefix}.experts.gate_up_proj");
        let (gate_up, down) = if w.contains(&fused) {
            (
                Weight::Dense(w.get(&fused, &[num_experts, 2 * intermediate, hidden])?),
                Weight::Dense(w.get(
                    &format!("{prefix}.experts.down_proj"),
                    &[num_experts, hidden, intermediate],
                )?),
            )
        } else {
            let expert = |e: usize, name: &str| format!("{prefix}.experts.{e}.{name}");
            let gate_up: Vec<Vec<String>> = (0..num_experts)
                .map(|e| vec![expert(e, names.gate), expert(e, names.up)])
                .collect();
            let down: Vec<Vec<String>> = (0..num_experts).map(|e| vec![expert(e, names.down)]).collect();
            (
                w.stacked(&gate_up, &[intermediate, intermediate], hidden)?,
                w.stacked(&down, &[hidden], intermediate)?,
            )
        };
        Ok(Experts {
            gate_up,
            down,
            num_experts,
            intermediate,
        })
    }

    /// `x`: `[tokens, H]`; returns `Σ_j weight_j · expert_{id_j}(x)` per token, `[tokens, H]`,
    /// through the shared grouped reference (`moe_kernels::moe::grouped_expert_mlp`).
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let tokens = x.dims2()?.0;
        let k = routing.top_k;
        if routing.expert_ids.len() != tokens * k || routing.weights.len() != tokens * k {
            return Err(ModelError::Input(format!(
                "routing covers {} slots, expected {}",
                routing.expert_ids.len(),
                tokens * k
            )));
        }
        if let Some(&e) = routing.expert_ids.iter().find(|&&e| e as usize >= self.num_experts) {
            return Err(ModelError::Input(format!(
                "router chose expert {e} of {}",
                self.num_experts
            )));
        }
        // One row per slot: the host path has no GEMM tile to pad to.
        let perm = permute_by_expert(&routing.expert_ids, self.num_experts, 1);
        let weights = ExpertWeights {
            gate_up: &self.gate_up,
            down: &self.down,
        };
        Ok(grouped_expert_mlp(x, weights, &perm, &routing.weights, k)?)
    }
}
