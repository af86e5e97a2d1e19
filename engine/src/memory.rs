//! Sizing the KV cache from device memory, as vLLM's `--gpu-memory-utilization` does: after
//! the weights are loaded, one profiling forward of the largest step the engine schedules
//! (`--max-num-batched-tokens` prompt tokens) measures the activation peak; the cache then
//! takes what is left of `utilization` x total memory once the memory in use (weights,
//! runtime, other processes) and that peak are set aside. Pure arithmetic here: the runner
//! runs the forward, `moe_kernels::device_memory` reads the device.

use std::fmt;

/// What one device's memory looked like around the profiling forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryProfile {
    /// The device's memory in all.
    pub total: usize,
    /// In use after the profile (its cache freed): weights, runtime, other processes.
    pub used: usize,
    /// The most bytes the profiling forward had live at once, beyond what it started with.
    pub activation_peak: usize,
}

/// The cache's share of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheBudget {
    /// `utilization` x `total`.
    pub allowed: usize,
    /// Bytes for the KV cache.
    pub cache: usize,
}

/// Why no cache fits.
#[derive(Debug, Clone, PartialEq)]
pub struct NoRoomForCache {
    pub profile: MemoryProfile,
    pub utilization: f32,
}

impl fmt::Display for NoRoomForCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let p = &self.profile;
        write!(
            f,
            "--gpu-memory-utilization {} of {:.2} GiB leaves no room for the KV cache: {:.2} GiB are in use \
             (weights, runtime, other processes) and a forward at --max-num-batched-tokens peaks {:.2} GiB \
             above that; raise --gpu-memory-utilization, lower --max-num-batched-tokens, or give \
             --kv-cache-memory",
            self.utilization,
            gib(p.total),
            gib(p.used),
            gib(p.activation_peak)
        )
    }
}

impl std::error::Error for NoRoomForCache {}

/// The cache bytes `utilization` (in (0, 1]) of the device allows after `profile`.
pub fn cache_budget(profile: MemoryProfile, utilization: f32) -> Result<CacheBudget, NoRoomForCache> {
    // The flag is a decimal like 0.9: read its f32 back at 6 digits, not as 0.8999999762.
    let fraction = (f64::from(utilization.clamp(0.0, 1.0)) * 1e6).round() / 1e6;
    let allowed = (profile.total as f64 * fraction) as usize;
    let taken = profile.used.saturating_add(profile.activation_peak);
    match allowed.checked_sub(taken) {
        Some(cache) if cache > 0 => Ok(CacheBudget { allowed, cache }),
        _ => Err(NoRoomForCache { profile, utilization }),
    }
}

/// One prompt chunk of a profiling step: `len` tokens from position `start` (the positions
/// before it are in the cache, as garbage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileChunk {
    pub start: usize,
    pub len: usize,
}

/// The profiling steps, whose peaks the cache must leave room for: the widest step (see
/// [`profile_sequences`], every sequence asking for logits) and the longest one, one chunk of
/// `min(max_num_batched_tokens, max_model_len)` tokens ending at `max_model_len` (attention
/// over a full context).
pub fn profile_steps(
    max_num_batched_tokens: usize,
    max_num_seqs: usize,
    max_model_len: usize,
) -> Vec<Vec<ProfileChunk>> {
    let wide: Vec<ProfileChunk> = profile_sequences(max_num_batched_tokens, max_num_seqs, max_model_len)
        .into_iter()
        .map(|len| ProfileChunk { start: 0, len })
        .collect();
    let len = max_num_batched_tokens.min(max_model_len);
    let long = vec![ProfileChunk {
        start: max_model_len - len,
        len,
    }];
    [wide, long]
        .into_iter()
        .filter(|s| s.iter().any(|c| c.len > 0))
        .collect()
}

/// The shape of the widest profiling step: `max_num_batched_tokens` prompt tokens split evenly over
/// as many sequences as may run at once (each asking for logits, as last prompt chunks do),
/// but never a sequence longer than `max_model_len`. Returns the tokens of each sequence.
pub fn profile_sequences(max_num_batched_tokens: usize, max_num_seqs: usize, max_model_len: usize) -> Vec<usize> {
    let tokens = max_num_batched_tokens;
    if tokens == 0 || max_model_len == 0 {
        return Vec::new();
    }
    let seqs = max_num_seqs.min(tokens).max(tokens.div_ceil(max_model_len)).max(1);
    (0..seqs)
        .map(|i| tokens / seqs + usize::from(i < tokens % seqs))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    #[test]
    fn the_cache_takes_what_utilization_leaves_after_weights_and_the_activation_peak() {
        // An 80 GiB device at 0.9: 72 GiB allowed; 30 GiB of weights and runtime and a 2 GiB
        // peak leave 40 GiB.
        let profile = MemoryProfile {
            total: 80 * GIB,
            used: 30 * GIB,
            activation_peak: 2 * GIB,
        };
        let b = cache_budget(profile, 0.9).unwrap();
        assert_eq!(b.allowed, 72 * GIB);
        assert_eq!(b.cache, 40 * GIB);
        assert_eq!(cache_budget(profile, 1.0).unwrap().cache, 48 * GIB);
        // 0.4 allows 32 GiB, exactly what is taken: no room, and the message names the flags.
        let err = cache_budget(profile, 0.4).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--gpu-memory-utilization 0.4 of 80.00 GiB"), "{text}");
        assert!(
            text.contains("30.00 GiB are in use") && text.contains("2.00 GiB above"),
            "{text}"
        );
        assert!(cache_budget(profile, 0.1).is_err());
    }

    #[test]
    fn the_profile_steps_are_the_widest_and_the_longest() {
        let steps = profile_steps(2048, 256, 4096);
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0], vec![ProfileChunk { start: 0, len: 8 }; 256]);
        assert_eq!(steps[1], vec![ProfileChunk { start: 2048, len: 2048 }]);
        // A model shorter than the token budget: one chunk of the whole length.
        assert_eq!(
            profile_steps(2048, 4, 1000)[1],
            vec![ProfileChunk { start: 0, len: 1000 }]
        );
        assert!(profile_steps(0, 4, 1000).is_empty());
    }

    #[test]
    fn the_profile_step_fills_the_token_budget_without_overlong_sequences() {
        // 2048 tokens over 256 sequences of 8.
        assert_eq!(profile_sequences(2048, 256, 4096), vec![8; 256]);
        // Fewer tokens than sequences: one token each.
        assert_eq!(profile_sequences(100, 256, 4096), vec![1; 100]);
        // One sequence may not hold 8192 tokens when the model takes 3000: three of them.
        assert_eq!(profile_sequences(8192, 1, 3000), vec![2731, 2731, 2730]);
        assert_eq!(profile_sequences(10, 3, 64), vec![4, 3, 3]);
        assert!(profile_sequences(0, 3, 64).is_empty());
        for (tokens, seqs, len) in [(2048, 256, 4096), (8192, 1, 3000), (5000, 7, 1000), (17, 4, 5)] {
            let lens = profile_sequences(tokens, seqs, len);
            assert_eq!(lens.iter().sum::<usize>(), tokens);
            assert!(lens.iter().all(|&l| (1..=len).contains(&l)));
        }
    }
}
