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

pub fn model_sizes(cfg: &ModelConfig) -> ModelSizes {
    let h = cfg.hidden_size as u64;
    let heads = cfg.num_attention_heads as u64;
    let qk = cfg.qk_head_dim() as u64;
    let r = cfg.kv_lora_rank as u64;
    let rope = cfg.qk_rope_head_dim as u64;
    let v = cfg.v_head_dim as u64;
    let q = match cfg.q_lora_rank {
        None => h * heads * qk,
        Some(ql) => h * ql as u64 + ql as u64 + ql as u64 * heads * qk,
    };
    let attn = q + h * (r + rope) + r + r * heads * (cfg.qk_nope_head_dim as u64 + v) + heads * v * h;
    let norms = 2 * h;
    let dense_mlp = 3 * h * cfg.intermediate_size as u64;
    let mut total = 0u64;
    let mut inactive = 0u64;
    let mut routed = 0u64;
    let (mut dense_layers, mut moe_layers) = (0, 0);
    for layer in 0..cfg.num_hidden_layers {
        total += attn + norms;
        match (&cfg.moe, cfg.is_moe_layer(layer)) {
            (Some(m), true) => {
                moe_layers += 1;
                let e = m.n_routed_experts as u64;
                let expert = 3 * h * m.moe_intermediate_size as u64;
                let shared = 3 * h * (m.moe_intermediate_size * m.n_shared_experts) as u64;
                // The gate, plus noaux_tc's `e_score_correction_bias` (a buffer in transformers,
                // but stored in the checkpoint like a parameter).
                let bias = if m.topk_method == crate::config::TopkMethod::NoauxTc {
                    e
                } else {
                    0
                };
                total += e * h + bias + e * expert + shared;
                routed += e * expert;
                inactive += (e - m.num_experts_per_tok as u64) * expert;
            }
            _ => {
                dense_layers += 1;
                total += dense_mlp;
            }
        }
    }
    let embedding = cfg.vocab_size as u64 * h;
    let lm_head = if cfg.tie_word_embeddings { 0 } else { embedding };
    total += embedding + lm_head + h;
    ModelSizes {
        total_params: total,
        active_params_per_token: total - inactive,
        embedding_params: embedding,
        attention_params_per_layer: attn,
        routed_expert_params: routed,
        dense_layers,
        moe_layers,
        latent_values_per_token_per_layer: cfg.latent_cache_dim(),
        mha_values_per_token_per_layer: (heads * (qk + v)) as usize,
    }
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
}
