//! Opt-in expert-load counters: how many tokens each MoE layer routed to each of its experts
//! (accumulated from the model's `RoutingTrace`). Counting only; no routing decisions here.

use std::collections::BTreeMap;

/// Tokens routed to each expert of each MoE layer since counting was (re)started. A token
/// routed to `top_k` experts counts once for each of them, so a layer's counts sum to
/// `tokens computed * top_k`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpertLoad {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// MoE layer index -> tokens routed to expert `e` at `[e]` (length `num_experts`).
    pub layers: BTreeMap<usize, Vec<u64>>,
}

impl ExpertLoad {
    pub fn new(num_experts: usize) -> Self {
        ExpertLoad {
            num_experts,
            layers: BTreeMap::new(),
        }
    }

    /// Adds one layer's expert choices (`[tokens, top_k]` row-major ids). Ids outside
    /// `0..num_experts` are ignored.
    pub fn record(&mut self, layer: usize, expert_ids: &[u32]) {
        let counts = self.layers.entry(layer).or_insert_with(|| vec![0; self.num_experts]);
        for &e in expert_ids {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
    }

    /// One layer's counts summed over `groups` equal runs of consecutive experts: the tokens
    /// each rank (expert-parallel group) computed. `groups` must divide the experts.
    pub fn group_counts(counts: &[u64], groups: usize) -> Vec<u64> {
        let per = (counts.len() / groups.max(1)).max(1);
        counts.chunks(per).map(|c| c.iter().sum()).collect()
    }

    /// Max over mean of one layer's counts (1.0 is perfectly even; 0 when nothing was routed).
    pub fn imbalance(counts: &[u64]) -> f64 {
        let total: u64 = counts.iter().sum();
        if counts.is_empty() || total == 0 {
            return 0.0;
        }
        let mean = total as f64 / counts.len() as f64;
        counts.iter().copied().max().unwrap_or(0) as f64 / mean
    }
}

#[cfg(test)]
mod tests {
    use super::ExpertLoad;

    #[test]
    fn counts_accumulate_per_layer_and_imbalance_is_max_over_mean() {
        let mut load = ExpertLoad::new(4);
        load.record(1, &[0, 1, 0, 2]);
        load.record(1, &[0, 3]);
        load.record(2, &[3, 3, 9]);
        assert_eq!(load.layers[&1], vec![3, 1, 1, 1]);
        assert_eq!(load.layers[&2], vec![0, 0, 0, 2]);
        assert_eq!(ExpertLoad::imbalance(&load.layers[&1]), 2.0);
        assert_eq!(ExpertLoad::imbalance(&[0, 0]), 0.0);
        assert_eq!(ExpertLoad::imbalance(&[5, 5]), 1.0);
        // Two expert-parallel groups of two experts: 4 and 2 tokens.
        let groups = ExpertLoad::group_counts(&load.layers[&1], 2);
        assert_eq!(groups, vec![4, 2]);
        assert!((ExpertLoad::imbalance(&groups) - 4.0 / 3.0).abs() < 1e-12);
    }
}
