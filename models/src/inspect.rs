//! Size accounting for `moe inspect`: parameter counts (total and active per token) and KV
//! cache bytes per token, computed from the config alone (no weights are read).

use serde::Serialize;

use crate::config::{AttentionConfig, ModelConfig, QkNorm, TopkMethod};

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
    /// Values per token and layer in the KV cache (the spec's: a latent row, or K and V of
    /// every kv head).
    pub kv_values_per_token_per_layer: usize,
    /// What standard multi-head attention would cache per token and layer (K and V of every
    /// query head).
    pub mha_values_per_token_per_layer: usize,
}

/// Parameters of one attention layer.
fn attention_params(cfg: &ModelConfig) -> u64 {
    let n = |x: usize| x as u64;
    let h = n(cfg.hidden_size);
    match &cfg.attention {
        AttentionConfig::Mla(m) => {
            let heads = n(m.num_heads);
            let qk = n(m.qk_head_dim());
            let (r, rope, v) = (n(m.kv_lora_rank), n(m.qk_rope_head_dim), n(m.v_head_dim));
            let bias = u64::from(m.bias);
            let q = match m.q_lora_rank {
                None => product(&[h, heads, qk]),
                Some(ql) => sum(&[product(&[h, n(ql)]), n(ql) * bias, n(ql), product(&[n(ql), heads, qk])]),
            };
            sum(&[
                q,
                product(&[h, r.saturating_add(rope)]),
                product(&[r.saturating_add(rope), bias]),
                r,
                product(&[r, heads, n(m.qk_nope_head_dim).saturating_add(v)]),
                product(&[heads, v, h]),
                product(&[h, bias]),
            ])
        }
        AttentionConfig::Gqa(g) => {
            let (heads, kv, d) = (n(g.num_heads), n(g.num_kv_heads), n(g.head_dim));
            let q_out = product(&[heads, d]);
            let kv_out = product(&[kv, d]);
            let qkv_bias = if g.qkv_bias { sum(&[q_out, kv_out, kv_out]) } else { 0 };
            let norms = match g.qk_norm {
                QkNorm::None => 0,
                QkNorm::PerHead => product(&[2, d]),
                QkNorm::Whole => sum(&[q_out, kv_out]),
            };
            sum(&[
                product(&[h, q_out]),
                product(&[2, h, kv_out]),
                qkv_bias,
                product(&[q_out, h]),
                if g.o_bias { h } else { 0 },
                norms,
            ])
        }
    }
}

/// Parameters of layer `layer`'s DSA indexer (`wq_b`, `wk`, `k_norm`, `weights_proj`), 0
/// without one.
fn indexer_params(cfg: &ModelConfig, layer: usize) -> u64 {
    let n = |x: usize| x as u64;
    match &cfg.attention {
        AttentionConfig::Mla(m) => match (&m.sparse, m.q_lora_rank) {
            (Some(d), Some(rank)) if d.own_indexer.get(layer).copied().unwrap_or(false) => {
                let (heads, dim, h) = (n(d.index_n_heads), n(d.index_head_dim), n(cfg.hidden_size));
                sum(&[
                    product(&[n(rank), heads, dim]),
                    product(&[h, dim]),
                    product(&[2, dim]),
                    product(&[h, heads]),
                ])
            }
            _ => 0,
        },
        AttentionConfig::Gqa(_) => 0,
    }
}

