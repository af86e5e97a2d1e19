//! Engine options shared by every command that runs the batching engine (vLLM's names):
//! sequence and token limits, the model length cap and the KV-cache size.

use anyhow::Context;
use clap::Args;
use moe_engine::engine::EngineConfig;
use moe_engine::runner::{ModelRunner, DEFAULT_BLOCK_SIZE};
use moe_models::Model;

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Sequences computed together in one step at most.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Tokens computed in one step at most (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,

    /// Prompt + output tokens per request at most (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,

    /// KV-cache size in bytes, e.g. 2GiB, 512MiB, 1000000000 (default: enough for max-num-seqs
    /// full-length sequences, at most 4GiB): per GPU for a model split over GPUs, in all for
    /// one split over CPU ranks (they share the host's memory).
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_memory: Option<usize>,

    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Compute every prompt from scratch instead of reusing the cached KV blocks of an equal
    /// prefix (prefix caching is on by default).
    #[arg(long, alias = "no-enable-prefix-caching")]
    pub no_prefix_caching: bool,
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024; `B`/`iB` optional).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 2GiB)"))?;
    let scale = match unit
        .trim()
        .trim_end_matches('B')
        .trim_end_matches('i')
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(format!("{s:?} is not a usable size"));
    }
    Ok(bytes as usize)
}

impl EngineArgs {
    /// Sizes the cache and builds the runner and the engine limits.
    pub fn build(&self, model: Model) -> anyhow::Result<(ModelRunner, EngineConfig)> {
        let cfg = model.config();
        let max_model_len = self.max_model_len.unwrap_or(cfg.max_position_embeddings);
        if max_model_len == 0 || self.block_size == 0 || self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            anyhow::bail!(
                "--max-model-len, --block-size, --max-num-seqs and --max-num-batched-tokens must be positive"
            );
        }
        let spec = model.kv_cache_spec();
        // What one rank keeps per token; CPU ranks share one memory, GPU ranks have their own.
        let per_token = spec.bytes_per_token(cfg.num_hidden_layers, model.dtype());
        let sharing = if model.device().is_cpu() {
            model.ranks().max(1)
        } else {
            1
        };
        let bytes = self.kv_cache_memory.unwrap_or_else(|| {
            let wanted = self
                .max_num_seqs
                .saturating_mul(max_model_len)
                .saturating_mul(per_token)
                .saturating_mul(sharing);
            wanted.min(4 << 30)
        }) / sharing;
        let num_blocks =
            ModelRunner::blocks_for_memory(&spec, cfg.num_hidden_layers, model.dtype(), bytes, self.block_size);
        let ranks = model.ranks();
        let per_rank = if ranks > 1 {
            format!(" a rank, on each of {ranks} ranks")
        } else {
            String::new()
        };
        if num_blocks * self.block_size < max_model_len {
            anyhow::bail!(
                "--kv-cache-memory: {bytes} bytes{per_rank} hold {} tokens ({per_token} bytes each), fewer than --max-model-len {max_model_len}",
                num_blocks * self.block_size
            );
        }
        tracing::info!(
            "KV cache: {num_blocks} blocks of {} tokens ({} MiB{per_rank}; {}, {per_token} bytes a token)",
            self.block_size,
            (num_blocks * self.block_size * per_token) >> 20,
            spec.describe()
        );
        let config = EngineConfig {
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            max_model_len,
            enable_prefix_caching: !self.no_prefix_caching,
        };
        let runner = ModelRunner::new(model, num_blocks, self.block_size).context("allocating the KV cache")?;
        Ok((runner, config))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_parse_with_binary_units() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5KB"), Ok(1536));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3X").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
