//! Mixtral (`MixtralForCausalLM`: Mixtral-8x7B, 8x22B): GQA with half-split RoPE, every layer
//! a MoE block (`block_sparse_moe`, experts `w1`/`w3`/`w2`) with softmax top-k routing whose
//! weights are always renormalised. Defaults of transformers' `MixtralConfig`.

use crate::config::common::{check_routing, read_gqa, CommonDefaults, CommonFields, FamilyParts, GqaSpec};
use crate::config::fields::{Fields, MAX_COUNT, MAX_DIM};
use crate::config::{DecoderNames, ExpertProjNames, ModelConfig, MoeConfig, MoeNames, QkNorm, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "mixtral",
    classes: &[("MixtralForCausalLM", "mixtral")],
    parse,
    load: crate::decoder::load_boxed,
};

/// Where Mixtral and MiniMax-M2 checkpoints keep the MoE block.
pub const MOE_NAMES: MoeNames = MoeNames {
    block: "block_sparse_moe",
    correction_bias: None,
    warn_missing_bias: false,
    experts: ExpertProjNames::MIXTRAL,
    shared_experts: "shared_experts",
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let common = CommonFields::read(
        f,
        CommonDefaults {
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        },
    )?;
    if let Some(w) = f.get("sliding_window") {
        return Err(f.unsupported(
            "sliding_window",
            w,
            "sliding-window attention is not supported (null only)",
        ));
    }
    let (attention, rope) = read_gqa(
        f,
        &common,
        GqaSpec {
            default_kv_heads: 8,
            default_head_dim: None,
            default_theta: 1e6,
            default_partial_rotary_factor: 1.0,
            reads_rotary_dim: false,
            partial_rotary: false,
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
        },
    )?;
    let experts = f.positive_or("num_local_experts", MAX_COUNT, 8)?;
    let top_k = f.positive_or("num_experts_per_tok", MAX_COUNT, 2)?;
    check_routing(
        f,
        "num_local_experts",
        experts,
        "num_experts_per_tok",
        top_k,
        TopkMethod::Greedy,
        1,
        1,
    )?;
    let width = f.positive("intermediate_size", MAX_DIM)?;
    let moe = MoeConfig {
        n_routed_experts: experts,
        n_shared_experts: 0,
        num_experts_per_tok: top_k,
        moe_intermediate_size: width,
        topk_method: TopkMethod::Greedy,
        scoring_func: ScoringFunc::Softmax,
        n_group: 1,
        topk_group: 1,
        // MixtralSparseMoeBlock always renormalises the top-k weights.
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
        names: MOE_NAMES,
    };
    let num_layers = common.num_hidden_layers;
    Ok(common.build(FamilyParts {
        family: FAMILY.name,
        architecture: class.to_string(),
        attention,
        rope,
        intermediate_size: width,
        mlp_bias: false,
        moe: Some(moe),
        moe_layers: vec![true; num_layers],
        names: DecoderNames::HF,
    }))
}
