//! Tests of the DeepSeek family's config.json parsing: both fixture spellings, YaRN/softmax-scale math, V2/V3 defaults, MoE layer placement and every rejection path (variant + field named in the message).

use std::path::Path;

use serde_json::{json, Value};

use crate::config::{yarn_mscale, ModelConfig, ScoringFunc, TopkMethod};
use crate::error::ModelError;

const FIXTURE_T5: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/deepseek-v3/config.json");
const FIXTURE_HUB: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/deepseek-v3-hubconfig/config.json"
);

/// Smallest config the parser accepts for V2: no optional MoE/rope keys, so defaults apply.
fn v2() -> Value {
    json!({
        "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 6, "num_attention_heads": 4,
        "q_lora_rank": null, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32
    })
}

/// Same for V3; 16 experts so the V3 default grouping (8 groups, keep 4) is valid.
fn v3() -> Value {
    let mut v = v2();
    v["architectures"] = json!(["DeepseekV3ForCausalLM"]);
    v["q_lora_rank"] = json!(48);
    v["n_routed_experts"] = json!(16);
    v["num_experts_per_tok"] = json!(4);
    v
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

fn parse(v: &Value) -> ModelConfig {
    ModelConfig::from_json(v).unwrap_or_else(|e| panic!("rejected: {e}"))
}

fn load(path: &str) -> ModelConfig {
    ModelConfig::from_file(Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn reject(v: &Value) -> (ModelError, String) {
    match ModelConfig::from_json(v) {
        Ok(c) => panic!("accepted an invalid config: {c:?}"),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

/// Asserts an `UnsupportedValue` for exactly `field`, named in the message; returns the message.
fn reject_unsupported(v: &Value, field: &str) -> String {
    let (e, msg) = reject(v);
    match &e {
        ModelError::UnsupportedValue { field: f, .. } => assert_eq!(f, field, "{msg}"),
        other => panic!("expected UnsupportedValue for {field}, got {other:?}"),
    }
    assert!(msg.contains(field), "message does not name `{field}`: {msg}");
    msg
}

fn reject_missing(v: &Value, field: &str) {
    let (e, msg) = reject(v);
    match &e {
        ModelError::MissingField { field: f, .. } => assert_eq!(f, field, "{msg}"),
        other => panic!("expected MissingField for {field}, got {other:?}"),
    }
    assert!(msg.contains(field), "message does not name `{field}`: {msg}");
}

#[test]
fn fixtures_in_both_spellings_parse_to_the_same_config() {
    let t5 = load(FIXTURE_T5);
    let hub = load(FIXTURE_HUB);
    // `dtype` (transformers 5) vs `torch_dtype` (Hub): both say float32.
    assert_eq!(t5.saved_dtype.as_deref(), Some("float32"));
    assert_eq!(hub.saved_dtype.as_deref(), Some("float32"));
    let strip = |c: &ModelConfig| ModelConfig {
        saved_dtype: None,
        ..c.clone()
    };
    assert_eq!(strip(&t5), strip(&hub));

    let c = t5;
    assert_eq!(
        (c.architecture.as_str(), c.family),
        ("DeepseekV3ForCausalLM", "deepseek")
    );
    let mla = c.mla().expect("MLA");
    assert_eq!((c.hidden_size, mla.num_heads, c.num_hidden_layers), (64, 4, 3));
    assert_eq!((mla.q_lora_rank, mla.kv_lora_rank), (Some(48), 32));
    assert_eq!(mla.qk_head_dim(), 16 + 8);
    assert_eq!(
        c.kv_cache_spec(),
        crate::KvCacheSpec::Latent {
            dim: 32 + 8,
            index_keys: None
        }
    );
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(0), &[1u32][..]));
    assert_eq!(c.rope.theta, 10000.0);
    assert!(c.rope.interleaved);
    let y = c.rope.yarn.as_ref().expect("yarn");
    assert_eq!(y.factor, 4.0);
    assert_eq!(y.original_max_position_embeddings, 64);
    assert_eq!((y.beta_fast, y.beta_slow), (32.0, 1.0));
    assert_eq!((y.mscale, y.mscale_all_dim), (Some(1.0), Some(0.8)));
    let m = c.moe.as_ref().expect("moe");
    assert_eq!(m.topk_method, TopkMethod::NoauxTc);
    assert_eq!(m.scoring_func, ScoringFunc::Sigmoid);
    assert_eq!((m.n_group, m.topk_group), (4, 2));
    assert!(m.norm_topk_prob);
    assert_eq!(m.routed_scaling_factor, 2.5);
    assert_eq!(
        (m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts),
        (8, 3, 1)
    );
    // first_k_dense_replace = 1: layer 0 dense, layers 1 and 2 MoE.
    assert_eq!(
        (0..3).map(|l| c.is_moe_layer(l)).collect::<Vec<_>>(),
        [false, true, true]
    );
}

#[test]
fn rope_scaling_accepts_rope_type_key_and_null_means_no_yarn() {
    let yarn = json!({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                      "mscale": 0.707, "mscale_all_dim": 0.707});
    let c = parse(&with(with(v3(), "rope_scaling", yarn), "rope_theta", json!(50000.0)));
    let y = c.rope.yarn.expect("yarn from rope_scaling.rope_type");
    assert_eq!((y.factor, y.original_max_position_embeddings), (8.0, 32));
    assert_eq!(y.mscale_all_dim, Some(0.707));
    assert_eq!(c.rope.theta, 50000.0);

    let c = parse(&with(v3(), "rope_scaling", Value::Null));
    assert_eq!(c.rope.yarn, None);
    assert_eq!(c.rope.theta, 10000.0);
    // Without YaRN the scale is plain (16 + 8)^-1/2.
    assert!((c.attention.softmax_scale() - 1.0 / 24f64.sqrt()).abs() < 1e-15);
}

#[test]
fn softmax_scale_multiplies_by_squared_yarn_mscale() {
    let c = load(FIXTURE_T5);
    // yarn_mscale(4, 0.8) = 0.1 * 0.8 * ln 4 + 1 ≈ 1.1109035
    let m = 0.1 * 0.8 * 4f64.ln() + 1.0;
    let expected = 24f64.powf(-0.5) * m * m;
    assert!(
        (c.attention.softmax_scale() - expected).abs() < 1e-12,
        "{} vs {expected}",
        c.attention.softmax_scale()
    );
    assert!((c.attention.softmax_scale() - 0.251_910_974_228_710_7).abs() < 1e-12);
    // No extension, no correction.
    assert_eq!(yarn_mscale(1.0, 0.8), 1.0);
    assert_eq!(yarn_mscale(0.5, 0.8), 1.0);

    // YaRN without mscale_all_dim leaves the attention scale alone.
    let yarn = json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0});
    let c = parse(&with(v3(), "rope_scaling", yarn));
    assert!(c.rope.yarn.is_some());
    assert!((c.attention.softmax_scale() - 1.0 / 24f64.sqrt()).abs() < 1e-15);
}

#[test]
fn is_moe_layer_honours_first_k_dense_replace_and_refuses_other_layer_frequencies() {
    let c = parse(&with(v2(), "first_k_dense_replace", json!(2)));
    let moe: Vec<usize> = (0..6).filter(|&l| c.is_moe_layer(l)).collect();
    assert_eq!(moe, [2, 3, 4, 5]);
    // transformers ignores moe_layer_freq; released configs say 1, anything else is refused.
    parse(&with(v2(), "moe_layer_freq", json!(1)));
    reject_unsupported(&with(v2(), "moe_layer_freq", json!(2)), "moe_layer_freq");

    // V3 default first_k_dense_replace is 3.
    let c = parse(&v3());
    assert_eq!((0..6).filter(|&l| c.is_moe_layer(l)).collect::<Vec<_>>(), [3, 4, 5]);

    // No n_routed_experts: a dense model.
    let c = parse(&without(v3(), "n_routed_experts"));
    assert!(c.moe.is_none());
    assert!((0..6).all(|l| !c.is_moe_layer(l)));
}

#[test]
fn routing_the_reference_class_would_not_run_is_refused() {
    // transformers' V2 routes softmax greedy / group-limited; V3 always sigmoid noaux_tc.
    reject_unsupported(&with(v2(), "topk_method", json!("noaux_tc")), "topk_method");
    reject_unsupported(&with(v2(), "scoring_func", json!("sigmoid")), "scoring_func");
    reject_unsupported(&with(v3(), "topk_method", json!("greedy")), "topk_method");
    reject_unsupported(&with(v3(), "scoring_func", json!("softmax")), "scoring_func");
    // A config without the class's default token ids gets them (V3: bos 0, eos 1).
    let c = parse(&v3());
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(0), &[1u32][..]));
}

