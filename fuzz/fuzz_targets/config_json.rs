//! Fuzz target: arbitrary bytes as `config.json` through `ModelConfig::from_json`, and for every
//! config that validates, everything derived from it without weights (`moe inspect`'s sizes,
//! the latent cache width, the dense/MoE layer pattern, the softmax scale). None of it may
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
    assert_eq!(sizes.latent_values_per_token_per_layer, cfg.latent_cache_dim());
    let moe_layers = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).count();
    assert_eq!(moe_layers, sizes.moe_layers);
    let _ = cfg.qk_head_dim();
    let _ = cfg.softmax_scale();
});
