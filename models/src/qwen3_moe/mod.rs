//! Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head
//! QK-norm and half-split RoPE over the whole head, softmax top-k routing without shared
//! experts; `mlp_only_layers` and `decoder_sparse_step` place the dense layers. Read field by
//! field with the defaults of transformers' `Qwen3MoeConfig`; the shared decoder runs it.

use serde_json::Value;

use crate::config::common::{check_routing, read_gqa, CommonDefaults, CommonFields, FamilyParts, GqaSpec};
use crate::config::fields::{Fields, MAX_COUNT, MAX_DIM};
use crate::config::{DecoderNames, ExpertProjNames, ModelConfig, MoeConfig, MoeNames, QkNorm, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "qwen3_moe",
    classes: &[("Qwen3MoeForCausalLM", "qwen3_moe")],
    parse,
    load: crate::decoder::load_boxed,
};

const MOE_NAMES: MoeNames = MoeNames {
    block: "mlp",
    correction_bias: None,
    warn_missing_bias: false,
    experts: ExpertProjNames::LLAMA,
    shared_experts: "shared_experts",
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let common = CommonFields::read(
        f,
        CommonDefaults {
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
        },
    )?;
    if f.bool_or("use_sliding_window", false)? {
        return Err(f.unsupported(
            "use_sliding_window",
            &Value::from(true),
            "sliding-window attention is not supported",
        ));
    }
    // `attention_bias` puts biases on all four projections in this class.
    let bias = f.bool_or("attention_bias", false)?;
    let (attention, rope) = read_gqa(
        f,
        &common,
        GqaSpec {
            default_kv_heads: 4,
            default_head_dim: None,
            default_theta: 10000.0,
            default_partial_rotary_factor: 1.0,
            reads_rotary_dim: false,
            partial_rotary: false,
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: QkNorm::PerHead,
        },
    )?;
    // The Hub writes `num_experts`; transformers 5 saves it as `num_local_experts`.
    let experts_key = if f.get("num_experts").is_some() {
        "num_experts"
    } else {
        "num_local_experts"
    };
    let experts = f.positive_or(experts_key, MAX_COUNT, 128)?;
    let top_k = f.positive_or("num_experts_per_tok", MAX_COUNT, 8)?;
    check_routing(
        f,
        experts_key,
        experts,
        "num_experts_per_tok",
        top_k,
        TopkMethod::Greedy,
        1,
        1,
    )?;
    let sparse_step = f.positive_or("decoder_sparse_step", MAX_COUNT, 1)?;
    let mut moe_layers: Vec<bool> = (0..common.num_hidden_layers)
        .map(|l| (l + 1).is_multiple_of(sparse_step))
        .collect();
    for l in f.usize_list("mlp_only_layers", MAX_COUNT)? {
        if let Some(m) = moe_layers.get_mut(l) {
            *m = false;
        }
    }
    let moe = MoeConfig {
        n_routed_experts: experts,
        n_shared_experts: 0,
        num_experts_per_tok: top_k,
        moe_intermediate_size: f.positive_or("moe_intermediate_size", MAX_DIM, 768)?,
        topk_method: TopkMethod::Greedy,
        scoring_func: ScoringFunc::Softmax,
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
        routed_scaling_factor: 1.0,
        names: MOE_NAMES,
    };
    Ok(common.build(FamilyParts {
        family: FAMILY.name,
        architecture: class.to_string(),
        attention,
        rope,
        intermediate_size: f.positive_or("intermediate_size", MAX_DIM, 6144)?,
        mlp_bias: false,
        moe: Some(moe),
        moe_layers,
        names: DecoderNames::HF,
    }))
}
