//! The shard: stock, holds, idempotency and the journal of one shard, and the single
//! place where state changes (`apply`).
//!
//! Every decision is made against the current state, written as a WAL record, and then
//! applied by `apply`, which is also all that recovery runs; so the live state and the
//! state rebuilt from the durable records cannot drift apart. Replies and peer messages
//! wait in an outbox until the records appended before them are durable.
//!
//! Layout, chosen so that a batch of requests on a million SKUs stays cheap: stock rows
//! live in one dense slab (40 bytes a row), found through a fixed open-addressing index;
//! holds live in a second slab (48 bytes, the first line inline); expiry is a timer wheel
//! of (deadline, slot, generation) entries that are never unlinked, only ignored once
//! stale. A batch is applied in chunks of 32 requests, each in four passes (prefetch the
//! index buckets, prefetch the rows and hold records, prefetch the rows of named holds
//! and the journal slots their commits will fill, apply), so that the chunk's cache
//! misses overlap.
//!
//! This module must not read a clock, perform I/O, or grow a table past its bound.

use std::collections::VecDeque;
use std::mem;

use hashbrown::HashMap;
use stockplane_wire::{
    ArchivedHoldsOf, ArchivedOp, ArchivedRequest, ArchivedRequestBatch, Body, HeldLine, HoldId, HoldInfo, HoldState,
    JournalChange, JournalEntry, Request, RequestBatch, Role, Status, StockLevel,
};
use thiserror::Error;

use crate::cart::Cart;
use crate::config::{ConfigError, ShardConfig};
use crate::index::{prefetch, HoldIndex, SkuIndex};
use crate::peer::PeerMessage;
use crate::ring::Ring;
use crate::route::{home_for, mix64, shard_for, ShardId};
use crate::wal::{self, Lines, WalDecodeError, WalLine, WalRecord, ANY_LOCATION};
use crate::wheel::Wheel;
use crate::Tick;

mod participant;
mod snapshot;

pub use snapshot::{
    SnapshotBytes, SnapshotError, SnapshotHeader, SNAPSHOT_FORMAT, SNAPSHOT_HEADER_BYTES, SNAPSHOT_MAGIC,
};

pub(crate) const NONE: u32 = u32::MAX;
/// The cursor of a hold's first line in `Shard::hold_line` walks.
const FIRST_LINE: u32 = u32::MAX - 1;
const PREFETCH_CHUNK: usize = 32;
/// The hold lookup memo's answer for an id that is not indexed (no slot is this high:
/// `ShardConfig::validate` bounds the slots by `HOLD_SLOTS_MAX`).
const UNKNOWN_HOLD: u32 = u32::MAX - 2;
/// Records between the one recovery prefetches for and the one it applies.
const RECOVER_PREFETCH: usize = 16;

pub(crate) type FixedMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

pub(crate) fn fixed_map<K, V>(capacity: usize) -> FixedMap<K, V> {
    HashMap::with_capacity_and_hasher(capacity, foldhash::fast::FixedState::with_seed(0x5eed_5eed))
}

/// Who sent a request: the connection to answer on, and the role its certificate grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The driver's id for the client connection; replies carry it back.
    pub client: u64,
    /// What the client may do.
    pub role: Role,
}

/// The answer to one request, addressed to the client that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The client connection to send it on.
    pub client: u64,
    /// The client's request id.
    pub request_id: u64,
    /// The outcome.
    pub status: Status,
    /// Data, for operations that return data.
    pub body: Body,
}

/// Counters a driver exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Requests handled.
    pub requests: u64,
    /// WAL records appended.
    pub wal_records: u64,
    /// WAL bytes appended.
    pub wal_bytes: u64,
    /// Holds that expired.
    pub expired: u64,
    /// Requests answered `busy`.
    pub busy: u64,
}

/// Why a shard could not be rebuilt from its WAL.
#[derive(Debug, Error)]
pub enum RecoverError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A record in the middle of the log is damaged (a damaged tail is cut, not an error).
    #[error("WAL record at byte {offset} is damaged: {source}")]
    Corrupt {
        /// Byte offset of the record.
        offset: usize,
        /// What is wrong with it.
        source: WalDecodeError,
    },
    /// Positions do not follow each other: a record is missing or repeated.
    #[error("WAL record at byte {offset} has position {found}, expected {expected}")]
    Gap {
        /// Byte offset of the record.
        offset: usize,
        /// The position expected.
        expected: u64,
        /// The position found.
        found: u64,
    },
    /// The snapshot recovery started from cannot be loaded.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// A record cannot apply to the state before it (a log from another shard, or a
    /// configuration with smaller bounds than the one that wrote it).
    #[error("WAL record at position {position} does not apply: {reason}")]
    Inapplicable {
        /// The record's position.
        position: u64,
        /// Why.
        reason: &'static str,
    },
}

/// A record that does not fit the state it is applied to.
pub(crate) type ApplyResult = Result<(), &'static str>;

#[derive(Debug, Clone, Copy, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Stock {
    on_hand: i64,
    held: i64,
    sku: u64,
    location: u32,
    backorder_limit: u32,
    next_location: u32,
}

impl Stock {
    fn available(&self) -> i64 {
        self.on_hand - self.held
    }

    fn can_hold(&self, qty: u32) -> bool {
        self.available() - i64::from(qty) >= -i64::from(self.backorder_limit)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[repr(u8)]
pub(crate) enum Phase {
    Free,
    Held,
    Prepared,
    Pinned,
    Committed,
    Released,
    Expired,
}

impl Phase {
    fn is_live(self) -> bool {
        matches!(self, Phase::Held | Phase::Prepared | Phase::Pinned)
    }

    /// True for the phases whose hold expires by the timer wheel (a pinned hold cannot).
    fn is_armed(self) -> bool {
        matches!(self, Phase::Held | Phase::Prepared)
    }

    fn hold_state(self) -> HoldState {
        match self {
            Phase::Committed => HoldState::Committed,
            Phase::Released => HoldState::Released,
            Phase::Expired => HoldState::Expired,
            _ => HoldState::Held,
        }
    }
}

#[derive(Debug, Clone, Copy, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Hold {
    id_lo: u64,
    id_hi: u64,
    expires_at: Tick,
    line0_slot: u32,
    line0_qty: u32,
    extra: u32,
    fingerprint: u32,
    phase: Phase,
    lines: u8,
    participant: bool,
}

impl Hold {
    fn id(&self) -> u128 {
        u128::from(self.id_lo) | (u128::from(self.id_hi) << 64)
    }
}

#[derive(Debug, Clone, Copy, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct ExtraLine {
    slot: u32,
    qty: u32,
    next: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Participation {
    coordinator: ShardId,
    reserve_txn: u64,
    pin_txn: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Adjustment {
    sku: u64,
    location: u32,
    delta: i64,
}

/// A journal entry as the shard keeps it, in 32 bytes instead of the wire's 64: its SKU
/// and location are its stock row's (rows are never removed or re-keyed) and its
/// position is its place in the journal. Each commit writes one, so its size is most of
/// the journal's traffic through the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Journaled {
    /// The hold of a sale, or the id of an adjustment (low and high halves).
    id_lo: u64,
    id_hi: u64,
    /// A sale's commit time, or an adjustment's delta (as its two's complement bits).
    value: u64,
    row: u32,
    /// A sale's units (a line holds at least one); 0 marks an adjustment.
    qty: u32,
}

impl Journaled {
    fn sale(row: u32, hold: u128, qty: u32, at_ms: u64) -> Journaled {
        debug_assert!(qty > 0);
        Journaled { id_lo: hold as u64, id_hi: (hold >> 64) as u64, value: at_ms, row, qty }
    }

    fn adjustment(row: u32, adjustment: u128, delta: i64) -> Journaled {
        Journaled { id_lo: adjustment as u64, id_hi: (adjustment >> 64) as u64, value: delta as u64, row, qty: 0 }
    }