/// Sizes of the model `cfg` describes. Counts saturate at `u64::MAX` (and `usize::MAX`):
/// a config may claim sizes no machine holds, which must read as huge, never wrap around.
pub fn model_sizes(cfg: &ModelConfig) -> ModelSizes {
    let n = |x: usize| x as u64;
    let h = n(cfg.hidden_size);
    let attn = attention_params(cfg);
    let norms = product(&[2, h]);
    let mlp_bias = |width: u64| {
        if cfg.mlp_bias {
            sum(&[product(&[2, width]), h])
        } else {
            0
        }
    };
    let dense_mlp = sum(&[
        product(&[3, h, n(cfg.intermediate_size)]),
        mlp_bias(n(cfg.intermediate_size)),
    ]);
    let mut total = 0u64;
    let mut inactive = 0u64;
    let mut routed = 0u64;
    let (mut dense_layers, mut moe_layers) = (0, 0);
    for layer in 0..cfg.num_hidden_layers {
        total = sum(&[total, attn, indexer_params(cfg, layer), norms]);
        match (&cfg.moe, cfg.is_moe_layer(layer)) {
            (Some(m), true) => {
                moe_layers += 1;
                let e = n(m.n_routed_experts);
                let expert = product(&[3, h, n(m.moe_intermediate_size)]);
                let shared_width = product(&[n(m.moe_intermediate_size), n(m.n_shared_experts)]);
                let shared = if m.n_shared_experts > 0 {
                    sum(&[product(&[3, h, shared_width]), mlp_bias(shared_width)])
                } else {
                    0
                };
                // The gate, plus the routing correction bias where the family has one (a
                // buffer in transformers, but stored in the checkpoint like a parameter).
                let bias = if m.names.correction_bias.is_some() && m.topk_method == TopkMethod::NoauxTc {
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
        kv_values_per_token_per_layer: cfg.kv_cache_spec().values_per_token(),
        mha_values_per_token_per_layer: cfg.attention.mha_values_per_token(),
    }
}

/// What the loaded weights occupy, by the checkpoint's format, estimated from the config.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WeightBytes {
    /// `bf16`, `fp8` or `int4` (the format of the quantized projections; `plain` without).
    pub format: String,
    /// Parameters stored quantized.
    pub quantized_params: u64,
    /// Bytes of the quantized projections: packed weights plus their scales as the engine
    /// keeps them (FP8: one f32 per row and block column; INT4: one bf16 per group).
    pub quantized_bytes: u64,
    /// Everything else, in the compute dtype.
    pub plain_bytes: u64,
    pub resident_bytes: u64,
}

/// [`WeightBytes`] of `cfg` with plain weights in a dtype of `plain_bytes_per_param`. A
/// projection counts as quantized when the config's `quantization_config` covers the first
/// layer's module of its kind (FP8 checkpoints keep embeddings and `lm_head` plain).
pub fn weight_bytes(cfg: &ModelConfig, plain_bytes_per_param: u64) -> WeightBytes {
    use crate::config::ModuleQuant;
    let sizes = model_sizes(cfg);
    let Some(q) = &cfg.quantization else {
        let plain = product(&[sizes.total_params, plain_bytes_per_param]);
        return WeightBytes {
            format: "plain".into(),
            quantized_params: 0,
            quantized_bytes: 0,
            plain_bytes: plain,
            resident_bytes: plain,
        };
    };
    let n = |x: usize| x as u64;
    let h = n(cfg.hidden_size);
    let root = cfg.names.model;
    let first_moe = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l));
    let first_dense = (0..cfg.num_hidden_layers).find(|&l| !cfg.is_moe_layer(l));
    // (a representative module, its parameters over the whole model)
    let mut kinds: Vec<(String, u64)> = vec![(
        format!("{root}.layers.0.self_attn.o_proj"),
        product(&[sizes.attention_params_per_layer, n(cfg.num_hidden_layers)]),
    )];
    if let (Some(m), Some(l)) = (&cfg.moe, first_moe) {
        let block = format!("{root}.layers.{l}.{}", m.names.block);
        kinds.push((
            format!("{block}.experts.0.{}", m.names.experts.gate),
            sizes.routed_expert_params,
        ));
        let shared = product(&[
            3,
            h,
            n(m.moe_intermediate_size),
            n(m.n_shared_experts),
            n(sizes.moe_layers),
        ]);
        kinds.push((format!("{block}.{}.gate_proj", m.names.shared_experts), shared));
    }
    if let Some(l) = first_dense {
        let dense = product(&[3, h, n(cfg.intermediate_size), n(sizes.dense_layers)]);
        kinds.push((format!("{root}.layers.{l}.mlp.gate_proj"), dense));
    }
    let (mut qparams, mut qbytes) = (0u64, 0u64);
    for (module, params) in kinds {
        let per_1024 = match q.scheme_for(&module) {
            None => continue,
            // 1 byte a weight + 4 bytes per row per block column.
            Some(ModuleQuant::Fp8 { block_cols, .. }) => 1024 + 4096 / block_cols.max(1) as u64,
            // Half a byte a weight + a bf16 scale per group.
            Some(ModuleQuant::Int4 { group_size }) => 512 + 2048 / group_size.max(1) as u64,
        };
        qparams = sum(&[qparams, params]);
        qbytes = sum(&[qbytes, product(&[params, per_1024]) / 1024]);
    }
    let plain = product(&[sizes.total_params.saturating_sub(qparams), plain_bytes_per_param]);
    WeightBytes {
        format: q.format_name().into(),
        quantized_params: qparams,
        quantized_bytes: qbytes,
        plain_bytes: plain,
        resident_bytes: sum(&[qbytes, plain]),
    }
}

