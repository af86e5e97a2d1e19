//! Checkpoint-level behaviour: the V3 correction bias is live (zeroing it changes which
//! experts win), corrupt or hostile safetensors files and configs are rejected with precise
//! messages before anything is allocated from their claims (never a panic or an OOM), and the
//! fixtures' real byte-level BPE tokenizer round-trips text.

use std::path::Path;

use candle_core::{DType, Device};
use moe_engine::{PromptScorer, TextTokenizer};
use moe_models::loader::{check_header, check_header_from};
use moe_models::LoadOptions;
use moe_models::{ModelConfig, ModelError, ModelFiles, RoutingTrace, Weights};
use moe_tests::{copy_fixture, fixture, golden, load_model, max_abs_diff, rewrite_safetensors};

/// Expert ids chosen by every MoE layer for the golden prompts, in layer order.
fn expert_choices(dir: &Path) -> (Vec<(usize, Vec<u32>)>, Vec<candle_core::Tensor>) {
    let model = load_model(dir, DType::F32, &LoadOptions::default());
    let g = golden(&fixture("deepseek-v3"));
    let trace = RoutingTrace::default();
    let logits = PromptScorer::new(&model, 16, usize::MAX)
        .unwrap()
        .prompt_logits(&g.prompts, Some(&trace))
        .unwrap();
    (trace.take(), logits)
}

