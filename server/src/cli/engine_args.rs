//! Engine options shared by every command that runs the batching engine (vLLM's names):
//! sequence and token limits, the model length cap and the KV-cache size: given in bytes, or
//! on GPUs what `--gpu-memory-utilization` leaves after the weights and a profiling forward.

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use moe_engine::engine::EngineConfig;
use moe_engine::memory::{cache_budget, profile_steps, MemoryProfile};
use moe_engine::runner::{ModelRunner, DEFAULT_BLOCK_SIZE};
use moe_kernels::device_memory::{device_memory, peak_since, start_peak};
use moe_models::Model;

use super::model_args::{cuda_ordinal, rank_devices};

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

    /// KV-cache size in bytes, e.g. 2GiB, 512MiB, 1000000000: per GPU for a model split over
    /// GPUs, in all for one split over CPU ranks (they share the host's memory). Default on
    /// GPUs: from --gpu-memory-utilization; on the CPU: enough for max-num-seqs full-length
    /// sequences, at most 4GiB.
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_memory: Option<usize>,

    /// Fraction of each GPU's memory the server may use (weights, activations and KV cache),
    /// in (0, 1]: after loading, one forward at --max-num-batched-tokens measures the
    /// activation peak, and the cache gets the rest. Ignored with --kv-cache-memory and on
    /// the CPU.
    #[arg(long, default_value_t = 0.9, value_parser = parse_fraction)]
    pub gpu_memory_utilization: f32,

    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Compute every prompt from scratch instead of reusing the cached KV blocks of an equal
    /// prefix (prefix caching is on by default).
    #[arg(long, alias = "no-enable-prefix-caching")]
    pub no_prefix_caching: bool,
}

/// Parses a fraction in (0, 1].
pub fn parse_fraction(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{s:?} is not a fraction in (0, 1]")),
    }
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
        let num_layers = model.config().num_hidden_layers;
        let max_model_len = self.max_model_len.unwrap_or(model.config().max_position_embeddings);
        if max_model_len == 0 || self.block_size == 0 || self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            anyhow::bail!(
                "--max-model-len, --block-size, --max-num-seqs and --max-num-batched-tokens must be positive"
            );
        }
        let spec = model.kv_cache_spec();
        // What one rank keeps per token; CPU ranks share one memory, GPU ranks have their own.
        let per_token = spec.bytes_per_token(num_layers, model.dtype());
        let sharing = if model.device().is_cpu() {
            model.ranks().max(1)
        } else {
            1
        };
        let on_gpu = model.device().is_cuda();
        let sized_by = if self.kv_cache_memory.is_none() && on_gpu {
            format!("--gpu-memory-utilization {}", self.gpu_memory_utilization)
        } else {
            "--kv-cache-memory".to_string()
        };
        let (model, bytes) = match self.kv_cache_memory {
            Some(bytes) => (model, bytes / sharing),
            None if on_gpu => self.bytes_from_device_memory(model, max_model_len)?,
            None => {
                let wanted = self
                    .max_num_seqs
                    .saturating_mul(max_model_len)
                    .saturating_mul(per_token)
                    .saturating_mul(sharing);
                (model, wanted.min(4 << 30) / sharing)
            }
        };
        let num_blocks = ModelRunner::blocks_for_memory(&spec, num_layers, model.dtype(), bytes, self.block_size);
        let ranks = model.ranks();
        let per_rank = if ranks > 1 {
            format!(" a rank, on each of {ranks} ranks")
        } else {
            String::new()
        };
        if num_blocks * self.block_size < max_model_len {
            anyhow::bail!(
                "{sized_by}: {bytes} bytes{per_rank} hold {} tokens ({per_token} bytes each), fewer than --max-model-len {max_model_len}",
                num_blocks * self.block_size
            );
        }
        tracing::info!(
            "KV cache: {num_blocks} blocks of {} tokens, {} tokens ({} MiB{per_rank}; {}, {per_token} bytes a token)",
            self.block_size,
            num_blocks * self.block_size,
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

    /// Cache bytes per rank from `--gpu-memory-utilization`: one profiling forward of the
    /// largest step on a throwaway cache, then the smallest budget over the ranks' GPUs.
    /// Returns the model back with the bytes.
    fn bytes_from_device_memory(&self, model: Model, max_model_len: usize) -> anyhow::Result<(Model, usize)> {
        let devices = rank_devices(model.device(), model.ranks())?;
        let steps = profile_steps(self.max_num_batched_tokens, self.max_num_seqs, max_model_len);
        let blocks = steps
            .iter()
            .map(|s| ModelRunner::profile_blocks(s, self.block_size))
            .max()
            .unwrap_or(0);
        let runner = ModelRunner::new(model, blocks, self.block_size).context("allocating the profiling cache")?;
        let mut baselines = Vec::with_capacity(devices.len());
        for d in &devices {
            baselines.push(start_peak(d)?.unwrap_or(0));
        }
        for step in &steps {
            tracing::info!(
                "profiling a step of {} tokens in {} sequences (context up to {}) for --gpu-memory-utilization {}",
                step.iter().map(|c| c.len).sum::<usize>(),
                step.len(),
                step.iter().map(|c| c.start + c.len).max().unwrap_or(0),
                self.gpu_memory_utilization
            );
            runner.profile_step(step).context(
                "the profiling forward failed (lower --max-num-batched-tokens or --max-model-len, or give \
                 --kv-cache-memory)",
            )?;
        }
        let mut peaks = Vec::with_capacity(devices.len());
        for (d, &base) in devices.iter().zip(&baselines) {
            peaks.push(peak_since(d, base)?.unwrap_or(0));
        }
        let model = runner.into_model();
        let mut smallest: Option<usize> = None;
        for (rank, (d, &peak)) in devices.iter().zip(&peaks).enumerate() {
            let Some(memory) = device_memory(d)? else { continue };
            let profile = MemoryProfile {
                total: memory.total,
                used: memory.used(),
                activation_peak: peak as usize,
            };
            let budget = cache_budget(profile, self.gpu_memory_utilization)
                .map_err(|e| anyhow::anyhow!("{}: {e}", describe(d)))?;
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            tracing::info!(
                "rank {rank} on {}: {:.2} GiB of {:.2} GiB allowed; in use {:.2} GiB, activation peak {:.2} GiB, KV cache {:.2} GiB",
                describe(d),
                gib(budget.allowed),
                gib(memory.total),
                gib(profile.used),
                gib(profile.activation_peak),
                gib(budget.cache)
            );
            smallest = Some(smallest.map_or(budget.cache, |s| s.min(budget.cache)));
        }
        let bytes = smallest.context("no GPU memory could be read")?;
        Ok((model, bytes))
    }
}

fn describe(device: &Device) -> String {
    match cuda_ordinal(device) {
        Some(n) => format!("cuda:{n}"),
        None => format!("{:?}", device.location()),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_bytes, parse_fraction};

    #[test]
    fn utilization_is_a_fraction() {
        assert_eq!(parse_fraction("0.9"), Ok(0.9));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        assert!(parse_fraction("0").is_err());
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("most").is_err());
    }

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
