//! The permutation of token slots into per-expert row tiles that the grouped expert GEMM
//! consumes: per-expert counts, offsets padded to the tile, the permuted slot list and the
//! expert of every tile. The CUDA kernels build the same arrays on the device (no host copy),
//! sized by the bounds [`max_padded_rows`] / [`max_tiles`], which depend only on the shapes.

/// Marks a padding row in [`ExpertPermutation::sorted_slots`].
pub const PAD_SLOT: u32 = u32::MAX;

/// Slots grouped by expert. With `S = tokens * top_k` slots and `E` experts:
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPermutation {
    /// Rows per GEMM tile; every expert's group is padded to a multiple of it.
    pub tile_rows: usize,
    /// `[E]` slots routed to each expert.
    pub counts: Vec<u32>,
    /// `[E + 1]` first permuted row of each expert; `offsets[E]` is the total padded rows.
    pub offsets: Vec<u32>,
    /// `[offsets[E]]` the slot of each permuted row, ascending within an expert, then
    /// [`PAD_SLOT`] up to the tile boundary.
    pub sorted_slots: Vec<u32>,
    /// `[offsets[E] / tile_rows]` the expert each tile belongs to. Experts with no slots own
    /// no tile, so they cost nothing.
    pub tile_experts: Vec<u32>,
}

impl ExpertPermutation {
    pub fn num_tiles(&self) -> usize {
        self.tile_experts.len()
    }
}

/// Upper bound on the tiles of any routing of `slots` slots over `num_experts` experts: each
/// non-empty expert wastes less than one tile.
pub fn max_tiles(slots: usize, num_experts: usize, tile_rows: usize) -> usize {
    slots / tile_rows + slots.min(num_experts)
}

/// Upper bound on the padded rows (`max_tiles * tile_rows`).
pub fn max_padded_rows(slots: usize, num_experts: usize, tile_rows: usize) -> usize {
    max_tiles(slots, num_experts, tile_rows) * tile_rows
}

/// Groups the slots of `expert_ids` (row-major `[tokens, top_k]`, flattened) by expert.
/// Ids `>= num_experts` are dropped (they own no row), as the kernels drop them.
pub fn permute_by_expert(expert_ids: &[u32], num_experts: usize, tile_rows: usize) -> ExpertPermutation {
    assert!(tile_rows > 0, "tile_rows must be positive");
    let mut by_expert: Vec<Vec<u32>> = vec![Vec::new(); num_experts];
    for (slot, &e) in expert_ids.iter().enumerate() {
        if let Some(rows) = by_expert.get_mut(e as usize) {
            rows.push(slot as u32);
        }
    }
    let mut counts = Vec::with_capacity(num_experts);
    let mut offsets = vec![0u32];
    let mut sorted_slots = Vec::new();
    let mut tile_experts = Vec::new();
    for (e, rows) in by_expert.into_iter().enumerate() {
        counts.push(rows.len() as u32);
        let padded = rows.len().next_multiple_of(tile_rows);
        sorted_slots.extend(&rows);
        sorted_slots.resize(sorted_slots.len() + padded - rows.len(), PAD_SLOT);
        tile_experts.extend(std::iter::repeat_n(e as u32, padded / tile_rows));
        offsets.push(sorted_slots.len() as u32);
    }
    ExpertPermutation {
        tile_rows,
        counts,
        offsets,
        sorted_slots,
        tile_experts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_group_by_expert_in_slot_order_with_padding() {
        // 3 tokens, top-2: slots 0..6 -> experts [2,0, 2,3, 0,2].
        let p = permute_by_expert(&[2, 0, 2, 3, 0, 2], 4, 2);
        assert_eq!(p.counts, vec![2, 0, 3, 1]);
        assert_eq!(p.offsets, vec![0, 2, 2, 6, 8]);
        let x = PAD_SLOT;
        assert_eq!(p.sorted_slots, vec![1, 4, 0, 2, 5, x, 3, x]);
        assert_eq!(p.tile_experts, vec![0, 2, 2, 3]);
    }

    #[test]
    fn bounds_hold_for_skewed_and_spread_routings() {
        for (slots, experts, tile) in [
            (1usize, 64usize, 16usize),
            (6, 64, 32),
            (1536, 64, 32),
            (24576, 256, 64),
        ] {
            // Spread: slot i -> expert i % E (the most padding); skewed: all but one on expert 0.
            let spread: Vec<u32> = (0..slots as u32).map(|i| i % experts as u32).collect();
            let mut skewed = vec![0u32; slots];
            skewed[slots - 1] = experts as u32 - 1;
            for ids in [spread, skewed] {
                let p = permute_by_expert(&ids, experts, tile);
                assert!(p.num_tiles() <= max_tiles(slots, experts, tile));
                assert_eq!(p.sorted_slots.len(), p.num_tiles() * tile);
                assert!(p.sorted_slots.len() <= max_padded_rows(slots, experts, tile));
                assert_eq!(p.counts.iter().sum::<u32>() as usize, slots);
            }
        }
    }

    #[test]
    fn out_of_range_ids_own_no_row() {
        let p = permute_by_expert(&[0, 9, 1], 2, 4);
        assert_eq!(p.counts, vec![1, 1]);
        assert_eq!(
            p.sorted_slots,
            vec![0, PAD_SLOT, PAD_SLOT, PAD_SLOT, 2, PAD_SLOT, PAD_SLOT, PAD_SLOT]
        );
    }
}
