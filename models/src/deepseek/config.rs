//! config.json of the DeepSeek MLA + MoE family (`DeepseekV2ForCausalLM`,
//! `DeepseekV3ForCausalLM`, and the classes that reuse the V3 text model: Kimi K2/K2.5's,
//! GLM-4.7-Flash's), read field by field. Optional fields take the defaults of transformers'
//! own config classes ([`Defaults`]) so a checkpoint means the same thing here as there.
//! Family quirks live here, not in the shared layers: V2 never renormalises its top-k
//! weights and only V2's MLPs may have biases; V3 warns about a missing correction bias.

use serde_json::Value;

use crate::config::common::{check_routing, require_full_rotary, CommonDefaults, CommonFields, FamilyParts};
use crate::config::fields::{Fields, MAX_COUNT, MAX_DIM};
use crate::config::rope::{parse_rope, RopeDefaults};
use crate::config::{
    yarn_mscale, AttentionConfig, DecoderNames, ExpertProjNames, MlaConfig, ModelConfig, MoeConfig, MoeNames,
    RopeConfig, ScoringFunc, TopkMethod,
};
use crate::error::Result;

/// Which DeepSeek text model a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V2,
    V3,
}

/// Defaults of transformers' `DeepseekV2Config` / `DeepseekV3Config` for optional fields.
pub struct Defaults {
    pub first_k_dense_replace: usize,
    pub n_shared_experts: usize,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub topk_method: &'static str,
    pub scoring_func: &'static str,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Defaults {
    pub const fn of(version: Version) -> Self {
        match version {
            Version::V2 => Defaults {
                first_k_dense_replace: 0,
                n_shared_experts: 2,
                routed_scaling_factor: 1.0,
                norm_topk_prob: false,
                topk_method: "greedy",
                scoring_func: "softmax",
                n_group: None,
                topk_group: None,
                max_position_embeddings: 2048,
                rms_norm_eps: 1e-6,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
            },
            Version::V3 => Defaults {
                first_k_dense_replace: 3,
                n_shared_experts: 1,
                routed_scaling_factor: 2.5,
                norm_topk_prob: true,
                topk_method: "noaux_tc",
                scoring_func: "sigmoid",
                n_group: Some(8),
                topk_group: Some(4),
                max_position_embeddings: 4096,
                rms_norm_eps: 1e-6,
                bos_token_id: Some(0),
                eos_token_id: Some(1),
            },
        }
    }
}

/// The MoE tensor names of DeepSeek checkpoints (and GLM's, which copy them).
pub const MOE_NAMES: MoeNames = MoeNames {
    block: "mlp",
    correction_bias: Some("gate.e_score_correction_bias"),
    warn_missing_bias: false,
    experts: ExpertProjNames::LLAMA,
    shared_experts: "shared_experts",
};

/// Parses a DeepSeek text config `f` (the root, or Kimi's `text_config`).
pub fn parse_text_config(
    f: &Fields<'_>,
    version: Version,
    family: &'static str,
    architecture: &str,
    names: DecoderNames,
    d: &Defaults,
) -> Result<ModelConfig> {
    let common = CommonFields::read(
        f,
        CommonDefaults {
            max_position_embeddings: d.max_position_embeddings,
            rms_norm_eps: d.rms_norm_eps,
            tie_word_embeddings: false,
            bos_token_id: d.bos_token_id,
            eos_token_id: d.eos_token_id,
        },
    )?;
    let num_heads = f.positive("num_attention_heads", MAX_COUNT)?;
    if let Some(kv_heads) = f.opt_usize("num_key_value_heads", MAX_COUNT)? {
        if kv_heads != num_heads {
            return Err(f.unsupported(
                "num_key_value_heads",
                &Value::from(kv_heads),
                "MLA expands one latent into every head; it must equal num_attention_heads",
            ));
        }
    }
    if !f.has_key("q_lora_rank") {
        return Err(f.missing("q_lora_rank"));
    }
    let q_lora_rank = f.opt_usize("q_lora_rank", MAX_DIM)?;
    if q_lora_rank == Some(0) {
        return Err(f.unsupported("q_lora_rank", &Value::from(0), "must be positive or null"));
    }
    let qk_rope_head_dim = f.positive("qk_rope_head_dim", MAX_DIM)?;
    if qk_rope_head_dim % 2 != 0 {
        return Err(f.unsupported(
            "qk_rope_head_dim",
            &Value::from(qk_rope_head_dim),
            "rotary dimensions come in pairs; must be even",
        ));
    }
    // V2 always rotates interleaved pairs; only V3 reads `rope_interleave`. In a
    // transformers 5 DeepSeek config the top-level `head_dim` is the rotary width (it equals
    // `qk_rope_head_dim`), so it is not read.
    let interleaved = match version {
        Version::V2 => true,
        Version::V3 => f.bool_or("rope_interleave", true)?,
    };
    let rope = parse_rope(
        f,
        common.max_position_embeddings,
        RopeDefaults {
            theta: 10000.0,
            interleaved,
            partial_rotary_factor: 1.0,
        },
    )?;
    require_full_rotary(f, &rope)?;
    let mut mla = MlaConfig {
        num_heads,
        q_lora_rank,
        kv_lora_rank: f.positive("kv_lora_rank", MAX_DIM)?,
        qk_nope_head_dim: f.positive("qk_nope_head_dim", MAX_DIM)?,
        qk_rope_head_dim,
        v_head_dim: f.positive("v_head_dim", MAX_DIM)?,
        bias: f.bool_or("attention_bias", false)?,
        softmax_scale: 0.0,
        sparse: None,
    };
    mla.softmax_scale = mla_softmax_scale(&mla, &rope);
    let (moe, moe_layers) = parse_moe(f, version, d, common.num_hidden_layers)?;
    let parts = FamilyParts {
        family,
        architecture: architecture.to_string(),
        attention: AttentionConfig::Mla(mla),
        rope,
        intermediate_size: f.positive("intermediate_size", MAX_DIM)?,
        // DeepseekV2Config inherits `mlp_bias` (dense and shared-expert MLPs); V3's MLPs
        // never have biases, whatever the file says.
        mlp_bias: version == Version::V2 && f.bool_or("mlp_bias", false)?,
        moe,
        moe_layers,
        names,
    };
    Ok(common.build(parts))
}

