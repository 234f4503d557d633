//! Snapshots: a shard's whole durable state at one WAL position, as one rkyv archive.
//!
//! A snapshot is what replaying the WAL up to its position builds, written out: the
//! slabs (stock rows, hold records, extra lines) and their free lists as they are, so
//! that a shard loaded from a snapshot allocates the same slots as one rebuilt from the
//! whole log; maps as pairs sorted by key, so that equal states give equal bytes. The
//! indexes and the expiry wheel are rebuilt on load (they follow from the slabs).
//!
//! The file (`docs/wal.md`, "Snapshots"): a 64-byte header (magic, format, shard,
//! shards, position, journal position, payload length, CRC32C of header and payload)
//! and the payload, validated with bytecheck before anything is read from it, so that
//! a damaged or foreign file is an error and never a panic. Nothing here performs I/O:
//! the driver reads and writes the bytes.

use std::collections::VecDeque;

use rkyv::rancor;
use thiserror::Error;

use super::{Adjustment, ExtraLine, Hold, Journaled, Participation, Phase, Shard, Stock, NONE};
use crate::cart::Cart;
use crate::config::{ConfigError, ShardConfig};
use crate::wheel::Wheel;
use crate::Tick;

/// The first 8 bytes of every snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"SPSNAP\r\n";
/// The snapshot format this engine writes and reads.
pub const SNAPSHOT_FORMAT: u32 = 2;
/// Bytes before the payload (a multiple of rkyv's largest alignment, 16).
pub const SNAPSHOT_HEADER_BYTES: usize = 64;

/// A snapshot file's bytes, 16-byte aligned so that its payload can be read in place.
pub type SnapshotBytes = rkyv::util::AlignedVec<16>;

/// Why a snapshot cannot be loaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// Shorter than its header or than the payload the header announces.
    #[error("snapshot is truncated: {len} bytes, {needed} needed")]
    Truncated {
        /// Bytes there are.
        len: usize,
        /// Bytes the header asks for.
        needed: usize,
    },
    /// Not a snapshot file.
    #[error("not a stockplane snapshot (bad magic)")]
    Magic,
    /// Written by another format.
    #[error("snapshot format {0}, this build reads format {SNAPSHOT_FORMAT}")]
    Format(u32),
    /// The checksum does not match: the file is damaged.
    #[error("snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// The CRC32C in the header.
        stored: u32,
        /// The CRC32C of the bytes.
        computed: u32,
    },
    /// Another shard's snapshot, or one of a data plane with another shard count.
    #[error("snapshot of shard {found} of {found_shards}, not of shard {shard} of {shards}")]
    WrongShard {
        /// The shard this is.
        shard: u32,
        /// Shards this data plane runs.
        shards: u32,
        /// The shard the snapshot is of.
        found: u32,
        /// The shard count it was taken with.
        found_shards: u32,
    },
    /// The payload is not a valid archive (bytecheck refused it).
    #[error("snapshot payload is invalid: {0}")]
    Invalid(String),
    /// The state does not fit this configuration's bounds, or contradicts itself.
    #[error("snapshot does not fit: {0}")]
    DoesNotFit(&'static str),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What a snapshot's header says (read without validating the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The shard.
    pub shard: u32,
    /// Shards of the data plane that wrote it.
    pub shards: u32,
    /// The WAL position of the last record the snapshot includes.
    pub position: u64,
    /// The journal position after that record.
    pub journal_next: u64,
    /// Payload bytes after the header.
    pub payload_bytes: u64,
}

impl SnapshotHeader {
    /// Reads and checks the header at the start of `bytes` (magic and format; the
    /// checksum needs the payload: see [`Shard::from_snapshot`]).
    pub fn read(bytes: &[u8]) -> Result<SnapshotHeader, SnapshotError> {
        if bytes.len() < SNAPSHOT_HEADER_BYTES {
            return Err(SnapshotError::Truncated { len: bytes.len(), needed: SNAPSHOT_HEADER_BYTES });
        }
        if bytes[0..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::Magic);
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let format = u32_at(8);
        if format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format(format));
        }
        Ok(SnapshotHeader {
            shard: u32_at(12),
            shards: u32_at(16),
            position: u64_at(24),
            journal_next: u64_at(32),
            payload_bytes: u64_at(40),
        })
    }
}

