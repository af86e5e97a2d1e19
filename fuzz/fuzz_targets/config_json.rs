//! Fuzz target: arbitrary bytes as `config.json` through `ModelConfig::from_json` (every
//! registered family's parser), and for every config that validates, everything derived from
//! it without weights (`moe inspect`'s sizes, the KV-cache spec and bytes per token, the
//! dense/MoE layer pattern, the softmax scale). None of it may
//! panic or overflow (build with `-a`), and absurd sizes must be refused before anything is
//! allocated from them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_models::inspect::model_sizes;
use moe_models::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(cfg) = ModelConfig::from_json(&value) else {
        return;
    };
    let sizes = model_sizes(&cfg);
    assert!(sizes.active_params_per_token <= sizes.total_params);
    assert_eq!(sizes.dense_layers + sizes.moe_layers, cfg.num_hidden_layers);
    assert_eq!(sizes.kv_values_per_token_per_layer, cfg.kv_cache_spec().values_per_token());
    let moe_layers = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).count();
    assert_eq!(moe_layers, sizes.moe_layers);
    let _ = cfg.kv_bytes_per_token(candle_core::DType::BF16);
    let _ = cfg.attention.softmax_scale();
    let _ = cfg.attention.rope_dim();
});
