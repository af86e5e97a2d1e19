//! Layout arithmetic: which heads, kv heads, experts and slices each rank holds, and the
//! config checks that name the field that does not split.

use std::sync::Arc;

use moe_kernels::comm::LocalGroup;

use super::*;
use crate::config::ModelConfig;

fn shard(tp: usize, ep: usize, rank: usize) -> Shard {
    let layout = ParallelLayout::new(tp, ep).unwrap();
    let comm = LocalGroup::new(tp).swap_remove(rank);
    Shard::new(layout, Arc::new(comm)).unwrap()
}

#[test]
fn layouts_need_the_expert_groups_to_divide_the_ranks() {
    assert!(ParallelLayout::new(4, 3).is_err());
    assert!(ParallelLayout::new(0, 1).is_err());
    let l = ParallelLayout::new(4, 2).unwrap();
    assert_eq!(l.expert_slices(), 2);
    assert_eq!(l.describe(), "TP 4, EP 2 (experts sliced 2 ways)");
    assert_eq!(ParallelLayout::new(4, 4).unwrap().describe(), "TP 4, EP 4");
    // 8 experts in 2 groups of 4, each group on 2 ranks.
    assert_eq!(l.expert_ranks(0, 8), 0..2);
    assert_eq!(l.expert_ranks(5, 8), 2..4);
}

#[test]
fn ranks_hold_their_heads_experts_and_slices() {
    // TP 4 x EP 2: rank 3 is the second slice of expert group 1.
    let s = shard(4, 2, 3);
    assert_eq!(s.split(8, "heads").unwrap(), 6..8);
    assert_eq!(s.experts(8).unwrap(), 4..8);
    assert_eq!(s.expert_slice(32, "width").unwrap(), 16..32);
    // 2 kv heads over 4 ranks: ranks 2 and 3 read kv head 1; rank 2 counts it.
    assert_eq!(s.kv_heads(2).unwrap(), 1..2);
    assert!(!s.first_kv_replica(2));
    assert!(shard(4, 1, 2).first_kv_replica(2));
    // 8 kv heads split 2 a rank; every rank counts its own.
    assert_eq!(s.kv_heads(8).unwrap(), 6..8);
    assert!(s.first_kv_replica(8));
    assert!(s.kv_heads(3).is_err());
    // One expert group: every rank holds all experts, a quarter of each.
    let t = shard(4, 1, 1);
    assert_eq!(t.experts(8).unwrap(), 0..8);
    assert_eq!(t.expert_slice(32, "width").unwrap(), 8..16);
}

#[test]
fn configs_that_do_not_split_name_their_field() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/qwen3-30b-a3b/config.json");
    let config = ModelConfig::from_file(&dir).unwrap();
    // 32 heads, 4 kv heads, 128 experts of width 768.
    assert!(ParallelLayout::new(8, 8).unwrap().check(&config).is_ok());
    let err = ParallelLayout::new(3, 1)
        .unwrap()
        .check(&config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads = 32"), "{err}");
    // 16 ranks: 2 heads each, each of the 4 kv heads replicated on 4 ranks.
    assert!(ParallelLayout::new(16, 16).unwrap().check(&config).is_ok());
    let err = ParallelLayout::new(64, 1)
        .unwrap()
        .check(&config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads = 32"), "{err}");
}
