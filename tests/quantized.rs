//! Quantized checkpoints that are broken or say what the engine cannot run: each is refused
//! with one message naming the tensor or config field at fault, before a model exists.

use std::path::Path;

use candle_core::{DType, Device};
use moe_models::{load_model, LoadOptions, ModelConfig, ModelFiles, Weights};
use moe_tests::{copy_fixture, rewrite_safetensors};

/// The error loading the model in `dir` gives (config and weights as `moe` loads them).
fn load_error(dir: &Path) -> String {
    let files = ModelFiles::from_dir(dir).unwrap();
    let config = match ModelConfig::from_file(&files.config) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let weights = Weights::open(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .for_config(&config);
    match load_model(&config, &weights, &LoadOptions::default()) {
        Ok(_) => panic!("a broken quantized checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

const FP8_EXPERT: &str = "model.layers.1.mlp.experts.3.up_proj";
const INT4_EXPERT: &str = "language_model.model.layers.2.mlp.experts.5.down_proj";

#[test]
fn a_missing_or_misshaped_fp8_scale_names_the_tensor() {
    let tmp = copy_fixture("deepseek-v3-fp8");
    let scale = format!("{FP8_EXPERT}.weight_scale_inv");
    rewrite_safetensors(tmp.path(), |name, t| (name != scale).then_some(t));
    let e = load_error(tmp.path());
    assert!(e.contains(&scale), "{e}");

    let tmp = copy_fixture("deepseek-v3-fp8");
    rewrite_safetensors(tmp.path(), |name, (dtype, shape, data)| {
        if name == scale {
            // [2, 4] -> [4, 2]: same bytes, wrong grid.
            Some((dtype, vec![shape[1], shape[0]], data))
        } else {
            Some((dtype, shape, data))
        }
    });
    let e = load_error(tmp.path());
    assert!(e.contains(&scale) && e.contains("shape"), "{e}");
}

#[test]
fn quantized_tensors_the_config_does_not_cover_are_refused() {
    // FP8 weights without a quantization_config.
    let tmp = copy_fixture("deepseek-v3-fp8");
    edit_config(tmp.path(), |v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    let e = load_error(tmp.path());
    assert!(
        e.contains(".weight") && e.contains("quantization_config does not cover"),
        "{e}"
    );

    // FP8 weights of a module listed in modules_to_not_convert.
    let tmp = copy_fixture("deepseek-v3-fp8");
    edit_config(tmp.path(), |v| {
        v["quantization_config"]["modules_to_not_convert"] = serde_json::json!(["model.layers.0"]);
    });
    let e = load_error(tmp.path());
    assert!(e.contains("model.layers.0."), "{e}");

    // INT4-packed experts that the config's ignore list excludes.
    let tmp = copy_fixture("kimi-k25-int4");
    edit_config(tmp.path(), |v| {
        v["text_config"]["quantization_config"]["ignore"] =
            serde_json::json!(["lm_head", "re:.*self_attn.*", "re:.*mlp.*"]);
    });
    let e = load_error(tmp.path());
    assert!(e.contains("weight_packed") && e.contains("does not cover"), "{e}");
}

#[test]
fn unsupported_quantization_settings_name_the_field() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "quant_method",
            serde_json::json!("gptq"),
            "quantization_config.quant_method",
        ),
        ("fmt", serde_json::json!("e5m2"), "quantization_config.fmt"),
        (
            "weight_block_size",
            serde_json::json!([128]),
            "quantization_config.weight_block_size",
        ),
        (
            "activation_scheme",
            serde_json::json!("static"),
            "quantization_config.activation_scheme",
        ),
    ];
    for (field, value, named) in cases {
        let tmp = copy_fixture("deepseek-v3-fp8");
        edit_config(tmp.path(), |v| v["quantization_config"][field] = value.clone());
        let e = load_error(tmp.path());
        assert!(e.contains(named), "{field}: {e}");
    }
    let tmp = copy_fixture("kimi-k25-int4");
    edit_config(tmp.path(), |v| {
        v["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] =
            serde_json::json!(false)
    });
    let e = load_error(tmp.path());
    assert!(e.contains("weights.symmetric") && e.contains("asymmetric"), "{e}");
}

#[test]
fn int4_zero_points_and_a_wrong_weight_shape_are_refused() {
    let tmp = copy_fixture("kimi-k25-int4");
    let shape_name = format!("{INT4_EXPERT}.weight_shape");
    let mut zero_point = None;
    rewrite_safetensors(tmp.path(), |name, t| {
        if name == format!("{INT4_EXPERT}.weight_scale") {
            zero_point = Some(t.clone());
        }
        Some(t)
    });
    let zp = zero_point.unwrap();
    let zp_name = format!("{INT4_EXPERT}.weight_zero_point");
    // Add a zero-point tensor beside the scale.
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    views.push((
        zp_name.clone(),
        safetensors::tensor::TensorView::new(zp.0, zp.1.clone(), &zp.2).unwrap(),
    ));
    let out = tmp.path().join("model2.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &out).unwrap();
    drop(st);
    std::fs::rename(&out, &path).unwrap();
    let e = load_error(tmp.path());
    assert!(e.contains(&zp_name) && e.contains("asymmetric"), "{e}");

    let tmp = copy_fixture("kimi-k25-int4");
    rewrite_safetensors(tmp.path(), |name, (dtype, shape, data)| {
        if name == shape_name {
            // [64, 32] -> [64, 31].
            let mut d = data.clone();
            d[8] = 31;
            Some((dtype, shape, d))
        } else {
            Some((dtype, shape, data))
        }
    });
    let e = load_error(tmp.path());
    assert!(e.contains(&shape_name), "{e}");
}

/// Synthetic models in both formats keep their weights packed: the FP8 copy holds about half
/// the bytes of bf16, INT4 experts about a quarter, and both run a forward pass.
#[test]
fn synthetic_quantized_models_hold_their_packed_size() {
    let mut cfg = moe_models::synthetic::synthetic_config("deepseek-v2-lite", Some(2)).unwrap();
    let resident = |cfg: &ModelConfig| {
        let w = Weights::random(DType::BF16, &Device::Cpu, 0).for_config(cfg);
        let model = load_model(cfg, &w, &LoadOptions::default()).unwrap();
        drop(model);
        w.resident_bytes() as f64
    };
    let bf16 = resident(&cfg);
    cfg.quantization = moe_models::config::QuantConfig::synthetic("fp8");
    let fp8 = resident(&cfg);
    cfg.quantization = moe_models::config::QuantConfig::synthetic("int4");
    let int4 = resident(&cfg);
    eprintln!("resident: bf16 {bf16:.3e} B, fp8 {fp8:.3e} B, int4 {int4:.3e} B");
    // Embeddings and lm_head (2 x 102400 x 2048 in bf16) stay plain in both formats; every
    // other FP8 weight is 1 byte plus a 4-byte scale per 128 (half its bf16 size + 1/32).
    let embeddings = (2 * 102_400 * 2048 * 2) as f64;
    let want_fp8 = embeddings + (bf16 - embeddings) / 2.0 * (1.0 + 4.0 / 128.0);
    assert!((fp8 - want_fp8).abs() < 0.01 * want_fp8, "fp8 {fp8} vs {want_fp8}");
    // INT4 packs only the routed experts (64 x 3 x 2048 x 1408 in layer 1): half a byte
    // plus a bf16 scale per 32 instead of 2 bytes.
    let experts = (64 * 3 * 2048 * 1408) as f64;
    let want_int4 = bf16 - experts * (2.0 - 0.5 - 2.0 / 32.0);
    assert!(
        (int4 - want_int4).abs() < 0.01 * want_int4,
        "int4 {int4} vs {want_int4}"
    );
}
