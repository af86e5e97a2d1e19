//! The DeepSeek MLA + MoE family: `DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM`
//! (DeepSeek V2, V2-Lite, V2.5, V3, V3.1, R1, Kimi K2, Moonlight). V2 and V3 differ only in
//! config (routing, defaults), which [`config`] reads; the shared decoder runs both.

pub mod config;

use crate::config::fields::Fields;
use crate::config::{DecoderNames, ModelConfig};
use crate::error::Result;
use crate::registry::Family;
use config::{parse_text_config, Defaults, Version};

pub const FAMILY: Family = Family {
    name: "deepseek",
    classes: &[
        ("DeepseekV2ForCausalLM", "deepseek_v2"),
        ("DeepseekV3ForCausalLM", "deepseek_v3"),
    ],
    parse,
    load: crate::decoder::load_boxed,
};

fn parse(f: &Fields<'_>, class: &str) -> Result<ModelConfig> {
    let version = if class == "DeepseekV2ForCausalLM" {
        Version::V2
    } else {
        Version::V3
    };
    parse_text_config(f, version, FAMILY.name, class, DecoderNames::HF, &Defaults::of(version))
}
