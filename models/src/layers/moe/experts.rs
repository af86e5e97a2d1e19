//! Routed experts in one canonical stacked layout, whatever the checkpoint stores:
//! `gate_up: [E, 2I, H]` (gate rows first, then up) and `down: [E, H, I]`.
//!
//! Owns expert weights and the expert computation only; it does not carry the gate (routing
//! lives in `router`). Experts that receive no tokens cost nothing. Under expert and tensor
//! parallelism a rank holds a contiguous range of experts, each cut to a range of its
//! intermediate rows (gate and up rows, down columns).

use std::ops::Range;

use candle_core::Tensor;
use moe_kernels::dense::Weight;
use moe_kernels::moe::{grouped_expert_mlp, permute_by_expert, ExpertWeights};

use super::router::Routing;
use crate::config::ExpertProjNames;
use crate::error::Result;
use crate::loader::Weights;

#[derive(Debug, Clone)]
pub struct Experts {
    /// `[E, 2I, H]`, plain or quantized (this rank's experts and intermediate rows).
    pub gate_up: Weight,
    /// `[E, H, I]`, plain or quantized.
    pub down: Weight,
    /// Experts held here; routing ids given to [`Experts::forward`] index them from 0.
    pub num_experts: usize,
    pub intermediate: usize,
}

/// Which part of a layer's routed experts a rank holds.
#[derive(Debug, Clone)]
pub struct ExpertPart {
    pub experts: Range<usize>,
    /// Intermediate rows of each expert.
    pub rows: Range<usize>,
}

impl Experts {
    /// Loads `{prefix}.experts`: either per-expert `{prefix}.experts.{e}.{gate,up,down}.weight`
    /// under the family's projection names (the Hub's layout) or fused
    /// `{prefix}.experts.gate_up_proj` / `down_proj` (`[E,2I,H]`, `[E,H,I]`, the in-memory
    /// layout of transformers 5). Quantized per-expert projections are read straight into
    /// one packed stack. Reads only `part` of the `num_experts` experts of width
    /// `intermediate`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
        names: ExpertProjNames,
        part: &ExpertPart,
    ) -> Result<Self> {
        let fused = format!("{prefix}.experts.gate_up_proj");
        let (experts, rows) = (part.experts.clone(), part.rows.clone());
        let (gate_up, down) = if w.contains(&fused) {
            let shape = [num_experts, 2 * intermediate, hidden];
            let up_rows = intermediate + rows.start..intermediate + rows.end;
            let gate = w.get_part(&fused, &shape, &[experts.clone(), rows.clone(), 0..hidden])?;
            let up = w.get_part(&fused, &shape, &[experts.clone(), up_rows, 0..hidden])?;
            (
                Weight::Dense(Tensor::cat(&[gate, up], 1)?),
                Weight::Dense(w.get_part(
                    &format!("{prefix}.experts.down_proj"),
                    &[num_experts, hidden, intermediate],
                    &[experts, 0..hidden, rows],
                )?),
            )
        } else {
            let expert = |e: usize, name: &str| format!("{prefix}.experts.{e}.{name}");
            let gate_up: Vec<Vec<String>> = experts
                .clone()
                .map(|e| vec![expert(e, names.gate), expert(e, names.up)])
                .collect();
            let down: Vec<Vec<String>> = experts.clone().map(|e| vec![expert(e, names.down)]).collect();
            (
                w.stacked_part(
                    &gate_up,
                    &[intermediate, intermediate],
                    hidden,
                    &[rows.clone(), rows.clone()],
                    0..hidden,
                )?,
                w.stacked_part(
                    &down,
                    &[hidden],
                    intermediate,
                    std::slice::from_ref(&(0..hidden)),
                    rows.clone(),
                )?,
            )
        };
        // The bulk of a MoE model's bytes, streamed every step: on huge pages where allowed.
        moe_kernels::dense::pages::prefer_huge_pages(&gate_up);
        moe_kernels::dense::pages::prefer_huge_pages(&down);
        Ok(Experts {
            gate_up,
            down,
            num_experts: part.experts.len(),
            intermediate: part.rows.len(),
        })
    }

    /// `x`: `[tokens, H]`; returns `Σ_j weight_j · expert_{id_j}(x)` per token, `[tokens, H]`,
    /// through the shared grouped reference (`moe_kernels::moe::grouped_expert_mlp`).
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let k = routing.top_k;
        routing.check(x.dims2()?.0, self.num_experts)?;
        // One row per slot: the host path has no GEMM tile to pad to.
        let perm = permute_by_expert(&routing.expert_ids, self.num_experts, 1);
        let weights = ExpertWeights {
            gate_up: &self.gate_up,
            down: &self.down,
        };
        Ok(grouped_expert_mlp(x, weights, &perm, &routing.weights, k)?)
    }
}
