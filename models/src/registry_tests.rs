//! Tests of the registry and of every non-DeepSeek family's config parsing (the DeepSeek
//! parser has its own in `deepseek/config_tests.rs`): the fixtures and real configs parse to
//! the shapes transformers builds, and each unsupported value is refused naming its field.

use std::path::Path;

use serde_json::{json, Value};

use super::*;
use crate::config::{AttentionConfig, GqaConfig, QkNorm, ScoringFunc, TopkMethod};
use crate::kv_cache::KvCacheSpec;

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
        .join("config.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn real(name: &str) -> ModelConfig {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .join("config.json");
    ModelConfig::from_file(&p).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn parse(v: &Value) -> ModelConfig {
    parse_config(v).unwrap_or_else(|e| panic!("rejected: {e}"))
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

/// Asserts an `UnsupportedValue` naming exactly `field`.
fn rejects(v: &Value, field: &str) {
    match parse_config(v) {
        Err(ModelError::UnsupportedValue { field: f, .. }) => assert_eq!(f, field),
        Err(other) => panic!("expected UnsupportedValue for {field}, got {other}"),
        Ok(c) => panic!("accepted: {c:?}"),
    }
}

fn gqa(c: &ModelConfig) -> &GqaConfig {
    c.gqa().unwrap_or_else(|| panic!("{} is not GQA", c.architecture))
}

#[test]
fn class_and_model_type_names_are_unique_across_families() {
    let mut classes: Vec<&str> = FAMILIES.iter().flat_map(|f| f.classes.iter().map(|c| c.0)).collect();
    let n = classes.len();
    classes.sort_unstable();
    classes.dedup();
    assert_eq!(classes.len(), n, "a class is registered twice");
    let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), FAMILIES.len());
}

#[test]
fn qwen3_moe_reads_heads_qk_norm_and_dense_layers() {
    let c = parse(&fixture("qwen3-moe"));
    assert_eq!(c.family, "qwen3_moe");
    let g = gqa(&c);
    assert_eq!((g.num_heads, g.num_kv_heads, g.head_dim, g.rotary_dim), (4, 2, 16, 16));
    assert_eq!((g.qk_norm, g.qkv_bias, g.o_bias), (QkNorm::PerHead, false, false));
    assert!(!c.rope.interleaved);
    assert_eq!(c.moe_layers, [false, true, true], "mlp_only_layers [0]");
    let m = c.moe.as_ref().unwrap();
    assert_eq!(
        (m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts),
        (8, 3, 0)
    );
    assert_eq!(
        (m.topk_method, m.scoring_func, m.norm_topk_prob),
        (TopkMethod::Greedy, ScoringFunc::Softmax, true)
    );
    assert_eq!(
        c.kv_cache_spec(),
        KvCacheSpec::PerHead {
            kv_heads: 2,
            head_dim: 16,
            v_head_dim: 16
        }
    );
    // decoder_sparse_step 2: only odd layers are MoE (and layer 0 stays dense).
    let c = parse(&with(fixture("qwen3-moe"), "decoder_sparse_step", json!(2)));
    assert_eq!(c.moe_layers, [false, true, false]);
    // attention_bias covers all four projections in this class.
    let c = parse(&with(fixture("qwen3-moe"), "attention_bias", json!(true)));
    assert!(gqa(&c).qkv_bias && gqa(&c).o_bias);
    // transformers 5 saves the expert count as num_local_experts.
    let v = with(
        without(fixture("qwen3-moe"), "num_experts"),
        "num_local_experts",
        json!(8),
    );
    assert_eq!(parse(&v).num_experts(), 8);
    rejects(
        &with(fixture("qwen3-moe"), "use_sliding_window", json!(true)),
        "use_sliding_window",
    );
    rejects(
        &with(fixture("qwen3-moe"), "num_key_value_heads", json!(3)),
        "num_key_value_heads",
    );
    rejects(
        &with(fixture("qwen3-moe"), "num_experts_per_tok", json!(9)),
        "num_experts_per_tok",
    );
    rejects(
        &with(fixture("qwen3-moe"), "mlp_only_layers", json!("0")),
        "mlp_only_layers",
    );
}

