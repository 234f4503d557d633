//! Open-addressing indexes from client ids (a SKU, a hold id) to dense slab slots.
//!
//! Why not `hashbrown`: the engine applies a batch of requests in passes, first asking
//! the memory system for every bucket the batch will touch ([`SkuIndex::prefetch`]),
//! then probing them; with a million SKUs every probe is a cache miss, and overlapping
//! those misses is what the throughput targets need. hashbrown does not expose bucket
//! addresses for prefetching. These tables are also fixed in size (every capacity is
//! bounded by `ShardConfig`), so they never rehash on the hot path.
//!
//! Both tables use linear probing over exactly `4/3` buckets per entry (at most 3/4
//! full), mapping a hash onto the buckets by multiply-shift rather than a power-of-two
//! mask, so that no table is up to twice the size it needs (the memory bounds are 64
//! bytes per SKU-location and 128 per live hold). Deletion (holds only) shifts later
//! entries back instead of leaving tombstones.

use crate::route::reduce;

const EMPTY: u32 = u32::MAX;

/// Issues a prefetch of the cache line holding `value`; a hint with no effect on results.
#[inline(always)]
pub(crate) fn prefetch<T>(value: &T) {
    prefetch_ptr(value as *const T);
}

/// Issues a prefetch of the cache line at `address`, which need not point to a value
/// (nor be valid memory at all): a hint with no effect on results.
#[inline(always)]
pub(crate) fn prefetch_ptr<T>(address: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: prefetching is a hint; it never faults or reads memory semantically,
        // whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// Spreads a key over the buckets: one multiply by 2^64 / golden ratio (Fibonacci
/// hashing), whose high bits, which `reduce` keeps, depend on every bit of the key and
/// spread consecutive keys evenly. Bucket placement is private to the process (indexes
/// are rebuilt on load), so unlike routing it may change.
#[inline]
fn spread(key: u64) -> u64 {
    key.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn buckets_for(entries_max: usize) -> usize {
    let buckets = (entries_max.max(1) * 4).div_ceil(3).max(8);
    assert!(buckets < u32::MAX as usize, "an index of {entries_max} entries is too large");
    buckets
}

/// The bucket after `bucket`, wrapping around a table of `buckets`.
#[inline]
fn next_bucket(bucket: usize, buckets: usize) -> usize {
    if bucket + 1 == buckets {
        0
    } else {
        bucket + 1
    }
}

/// How many buckets `to` lies after `from` in a table of `buckets`, wrapping around.
#[inline]
fn cyclic_distance(from: usize, to: usize, buckets: usize) -> usize {
    if to >= from {
        to - from
    } else {
        to + buckets - from
    }
}

/// 12 bytes: a SKU-location costs 16 bytes of index at 3/4 load.
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct SkuEntry {
    sku: u64,
    slot: u32,
}

/// Maps a SKU id to the slot of its first location in the stock slab. Never shrinks.
pub(crate) struct SkuIndex {
    entries: Vec<SkuEntry>,
    len: usize,
    len_max: usize,
}

impl SkuIndex {
    /// An index with room for `len_max` SKUs.
    pub(crate) fn new(len_max: usize) -> SkuIndex {
        let buckets = buckets_for(len_max);
        SkuIndex { entries: vec![SkuEntry { sku: 0, slot: EMPTY }; buckets], len: 0, len_max }
    }

    #[inline]
    fn bucket(&self, sku: u64) -> usize {
        reduce(spread(sku), self.entries.len() as u32) as usize
    }

    /// Hints that `sku` will be looked up soon.
    #[inline]
    pub(crate) fn prefetch(&self, sku: u64) {
        prefetch(&self.entries[self.bucket(sku)]);
    }

    /// The slot of `sku`, if it is indexed.
    #[inline]
    pub(crate) fn find(&self, sku: u64) -> Option<u32> {
        self.probe(sku).0
    }

    /// The slot of `sku`, if indexed, and the buckets the lookup read.
    #[inline]
    fn probe(&self, sku: u64) -> (Option<u32>, usize) {
        let mut bucket = self.bucket(sku);
        let mut probes = 1;
        loop {
            let entry = &self.entries[bucket];
            if entry.slot == EMPTY {
                return (None, probes);
            }
            if entry.sku == sku {
                return (Some(entry.slot), probes);
            }
            bucket = next_bucket(bucket, self.entries.len());
            probes += 1;
        }
    }

    /// Indexes `sku` at `slot`; false when the index is full. `sku` must not be indexed.
    pub(crate) fn insert(&mut self, sku: u64, slot: u32) -> bool {
        debug_assert!(self.find(sku).is_none());
        if self.len == self.len_max {
            return false;
        }
        let mut bucket = self.bucket(sku);
        while self.entries[bucket].slot != EMPTY {
            bucket = next_bucket(bucket, self.entries.len());
        }
        self.entries[bucket] = SkuEntry { sku, slot };
        self.len += 1;
        true
    }

    /// Number of indexed SKUs.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// A hold's entry: the id's low 64 bits, 32 more bits as a tag, and the slot. The rest of
/// the id lives in the hold record, which callers check (`is`) on a match, so two ids
/// that agree on these 96 bits are still told apart.
#[derive(Clone, Copy)]
#[repr(C)]
struct HoldEntry {
    id_lo: u64,
    tag: u32,
    slot: u32,
}

fn hold_key(id: u128) -> (u64, u32) {
    (id as u64, (id >> 64) as u32)
}

/// Maps a 128-bit hold id to its slot in the hold slab; supports removal.
pub(crate) struct HoldIndex {
    entries: Vec<HoldEntry>,
    len: usize,
    len_max: usize,
}

impl HoldIndex {
    /// An index with room for `len_max` holds.
    pub(crate) fn new(len_max: usize) -> HoldIndex {
        let buckets = buckets_for(len_max);
        HoldIndex { entries: vec![HoldEntry { id_lo: 0, tag: 0, slot: EMPTY }; buckets], len: 0, len_max }
    }

    #[inline]
    fn bucket_of(&self, id_lo: u64, tag: u32) -> usize {
        reduce(spread(id_lo ^ (u64::from(tag) << 32 | u64::from(tag))), self.entries.len() as u32) as usize
    }

    /// Hints that `id` will be looked up soon.
    #[inline]
    pub(crate) fn prefetch(&self, id: u128) {
        let (lo, tag) = hold_key(id);
        prefetch(&self.entries[self.bucket_of(lo, tag)]);
    }

    /// Hints that `id` will be removed soon: its bucket and the one after it, which
    /// removal reads to see whether an entry must shift back (in the next cache line
    /// for one bucket in four).
    #[inline]
    pub(crate) fn prefetch_removal(&self, id: u128) {
        let (lo, tag) = hold_key(id);
        let bucket = self.bucket_of(lo, tag);
        prefetch(&self.entries[bucket]);
        prefetch(&self.entries[next_bucket(bucket, self.entries.len())]);
    }

    /// The slot of hold `id`, if indexed; `is(slot)` confirms the full id on a match.
    #[inline]
    pub(crate) fn find(&self, id: u128, is: impl Fn(u32) -> bool) -> Option<u32> {
        let (lo, tag) = hold_key(id);
        let mut bucket = self.bucket_of(lo, tag);
        loop {
            let entry = &self.entries[bucket];
            if entry.slot == EMPTY {
                return None;
            }
            if entry.id_lo == lo && entry.tag == tag && is(entry.slot) {
                return Some(entry.slot);
            }
            bucket = next_bucket(bucket, self.entries.len());
        }
    }

    /// Indexes hold `id` at `slot`; false when full. `id` must not be indexed.
    pub(crate) fn insert(&mut self, id: u128, slot: u32) -> bool {
        if self.len == self.len_max {
            return false;
        }
        let (lo, tag) = hold_key(id);
        let mut bucket = self.bucket_of(lo, tag);
        while self.entries[bucket].slot != EMPTY {
            bucket = next_bucket(bucket, self.entries.len());
        }
        self.entries[bucket] = HoldEntry { id_lo: lo, tag, slot };
        self.len += 1;
        true
    }

    /// Removes the entry of hold `id` at `slot`; later entries of its run shift back.
    pub(crate) fn remove(&mut self, id: u128, slot: u32) -> bool {
        let (lo, tag) = hold_key(id);
        let buckets = self.entries.len();
        let mut hole = self.bucket_of(lo, tag);
        loop {
            let entry = self.entries[hole];
            if entry.slot == EMPTY {
                return false;
            }
            if entry.slot == slot && entry.id_lo == lo && entry.tag == tag {
                break;
            }
            hole = next_bucket(hole, buckets);
        }
        let mut next = next_bucket(hole, buckets);
        loop {
            let entry = self.entries[next];
            if entry.slot == EMPTY {
                break;
            }
            let home = self.bucket_of(entry.id_lo, entry.tag);
            // Move `entry` into the hole unless its home lies cyclically in (hole, next].
            let distance_home = cyclic_distance(home, next, buckets);
            let distance_hole = cyclic_distance(hole, next, buckets);
            if distance_home >= distance_hole {
                self.entries[hole] = entry;
                hole = next;
            }
            next = next_bucket(next, buckets);
        }
        self.entries[hole].slot = EMPTY;
        self.len -= 1;
        true
    }

    /// Number of indexed holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sku_index_refuses_past_its_bound() {
        let mut index = SkuIndex::new(3);
        assert!(index.insert(10, 0));
        assert!(index.insert(11, 1));
        assert!(index.insert(12, 2));
        assert!(!index.insert(13, 3));
        assert_eq!(index.find(11), Some(1));
        assert_eq!(index.find(13), None);
        assert_eq!(index.len(), 3);
    }

    /// A full index (3/4 of its buckets used) keeps lookups short for the key sets
    /// catalogs use: consecutive ids, ids with a prefix in the high bits, ids that step
    /// by a power of two, and scattered ones. Linear probing at 3/4 load averages 2.5
    /// probes with a perfectly random hash; a hash that clusters these sets does far worse.
    #[test]
    fn sku_lookups_stay_short_at_full_load() {
        let count = 300_000u64;
        type KeySet = (&'static str, fn(u64) -> u64);
        let sets: [KeySet; 4] = [
            ("consecutive", |i| 1_000_000 + i),
            ("prefixed", |i| 0xabcd << 48 | i),
            ("strided", |i| i << 20),
            ("scattered", |i| crate::route::mix64(i)),
        ];
        for (name, sku) in sets {
            let mut index = SkuIndex::new(count as usize);
            for i in 0..count {
                assert!(index.insert(sku(i), i as u32));
            }
            let probes: usize = (0..count).map(|i| index.probe(sku(i)).1).sum();
            let mean = probes as f64 / count as f64;
            assert!(mean < 3.0, "{name}: {mean:.2} probes per lookup");
            assert_eq!(index.find(sku(count / 2)), Some((count / 2) as u32));
        }
    }

    proptest! {
        /// The hold index agrees with a BTreeMap under any mix of inserts and removals,
        /// including long probe runs in a small table.
        #[test]
        fn hold_index_matches_model(ops in proptest::collection::vec((any::<bool>(), 0u128..64), 1..400)) {
            let mut index = HoldIndex::new(48);
            let mut model: BTreeMap<u128, u32> = BTreeMap::new();
            let mut ids: BTreeMap<u32, u128> = BTreeMap::new();
            let mut next_slot = 0u32;
            for (insert, key) in ops {
                // Ids that agree on their low 96 bits and differ above, and others.
                let id = key | ((key % 3) << 64) | ((key % 2) << 100);
                if insert {
                    if model.contains_key(&id) { continue; }
                    let inserted = index.insert(id, next_slot);
                    prop_assert_eq!(inserted, model.len() < 48);
                    if inserted {
                        model.insert(id, next_slot);
                        ids.insert(next_slot, id);
                    }
                    next_slot += 1;
                } else if let Some(slot) = model.remove(&id) {
                    prop_assert!(index.remove(id, slot));
                } else {
                    prop_assert!(!index.remove(id, next_slot));
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for key in 0u128..64 {
                let id = key | ((key % 3) << 64) | ((key % 2) << 100);
                prop_assert_eq!(index.find(id, |slot| ids[&slot] == id), model.get(&id).copied());
            }
        }
    }
}
