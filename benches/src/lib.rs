//! Shared setup for stockplane's benchmarks and memory report: building a catalog in a
//! shard, generating a steady reserve-then-finish workload, archiving batches, and
//! draining a shard after each batch the way a driver does.
//!
//! Everything here runs outside the measured loops: the benchmarks call it to prepare
//! archived batches, then time only [`Driver::apply`] (`Shard::handle_batch` and the
//! drain). Workloads are deterministic: a seed fixes every SKU and hold id.
//!
//! This crate is never published and nothing in the data plane depends on it.

use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use stockplane_engine::{Origin, Shard, ShardConfig, Tick};
use stockplane_loadgen::{KeyStream, Popularity};
use stockplane_wire::{
    ArchivedCartLine, ArchivedOp, ArchivedRequestBatch, CartLine, HoldId, Op, Request, RequestBatch, Role, Status,
};

/// SKU ids are `SKU_BASE + index`, so they look nothing like slab slots.
pub const SKU_BASE: u64 = 1 << 32;
/// Units of stock each SKU starts with: enough that no benchmark ever runs out.
pub const STOCK_PER_SKU: i64 = 1 << 40;
/// The TTL of every benchmark hold: the longest the default configuration accepts, so
/// that no hold expires during a run unless a benchmark moves time on purpose.
pub const HOLD_TTL_MS: u32 = 3_600_000;
/// Requests per archived batch when filling a catalog.
pub const CATALOG_BATCH_REQUESTS: usize = 4_096;

/// The checkout client every benchmark reserve and commit comes from.
pub const CHECKOUT: Origin = Origin { client: 1, role: Role::Checkout };
/// The control-plane client that creates the catalog.
pub const CONTROL: Origin = Origin { client: 2, role: Role::Control };

/// The SKU id of catalog entry `index`.
pub fn sku_id(index: u32) -> u64 {
    SKU_BASE + u64::from(index)
}

/// The hold id of the `serial`-th hold a workload creates: unique per serial, with both
/// halves busy like a client's random 128-bit id.
pub fn hold_id(serial: u64) -> HoldId {
    HoldId((u128::from(splitmix64(serial)) << 64) | u128::from(serial))
}

/// SplitMix64's finaliser: a fixed bijection on `u64` that scatters nearby inputs.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A single-shard configuration with room for `skus` SKUs of one location each; every
/// other bound keeps its default.
pub fn catalog_config(skus: u32) -> ShardConfig {
    let mut config = ShardConfig::new(0, 1);
    config.skus_max = skus;
    config.sku_locations_max = skus;
    config
}

/// [`catalog_config`] with room for the extra lines of multi-line carts that are kept as
/// finished holds (four per hold slot), so that five-line carts do not exhaust them.
pub fn cart_config(skus: u32) -> ShardConfig {
    let mut config = catalog_config(skus);
    config.hold_extra_lines_max = (config.holds_max + config.holds_finished_max) * 4;
    config
}

/// Archives `batch` into `buffer` (cleared first, capacity kept) and returns it.
pub fn archive_into(batch: &RequestBatch, mut buffer: AlignedVec) -> AlignedVec {
    buffer.clear();
    rkyv::api::high::to_bytes_in::<_, RkyvError>(batch, buffer).expect("archiving to memory cannot fail")
}

/// Validates archived bytes as a request batch, as the data plane does for every frame.
pub fn access(bytes: &[u8]) -> &ArchivedRequestBatch {
    rkyv::access::<ArchivedRequestBatch, RkyvError>(bytes).expect("a batch just archived is valid")
}

/// How the replies drained so far turned out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Replies drained.
    pub replies: u64,
    /// Replies with a success status (`Ok`, `Reserved`, `Committed`, ...).
    pub succeeded: u64,
    /// The first non-success status seen, if any.
    pub first_failure: Option<Status>,
}

impl Outcomes {
    /// Counts one answer with `status`.
    #[inline]
    pub fn record(&mut self, status: Status) {
        self.replies += 1;
        if status.code() < 20 {
            self.succeeded += 1;
        } else if self.first_failure.is_none() {
            self.first_failure = Some(status);
        }
    }
}

