//! DSA config parsing (DeepSeek-V3.2 and GLM-5): the fixtures and the real configs parse to
//! what transformers builds, GLM-5's three spellings of the shared-layer pattern agree with
//! `GlmMoeDsaConfig`, and each unsupported value is refused naming its field.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::{AttentionConfig, DsaConfig, ModelConfig};
use crate::kv_cache::{IndexKeys, KvCacheSpec};
use crate::registry::parse_config;

fn load(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn fixture(name: &str) -> Value {
    load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
            .join("config.json"),
    )
}

fn real(name: &str) -> Value {
    load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(name)
            .join("config.json"),
    )
}

fn dsa(cfg: &ModelConfig) -> &DsaConfig {
    match &cfg.attention {
        AttentionConfig::Mla(m) => m.sparse.as_ref().expect("a DSA config"),
        other => panic!("{other:?}"),
    }
}

fn err(v: &Value) -> String {
    parse_config(v).unwrap_err().to_string()
}

#[test]
fn the_fixtures_and_the_real_configs_parse_as_transformers_builds_them() {
    let v32 = parse_config(&fixture("deepseek-v32")).unwrap();
    assert_eq!(v32.family, "deepseek_v32");
    let d = dsa(&v32);
    assert_eq!((d.index_n_heads, d.index_head_dim, d.index_topk), (8, 16, 8));
    assert!(!d.rope_interleaved, "V3.2's indexer rotates half-split pairs");
    assert!(v32.rope.interleaved, "its MLA rotates interleaved pairs");
    assert_eq!(d.own_indexer, vec![true; 3]);
    assert_eq!(v32.moe_layers, vec![false, true, true]);

    let glm = parse_config(&fixture("glm5")).unwrap();
    assert_eq!(glm.family, "glm_moe_dsa");
    assert!(dsa(&glm).rope_interleaved);
    assert_eq!(dsa(&glm).own_indexer, vec![true, false, true]);
    assert_eq!(
        glm.kv_cache_spec(),
        KvCacheSpec::Latent {
            dim: 32 + 8,
            index_keys: Some(IndexKeys { dim: 16, layers: 2 })
        }
    );
    assert_eq!(glm.index_key_layers(), vec![true, false, true]);

    let real_v32 = parse_config(&real("deepseek-v3.2")).unwrap();
    assert_eq!(dsa(&real_v32).index_topk, 2048);
    assert_eq!(dsa(&real_v32).index_n_heads, 64);
    assert_eq!(real_v32.quantization.as_ref().map(|q| q.format_name()), Some("fp8"));
    assert_eq!(
        real_v32.kv_bytes_per_token(candle_core::DType::BF16),
        (576 + 128) * 61 * 2
    );
    let real_glm = parse_config(&real("glm-5")).unwrap();
    assert_eq!(dsa(&real_glm).index_n_heads, 32);
    assert_eq!(
        dsa(&real_glm).own_indexer,
        vec![true; 78],
        "every layer full by default"
    );
    assert_eq!(real_glm.eos_token_ids, vec![154820, 154827, 154829]);
}

#[test]
fn glm5_shared_layer_patterns_follow_glm_moe_dsa_config() {
    let base = || {
        let mut v = fixture("glm5");
        v.as_object_mut().unwrap().remove("indexer_types");
        v["num_hidden_layers"] = json!(6);
        v["mlp_layer_types"] = Value::Null;
        v
    };
    let own = |v: &Value| dsa(&parse_config(v).unwrap()).own_indexer.clone();
    let (t, f) = (true, false);
    // No pattern: freq 1, every layer full.
    assert_eq!(own(&base()), vec![t; 6]);
    // freq 2, offset 2 (the class default): full where max(i - 1, 0) is even.
    let mut v = base();
    v["index_topk_freq"] = json!(2);
    assert_eq!(own(&v), vec![t, t, f, t, f, t]);
    v["index_skip_topk_offset"] = json!(1);
    assert_eq!(own(&v), vec![t, f, t, f, t, f]);
    // A pattern string overrides the schedule; indexer_types overrides both.
    v["index_topk_pattern"] = json!("FSSFSS");
    assert_eq!(own(&v), vec![t, f, f, t, f, f]);
    v["indexer_types"] = json!(["full", "full", "shared", "full", "shared", "shared"]);
    assert_eq!(own(&v), vec![t, t, f, t, f, f]);
    // Each shared layer keeps no indexer keys.
    let spec = parse_config(&v).unwrap().kv_cache_spec();
    assert_eq!(spec.bytes_per_token(6, candle_core::DType::F32), (40 * 6 + 16 * 3) * 4);
}

#[test]
fn unsupported_dsa_values_are_refused_naming_the_field() {
    let glm = fixture("glm5");
    let mut v = glm.clone();
    v["indexer_types"] = json!(["shared", "full", "full"]);
    assert!(err(&v).contains("indexer_types"), "{}", err(&v));
    v["indexer_types"] = json!(["full", "sparse", "full"]);
    assert!(err(&v).contains("indexer_types"), "{}", err(&v));
    v["indexer_types"] = json!(["full", "full"]);
    assert!(err(&v).contains("indexer_types"), "{}", err(&v));
    let mut v = glm.clone();
    v.as_object_mut().unwrap().remove("indexer_types");
    v["index_topk_pattern"] = json!("FSX");
    assert!(err(&v).contains("index_topk_pattern"), "{}", err(&v));

    let v32 = fixture("deepseek-v32");
    for (key, value) in [
        ("index_topk", json!(0)),
        ("index_n_heads", json!(0)),
        ("index_head_dim", json!(4)),
        ("q_lora_rank", Value::Null),
        (
            "layer_types",
            json!(["full_attention", "full_attention", "full_attention"]),
        ),
        ("mlp_layer_types", json!(["dense"])),
    ] {
        let mut v = v32.clone();
        v[key] = value;
        let e = err(&v);
        assert!(e.contains(key), "{key}: {e}");
    }
}
