//! Expert routing: router logits -> (expert ids, weights) per token, behind the [`Router`]
//! trait so researchers can swap the strategy from the command line (`--router`).
//!
//! Owns the three built-in strategies (their math is `moe_kernels::moe::route`, shared with the
//! CUDA routing kernel) and the `--router` spec parser/registry. It computes
//! on host `f32` slices: the gate always runs in f32 (as transformers does for DeepSeek and
//! GLM; for Qwen3, Mixtral and MiniMax it computes the gate in the model dtype, which differs
//! only at bf16 near-ties). It never touches expert weights.

use std::fmt::Debug;
use std::sync::Arc;

use moe_kernels::moe::{route, RoutingMethod, RoutingParams, Scoring};

use crate::config::{MoeConfig, ScoringFunc};
use crate::error::{ModelError, Result};

/// One MoE layer's routing inputs for a batch of tokens.
pub struct RouterInput<'a> {
    /// Row-major `[tokens, num_experts]` gate logits `x · W_gateᵀ` in f32.
    pub logits: &'a [f32],
    pub num_experts: usize,
    /// `[num_experts]` `e_score_correction_bias`, when the checkpoint has one.
    pub correction_bias: Option<&'a [f32]>,
}

impl RouterInput<'_> {
    pub fn num_tokens(&self) -> usize {
        self.logits.len() / self.num_experts
    }
}

/// Chosen experts per token.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// Row-major `[tokens, top_k]`.
    pub expert_ids: Vec<u32>,
    /// Row-major `[tokens, top_k]`: the factor each chosen expert's output is multiplied by.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Checks that this routing covers `tokens` tokens and names only experts below
    /// `num_experts` (a custom router could break either).
    pub fn check(&self, tokens: usize, num_experts: usize) -> Result<()> {
        let slots = tokens * self.top_k;
        if self.expert_ids.len() != slots || self.weights.len() != slots {
            return Err(ModelError::Input(format!(
                "routing covers {} slots, expected {slots}",
                self.expert_ids.len()
            )));
        }
        if let Some(&e) = self.expert_ids.iter().find(|&&e| e as usize >= num_experts) {
            return Err(ModelError::Input(format!("router chose expert {e} of {num_experts}")));
        }
        Ok(())
    }
}

/// A routing strategy. Implementations must be deterministic for a given input.
pub trait Router: Send + Sync + Debug {
    /// A one-line description (shown by `moe inspect` and in logs).
    fn describe(&self) -> String;
    /// Experts chosen per token.
    fn top_k(&self) -> usize;
    fn route(&self, input: &RouterInput<'_>) -> Routing;
    /// For routers that are an instance of the shared routing function: its parameters, so
    /// the GPU path can route in one kernel without a host round trip. Other routers keep
    /// the default `None` and are routed on the host through [`Router::route`].
    fn kernel_params(&self) -> Option<RoutingParams> {
        None
    }
}

/// Knobs shared by the built-in strategies; parsed from config.json and overridable by
/// `--router name:key=value,...`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterParams {
    pub top_k: usize,
    pub scoring: ScoringFunc,
    pub n_group: usize,
    pub topk_group: usize,
    /// Divide the chosen weights by their sum.
    pub normalize: bool,
    /// Multiply the chosen weights by this (DeepSeek's `routed_scaling_factor`).
    pub scale: f32,
    /// Add the checkpoint's `e_score_correction_bias` when choosing (noaux_tc).
    pub use_bias: bool,
}

impl RouterParams {
    /// These parameters in the shared routing function's terms.
    pub fn kernel_params(&self, method: RoutingMethod) -> RoutingParams {
        RoutingParams {
            method,
            top_k: self.top_k,
            scoring: match self.scoring {
                ScoringFunc::Softmax => Scoring::Softmax,
                ScoringFunc::Sigmoid => Scoring::Sigmoid,
            },
            n_group: self.n_group,
            topk_group: self.topk_group,
            normalize: self.normalize,
            scale: self.scale,
            use_bias: self.use_bias,
        }
    }
}