/// Bytes `params` parameters of the kind of `module` occupy: quantized as the config's
/// `quantization_config` says for that module, else `plain_bytes_per_param` each.
fn bytes_of(cfg: &ModelConfig, module: &str, params: u64, plain_bytes_per_param: u64) -> u64 {
    use crate::config::ModuleQuant;
    match cfg.quantization.as_ref().and_then(|q| q.scheme_for(module)) {
        None => product(&[params, plain_bytes_per_param]),
        Some(ModuleQuant::Fp8 { block_cols, .. }) => product(&[params, 1024 + 4096 / block_cols.max(1) as u64]) / 1024,
        Some(ModuleQuant::Int4 { group_size }) => product(&[params, 512 + 2048 / group_size.max(1) as u64]) / 1024,
    }
}

/// Weight bytes each rank holds when `cfg` is split by `layout`, estimated from the config:
/// what stays whole on every rank (norms; routers and correction biases, in f32; MLA's
/// `q_a_proj`, `kv_a_proj_with_mqa` and their norms; DSA's indexers; GQA's kv heads when
/// there are fewer than ranks) plus `1/N` of the rest (as [`weight_bytes`] counts it).
pub fn rank_weight_bytes(
    cfg: &ModelConfig,
    layout: crate::parallel::ParallelLayout,
    plain_bytes_per_param: u64,
) -> u64 {
    let n = |x: usize| x as u64;
    let ranks = n(layout.ranks().max(1));
    let total = weight_bytes(cfg, plain_bytes_per_param).resident_bytes;
    if ranks == 1 {
        return total;
    }
    let h = n(cfg.hidden_size);
    let attn_module = format!("{}.layers.0.self_attn.o_proj", cfg.names.model);
    // `whole`: bytes of `total` every rank holds entirely; `extra`: bytes a rank holds beyond
    // its share that `total` does not count (f32 routers, replicated kv heads).
    let (mut whole, mut extra) = (0u64, 0u64);
    for layer in 0..cfg.num_hidden_layers {
        whole = sum(&[whole, product(&[2, h, plain_bytes_per_param])]);
        match &cfg.attention {
            AttentionConfig::Mla(m) => {
                let (r, rope, bias) = (n(m.kv_lora_rank), n(m.qk_rope_head_dim), u64::from(m.bias));
                let q_a = m.q_lora_rank.map_or(0, |ql| product(&[h, n(ql)]));
                let q_a_extra = m.q_lora_rank.map_or(0, |ql| sum(&[n(ql), product(&[n(ql), bias])]));
                let kv_a = product(&[h, sum(&[r, rope])]);
                let kv_a_extra = sum(&[r, product(&[sum(&[r, rope]), bias])]);
                whole = sum(&[
                    whole,
                    bytes_of(
                        cfg,
                        &attn_module,
                        sum(&[q_a, kv_a, indexer_params(cfg, layer)]),
                        plain_bytes_per_param,
                    ),
                    product(&[sum(&[q_a_extra, kv_a_extra]), plain_bytes_per_param]),
                ]);
            }
            AttentionConfig::Gqa(g) if n(g.num_kv_heads) < ranks => {
                // Each rank keeps one kv head of K and V: 1/kv of them, not 1/N.
                let kv = n(g.num_kv_heads);
                let kv_params = product(&[2, h, kv, n(g.head_dim)]);
                let more = kv_params / kv.max(1) - kv_params / ranks;
                extra = sum(&[extra, bytes_of(cfg, &attn_module, more, plain_bytes_per_param)]);
            }
            AttentionConfig::Gqa(_) => {}
        }
        if let (Some(m), true) = (&cfg.moe, cfg.is_moe_layer(layer)) {
            // The gate (and correction bias) is counted in `total` at the plain width but
            // kept in f32.
            let params = product(&[n(m.n_routed_experts), sum(&[h, 1])]);
            whole = sum(&[whole, product(&[params, plain_bytes_per_param])]);
            extra = sum(&[extra, product(&[params, 4u64.saturating_sub(plain_bytes_per_param)])]);
        }
    }
    let whole = sum(&[whole, product(&[h, plain_bytes_per_param])]);
    sum(&[whole, extra, total.saturating_sub(whole) / ranks])
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
    /// cards' published totals (within 3%) and activated parameters (within 12%, with or
    /// without the embeddings: the cards round them, e.g. "A3B", and differ on whether the
    /// embedding counts).
    #[test]
    fn real_configs_parse_and_match_the_published_sizes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        // (name, total billions, activated billions) from the model cards (the text model's:
        // Kimi K2.5's card counts its 0.4B vision encoder too), and the KV values a token
        // keeps per layer (576 = MLA's 512 + 64 latent; GQA: kv heads x (K + V)).
        let cards = [
            ("deepseek-v2-lite", 15.7, 2.4, 576),
            ("deepseek-v2", 236.0, 21.0, 576),
            ("deepseek-v3", 671.0, 37.0, 576),
            // DSA: the latent plus a 128-value indexer key (V3.2's card says 685B with the
            // 14B MTP module, which is never loaded).
            ("deepseek-v3.2", 671.0, 37.0, 576 + 128),
            ("glm-5", 744.0, 40.0, 576 + 128),
            ("kimi-k2", 1040.0, 32.0, 576),
            ("kimi-k2.5", 1040.0, 32.0, 576),
            ("moonlight-16b-a3b", 16.0, 3.0, 576),
            ("glm-4.7-flash", 30.0, 3.0, 576),
            ("glm-4.7", 355.0, 32.0, 8 * 256),
            ("minimax-m2.7", 230.0, 10.0, 8 * 256),
            ("qwen3-30b-a3b", 30.5, 3.3, 4 * 256),
            ("qwen3-235b-a22b", 235.0, 22.0, 4 * 256),
            ("mixtral-8x7b", 46.7, 12.9, 8 * 256),
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
        for (name, total, active, kv_values) in cards {
            let cfg = ModelConfig::from_file(&dir.join(name).join("config.json")).unwrap();
            let sizes = model_sizes(&cfg);
            let billions = |n: u64| n as f64 / 1e9;
            let total_err = (billions(sizes.total_params) - total).abs() / total;
            assert!(total_err < 0.03, "{name}: {} total", billions(sizes.total_params));
            // Some cards count the embedding and output projection as active, some not.
            let embeddings = sizes.embedding_params * if cfg.tie_word_embeddings { 1 } else { 2 };
            let active_err = [
                sizes.active_params_per_token,
                sizes.active_params_per_token - embeddings,
            ]
            .map(|n| (billions(n) - active).abs() / active)
            .into_iter()
            .fold(f64::INFINITY, f64::min);
            assert!(
                active_err < 0.12,
                "{name}: {} active",
                billions(sizes.active_params_per_token)
            );
            assert_eq!(sizes.kv_values_per_token_per_layer, kv_values, "{name}");
            assert_eq!(sizes.dense_layers + sizes.moe_layers, cfg.num_hidden_layers, "{name}");
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
        cfg.moe_layers = vec![true; 1 << 16];
        let moe = cfg.moe.as_mut().unwrap();
        moe.n_routed_experts = 1 << 16;
        moe.moe_intermediate_size = 1 << 22;
        let sizes = model_sizes(&cfg);
        assert_eq!(sizes.total_params, u64::MAX);
        assert!(sizes.active_params_per_token <= sizes.total_params);
        assert_eq!(sizes.dense_layers + sizes.moe_layers, 1 << 16);
        // Fields at usize::MAX (only constructible in code) saturate too.
        let crate::config::AttentionConfig::Mla(mla) = &mut cfg.attention else {
            panic!("DeepSeek-V3 is MLA")
        };
        mla.kv_lora_rank = usize::MAX;
        mla.num_heads = usize::MAX;
        cfg.num_hidden_layers = 2;
        let sizes = model_sizes(&cfg);
        assert_eq!(sizes.kv_values_per_token_per_layer, usize::MAX);
        assert_eq!(sizes.mha_values_per_token_per_layer, usize::MAX);
    }
}
