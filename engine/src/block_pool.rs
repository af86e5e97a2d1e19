//! Owns KV-cache block *ids*: which blocks are free, their reference counts, and a content-hash
//! slot per block for prefix caching. It never touches tensors and knows nothing of requests.
//!
//! Blocks live in one flat `Vec`. Free blocks are threaded into a doubly linked list through
//! their indices (no allocation per operation): `allocate` pops the head in O(1) and `take`
//! unlinks a specific free block from the middle in O(1). A block whose reference count drops
//! to zero goes to the *tail* if it still holds a content hash (a cached prefix someone may
//! reuse) and to the *head* otherwise (nothing worth keeping). So allocation first uses blocks
//! that hold nothing, then evicts cached blocks least recently freed first: an LRU cache.
//!
//! Three kinds of block, always summing to `num_blocks`: *used* (reference count > 0),
//! *cached* (free, with a content hash) and plain free (free, no hash).

use std::fmt;

/// Index of one block in the pool (and in every layer's cache tensor `[num_blocks, ...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// The id as an index into the cache tensors.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Misuse of the pool. Every one of these is a bug in the caller, reported instead of a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockPoolError {
    #[error("a block pool holds at most {max} blocks, {requested} requested")]
    TooManyBlocks { requested: usize, max: usize },

    #[error("block {id} does not exist (the pool has {num_blocks} blocks)")]
    OutOfRange { id: BlockId, num_blocks: usize },

    #[error("block {0} is free: it was freed twice or never allocated")]
    DoubleFree(BlockId),

    #[error("block {0} is free; only allocated blocks can be shared or hashed")]
    NotAllocated(BlockId),

    #[error("block {0} is already allocated")]
    AlreadyAllocated(BlockId),

    #[error("block {0} reference count overflow")]
    RefCountOverflow(BlockId),
}

/// Marks "no neighbour" in the free list.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockEntry {
    /// 0 means free (and linked into the free list).
    ref_count: u32,
    /// Hash of the tokens this block holds, set by the prefix cache once the block is full.
    content_hash: Option<u64>,
    /// Free-list neighbours; meaningful only while `ref_count == 0`.
    prev_free: u32,
    next_free: u32,
}