#[test]
fn absent_optional_fields_take_v2_or_v3_defaults() {
    let c = parse(&v2());
    let m = c.moe.as_ref().unwrap();
    assert_eq!(
        (m.topk_method, m.scoring_func),
        (TopkMethod::Greedy, ScoringFunc::Softmax)
    );
    assert!(!m.norm_topk_prob);
    assert_eq!(m.routed_scaling_factor, 1.0);
    assert_eq!(m.n_shared_experts, 2);
    // first_k_dense_replace 0, moe_layer_freq 1: every layer MoE.
    assert!((0..6).all(|l| c.is_moe_layer(l)));
    assert_eq!((m.n_group, m.topk_group), (1, 1));
    assert_eq!(c.max_position_embeddings, 2048);
    assert_eq!(c.mla().unwrap().q_lora_rank, None);
    assert_eq!(
        (c.rope.theta, c.rope.yarn.is_none(), c.rope.interleaved),
        (10000.0, true, true)
    );
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert!(!c.tie_word_embeddings && !c.mla().unwrap().bias && !c.mlp_bias);

    let c = parse(&v3());
    let m = c.moe.as_ref().unwrap();
    assert_eq!(
        (m.topk_method, m.scoring_func),
        (TopkMethod::NoauxTc, ScoringFunc::Sigmoid)
    );
    assert!(m.norm_topk_prob);
    assert_eq!(m.routed_scaling_factor, 2.5);
    assert_eq!(m.n_shared_experts, 1);
    assert_eq!(
        (0..6).filter(|&l| c.is_moe_layer(l)).count(),
        3,
        "first_k_dense_replace 3"
    );
    assert_eq!((m.n_group, m.topk_group), (8, 4));
    assert_eq!(c.max_position_embeddings, 4096);

    // A V2 checkpoint asking for group-limited routing keeps its grouping.
    let v = with(
        with(
            with(v2(), "topk_method", json!("group_limited_greedy")),
            "n_group",
            json!(4),
        ),
        "topk_group",
        json!(2),
    );
    let m = parse(&v).moe.unwrap();
    assert_eq!(
        (m.topk_method, m.n_group, m.topk_group),
        (TopkMethod::GroupLimitedGreedy, 4, 2)
    );
}

