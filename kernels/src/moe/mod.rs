//! Mixture-of-experts operators: routing (scores -> expert ids and weights), the permutation
//! of token slots into per-expert row tiles, and the grouped expert MLP with its combine.
//!
//! Each has a host reference here; the CUDA kernels ([`crate::cuda`]) take the same arguments
//! and are tested against these. Terms used throughout:
//!
//! * a *slot* is one (token, choice) pair, `slot = token * top_k + j`;
//! * the *permuted rows* list the slots grouped by expert (ascending slot order within an
//!   expert), each expert's group padded with [`PAD_SLOT`] to a multiple of the GEMM tile;
//! * a *tile* is `tile_rows` consecutive permuted rows, all of one expert.

mod device;
mod experts;
mod host_experts;
mod permute;
mod routing;

pub use device::{grouped_moe, grouped_moe_applies, GroupedMoe};
pub use experts::{grouped_expert_mlp, ExpertWeights};
pub use permute::{max_padded_rows, max_tiles, permute_by_expert, ExpertPermutation, PAD_SLOT};
pub use routing::{route, RoutingMethod, RoutingParams, Scoring};