/// A fixed set of block ids with reference counts and an O(1) free list.
#[derive(Debug, Clone)]
pub struct BlockPool {
    blocks: Vec<BlockEntry>,
    free_head: u32,
    free_tail: u32,
    num_free: usize,
    /// Free blocks that keep a content hash.
    num_cached: usize,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks, handed out in increasing id order at first.
    pub fn new(num_blocks: usize) -> Result<Self, BlockPoolError> {
        let max = NIL as usize;
        if num_blocks > max {
            return Err(BlockPoolError::TooManyBlocks {
                requested: num_blocks,
                max,
            });
        }
        let n = num_blocks as u32;
        let blocks = (0..n)
            .map(|i| BlockEntry {
                ref_count: 0,
                content_hash: None,
                prev_free: if i == 0 { NIL } else { i - 1 },
                next_free: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect();
        Ok(Self {
            blocks,
            free_head: if n == 0 { NIL } else { 0 },
            free_tail: if n == 0 { NIL } else { n - 1 },
            num_free: num_blocks,
            num_cached: 0,
        })
    }

    /// Total number of blocks, free or not.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with reference count 0 (cached ones included: they can be evicted).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Free blocks that keep a content hash (a reusable prefix), evicted last.
    pub fn num_cached(&self) -> usize {
        self.num_cached
    }

    /// Blocks with reference count > 0.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free
    }

    /// Takes the block at the head of the free list (reference count becomes 1), or `None`
    /// when none is free. Its content hash is cleared: the caller is about to overwrite it.
    pub fn allocate(&mut self) -> Option<BlockId> {
        self.allocate_evicting().map(|(id, _)| id)
    }

    /// As [`allocate`](Self::allocate), also returning the content hash the block held, so a
    /// prefix cache can forget the evicted entry.
    pub fn allocate_evicting(&mut self) -> Option<(BlockId, Option<u64>)> {
        if self.free_head == NIL {
            return None;
        }
        let id = BlockId(self.free_head);
        self.unlink(id);
        let entry = &mut self.blocks[id.index()];
        entry.ref_count = 1;
        let evicted = entry.content_hash.take();
        Some((id, evicted))
    }

    /// Allocates `count` blocks, all or none (returns `None` and changes nothing when fewer
    /// than `count` are free).
    pub fn allocate_many(&mut self, count: usize) -> Option<Vec<BlockId>> {
        if count > self.num_free {
            return None;
        }
        Some(
            (0..count)
                .map(|_| self.allocate().expect("counted free blocks"))
                .collect(),
        )
    }

    /// Allocates one specific free block (reference count becomes 1), keeping its content
    /// hash. This is how a prefix-cache hit revives a freed block that still holds its tokens.
    pub fn take(&mut self, id: BlockId) -> Result<(), BlockPoolError> {
        if self.entry(id)?.ref_count != 0 {
            return Err(BlockPoolError::AlreadyAllocated(id));
        }
        self.unlink(id);
        self.blocks[id.index()].ref_count = 1;
        Ok(())
    }

    /// References `id` whether it is free (revived as by [`take`](Self::take)) or already
    /// allocated (shared as by [`incref`](Self::incref)).
    pub fn acquire(&mut self, id: BlockId) -> Result<(), BlockPoolError> {
        if self.entry(id)?.ref_count == 0 {
            self.take(id)
        } else {
            self.incref(id)
        }
    }

    /// Adds a reference to an allocated block (a second request sharing it).
    pub fn incref(&mut self, id: BlockId) -> Result<(), BlockPoolError> {
        let entry = self.entry_mut(id)?;
        if entry.ref_count == 0 {
            return Err(BlockPoolError::NotAllocated(id));
        }
        entry.ref_count = entry
            .ref_count
            .checked_add(1)
            .ok_or(BlockPoolError::RefCountOverflow(id))?;
        Ok(())
    }

    /// Drops a reference. At zero the block joins the free list: at the tail when it keeps a
    /// content hash (until it is allocated again), at the head when it has none. Returns the
    /// new reference count.
    pub fn decref(&mut self, id: BlockId) -> Result<u32, BlockPoolError> {
        let entry = self.entry_mut(id)?;
        if entry.ref_count == 0 {
            return Err(BlockPoolError::DoubleFree(id));
        }
        entry.ref_count -= 1;
        let remaining = entry.ref_count;
        if remaining == 0 {
            if entry.content_hash.is_some() {
                self.push_free_tail(id);
                self.num_cached += 1;
            } else {
                self.push_free_head(id);
            }
        }
        Ok(remaining)
    }

    /// Drops one reference to each block, in order. Stops at the first error.
    pub fn decref_all(&mut self, ids: &[BlockId]) -> Result<(), BlockPoolError> {
        ids.iter().try_for_each(|&id| self.decref(id).map(|_| ()))
    }

    /// Current reference count (0 = free).
    pub fn ref_count(&self, id: BlockId) -> Result<u32, BlockPoolError> {
        Ok(self.entry(id)?.ref_count)
    }

    /// Records the hash of the tokens an allocated block holds.
    pub fn set_content_hash(&mut self, id: BlockId, hash: u64) -> Result<(), BlockPoolError> {
        let entry = self.entry_mut(id)?;
        if entry.ref_count == 0 {
            return Err(BlockPoolError::NotAllocated(id));
        }
        entry.content_hash = Some(hash);
        Ok(())
    }

    /// The recorded content hash, if any (free blocks keep theirs until reallocated).
    pub fn content_hash(&self, id: BlockId) -> Result<Option<u64>, BlockPoolError> {
        Ok(self.entry(id)?.content_hash)
    }

    /// Forgets a block's content hash, returning what it was. A free block keeps its place in
    /// the free list but is no longer counted as cached.
    pub fn clear_content_hash(&mut self, id: BlockId) -> Result<Option<u64>, BlockPoolError> {
        let entry = self.entry_mut(id)?;
        let old = entry.content_hash.take();
        if old.is_some() && entry.ref_count == 0 {
            self.num_cached -= 1;
        }
        Ok(old)
    }

    fn entry(&self, id: BlockId) -> Result<&BlockEntry, BlockPoolError> {
        let num_blocks = self.blocks.len();
        self.blocks
            .get(id.index())
            .ok_or(BlockPoolError::OutOfRange { id, num_blocks })
    }

    fn entry_mut(&mut self, id: BlockId) -> Result<&mut BlockEntry, BlockPoolError> {
        let num_blocks = self.blocks.len();
        self.blocks
            .get_mut(id.index())
            .ok_or(BlockPoolError::OutOfRange { id, num_blocks })
    }

    /// Removes a free block from the free list. `id` must be valid and free.
    fn unlink(&mut self, id: BlockId) {
        let BlockEntry {
            prev_free, next_free, ..
        } = self.blocks[id.index()];
        match prev_free {
            NIL => self.free_head = next_free,
            prev => self.blocks[prev as usize].next_free = next_free,
        }
        match next_free {
            NIL => self.free_tail = prev_free,
            next => self.blocks[next as usize].prev_free = prev_free,
        }
        let entry = &mut self.blocks[id.index()];
        entry.prev_free = NIL;
        entry.next_free = NIL;
        if entry.content_hash.is_some() {
            self.num_cached -= 1;
        }
        self.num_free -= 1;
    }

    /// Puts a block (whose count just reached 0) at the head of the free list.
    fn push_free_head(&mut self, id: BlockId) {
        let old_head = self.free_head;
        {
            let entry = &mut self.blocks[id.index()];
            entry.prev_free = NIL;
            entry.next_free = old_head;
        }
        match old_head {
            NIL => self.free_tail = id.0,
            head => self.blocks[head as usize].prev_free = id.0,
        }
        self.free_head = id.0;
        self.num_free += 1;
    }

    /// Appends a block (whose count just reached 0) at the tail of the free list.
    fn push_free_tail(&mut self, id: BlockId) {
        let old_tail = self.free_tail;
        {
            let entry = &mut self.blocks[id.index()];
            entry.prev_free = old_tail;
            entry.next_free = NIL;
        }
        match old_tail {
            NIL => self.free_head = id.0,
            tail => self.blocks[tail as usize].next_free = id.0,
        }
        self.free_tail = id.0;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the free list head to tail, checking the back links and the count on the way.
    fn free_list(pool: &BlockPool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev = NIL;
        let mut cur = pool.free_head;
        while cur != NIL {
            let entry = &pool.blocks[cur as usize];
            assert_eq!(entry.ref_count, 0, "block {cur} on the free list is referenced");
            assert_eq!(entry.prev_free, prev, "back link of block {cur}");
            out.push(cur);
            prev = cur;
            cur = entry.next_free;
        }
        assert_eq!(pool.free_tail, prev);
        assert_eq!(out.len(), pool.num_free());
        out
    }

    #[test]
    fn new_pool_is_all_free_in_id_order() {
        let pool = BlockPool::new(4).unwrap();
        assert_eq!(pool.num_blocks(), 4);
        assert_eq!(pool.num_free(), 4);
        assert_eq!(pool.num_used(), 0);
        assert_eq!(free_list(&pool), vec![0, 1, 2, 3]);
    }

    #[test]
    fn empty_pool_allocates_nothing() {
        let mut pool = BlockPool::new(0).unwrap();
        assert_eq!(pool.allocate(), None);
        assert_eq!(free_list(&pool), Vec::<u32>::new());
    }

    #[test]
    fn allocate_until_exhausted_then_none() {
        let mut pool = BlockPool::new(3).unwrap();
        let ids: Vec<_> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(ids.iter().map(|b| b.index()).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.num_free(), 0);
        assert_eq!(pool.num_used(), 3);
        for id in ids {
            assert_eq!(pool.ref_count(id), Ok(1));
        }
    }

    #[test]
    fn allocate_many_is_all_or_nothing() {
        let mut pool = BlockPool::new(3).unwrap();
        assert_eq!(pool.allocate_many(4), None);
        assert_eq!(pool.num_free(), 3);
        assert_eq!(pool.allocate_many(2).unwrap().len(), 2);
        assert_eq!(pool.allocate_many(0), Some(vec![]));
        assert_eq!(pool.num_free(), 1);
    }

    #[test]
    fn freed_blocks_without_hash_go_to_the_head_and_cached_ones_to_the_tail() {
        let mut pool = BlockPool::new(5).unwrap();
        let ids: Vec<_> = (0..4).map(|_| pool.allocate().unwrap()).collect();
        pool.set_content_hash(ids[0], 10).unwrap();
        pool.set_content_hash(ids[1], 11).unwrap();
        assert_eq!(pool.decref(ids[1]), Ok(0));
        assert_eq!(pool.decref(ids[2]), Ok(0));
        assert_eq!(pool.decref(ids[0]), Ok(0));
        assert_eq!(pool.decref(ids[3]), Ok(0));
        // Plain blocks first (last freed first), then cached ones, least recently freed first.
        assert_eq!(free_list(&pool), vec![3, 2, 4, 1, 0]);
        assert_eq!(pool.num_free(), 5);
        assert_eq!(pool.num_cached(), 2);
        assert_eq!(pool.allocate_evicting(), Some((ids[3], None)));
        assert_eq!(pool.allocate_evicting(), Some((ids[2], None)));
        assert_eq!(pool.allocate_evicting(), Some((BlockId(4), None)));
        // Now the LRU cached block is evicted, and its hash is handed back.
        assert_eq!(pool.allocate_evicting(), Some((ids[1], Some(11))));
        assert_eq!(pool.num_cached(), 1);
        pool.take(ids[0]).unwrap();
        assert_eq!(pool.num_cached(), 0);
        assert_eq!(pool.content_hash(ids[0]), Ok(Some(10)));
    }

    #[test]
    fn acquire_revives_a_free_block_or_shares_a_used_one() {
        let mut pool = BlockPool::new(2).unwrap();
        let id = pool.allocate().unwrap();
        pool.set_content_hash(id, 5).unwrap();
        pool.acquire(id).unwrap();
        assert_eq!(pool.ref_count(id), Ok(2));
        pool.decref_all(&[id, id]).unwrap();
        assert_eq!(pool.num_cached(), 1);
        pool.acquire(id).unwrap();
        assert_eq!(pool.ref_count(id), Ok(1));
        assert_eq!(pool.num_cached(), 0);
        assert_eq!(free_list(&pool), vec![1]);
    }

    #[test]
    fn shared_block_is_freed_by_its_last_reference() {
        let mut pool = BlockPool::new(2).unwrap();
        let id = pool.allocate().unwrap();
        pool.incref(id).unwrap();
        assert_eq!(pool.ref_count(id), Ok(2));
        assert_eq!(pool.decref(id), Ok(1));
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.decref(id), Ok(0));
        assert_eq!(pool.num_free(), 2);
    }

    #[test]
    fn double_free_is_an_error_and_changes_nothing() {
        let mut pool = BlockPool::new(2).unwrap();
        let id = pool.allocate().unwrap();
        pool.decref(id).unwrap();
        assert_eq!(pool.decref(id), Err(BlockPoolError::DoubleFree(id)));
        assert_eq!(free_list(&pool), vec![0, 1]);
    }

    #[test]
    fn incref_of_free_block_is_an_error() {
        let mut pool = BlockPool::new(2).unwrap();
        let id = BlockId(1);
        assert_eq!(pool.incref(id), Err(BlockPoolError::NotAllocated(id)));
        assert_eq!(pool.num_free(), 2);
    }

    #[test]
    fn out_of_range_ids_are_errors() {
        let mut pool = BlockPool::new(2).unwrap();
        let bad = BlockId(2);
        let expected = BlockPoolError::OutOfRange { id: bad, num_blocks: 2 };
        assert_eq!(pool.incref(bad), Err(expected.clone()));
        assert_eq!(pool.decref(bad), Err(expected.clone()));
        assert_eq!(pool.take(bad), Err(expected.clone()));
        assert_eq!(pool.ref_count(bad), Err(expected.clone()));
        assert_eq!(pool.content_hash(bad), Err(expected.clone()));
        assert_eq!(pool.set_content_hash(bad, 1), Err(expected.clone()));
        assert_eq!(pool.clear_content_hash(bad), Err(expected));
        assert!(BlockPoolError::DoubleFree(bad).to_string().contains("freed twice"));
    }

    #[test]
    fn take_unlinks_from_head_middle_and_tail() {
        let mut pool = BlockPool::new(5).unwrap();
        pool.take(BlockId(2)).unwrap();
        assert_eq!(free_list(&pool), vec![0, 1, 3, 4]);
        pool.take(BlockId(0)).unwrap();
        assert_eq!(free_list(&pool), vec![1, 3, 4]);
        pool.take(BlockId(4)).unwrap();
        assert_eq!(free_list(&pool), vec![1, 3]);
        assert_eq!(pool.take(BlockId(4)), Err(BlockPoolError::AlreadyAllocated(BlockId(4))));
        assert_eq!(pool.ref_count(BlockId(2)), Ok(1));
        pool.take(BlockId(1)).unwrap();
        pool.take(BlockId(3)).unwrap();
        assert_eq!(free_list(&pool), Vec::<u32>::new());
        assert_eq!(pool.allocate(), None);
        pool.decref(BlockId(3)).unwrap();
        assert_eq!(free_list(&pool), vec![3]);
    }

    #[test]
    fn content_hash_survives_free_until_reallocation() {
        let mut pool = BlockPool::new(1).unwrap();
        let id = pool.allocate().unwrap();
        assert_eq!(pool.content_hash(id), Ok(None));
        pool.set_content_hash(id, 0xfeed).unwrap();
        assert_eq!(pool.content_hash(id), Ok(Some(0xfeed)));
        pool.decref(id).unwrap();
        // A free block keeps its hash (a prefix-cache hit may revive it) ...
        assert_eq!(pool.content_hash(id), Ok(Some(0xfeed)));
        assert_eq!(pool.set_content_hash(id, 1), Err(BlockPoolError::NotAllocated(id)));
        pool.take(id).unwrap();
        assert_eq!(pool.content_hash(id), Ok(Some(0xfeed)));
        assert_eq!(pool.clear_content_hash(id), Ok(Some(0xfeed)));
        assert_eq!(pool.content_hash(id), Ok(None));
        pool.set_content_hash(id, 7).unwrap();
        pool.decref(id).unwrap();
        // ... but plain allocation hands it out for overwriting, so the hash goes.
        let again = pool.allocate().unwrap();
        assert_eq!(again, id);
        assert_eq!(pool.content_hash(again), Ok(None));
    }

    #[test]
    fn too_many_blocks_is_rejected() {
        let requested = u32::MAX as usize + 1;
        assert!(matches!(
            BlockPool::new(requested),
            Err(BlockPoolError::TooManyBlocks { .. })
        ));
    }
}
