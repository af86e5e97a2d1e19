//! GLM-5 / 5.1 (`GlmMoeDsaForCausalLM`): DeepSeek-V3.2's MLA + DSA + MoE with transformers'
//! `GlmMoeDsaConfig` defaults (one routing group, `rms_norm_eps` 1e-5, 32 indexer heads), an
//! indexer that rotates interleaved pairs, and cross-layer sharing: a `"shared"` layer in
//! `indexer_types` runs no indexer and attends to the positions the layer before it chose.
//! The pattern is `indexer_types`, else `index_topk_pattern` (`"FSS..."` or a list), else
//! `index_topk_freq` / `index_skip_topk_offset` (every layer full by default).

use serde_json::Value;

use crate::config::fields::{Fields, MAX_COUNT};
use crate::config::ModelConfig;
use crate::deepseek::config::Defaults;
use crate::deepseek_v32::{parse_dsa, parse_dsa_text_config};
use crate::error::Result;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "glm_moe_dsa",
    classes: &[("GlmMoeDsaForCausalLM", "glm_moe_dsa")],
    parse,
    load: crate::decoder::load_boxed,
};

/// `GlmMoeDsaConfig`'s defaults: DeepSeek-V3.2's, with one routing group, a longer context
/// and `rms_norm_eps` 1e-5.
const DEFAULTS: Defaults = Defaults {
    n_group: Some(1),
    topk_group: Some(1),
    max_position_embeddings: 202752,
    rms_norm_eps: 1e-5,
    ..crate::deepseek_v32::DEFAULTS
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let mut cfg = parse_dsa_text_config(f, FAMILY.name, class, &DEFAULTS)?;
    let own_indexer = indexer_pattern(f, cfg.num_hidden_layers)?;
    parse_dsa(f, &mut cfg, 32, true, own_indexer)?;
    Ok(cfg)
}

/// Which layers run their own indexer, as `GlmMoeDsaConfig` derives it.
fn indexer_pattern(f: &Fields<'_>, layers: usize) -> Result<Vec<bool>> {
    let from_list = |key: &str, v: &Value| -> Result<Vec<bool>> {
        let reason = format!("expected one of \"full\" / \"shared\" (or F / S) per layer ({layers})");
        let bad = || f.unsupported(key, v, &reason);
        let items: Vec<String> = match v {
            Value::String(s) => s.chars().map(String::from).collect(),
            Value::Array(a) => a
                .iter()
                .map(|t| t.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_>>()?,
            _ => return Err(bad()),
        };
        if items.len() != layers {
            return Err(bad());
        }
        items
            .iter()
            .map(|t| match t.as_str() {
                "full" | "F" => Ok(true),
                "shared" | "S" => Ok(false),
                _ => Err(bad()),
            })
            .collect()
    };
    if let Some(v) = f.get("indexer_types").filter(|v| !v.is_null()) {
        return from_list("indexer_types", v);
    }
    if let Some(v) = f.get("index_topk_pattern").filter(|v| !v.is_null()) {
        return from_list("index_topk_pattern", v);
    }
    let freq = f.opt_usize("index_topk_freq", MAX_COUNT)?.unwrap_or(1).max(1);
    let offset = f.opt_usize("index_skip_topk_offset", MAX_COUNT)?.unwrap_or(2);
    Ok((0..layers)
        .map(|i| (i + 1).saturating_sub(offset).is_multiple_of(freq))
        .collect())
}
