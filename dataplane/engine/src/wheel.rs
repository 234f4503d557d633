//! A hierarchical timer wheel with millisecond resolution, for hold expiries.
//!
//! Why our own: the wheel links entries through arrays indexed by slab slot (no
//! allocation per timer, 12 bytes per slot), answers "when is the next deadline" in a
//! few bit operations for `poll_timeout`, and takes time only as an argument, which the
//! general-purpose wheels in the ecosystem (tokio's, for one) do not offer standalone.
//!
//! Layout: `LEVELS` levels of 64 slots; level `l` slots span `64^l` ms. An entry sits in
//! the lowest level whose window contains its deadline relative to `elapsed`, and moves
//! down a level each time time reaches its slot, firing at level 0. Invariant: every
//! entry's deadline is `>= elapsed` until it fires, and `next_deadline` never exceeds
//! the earliest real deadline.

const LEVELS: usize = 7;
const SLOTS: usize = 64;
const NONE: u32 = u32::MAX;
/// Deadlines further than this from `elapsed` are clamped to it (about 139 years).
const HORIZON_MS: u64 = (1 << (6 * LEVELS as u64)) - 1;

/// A timer wheel over the ids `0..capacity`.
pub(crate) struct Wheel {
    next: Vec<u32>,
    prev: Vec<u32>,
    deadline: Vec<u64>,
    heads: [[u32; SLOTS]; LEVELS],
    occupied: [u64; LEVELS],
    elapsed: u64,
    len: usize,
}

impl Wheel {
    /// A wheel for ids below `capacity`, with time starting at `now`.
    pub(crate) fn new(capacity: usize, now: u64) -> Wheel {
        Wheel {
            next: vec![NONE; capacity],
            prev: vec![NONE; capacity],
            deadline: vec![0; capacity],
            heads: [[NONE; SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            elapsed: now,
            len: 0,
        }
    }

    /// Number of armed timers.
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

    /// Arms timer `id` (which must not be armed) to fire at `deadline`.
    pub(crate) fn insert(&mut self, id: u32, deadline: u64) {
        let deadline = deadline.clamp(self.elapsed, self.elapsed.saturating_add(HORIZON_MS));
        self.deadline[id as usize] = deadline;
        let (level, slot) = self.level_slot(deadline);
        let head = self.heads[level][slot];
        self.next[id as usize] = head;
        self.prev[id as usize] = NONE;
        if head != NONE {
            self.prev[head as usize] = id;
        }
        self.heads[level][slot] = id;
        self.occupied[level] |= 1 << slot;
        self.len += 1;
    }

    /// Disarms timer `id`, which must be armed.
    pub(crate) fn remove(&mut self, id: u32) {
        let (level, slot) = self.level_slot(self.deadline[id as usize]);
        let (prev, next) = (self.prev[id as usize], self.next[id as usize]);
        if prev == NONE {
            debug_assert_eq!(self.heads[level][slot], id);
            self.heads[level][slot] = next;
            if next == NONE {
                self.occupied[level] &= !(1 << slot);
            }
        } else {
            self.next[prev as usize] = next;
        }
        if next != NONE {
            self.prev[next as usize] = prev;
        }
        self.len -= 1;
    }

    /// The earliest time at which `advance` may fire or move a timer, if any is armed.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        for level in 0..LEVELS {
            if self.occupied[level] == 0 {
                continue;
            }
            let shift = level * 6;
            let current = ((self.elapsed >> shift) as usize) % SLOTS;
            // Slots before `current` at this level belong to the next rotation, which a
            // higher level holds, so only slots at or after `current` can be occupied.
            let ahead = self.occupied[level] >> current;
            debug_assert!(ahead != 0, "occupied slot behind the cursor");
            let slot = current + ahead.trailing_zeros() as usize;
            let level_span = 1u64 << (shift + 6);
            let base = self.elapsed & !(level_span - 1);
            let start = base + ((slot as u64) << shift);
            return Some(start.max(self.elapsed));
        }
        None
    }

    /// Advances time to `now`, calling `fire` for every timer whose deadline is `<= now`,
    /// in deadline order at millisecond granularity. A fired timer is disarmed.
    pub(crate) fn advance(&mut self, now: u64, mut fire: impl FnMut(u32)) {
        while let Some(at) = self.next_deadline() {
            if at > now {
                break;
            }
            self.elapsed = at;
            let (level, slot) = {
                let mut found = (0, 0);
                for level in 0..LEVELS {
                    if self.occupied[level] != 0 {
                        found = (level, ((at >> (level * 6)) as usize) % SLOTS);
                        break;
                    }
                }
                found
            };
            let mut id = self.heads[level][slot];
            self.heads[level][slot] = NONE;
            self.occupied[level] &= !(1 << slot);
            while id != NONE {
                let next = self.next[id as usize];
                self.len -= 1;
                let deadline = self.deadline[id as usize];
                if deadline <= at {
                    fire(id);
                } else {
                    self.insert(id, deadline);
                }
                id = next;
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
        let mut wheel = Wheel::new(4, 1_000);
        wheel.insert(0, 1_005);
        wheel.insert(1, 1_000 + 70_000);
        let mut fired = Vec::new();
        wheel.advance(1_004, |id| fired.push(id));
        assert!(fired.is_empty());
        assert!(wheel.next_deadline().unwrap() <= 1_005);
        wheel.advance(1_005, |id| fired.push(id));
        assert_eq!(fired, vec![0]);
        wheel.advance(71_000 - 1, |id| fired.push(id));
        assert_eq!(fired, vec![0]);
        wheel.advance(71_000, |id| fired.push(id));
        assert_eq!(fired, vec![0, 1]);
        assert_eq!(wheel.len(), 0);
        assert_eq!(wheel.next_deadline(), None);
    }

    proptest! {
        /// Against a sorted set: a timer fires exactly when time reaches its deadline,
        /// never early, never twice, and removed timers never fire.
        #[test]
        fn wheel_matches_model(
            start in 0u64..1_000_000,
            ops in proptest::collection::vec((0u8..3, 0u32..32, 0u64..300_000), 1..300),
        ) {
            let mut wheel = Wheel::new(32, start);
            let mut model: BTreeSet<(u64, u32)> = BTreeSet::new();
            let mut armed = [None::<u64>; 32];
            let mut now = start;
            for (kind, id, amount) in ops {
                match kind {
                    0 if armed[id as usize].is_none() => {
                        let deadline = now + amount;
                        wheel.insert(id, deadline);
                        armed[id as usize] = Some(deadline);
                        model.insert((deadline, id));
                    }
                    1 => if let Some(deadline) = armed[id as usize].take() {
                        wheel.remove(id);
                        model.remove(&(deadline, id));
                    },
                    _ => {
                        now += amount % 5_000;
                        if let Some(next) = wheel.next_deadline() {
                            let earliest = model.iter().next().unwrap().0;
                            prop_assert!(next <= earliest);
                        }
                        let mut fired = Vec::new();
                        wheel.advance(now, |id| fired.push(id));
                        let mut expected = Vec::new();
                        while let Some(&(deadline, id)) = model.iter().next() {
                            if deadline > now { break; }
                            model.remove(&(deadline, id));
                            armed[id as usize] = None;
                            expected.push(id);
                        }
                        fired.sort_unstable();
                        expected.sort_unstable();
                        prop_assert_eq!(fired, expected);
                    }
                }
                prop_assert_eq!(wheel.len(), model.len());
            }
        }
    }
}
