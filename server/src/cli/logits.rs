//! `moe logits`: all-position logits of one prompt, as JSON on stdout.

use std::io::Write;

use clap::Args;
use moe_engine::all_position_logits;

use super::{parse_ids, ModelArgs};

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Comma-separated prompt token ids, e.g. 1,2,3.
    #[arg(long)]
    pub prompt_ids: String,
}

pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    let ids = parse_ids(&args.prompt_ids)?;
    if ids.is_empty() {
        anyhow::bail!("--prompt-ids is empty");
    }
    let loaded = args.model.load()?;
    let logits = all_position_logits(&loaded.model, &ids)?.to_vec2::<f32>()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut out, &serde_json::json!({ "logits": logits }))?;
    writeln!(out)?;
    Ok(())
}
