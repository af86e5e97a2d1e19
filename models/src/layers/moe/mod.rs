//! The mixture-of-experts feed-forward block: router -> routed experts -> combine, plus the
//! always-on shared experts. One implementation for every MoE family.

pub mod experts;
pub mod router;

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::mlp::Mlp;
use crate::config::{Architecture, ModelConfig};
use crate::deepseek::LoadOptions;
use crate::error::Result;
use crate::forward::RoutingTrace;
use crate::loader::Weights;
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
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    reference_experts: bool,
}

impl MoeBlock {
    /// Loads `model.layers.{layer}.mlp.*`; `options.router` overrides the checkpoint's routing.
    pub fn load(w: &Weights, layer: usize, cfg: &ModelConfig, options: &LoadOptions) -> Result<Self> {
        let moe = cfg
            .moe
            .as_ref()
            .ok_or_else(|| crate::error::ModelError::Input("MoE layer requested for a dense config".into()))?;
        let prefix = format!("model.layers.{layer}.mlp");
        let e = moe.n_routed_experts;
        let gate = w.get_as(&format!("{prefix}.gate.weight"), &[e, cfg.hidden_size], DType::F32)?;
        let bias_name = format!("{prefix}.gate.e_score_correction_bias");
        let correction_bias = if w.contains(&bias_name) {
            let bias = w.get_as(&bias_name, &[e], DType::F32)?;
            Some((bias.to_vec1::<f32>()?, bias))
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
            router: build_router(moe, cfg.architecture, options.router.as_ref())?,
            experts: Experts::load(w, &prefix, e, cfg.hidden_size, moe.moe_intermediate_size)?,
            shared,
            reference_experts: options.reference_experts,
        })
    }

    pub fn router(&self) -> &Arc<dyn Router> {
        &self.router
    }

    /// `x`: `[tokens, H]` (normed) -> `[tokens, H]`.
    pub fn forward(&self, x: &Tensor, trace: Option<&RoutingTrace>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(out) = self.forward_on_device(x, trace)? {
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

    /// The GPU path: routing kernel, permutation, grouped GEMMs and combine, with no host
    /// round trip (unless `trace` asks for the expert ids). `None` when it does not apply: not
    /// on a CUDA device, not bf16, a router without kernel parameters (routed on the host),
    /// or shapes beyond the kernels' limits.
    #[cfg(feature = "cuda")]
    fn forward_on_device(&self, x: &Tensor, trace: Option<&RoutingTrace>) -> Result<Option<Tensor>> {
        use moe_kernels::cuda;
        let (num_experts, _, hidden) = self.experts.gate_up.dims3()?;
        let usable = !self.reference_experts
            && x.device().is_cuda()
            && x.dtype() == DType::BF16
            && self.experts.gate_up.dtype() == DType::BF16
            && hidden.is_multiple_of(8)
            && self.experts.intermediate.is_multiple_of(8);
        let Some(params) = self
            .router
            .kernel_params()
            .filter(|p| usable && cuda::routing_supported(p, num_experts))
        else {
            return Ok(None);
        };
        let x = x.contiguous()?;
        let logits = x.to_dtype(DType::F32)?.matmul(&self.gate.t()?)?.contiguous()?; // [T, E]
        let bias = self.correction_bias.as_ref().map(|(_, device)| device);
        let (ids, weights) = cuda::moe_route(&logits, bias, &params)?;
        if let Some(t) = trace {
            t.record(self.layer, &ids.flatten_all()?.to_vec1::<u32>()?);
        }
        let shared = match &self.shared {
            Some(s) => Some(s.forward(&x)?.contiguous()?),
            None => None,
        };
        let (gate_up, down) = (&self.experts.gate_up, &self.experts.down);
        Ok(Some(cuda::moe_experts(
            &x,
            gate_up,
            down,
            &ids,
            &weights,
            shared.as_ref(),
        )?))
    }
}
