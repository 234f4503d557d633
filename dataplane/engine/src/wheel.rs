//! A hierarchical timer wheel with millisecond resolution, for hold expiries.
//!
//! Why our own: holds are armed and disarmed millions of times a second, and a linked
//! wheel would touch two random neighbours on every disarm (cache misses on the hot
//! path). This wheel never disarms: an entry is `(deadline, id, generation)` pushed onto
//! the bucket of its deadline (consecutive holds with the same TTL land in the same, hot,
//! bucket), and when it fires the caller checks whether the timer is still wanted (the
//! generation is still the id's current one, and the hold is live and due). Stale entries
//! are dropped when they fire or by [`Wheel::retain`], which the caller runs once stale
//! entries outnumber live ones, so memory stays proportional to live timers. Time is only ever an argument, which the general-purpose wheels
//! in the ecosystem (tokio's, for one) do not offer standalone.
//!
//! Layout: `LEVELS` levels of 64 buckets; level `l` buckets span `64^l` ms. An entry sits
//! in the lowest level whose window contains its deadline relative to `elapsed`, and
//! moves down a level each time time reaches its bucket, firing at level 0.
//! Invariants: every entry's deadline is `>= elapsed` until it fires; `next_deadline`
//! never exceeds the earliest deadline; an entry fires exactly once, at or after its
//! deadline and never before, unless `retain` drops it.

use std::mem;

const LEVELS: usize = 7;
const SLOTS: usize = 64;
/// The span of the whole wheel (2^42 ms, about 139 years); entries due after the wheel's
/// current rotation wait in an overflow list until the rotation ends.
const ROTATION_MASK: u64 = (1 << (6 * LEVELS as u64)) - 1;

/// An armed timer: its deadline, the id it belongs to, and the id's arming generation.
#[derive(Debug, Clone, Copy)]
struct Entry {
    deadline: u64,
    id: u32,
    generation: u32,
}

/// A timer wheel of `(deadline, id, generation)` entries.
pub(crate) struct Wheel {
    buckets: Vec<Vec<Entry>>,
    overflow: Vec<Entry>,
    occupied: [u64; LEVELS],
    elapsed: u64,
    len: usize,
}

impl Wheel {
    /// An empty wheel with time starting at `now`.
    pub(crate) fn new(now: u64) -> Wheel {
        Wheel {
            buckets: vec![Vec::new(); LEVELS * SLOTS],
            overflow: Vec::new(),
            occupied: [0; LEVELS],
            elapsed: now,
            len: 0,
        }
    }