#[test]
fn mixtral_routes_every_layer_and_refuses_sliding_windows() {
    let c = parse(&fixture("mixtral"));
    let g = gqa(&c);
    assert_eq!(
        (g.num_heads, g.num_kv_heads, g.head_dim),
        (4, 2, 16),
        "head_dim = hidden / heads"
    );
    assert_eq!(g.qk_norm, QkNorm::None);
    assert!(c.moe_layers.iter().all(|&m| m));
    let m = c.moe.as_ref().unwrap();
    assert!(m.norm_topk_prob, "Mixtral always renormalises");
    assert_eq!(
        (m.names.block, m.names.experts.gate, m.names.experts.up),
        ("block_sparse_moe", "w1", "w3")
    );
    assert_eq!(m.moe_intermediate_size, 32, "the expert width is intermediate_size");
    rejects(
        &with(fixture("mixtral"), "sliding_window", json!(4096)),
        "sliding_window",
    );
    rejects(&with(fixture("mixtral"), "hidden_act", json!("gelu")), "hidden_act");
    rejects(
        &with(fixture("mixtral"), "partial_rotary_factor", json!(0.5)),
        "partial_rotary_factor",
    );
    // MixtralConfig's token-id defaults apply when the file has none.
    let c = parse(&without(without(fixture("mixtral"), "eos_token_id"), "bos_token_id"));
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2u32][..]));
}

#[test]
fn minimax_m2_reads_partial_rotary_whole_qk_norm_and_biased_sigmoid_routing() {
    let c = parse(&fixture("minimax-m2"));
    let g = gqa(&c);
    assert_eq!((g.head_dim, g.rotary_dim, g.qk_norm), (16, 8, QkNorm::Whole));
    let m = c.moe.as_ref().unwrap();
    assert_eq!(
        (m.topk_method, m.scoring_func, m.n_group),
        (TopkMethod::NoauxTc, ScoringFunc::Sigmoid, 1)
    );
    assert!(m.norm_topk_prob && m.routed_scaling_factor == 1.0);
    assert_eq!(m.names.correction_bias, Some("e_score_correction_bias"));
    rejects(
        &with(fixture("minimax-m2"), "attn_type_list", json!([0, 1])),
        "attn_type_list",
    );
    rejects(
        &with(fixture("minimax-m2"), "scoring_func", json!("softmax")),
        "scoring_func",
    );
    rejects(
        &with(fixture("minimax-m2"), "shared_intermediate_size", json!(64)),
        "shared_intermediate_size",
    );
    rejects(&with(fixture("minimax-m2"), "rotary_dim", json!(7)), "rotary_dim");
    rejects(&with(fixture("minimax-m2"), "rotary_dim", json!(32)), "rotary_dim");
    // transformers 5 writes both spellings of the rotated width; they must agree.
    let both = with(fixture("minimax-m2"), "partial_rotary_factor", json!(0.5));
    assert_eq!(gqa(&parse(&both)).rotary_dim, 8);
    rejects(
        &with(fixture("minimax-m2"), "partial_rotary_factor", json!(0.25)),
        "rotary_dim",
    );
    // One expert cannot be scored by its two best: the field at fault is the expert count.
    let one = with(
        with(fixture("minimax-m2"), "num_local_experts", json!(1)),
        "num_experts_per_tok",
        json!(1),
    );
    rejects(&one, "num_local_experts");
    // The real M2.7 config has no eos_token_id: MiniMaxM2Config's default applies.
    assert_eq!(real("minimax-m2.7").eos_token_ids, [200020]);
}

#[test]
fn glm4_moe_defaults_to_half_rotary_and_biases_only_qkv() {
    let c = parse(&fixture("glm4-moe"));
    let g = gqa(&c);
    assert_eq!((g.head_dim, g.rotary_dim), (16, 8));
    assert!(g.qkv_bias && !g.o_bias, "o_proj never has a bias");
    assert_eq!(g.qk_norm, QkNorm::None);
    assert_eq!(c.moe_layers, [false, true, true]);
    let m = c.moe.as_ref().unwrap();
    assert_eq!((m.n_shared_experts, m.routed_scaling_factor), (1, 2.5));
    // Without partial_rotary_factor anywhere, GLM-4.5's class default 0.5 applies.
    let c = parse(&without(fixture("glm4-moe"), "partial_rotary_factor"));
    assert_eq!(gqa(&c).rotary_dim, 8);
    let c = parse(&with(fixture("glm4-moe"), "use_qk_norm", json!(true)));
    assert_eq!(gqa(&c).qk_norm, QkNorm::PerHead);
    rejects(
        &with(fixture("glm4-moe"), "topk_method", json!("greedy")),
        "topk_method",
    );
    rejects(&with(fixture("glm4-moe"), "n_group", json!(3)), "n_group");
    rejects(
        &with(fixture("glm4-moe"), "partial_rotary_factor", json!(1.5)),
        "partial_rotary_factor",
    );
}