    /// The entry as the wire carries it, at `position`, with its row `stock`.
    fn entry(&self, position: u64, stock: &Stock) -> JournalEntry {
        let id = u128::from(self.id_lo) | u128::from(self.id_hi) << 64;
        let change = if self.qty == 0 {
            JournalChange::Adjustment { adjustment: id, delta: self.value as i64 }
        } else {
            JournalChange::Sale { hold: HoldId(id), qty: self.qty, at_ms: self.value }
        };
        JournalEntry { position, sku: stock.sku, location: stock.location, change }
    }
}

/// One shard's stock and holds. See the crate documentation for how to drive it.
pub struct Shard {
    pub(crate) config: ShardConfig,
    pub(crate) now: Tick,
    skus: SkuIndex,
    stock: Vec<Stock>,
    holds: HoldIndex,
    /// The last hold looked up or indexed, and its slot (`NONE`: nothing remembered;
    /// `UNKNOWN_HOLD`: not indexed). Every change to the index updates it.
    hold_memo: std::cell::Cell<(u128, u32)>,
    hold_slab: Vec<Hold>,
    hold_free: Vec<u32>,
    extra_lines: Vec<ExtraLine>,
    extra_free: Vec<u32>,
    participations: FixedMap<u32, Participation>,
    /// Participant shares forgotten (evicted after they finished) before their cart's
    /// expiry: their reserve txn and expiry, so that a duplicated `Prepare` cannot hold
    /// their lines again while late messages could still sell them. Kept until expiry;
    /// when `holds_max + holds_finished_max` are remembered, new shares are refused.
    forgotten_shares: FixedMap<u128, (u64, Tick)>,
    forgotten_order: VecDeque<u128>,
    live_holds: u32,
    /// Extra lines (beyond the first) that finished holds kept in `finished` still own.
    finished_extra_lines: usize,
    expiry: Wheel,
    /// Per hold slot: bumped whenever the slot's timer is armed or disarmed, so that the
    /// wheel's stale entries (of finished, pinned or extended holds) can be told apart
    /// without touching the hold records.
    arm_generation: Vec<u8>,
    finished: VecDeque<u32>,
    pub(crate) carts: FixedMap<u128, Cart>,
    pub(crate) cart_deadlines: std::collections::BTreeSet<(Tick, u128)>,
    pub(crate) carts_finished: VecDeque<u128>,
    pub(crate) next_txn: u64,
    adjustments: FixedMap<u128, Adjustment>,
    adjustment_order: VecDeque<u128>,
    journal: Ring<Journaled>,
    journal_next: u64,
    wal_out: Vec<u8>,
    wal_head: u64,
    durable: u64,
    replies_ready: VecDeque<Reply>,
    replies_gated: VecDeque<(u64, Reply)>,
    peers_gated: VecDeque<(u64, ShardId, PeerMessage)>,
    scratch_lines: Vec<WalLine>,
    /// The rows (and quantities) `resolve_lines` picked: a hint for the `Held` record's
    /// apply that follows, checked against the record before it is used.
    scratch_slots: Vec<(u32, u32)>,
    scratch_rows: Vec<(u32, u32)>,
    scratch_ids: Vec<u32>,
    pub(crate) stats: ShardStats,
}

impl Shard {
    /// A shard with no SKUs and no holds, at time `now`, with every table allocated.
    pub fn new(config: &ShardConfig, now: Tick) -> Result<Shard, ConfigError> {
        config.validate()?;
        let hold_slots = (config.holds_max + config.holds_finished_max) as usize;
        Ok(Shard {
            config: config.clone(),
            now,
            skus: SkuIndex::new(config.skus_max as usize),
            stock: Vec::with_capacity(config.sku_locations_max as usize),
            holds: HoldIndex::new(hold_slots),
            hold_memo: std::cell::Cell::new((0, NONE)),
            hold_slab: Vec::with_capacity(hold_slots),
            hold_free: Vec::new(),
            extra_lines: Vec::with_capacity(config.hold_extra_lines_max as usize),
            extra_free: Vec::new(),
            participations: fixed_map(0),
            forgotten_shares: fixed_map(0),
            forgotten_order: VecDeque::new(),
            live_holds: 0,
            finished_extra_lines: 0,
            expiry: Wheel::new(now),
            arm_generation: vec![0; hold_slots],
            finished: VecDeque::with_capacity(config.holds_finished_max as usize + 1),
            carts: fixed_map(0),
            cart_deadlines: Default::default(),
            carts_finished: VecDeque::new(),
            next_txn: 1,
            adjustments: fixed_map(0),
            adjustment_order: VecDeque::new(),
            journal: Ring::new(config.journal_entries_max as usize),
            journal_next: 1,
            wal_out: Vec::new(),
            wal_head: 0,
            durable: 0,
            replies_ready: VecDeque::new(),
            replies_gated: VecDeque::new(),
            peers_gated: VecDeque::new(),
            scratch_lines: Vec::with_capacity(64),
            scratch_slots: Vec::with_capacity(64),
            scratch_rows: Vec::with_capacity(64),
            scratch_ids: Vec::new(),
            stats: ShardStats::default(),
        })
    }

    /// Rebuilds a shard from its durable WAL bytes, as they were appended.
    ///
    /// A damaged or partial last record (a torn write) ends the log; a damaged record
    /// followed by a valid one (anywhere after it, whatever its damaged length says) is
    /// corruption and an error. Returns the shard and the
    /// number of bytes that make up valid records. Holds whose expiry passed while the
    /// shard was down expire at the first `handle_*` call, each exactly once.
    pub fn recover(config: &ShardConfig, now: Tick, log: &[u8]) -> Result<(Shard, usize), RecoverError> {
        Shard::recover_from(config, now, None, log)
    }

    /// Rebuilds a shard from a snapshot (see [`Shard::into_snapshot`]; `None`: from empty) and
    /// the WAL bytes after it, as [`Shard::recover`] does from the whole log. The log may
    /// start at or before the record after the snapshot's position (segments of the log
    /// are deleted whole, so its first ones may hold records the snapshot includes: they
    /// are checked and skipped), never after it.
    pub fn recover_from(
        config: &ShardConfig,
        now: Tick,
        snapshot: Option<&[u8]>,
        log: &[u8],
    ) -> Result<(Shard, usize), RecoverError> {
        Shard::loaded(config, now, snapshot)?.resume(log)
    }

    /// Replays the records of `log` after this state's position (a shard just loaded
    /// from a snapshot, or a new one) and makes it ready to serve, as recovery does.
    pub fn resume(mut self, log: &[u8]) -> Result<(Shard, usize), RecoverError> {
        let valid = self.replay(log)?;
        self.durable = self.wal_head;
        self.cart_recover();
        Ok((self, valid))
    }

    /// The snapshot that a snapshot (`None`: an empty shard) and the WAL bytes after it
    /// make, without touching the shard that serves. Returns the new snapshot's bytes
    /// and the bytes of `log` that were valid records. A driver with its log in segments
    /// does the same one segment at a time: [`Shard::replay_log`] per segment, then
    /// [`Shard::into_snapshot`].
    pub fn compact(
        config: &ShardConfig,
        now: Tick,
        snapshot: Option<&[u8]>,
        log: &[u8],
    ) -> Result<(SnapshotBytes, usize), RecoverError> {
        let mut shard = Shard::loaded(config, now, snapshot)?;
        let valid = shard.replay(log)?;
        Ok((shard.into_snapshot(), valid))
    }

    /// The shard a snapshot holds, or a new one without a snapshot.
    fn loaded(config: &ShardConfig, now: Tick, snapshot: Option<&[u8]>) -> Result<Shard, RecoverError> {
        Ok(match snapshot {
            Some(bytes) => Shard::from_snapshot(config, now, bytes)?,
            None => Shard::new(config, now)?,
        })
    }

    /// Applies the records of `log` that follow this state's position, for a shard that
    /// has not served yet (loaded from a snapshot, or new): a driver that builds a
    /// snapshot from one log segment at a time calls it once per segment, then takes
    /// [`Shard::into_snapshot`]. Returns the bytes of valid records.
    pub fn replay_log(&mut self, log: &[u8]) -> Result<usize, RecoverError> {
        self.replay(log)
    }

    /// Applies the records of `log` that follow the state's position; returns the bytes
    /// of valid records.
    fn replay(&mut self, log: &[u8]) -> Result<usize, RecoverError> {
        let mut offset = 0;
        // The position the next record must have; the first may be any up to the one
        // after the state's (records at or before it are skipped).
        let mut expected: Option<u64> = None;
        // Replay is bound by cache misses on the index buckets of records' SKUs and holds:
        // fetch those of the record `RECOVER_PREFETCH` ahead while applying this one.
        let mut ahead = 0;
        let mut ahead_records = 0usize;
        let mut records = 0usize;
        while offset < log.len() {
            while ahead_records < records + RECOVER_PREFETCH && ahead + wal::HEADER_BYTES <= log.len() {
                let len = u16::from_le_bytes([log[ahead], log[ahead + 1]]) as usize;
                if len < wal::HEADER_BYTES || ahead + len > log.len() {
                    break;
                }
                match wal::peek_keys(&log[ahead..ahead + len]) {
                    (Some(sku), hold) => {
                        self.skus.prefetch(sku);
                        if let Some(hold) = hold {
                            self.holds.prefetch(hold);
                        }
                    }
                    (None, Some(hold)) => self.holds.prefetch(hold),
                    (None, None) => {}
                }
                ahead += len;
                ahead_records += 1;
            }
            records += 1;
            let (record, position, len) = match wal::decode(&log[offset..]) {
                Ok(decoded) => decoded,
                Err(source) => {
                    if tail_is_torn(&log[offset..], expected.unwrap_or(self.wal_head + 1)) {
                        break;
                    }
                    return Err(RecoverError::Corrupt { offset, source });
                }
            };
            let next = self.wal_head + 1;
            match expected {
                Some(expected) if position != expected => {
                    return Err(RecoverError::Gap { offset, expected, found: position });
                }
                None if position > next => return Err(RecoverError::Gap { offset, expected: next, found: position }),
                _ => {}
            }
            expected = Some(position + 1);
            if position == next {
                self.wal_head = position;
                self.apply(&record).map_err(|reason| RecoverError::Inapplicable { position, reason })?;
                self.stats.wal_records += 1;
            }
            offset += len;
        }
        Ok(offset)
    }

    /// This shard's configuration.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Counters for metrics.
    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Holds that currently hold stock on this shard.
    pub fn live_holds(&self) -> u32 {
        self.live_holds
    }

