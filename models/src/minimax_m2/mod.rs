//! MiniMax-M2 (`MiniMaxM2ForCausalLM`: MiniMax M2, M2.1, M2.5, M2.7): GQA whose QK-norm is one
//! RMSNorm over all heads' q and one over all k, RoPE on the first `rotary_dim` values of
//! each head, and sigmoid routing with an `e_score_correction_bias` beside the gate, no groups,
//! no shared expert, weights always renormalised. Defaults of transformers'
//! `MiniMaxM2Config`; multi-token-prediction modules (`use_mtp`) are never read.

use serde_json::Value;

use crate::config::common::{check_routing, read_gqa, CommonDefaults, CommonFields, FamilyParts, GqaSpec};
use crate::config::fields::{Fields, MAX_COUNT, MAX_DIM};
use crate::config::{DecoderNames, ModelConfig, MoeConfig, MoeNames, QkNorm, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "minimax_m2",
    classes: &[("MiniMaxM2ForCausalLM", "minimax_m2")],
    parse,
    load: crate::decoder::load_boxed,
};

const MOE_NAMES: MoeNames = MoeNames {
    correction_bias: Some("e_score_correction_bias"),
    warn_missing_bias: true,
    ..crate::mixtral::MOE_NAMES
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let common = CommonFields::read(
        f,
        CommonDefaults {
            max_position_embeddings: 196608,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            bos_token_id: Some(200034),
            eos_token_id: Some(200020),
        },
    )?;
    // MiniMax-01's lightning-attention layers are type 0; M2 is full attention throughout.
    if let Some(list) = f.get("attn_type_list") {
        let all_full = list.as_array().is_some_and(|a| a.iter().all(|t| t.as_u64() == Some(1)));
        if !all_full {
            return Err(f.unsupported("attn_type_list", list, "only full-attention layers (1) are supported"));
        }
    }
    f.expect_str_in("scoring_func", &["sigmoid"])?;
    f.expect_str_in("qk_norm_type", &["per_layer"])?;
    if let Some(n) = f.opt_usize("shared_intermediate_size", MAX_DIM)?.filter(|&n| n != 0) {
        return Err(f.unsupported(
            "shared_intermediate_size",
            &Value::from(n),
            "shared experts are not part of MiniMax-M2",
        ));
    }
    let (attention, rope) = read_gqa(
        f,
        &common,
        GqaSpec {
            default_kv_heads: 8,
            default_head_dim: Some(128),
            default_theta: 5e6,
            default_partial_rotary_factor: 1.0,
            reads_rotary_dim: true,
            partial_rotary: true,
            qkv_bias: false,
            o_bias: false,
            // The class always normalizes q and k (`use_qk_norm` is not read).
            qk_norm: QkNorm::Whole,
        },
    )?;
    let experts = f.positive_or("num_local_experts", MAX_COUNT, 256)?;
    let top_k = f.positive_or("num_experts_per_tok", MAX_COUNT, 8)?;
    // Sigmoid scores, choice by score + bias, no groups: noaux_tc with a single group.
    check_routing(
        f,
        "num_local_experts",
        experts,
        "num_experts_per_tok",
        top_k,
        TopkMethod::NoauxTc,
        1,
        1,
    )?;
    let width = f.positive_or("intermediate_size", MAX_DIM, 1536)?;
    let moe = MoeConfig {
        n_routed_experts: experts,
        n_shared_experts: 0,
        num_experts_per_tok: top_k,
        moe_intermediate_size: width,
        topk_method: TopkMethod::NoauxTc,
        scoring_func: ScoringFunc::Sigmoid,
        n_group: 1,
        topk_group: 1,
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