#[test]
fn glm4_moe_lite_is_mla_with_glm_defaults_and_layer_types() {
    let c = parse(&fixture("glm4-moe-lite"));
    assert!(matches!(c.attention, AttentionConfig::Mla(_)));
    assert_eq!(c.family, "glm4_moe_lite");
    assert_eq!(c.moe_layers, [false, true, true]);
    let v = with(
        fixture("glm4-moe-lite"),
        "mlp_layer_types",
        json!(["dense", "dense", "sparse"]),
    );
    assert_eq!(parse(&v).moe_layers, [false, false, true]);
    rejects(
        &with(fixture("glm4-moe-lite"), "mlp_layer_types", json!(["dense"])),
        "mlp_layer_types",
    );
    rejects(
        &with(fixture("glm4-moe-lite"), "partial_rotary_factor", json!(0.5)),
        "partial_rotary_factor",
    );
}

#[test]
fn kimi_k25_reads_the_text_config_under_its_prefix_in_both_spellings() {
    let v = fixture("kimi-k25");
    let c = parse(&v);
    assert_eq!(
        (c.family, c.architecture.as_str()),
        ("kimi_k25", "KimiK25ForConditionalGeneration")
    );
    assert_eq!(
        (c.names.model, c.names.lm_head),
        ("language_model.model", "language_model.lm_head")
    );
    assert!(!c.tie_word_embeddings);
    assert!(c.rope.yarn.is_some());
    let t5 = with(v.clone(), "architectures", json!(["Kimi_K25ForConditionalGeneration"]));
    assert_eq!(parse(&t5).names, c.names);
    // transformers ties by the top-level flag, which defaults to true for this class.
    assert!(parse(&without(v.clone(), "tie_word_embeddings")).tie_word_embeddings);
    match parse_config(&without(v.clone(), "text_config")) {
        Err(ModelError::MissingField { field, .. }) => assert_eq!(field, "text_config"),
        other => panic!("{other:?}"),
    }
    // Errors inside the text model name the nesting.
    let mut bad = v.clone();
    bad["text_config"]["kv_lora_rank"] = json!(0);
    rejects(&bad, "text_config.kv_lora_rank");
}

#[test]
fn real_configs_parse_to_their_published_shapes() {
    let q = real("qwen3-30b-a3b");
    assert_eq!(
        (gqa(&q).num_heads, gqa(&q).num_kv_heads, gqa(&q).head_dim),
        (32, 4, 128)
    );
    assert_eq!((q.num_experts(), q.moe.as_ref().unwrap().num_experts_per_tok), (128, 8));
    let m = real("minimax-m2.7");
    assert_eq!(
        (gqa(&m).rotary_dim, gqa(&m).head_dim, gqa(&m).qk_norm),
        (64, 128, QkNorm::Whole)
    );
    assert_eq!(
        m.quantization.as_ref().map(|q| q.format_name()),
        Some("fp8"),
        "shipped FP8"
    );
    let g = real("glm-4.7");
    assert_eq!((gqa(&g).rotary_dim, gqa(&g).qk_norm), (64, QkNorm::PerHead));
    assert_eq!(g.moe_layers.iter().filter(|&&x| !x).count(), 3);
    let k = real("kimi-k2.5");
    assert_eq!(k.quantization.as_ref().map(|q| q.format_name()), Some("int4"));
    assert_eq!(k.num_experts(), 384);
    let x = real("mixtral-8x7b");
    assert_eq!((gqa(&x).num_kv_heads, x.num_experts()), (8, 8));
    assert_eq!(
        real("glm-4.7-flash").kv_cache_spec(),
        KvCacheSpec::Latent {
            dim: 576,
            index_keys: None
        }
    );
}