/// The CRC32C a snapshot stores at bytes 48..52: of the header without it, then the payload.
fn snapshot_crc(bytes: &[u8]) -> u32 {
    let head = crc32c::crc32c(&bytes[..48]);
    crc32c::crc32c_append(
        crc32c::crc32c_append(head, &bytes[52..SNAPSHOT_HEADER_BYTES]),
        &bytes[SNAPSHOT_HEADER_BYTES..],
    )
}

/// The durable state of a shard, as archived.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Image {
    stock: Vec<Stock>,
    hold_slab: Vec<Hold>,
    hold_free: Vec<u32>,
    /// Slots of finished holds that a newer hold of the same id replaced in the index:
    /// kept (they leave with the finished queue) but not indexed.
    superseded: Vec<u32>,
    arm_generation: Vec<u8>,
    extra_lines: Vec<ExtraLine>,
    extra_free: Vec<u32>,
    participations: Vec<(u32, Participation)>,
    forgotten_shares: Vec<(u128, u64, Tick)>,
    forgotten_order: Vec<u128>,
    live_holds: u32,
    finished_extra_lines: u64,
    finished: Vec<u32>,
    carts: Vec<(u128, Cart)>,
    cart_deadlines: Vec<(Tick, u128)>,
    carts_finished: Vec<u128>,
    next_txn: u64,
    adjustments: Vec<(u128, Adjustment)>,
    adjustment_order: Vec<u128>,
    journal: Vec<Journaled>,
    journal_next: u64,
    wal_head: u64,
}

fn sorted<K: Ord + Copy, V>(map: super::FixedMap<K, V>) -> Vec<(K, V)> {
    let mut pairs: Vec<(K, V)> = map.into_iter().collect();
    pairs.sort_unstable_by_key(|(k, _)| *k);
    pairs
}

