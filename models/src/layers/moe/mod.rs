//! The mixture-of-experts feed-forward block: router -> routed experts -> combine, plus the
//! always-on shared experts. One implementation for every MoE family.

pub mod experts;
pub mod router;

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::mlp::Mlp;
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;
use crate::forward::RoutingTrace;
use crate::loader::Weights;
use experts::Experts;
use router::{build_router, Router, RouterInput, RouterSpec};

#[derive(Debug, Clone)]
pub struct MoeBlock {
    layer: usize,
    /// Gate `[E, H]`, kept in f32: routing decisions are made in f32.
    gate: Tensor,
    /// `[E]` f32 `e_score_correction_bias`, when present.
    correction_bias: Option<Vec<f32>>,
    router: Arc<dyn Router>,
    experts: Experts,
    shared: Option<Mlp>,
}

impl MoeBlock {
    /// Loads `model.layers.{layer}.mlp.*`; `router` overrides the checkpoint's routing.
    pub fn load(w: &Weights, layer: usize, cfg: &ModelConfig, router: Option<&RouterSpec>) -> Result<Self> {
        let moe = cfg
            .moe
            .as_ref()
            .ok_or_else(|| crate::error::ModelError::Input("MoE layer requested for a dense config".into()))?;
        let prefix = format!("model.layers.{layer}.mlp");
        let e = moe.n_routed_experts;
        let gate = w.get_as(&format!("{prefix}.gate.weight"), &[e, cfg.hidden_size], DType::F32)?;
        let bias_name = format!("{prefix}.gate.e_score_correction_bias");
        let correction_bias = if w.contains(&bias_name) {
            Some(w.get_as(&bias_name, &[e], DType::F32)?.to_vec1::<f32>()?)
        } else if cfg.architecture == Architecture::DeepseekV3 && moe.topk_method == crate::config::TopkMethod::NoauxTc
        {
            // transformers initialises a missing bias buffer to zeros; a V3 checkpoint without
            // one is therefore legal, but we say so.
            tracing::warn!("{bias_name} is missing; routing without a correction bias");
            None
        } else {
            None
        };
        let shared = if moe.n_shared_experts > 0 {
            Some(Mlp::load(
                w,
                &format!("{prefix}.shared_experts"),
                cfg.hidden_size,
                moe.moe_intermediate_size * moe.n_shared_experts,
                cfg.mlp_bias,
            )?)
        } else {
            None
        };
        Ok(MoeBlock {
            layer,
            gate,
            correction_bias,
            router: build_router(moe, cfg.architecture, router)?,
            experts: Experts::load(w, &prefix, e, cfg.hidden_size, moe.moe_intermediate_size)?,
            shared,
        })
    }

    pub fn router(&self) -> &Arc<dyn Router> {
        &self.router
    }

    /// `x`: `[tokens, H]` (normed) -> `[tokens, H]`.
    pub fn forward(&self, x: &Tensor, trace: Option<&RoutingTrace>) -> Result<Tensor> {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.gate.t()?)?; // [T, E]
        let num_experts = logits.dims2()?.1;
        let host = logits.flatten_all()?.to_vec1::<f32>()?;
        let routing = self.router.route(&RouterInput {
            logits: &host,
            num_experts,
            correction_bias: self.correction_bias.as_deref(),
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