#[test]
fn architecture_falls_back_on_model_type() {
    let c = parse(&with(
        without(v3(), "architectures"),
        "model_type",
        json!("deepseek_v3"),
    ));
    assert_eq!(c.architecture, "DeepseekV3ForCausalLM");
    reject_missing(&without(v3(), "architectures"), "architectures");
}

#[test]
fn missing_required_fields_are_named() {
    reject_missing(&without(v3(), "kv_lora_rank"), "kv_lora_rank");
    // q_lora_rank: null is V2-Lite's "no query compression"; an absent key is an error.
    reject_missing(&without(v2(), "q_lora_rank"), "q_lora_rank");
    let (_, msg) = reject(&without(v3(), "kv_lora_rank"));
    assert!(msg.contains("DeepseekV3ForCausalLM"), "{msg}");
}

#[test]
fn unknown_architecture_is_rejected() {
    let (e, msg) = reject(&with(v3(), "architectures", json!(["LlamaForCausalLM"])));
    match e {
        ModelError::UnknownArchitecture { found, supported } => {
            assert_eq!(found, "LlamaForCausalLM");
            assert!(supported.contains("DeepseekV2ForCausalLM") && supported.contains("DeepseekV3ForCausalLM"));
            assert!(supported.contains("Qwen3MoeForCausalLM") && supported.contains("MiniMaxM2ForCausalLM"));
        }
        other => panic!("expected UnknownArchitecture, got {other:?}"),
    }
    assert!(msg.contains("LlamaForCausalLM"), "{msg}");
}

#[test]
fn unsupported_rope_types_name_the_field_of_either_spelling() {
    let hub = with(v3(), "rope_scaling", json!({"type": "dynamic", "factor": 2.0}));
    let msg = reject_unsupported(&hub, "rope_scaling.type");
    assert!(msg.contains("dynamic"), "{msg}");
    let hub2 = with(v3(), "rope_scaling", json!({"rope_type": "dynamic", "factor": 2.0}));
    reject_unsupported(&hub2, "rope_scaling.rope_type");
    let t5 = with(
        v3(),
        "rope_parameters",
        json!({"rope_type": "dynamic", "rope_theta": 10000.0}),
    );
    reject_unsupported(&t5, "rope_parameters.rope_type");
}