    /// Entries in the expiry wheel, stale ones included: at most about two per live hold.
    pub fn expiry_timers(&self) -> usize {
        self.expiry.len()
    }

    /// The position of the last WAL record produced (durable or not).
    pub fn wal_head(&self) -> u64 {
        self.wal_head
    }

    /// The position up to which the driver reported the WAL durable.
    pub fn durable_position(&self) -> u64 {
        self.durable
    }

    // ---------------------------------------------------------------- inputs

    /// Handles a batch of requests from one client, in order, as if one at a time.
    ///
    /// The batch is applied in chunks: first the index buckets every request will probe
    /// are prefetched, then the stock rows and hold records, then the requests applied,
    /// so that the chunk's cache misses overlap instead of following each other.
    pub fn handle_batch(&mut self, now: Tick, origin: Origin, batch: &ArchivedRequestBatch) {
        // One clock reading for the whole batch: expiries are applied once, up front.
        self.advance(now);
        for chunk in batch.requests.as_slice().chunks(PREFETCH_CHUNK) {
            let mut finishing = 0;
            for request in chunk {
                self.prefetch_buckets(&request.op);
                finishing += usize::from(matches!(request.op, ArchivedOp::Commit { .. } | ArchivedOp::Release { .. }));
            }
            // Finishing a hold evicts the oldest finished one: fetch those records too.
            for &slot in self.finished.iter().take(finishing) {
                prefetch(&self.hold_slab[slot as usize]);
            }
            // The slots of the holds the requests name, as the index suggests them.
            let mut named = [NONE; PREFETCH_CHUNK];
            for (request, named) in chunk.iter().zip(&mut named) {
                *named = self.prefetch_records(&request.op);
            }
            for &slot in self.finished.iter().take(finishing) {
                self.holds.prefetch_removal(self.hold_slab[slot as usize].id());
            }
            // Each line a commit sells adds a journal entry, in a slot long out of the cache.
            let mut sold = 0;
            for (request, &slot) in chunk.iter().zip(&named).filter(|(_, &slot)| slot != NONE) {
                self.prefetch_hold_row(slot);
                if matches!(request.op, ArchivedOp::Commit { .. }) {
                    sold += usize::from(self.hold_slab[slot as usize].lines);
                }
            }
            self.journal.prefetch_next(sold);
            for request in chunk {
                self.handle_current(origin, request);
            }
        }
    }

    /// First prefetch pass: the index buckets a request will probe.
    fn prefetch_buckets(&self, op: &ArchivedOp) {
        match op {
            ArchivedOp::Reserve { hold, lines, .. } => {
                self.holds.prefetch(hold.0.to_native());
                for line in lines.iter() {
                    self.skus.prefetch(line.sku.to_native());
                }
            }
            ArchivedOp::Commit { hold, .. } | ArchivedOp::Release { hold } | ArchivedOp::Extend { hold, .. } => {
                self.holds.prefetch(hold.0.to_native())
            }
            _ => {}
        }
    }

    /// Second pass: the stock rows a reserve names and the hold records others name.
    /// Returns the slot of the hold a commit or release names, unverified (`NONE`: none).
    fn prefetch_records(&self, op: &ArchivedOp) -> u32 {
        match op {
            ArchivedOp::Reserve { lines, .. } => {
                for line in lines.iter() {
                    if let Some(slot) = self.skus.find(line.sku.to_native()) {
                        prefetch(&self.stock[slot as usize]);
                    }
                }
            }
            ArchivedOp::Commit { hold, .. } | ArchivedOp::Release { hold } => {
                if let Some(slot) = self.find_hold_unverified(hold.0.to_native()) {
                    prefetch(&self.hold_slab[slot as usize]);
                    return slot;
                }
            }
            _ => {}
        }
        NONE
    }

    /// Third pass: the stock row of the first line of the hold at `slot` (which may
    /// belong to another hold than the request's: this is only a hint).
    fn prefetch_hold_row(&self, slot: u32) {
        if let Some(row) = self.stock.get(self.hold_slab[slot as usize].line0_slot as usize) {
            prefetch(row);
        }
    }

    /// Handles one request. Its reply comes out of [`Shard::poll_reply`] once durable.
    pub fn handle_request(&mut self, now: Tick, origin: Origin, request: &ArchivedRequest) {
        self.advance(now);
        self.handle_current(origin, request);
    }

    /// Handles one request at the current time (`advance` has run).
    fn handle_current(&mut self, origin: Origin, request: &ArchivedRequest) {
        self.stats.requests += 1;
        let id = request.id.to_native();
        let op = &request.op;
        if op.is_control_only() && origin.role != Role::Control {
            return self.reply_now(origin, id, Status::Forbidden, Body::Empty);
        }
        let changes_state =
            !matches!(op, ArchivedOp::QueryStock { .. } | ArchivedOp::QueryHolds { .. } | ArchivedOp::Journal { .. });
        if changes_state && self.outbox_len() >= self.config.outbox_max as usize {
            return self.reply_now(origin, id, Status::Busy, Body::Empty);
        }
        match op {
            ArchivedOp::Reserve { hold, ttl_ms, lines } => {
                self.reserve(origin, id, hold.0.to_native(), ttl_ms.to_native(), lines.as_slice())
            }
            ArchivedOp::Commit { hold, lines } => {
                let subset: Option<Vec<(u64, Option<u32>)>> = lines.as_ref().map(|lines| {
                    lines.iter().map(|l| (l.sku.to_native(), l.location.as_ref().map(|v| v.to_native()))).collect()
                });
                self.commit(origin, id, hold.0.to_native(), subset.as_deref())
            }
            ArchivedOp::Release { hold } => self.release(origin, id, hold.0.to_native()),
            ArchivedOp::Extend { hold, ttl_ms } => self.extend(origin, id, hold.0.to_native(), ttl_ms.to_native()),
            ArchivedOp::QueryStock { items } => {
                let items: Vec<(u64, Option<u32>)> =
                    items.iter().map(|i| (i.sku.to_native(), i.location.as_ref().map(|v| v.to_native()))).collect();
                self.query_stock(origin, id, &items)
            }
            ArchivedOp::QueryHolds { of } => match of {
                ArchivedHoldsOf::Sku(sku) => self.query_holds_of_sku(origin, id, sku.to_native()),
                ArchivedHoldsOf::Hold(hold) => self.query_hold(origin, id, hold.0.to_native()),
            },
            ArchivedOp::UpsertSku { sku, location, backorder_limit } => {
                self.upsert_sku(origin, id, sku.to_native(), location.to_native(), backorder_limit.to_native())
            }
            ArchivedOp::Adjust { adjustment, sku, location, delta } => self.adjust(
                origin,
                id,
                adjustment.to_native(),
                sku.to_native(),
                location.to_native(),
                delta.to_native(),
            ),
            ArchivedOp::Journal { shard, from, max_entries } => {
                if shard.to_native() != self.config.shard {
                    return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
                }
                self.read_journal(origin, id, from.to_native(), max_entries.to_native())
            }
        }
    }

    /// Handles one owned request by archiving it first: for tests and tools, not the hot path.
    pub fn handle_owned(&mut self, now: Tick, origin: Origin, request: &Request) {
        let batch = RequestBatch { requests: vec![request.clone()] };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&batch).expect("serialising to memory cannot fail");
        let archived =
            rkyv::access::<ArchivedRequestBatch, rkyv::rancor::Error>(&bytes).expect("a batch just archived is valid");
        self.handle_batch(now, origin, archived);
    }

    /// Handles a message from shard `from` (possibly this shard) about a cart.
    pub fn handle_peer(&mut self, now: Tick, from: ShardId, message: PeerMessage) {
        self.advance(now);
        // A participant answers Prepare, Pin and Extend with a vote, sent (once its
        // records are durable) from here.
        let (hold, txn, status) = match message {
            PeerMessage::Prepare { hold, txn, expires_at_ms, lines } => {
                (hold, txn, self.participant_prepare(from, hold.0, txn, expires_at_ms, &lines))
            }
            PeerMessage::Pin { hold, txn } => (hold, txn, self.participant_pin(hold.0, txn)),
            PeerMessage::Extend { hold, txn, expires_at_ms } => {
                (hold, txn, self.participant_extend(hold.0, txn, expires_at_ms))
            }
            PeerMessage::Decide { hold, txn, decision } => return self.participant_decide(from, hold.0, txn, decision),
            PeerMessage::Vote { hold, txn, status } => return self.cart_on_vote(from, hold.0, txn, status),
            PeerMessage::Ack { hold, txn } => return self.cart_on_ack(from, hold.0, txn),
        };
        self.send_peer(from, PeerMessage::Vote { hold, txn, status });
    }

    /// Records that every WAL record up to `position` is on disk; releases the replies
    /// and peer messages that waited for it.
    pub fn handle_durable(&mut self, position: u64) {
        assert!(position <= self.wal_head, "durable position {position} beyond head {}", self.wal_head);
        self.durable = self.durable.max(position);
    }

    /// Lets time pass: expires holds and carts, resends unanswered peer messages.
    pub fn handle_timeout(&mut self, now: Tick) {
        self.advance(now);
    }

    // ---------------------------------------------------------------- outputs

