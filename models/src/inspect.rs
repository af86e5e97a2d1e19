//! Size accounting for `moe inspect`: parameter counts (total and active per token) and KV
//! cache bytes per token, computed from the config alone (no weights are read).

use serde::Serialize;

use crate::config::ModelConfig;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelSizes {
    pub total_params: u64,
    /// Parameters a token passes through: everything but the routed experts it was not sent to.
    pub active_params_per_token: u64,
    pub embedding_params: u64,
    pub attention_params_per_layer: u64,
    pub routed_expert_params: u64,
    pub dense_layers: usize,
    pub moe_layers: usize,
    /// Values per token and layer in the latent cache (`kv_lora_rank + qk_rope_head_dim`).
    pub latent_values_per_token_per_layer: usize,
    /// What standard multi-head attention would cache per token and layer (K and V of every head).
    pub mha_values_per_token_per_layer: usize,
}

/// Sizes of the model `cfg` describes. Counts saturate at `u64::MAX` (and `usize::MAX`):
/// a config may claim sizes no machine holds, which must read as huge, never wrap around.
pub fn model_sizes(cfg: &ModelConfig) -> ModelSizes {
    let n = |x: usize| x as u64;
    let h = n(cfg.hidden_size);
    let heads = n(cfg.num_attention_heads);
    let qk = n(cfg.qk_nope_head_dim).saturating_add(n(cfg.qk_rope_head_dim));
    let r = n(cfg.kv_lora_rank);
    let rope = n(cfg.qk_rope_head_dim);
    let v = n(cfg.v_head_dim);
    let q = match cfg.q_lora_rank {
        None => product(&[h, heads, qk]),
        Some(ql) => sum(&[product(&[h, n(ql)]), n(ql), product(&[n(ql), heads, qk])]),
    };
    let attn = sum(&[
        q,
        product(&[h, r.saturating_add(rope)]),
        r,
        product(&[r, heads, n(cfg.qk_nope_head_dim).saturating_add(v)]),
        product(&[heads, v, h]),
    ]);
    let norms = product(&[2, h]);
    let dense_mlp = product(&[3, h, n(cfg.intermediate_size)]);
    let mut total = 0u64;
    let mut inactive = 0u64;
    let mut routed = 0u64;
    let (mut dense_layers, mut moe_layers) = (0, 0);
    for layer in 0..cfg.num_hidden_layers {
        total = sum(&[total, attn, norms]);
        match (&cfg.moe, cfg.is_moe_layer(layer)) {
            (Some(m), true) => {
                moe_layers += 1;
                let e = n(m.n_routed_experts);
                let expert = product(&[3, h, n(m.moe_intermediate_size)]);
                let shared = product(&[3, h, n(m.moe_intermediate_size), n(m.n_shared_experts)]);
                // The gate, plus noaux_tc's `e_score_correction_bias` (a buffer in transformers,
                // but stored in the checkpoint like a parameter).
                let bias = if m.topk_method == crate::config::TopkMethod::NoauxTc {
                    e
                } else {
                    0
                };
                total = sum(&[total, product(&[e, h]), bias, product(&[e, expert]), shared]);
                routed = sum(&[routed, product(&[e, expert])]);
                let idle = e.saturating_sub(n(m.num_experts_per_tok));
                inactive = sum(&[inactive, product(&[idle, expert])]);
            }
            _ => {
                dense_layers += 1;
                total = sum(&[total, dense_mlp]);
            }
        }
    }
    let embedding = product(&[n(cfg.vocab_size), h]);
    let lm_head = if cfg.tie_word_embeddings { 0 } else { embedding };
    total = sum(&[total, embedding, lm_head, h]);
    ModelSizes {
        total_params: total,
        active_params_per_token: total.saturating_sub(inactive),
        embedding_params: embedding,
        attention_params_per_layer: attn,
        routed_expert_params: routed,
        dense_layers,
        moe_layers,
        latent_values_per_token_per_layer: cfg.kv_lora_rank.saturating_add(cfg.qk_rope_head_dim),
        mha_values_per_token_per_layer: usize::try_from(product(&[heads, qk.saturating_add(v)])).unwrap_or(usize::MAX),
    }
}

/// Product of counts, saturating at `u64::MAX`.
fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1, |acc, &x| acc.saturating_mul(x))
}

/// Sum of counts, saturating at `u64::MAX`.
fn sum(terms: &[u64]) -> u64 {
    terms.iter().fold(0, |acc, &x| acc.saturating_add(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every real config in `models/configs` parses, and its sizes agree with the model
    /// cards' published totals (within 3%) and activated parameters (within 12%: the cards
    /// round them, e.g. "A3B", and differ on whether the embedding counts).
    #[test]
    fn real_configs_parse_and_match_the_published_sizes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        // (name, total billions, activated billions) from the model cards.
        let cards = [
            ("deepseek-v2-lite", 15.7, 2.4),
            ("deepseek-v2", 236.0, 21.0),
            ("deepseek-v3", 671.0, 37.0),
            ("kimi-k2", 1040.0, 32.0),
            ("moonlight-16b-a3b", 16.0, 3.0),
        ];
        let mut found = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().into_string().unwrap())
            .collect::<Vec<_>>();
        found.sort();
        let mut listed: Vec<String> = cards.iter().map(|c| c.0.to_string()).collect();
        listed.sort();
        assert_eq!(found, listed, "every config has a model-card check");
        for (name, total, active) in cards {
            let cfg = ModelConfig::from_file(&dir.join(name).join("config.json")).unwrap();
            let sizes = model_sizes(&cfg);
            let billions = |n: u64| n as f64 / 1e9;
            let total_err = (billions(sizes.total_params) - total).abs() / total;
            assert!(total_err < 0.03, "{name}: {} total", billions(sizes.total_params));
            let active_err = (billions(sizes.active_params_per_token) - active).abs() / active;
            assert!(
                active_err < 0.12,
                "{name}: {} active",
                billions(sizes.active_params_per_token)
            );
            assert_eq!(sizes.latent_values_per_token_per_layer, 576, "{name}");
        }
    }

    /// Regression: a config with every size at the limits `ModelConfig` allows (65536 layers of
    /// 65536 experts of hidden size 2^22) overflowed u64 here and panicked `moe inspect`.
    #[test]
    fn sizes_at_the_config_limits_saturate_instead_of_overflowing() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/deepseek-v3/config.json");
        let mut cfg = ModelConfig::from_file(&path).unwrap();
        cfg.hidden_size = 1 << 22;
        cfg.num_hidden_layers = 1 << 16;
        let moe = cfg.moe.as_mut().unwrap();
        moe.n_routed_experts = 1 << 16;
        moe.moe_intermediate_size = 1 << 22;
        let sizes = model_sizes(&cfg);
        assert_eq!(sizes.total_params, u64::MAX);
        assert!(sizes.active_params_per_token <= sizes.total_params);
        assert_eq!(sizes.dense_layers + sizes.moe_layers, 1 << 16);
        // Fields at usize::MAX (only constructible in code) saturate too.
        cfg.kv_lora_rank = usize::MAX;
        cfg.num_attention_heads = usize::MAX;
        cfg.num_hidden_layers = 2;
        let sizes = model_sizes(&cfg);
        assert_eq!(sizes.latent_values_per_token_per_layer, usize::MAX);
        assert_eq!(sizes.mha_values_per_token_per_layer, usize::MAX);
    }
}
