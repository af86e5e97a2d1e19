//! The MoE layer's grouped device path behind one entry point that picks its backend by
//! device and dtype, so model code carries no `cfg(feature = "cuda")`: routing, permutation,
//! grouped expert GEMMs and combine on the GPU ([`crate::cuda`]); on any other device (or in
//! a build without CUDA) the caller's reference path runs instead.

use candle_core::{DType, Result, Tensor};

use super::RoutingParams;

/// One MoE layer's inputs to the grouped device path.
pub struct GroupedMoe<'a> {
    /// `[T, H]` normed hidden states.
    pub x: &'a Tensor,
    /// `[E, H]` f32 gate.
    pub gate: &'a Tensor,
    /// `[E]` f32 routing correction bias, on the device.
    pub correction_bias: Option<&'a Tensor>,
    pub routing: &'a RoutingParams,
    /// `[E, 2I, H]` gate rows then up rows.
    pub gate_up: &'a Tensor,
    /// `[E, H, I]`.
    pub down: &'a Tensor,
}

/// Whether [`grouped_moe`] runs `routing` over these tensors: a CUDA device, bf16 activations
/// and experts, widths that are multiples of 8, routing within the kernel's limits. False in
/// a build without the `cuda` feature.
pub fn grouped_moe_applies(x: &Tensor, gate_up: &Tensor, routing: &RoutingParams) -> bool {
    #[cfg(feature = "cuda")]
    {
        let Ok((experts, two_i, hidden)) = gate_up.dims3() else {
            return false;
        };
        x.device().is_cuda()
            && x.dtype() == DType::BF16
            && gate_up.dtype() == DType::BF16
            && hidden.is_multiple_of(8)
            && (two_i / 2).is_multiple_of(8)
            && crate::cuda::routing_supported(routing, experts)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, gate_up, routing);
        false
    }
}

/// The routed experts' output `[T, H]` plus `shared` (`[T, H]`, the shared experts' output,
/// added before the single rounding), and the chosen expert ids `[T, top_k]` u32, all on the
/// device with no host round trip. Only where [`grouped_moe_applies`]; an error elsewhere.
pub fn grouped_moe(m: &GroupedMoe<'_>, shared: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        use crate::cuda;
        let x = m.x.contiguous()?;
        let logits = x.to_dtype(DType::F32)?.matmul(&m.gate.t()?)?.contiguous()?; // [T, E]
        let (ids, weights) = cuda::moe_route(&logits, m.correction_bias, m.routing)?;
        let out = cuda::moe_experts(&x, m.gate_up, m.down, &ids, &weights, shared)?;
        Ok((out, ids))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (m, shared, DType::F32);
        candle_core::bail!("grouped_moe: this build has no CUDA support")
    }
}
