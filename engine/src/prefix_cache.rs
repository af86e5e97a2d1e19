//! The KV blocks the scheduler hands out, with automatic prefix caching on top of the
//! [`BlockPool`]: every *full, computed* block is indexed by a hash of its tokens chained with
//! the hash of the block before it, so one hash stands for a whole prefix. A new request
//! reuses the longest chain of its full prompt blocks found in the index and computes only
//! the rest. Blocks no request holds keep their hash and stay in the index until the pool
//! evicts them, least recently freed first. Knows token ids and block ids, never tensors.
//!
//! Exactness: a lookup compares each candidate block's tokens and its parent's hash with the
//! request's, so a hash collision can only mislead when two different *parents* collide on the
//! same 64-bit hash (about 2^-64 per pair).
//!
//! Only full blocks are indexed, and only after the step that wrote their last token: the
//! partial last block of a sequence is never shared while it is still being written, and a
//! shared block is never written again (a request writes only positions past its cached
//! prefix).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};

use crate::block_pool::{BlockId, BlockPool, BlockPoolError};

/// Hash of a block's tokens chained with the hash of every block before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// Stands in for the parent of a sequence's first block.
const ROOT_SEED: u64 = 0x6d6f_652d_656e_6769;

impl BlockHash {
    /// The hash of a block holding `tokens` after the prefix hashed to `parent`.
    pub fn chain(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        // SipHash with fixed keys: deterministic within a process, well mixed.
        let mut h = DefaultHasher::new();
        h.write_u64(parent.map_or(ROOT_SEED, |p| p.0));
        h.write_usize(tokens.len());
        for &t in tokens {
            h.write_u32(t);
        }
        BlockHash(h.finish())
    }

    /// Extends `hashes` (the chain hashes of the first `hashes.len()` full blocks of
    /// `token_ids`) to every full block of `token_ids`.
    pub fn extend_chain(hashes: &mut Vec<BlockHash>, token_ids: &[u32], block_size: usize) {
        for block in token_ids.chunks_exact(block_size).skip(hashes.len()) {
            let parent = hashes.last().copied();
            hashes.push(BlockHash::chain(parent, block));
        }
    }
}

/// Prompt tokens looked up and found since the scheduler started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens of admitted requests (each admission counts, a resumed one too).
    pub queried_tokens: u64,
    /// Of those, tokens taken from cached blocks instead of being computed.
    pub hit_tokens: u64,
}

/// One indexed block: where it is and what it must hold for a lookup to match.
#[derive(Debug, Clone)]
struct CachedBlock {
    id: BlockId,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

/// The pool of KV blocks plus, when prefix caching is on, the index of cached blocks.
#[derive(Debug)]
pub struct KvBlocks {
    pool: BlockPool,
    block_size: usize,
    /// `None` when prefix caching is off.
    index: Option<HashMap<BlockHash, CachedBlock>>,
    stats: PrefixCacheStats,
}

impl KvBlocks {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Result<Self, BlockPoolError> {
        Ok(Self {
            pool: BlockPool::new(num_blocks)?,
            block_size,
            index: enable_prefix_caching.then(HashMap::new),
            stats: PrefixCacheStats::default(),
        })
    }