    /// Moves the encoded WAL records appended since the last call into `out` (cleared
    /// first); returns the position of the last one, or `None` if there were none.
    pub fn poll_wal_append(&mut self, out: &mut Vec<u8>) -> Option<u64> {
        out.clear();
        if self.wal_out.is_empty() {
            return None;
        }
        mem::swap(out, &mut self.wal_out);
        Some(self.wal_head)
    }

    /// The next reply that may leave: read-only answers at once, others once durable.
    pub fn poll_reply(&mut self) -> Option<Reply> {
        if let Some(reply) = self.replies_ready.pop_front() {
            return Some(reply);
        }
        match self.replies_gated.front() {
            Some((position, _)) if *position <= self.durable => self.replies_gated.pop_front().map(|(_, r)| r),
            _ => {
                // Drained: start the rings over at their beginning, whose cache lines are
                // warm, instead of walking the whole capacity.
                if self.replies_gated.is_empty() {
                    self.replies_gated.clear();
                }
                if self.replies_ready.is_empty() {
                    self.replies_ready.clear();
                }
                None
            }
        }
    }

    /// Hands every reply that may leave to `each`, in the order repeated calls of
    /// [`Shard::poll_reply`] would return them, and leaves none that may.
    ///
    /// The same outcome as calling `poll_reply` until `None`, for less per reply: the
    /// run of durable replies is found once (a binary search over positions, which only
    /// grow) and moved out in one pass, instead of a front check and two moves of the
    /// whole reply for each. A driver that drains everything after each batch calls this.
    pub fn drain_replies(&mut self, mut each: impl FnMut(Reply)) {
        self.replies_ready.drain(..).for_each(&mut each);
        let durable = self.durable;
        // Checked at both ends first: a driver drains after every batch it reads, and while
        // a sync runs the first gated reply already waits (the search cost 4 ns a request
        // at sync saturation, a tenth of what the log added to the serving core's user time).
        let leaving = match (self.replies_gated.front(), self.replies_gated.back()) {
            (Some(&(first, _)), _) if first > durable => 0,
            (_, Some(&(last, _))) if last <= durable => self.replies_gated.len(),
            (Some(_), _) => self.replies_gated.partition_point(|&(position, _)| position <= durable),
            (None, _) => 0,
        };
        self.replies_gated.drain(..leaving).for_each(|(_, reply)| each(reply));
        // As in `poll_reply`: drained rings start over at their warm beginning.
        if self.replies_gated.is_empty() {
            self.replies_gated.clear();
        }
        self.replies_ready.clear();
    }

    /// The next message to a peer shard that may leave (once durable).
    pub fn poll_peer(&mut self) -> Option<(ShardId, PeerMessage)> {
        match self.peers_gated.front() {
            Some((position, _, _)) if *position <= self.durable => self.peers_gated.pop_front().map(|(_, s, m)| (s, m)),
            _ => None,
        }
    }

