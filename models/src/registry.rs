//! The model families moe-engine runs, keyed on config.json's `architectures[0]` (then its
//! `model_type`). A family is one folder (its config parser, and its model when the shared
//! decoder does not fit) plus one line in [`FAMILIES`]; nothing outside `models/` names one.

use serde_json::Value;

use crate::config::fields::Fields;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::Weights;
use crate::model::{LoadOptions, Model};

/// One model family.
pub struct Family {
    /// Short name (`ModelConfig::family`), e.g. `deepseek`.
    pub name: &'static str,
    /// `(architectures[0], model_type)` of every class the family parses.
    pub classes: &'static [(&'static str, &'static str)],
    /// Parses a config whose class is `class` (one of `classes`' names).
    pub parse: fn(&Fields<'_>, class: &str) -> Result<ModelConfig>,
    /// Builds the model from a config this family parsed.
    pub load: fn(&ModelConfig, &Weights, &LoadOptions) -> Result<Model>,
}

/// Every family, in the order `moe inspect --help`-style listings show them.
pub const FAMILIES: &[Family] = &[
    crate::deepseek::FAMILY,
    crate::deepseek_v32::FAMILY,
    crate::glm_moe_dsa::FAMILY,
    crate::kimi_k25::FAMILY,
    crate::glm4_moe_lite::FAMILY,
    crate::glm4_moe::FAMILY,
    crate::minimax_m2::FAMILY,
    crate::qwen3_moe::FAMILY,
    crate::mixtral::FAMILY,
];

/// Every `architectures[0]` value some family accepts.
pub fn supported_architectures() -> Vec<&'static str> {
    FAMILIES.iter().flat_map(|f| f.classes.iter().map(|c| c.0)).collect()
}

fn unknown(found: String) -> ModelError {
    ModelError::UnknownArchitecture {
        found,
        supported: supported_architectures().join(", "),
    }
}

/// The family and class a config names: `architectures[0]`, else `model_type`.
fn resolve(f: &Fields<'_>) -> Result<(&'static Family, &'static str)> {
    let by_class = |name: &str| {
        FAMILIES
            .iter()
            .find_map(|fam| fam.classes.iter().find(|c| c.0 == name).map(|c| (fam, c.0)))
    };
    match f.map.get("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => {
            let name = a[0]
                .as_str()
                .ok_or_else(|| f.unsupported("architectures", &a[0], "architecture names are strings"))?;
            by_class(name).ok_or_else(|| unknown(name.to_string()))
        }
        Some(other) if !other.is_null() => Err(f.unsupported(
            "architectures",
            other,
            "expected a non-empty list of architecture names",
        )),
        // transformers also picks the class from model_type.
        _ => match f.opt_str("model_type")? {
            Some(t) => FAMILIES
                .iter()
                .find_map(|fam| fam.classes.iter().find(|c| c.1 == t).map(|c| (fam, c.0)))
                .ok_or_else(|| unknown(format!("model_type {t}"))),
            None => Err(ModelError::MissingField {
                field: "architectures".into(),
                architecture: "any model".into(),
            }),
        },
    }
}

/// Validates a parsed config.json with the family it names.
pub fn parse_config(value: &Value) -> Result<ModelConfig> {
    let root = Fields::root(value, "any model")?;
    let (family, class) = resolve(&root)?;
    let f = Fields { arch: class, ..root };
    (family.parse)(&f, class)
}

/// Builds the model `config` describes from `weights`, reading only the tensors it uses.
pub fn load_model(config: &ModelConfig, weights: &Weights, options: &LoadOptions) -> Result<Model> {
    if config.quantization.as_ref() != weights.quantization() {
        return Err(ModelError::Input(
            "the weights were opened without the config's quantization_config (Weights::set_quantization)".into(),
        ));
    }
    let family = FAMILIES
        .iter()
        .find(|f| f.name == config.family)
        .ok_or_else(|| unknown(format!("family {}", config.family)))?;
    (family.load)(config, weights, options)
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
