//! Kimi K2.5 (`KimiK25ForConditionalGeneration` as released; transformers 5.23 spells it
//! `Kimi_K25ForConditionalGeneration`): a DeepSeek-V3 text model under `text_config`, its
//! weights under `language_model.`, beside a vision tower this engine does not run (its
//! tensors are skipped with one log line; the server refuses image inputs).

use crate::config::common::{quant_method, saved_dtype};
use crate::config::fields::Fields;
use crate::config::{DecoderNames, ModelConfig};
use crate::deepseek::config::{parse_text_config, Defaults, Version};
use crate::error::Result;
use crate::registry::Family;

pub const FAMILY: Family = Family {
    name: "kimi_k25",
    classes: &[
        ("KimiK25ForConditionalGeneration", "kimi_k25"),
        ("Kimi_K25ForConditionalGeneration", "kimi_k25"),
    ],
    parse,
    load: crate::decoder::load_boxed,
};

const NAMES: DecoderNames = DecoderNames {
    model: "language_model.model",
    lm_head: "language_model.lm_head",
    skipped: &["vision_tower.", "mm_projector."],
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let text = f
        .object("text_config", "text_config.")?
        .ok_or_else(|| f.missing("text_config"))?;
    let text = Fields { arch: class, ..text };
    let mut cfg = parse_text_config(
        &text,
        Version::V3,
        FAMILY.name,
        class,
        NAMES,
        &Defaults::of(Version::V3),
    )?;
    // transformers ties the output projection by the top-level flag, which defaults to true
    // for this class.
    cfg.tie_word_embeddings = f.bool_or("tie_word_embeddings", true)?;
    // Token ids and the saved dtype live at the top level of the released config.
    let eos = f.token_ids("eos_token_id")?;
    if !eos.is_empty() {
        cfg.eos_token_ids = eos;
    }
    if let Some(bos) = f.token_ids("bos_token_id")?.first() {
        cfg.bos_token_id = Some(*bos);
    }
    if cfg.saved_dtype.is_none() {
        cfg.saved_dtype = saved_dtype(f)?;
    }
    if cfg.quantization.is_none() {
        cfg.quantization = quant_method(f)?;
    }
    Ok(cfg)
}
