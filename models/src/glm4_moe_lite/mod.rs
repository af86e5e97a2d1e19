//! GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`): DeepSeek-V3's MLA and MoE under another class
//! name, with transformers' `Glm4MoeLiteConfig` defaults (one routing group, scaling 1.8,
//! `rms_norm_eps` 1e-5) and the dense/MoE pattern given by `mlp_layer_types` (default: layer 0
//! dense, the rest MoE). The DeepSeek parser reads it; the shared decoder runs it.

use crate::config::fields::Fields;
use crate::config::{DecoderNames, ModelConfig};
use crate::deepseek::config::{parse_text_config, Defaults, Version};
use crate::error::Result;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "glm4_moe_lite",
    classes: &[("Glm4MoeLiteForCausalLM", "glm4_moe_lite")],
    parse,
    load: crate::decoder::load_boxed,
};

const DEFAULTS: Defaults = Defaults {
    first_k_dense_replace: 1,
    n_shared_experts: 1,
    routed_scaling_factor: 1.8,
    norm_topk_prob: true,
    topk_method: "noaux_tc",
    scoring_func: "sigmoid",
    n_group: Some(1),
    topk_group: Some(1),
    max_position_embeddings: 202752,
    rms_norm_eps: 1e-5,
    bos_token_id: Some(0),
    eos_token_id: Some(1),
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let mut cfg = parse_text_config(f, Version::V3, FAMILY.name, class, DecoderNames::HF, &DEFAULTS)?;
    // transformers places MoE layers by `mlp_layer_types` alone (`first_k_dense_replace` is
    // not read); without it, layer 0 is dense and the rest are MoE.
    cfg.moe_layers = (0..cfg.num_hidden_layers).map(|l| l > 0).collect();
    read_mlp_layer_types(f, &mut cfg)?;
    Ok(cfg)
}

/// Applies `mlp_layer_types` (`"dense"` / `"sparse"` per layer) to `cfg.moe_layers` when the
/// config has it (GLM-4.7-Flash, DeepSeek-V3.2, GLM-5).
pub fn read_mlp_layer_types(f: &Fields<'_>, cfg: &mut ModelConfig) -> Result<()> {
    let Some(types) = f.get("mlp_layer_types").filter(|t| !t.is_null()) else {
        return Ok(());
    };
    let reason = format!(
        "expected a list of \"dense\" / \"sparse\", one per layer ({})",
        cfg.num_hidden_layers
    );
    let bad = || f.unsupported("mlp_layer_types", types, &reason);
    let list = types
        .as_array()
        .filter(|a| a.len() == cfg.num_hidden_layers)
        .ok_or_else(bad)?;
    cfg.moe_layers = list
        .iter()
        .map(|t| match t.as_str() {
            Some("sparse") => Ok(true),
            Some("dense") => Ok(false),
            _ => Err(bad()),
        })
        .collect::<Result<_>>()?;
    if cfg.moe.is_none() && cfg.moe_layers.iter().any(|&m| m) {
        return Err(f.missing("n_routed_experts"));
    }
    Ok(())
}