impl Shard {
    /// This shard's durable state at its WAL position, as the bytes of a snapshot file
    /// (header included). Consumes the shard: its tables move into the archive's input
    /// instead of being copied, and the archive is written after the header in place, so
    /// a snapshot costs its own bytes and no second copy of the state. What waits in the
    /// outboxes (WAL bytes not yet taken, gated replies) is not state and is not included.
    pub fn into_snapshot(self) -> SnapshotBytes {
        let superseded = (0..self.hold_slab.len() as u32)
            .filter(|&slot| {
                let hold = &self.hold_slab[slot as usize];
                hold.phase != Phase::Free && self.holds.find(hold.id(), |found| found == slot).is_none()
            })
            .collect();
        let (shard, shards) = (self.config.shard, self.config.shards);
        let mut forgotten_shares: Vec<(u128, u64, Tick)> =
            self.forgotten_shares.into_iter().map(|(hold, (txn, expires_at))| (hold, txn, expires_at)).collect();
        forgotten_shares.sort_unstable_by_key(|s| s.0);
        let image = Image {
            stock: self.stock,
            hold_slab: self.hold_slab,
            hold_free: self.hold_free,
            superseded,
            arm_generation: self.arm_generation,
            extra_lines: self.extra_lines,
            extra_free: self.extra_free,
            participations: sorted(self.participations),
            forgotten_shares,
            forgotten_order: self.forgotten_order.into(),
            live_holds: self.live_holds,
            finished_extra_lines: self.finished_extra_lines as u64,
            finished: self.finished.into(),
            carts: sorted(self.carts),
            cart_deadlines: self.cart_deadlines.into_iter().collect(),
            carts_finished: self.carts_finished.into(),
            next_txn: self.next_txn,
            adjustments: sorted(self.adjustments),
            adjustment_order: self.adjustment_order.into(),
            journal: self.journal.into(),
            journal_next: self.journal_next,
            wal_head: self.wal_head,
        };
        let mut out = SnapshotBytes::with_capacity(SNAPSHOT_HEADER_BYTES);
        out.extend_from_slice(&[0u8; SNAPSHOT_HEADER_BYTES]);
        // Relative pointers and 16-byte alignment hold from the payload's start too (the
        // header is a multiple of 16 bytes), so the payload can be read in place.
        let mut out =
            rkyv::api::high::to_bytes_in::<_, rancor::Error>(&image, out).expect("a shard's state always archives");
        let payload_bytes = (out.len() - SNAPSHOT_HEADER_BYTES) as u64;
        out[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        out[8..12].copy_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
        out[12..16].copy_from_slice(&shard.to_le_bytes());
        out[16..20].copy_from_slice(&shards.to_le_bytes());
        out[24..32].copy_from_slice(&image.wal_head.to_le_bytes());
        out[32..40].copy_from_slice(&image.journal_next.to_le_bytes());
        out[40..48].copy_from_slice(&payload_bytes.to_le_bytes());
        let crc = snapshot_crc(&out);
        out[48..52].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// A shard loaded from a snapshot file's bytes, at time `now`, for `config` (which
    /// must be of the same shard and shard count, with bounds the state fits in). The
    /// payload is read in place when it starts at a 16-byte aligned address (read the
    /// file into an `rkyv::util::AlignedVec`), else copied once to such an address.
    /// Holds overdue at `now` expire at the first `handle_*`.
    pub fn from_snapshot(config: &ShardConfig, now: Tick, bytes: &[u8]) -> Result<Shard, SnapshotError> {
        let header = SnapshotHeader::read(bytes)?;
        let needed = (SNAPSHOT_HEADER_BYTES as u64).saturating_add(header.payload_bytes);
        if (bytes.len() as u64) < needed {
            return Err(SnapshotError::Truncated { len: bytes.len(), needed: needed as usize });
        }
        let bytes = &bytes[..needed as usize];
        let stored = u32::from_le_bytes(bytes[48..52].try_into().expect("4 bytes"));
        let computed = snapshot_crc(bytes);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        if header.shard != config.shard || header.shards != config.shards {
            return Err(SnapshotError::WrongShard {
                shard: config.shard,
                shards: config.shards,
                found: header.shard,
                found_shards: header.shards,
            });
        }
        let payload = &bytes[SNAPSHOT_HEADER_BYTES..];
        let decode = |payload: &[u8]| {
            rkyv::from_bytes::<Image, rancor::Error>(payload).map_err(|e| SnapshotError::Invalid(e.to_string()))
        };
        let image = if payload.as_ptr().align_offset(16) == 0 {
            decode(payload)?
        } else {
            let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
            aligned.extend_from_slice(payload);
            decode(&aligned)?
        };
        if image.wal_head != header.position || image.journal_next != header.journal_next {
            return Err(SnapshotError::DoesNotFit("the header's positions differ from the payload's"));
        }
        Shard::from_image(config, now, image)
    }

    fn from_image(config: &ShardConfig, now: Tick, image: Image) -> Result<Shard, SnapshotError> {
        let mut shard = Shard::new(config, now)?;
        check_image(config, &image)?;
        shard.stock.extend_from_slice(&image.stock);
        for (slot, row) in image.stock.iter().enumerate() {
            if shard.skus.find(row.sku).is_none() && !shard.skus.insert(row.sku, slot as u32) {
                return Err(SnapshotError::DoesNotFit("more SKUs than skus_max"));
            }
        }
        shard.hold_slab.extend_from_slice(&image.hold_slab);
        shard.hold_free = image.hold_free;
        shard.arm_generation.copy_from_slice(&image.arm_generation);
        shard.extra_lines.extend_from_slice(&image.extra_lines);
        shard.extra_free = image.extra_free;
        shard.expiry = Wheel::new(now);
        let mut superseded = image.superseded.iter().peekable();
        for (slot, hold) in image.hold_slab.iter().enumerate() {
            if hold.phase == Phase::Free {
                continue;
            }
            if superseded.next_if_eq(&&(slot as u32)).is_none() {
                let id = hold.id();
                let slab = &shard.hold_slab;
                if shard.holds.find(id, |found| slab[found as usize].id() == id).is_some()
                    || !shard.holds.insert(id, slot as u32)
                {
                    return Err(SnapshotError::DoesNotFit("a hold id is indexed twice"));
                }
            }
            if hold.phase.is_armed() {
                shard.expiry.insert(slot as u32, u32::from(image.arm_generation[slot]), hold.expires_at);
            }
        }
        shard.participations.extend(image.participations);
        shard.forgotten_shares.extend(image.forgotten_shares.into_iter().map(|(h, txn, at)| (h, (txn, at))));
        shard.forgotten_order = VecDeque::from(image.forgotten_order);
        shard.live_holds = image.live_holds;
        shard.finished_extra_lines = image.finished_extra_lines as usize;
        shard.finished.extend(image.finished);
        shard.carts.extend(image.carts);
        shard.cart_deadlines.extend(image.cart_deadlines);
        shard.carts_finished = VecDeque::from(image.carts_finished);
        shard.next_txn = image.next_txn;
        shard.adjustments.extend(image.adjustments);
        shard.adjustment_order = VecDeque::from(image.adjustment_order);
        shard.journal.extend(image.journal);
        shard.journal_next = image.journal_next;
        shard.wal_head = image.wal_head;
        shard.durable = image.wal_head;
        shard.stats.wal_records = image.wal_head;
        Ok(shard)
    }
}

/// Refuses a state that does not fit `config`'s bounds or whose slots point outside
/// their slabs, so that nothing loaded can index out of bounds later; and checks that
/// every row's `held` is the sum of its live holds' lines.
fn check_image(config: &ShardConfig, image: &Image) -> Result<(), SnapshotError> {
    let fail = |why| Err(SnapshotError::DoesNotFit(why));
    let hold_slots = (config.holds_max + config.holds_finished_max) as usize;
    let (rows, extras) = (image.stock.len(), image.extra_lines.len());
    if rows > config.sku_locations_max as usize {
        return fail("more SKU-locations than sku_locations_max");
    }
    if image.hold_slab.len() > hold_slots || image.arm_generation.len() != hold_slots {
        return fail("hold slots differ from holds_max + holds_finished_max");
    }
    if extras > config.hold_extra_lines_max as usize {
        return fail("more extra hold lines than hold_extra_lines_max");
    }
    if image.journal.len() > config.journal_entries_max as usize
        || image.adjustment_order.len() > config.adjustments_retained_max as usize
        || image.finished.len() > config.holds_finished_max as usize
    {
        return fail("more journal entries, adjustments or finished holds than their bounds");
    }
    if image.journal.iter().any(|entry| entry.row as usize >= rows) || image.journal_next <= image.journal.len() as u64
    {
        return fail("a journal entry's row is outside the stock slab, or the journal's positions start below 1");
    }
    for (slot, row) in image.stock.iter().enumerate() {
        if row.next_location != NONE && (row.next_location as usize <= slot || row.next_location as usize >= rows) {
            return fail("a stock row's next location is out of order");
        }
    }
    let slots = image.hold_slab.len();
    if image.superseded.windows(2).any(|w| w[0] >= w[1])
        || image.superseded.iter().any(|&s| s as usize >= slots || image.hold_slab[s as usize].phase.is_live())
    {
        return fail("a superseded hold is out of order, outside the slab, or live");
    }
    if image.hold_free.iter().chain(&image.finished).any(|&s| s as usize >= slots)
        || image.participations.iter().any(|&(s, _)| s as usize >= slots)
        || image.extra_free.iter().any(|&e| e as usize >= extras)
        || image.extra_lines.iter().any(|e| e.slot as usize >= rows || (e.next != NONE && e.next as usize >= extras))
    {
        return fail("a slot is outside its slab");
    }
    let mut held = vec![0i64; rows];
    let mut live = 0u32;
    for hold in image.hold_slab.iter().filter(|h| h.phase != Phase::Free) {
        if hold.line0_slot as usize >= rows || hold.lines == 0 {
            return fail("a hold's first line is outside the stock slab");
        }
        // Walk the extra lines no further than the hold says it has: no cycle can hang us.
        // A live hold's lines count towards their rows' `held` as they are walked.
        let is_live = hold.phase.is_live();
        let mut add = |row: u32, qty: u32| {
            if is_live {
                held[row as usize] += i64::from(qty);
            }
        };
        add(hold.line0_slot, hold.line0_qty);
        let mut count = 1;
        let mut extra = hold.extra;
        while extra != NONE {
            if count >= usize::from(hold.lines) {
                return fail("a hold has more lines than it says");
            }
            let line = image.extra_lines[extra as usize];
            add(line.slot, line.qty);
            count += 1;
            extra = line.next;
        }
        if count != usize::from(hold.lines) {
            return fail("a hold has fewer lines than it says");
        }
        live += u32::from(is_live);
    }
    if live != image.live_holds {
        return fail("live holds differ from the count");
    }
    for (row, held) in image.stock.iter().zip(held) {
        if row.held != held || row.available() < -i64::from(row.backorder_limit) {
            return fail("a row's held differs from its live holds, or it is oversold");
        }
    }
    Ok(())
}