/// Routes with the shared function of `moe-kernels` (the CUDA routing kernel's reference).
fn route_builtin(input: &RouterInput<'_>, p: &RouterParams, method: RoutingMethod) -> Routing {
    let (expert_ids, weights) = route(
        input.logits,
        input.num_experts,
        input.correction_bias,
        &p.kernel_params(method),
    );
    Routing {
        top_k: p.top_k,
        expert_ids,
        weights,
    }
}

/// Top-k over all experts.
#[derive(Debug, Clone)]
pub struct GreedyRouter(pub RouterParams);

impl Router for GreedyRouter {
    fn describe(&self) -> String {
        describe("greedy", &self.0)
    }
    fn top_k(&self) -> usize {
        self.0.top_k
    }
    fn route(&self, input: &RouterInput<'_>) -> Routing {
        route_builtin(input, &self.0, RoutingMethod::Greedy)
    }
    fn kernel_params(&self) -> Option<RoutingParams> {
        Some(self.0.kernel_params(RoutingMethod::Greedy))
    }
}

/// DeepSeek-V2's device-limited routing: keep the groups with the highest single score.
#[derive(Debug, Clone)]
pub struct GroupLimitedGreedyRouter(pub RouterParams);

impl Router for GroupLimitedGreedyRouter {
    fn describe(&self) -> String {
        describe("group_limited_greedy", &self.0)
    }
    fn top_k(&self) -> usize {
        self.0.top_k
    }
    fn route(&self, input: &RouterInput<'_>) -> Routing {
        route_builtin(input, &self.0, RoutingMethod::GroupLimitedGreedy)
    }
    fn kernel_params(&self) -> Option<RoutingParams> {
        Some(self.0.kernel_params(RoutingMethod::GroupLimitedGreedy))
    }
}

/// DeepSeek-V3's auxiliary-loss-free routing: choose with `score + correction bias`, keeping
/// the groups whose two best biased scores sum highest; weight with the unbiased scores.
#[derive(Debug, Clone)]
pub struct NoauxTcRouter(pub RouterParams);

impl Router for NoauxTcRouter {
    fn describe(&self) -> String {
        describe("noaux_tc", &self.0)
    }
    fn top_k(&self) -> usize {
        self.0.top_k
    }
    fn route(&self, input: &RouterInput<'_>) -> Routing {
        route_builtin(input, &self.0, RoutingMethod::NoauxTc)
    }
    fn kernel_params(&self) -> Option<RoutingParams> {
        Some(self.0.kernel_params(RoutingMethod::NoauxTc))
    }
}

fn describe(name: &str, p: &RouterParams) -> String {
    let scoring = match p.scoring {
        ScoringFunc::Softmax => "softmax",
        ScoringFunc::Sigmoid => "sigmoid",
    };
    let mut s = format!(
        "{name}: top_k={} scoring={scoring} normalize={} scale={}",
        p.top_k, p.normalize, p.scale
    );
    if name != "greedy" {
        s += &format!(" n_group={} topk_group={}", p.n_group, p.topk_group);
    }
    if name == "noaux_tc" {
        s += &format!(" bias={}", p.use_bias);
    }
    s
}

/// A `--router` value: `NAME[:key=value,...]`, e.g. `greedy:top_k=4` or `noaux_tc:bias=false`.
///
/// Keys: `top_k`, `scoring` (softmax|sigmoid), `n_group`, `topk_group`, `normalize` (bool),
/// `scale` (float), `bias` (bool). Unset keys keep the checkpoint's values.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    pub name: String,
    pub overrides: Vec<(String, String)>,
}

/// Names accepted by [`build_router`]. Add a line here (and a match arm) for a new router.
pub const ROUTER_NAMES: &[&str] = &["greedy", "group_limited_greedy", "noaux_tc"];

impl std::str::FromStr for RouterSpec {
    type Err = ModelError;

