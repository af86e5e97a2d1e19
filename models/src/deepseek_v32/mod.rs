//! DeepSeek-V3.2 (`DeepseekV32ForCausalLM`): DeepSeek-V3's MLA and MoE with DeepSeek Sparse
//! Attention, a lightning indexer in every layer whose top-`index_topk` positions are all a
//! query attends to. Read with transformers' `DeepseekV32Config` defaults; the MLA rotates
//! interleaved pairs (the class has no `rope_interleave`), the indexer half-split pairs.
//! [`parse_dsa`] (the indexer fields) is shared with GLM-5 ([`crate::glm_moe_dsa`]); the
//! shared decoder runs both. The checkpoint's MTP layer (index `num_hidden_layers`) is never
//! read.

use serde_json::Value;

use crate::config::fields::{Fields, MAX_COUNT, MAX_DIM};
use crate::config::{AttentionConfig, DecoderNames, DsaConfig, ModelConfig};
use crate::deepseek::config::{parse_text_config, Defaults, Version};
use crate::error::Result;
use crate::glm4_moe_lite::read_mlp_layer_types;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "deepseek_v32",
    classes: &[("DeepseekV32ForCausalLM", "deepseek_v32")],
    parse,
    load: crate::decoder::load_boxed,
};

/// `DeepseekV32Config`'s defaults: DeepSeek-V3's, with its longer context.
pub const DEFAULTS: Defaults = Defaults {
    max_position_embeddings: 163840,
    ..Defaults::of(Version::V3)
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let mut cfg = parse_dsa_text_config(f, FAMILY.name, class, &DEFAULTS)?;
    let own_indexer = vec![true; cfg.num_hidden_layers];
    parse_dsa(f, &mut cfg, 64, false, own_indexer)?;
    Ok(cfg)
}

/// The MLA + MoE part of a DSA config: DeepSeek-V3's, with MLA RoPE always interleaved, a
/// required `q_lora_rank`, and dense/MoE layers from `mlp_layer_types` when present
/// (`first_k_dense_replace` otherwise).
pub fn parse_dsa_text_config(
    f: &Fields<'_>,
    family: &'static str,
    class: &str,
    defaults: &Defaults,
) -> Result<ModelConfig> {
    let mut cfg = parse_text_config(f, Version::V3, family, class, DecoderNames::HF, defaults)?;
    // transformers' DSA attention always rotates interleaved pairs and ignores `rope_interleave`.
    cfg.rope.interleaved = true;
    read_mlp_layer_types(f, &mut cfg)?;
    if let Some(types) = f.get("layer_types").filter(|t| !t.is_null()) {
        let ok = types.as_array().is_some_and(|a| {
            a.len() == cfg.num_hidden_layers && a.iter().all(|t| t.as_str() == Some("indexed_attention"))
        });
        if !ok {
            return Err(f.unsupported(
                "layer_types",
                types,
                "every layer of a DSA model is \"indexed_attention\", one entry per layer",
            ));
        }
    }
    Ok(cfg)
}

/// Reads the indexer fields (`index_n_heads`, `index_head_dim`, `index_topk`) into `cfg`'s
/// MLA settings. `own_indexer[l]`: layer `l` runs an indexer (layer 0 must).
pub fn parse_dsa(
    f: &Fields<'_>,
    cfg: &mut ModelConfig,
    default_heads: usize,
    rope_interleaved: bool,
    own_indexer: Vec<bool>,
) -> Result<()> {
    let index_n_heads = f.positive_or("index_n_heads", MAX_COUNT, default_heads)?;
    let index_head_dim = f.positive_or("index_head_dim", MAX_DIM, 128)?;
    let index_topk = f.positive_or("index_topk", MAX_DIM, 2048)?;
    let AttentionConfig::Mla(mla) = &mut cfg.attention else {
        unreachable!("DSA configs are parsed as MLA")
    };
    if mla.q_lora_rank.is_none() {
        return Err(f.unsupported(
            "q_lora_rank",
            &Value::Null,
            "DSA's indexer reads the query's low-rank residual; it must be set",
        ));
    }
    if index_head_dim < mla.qk_rope_head_dim {
        return Err(f.unsupported(
            "index_head_dim",
            &Value::from(index_head_dim),
            &format!(
                "the indexer rotates its first qk_rope_head_dim ({}) values; it must be at least that wide",
                mla.qk_rope_head_dim
            ),
        ));
    }
    if own_indexer.first() == Some(&false) {
        return Err(f.unsupported(
            "indexer_types",
            &Value::from("shared"),
            "layer 0 has no earlier layer to share a selection with; it must be \"full\"",
        ));
    }
    mla.sparse = Some(DsaConfig {
        index_n_heads,
        index_head_dim,
        index_topk,
        rope_interleaved,
        own_indexer,
    });
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