#[test]
fn zeroing_the_v3_correction_bias_changes_expert_choice() {
    let (with_bias, logits) = expert_choices(&fixture("deepseek-v3"));
    let g = golden(&fixture("deepseek-v3"));
    for (a, b) in logits.iter().zip(&g.logits) {
        assert!(max_abs_diff(a, b) < 1e-4);
    }
    let tmp = copy_fixture("deepseek-v3");
    let mut zeroed = 0;
    rewrite_safetensors(tmp.path(), |name, (dtype, shape, mut data)| {
        if name.ends_with("e_score_correction_bias") {
            data.iter_mut().for_each(|b| *b = 0);
        }
        Some((dtype, shape, data))
    });
    // Count what we zeroed through the loader itself.
    let w = Weights::open(&ModelFiles::from_dir(tmp.path()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    for l in 1..3 {
        let b = w
            .get(&format!("model.layers.{l}.mlp.gate.e_score_correction_bias"), &[8])
            .unwrap();
        assert_eq!(b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        zeroed += 1;
    }
    assert_eq!(zeroed, 2);
    let (without_bias, logits_zeroed) = expert_choices(tmp.path());
    assert_eq!(with_bias.len(), without_bias.len());
    let (mut changed, mut total) = (0, 0);
    for ((la, ids_a), (lb, ids_b)) in with_bias.iter().zip(&without_bias) {
        assert_eq!(la, lb);
        for (ta, tb) in ids_a.chunks(3).zip(ids_b.chunks(3)) {
            let (mut sa, mut sb) = (ta.to_vec(), tb.to_vec());
            sa.sort_unstable();
            sb.sort_unstable();
            total += 1;
            changed += (sa != sb) as usize;
        }
    }
    // The fixture generator measured ~70% of (token, layer) choices changing; demand a lot.
    assert!(changed * 3 > total, "only {changed} of {total} expert choices changed");
    assert!(logits_zeroed
        .iter()
        .zip(&g.logits)
        .any(|(a, b)| max_abs_diff(a, b) > 1e-2));
}

fn write_raw(dir: &Path, header: &str, data_len: usize) -> std::path::PathBuf {
    let p = dir.join("model.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn checkpoint_message(r: moe_models::Result<()>) -> String {
    match r {
        Err(e @ ModelError::Checkpoint { .. }) => e.to_string(),
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn hostile_safetensors_headers_are_rejected_before_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Offsets past the end of the file.
    let p = write_raw(d, r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8);
    assert!(checkpoint_message(check_header(&p)).contains("`w` claims bytes 0..16"));
    // A shape whose byte size overflows u64.
    let p = write_raw(
        d,
        r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
        16,
    );
    assert!(checkpoint_message(check_header(&p)).contains("overflows"));
    // Shape and offsets that disagree.
    let p = write_raw(d, r#"{"w":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#, 16);
    assert!(checkpoint_message(check_header(&p)).contains("needs 20 bytes"));
    // A header length larger than the file.
    let p = d.join("model.safetensors");
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, bytes).unwrap();
    assert!(checkpoint_message(check_header(&p)).contains("truncated"));
    // Not JSON.
    let p = write_raw(d, "not json", 0);
    assert!(checkpoint_message(check_header(&p)).contains("JSON"));
    // Unknown dtype.
    let p = write_raw(d, r#"{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#, 1);
    assert!(checkpoint_message(check_header(&p)).contains("F4"));
}

#[test]
fn integer_weights_are_a_dtype_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("deepseek-v2-lite/config.json"), tmp.path().join("config.json")).unwrap();
    write_raw(
        tmp.path(),
        r#"{"model.norm.weight":{"dtype":"I32","shape":[64],"data_offsets":[0,256]}}"#,
        256,
    );
    let w = Weights::open(&ModelFiles::from_dir(tmp.path()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let e = w.get("model.norm.weight", &[64]).unwrap_err();
    assert!(matches!(e, ModelError::TensorDtype { .. }), "{e}");
    assert!(e.to_string().contains("model.norm.weight"));
}

/// The error of opening the checkpoint in `dir`, which must be a checkpoint error naming `file`.
fn open_error(dir: &Path, file: &str) -> String {
    let files = ModelFiles::from_dir(dir).unwrap();
    let msg = match Weights::open(&files, DType::F32, &Device::Cpu) {
        Err(e @ ModelError::Checkpoint { .. }) => e.to_string(),
        Err(other) => panic!("expected a checkpoint error, got {other:?}"),
        Ok(_) => panic!("a corrupt checkpoint opened"),
    };
    assert!(msg.contains(file), "the message should name {file}: {msg}");
    msg
}

#[test]
fn a_checkpoint_truncated_anywhere_is_rejected_naming_the_file() {
    let tmp = copy_fixture("deepseek-v3");
    let p = tmp.path().join("model.safetensors");
    let full = std::fs::read(&p).unwrap();
    let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let cuts = [
        0,
        1,
        7,
        8,
        9,
        8 + header_len / 2,
        8 + header_len,
        8 + header_len + 1,
        (8 + header_len + full.len()) / 2,
        full.len() - 1,
    ];
    for cut in cuts {
        std::fs::write(&p, &full[..cut]).unwrap();
        let msg = checkpoint_message(check_header(&p));
        assert!(msg.contains("model.safetensors"), "cut at {cut}: {msg}");
        assert!(
            msg.contains("truncated") || msg.contains("claims"),
            "cut at {cut}: {msg}"
        );
        open_error(tmp.path(), "model.safetensors");
        // The in-memory form of the same check agrees.
        assert!(check_header_from(&full[..cut], cut as u64, &p).is_err());
    }
    std::fs::write(&p, &full).unwrap();
    check_header(&p).unwrap();
    check_header_from(&full[..], full.len() as u64, &p).unwrap();
}

#[test]
fn a_header_length_prefix_of_u64_max_is_rejected_without_allocating() {
    let tmp = copy_fixture("deepseek-v2-lite");
    let p = tmp.path().join("model.safetensors");
    for claimed in [
        u64::MAX,
        u64::MAX - 7,
        1 << 63,
        moe_models::loader::MAX_HEADER_BYTES + 1,
    ] {
        let mut bytes = claimed.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&p, &bytes).unwrap();
        let msg = checkpoint_message(check_header(&p));
        assert!(msg.contains(&format!("header claims {claimed} bytes")), "{msg}");
        open_error(tmp.path(), "model.safetensors");
    }
}

#[test]
fn offsets_shapes_and_dtypes_that_lie_are_rejected_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::copy(fixture("deepseek-v2-lite/config.json"), d.join("config.json")).unwrap();
    let cases: &[(&str, usize, &str)] = &[
        // Offsets past the end of the data section, or reversed.
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,17]}}"#,
            16,
            "claims bytes 0..17",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
            16,
            "claims bytes",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}}"#,
            16,
            "claims bytes 16..0",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0]}}"#,
            16,
            "no valid data_offsets",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,-16]}}"#,
            16,
            "no valid data_offsets",
        ),
        (r#"{"w":{"dtype":"F32","shape":[4]}}"#, 16, "no valid data_offsets"),
        // Element counts that overflow u64 (and so usize), alone or times the element size.
        (
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,16]}}"#,
            16,
            "overflows",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]}}"#,
            16,
            "overflows",
        ),
        (
            r#"{"w":{"dtype":"BF16","shape":[18446744073709551615,2],"data_offsets":[0,16]}}"#,
            16,
            "overflows",
        ),
        // A shape that disagrees with its byte range, either way.
        (
            r#"{"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,16]}}"#,
            16,
            "needs 8 bytes but data_offsets span 16",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#,
            16,
            "needs 24 bytes",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[0,16]}}"#,
            16,
            "needs 0 bytes",
        ),
        // Shapes that are not lists of non-negative integers.
        (
            r#"{"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}"#,
            16,
            "no valid shape",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":["4"],"data_offsets":[0,16]}}"#,
            16,
            "no valid shape",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":4,"data_offsets":[0,16]}}"#,
            16,
            "no valid shape",
        ),
        // Dtypes that are not safetensors dtypes at all.
        (
            r#"{"w":{"dtype":"f32","shape":[4],"data_offsets":[0,16]}}"#,
            16,
            "unknown dtype \"f32\"",
        ),
        (
            r#"{"w":{"dtype":32,"shape":[4],"data_offsets":[0,16]}}"#,
            16,
            "no dtype name",
        ),
        (r#"{"w":{"shape":[4],"data_offsets":[0,16]}}"#, 16, "no dtype name"),
        // Not a header at all.
        (r#"[1,2,3]"#, 0, "not a JSON object"),
        (r#"{"w":"#, 0, "not valid JSON"),
    ];
    for (header, data_len, needle) in cases {
        let p = write_raw(d, header, *data_len);
        let msg = checkpoint_message(check_header(&p));
        assert!(msg.contains(needle), "{header}: expected {needle:?} in {msg}");
        if msg.contains("tensor `") {
            assert!(
                msg.contains("`w`"),
                "{header}: the message should name the tensor: {msg}"
            );
        }
        open_error(d, "model.safetensors");
    }
}

#[test]
fn weights_of_a_dtype_the_model_cannot_compute_in_are_rejected_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("deepseek-v2-lite/config.json"), tmp.path().join("config.json")).unwrap();
    for (dtype, bytes) in [("BOOL", 64), ("U8", 64), ("F8_E4M3", 64), ("I64", 512), ("U32", 256)] {
        write_raw(
            tmp.path(),
            &format!(r#"{{"model.norm.weight":{{"dtype":"{dtype}","shape":[64],"data_offsets":[0,{bytes}]}}}}"#),
            bytes,
        );
        let w = Weights::open(&ModelFiles::from_dir(tmp.path()).unwrap(), DType::F32, &Device::Cpu).unwrap();
        match w.get("model.norm.weight", &[64]) {
            Err(e @ ModelError::TensorDtype { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("model.norm.weight") && msg.contains(dtype), "{msg}");
            }
            other => panic!("{dtype}: expected a dtype error, got {other:?}"),
        }
    }
}

