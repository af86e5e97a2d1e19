//! `moe generate`: sample a continuation of a prompt (text or token ids).

use clap::Args;
use moe_engine::generate::GenerateRequest;
use moe_engine::{Generator, SamplingParams};

use super::{parse_ids, ModelArgs};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,

    /// Prompt as comma-separated token ids.
    #[arg(long)]
    pub prompt_ids: Option<String>,

    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    /// Seed for sampling (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,

    /// Print {"token_ids": [...], "text": "...", "finish_reason": "..."} instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => match &loaded.tokenizer {
            Some(t) => t.encode(text)?,
            None => anyhow::bail!(
                "--prompt needs a tokenizer, but {} has no tokenizer.json; pass --prompt-ids instead",
                loaded.files.dir.display()
            ),
        },
        (None, Some(ids)) => parse_ids(ids)?,
        (None, None) => anyhow::bail!("pass --prompt or --prompt-ids"),
    };
    let mut stop_ids = Vec::new();
    if !args.ignore_eos {
        stop_ids.extend(loaded.config.eos_token_ids.iter().copied());
        if let Some(t) = &loaded.tokenizer {
            stop_ids.extend(t.eos_ids().iter().copied());
        }
    }
    let request = GenerateRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop_ids,
    };
    let generator = Generator::new(&loaded.model, args.block_size, 512)?;
    let out = generator.generate(std::slice::from_ref(&request), None)?.remove(0);
    let text = loaded
        .tokenizer
        .as_ref()
        .map(|t| t.decode(&out.token_ids))
        .transpose()?;
    if args.json {
        let mut v = serde_json::json!({
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason.as_str(),
        });
        if let Some(text) = text {
            v["text"] = serde_json::Value::String(text);
        }
        println!("{v}");
    } else {
        match text {
            Some(t) => println!("{t}"),
            None => println!(
                "{}",
                out.token_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            ),
        }
    }
    Ok(())
}