/// Softmax scale of MLA: `qk_head_dim^-1/2`, times `yarn_mscale(factor, mscale_all_dim)^2`
/// when YaRN sets `mscale_all_dim` (as transformers does).
pub fn mla_softmax_scale(mla: &MlaConfig, rope: &RopeConfig) -> f64 {
    let base = (mla.qk_head_dim() as f64).powf(-0.5);
    match &rope.yarn {
        Some(y) => match y.mscale_all_dim {
            Some(m) if m != 0.0 => {
                let s = yarn_mscale(y.factor, m);
                base * s * s
            }
            _ => base,
        },
        None => base,
    }
}

/// The MoE settings and which layers use them (`first_k_dense_replace`, `moe_layer_freq`).
fn parse_moe(
    f: &Fields<'_>,
    version: Version,
    d: &Defaults,
    num_layers: usize,
) -> Result<(Option<MoeConfig>, Vec<bool>)> {
    let Some(n_routed_experts) = f.opt_usize("n_routed_experts", MAX_COUNT)? else {
        return Ok((None, vec![]));
    };
    if n_routed_experts == 0 {
        return Err(f.unsupported("n_routed_experts", &Value::from(0), "must be positive or null"));
    }
    let num_experts_per_tok = f.positive("num_experts_per_tok", MAX_COUNT)?;
    // transformers' V2 routes softmax scores greedily or group-limited; its V3 (and the
    // classes built on it) always routes sigmoid noaux_tc. Anything else would silently
    // differ from the reference, so it is refused (`--router` swaps strategies at run time).
    let (methods, scorings): (&[&str], &[&str]) = match version {
        Version::V2 => (&["greedy", "group_limited_greedy"], &["softmax"]),
        Version::V3 => (&["noaux_tc"], &["sigmoid"]),
    };
    f.expect_str_in("topk_method", methods)?;
    f.expect_str_in("scoring_func", scorings)?;
    let topk_method = match f.opt_str("topk_method")?.unwrap_or(d.topk_method) {
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
        _ => TopkMethod::NoauxTc,
    };
    let scoring_func = match version {
        Version::V2 => ScoringFunc::Softmax,
        Version::V3 => ScoringFunc::Sigmoid,
    };
    let grouped = topk_method != TopkMethod::Greedy;
    let n_group = f.opt_usize("n_group", MAX_COUNT)?.or(d.n_group).unwrap_or(1);
    let topk_group = f
        .opt_usize("topk_group", MAX_COUNT)?
        .or(d.topk_group)
        .unwrap_or(n_group);
    check_routing(
        f,
        "n_routed_experts",
        n_routed_experts,
        "num_experts_per_tok",
        num_experts_per_tok,
        topk_method,
        n_group,
        topk_group,
    )?;
    // transformers places MoE layers by first_k_dense_replace alone (released configs all
    // say moe_layer_freq 1).
    if let Some(v) = f.get("moe_layer_freq").filter(|v| v.as_u64() != Some(1)) {
        return Err(f.unsupported(
            "moe_layer_freq",
            v,
            "only 1 is supported: MoE layers follow first_k_dense_replace",
        ));
    }
    let first_k_dense_replace = f
        .opt_usize("first_k_dense_replace", MAX_COUNT)?
        .unwrap_or(d.first_k_dense_replace);
    let moe_layers = (0..num_layers).map(|l| l >= first_k_dense_replace).collect();
    let moe = MoeConfig {
        n_routed_experts,
        n_shared_experts: f
            .opt_usize("n_shared_experts", MAX_COUNT)?
            .unwrap_or(d.n_shared_experts),
        num_experts_per_tok,
        moe_intermediate_size: f.positive("moe_intermediate_size", MAX_DIM)?,
        topk_method,
        scoring_func,
        n_group: if grouped { n_group } else { 1 },
        topk_group: if grouped { topk_group } else { 1 },
        // transformers' DeepseekV2 never renormalises the top-k weights (`norm_topk_prob` is
        // ignored there), so neither do we for V2 checkpoints.
        norm_topk_prob: version == Version::V3 && f.bool_or("norm_topk_prob", d.norm_topk_prob)?,
        routed_scaling_factor: f.opt_f64("routed_scaling_factor")?.unwrap_or(d.routed_scaling_factor),
        names: MoeNames {
            // transformers initialises a missing V3 bias buffer to zeros: legal, but we say so.
            warn_missing_bias: version == Version::V3 && topk_method == TopkMethod::NoauxTc,
            ..MOE_NAMES
        },
    };
    Ok((Some(moe), moe_layers))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
