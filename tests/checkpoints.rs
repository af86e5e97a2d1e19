//! Checkpoint-level behaviour: the V3 correction bias is live (zeroing it changes which
//! experts win), corrupt safetensors headers are rejected with precise messages, and the
//! fixtures' real byte-level BPE tokenizer round-trips text.

use std::path::Path;

use candle_core::{DType, Device};
use moe_engine::{PromptScorer, TextTokenizer};
use moe_models::deepseek::LoadOptions;
use moe_models::loader::check_header;
use moe_models::{ModelError, ModelFiles, RoutingTrace, Weights};
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
