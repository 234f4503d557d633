//! A simulated disk for one shard's WAL: the live bytes and the durable bytes, apart.
//!
//! Writes land in a volatile queue; an fsync, once it completes, makes every write
//! issued before it started durable. A crash throws the volatile writes away, except
//! that a prefix of them may have reached the platter (whole writes, then a torn part
//! of the next one, possibly followed by the zeros of space the file had but never got
//! written). Recovery reads only the durable bytes, as redb's crash tests do.
//!
//! An fsync may also fail (`fail_sync`): its writes stay volatile, neither durable nor
//! lost, until a crash decides what of them remains. `flip` flips one bit, for the bit
//! flips the simulator injects (see `sim`'s module docs).
//!
//! Invariant: `durable` only grows by whole fsyncs or by what a crash kept, and after
//! recovery it is cut to the bytes that make up valid records. The disk must not call
//! into the shard: the simulator does that, with the positions this disk reports.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One write: its bytes and the WAL position of its last record.
#[derive(Debug, Clone)]
struct Write {
    bytes: Vec<u8>,
    position: u64,
}

/// What a crash left on the disk beyond the old durable bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashKept {
    /// Unsynced writes that survived whole.
    pub whole_writes: usize,
    /// Bytes of the next write that survived (a torn write), zero if none.
    pub torn_bytes: usize,
    /// Zero bytes that followed the torn part (space allocated, never written).
    pub zero_bytes: usize,
}

/// One shard's WAL file.
#[derive(Debug, Default)]
pub struct Disk {
    /// Bytes that survive a crash.
    pub durable: Vec<u8>,
    /// The WAL position of the last durable record.
    pub durable_position: u64,
    volatile: Vec<Write>,
    /// Writes covered by the fsync in flight (a prefix of `volatile`), if one is.
    syncing: Option<usize>,
}

impl Disk {
    /// Queues a write; it is volatile until an fsync that starts after it completes.
    pub fn write(&mut self, bytes: &[u8], position: u64) {
        self.volatile.push(Write { bytes: bytes.to_vec(), position });
    }

    /// True when there are writes that no fsync in flight covers.
    pub fn needs_sync(&self) -> bool {
        self.syncing.is_none() && !self.volatile.is_empty()
    }

    /// True while an fsync is in flight.
    pub fn is_syncing(&self) -> bool {
        self.syncing.is_some()
    }

    /// Starts an fsync covering every write issued so far.
    pub fn start_sync(&mut self) {
        debug_assert!(self.needs_sync());
        self.syncing = Some(self.volatile.len());
    }

    /// Completes the fsync in flight: its writes become durable. Returns the byte offset
    /// where the newly durable bytes start and the new durable position.
    pub fn finish_sync(&mut self) -> (usize, u64) {
        let covered = self.syncing.take().expect("an fsync is in flight");
        let start = self.durable.len();
        for write in self.volatile.drain(..covered) {
            self.durable.extend_from_slice(&write.bytes);
            self.durable_position = write.position;
        }
        (start, self.durable_position)
    }

    /// Fails the fsync in flight: nothing it covered is known to be durable. Its writes
    /// stay volatile: a crash may keep a prefix of them, as it may of any unsynced write
    /// (after a failed fsync the kernel may or may not have written the pages).
    pub fn fail_sync(&mut self) {
        assert!(self.syncing.take().is_some(), "an fsync is in flight");
    }

    /// Flips one bit of the byte at `offset` (media corruption or a damaged write).
    pub fn flip(&mut self, offset: usize, bit: u8) {
        self.durable[offset] ^= 1 << bit;
    }

    /// Loses power: the volatile writes are gone but for a random prefix. Returns the
    /// byte offset where the kept bytes start and what was kept.
    pub fn crash(&mut self, rng: &mut ChaCha8Rng, keep_prefix: bool, tear: bool) -> (usize, CrashKept) {
        let start = self.durable.len();
        let mut kept = CrashKept { whole_writes: 0, torn_bytes: 0, zero_bytes: 0 };
        self.syncing = None;
        let writes = std::mem::take(&mut self.volatile);
        if keep_prefix && !writes.is_empty() {
            kept.whole_writes = rng.gen_range(0..=writes.len());
            for write in &writes[..kept.whole_writes] {
                self.durable.extend_from_slice(&write.bytes);
            }
            if tear && kept.whole_writes < writes.len() {
                let next = &writes[kept.whole_writes].bytes;
                kept.torn_bytes = rng.gen_range(1..next.len());
                self.durable.extend_from_slice(&next[..kept.torn_bytes]);
                if rng.gen_bool(0.5) {
                    kept.zero_bytes = next.len() - kept.torn_bytes;
                    self.durable.resize(self.durable.len() + kept.zero_bytes, 0);
                }
            }
        }
        (start, kept)
    }

    /// Cuts the durable bytes to the `valid` bytes recovery accepted (a torn tail goes),
    /// and sets the durable position to the last record kept.
    pub fn truncate(&mut self, valid: usize, position: u64) {
        assert!(valid <= self.durable.len(), "recovery accepted more bytes than the disk has");
        self.durable.truncate(valid);
        self.durable_position = position;
    }
}