    fn from_str(spec: &str) -> Result<Self> {
        let err = |message: String| ModelError::RouterSpec {
            spec: spec.to_string(),
            message,
        };
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let name = name.trim();
        if !ROUTER_NAMES.contains(&name) {
            return Err(err(format!(
                "unknown router {name:?}; available: {}",
                ROUTER_NAMES.join(", ")
            )));
        }
        let mut overrides = Vec::new();
        for item in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| err(format!("{item:?} is not key=value")))?;
            overrides.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(RouterSpec {
            name: name.to_string(),
            overrides,
        })
    }
}

impl RouterParams {
    /// The checkpoint's routing (family quirks such as DeepSeek-V2 never renormalising are
    /// already in `moe`, put there by the family's parser).
    pub fn from_config(moe: &MoeConfig) -> Self {
        RouterParams {
            top_k: moe.num_experts_per_tok,
            scoring: moe.scoring_func,
            n_group: moe.n_group,
            topk_group: moe.topk_group,
            normalize: moe.norm_topk_prob,
            scale: moe.routed_scaling_factor as f32,
            use_bias: true,
        }
    }

    fn apply(&mut self, spec: &RouterSpec, num_experts: usize) -> Result<()> {
        let err = |message: String| ModelError::RouterSpec {
            spec: format!(
                "{}:{}",
                spec.name,
                spec.overrides
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            message,
        };
        for (k, v) in &spec.overrides {
            let bad = || err(format!("bad value {v:?} for {k}"));
            match k.as_str() {
                "top_k" => self.top_k = v.parse().map_err(|_| bad())?,
                "n_group" => self.n_group = v.parse().map_err(|_| bad())?,
                "topk_group" => self.topk_group = v.parse().map_err(|_| bad())?,
                "normalize" => self.normalize = v.parse().map_err(|_| bad())?,
                "bias" => self.use_bias = v.parse().map_err(|_| bad())?,
                "scale" => {
                    self.scale = v.parse().map_err(|_| bad())?;
                    if !self.scale.is_finite() {
                        return Err(bad());
                    }
                }
                "scoring" => {
                    self.scoring = match v.as_str() {
                        "softmax" => ScoringFunc::Softmax,
                        "sigmoid" => ScoringFunc::Sigmoid,
                        _ => return Err(bad()),
                    }
                }
                other => {
                    return Err(err(format!(
                        "unknown key {other:?}; keys: top_k, scoring, n_group, topk_group, normalize, scale, bias"
                    )))
                }
            }
        }
        if self.top_k == 0 || self.top_k > num_experts {
            return Err(err(format!("top_k must be in 1..={num_experts}")));
        }
        if spec.name != "greedy" {
            if self.n_group == 0 || !num_experts.is_multiple_of(self.n_group) {
                return Err(err(format!(
                    "n_group {} must divide the {num_experts} experts",
                    self.n_group
                )));
            }
            let per_group = num_experts / self.n_group;
            if self.topk_group == 0 || self.topk_group > self.n_group || self.topk_group * per_group < self.top_k {
                return Err(err(format!(
                    "topk_group {} must be in 1..={} and keep at least top_k experts",
                    self.topk_group, self.n_group
                )));
            }
            if spec.name == "noaux_tc" && per_group < 2 {
                return Err(err("noaux_tc needs at least 2 experts per group".into()));
            }
        }
        Ok(())
    }
}

/// The router a checkpoint asks for, or the one `spec` names (its unset keys default to the
/// checkpoint's values).
pub fn build_router(moe: &MoeConfig, spec: Option<&RouterSpec>) -> Result<Arc<dyn Router>> {
    let mut params = RouterParams::from_config(moe);
    let name = match spec {
        Some(s) => {
            if s.name == "greedy" {
                params.n_group = 1;
                params.topk_group = 1;
            }
            params.apply(s, moe.n_routed_experts)?;
            s.name.as_str()
        }
        None => moe.topk_method.name(),
    };
    Ok(match name {
        "greedy" => Arc::new(GreedyRouter(params)),
        "group_limited_greedy" => Arc::new(GroupLimitedGreedyRouter(params)),
        "noaux_tc" => Arc::new(NoauxTcRouter(params)),
        other => {
            return Err(ModelError::RouterSpec {
                spec: other.into(),
                message: "unknown router".into(),
            })
        }
    })
}

#[cfg(test)]
mod tests;