/// Plays the driver's part around a shard: hands it a batch, then drains the WAL
/// output (reporting it durable at once, as if the write had completed), the replies,
/// the peer messages and the next timeout, reusing one WAL buffer throughout.
#[derive(Debug, Default)]
pub struct Driver {
    wal: Vec<u8>,
    /// How the replies drained so far turned out.
    pub outcomes: Outcomes,
    /// WAL bytes drained so far.
    pub wal_bytes: u64,
    /// When set, every WAL record drained is appended here (to build a log).
    pub kept_log: Option<Vec<u8>>,
}

impl Driver {
    /// A driver with an empty WAL buffer.
    pub fn new() -> Driver {
        Driver::default()
    }

    /// Hands `batch` to the shard and drains everything it produced.
    #[inline]
    pub fn apply(&mut self, shard: &mut Shard, now: Tick, origin: Origin, batch: &ArchivedRequestBatch) {
        shard.handle_batch(now, origin, batch);
        self.drain(shard);
    }

    /// Drains the shard in the order its docs prescribe: WAL, durability, replies, peer
    /// messages, timeout.
    #[inline]
    pub fn drain(&mut self, shard: &mut Shard) {
        if let Some(position) = shard.poll_wal_append(&mut self.wal) {
            self.wal_bytes += self.wal.len() as u64;
            if let Some(log) = self.kept_log.as_mut() {
                log.extend_from_slice(&self.wal);
            }
            shard.handle_durable(position);
        }
        let outcomes = &mut self.outcomes;
        shard.drain_replies(|reply| outcomes.record(reply.status));
        while shard.poll_peer().is_some() {}
        std::hint::black_box(shard.poll_timeout());
    }
}

/// The reference the engine's throughput targets are set against: SKUs and holds in two
/// plain hash maps (hashbrown with foldhash, as the engine's own maps), each archived
/// request applied on its own. It keeps none of what the engine must: no WAL record with a
/// checksum for each change, no finished holds kept for idempotent retries, no replies
/// held until durable, no expiry timers, no bounds. It does what a checkout needs of stock
/// (refuse what is not there, count held units, sell them once) and nothing more.
///
/// Run by the engine benchmark in the same process and minute as the engine, on the same
/// batches, it also tells how fast the host is that day: a shared host's figures move by
/// tens of percent from one day to the next, and the ratio of the two moves much less.
pub struct PlainMaps {
    /// `(on_hand, held)` by SKU id.
    stock: hashbrown::HashMap<u64, (i64, i64), foldhash::fast::FixedState>,
    /// The lines of each live hold (at most [`PLAIN_CART_LINES_MAX`]), by hold id.
    holds: hashbrown::HashMap<u128, PlainHold, foldhash::fast::FixedState>,
    /// How the requests applied so far turned out.
    pub outcomes: Outcomes,
}

/// The most lines a [`PlainMaps`] hold keeps (the benchmark's carts have at most five).
pub const PLAIN_CART_LINES_MAX: usize = 8;

/// A live hold of [`PlainMaps`]: its lines inline, so holding allocates nothing.
#[derive(Clone, Copy)]
struct PlainHold {
    lines: [(u64, u32); PLAIN_CART_LINES_MAX],
    count: u8,
}

impl PlainMaps {
    /// SKUs `0..skus` (ids from [`sku_id`]), each with [`STOCK_PER_SKU`] units, and room
    /// for `holds` live holds.
    pub fn new(skus: u32, holds: usize) -> PlainMaps {
        let hasher = || foldhash::fast::FixedState::with_seed(0x5eed);
        let mut stock = hashbrown::HashMap::with_capacity_and_hasher(skus as usize, hasher());
        stock.extend((0..skus).map(|index| (sku_id(index), (STOCK_PER_SKU, 0))));
        let holds = hashbrown::HashMap::with_capacity_and_hasher(holds, hasher());
        PlainMaps { stock, holds, outcomes: Outcomes::default() }
    }

