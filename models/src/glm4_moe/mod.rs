//! GLM-4.5 / 4.6 / 4.7 (`Glm4MoeForCausalLM`): GQA with q/k/v biases (never on `o_proj`),
//! optional per-head QK-norm (`use_qk_norm`), half-split RoPE on the first
//! `partial_rotary_factor` (default 0.5) of each head, and DeepSeek-V3's MoE: sigmoid
//! `noaux_tc` routing with a correction bias under the gate, shared experts, the first
//! `first_k_dense_replace` layers dense. Defaults of transformers' `Glm4MoeConfig`; the
//! multi-token-prediction layers GLM checkpoints ship (`num_nextn_predict_layers`) are never read.

use crate::config::common::{check_routing, read_gqa, CommonDefaults, CommonFields, FamilyParts, GqaSpec};
use crate::config::fields::{Fields, MAX_COUNT, MAX_DIM};
use crate::config::{DecoderNames, ModelConfig, MoeConfig, MoeNames, QkNorm, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "glm4_moe",
    classes: &[("Glm4MoeForCausalLM", "glm4_moe")],
    parse,
    load: crate::decoder::load_boxed,
};

const MOE_NAMES: MoeNames = MoeNames {
    warn_missing_bias: true,
    ..crate::deepseek::config::MOE_NAMES
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let common = CommonFields::read(
        f,
        CommonDefaults {
            max_position_embeddings: 131072,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
        },
    )?;
    let qk_norm = match f.bool_or("use_qk_norm", false)? {
        true => QkNorm::PerHead,
        false => QkNorm::None,
    };
    let (attention, rope) = read_gqa(
        f,
        &common,
        GqaSpec {
            default_kv_heads: 8,
            default_head_dim: None,
            default_theta: 10000.0,
            default_partial_rotary_factor: 0.5,
            reads_rotary_dim: false,
            partial_rotary: true,
            qkv_bias: f.bool_or("attention_bias", false)?,
            // GLM-4.5's o_proj never has a bias.
            o_bias: false,
            qk_norm,
        },
    )?;
    f.expect_str_in("topk_method", &["noaux_tc"])?;
    f.expect_str_in("scoring_func", &["sigmoid"])?;
    let experts = f.positive_or("n_routed_experts", MAX_COUNT, 128)?;
    let top_k = f.positive_or("num_experts_per_tok", MAX_COUNT, 8)?;
    let n_group = f.positive_or("n_group", MAX_COUNT, 1)?;
    let topk_group = f.positive_or("topk_group", MAX_COUNT, 1)?;
    check_routing(
        f,
        "n_routed_experts",
        experts,
        "num_experts_per_tok",
        top_k,
        TopkMethod::NoauxTc,
        n_group,
        topk_group,
    )?;
    let first_dense = f.opt_usize("first_k_dense_replace", MAX_COUNT)?.unwrap_or(1);
    let moe = MoeConfig {
        n_routed_experts: experts,
        n_shared_experts: f.opt_usize("n_shared_experts", MAX_COUNT)?.unwrap_or(1),
        num_experts_per_tok: top_k,
        moe_intermediate_size: f.positive_or("moe_intermediate_size", MAX_DIM, 1408)?,
        topk_method: TopkMethod::NoauxTc,
        scoring_func: ScoringFunc::Sigmoid,
        n_group,
        topk_group,
        norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
        routed_scaling_factor: f.opt_f64("routed_scaling_factor")?.unwrap_or(1.0),
        names: MOE_NAMES,
    };
    if let Some(v) = f.get("moe_layer_freq").filter(|v| v.as_u64() != Some(1)) {
        return Err(f.unsupported(
            "moe_layer_freq",
            v,
            "GLM-4.5 places MoE layers by first_k_dense_replace only",
        ));
    }
    let num_layers = common.num_hidden_layers;
    Ok(common.build(FamilyParts {
        family: FAMILY.name,
        architecture: class.to_string(),
        attention,
        rope,
        intermediate_size: f.positive_or("intermediate_size", MAX_DIM, 10944)?,
        mlp_bias: false,
        moe: Some(moe),
        moe_layers: (0..num_layers).map(|l| l >= first_dense).collect(),
        names: DecoderNames::HF,
    }))
}
