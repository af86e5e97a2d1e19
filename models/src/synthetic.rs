//! Synthetic models: the real configs of released checkpoints (`models/configs/*`, compiled
//! into the binary) with random weights made on the device, so real shapes can be run and
//! measured in seconds without downloading anything. `--model synthetic:NAME`.

use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// The `--model` prefix that selects a synthetic model.
pub const PREFIX: &str = "synthetic:";

/// (name, config.json) of every synthetic model.
pub const SYNTHETIC_MODELS: &[(&str, &str)] = &[
    (
        "deepseek-v2-lite",
        include_str!("../configs/deepseek-v2-lite/config.json"),
    ),
    ("deepseek-v2", include_str!("../configs/deepseek-v2/config.json")),
    ("deepseek-v3", include_str!("../configs/deepseek-v3/config.json")),
    ("deepseek-v3.2", include_str!("../configs/deepseek-v3.2/config.json")),
    ("glm-5", include_str!("../configs/glm-5/config.json")),
    ("kimi-k2", include_str!("../configs/kimi-k2/config.json")),
    ("kimi-k2.5", include_str!("../configs/kimi-k2.5/config.json")),
    (
        "moonlight-16b-a3b",
        include_str!("../configs/moonlight-16b-a3b/config.json"),
    ),
    ("glm-4.7-flash", include_str!("../configs/glm-4.7-flash/config.json")),
    ("glm-4.7", include_str!("../configs/glm-4.7/config.json")),
    ("minimax-m2.7", include_str!("../configs/minimax-m2.7/config.json")),
    ("qwen3-30b-a3b", include_str!("../configs/qwen3-30b-a3b/config.json")),
    (
        "qwen3-235b-a22b",
        include_str!("../configs/qwen3-235b-a22b/config.json"),
    ),
    ("mixtral-8x7b", include_str!("../configs/mixtral-8x7b/config.json")),
];

/// The name after `synthetic:`, if `model` is a synthetic model spec.
pub fn synthetic_name(model: &str) -> Option<&str> {
    model.strip_prefix(PREFIX)
}

/// The config of synthetic model `name`, optionally cut to its first `num_layers` layers.
/// Synthetic weights are made in the compute dtype, so a shipped `quantization_config` is
/// dropped.
pub fn synthetic_config(name: &str, num_layers: Option<usize>) -> Result<ModelConfig> {
    let resolve_error = |message: String| ModelError::Resolve {
        model: format!("{PREFIX}{name}"),
        message,
    };
    let (_, text) = SYNTHETIC_MODELS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = SYNTHETIC_MODELS.iter().map(|(n, _)| *n).collect();
        resolve_error(format!("no such synthetic model; choose one of {}", names.join(", ")))
    })?;
    let mut json: Value = serde_json::from_str(text).map_err(|e| resolve_error(e.to_string()))?;
    // Multimodal configs (Kimi K2.5) keep the text model under `text_config`.
    let text = if json.get("text_config").is_some_and(|t| t.is_object()) {
        &mut json["text_config"]
    } else {
        &mut json
    };
    if let Some(obj) = text.as_object_mut() {
        obj.remove("quantization_config");
        // Layer-type lists must shrink with the layers.
        for key in ["mlp_layer_types", "indexer_types", "layer_types"] {
            if let (Some(n), Some(types)) = (num_layers, obj.get_mut(key)) {
                if let Some(list) = types.as_array_mut() {
                    list.truncate(n);
                }
            }
        }
    }
    if let Some(n) = num_layers {
        if n == 0 {
            return Err(resolve_error("--num-layers must be at least 1".into()));
        }
        text["num_hidden_layers"] = n.into();
    }
    if let Some(obj) = json.as_object_mut() {
        obj.remove("quantization_config");
    }
    ModelConfig::from_json(&json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_synthetic_config_parses_and_shrinks() {
        for (name, _) in SYNTHETIC_MODELS {
            let full = synthetic_config(name, None).unwrap();
            let two = synthetic_config(name, Some(2)).unwrap();
            assert_eq!(two.num_hidden_layers, 2, "{name}");
            assert_eq!(two.hidden_size, full.hidden_size);
        }
        assert!(synthetic_config("gpt-5", None)
            .unwrap_err()
            .to_string()
            .contains("deepseek-v2-lite"));
        assert!(synthetic_config("deepseek-v3", Some(0)).is_err());
        assert_eq!(synthetic_name("synthetic:kimi-k2"), Some("kimi-k2"));
        assert_eq!(synthetic_name("deepseek-ai/DeepSeek-V3"), None);
    }
}