    /// When [`Shard::handle_timeout`] must next be called, if anything is scheduled.
    pub fn poll_timeout(&self) -> Option<Tick> {
        let hold = self.expiry.next_deadline();
        let cart = self.cart_deadlines.first().map(|(at, _)| *at);
        match (hold, cart) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---------------------------------------------------------------- outbox

    fn outbox_len(&self) -> usize {
        self.replies_gated.len() + self.peers_gated.len()
    }

    pub(crate) fn reply_now(&mut self, origin: Origin, request_id: u64, status: Status, body: Body) {
        if status == Status::Busy {
            self.stats.busy += 1;
        }
        self.replies_ready.push_back(Reply { client: origin.client, request_id, status, body });
    }

    /// Queues a reply behind every record appended so far.
    pub(crate) fn reply_after_log(&mut self, client: u64, request_id: u64, status: Status, body: Body) {
        if status == Status::Busy {
            self.stats.busy += 1;
        }
        self.replies_gated.push_back((self.wal_head, Reply { client, request_id, status, body }));
    }

    /// Queues a peer message behind every record appended so far.
    pub(crate) fn send_peer(&mut self, to: ShardId, message: PeerMessage) {
        self.peers_gated.push_back((self.wal_head, to, message));
    }

    /// Encodes `record`, appends it to the WAL output, and applies it.
    pub(crate) fn log(&mut self, record: WalRecord<'_>) {
        self.wal_head += 1;
        let bytes = record.encode(self.wal_head, &mut self.wal_out);
        self.stats.wal_records += 1;
        self.stats.wal_bytes += bytes as u64;
        if let Err(reason) = self.apply(&record) {
            panic!("live record {record:?} does not apply: {reason}");
        }
    }

    // ---------------------------------------------------------------- time

    fn advance(&mut self, now: Tick) {
        if now > self.now {
            self.now = now;
        }
        let now = self.now;
        if self.expiry.len() > 0 && self.expiry.next_deadline().is_some_and(|at| at <= now) {
            let mut fired = mem::take(&mut self.scratch_ids);
            fired.clear();
            let generations = &self.arm_generation;
            self.expiry.advance(now, |slot, generation| {
                if u32::from(generations[slot as usize]) == generation {
                    fired.push(slot);
                }
            });
            for &slot in &fired {
                // Fire only a hold that is still armed and due.
                let hold = &self.hold_slab[slot as usize];
                if !hold.phase.is_armed() || hold.expires_at > now {
                    continue;
                }
                let id = hold.id();
                // The record's apply finishes the hold, which disarms it.
                self.stats.expired += 1;
                self.log(WalRecord::Expired { hold: id });
            }
            self.scratch_ids = fired;
        }
        if self.cart_deadlines.first().is_some_and(|(at, _)| *at <= now) {
            self.cart_tick();
        }
    }

    // ---------------------------------------------------------------- stock rows

    /// The stock row of `sku` at `location`.
    fn find_row(&self, sku: u64, location: u32) -> Option<u32> {
        let mut slot = self.skus.find(sku)?;
        while slot != NONE {
            let row = &self.stock[slot as usize];
            if row.location == location {
                return Some(slot);
            }
            slot = row.next_location;
        }
        None
    }

    /// Resolves lines to rows, checking stock as if they were all held at once.
    ///
    /// On success `scratch_lines` holds the resolved lines and the state is unchanged.
    fn resolve_lines(&mut self, lines: impl Iterator<Item = (u64, Option<u32>, u32)>) -> Result<(), Status> {
        self.scratch_lines.clear();
        self.scratch_slots.clear();
        let mut outcome = Ok(());
        for (sku, location, qty) in lines {
            let slot = match location {
                Some(location) => match self.find_row(sku, location) {
                    Some(slot) if self.stock[slot as usize].can_hold(qty) => slot,
                    Some(_) => {
                        outcome = Err(Status::InsufficientStock);
                        break;
                    }
                    None => {
                        outcome = Err(Status::UnknownSku);
                        break;
                    }
                },
                None => {
                    let Some(mut slot) = self.skus.find(sku) else {
                        outcome = Err(Status::UnknownSku);
                        break;
                    };
                    // Pick the first location (in the order they were created) that can
                    // hold the whole line.
                    while slot != NONE && !self.stock[slot as usize].can_hold(qty) {
                        slot = self.stock[slot as usize].next_location;
                    }
                    if slot == NONE {
                        outcome = Err(Status::InsufficientStock);
                        break;
                    }
                    slot
                }
            };
            // Count the line as held while resolving the next ones, so two lines of one
            // row are checked together; undone below.
            self.stock[slot as usize].held += i64::from(qty);
            self.scratch_slots.push((slot, qty));
            self.scratch_lines.push(WalLine { sku, location: self.stock[slot as usize].location, qty });
        }
        for &(slot, qty) in &self.scratch_slots {
            self.stock[slot as usize].held -= i64::from(qty);
        }
        outcome
    }

    fn level(&self, slot: u32) -> StockLevel {
        let row = &self.stock[slot as usize];
        StockLevel {
            sku: row.sku,
            location: row.location,
            on_hand: row.on_hand,
            held: row.held,
            available: row.available(),
            backorder_limit: row.backorder_limit,
        }
    }

    // ---------------------------------------------------------------- holds

    fn hold_lines(&self, slot: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
        let mut cursor = FIRST_LINE;
        std::iter::from_fn(move || {
            if cursor == NONE {
                return None;
            }
            let (row, qty, next) = self.hold_line(slot, cursor);
            cursor = next;
            Some((row, qty))
        })
    }

    /// One step of a walk over hold `slot`'s lines that borrows nothing between steps:
    /// `(row, qty, next)` for `cursor`. Start at `FIRST_LINE`; `NONE` ends the walk.
    #[inline]
    fn hold_line(&self, slot: u32, cursor: u32) -> (u32, u32, u32) {
        if cursor == FIRST_LINE {
            let record = &self.hold_slab[slot as usize];
            (record.line0_slot, record.line0_qty, record.extra)
        } else {
            let line = &self.extra_lines[cursor as usize];
            (line.slot, line.qty, line.next)
        }
    }

    fn hold_info(&self, slot: u32) -> HoldInfo {
        let record = &self.hold_slab[slot as usize];
        HoldInfo {
            hold: HoldId(record.id()),
            state: record.phase.hold_state(),
            expires_at_ms: record.expires_at,
            lines: self
                .hold_lines(slot)
                .map(|(row, qty)| {
                    let row = &self.stock[row as usize];
                    HeldLine { sku: row.sku, location: row.location, qty }
                })
                .collect(),
        }
    }

    fn hold_body(&self, slot: u32) -> Body {
        let record = &self.hold_slab[slot as usize];
        Body::Hold(HoldInfo {
            hold: HoldId(record.id()),
            state: record.phase.hold_state(),
            expires_at_ms: record.expires_at,
            lines: Vec::new(),
        })
    }

    fn validate_ttl(&self, ttl_ms: u32) -> Result<(), Status> {
        if ttl_ms < self.config.hold_ttl_ms_min || ttl_ms > self.config.hold_ttl_ms_max {
            return Err(Status::InvalidArgument);
        }
        Ok(())
    }

    fn reserve(
        &mut self,
        origin: Origin,
        id: u64,
        hold: u128,
        ttl_ms: u32,
        lines: &[stockplane_wire::ArchivedCartLine],
    ) {
        if home_for(HoldId(hold), self.config.shards) != self.config.shard {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        let line_of = |l: &stockplane_wire::ArchivedCartLine| {
            (l.sku.to_native(), l.location.as_ref().map(|v| v.to_native()), l.qty.to_native())
        };
        if let Err(status) = self.validate_ttl(ttl_ms).and_then(|()| self.validate_lines(lines.iter().map(line_of))) {
            return self.reply_now(origin, id, status, Body::Empty);
        }
        let fingerprint = fingerprint(ttl_ms, lines.iter().map(line_of));
        if self.is_cart(hold) && !self.cart_forget_failed(hold) {
            return self.cart_reserve_retry(origin, id, hold, fingerprint);
        }
        if let Some(slot) = self.find_hold(hold) {
            let record = self.hold_slab[slot as usize];
            if !record.participant {
                let status = if record.fingerprint == fingerprint { Status::Reserved } else { Status::Conflict };
                let body = self.hold_body(slot);
                return self.reply_after_log(origin.client, id, status, body);
            }
        }
        let shards = self.config.shards;
        let local = lines.iter().all(|l| shard_for(l.sku.to_native(), shards) == self.config.shard);
        if !local {
            let lines: Vec<WalLine> = lines
                .iter()
                .map(|l| {
                    let (sku, location, qty) = line_of(l);
                    WalLine { sku, location: location.unwrap_or(ANY_LOCATION), qty }
                })
                .collect();
            return self.cart_open(origin, id, hold, ttl_ms, fingerprint, lines);
        }
        if let Err(status) = self.hold_capacity(lines.len()) {
            return self.reply_now(origin, id, status, Body::Empty);
        }
        if let Err(status) = self.resolve_lines(lines.iter().map(line_of)) {
            return self.reply_after_log(origin.client, id, status, Body::Empty);
        }
        let expires_at_ms = self.now + u64::from(ttl_ms);
        let resolved = mem::take(&mut self.scratch_lines);
        self.log(WalRecord::Held {
            hold,
            expires_at_ms,
            fingerprint,
            prepared_for: None,
            lines: Lines::Slice(&resolved),
        });
        self.scratch_lines = resolved;
        let body =
            Body::Hold(HoldInfo { hold: HoldId(hold), state: HoldState::Held, expires_at_ms, lines: Vec::new() });
        self.reply_after_log(origin.client, id, Status::Reserved, body);
    }

    /// The slot that hold `id` probably has (96 bits of the id match): for prefetching,
    /// which must not touch the record it is about to fetch.
    #[inline]
    fn find_hold_unverified(&self, id: u128) -> Option<u32> {
        self.holds.find(id, |_| true)
    }

    /// The slot of hold `id`, if this shard has a record of it.
    ///
    /// A request touches its hold several times (prefetch passes, the decision, the
    /// record's apply); the last answer is remembered so that those cost one probe.
    /// That a hold is unknown is remembered too: a reserve asks before its record is
    /// applied, and the apply asks again.
    #[inline]
    fn find_hold(&self, id: u128) -> Option<u32> {
        let (memo_id, memo_slot) = self.hold_memo.get();
        if memo_id == id && memo_slot != NONE {
            return (memo_slot != UNKNOWN_HOLD).then_some(memo_slot);
        }
        let id_hi = (id >> 64) as u64;
        let found = self.holds.find(id, |slot| self.hold_slab[slot as usize].id_hi == id_hi);
        self.hold_memo.set((id, found.unwrap_or(UNKNOWN_HOLD)));
        found
    }

    /// Removes hold `id`'s index entry at `slot`, forgetting it in the lookup memo too.
    fn unindex_hold(&mut self, id: u128, slot: u32) {
        if self.hold_memo.get().0 == id {
            self.hold_memo.set((0, NONE));
        }
        self.holds.remove(id, slot);
    }

    /// True when this shard coordinates hold `id` as a cross-shard cart.
    #[inline]
    fn is_cart(&self, id: u128) -> bool {
        !self.carts.is_empty() && self.carts.contains_key(&id)
    }

    pub(crate) fn validate_lines(
        &self,
        lines: impl Iterator<Item = (u64, Option<u32>, u32)> + Clone,
    ) -> Result<(), Status> {
        let mut count = 0usize;
        for (index, (sku, location, qty)) in lines.clone().enumerate() {
            count += 1;
            if qty == 0 || qty > self.config.qty_max || count > self.config.cart_lines_max as usize {
                return Err(Status::InvalidArgument);
            }
            if lines.clone().take(index).any(|(other, other_location, _)| other == sku && other_location == location) {
                return Err(Status::InvalidArgument);
            }
        }
        if count == 0 {
            return Err(Status::InvalidArgument);
        }
        Ok(())
    }

    fn extra_lines_free(&self) -> usize {
        (self.extra_lines.capacity() - self.extra_lines.len()) + self.extra_free.len()
    }

    fn hold_capacity(&self, lines: usize) -> Result<(), Status> {
        let slots_free =
            self.hold_slab.len() < self.hold_slab.capacity() || !self.hold_free.is_empty() || !self.finished.is_empty();
        // Lines of finished holds can be reclaimed by forgetting those holds.
        let extra_free = self.extra_lines_free() + self.finished_extra_lines;
        if self.live_holds >= self.config.holds_max || !slots_free || lines.saturating_sub(1) > extra_free {
            return Err(Status::Busy);
        }
        Ok(())
    }

    fn commit(&mut self, origin: Origin, id: u64, hold: u128, subset: Option<&[(u64, Option<u32>)]>) {
        if home_for(HoldId(hold), self.config.shards) != self.config.shard {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        if self.is_cart(hold) {
            return self.cart_commit(origin, id, hold, subset);
        }
        let Some(slot) = self.local_hold(hold) else {
            return self.reply_after_log(origin.client, id, Status::UnknownHold, Body::Empty);
        };
        let record = self.hold_slab[slot as usize];
        let status = match record.phase {
            Phase::Held => {
                let mask = match subset {
                    None => all_lines(usize::from(record.lines)),
                    Some(_) => {
                        let keys: Vec<(u64, u32)> = self
                            .hold_lines(slot)
                            .map(|(row, _)| (self.stock[row as usize].sku, self.stock[row as usize].location))
                            .collect();
                        commit_mask(&keys, subset)
                    }
                };
                match mask {
                    Ok(mask) => {
                        self.log(WalRecord::Committed { hold, mask, at_ms: self.now });
                        Status::Committed
                    }
                    Err(status) => status,
                }
            }
            Phase::Committed => Status::Committed,
            Phase::Released => Status::AlreadyReleased,
            _ => Status::HoldExpired,
        };
        let body = self.hold_body(slot);
        self.reply_after_log(origin.client, id, status, body);
    }

    fn local_hold(&self, hold: u128) -> Option<u32> {
        self.find_hold(hold).filter(|slot| !self.hold_slab[*slot as usize].participant)
    }

    fn release(&mut self, origin: Origin, id: u64, hold: u128) {
        if home_for(HoldId(hold), self.config.shards) != self.config.shard {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        if self.is_cart(hold) {
            return self.cart_release(origin, id, hold);
        }
        let Some(slot) = self.local_hold(hold) else {
            return self.reply_after_log(origin.client, id, Status::UnknownHold, Body::Empty);
        };
        let status = match self.hold_slab[slot as usize].phase {
            Phase::Held => {
                self.log(WalRecord::Released { hold });
                Status::Released
            }
            Phase::Committed => Status::AlreadyCommitted,
            Phase::Released => Status::Released,
            _ => Status::HoldExpired,
        };
        let body = self.hold_body(slot);
        self.reply_after_log(origin.client, id, status, body);
    }

    fn extend(&mut self, origin: Origin, id: u64, hold: u128, ttl_ms: u32) {
        if home_for(HoldId(hold), self.config.shards) != self.config.shard {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        if let Err(status) = self.validate_ttl(ttl_ms) {
            return self.reply_now(origin, id, status, Body::Empty);
        }
        if self.is_cart(hold) {
            return self.cart_extend(origin, id, hold, ttl_ms);
        }
        let Some(slot) = self.local_hold(hold) else {
            return self.reply_after_log(origin.client, id, Status::UnknownHold, Body::Empty);
        };
        let record = self.hold_slab[slot as usize];
        let status = match record.phase {
            Phase::Held => {
                let expires_at_ms = record.expires_at.max(self.now + u64::from(ttl_ms));
                self.log(WalRecord::Extended { hold, expires_at_ms });
                Status::Extended
            }
            Phase::Committed => Status::AlreadyCommitted,
            Phase::Released => Status::AlreadyReleased,
            _ => Status::HoldExpired,
        };
        let body = self.hold_body(slot);
        self.reply_after_log(origin.client, id, status, body);
    }

    // ---------------------------------------------------------------- queries and control

    fn query_stock(&mut self, origin: Origin, id: u64, items: &[(u64, Option<u32>)]) {
        if items.is_empty() || items.len() > self.config.query_items_max as usize {
            return self.reply_now(origin, id, Status::InvalidArgument, Body::Empty);
        }
        if items.iter().any(|(sku, _)| shard_for(*sku, self.config.shards) != self.config.shard) {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        let mut levels = Vec::new();
        let mut status = Status::Ok;
        for &(sku, location) in items {
            match location {
                Some(location) => match self.find_row(sku, location) {
                    Some(slot) => levels.push(self.level(slot)),
                    None => status = Status::UnknownSku,
                },
                None => {
                    let Some(mut slot) = self.skus.find(sku) else {
                        status = Status::UnknownSku;
                        continue;
                    };
                    while slot != NONE {
                        levels.push(self.level(slot));
                        slot = self.stock[slot as usize].next_location;
                    }
                }
            }
        }
        self.reply_now(origin, id, status, Body::Stock(levels));
    }

    /// Lists the open holds with a line of `sku`. Scans the hold slab: a diagnostic
    /// query, bounded by `holds_max + holds_finished_max` and `query_holds_max`.
    fn query_holds_of_sku(&mut self, origin: Origin, id: u64, sku: u64) {
        if shard_for(sku, self.config.shards) != self.config.shard {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        if self.skus.find(sku).is_none() {
            return self.reply_now(origin, id, Status::UnknownSku, Body::Empty);
        }
        let mut found = Vec::new();
        for slot in 0..self.hold_slab.len() as u32 {
            if found.len() >= self.config.query_holds_max as usize {
                break;
            }
            if self.hold_slab[slot as usize].phase.is_live()
                && self.hold_lines(slot).any(|(row, _)| self.stock[row as usize].sku == sku)
            {
                found.push(self.hold_info(slot));
            }
        }
        self.reply_now(origin, id, Status::Ok, Body::Holds(found));
    }

    fn query_hold(&mut self, origin: Origin, id: u64, hold: u128) {
        let info = match (self.carts.get(&hold), self.find_hold(hold)) {
            (Some(cart), _) => Some(cart.info(hold)),
            (None, Some(slot)) => Some(self.hold_info(slot)),
            (None, None) => None,
        };
        match info {
            Some(info) => self.reply_now(origin, id, Status::Ok, Body::Holds(vec![info])),
            None => self.reply_now(origin, id, Status::UnknownHold, Body::Empty),
        }
    }

    fn upsert_sku(&mut self, origin: Origin, id: u64, sku: u64, location: u32, backorder_limit: u32) {
        if shard_for(sku, self.config.shards) != self.config.shard {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        if location == ANY_LOCATION {
            return self.reply_now(origin, id, Status::InvalidArgument, Body::Empty);
        }
        match self.find_row(sku, location) {
            Some(slot) => {
                let row = self.stock[slot as usize];
                if row.available() < -i64::from(backorder_limit) {
                    // Lowering the limit below today's backorders would make them oversold.
                    return self.reply_after_log(origin.client, id, Status::InvalidArgument, Body::Empty);
                }
                if row.backorder_limit != backorder_limit {
                    self.log(WalRecord::SkuUpserted { sku, location, backorder_limit });
                }
            }
            None => {
                let new_sku = self.skus.find(sku).is_none();
                if self.stock.len() >= self.config.sku_locations_max as usize
                    || (new_sku && self.skus.len() >= self.config.skus_max as usize)
                {
                    return self.reply_now(origin, id, Status::Busy, Body::Empty);
                }
                self.log(WalRecord::SkuUpserted { sku, location, backorder_limit });
            }
        }
        let slot = self.find_row(sku, location).expect("row exists");
        let body = Body::Stock(vec![self.level(slot)]);
        self.reply_after_log(origin.client, id, Status::Ok, body);
    }

    fn adjust(&mut self, origin: Origin, id: u64, adjustment: u128, sku: u64, location: u32, delta: i64) {
        if shard_for(sku, self.config.shards) != self.config.shard {
            return self.reply_now(origin, id, Status::WrongShard, Body::Empty);
        }
        if delta == 0 || delta.unsigned_abs() > self.config.adjust_delta_max {
            return self.reply_now(origin, id, Status::InvalidArgument, Body::Empty);
        }
        if let Some(previous) = self.adjustments.get(&adjustment) {
            let status = if *previous == (Adjustment { sku, location, delta }) { Status::Ok } else { Status::Conflict };
            let body = match self.find_row(sku, location) {
                Some(slot) if status == Status::Ok => Body::Stock(vec![self.level(slot)]),
                _ => Body::Empty,
            };
            return self.reply_after_log(origin.client, id, status, body);
        }
        let Some(slot) = self.find_row(sku, location) else {
            return self.reply_now(origin, id, Status::UnknownSku, Body::Empty);
        };
        let row = self.stock[slot as usize];
        if row.available() + delta < -i64::from(row.backorder_limit) {
            // Shrinkage cannot take units that live holds have promised.
            return self.reply_after_log(origin.client, id, Status::InsufficientStock, Body::Empty);
        }
        self.log(WalRecord::Adjusted { adjustment, sku, location, delta });
        let body = Body::Stock(vec![self.level(slot)]);
        self.reply_after_log(origin.client, id, Status::Ok, body);
    }

    fn read_journal(&mut self, origin: Origin, id: u64, from: u64, max_entries: u32) {
        let first = self.journal_first();
        if from < first || from > self.journal_next || max_entries == 0 {
            let status = if from < first { Status::JournalTruncated } else { Status::InvalidArgument };
            return self.reply_now(origin, id, status, Body::Empty);
        }
        let count = (self.journal_next - from).min(u64::from(max_entries.min(self.config.journal_read_max)));
        let start = (from - first) as usize;
        let entries: Vec<JournalEntry> = (self.journal.iter().skip(start).take(count as usize).zip(from..))
            .map(|(journaled, position)| journaled.entry(position, &self.stock[journaled.row as usize]))
            .collect();
        // Entries leave only once durable, like any answer about state changes.
        self.reply_after_log(
            origin.client,
            id,
            Status::Ok,
            Body::Journal { entries, next: from + count, incarnation: self.config.incarnation },
        );
    }

    // ---------------------------------------------------------------- apply

    /// Applies one record to the state. The only function that changes stock or holds.
    pub(crate) fn apply(&mut self, record: &WalRecord<'_>) -> ApplyResult {
        match *record {
            WalRecord::SkuUpserted { sku, location, backorder_limit } => {
                self.apply_upsert(sku, location, backorder_limit)
            }
            WalRecord::Adjusted { adjustment, sku, location, delta } => {
                let slot = self.find_row(sku, location).ok_or("adjustment of an unknown row")?;
                let row = &mut self.stock[slot as usize];
                row.on_hand = row.on_hand.checked_add(delta).ok_or("an adjustment overflows on_hand")?;
                self.check_row(slot)?;
                self.adjustments.insert(adjustment, Adjustment { sku, location, delta });
                self.adjustment_order.push_back(adjustment);
                if self.adjustment_order.len() > self.config.adjustments_retained_max as usize {
                    let oldest = self.adjustment_order.pop_front().expect("not empty");
                    self.adjustments.remove(&oldest);
                }
                self.journal_push(Journaled::adjustment(slot, adjustment, delta));
                Ok(())
            }
            WalRecord::Held { hold, expires_at_ms, fingerprint, prepared_for, lines } => {
                self.apply_held(hold, expires_at_ms, fingerprint, prepared_for, &lines)
            }
            WalRecord::Kept { hold } => {
                let slot = self.find_hold(hold).ok_or("keep of an unknown hold")?;
                let record = &mut self.hold_slab[slot as usize];
                if record.phase != Phase::Prepared {
                    return Err("keep of a hold that is not prepared");
                }
                record.phase = Phase::Held;
                Ok(())
            }
            WalRecord::Committed { hold, mask, at_ms } => {
                let slot = self.live_slot(hold)?;
                let (mut cursor, mut index) = (FIRST_LINE, 0);
                while cursor != NONE {
                    let (row, qty, next) = self.hold_line(slot, cursor);
                    let stock = &mut self.stock[row as usize];
                    stock.held -= i64::from(qty);
                    if mask & (1 << index) != 0 {
                        stock.on_hand -= i64::from(qty);
                        self.journal_push(Journaled::sale(row, hold, qty, at_ms));
                    }
                    (cursor, index) = (next, index + 1);
                }
                self.finish(slot, Phase::Committed);
                Ok(())
            }
            WalRecord::Released { hold } => self.apply_give_back(hold, Phase::Released),
            WalRecord::Expired { hold } => self.apply_give_back(hold, Phase::Expired),
            WalRecord::Extended { hold, expires_at_ms } => {
                let slot = self.live_slot(hold)?;
                self.hold_slab[slot as usize].expires_at = expires_at_ms;
                if self.hold_slab[slot as usize].phase.is_armed() {
                    // The old entry goes stale: a new generation is armed at the new time.
                    self.arm(slot, expires_at_ms);
                }
                Ok(())
            }
            WalRecord::Pinned { hold, txn } => {
                let slot = self.live_slot(hold)?;
                let part = self.participations.get_mut(&slot).ok_or("pin of a hold that is no participant")?;
                part.pin_txn = txn;
                let record = &mut self.hold_slab[slot as usize];
                record.phase = Phase::Pinned;
                self.disarm_slot(slot);
                Ok(())
            }
            WalRecord::Unpinned { hold } => {
                let slot = self.live_slot(hold)?;
                let record = &mut self.hold_slab[slot as usize];
                if record.phase != Phase::Pinned {
                    return Err("unpin of a hold that is not pinned");
                }
                record.phase = Phase::Held;
                let expires_at = record.expires_at;
                self.arm(slot, expires_at);
                Ok(())
            }
            WalRecord::CartOpened { .. }
            | WalRecord::CartStarted { .. }
            | WalRecord::CartDecided { .. }
            | WalRecord::CartForgotten { .. } => self.cart_apply(record),
        }
    }

    fn check_row(&self, slot: u32) -> ApplyResult {
        let row = &self.stock[slot as usize];
        if row.available() < -i64::from(row.backorder_limit) || row.held < 0 {
            return Err("the record would oversell a row");
        }
        Ok(())
    }

    fn live_slot(&self, hold: u128) -> Result<u32, &'static str> {
        let slot = self.find_hold(hold).ok_or("record for an unknown hold")?;
        if !self.hold_slab[slot as usize].phase.is_live() {
            return Err("record for a hold that is over");
        }
        Ok(slot)
    }

    fn apply_upsert(&mut self, sku: u64, location: u32, backorder_limit: u32) -> ApplyResult {
        if let Some(slot) = self.find_row(sku, location) {
            self.stock[slot as usize].backorder_limit = backorder_limit;
            return self.check_row(slot);
        }
        if self.stock.len() >= self.config.sku_locations_max as usize {
            return Err("more SKU-locations than sku_locations_max");
        }
        let slot = self.stock.len() as u32;
        self.stock.push(Stock { on_hand: 0, held: 0, sku, location, backorder_limit, next_location: NONE });
        match self.skus.find(sku) {
            None => {
                if !self.skus.insert(sku, slot) {
                    return Err("more SKUs than skus_max");
                }
            }
            Some(mut last) => {
                while self.stock[last as usize].next_location != NONE {
                    last = self.stock[last as usize].next_location;
                }
                self.stock[last as usize].next_location = slot;
            }
        }
        Ok(())
    }

    fn apply_held(
        &mut self,
        hold: u128,
        expires_at: Tick,
        fingerprint: u32,
        prepared_for: Option<(ShardId, u64)>,
        lines: &Lines<'_>,
    ) -> ApplyResult {
        if lines.is_empty() || lines.len() > 64 {
            return Err("a hold needs 1 to 64 lines");
        }
        let previous = self.find_hold(hold);
        if previous.is_some_and(|previous| self.hold_slab[previous as usize].phase.is_live()) {
            return Err("a hold with this id is live");
        }
        if self.live_holds >= self.config.holds_max {
            return Err("more live holds than holds_max");
        }
        let slot = match self.hold_free.pop() {
            Some(slot) => slot,
            None if self.hold_slab.len() < self.hold_slab.capacity() => {
                self.hold_slab.push(Hold {
                    id_lo: 0,
                    id_hi: 0,
                    expires_at: 0,
                    line0_slot: NONE,
                    line0_qty: 0,
                    extra: NONE,
                    fingerprint: 0,
                    phase: Phase::Free,
                    lines: 0,
                    participant: false,
                });
                self.hold_slab.len() as u32 - 1
            }
            None => {
                self.evict_finished();
                self.hold_free.pop().ok_or("no hold slot is free")?
            }
        };
        let mut rows = mem::take(&mut self.scratch_rows);
        rows.clear();
        let outcome = self.apply_held_lines(lines, &mut rows);
        let extra = match outcome {
            Ok(extra) => extra,
            Err(reason) => {
                self.scratch_rows = rows;
                self.hold_free.push(slot);
                return Err(reason);
            }
        };
        let count = rows.len();
        let (line0_slot, line0_qty) = rows[0];
        self.scratch_rows = rows;
        self.hold_slab[slot as usize] = Hold {
            id_lo: hold as u64,
            id_hi: (hold >> 64) as u64,
            expires_at,
            line0_slot,
            line0_qty,
            extra,
            fingerprint,
            phase: if prepared_for.is_some() { Phase::Prepared } else { Phase::Held },
            lines: count as u8,
            participant: prepared_for.is_some(),
        };
        if let Some((coordinator, txn)) = prepared_for {
            self.participations.insert(slot, Participation { coordinator, reserve_txn: txn, pin_txn: 0 });
        }
        if let Some(previous) = previous {
            // A finished hold of the same id gives way; its slot leaves with `finished`.
            self.unindex_hold(hold, previous);
        }
        let inserted = self.holds.insert(hold, slot);
        self.hold_memo.set((hold, slot));
        assert!(inserted, "hold index sized for every slot");
        self.live_holds += 1;
        self.arm(slot, expires_at);
        Ok(())
    }

    /// Resolves a `Held` record's lines into `rows`, holds their stock and links the lines
    /// after the first into the extra-line slab; returns the first extra line. Changes
    /// nothing when it fails.
    fn apply_held_lines(&mut self, lines: &Lines<'_>, rows: &mut Vec<(u32, u32)>) -> Result<u32, &'static str> {
        for (index, line) in lines.iter().enumerate() {
            // On the live path the rows were just resolved; recovery looks them up.
            let hinted = self.scratch_slots.get(index).map(|&(row, _)| row).filter(|&row| {
                self.stock.get(row as usize).is_some_and(|r| r.sku == line.sku && r.location == line.location)
            });
            let row = match hinted {
                Some(row) => row,
                None => self.find_row(line.sku, line.location).ok_or("hold of an unknown row")?,
            };
            rows.push((row, line.qty));
        }
        // Finished holds keep their lines for retries; make room by forgetting the oldest.
        while rows.len() - 1 > self.extra_lines_free() && !self.finished.is_empty() {
            self.evict_finished();
        }
        if rows.len() - 1 > self.extra_lines_free() {
            return Err("more hold lines than hold_extra_lines_max");
        }
        for &(row, qty) in rows.iter() {
            self.stock[row as usize].held += i64::from(qty);
        }
        for &(row, _) in rows.iter() {
            if let Err(reason) = self.check_row(row) {
                for &(row, qty) in rows.iter() {
                    self.stock[row as usize].held -= i64::from(qty);
                }
                return Err(reason);
            }
        }
        let mut extra = NONE;
        for &(row, qty) in rows[1..].iter().rev() {
            let line = ExtraLine { slot: row, qty, next: extra };
            extra = match self.extra_free.pop() {
                Some(index) => {
                    self.extra_lines[index as usize] = line;
                    index
                }
                None => {
                    self.extra_lines.push(line);
                    self.extra_lines.len() as u32 - 1
                }
            };
        }
        Ok(extra)
    }

    /// Arms hold `slot`'s expiry at `deadline`; any earlier timer of the slot goes stale.
    fn arm(&mut self, slot: u32, deadline: Tick) {
        let generation = &mut self.arm_generation[slot as usize];
        *generation = generation.wrapping_add(1);
        let generation = u32::from(*generation);
        self.expiry.insert(slot, generation, deadline);
        // Stale entries stay until they fire; once they outnumber the live ones, drop
        // them, so the wheel holds at most about two entries per live hold.
        if self.expiry.len() > 2 * self.live_holds as usize + 1024 {
            // The generation alone tells a stale entry; no hold record is read.
            let generations = &self.arm_generation;
            self.expiry.retain(|slot, generation| u32::from(generations[slot as usize]) == generation);
        }
    }

    /// Disarms hold `slot`'s expiry: its wheel entry goes stale.
    fn disarm_slot(&mut self, slot: u32) {
        let generation = &mut self.arm_generation[slot as usize];
        *generation = generation.wrapping_add(1);
    }

    fn free_extra(&mut self, mut extra: u32) {
        while extra != NONE {
            self.extra_free.push(extra);
            extra = self.extra_lines[extra as usize].next;
        }
    }

    fn apply_give_back(&mut self, hold: u128, phase: Phase) -> ApplyResult {
        let slot = self.live_slot(hold)?;
        let mut cursor = FIRST_LINE;
        while cursor != NONE {
            let (row, qty, next) = self.hold_line(slot, cursor);
            self.stock[row as usize].held -= i64::from(qty);
            cursor = next;
        }
        self.finish(slot, phase);
        Ok(())
    }

    fn finish(&mut self, slot: u32, phase: Phase) {
        let record = &mut self.hold_slab[slot as usize];
        debug_assert!(record.phase.is_live());
        record.phase = phase;
        self.disarm_slot(slot);
        self.live_holds -= 1;
        self.finished_extra_lines += usize::from(self.hold_slab[slot as usize].lines.saturating_sub(1));
        self.finished.push_back(slot);
        if self.finished.len() > self.config.holds_finished_max as usize {
            self.evict_finished();
        }
    }

    /// Forgets the oldest finished hold, freeing its slot and lines.
    fn evict_finished(&mut self) {
        let Some(slot) = self.finished.pop_front() else { return };
        let record = self.hold_slab[slot as usize];
        self.finished_extra_lines -= usize::from(record.lines.saturating_sub(1));
        // Unless a newer hold of the same id took its place in the index.
        self.unindex_hold(record.id(), slot);
        if let Some(part) = record.participant.then(|| self.participations.remove(&slot)).flatten() {
            self.remember_forgotten_share(record.id(), part.reserve_txn, record.expires_at);
        }
        self.free_extra(record.extra);
        self.hold_slab[slot as usize].phase = Phase::Free;
        self.hold_free.push(slot);
    }

    /// The position of the oldest journal entry kept (`journal_next` when none is).
    fn journal_first(&self) -> u64 {
        self.journal_next - self.journal.len() as u64
    }

    fn journal_push(&mut self, entry: Journaled) {
        self.journal.push(entry);
        self.journal_next += 1;
    }

    // ---------------------------------------------------------------- inspection

    /// A digest of the whole durable state (stock, holds, carts, retained ids, the
    /// journal), independent of slot layout: equal states give equal hashes.
    pub fn state_hash(&self) -> u64 {
        let mut sum = 0u64;
        let mut add = |parts: &[u64]| {
            let mut h = 0x243f_6a88_85a3_08d3u64;
            for part in parts {
                h = mix64(h ^ part);
            }
            sum = sum.wrapping_add(h);
        };
        for row in &self.stock {
            add(&[
                1,
                row.sku,
                u64::from(row.location),
                row.on_hand as u64,
                row.held as u64,
                u64::from(row.backorder_limit),
            ]);
        }
        for (slot, record) in self.hold_slab.iter().enumerate() {
            if record.phase == Phase::Free {
                continue;
            }
            let part = self.participations.get(&(slot as u32)).copied();
            let mut parts = vec![
                2,
                record.id_lo,
                record.id_hi,
                record.phase as u64,
                record.expires_at,
                u64::from(record.fingerprint),
                part.map_or(0, |p| u64::from(p.coordinator) ^ mix64(p.reserve_txn) ^ mix64(!p.pin_txn)),
            ];
            for (row, qty) in self.hold_lines(slot as u32) {
                let row = &self.stock[row as usize];
                parts.extend([row.sku, u64::from(row.location), u64::from(qty)]);
            }
            add(&parts);
        }
        for (hold, cart) in &self.carts {
            let mut parts = vec![3, *hold as u64, (*hold >> 64) as u64];
            cart.hash_parts(&mut parts);
            add(&parts);
        }
        for (id, adjustment) in &self.adjustments {
            add(&[
                4,
                *id as u64,
                (*id >> 64) as u64,
                adjustment.sku,
                u64::from(adjustment.location),
                adjustment.delta as u64,
            ]);
        }
        add(&[5, self.journal_next, self.next_txn, u64::from(self.live_holds)]);
        let first = self.journal_first();
        for (entry, position) in self.journal.iter().zip(first..) {
            let row = &self.stock[entry.row as usize];
            add(&[
                6,
                position,
                row.sku,
                u64::from(row.location),
                entry.id_lo,
                entry.id_hi,
                entry.value,
                u64::from(entry.qty),
            ]);
        }
        sum
    }

    /// Every stock row as a level: for invariant checks and reconciliation.
    pub fn stock_levels(&self) -> impl Iterator<Item = StockLevel> + '_ {
        (0..self.stock.len() as u32).map(|slot| self.level(slot))
    }

    /// The live holds' lines on this shard: (hold, sku, location, qty), for invariant checks.
    pub fn live_hold_lines(&self) -> Vec<(HoldId, u64, u32, u32)> {
        let mut lines = Vec::new();
        for (slot, record) in self.hold_slab.iter().enumerate() {
            if record.phase.is_live() {
                for (row, qty) in self.hold_lines(slot as u32) {
                    let row = &self.stock[row as usize];
                    lines.push((HoldId(record.id()), row.sku, row.location, qty));
                }
            }
        }
        lines
    }

    /// The state of hold `hold`'s lines on this shard (for carts: this shard's part).
    pub fn hold_state(&self, hold: HoldId) -> Option<HoldState> {
        self.find_hold(hold.0).map(|slot| self.hold_slab[slot as usize].phase.hold_state())
    }

    /// The journal's next position (one past the last entry).
    pub fn journal_next(&self) -> u64 {
        self.journal_next
    }

    /// Verifies the invariants of every row and hold; panics with a description if one
    /// is broken. Costs a pass over all state: for tests and the simulation.
    pub fn check_invariants(&self) {
        let mut held = vec![0i64; self.stock.len()];
        let mut live = 0;
        for (slot, record) in self.hold_slab.iter().enumerate() {
            if record.phase.is_live() {
                live += 1;
                for (row, qty) in self.hold_lines(slot as u32) {
                    held[row as usize] += i64::from(qty);
                }
            }
        }
        assert_eq!(live, self.live_holds, "live hold count drifted");
        for record in self.hold_slab.iter().filter(|h| h.phase.is_armed()) {
            // An expired hold stops counting at once: after any call, none is overdue.
            assert!(record.expires_at > self.now, "hold {:#x} is overdue but still holds stock", record.id());
        }
        for (slot, row) in self.stock.iter().enumerate() {
            assert_eq!(row.held, held[slot], "held of sku {} at {} drifted", row.sku, row.location);
            assert!(
                row.available() >= -i64::from(row.backorder_limit),
                "sku {} at {} oversold: on_hand {} held {} limit {}",
                row.sku,
                row.location,
                row.on_hand,
                row.held,
                row.backorder_limit
            );
        }
    }
}

/// True when the bytes from a failed record onwards are a torn write rather than damage:
/// a partial record at the very end, or zeros (space never written). `position` is the
/// position the failed record should have had.
///
/// A valid record of a later position after it proves that the failed record is not the
/// log's end, whatever its header claims: a flipped bit in its length may make it claim
/// more bytes than remain, which alone would look like a torn write.
fn tail_is_torn(rest: &[u8], position: u64) -> bool {
    if rest.iter().all(|b| *b == 0) {
        return true;
    }
    if later_record_follows(rest, position) {
        return false;
    }
    if rest.len() < wal::HEADER_BYTES {
        return true;
    }
    let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
    if len % 8 != 0 || len < wal::HEADER_BYTES {
        return false;
    }
    // The record claims more bytes than remain: the write of the tail was cut short. Or
    // only zeros follow it: its write was torn inside space the file had but that was
    // never written (a preallocated segment), so its own bytes end in zeros too.
    len > rest.len() || rest[len..].iter().all(|b| *b == 0)
}

/// True when a valid record whose position is after `position` starts at some record
/// boundary (a multiple of 8 bytes) after the start of `rest`. Runs only when recovery
/// meets a damaged record; the position is compared before the checksum is computed.
fn later_record_follows(rest: &[u8], position: u64) -> bool {
    (8..rest.len().saturating_sub(wal::HEADER_BYTES - 1)).step_by(8).any(|at| {
        let found = u64::from_le_bytes(rest[at + 8..at + 16].try_into().expect("8 bytes"));
        found > position && wal::decode(&rest[at..]).is_ok()
    })
}

/// A digest of a reserve request: its TTL and lines as asked (before locations are
/// picked), to tell a retry from a different request that reuses the hold id.
pub(crate) fn fingerprint(ttl_ms: u32, lines: impl Iterator<Item = (u64, Option<u32>, u32)>) -> u32 {
    let mut h = mix64(u64::from(ttl_ms) ^ 0x9e37_79b9_7f4a_7c15);
    for (sku, location, qty) in lines {
        h = mix64(h ^ sku);
        h = mix64(h ^ (u64::from(location.unwrap_or(ANY_LOCATION)) << 32 | u64::from(qty)));
    }
    (h ^ (h >> 32)) as u32
}

/// The mask that names every one of `count` lines.
pub(crate) fn all_lines(count: usize) -> Result<u64, Status> {
    Ok(if count >= 64 { u64::MAX } else { (1u64 << count) - 1 })
}

/// The commit mask of a hold's lines `(sku, location)` for a commit naming `subset`
/// (`None`: every line). A named line that the hold lacks is an invalid argument.
pub(crate) fn commit_mask(lines: &[(u64, u32)], subset: Option<&[(u64, Option<u32>)]>) -> Result<u64, Status> {
    let Some(subset) = subset else { return all_lines(lines.len()) };
    let mut mask = 0u64;
    for &(sku, location) in subset {
        let found = lines.iter().position(|&(s, l)| s == sku && location.is_none_or(|want| want == l));
        match found {
            Some(index) if mask & (1 << index) == 0 => mask |= 1 << index,
            _ => return Err(Status::InvalidArgument),
        }
    }
    Ok(mask)
}