    /// Live holds.
    pub fn live_holds(&self) -> usize {
        self.holds.len()
    }

    /// `(on_hand, held)` of catalog entry `index`, if it exists.
    pub fn level(&self, index: u32) -> Option<(i64, i64)> {
        self.stock.get(&sku_id(index)).copied()
    }

    /// Applies every request of `batch` in order (reserve, commit and release; any
    /// other operation counts as a failure).
    pub fn apply(&mut self, batch: &ArchivedRequestBatch) {
        for request in batch.requests.iter() {
            let status = match &request.op {
                ArchivedOp::Reserve { hold, lines, .. } => self.reserve(hold.0.to_native(), lines.as_slice()),
                ArchivedOp::Commit { hold, .. } => self.finish(hold.0.to_native(), true),
                ArchivedOp::Release { hold } => self.finish(hold.0.to_native(), false),
                _ => Status::InvalidArgument,
            };
            self.outcomes.record(status);
        }
    }

    /// One lookup of the hold and one of each line's SKU: each line is held as it is
    /// checked, and the lines held so far are given back when a later one fails.
    fn reserve(&mut self, hold: u128, lines: &[ArchivedCartLine]) -> Status {
        if lines.is_empty() || lines.len() > PLAIN_CART_LINES_MAX {
            return Status::InvalidArgument;
        }
        let hashbrown::hash_map::Entry::Vacant(slot) = self.holds.entry(hold) else { return Status::Conflict };
        let mut record = PlainHold { lines: [(0, 0); PLAIN_CART_LINES_MAX], count: 0 };
        for line in lines {
            let (sku, qty) = (line.sku.to_native(), line.qty.to_native());
            let status = match self.stock.get_mut(&sku) {
                None => Status::UnknownSku,
                Some((on_hand, held)) if *on_hand - *held < i64::from(qty) => Status::InsufficientStock,
                Some((_, held)) => {
                    *held += i64::from(qty);
                    record.lines[usize::from(record.count)] = (sku, qty);
                    record.count += 1;
                    continue;
                }
            };
            for &(sku, qty) in &record.lines[..usize::from(record.count)] {
                self.stock.get_mut(&sku).expect("held above").1 -= i64::from(qty);
            }
            return status;
        }
        slot.insert(record);
        Status::Reserved
    }

    fn finish(&mut self, hold: u128, sell: bool) -> Status {
        let Some(record) = self.holds.remove(&hold) else { return Status::UnknownHold };
        for &(sku, qty) in &record.lines[..usize::from(record.count)] {
            let (on_hand, held) = self.stock.get_mut(&sku).expect("a held SKU exists");
            *held -= i64::from(qty);
            if sell {
                *on_hand -= i64::from(qty);
            }
        }
        if sell {
            Status::Committed
        } else {
            Status::Released
        }
    }
}

/// Live holds the engine benchmarks keep open in steady state.
pub const LIVE_HOLDS: u64 = 10_000;

/// What an engine benchmark applies its batches to.
pub enum Target {
    /// The engine, drained after each batch as a driver does.
    Engine {
        /// The shard.
        shard: Box<Shard>,
        /// Its driver.
        driver: Driver,
    },
    /// The plain-map baseline.
    Plain(PlainMaps),
}

impl Target {
    /// A target over catalog entries `0..skus` (the engine when `plain` is false) in
    /// steady state: [`LIVE_HOLDS`] holds open, reserved by the returned workload's
    /// prefill, one batch a millisecond from time 1. Returns the target, the workload and
    /// the time of its last batch. Panics if any setup request fails.
    pub fn steady(
        plain: bool,
        popularity: Popularity,
        skus: u32,
        lines: usize,
        finish: Finish,
    ) -> (Target, Workload, Tick) {
        let mut now = 1;
        let mut target = if plain {
            Target::Plain(PlainMaps::new(skus, LIVE_HOLDS as usize))
        } else {
            let mut shard = Box::new(Shard::new(&cart_config(skus), now).expect("valid configuration"));
            let mut driver = Driver::new();
            fill_catalog(&mut shard, &mut driver, now, skus);
            Target::Engine { shard, driver }
        };
        let mut workload = Workload::new(popularity, skus, lines, finish, LIVE_HOLDS, 0x5eed);
        let mut buffer = AlignedVec::new();
        for batch in workload.prefill(256) {
            now += 1;
            buffer = archive_into(&batch, buffer);
            target.apply(now, access(&buffer));
        }
        assert_eq!(target.live_holds(), LIVE_HOLDS);
        assert_eq!(target.outcomes().first_failure, None, "setup failed: {:?}", target.outcomes());
        (target, workload, now)
    }

