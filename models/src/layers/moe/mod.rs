//! The mixture-of-experts feed-forward block: router -> routed experts -> combine, plus the
//! always-on shared experts. One implementation for every MoE family.
//!
//! Split over ranks it runs one of two ways. With every rank holding a slice of every expert
//! (tensor parallelism, one expert group), each rank computes its slices' outputs for all
//! tokens and the ranks sum them with the shared experts' partial outputs (one all-reduce).
//! With the experts partitioned into groups (expert parallelism), each rank takes its share
//! of the tokens and sends each token to the ranks holding its experts, which send the
//! outputs back ([`dispatch`]: two all-to-alls, a reduce-scatter of the shared experts and an
//! all-gather).

mod dispatch;
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
use crate::parallel::Shard;
use experts::{ExpertPart, Experts};
use router::{build_router, Router, RouterInput, Routing};

#[derive(Debug, Clone)]
pub struct MoeBlock {
    layer: usize,
    /// Gate `[E, H]`, kept in f32: routing decisions are made in f32.
    gate: Tensor,
    /// `[E]` f32 `e_score_correction_bias`, when present: on the host for the host routers and
    /// on the model's device for the routing kernel.
    correction_bias: Option<(Vec<f32>, Tensor)>,
    router: Arc<dyn Router>,
    /// This rank's experts (all of them on one rank).
    experts: Experts,
    /// Routed experts in the whole layer.
    num_experts: usize,
    shared: Option<Mlp>,
    /// Keep to the reference path even where the GPU kernels apply (`--expert-backend`).
    reference_experts: bool,
    shard: Shard,
}

impl MoeBlock {
    /// Loads the MoE block of decoder layer `layer` (`layer_prefix` = `model.layers.{layer}`)
    /// under the family's names in `moe.names`; `options.router` overrides the checkpoint's
    /// routing, `options.shard` says which experts and slices this rank holds. `mlp_bias`:
    /// the shared experts' MLP has biases.
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
        let shard = &options.shard;
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
                shard,
            )?)
        } else {
            None
        };
        let part = ExpertPart {
            experts: shard.experts(e)?,
            rows: shard.expert_slice(moe.moe_intermediate_size, "moe_intermediate_size")?,
        };
        Ok(MoeBlock {
            layer,
            gate,
            correction_bias,
            router: build_router(moe, options.router.as_ref())?,
            experts: Experts::load(w, &prefix, e, hidden, moe.moe_intermediate_size, names.experts, &part)?,
            num_experts: e,
            shared,
            reference_experts: options.reference_experts,
            shard: shard.clone(),
        })
    }

    pub fn router(&self) -> &Arc<dyn Router> {
        &self.router
    }

    /// `x`: `[tokens, H]` (normed) -> `[tokens, H]`. Takes the grouped device path
    /// (routing kernel, permutation, grouped GEMMs, combine; `moe_kernels::moe::grouped_moe`)
    /// where it applies: a built-in router, bf16 on CUDA, shapes within the kernels' limits,
    /// the experts not partitioned, and not `--expert-backend reference`. Otherwise routes
    /// on the host and runs the reference experts (dispatched to their ranks when
    /// partitioned).
    pub fn forward(&self, x: &Tensor, trace: Option<&RoutingTrace>) -> Result<Tensor> {
        if self.shard.layout().expert_parallel() > 1 {
            let routing = self.route(x, trace)?;
            return self.forward_dispatched(x, &routing);
        }
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
                Some(s) => Some(s.partial(x)?.contiguous()?),
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
            return self.sum_over_ranks(&out);
        }
        let routing = self.route(x, trace)?;
        let routed = self.experts.forward(x, &routing)?;
        match &self.shared {
            Some(s) => self.sum_over_ranks(&(routed + s.partial(x)?)?),
            None => self.sum_over_ranks(&routed),
        }
    }

    /// This rank's routed-plus-shared partial output summed over the ranks (the shared
    /// experts' bias added once).
    fn sum_over_ranks(&self, partial: &Tensor) -> Result<Tensor> {
        match &self.shared {
            Some(s) => s.reduce(partial),
            None => self.shard.all_reduce(partial),
        }
    }

    /// Routes every token on the host (every rank alike), recording the choices in `trace`.
    fn route(&self, x: &Tensor, trace: Option<&RoutingTrace>) -> Result<Routing> {
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
        Ok(routing)
    }
}
