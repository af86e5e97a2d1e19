//! The SwiGLU feed-forward `down(silu(gate(x)) * up(x))`, used for dense layers and shared
//! experts. Under tensor parallelism each rank holds `intermediate / ranks` rows of gate and
//! up and the matching columns of down, and the ranks sum their outputs.

use candle_core::{Module, Tensor};

use super::linear::{Linear, RowParallelLinear};
use crate::error::Result;
use crate::loader::Weights;
use crate::parallel::Shard;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: RowParallelLinear,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj`, this rank's share of the `intermediate` width.
    pub fn load(
        w: &Weights,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        bias: bool,
        shard: &Shard,
    ) -> Result<Self> {
        let part = shard.split(intermediate, &format!("{prefix}'s intermediate width"))?;
        Ok(Mlp {
            gate_proj: Linear::load_rows(
                w,
                &format!("{prefix}.gate_proj"),
                hidden,
                intermediate,
                bias,
                part.clone(),
            )?,
            up_proj: Linear::load_rows(
                w,
                &format!("{prefix}.up_proj"),
                hidden,
                intermediate,
                bias,
                part.clone(),
            )?,
            down_proj: RowParallelLinear::load(
                w,
                &format!("{prefix}.down_proj"),
                intermediate,
                hidden,
                bias,
                part,
                shard,
            )?,
        })
    }

    /// `x`: `[tokens, hidden]` -> this rank's partial output `[tokens, hidden]` (the whole
    /// output on one rank); finish with [`Mlp::reduce`].
    pub fn partial(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.partial(&(gate * up)?)
    }

    /// Partial outputs (plus anything added to them) summed over the ranks, bias added.
    pub fn reduce(&self, partial: &Tensor) -> Result<Tensor> {
        self.down_proj.reduce(partial)
    }

    /// `x`: `[tokens, hidden]` -> `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.reduce(&self.partial(x)?)
    }
}