    /// Applies `batch` at time `now` (the engine is drained after it).
    #[inline]
    pub fn apply(&mut self, now: Tick, batch: &ArchivedRequestBatch) {
        match self {
            Target::Engine { shard, driver } => driver.apply(shard, now, CHECKOUT, batch),
            Target::Plain(plain) => plain.apply(batch),
        }
    }

    /// Live holds.
    pub fn live_holds(&self) -> u64 {
        match self {
            Target::Engine { shard, .. } => u64::from(shard.live_holds()),
            Target::Plain(plain) => plain.live_holds() as u64,
        }
    }

    /// How the requests applied so far turned out.
    pub fn outcomes(&self) -> Outcomes {
        match self {
            Target::Engine { driver, .. } => driver.outcomes,
            Target::Plain(plain) => plain.outcomes,
        }
    }

    /// WAL records and bytes written so far (the engine's; the baseline writes none).
    pub fn wal(&self) -> Option<(u64, u64)> {
        match self {
            Target::Engine { shard, driver } => Some((shard.stats().wal_records, driver.wal_bytes)),
            Target::Plain(_) => None,
        }
    }
}

/// Creates SKUs `0..skus` (ids from [`sku_id`]) at location 0, each with
/// [`STOCK_PER_SKU`] units, through archived `UpsertSku` and `Adjust` batches from the
/// control role. Panics if any request fails.
pub fn fill_catalog(shard: &mut Shard, driver: &mut Driver, now: Tick, skus: u32) {
    let mut requests = Vec::with_capacity(CATALOG_BATCH_REQUESTS);
    let mut buffer = AlignedVec::new();
    let before = driver.outcomes;
    let mut index = 0u32;
    while index < skus {
        requests.clear();
        while index < skus && requests.len() + 2 <= CATALOG_BATCH_REQUESTS {
            let sku = sku_id(index);
            let id = u64::from(index) * 2;
            requests.push(Request { id, op: Op::UpsertSku { sku, location: 0, backorder_limit: 0 } });
            let op = Op::Adjust { adjustment: u128::from(sku), sku, location: 0, delta: STOCK_PER_SKU };
            requests.push(Request { id: id + 1, op });
            index += 1;
        }
        let batch = RequestBatch { requests: std::mem::take(&mut requests) };
        buffer = archive_into(&batch, buffer);
        requests = batch.requests;
        driver.apply(shard, now, CONTROL, access(&buffer));
    }
    let outcomes = driver.outcomes;
    assert_eq!(outcomes.first_failure, before.first_failure, "catalog request failed: {outcomes:?}");
    assert_eq!(outcomes.succeeded - before.succeeded, u64::from(skus) * 2, "catalog replies missing");
}

/// How a workload finishes each hold it reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The cart was paid: commit every line.
    Commit,
    /// The cart was abandoned: release it.
    Release,
}

/// A steady checkout workload: each *pair* reserves a new hold and finishes (commits or
/// releases) the oldest live one, so the number of live holds stays at `live`.
///
/// SKUs are drawn by popularity rank from a seeded [`KeyStream`]; ranks map to catalog
/// entries through a fixed random permutation, so the hot SKUs are scattered over the
/// stock slab as in a real catalog rather than packed into its first cache lines.
pub struct Workload {
    keys: KeyStream,
    scatter: Vec<u32>,
    lines: usize,
    finish: Finish,
    live: u64,
    next_hold: u64,
    next_request: u64,
}