    pub fn prefix_caching_enabled(&self) -> bool {
        self.index.is_some()
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks that can be allocated now: plain free ones plus cached ones (evicted on use).
    pub fn num_free(&self) -> usize {
        self.pool.num_free()
    }

    /// Free blocks that still hold an indexed prefix.
    pub fn num_cached(&self) -> usize {
        self.pool.num_cached()
    }

    /// Blocks some request holds.
    pub fn num_used(&self) -> usize {
        self.pool.num_used()
    }

    /// Blocks in the index (held by a request or not).
    pub fn num_indexed(&self) -> usize {
        self.index.as_ref().map_or(0, HashMap::len)
    }

    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Allocates `count` blocks, all or none, evicting cached blocks (least recently freed
    /// first) once no plain free block is left.
    pub fn allocate_many(&mut self, count: usize) -> Option<Vec<BlockId>> {
        if count > self.pool.num_free() {
            return None;
        }
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            let (id, evicted) = self.pool.allocate_evicting().expect("counted free blocks");
            if let (Some(hash), Some(index)) = (evicted, self.index.as_mut()) {
                if index.get(&BlockHash(hash)).is_some_and(|c| c.id == id) {
                    index.remove(&BlockHash(hash));
                }
            }
            ids.push(id);
        }
        Some(ids)
    }

    /// Drops one reference to each block of a sequence's table. Blocks are released last to
    /// first, so when several become free the end of a prefix is evicted before its start
    /// (a block is useless without the blocks before it).
    pub fn release(&mut self, block_table: &[BlockId]) -> Result<(), BlockPoolError> {
        block_table
            .iter()
            .rev()
            .try_for_each(|&id| self.pool.decref(id).map(|_| ()))
    }

    /// The cached blocks holding the longest prefix of `token_ids` made of whole blocks, at
    /// most `max_blocks` of them; `hashes` are the chain hashes of `token_ids`' full blocks.
    /// Takes no reference: call [`acquire`](Self::acquire) to keep them.
    pub fn longest_cached_prefix(&self, hashes: &[BlockHash], token_ids: &[u32], max_blocks: usize) -> Vec<BlockId> {
        let Some(index) = &self.index else { return Vec::new() };
        let mut found = Vec::new();
        let mut parent = None;
        for (hash, tokens) in hashes
            .iter()
            .zip(token_ids.chunks_exact(self.block_size))
            .take(max_blocks)
        {
            match index.get(hash) {
                Some(c) if c.parent == parent && *c.tokens == *tokens => found.push(c.id),
                _ => break,
            }
            parent = Some(*hash);
        }
        found
    }

    /// How many of `ids` are free now (acquiring them takes that many from the free count).
    pub fn count_free(&self, ids: &[BlockId]) -> usize {
        ids.iter().filter(|&&id| self.pool.ref_count(id) == Ok(0)).count()
    }

    /// Takes a reference to each block (reviving free cached ones).
    pub fn acquire(&mut self, ids: &[BlockId]) -> Result<(), BlockPoolError> {
        ids.iter().try_for_each(|&id| self.pool.acquire(id))
    }

    /// Indexes a full block that has just been computed. Returns false (and changes nothing)
    /// when caching is off or an equal block is indexed already (two requests computed the
    /// same prefix at once; the first one stays).
    pub fn register(
        &mut self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        id: BlockId,
    ) -> Result<bool, BlockPoolError> {
        let Some(index) = self.index.as_mut() else {
            return Ok(false);
        };
        if index.contains_key(&hash) || self.pool.content_hash(id)?.is_some() {
            return Ok(false);
        }
        self.pool.set_content_hash(id, hash.0)?;
        index.insert(
            hash,
            CachedBlock {
                id,
                parent,
                tokens: tokens.into(),
            },
        );
        Ok(true)
    }

    /// Counts one admission's lookup.
    pub fn record_lookup(&mut self, queried_tokens: usize, hit_tokens: usize) {
        if self.index.is_some() {
            self.stats.queried_tokens += queried_tokens as u64;
            self.stats.hit_tokens += hit_tokens as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
        let mut h = Vec::new();
        BlockHash::extend_chain(&mut h, tokens, BS);
        h
    }

    /// Allocates a table for `tokens`, indexes its full blocks and releases it.
    fn cache_sequence(blocks: &mut KvBlocks, tokens: &[u32]) -> Vec<BlockId> {
        let table = blocks.allocate_many(tokens.len().div_ceil(BS)).unwrap();
        let h = hashes(tokens);
        for (i, chunk) in tokens.chunks_exact(BS).enumerate() {
            let parent = i.checked_sub(1).map(|p| h[p]);
            assert!(blocks.register(h[i], parent, chunk, table[i]).unwrap());
        }
        blocks.release(&table).unwrap();
        table
    }

    #[test]
    fn chain_hashes_depend_on_the_whole_prefix() {
        let a = hashes(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let b = hashes(&[9, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(a.len(), 2);
        assert_ne!(a[1], b[1], "same second block after a different first one");
        assert_eq!(a, hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), "a partial block adds no hash");
        let mut grown = a[..1].to_vec();
        BlockHash::extend_chain(&mut grown, &[1, 2, 3, 4, 5, 6, 7, 8], BS);
        assert_eq!(grown, a);
    }

    #[test]
    fn longest_prefix_stops_at_the_first_mismatch_and_at_max_blocks() {
        let mut blocks = KvBlocks::new(8, BS, true).unwrap();
        let seq: Vec<u32> = (0..12).collect();
        let table = cache_sequence(&mut blocks, &seq);
        assert_eq!(blocks.num_cached(), 3);
        assert_eq!(blocks.num_used(), 0);

        let same = blocks.longest_cached_prefix(&hashes(&seq), &seq, usize::MAX);
        assert_eq!(same, table);
        assert_eq!(blocks.longest_cached_prefix(&hashes(&seq), &seq, 2), table[..2]);

        let mut diverging = seq.clone();
        diverging[5] = 99; // second block differs
        let d = blocks.longest_cached_prefix(&hashes(&diverging), &diverging, usize::MAX);
        assert_eq!(d, table[..1]);

        let shorter: Vec<u32> = (0..7).collect(); // ends mid-block
        assert_eq!(
            blocks.longest_cached_prefix(&hashes(&shorter), &shorter, usize::MAX),
            table[..1]
        );
    }

    #[test]
    fn lookups_verify_tokens_not_just_hashes() {
        let mut blocks = KvBlocks::new(4, BS, true).unwrap();
        let seq = [1, 2, 3, 4];
        let table = cache_sequence(&mut blocks, &seq);
        // Forge a request whose hash claims the cached block but whose tokens differ.
        let other = [5, 6, 7, 8];
        assert!(blocks.longest_cached_prefix(&hashes(&seq), &other, 1).is_empty());
        assert_eq!(blocks.longest_cached_prefix(&hashes(&seq), &seq, 1), table);
    }

    #[test]
    fn eviction_forgets_the_index_entry_and_plain_blocks_go_first() {
        let mut blocks = KvBlocks::new(4, BS, true).unwrap();
        let seq: Vec<u32> = (0..8).collect();
        let table = cache_sequence(&mut blocks, &seq);
        assert_eq!(
            (blocks.num_free(), blocks.num_cached(), blocks.num_indexed()),
            (4, 2, 2)
        );
        // Two plain blocks are handed out before any cached one.
        let plain = blocks.allocate_many(2).unwrap();
        assert!(plain.iter().all(|b| !table.contains(b)));
        assert_eq!(blocks.num_indexed(), 2);
        // The next one evicts the *last* block of the cached sequence first.
        let evicting = blocks.allocate_many(1).unwrap();
        assert_eq!(evicting, vec![table[1]]);
        assert_eq!(blocks.num_indexed(), 1);
        assert_eq!(blocks.longest_cached_prefix(&hashes(&seq), &seq, 2), table[..1]);
        assert_eq!(blocks.allocate_many(2), None, "all or nothing");
        assert_eq!(blocks.num_used() + blocks.num_free(), blocks.num_blocks());
    }

    #[test]
    fn acquire_shares_and_revives_and_counts_what_it_takes_from_free() {
        let mut blocks = KvBlocks::new(4, BS, true).unwrap();
        let seq: Vec<u32> = (0..8).collect();
        let table = cache_sequence(&mut blocks, &seq);
        assert_eq!(blocks.count_free(&table), 2);
        blocks.acquire(&table).unwrap();
        assert_eq!(blocks.count_free(&table), 0);
        blocks.acquire(&table[..1]).unwrap(); // a second request shares the first block
        assert_eq!(blocks.pool().ref_count(table[0]), Ok(2));
        assert_eq!((blocks.num_used(), blocks.num_cached()), (2, 0));
        blocks.release(&table[..1]).unwrap();
        assert_eq!(blocks.pool().ref_count(table[0]), Ok(1), "the other holder keeps it");
        blocks.release(&table).unwrap();
        assert_eq!((blocks.num_used(), blocks.num_cached()), (0, 2));
    }

    #[test]
    fn duplicates_and_disabled_caches_index_nothing() {
        let mut blocks = KvBlocks::new(4, BS, true).unwrap();
        let seq = [1, 2, 3, 4];
        let h = hashes(&seq);
        let a = blocks.allocate_many(2).unwrap();
        assert!(blocks.register(h[0], None, &seq, a[0]).unwrap());
        assert!(!blocks.register(h[0], None, &seq, a[1]).unwrap(), "same prefix twice");
        assert_eq!(blocks.pool().content_hash(a[1]), Ok(None));

        let mut off = KvBlocks::new(4, BS, false).unwrap();
        let b = off.allocate_many(1).unwrap();
        assert!(!off.register(h[0], None, &seq, b[0]).unwrap());
        off.record_lookup(10, 0);
        assert_eq!(off.stats(), PrefixCacheStats::default());
        assert!(off.longest_cached_prefix(&h, &seq, 1).is_empty());
    }
}