    /// Entries waiting to fire, stale ones included.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn level_slot(&self, deadline: u64) -> (usize, usize) {
        let masked = (deadline ^ self.elapsed) | (SLOTS as u64 - 1);
        let significant = 63 - masked.leading_zeros() as usize;
        let level = (significant / 6).min(LEVELS - 1);
        let slot = ((deadline >> (level * 6)) as usize) % SLOTS;
        (level, slot)
    }

    /// Arms a timer for `id` at `deadline` (a time already past fires at the next advance).
    pub(crate) fn insert(&mut self, id: u32, generation: u32, deadline: u64) {
        self.place(Entry { deadline: deadline.max(self.elapsed), id, generation });
    }

    fn place(&mut self, entry: Entry) {
        self.len += 1;
        if (entry.deadline ^ self.elapsed) > ROTATION_MASK {
            self.overflow.push(entry);
            return;
        }
        let (level, slot) = self.level_slot(entry.deadline);
        self.buckets[level * SLOTS + slot].push(entry);
        self.occupied[level] |= 1 << slot;
    }

    /// When the current rotation ends and overflow entries must be placed again.
    fn rotation_end(&self) -> Option<u64> {
        if self.overflow.is_empty() {
            return None;
        }
        (self.elapsed | ROTATION_MASK).checked_add(1)
    }

    /// The earliest time at which `advance` may fire or move an entry, if any is armed.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        let Some(level) = (0..LEVELS).find(|level| self.occupied[*level] != 0) else {
            return self.rotation_end();
        };
        let shift = level * 6;
        let current = ((self.elapsed >> shift) as usize) % SLOTS;
        // Buckets before `current` at this level belong to the next rotation, which a
        // higher level holds, so only buckets at or after `current` can be occupied.
        let ahead = self.occupied[level] >> current;
        debug_assert!(ahead != 0, "occupied bucket behind the cursor");
        let slot = current + ahead.trailing_zeros() as usize;
        let base = self.elapsed & !((1u64 << (shift + 6)) - 1);
        Some((base + ((slot as u64) << shift)).max(self.elapsed))
    }

    /// Drops every entry for which `keep(id, generation)` is false.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u32, u32) -> bool) {
        for level in 0..LEVELS {
            for slot in 0..SLOTS {
                let bucket = &mut self.buckets[level * SLOTS + slot];
                if bucket.is_empty() {
                    continue;
                }
                self.len -= bucket.len();
                bucket.retain(|entry| keep(entry.id, entry.generation));
                self.len += bucket.len();
                if bucket.is_empty() {
                    self.occupied[level] &= !(1 << slot);
                }
            }
        }
        self.len -= self.overflow.len();
        self.overflow.retain(|entry| keep(entry.id, entry.generation));
        self.len += self.overflow.len();
    }

    /// Advances time to `now`, calling `fire(id, generation)` for every entry whose
    /// deadline is `<= now`.
    pub(crate) fn advance(&mut self, now: u64, mut fire: impl FnMut(u32, u32)) {
        while let Some(at) = self.next_deadline() {
            if at > now {
                break;
            }
            self.elapsed = at;
            let Some(level) = (0..LEVELS).find(|level| self.occupied[*level] != 0) else {
                // A new rotation: overflow entries now due within it move into the wheel.
                let overflow = mem::take(&mut self.overflow);
                self.len -= overflow.len();
                for entry in overflow {
                    self.place(entry);
                }
                continue;
            };
            let slot = ((at >> (level * 6)) as usize) % SLOTS;
            let index = level * SLOTS + slot;
            let mut entries = mem::take(&mut self.buckets[index]);
            self.occupied[level] &= !(1 << slot);
            self.len -= entries.len();
            for &entry in &entries {
                if entry.deadline <= at {
                    fire(entry.id, entry.generation);
                } else {
                    self.place(entry);
                }
            }
            // Give the bucket its allocation back, so steady traffic allocates nothing.
            entries.clear();
            if self.buckets[index].is_empty() {
                self.buckets[index] = entries;
            }
        }
        self.elapsed = self.elapsed.max(now);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fires_at_deadline_not_before() {
        let mut wheel = Wheel::new(1_000);
        wheel.insert(0, 0, 1_005);
        wheel.insert(1, 0, 1_000 + 70_000);
        let mut fired = Vec::new();
        wheel.advance(1_004, |id, _| fired.push(id));
        assert!(fired.is_empty());
        assert!(wheel.next_deadline().unwrap() <= 1_005);
        wheel.advance(1_005, |id, _| fired.push(id));
        assert_eq!(fired, vec![0]);
        wheel.advance(71_000 - 1, |id, _| fired.push(id));
        assert_eq!(fired, vec![0]);
        wheel.advance(71_000, |id, _| fired.push(id));
        assert_eq!(fired, vec![0, 1]);
        assert_eq!(wheel.len(), 0);
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn far_deadlines_wait_for_their_rotation() {
        let start = 1_000;
        let mut wheel = Wheel::new(start);
        let far = start + (1 << 46);
        wheel.insert(7, 0, far);
        wheel.insert(8, 0, u64::MAX);
        let mut fired = Vec::new();
        wheel.advance(far - 1, |id, _| fired.push(id));
        assert!(fired.is_empty());
        assert_eq!(wheel.len(), 2);
        wheel.advance(far, |id, _| fired.push(id));
        assert_eq!(fired, vec![7]);
        assert_eq!(wheel.len(), 1);
    }

    proptest! {
        /// Against a sorted set: every entry fires exactly when time reaches its deadline,
        /// never early and never twice. From small times and from wall-clock ones (the
        /// data plane's: milliseconds since 1970, whose high bits decide the levels), with
        /// deadlines up to an hour ahead and time moving up to a minute at a step.
        #[test]
        fn wheel_matches_model(
            start in prop_oneof![0u64..1_000_000, 1_700_000_000_000u64..2_000_000_000_000],
            ops in proptest::collection::vec((any::<bool>(), 0u32..32, 0u64..3_600_000), 1..300),
            step_max in prop_oneof![Just(5_000u64), Just(60_000u64)],
        ) {
            let mut wheel = Wheel::new(start);
            let mut model: BTreeSet<(u64, u32, usize)> = BTreeSet::new();
            let mut now = start;
            for (step, (insert, id, amount)) in ops.into_iter().enumerate() {
                if insert {
                    wheel.insert(id, step as u32, now + amount);
                    model.insert((now + amount, id, step));
                } else if amount % 7 == 0 {
                    // Drop the entries of odd steps, as a caller drops stale timers.
                    wheel.retain(|_, generation| generation % 2 == 0);
                    model.retain(|entry| entry.2 % 2 == 0);
                } else {
                    now += amount % step_max;
                    if let Some(next) = wheel.next_deadline() {
                        prop_assert!(next <= model.iter().next().unwrap().0);
                    }
                    let mut fired = Vec::new();
                    wheel.advance(now, |id, _| fired.push(id));
                    let mut expected = Vec::new();
                    while let Some(&entry) = model.iter().next() {
                        if entry.0 > now { break; }
                        model.remove(&entry);
                        expected.push(entry.1);
                    }
                    fired.sort_unstable();
                    expected.sort_unstable();
                    prop_assert_eq!(fired, expected);
                }
                prop_assert_eq!(wheel.len(), model.len());
            }
        }
    }
}