impl Workload {
    /// A workload over catalog entries `0..skus` with carts of `lines` distinct SKUs,
    /// keeping `live` holds open; `seed` fixes every draw.
    pub fn new(popularity: Popularity, skus: u32, lines: usize, finish: Finish, live: u64, seed: u64) -> Workload {
        assert!(lines >= 1 && lines <= skus as usize, "a cart needs 1..=skus distinct lines");
        let keys = KeyStream::new(popularity, u64::from(skus), seed).expect("valid popularity");
        // Fisher-Yates with the same seed's SplitMix stream: deterministic and cheap.
        let mut scatter: Vec<u32> = (0..skus).collect();
        let mut state = seed ^ 0x5ca7_7e45_ca77_e45a;
        for i in (1..scatter.len()).rev() {
            state = splitmix64(state);
            let j = ((u128::from(state) * (i as u128 + 1)) >> 64) as usize;
            scatter.swap(i, j);
        }
        Workload { keys, scatter, lines, finish, live, next_hold: 0, next_request: 0 }
    }

    /// Live holds the workload keeps once [`Workload::prefill`] has run.
    pub fn live(&self) -> u64 {
        self.live
    }

    /// Holds reserved so far.
    pub fn holds_reserved(&self) -> u64 {
        self.next_hold
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn cart(&mut self) -> Vec<CartLine> {
        let mut lines: Vec<CartLine> = Vec::with_capacity(self.lines);
        while lines.len() < self.lines {
            let sku = sku_id(self.scatter[self.keys.next_rank() as usize]);
            // A SKU appears once per cart; a popular one drawn twice is drawn again.
            if lines.iter().all(|line| line.sku != sku) {
                lines.push(CartLine { sku, location: None, qty: 1 });
            }
        }
        lines
    }

    /// A reserve of the next new hold.
    pub fn reserve(&mut self) -> Request {
        let hold = hold_id(self.next_hold);
        self.next_hold += 1;
        let lines = self.cart();
        Request { id: self.request_id(), op: Op::Reserve { hold, ttl_ms: HOLD_TTL_MS, lines } }
    }

    /// Requests that open the first `live` holds, split into batches of at most `per_batch`.
    pub fn prefill(&mut self, per_batch: usize) -> Vec<RequestBatch> {
        assert_eq!(self.next_hold, 0, "prefill runs first");
        let mut batches = Vec::new();
        while self.next_hold < self.live {
            let count = (self.live - self.next_hold).min(per_batch as u64);
            let requests = (0..count).map(|_| self.reserve()).collect();
            batches.push(RequestBatch { requests });
        }
        batches
    }

    /// Replaces `batch`'s requests with `pairs` pairs: reserve a new hold, then finish
    /// the oldest live one. Run [`Workload::prefill`] (and apply it) first.
    pub fn pairs(&mut self, pairs: usize, batch: &mut RequestBatch) {
        assert!(self.next_hold >= self.live, "prefill first");
        batch.requests.clear();
        for _ in 0..pairs {
            let oldest = hold_id(self.next_hold - self.live);
            let reserve = self.reserve();
            batch.requests.push(reserve);
            let op = match self.finish {
                Finish::Commit => Op::Commit { hold: oldest, lines: None },
                Finish::Release => Op::Release { hold: oldest },
            };
            let id = self.request_id();
            batch.requests.push(Request { id, op });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard holding catalog entries `0..skus`, and the driver that filled it.
    fn catalog_shard(skus: u32) -> (Shard, Driver) {
        let mut shard = Shard::new(&catalog_config(skus), 0).expect("valid config");
        let mut driver = Driver::new();
        fill_catalog(&mut shard, &mut driver, 0, skus);
        (shard, driver)
    }

    /// A small end-to-end run: the workload keeps its live holds and every request
    /// succeeds, for commits, releases and multi-line carts.
    #[test]
    fn workload_keeps_live_holds_and_succeeds() {
        for (lines, finish) in [(1, Finish::Commit), (1, Finish::Release), (5, Finish::Commit)] {
            let skus = 1_000;
            let (mut shard, mut driver) = catalog_shard(skus);
            let mut workload = Workload::new(Popularity::zipf(), skus, lines, finish, 100, 9);
            for batch in workload.prefill(64) {
                driver.apply(&mut shard, 1, CHECKOUT, access(&archive_into(&batch, AlignedVec::new())));
            }
            assert_eq!(shard.live_holds(), 100);
            let mut batch = RequestBatch::default();
            for now in 2..50 {
                workload.pairs(128, &mut batch);
                driver.apply(&mut shard, now, CHECKOUT, access(&archive_into(&batch, AlignedVec::new())));
                assert_eq!(shard.live_holds(), 100);
            }
            assert_eq!(driver.outcomes.first_failure, None, "{driver:?}");
            assert_eq!(driver.outcomes.replies, driver.outcomes.succeeded);
            shard.check_invariants();
        }
    }

    /// The baseline does the same stock work as the engine: fed the same batches, it ends
    /// with the same live holds and every SKU at the same `(on_hand, held)`.
    #[test]
    fn plain_maps_agree_with_the_engine() {
        for (lines, finish) in [(1, Finish::Commit), (1, Finish::Release), (5, Finish::Commit)] {
            let skus = 500;
            let (mut shard, mut driver) = catalog_shard(skus);
            let mut plain = PlainMaps::new(skus, 100);
            let mut workload = Workload::new(Popularity::zipf(), skus, lines, finish, 100, 3);
            let mut batches = workload.prefill(64);
            for _ in 0..20 {
                let mut batch = RequestBatch::default();
                workload.pairs(64, &mut batch);
                batches.push(batch);
            }
            for (now, batch) in (1..).zip(&batches) {
                let bytes = archive_into(batch, AlignedVec::new());
                driver.apply(&mut shard, now, CHECKOUT, access(&bytes));
                plain.apply(access(&bytes));
            }
            assert_eq!(plain.outcomes.first_failure, None);
            assert_eq!(plain.outcomes.replies, batches.iter().map(|b| b.requests.len() as u64).sum::<u64>());
            assert_eq!(plain.live_holds(), shard.live_holds() as usize);
            let mut sold = 0;
            for level in shard.stock_levels() {
                let index = (level.sku - SKU_BASE) as u32;
                assert_eq!(plain.level(index), Some((level.on_hand, level.held)), "SKU {index}");
                sold += STOCK_PER_SKU - level.on_hand;
            }
            assert_eq!(sold > 0, finish == Finish::Commit, "{lines} lines, {finish:?}");
        }
    }

    /// What the baseline cannot do, it refuses and counts as a failure, changing nothing.
    #[test]
    fn plain_maps_refuse_unknown_holds_and_skus() {
        let mut plain = PlainMaps::new(10, 10);
        let hold = hold_id(1);
        let requests = vec![
            Request { id: 1, op: Op::Commit { hold, lines: None } },
            Request {
                id: 2,
                op: Op::Reserve { hold, ttl_ms: 1_000, lines: vec![CartLine { sku: 7, location: None, qty: 1 }] },
            },
            // The first line is held before the second is found unknown: it is given back.
            Request {
                id: 3,
                op: Op::Reserve {
                    hold,
                    ttl_ms: 1_000,
                    lines: vec![
                        CartLine { sku: sku_id(0), location: None, qty: 1 },
                        CartLine { sku: 7, location: None, qty: 1 },
                    ],
                },
            },
        ];
        plain.apply(access(&archive_into(&RequestBatch { requests }, AlignedVec::new())));
        assert_eq!((plain.outcomes.replies, plain.outcomes.succeeded), (3, 0));
        assert_eq!(plain.outcomes.first_failure, Some(Status::UnknownHold));
        assert_eq!(plain.live_holds(), 0);
        assert!((0..10).all(|index| plain.level(index) == Some((STOCK_PER_SKU, 0))));
    }

    #[test]
    fn hold_ids_are_distinct() {
        let ids: std::collections::BTreeSet<HoldId> = (0..10_000).map(hold_id).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
