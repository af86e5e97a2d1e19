//! The mixture-of-experts feed-forward block: router -> routed experts -> combine, plus the
//! always-on shared experts. One implementation for every MoE family.

pub mod experts;
pub mod router;

use std::sync::Arc;

use candle_core::{DType, Tensor};
use moe_kernels::moe::{grouped_moe, grouped_moe_applies, GroupedMoe};

use super::mlp::Mlp;
use crate::config::MoeConfig;
use crate::error::Result;
use crate::forward::RoutingTrace;
use crate::loader::Weights;
use crate::model::LoadOptions;
use experts::Experts;
use router::{build_router, Router, RouterInput};

#[derive(Debug, Clone)]
pub struct MoeBlock {
    layer: usize,
    /// Gate `[E, H]`, kept in f32: routing decisions are made in f32.
    gate: Tensor,
    /// `[E]` f32 `e_score_correction_bias`, when present: on the host for the host routers and
    /// on the model's device for the routing kernel.
    correction_bias: Option<(Vec<f32>, Tensor)>,
    router: Arc<dyn Router>,
    experts: Experts,
    shared: Option<Mlp>,
    /// Keep to the reference path even where the GPU kernels apply (`--expert-backend`).
    reference_experts: bool,
}

impl MoeBlock {
    /// Loads the MoE block of decoder layer `layer` (`layer_prefix` = `model.layers.{layer}`)
    /// under the family's names in `moe.names`; `options.router` overrides the checkpoint's
    /// routing. `mlp_bias`: the shared experts' MLP has biases.
    pub fn load(
        w: &Weights,
        layer_prefix: &str,
        layer: usize,
        moe: &MoeConfig,
        hidden: usize,
        mlp_bias: bool,
        options: &LoadOptions,
    ) -> Result<Self> {
        let names = &moe.names;
        let prefix = format!("{layer_prefix}.{}", names.block);
        let e = moe.n_routed_experts;
        let gate = w.get_as(&format!("{prefix}.gate.weight"), &[e, hidden], DType::F32)?;
        let correction_bias = match names.correction_bias.map(|b| format!("{prefix}.{b}")) {
            Some(name) if w.contains(&name) => {
                let bias = w.get_as(&name, &[e], DType::F32)?;
                Some((bias.to_vec1::<f32>()?, bias))
            }
            Some(name) => {
                if names.warn_missing_bias {
                    // transformers initialises a missing bias buffer to zeros; legal, but
                    // rarely intended.
                    tracing::warn!("{name} is missing; routing without a correction bias");
                }
                None
            }
            None => None,
        };
        let shared = if moe.n_shared_experts > 0 {
            Some(Mlp::load(
                w,
                &format!("{prefix}.{}", names.shared_experts),
                hidden,
                moe.moe_intermediate_size * moe.n_shared_experts,
                mlp_bias,
            )?)
        } else {
            None
        };
        Ok(MoeBlock {
            layer,
            gate,
            correction_bias,
            router: build_router(moe, options.router.as_ref())?,
            experts: Experts::load(w, &prefix, e, hidden, moe.moe_intermediate_size, names.experts)?,
            shared,
            reference_experts: options.reference_experts,
        })
    }

    pub fn router(&self) -> &Arc<dyn Router> {
        &self.router
    }

    /// `x`: `[tokens, H]` (normed) -> `[tokens, H]`. Takes the grouped device path
    /// (routing kernel, permutation, grouped GEMMs, combine; `moe_kernels::moe::grouped_moe`)
    /// where it applies: a built-in router, bf16 on CUDA, shapes within the kernels' limits,
    /// and not `--expert-backend reference`. Otherwise routes on the host and runs the
    /// reference experts.
    pub fn forward(&self, x: &Tensor, trace: Option<&RoutingTrace>) -> Result<Tensor> {
        let device_routing = self
            .router
            .kernel_params()
            .filter(|_| !self.reference_experts)
            .and_then(|p| {
                let (gate_up, down) = (self.experts.gate_up.as_dense()?, self.experts.down.as_dense()?);
                grouped_moe_applies(x, gate_up, &p).then_some((p, gate_up, down))
            });
        if let Some((routing, gate_up, down)) = device_routing {
            let shared = match &self.shared {
                Some(s) => Some(s.forward(x)?.contiguous()?),
                None => None,
            };
            let inputs = GroupedMoe {
                x,
                gate: &self.gate,
                correction_bias: self.correction_bias.as_ref().map(|(_, device)| device),
                routing: &routing,
                gate_up,
                down,
            };
            let (out, ids) = grouped_moe(&inputs, shared.as_ref())?;
            // The only host copy: the expert ids, when someone asks for them.
            if let Some(t) = trace {
                t.record(self.layer, &ids.flatten_all()?.to_vec1::<u32>()?);
            }
            return Ok(out);
        }
        let logits = x.to_dtype(DType::F32)?.matmul(&self.gate.t()?)?; // [T, E]
        let num_experts = logits.dims2()?.1;
        let host = logits.flatten_all()?.to_vec1::<f32>()?;
        let routing = self.router.route(&RouterInput {
            logits: &host,
            num_experts,
            correction_bias: self.correction_bias.as_ref().map(|(host, _)| host.as_slice()),
        });
        if let Some(t) = trace {
            t.record(self.layer, &routing.expert_ids);
        }
        let routed = self.experts.forward(x, &routing)?;
        match &self.shared {
            Some(s) => Ok((routed + s.forward(x)?)?),
            None => Ok(routed),
        }
    }
}