#[test]
fn unsupported_routing_choices_are_rejected() {
    let msg = reject_unsupported(&with(v3(), "topk_method", json!("foo")), "topk_method");
    assert!(msg.contains("foo"), "{msg}");
    let msg = reject_unsupported(&with(v3(), "scoring_func", json!("tanh")), "scoring_func");
    assert!(msg.contains("tanh"), "{msg}");
    // 16 experts cannot be split into 3 groups.
    let msg = reject_unsupported(&with(v3(), "n_group", json!(3)), "n_group");
    assert!(msg.contains("16"), "{msg}");
    // 17 experts per token out of 16.
    let msg = reject_unsupported(&with(v3(), "num_experts_per_tok", json!(17)), "num_experts_per_tok");
    assert!(msg.contains("n_routed_experts"), "{msg}");
}

#[test]
fn absurd_sizes_are_rejected_before_allocating() {
    let msg = reject_unsupported(
        &with(v3(), "n_routed_experts", json!(1_000_000_000_000u64)),
        "n_routed_experts",
    );
    assert!(
        msg.contains("limit") && msg.contains(&(1usize << 16).to_string()),
        "{msg}"
    );
    let msg = reject_unsupported(
        &with(v3(), "hidden_size", json!(1_000_000_000_000_000u64)),
        "hidden_size",
    );
    assert!(
        msg.contains("limit") && msg.contains(&(1usize << 22).to_string()),
        "{msg}"
    );
}

#[test]
fn a_zero_max_position_embeddings_is_rejected_naming_the_field() {
    // It would otherwise surface later as a complaint about --max-model-len.
    let msg = reject_unsupported(
        &with(v3(), "max_position_embeddings", json!(0)),
        "max_position_embeddings",
    );
    assert!(msg.contains("positive"), "{msg}");
}

#[test]
fn unsupported_model_features_are_rejected() {
    // DeepSeek-V3's shipped FP8 config parses (config/quant.rs tests the formats).
    let q = json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]});
    assert_eq!(
        parse(&with(v3(), "quantization_config", q))
            .quantization
            .map(|q| q.format_name()),
        Some("fp8")
    );
    reject_unsupported(&with(v3(), "quantization_config", json!("fp8")), "quantization_config");
    let msg = reject_unsupported(&with(v3(), "num_key_value_heads", json!(1)), "num_key_value_heads");
    assert!(msg.contains("num_attention_heads"), "{msg}");
    // Equal to num_attention_heads (4) is what real configs say, and fine.
    parse(&with(v3(), "num_key_value_heads", json!(4)));
    let msg = reject_unsupported(&with(v3(), "hidden_act", json!("gelu")), "hidden_act");
    assert!(msg.contains("gelu"), "{msg}");
}

#[test]
fn malformed_json_shapes_are_rejected() {
    let msg = reject_unsupported(&with(v3(), "hidden_size", json!("64")), "hidden_size");
    assert!(msg.contains("integer"), "{msg}");
    reject_unsupported(&with(v3(), "rms_norm_eps", json!("1e-6")), "rms_norm_eps");
    reject_unsupported(&with(v3(), "vocab_size", json!(-5)), "vocab_size");
    reject_unsupported(&with(v3(), "hidden_size", json!(0)), "hidden_size");
    for root in [json!([1, 2]), json!("config"), Value::Null] {
        let msg = reject_unsupported(&root, "<root>");
        assert!(msg.contains("object"), "{msg}");
    }
}

#[test]
fn v2_quirks_live_in_the_parser() {
    // transformers' DeepseekV2 ignores norm_topk_prob (never renormalises) and honours
    // mlp_bias; V3 honours the first and never has MLP biases.
    let v = with(with(v2(), "norm_topk_prob", json!(true)), "mlp_bias", json!(true));
    let c = parse(&v);
    assert!(!c.moe.as_ref().unwrap().norm_topk_prob && c.mlp_bias);
    let v = with(with(v3(), "norm_topk_prob", json!(true)), "mlp_bias", json!(true));
    let c = parse(&v);
    assert!(c.moe.as_ref().unwrap().norm_topk_prob && !c.mlp_bias);
    // Only V3 expects (and warns about a missing) correction bias.
    assert!(!parse(&v2()).moe.unwrap().names.warn_missing_bias);
    assert!(parse(&v3()).moe.unwrap().names.warn_missing_bias);
}