/// The error of reading the fixture's config.json with `key` set to `value`.
fn config_error(key: &str, value: serde_json::Value) -> String {
    let tmp = copy_fixture("deepseek-v3");
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg[key] = value.clone();
    std::fs::write(&p, cfg.to_string()).unwrap();
    match ModelConfig::from_file(&p) {
        Err(e @ ModelError::UnsupportedValue { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("`{key}`")), "{key} = {value}: {msg}");
            msg
        }
        other => panic!("{key} = {value}: expected an unsupported-value error, got {other:?}"),
    }
}

#[test]
fn absurd_config_sizes_are_errors_naming_the_field() {
    use serde_json::json;
    for (key, value) in [
        ("n_routed_experts", json!(1_000_000_000_000u64)),
        ("hidden_size", json!(1u64 << 40)),
        ("num_hidden_layers", json!(1_000_000_000u64)),
        ("vocab_size", json!(u64::MAX)),
        ("intermediate_size", json!(1u64 << 40)),
        ("moe_intermediate_size", json!(1u64 << 40)),
        ("num_attention_heads", json!(1u64 << 32)),
        ("kv_lora_rank", json!(1u64 << 40)),
        ("num_experts_per_tok", json!(1u64 << 40)),
    ] {
        assert!(config_error(key, value).contains("larger than the limit"));
    }
    for key in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    ] {
        assert!(config_error(key, json!(0)).contains("must be positive"), "{key}");
    }
    for (key, value) in [
        ("vocab_size", json!(-1)),
        ("hidden_size", json!(64.5)),
        ("num_hidden_layers", json!(1e300)),
    ] {
        assert!(config_error(key, value).contains("non-negative integer"), "{key}");
    }
}

#[test]
fn the_largest_configs_the_limits_allow_have_finite_sizes() {
    // Every size at its limit passes validation; what is derived from it must not overflow
    // (it saturates) and nothing may be allocated from it.
    let tmp = copy_fixture("deepseek-v2-lite");
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "moe_intermediate_size",
    ] {
        cfg[key] = (1u64 << 22).into();
    }
    for key in [
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "n_routed_experts",
        "n_shared_experts",
    ] {
        cfg[key] = (1u64 << 16).into();
    }
    cfg["q_lora_rank"] = (1u64 << 22).into();
    cfg["first_k_dense_replace"] = 0.into();
    let cfg = ModelConfig::from_json(&cfg).unwrap();
    let sizes = moe_models::inspect::model_sizes(&cfg);
    assert_eq!(sizes.total_params, u64::MAX, "saturates instead of wrapping");
    assert!(sizes.active_params_per_token <= sizes.total_params);
    assert_eq!(sizes.moe_layers, 1 << 16);
}

#[test]
fn the_fixture_tokenizer_round_trips_text_and_prepends_bos() {
    let dir = fixture("deepseek-v3");
    let t = TextTokenizer::load(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
        Some(&dir.join("generation_config.json")),
    )
    .unwrap();
    for text in [
        "Hello world",
        "Héllo wörld, 你好 🙂 — naïve café",
        "  spaces\tand\nnewlines  ",
        "x",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(ids[0], 0, "add_bos_token: the first id is BOS");
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids).unwrap(), text, "BOS is special and dropped on decode");
    }
    // Multi-byte characters span several byte-level tokens, so the byte fallback is exercised.
    assert!(t.encode("🙂").unwrap().len() > 2);
    assert_eq!(t.eos_ids(), &[1]);
}
