//! Memory report: heap bytes a shard spends per SKU-location and per live hold, and heap
//! allocations per request on the hot path, measured with a counting global allocator.
//!
//! `Shard::new` allocates its tables for the configured bounds up front, so a cost is
//! "bytes allocated by `Shard::new` plus bytes allocated while filling", divided by
//! the count. Where a table is sized by one bound only, the report also subtracts a
//! shard whose other bounds are the same (the *fixed* part) to isolate the marginal
//! cost. Targets: at most 64 bytes per SKU-location and 128 bytes per live single-line
//! hold.
//!
//! Run with `cargo run --release -p stockplane-benches --bin memory`; it needs about
//! 1.5 GB of memory and prints a Markdown report on stdout.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use rkyv::util::AlignedVec;
use stockplane_benches::{
    access, archive_into, catalog_config, fill_catalog, hold_id, sku_id, Driver, Finish, Target, CHECKOUT, HOLD_TTL_MS,
    LIVE_HOLDS,
};
use stockplane_engine::{Shard, ShardConfig};
use stockplane_loadgen::Popularity;
use stockplane_wire::{CartLine, Op, Request, RequestBatch};

/// Wraps the system allocator and counts bytes allocated, bytes freed and calls.
struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counters are plain atomics with no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Relaxed);
        CALLS.fetch_add(1, Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Relaxed);
        CALLS.fetch_add(1, Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREED.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        FREED.fetch_add(layout.size() as u64, Relaxed);
        ALLOCATED.fetch_add(new_size as u64, Relaxed);
        CALLS.fetch_add(1, Relaxed);
        // SAFETY: the caller upholds `realloc`'s contract, which we pass on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap bytes live right now.
fn live_bytes() -> i64 {
    ALLOCATED.load(Relaxed) as i64 - FREED.load(Relaxed) as i64
}

/// Allocator calls (alloc, alloc_zeroed, realloc) so far.
fn calls() -> u64 {
    CALLS.load(Relaxed)
}

/// Live heap bytes that `build` leaves behind in what it returns.
fn retained<T>(build: impl FnOnce() -> T) -> (T, i64) {
    let before = live_bytes();
    let value = build();
    (value, live_bytes() - before)
}

fn shard_new(config: &ShardConfig) -> (Shard, i64) {
    retained(|| Shard::new(config, 1).expect("valid configuration"))
}

const MIB: f64 = 1024.0 * 1024.0;

struct Report {
    rows: Vec<[String; 4]>,
}

impl Report {
    fn row(&mut self, what: &str, bytes: i64, count: u64, note: &str) {
        let per = bytes as f64 / count as f64;
        self.rows.push([
            what.to_owned(),
            format!("{:.1} MiB", bytes as f64 / MIB),
            format!("{per:.1}"),
            note.to_owned(),
        ]);
    }
}

/// Per SKU-location: 10,000,000 SKUs of one location each.
fn skus(report: &mut Report) {
    const SKUS: u32 = 10_000_000;
    let config = catalog_config(SKUS);
    let (_, fixed) = shard_new(&catalog_config(1));
    let ((mut shard, new_bytes), started) = (shard_new(&config), Instant::now());
    let mut driver = Driver::new();
    let ((), fill_bytes) = retained(|| fill_catalog(&mut shard, &mut driver, 1, SKUS));
    eprintln!("memory: filled {SKUS} SKUs in {:.1?}", started.elapsed());
    let count = u64::from(SKUS);
    report.row("SKU: `Shard::new` (skus_max = sku_locations_max = 10M)", new_bytes, count, "tables allocated up front");
    report.row(
        "SKU: filling 10M SKUs (UpsertSku + Adjust)",
        fill_bytes,
        count,
        "journal and adjustment ids are bounded",
    );
    report.row("**SKU: total per SKU-location**", new_bytes + fill_bytes, count, "target <= 64");
    report.row(
        "SKU: total minus a 1-SKU shard's tables",
        new_bytes + fill_bytes - fixed,
        count,
        "marginal cost of a SKU-location",
    );
    // With `wal.snapshot_source = "replica"` the snapshot thread keeps a second
    // copy of the state: a shard loaded from this one's snapshot, as the replica is.
    let snapshot = shard.into_snapshot();
    let (replica, replica_bytes) = retained(|| Shard::from_snapshot(&config, 1, &snapshot).expect("its own snapshot"));
    report.row(
        "SKU: the snapshot replica's copy (loaded from this shard's snapshot)",
        replica_bytes,
        count,
        "held beside the shard when wal.snapshot_source = \"replica\"",
    );
    drop((replica, snapshot));
}

/// Per live hold: 1,000,000 single-line holds, with finished holds retained at the
/// default ratio (half of `holds_max`) and with none retained.
fn holds(report: &mut Report, finished_max: u32, label: &str) {
    const HOLDS: u32 = 1_000_000;
    const SKUS: u32 = 100_000;
    let mut config = catalog_config(SKUS);
    config.holds_max = HOLDS;
    config.holds_finished_max = finished_max;
    let mut without_holds = config.clone();
    without_holds.holds_max = 1;
    without_holds.holds_finished_max = 0;
    let (_, fixed) = shard_new(&without_holds);
    let (mut shard, new_bytes) = shard_new(&config);
    let tables = new_bytes - fixed;
    let mut driver = Driver::new();
    fill_catalog(&mut shard, &mut driver, 1, SKUS);

    let mut batch = RequestBatch { requests: Vec::with_capacity(256) };
    let mut buffer = AlignedVec::with_capacity(64 * 1024);
    let before = live_bytes();
    let mut serial = 0u64;
    while serial < u64::from(HOLDS) {
        batch.requests.clear();
        for _ in 0..256.min(u64::from(HOLDS) - serial) {
            let sku = sku_id((serial % u64::from(SKUS)) as u32);
            let lines = vec![CartLine { sku, location: None, qty: 1 }];
            batch
                .requests
                .push(Request { id: serial, op: Op::Reserve { hold: hold_id(serial), ttl_ms: HOLD_TTL_MS, lines } });
            serial += 1;
        }
        buffer = archive_into(&batch, buffer);
        driver.apply(&mut shard, 2, CHECKOUT, access(&buffer));
    }
    drop(batch);
    drop(buffer);
    let reserving = live_bytes() - before;
    assert_eq!(shard.live_holds(), HOLDS);
    assert_eq!(driver.outcomes.first_failure, None, "{:?}", driver.outcomes);
    let count = u64::from(HOLDS);
    report.row(&format!("hold ({label}): `Shard::new` hold tables"), tables, count, "minus a shard with holds_max = 1");
    report.row(&format!("hold ({label}): reserving 1M single-line holds"), reserving, count, "incremental");
    report.row(&format!("**hold ({label}): total per live hold**"), tables + reserving, count, "target <= 128");
}

/// What the hot path allocates in steady state.
struct HotPath {
    /// Requests measured.
    requests: u64,
    /// Allocator calls (alloc, realloc) in all.
    calls: u64,
    /// Bytes requested from the allocator per request.
    bytes: f64,
    /// Growth of live heap bytes per reserve + finish pair: what stays allocated.
    growth_per_pair: f64,
}

/// Measures a shard in steady state applying reserve + finish pairs (10,000 live holds
/// over 100,000 SKUs, time advancing 1 ms per 256-request batch); counts only
/// `handle_batch` and the drain, after a warm-up that fills every bounded queue
/// (journal, finished holds) to its bound.
fn hot_path(lines: usize, finish: Finish) -> HotPath {
    const SKUS: u32 = 100_000;
    const WARM_UP_ROUNDS: u64 = 3_000;
    const ROUNDS: u64 = 8_000;
    let (mut engine, mut workload, now) = Target::steady(false, Popularity::Uniform, SKUS, lines, finish);
    let mut buffer = AlignedVec::new();
    let mut batch = RequestBatch::default();
    let (mut calls_hot, mut bytes_hot, mut growth, mut requests) = (0u64, 0u64, 0i64, 0u64);
    for round in 0..ROUNDS {
        workload.pairs(128, &mut batch);
        buffer = archive_into(&batch, buffer);
        let archived = access(&buffer);
        let (calls_before, bytes_before, live_before) = (calls(), ALLOCATED.load(Relaxed), live_bytes());
        engine.apply(now + 1 + round, archived);
        if round >= WARM_UP_ROUNDS {
            calls_hot += calls() - calls_before;
            bytes_hot += ALLOCATED.load(Relaxed) - bytes_before;
            growth += live_bytes() - live_before;
            requests += 256;
        }
    }
    assert_eq!(engine.outcomes().first_failure, None, "{:?}", engine.outcomes());
    let requests_f = requests as f64;
    HotPath {
        requests,
        calls: calls_hot,
        bytes: bytes_hot as f64 / requests_f,
        growth_per_pair: growth as f64 / (requests_f / 2.0),
    }
}

/// Live heap bytes of a shard in steady state (10,000 live holds, 1-line reserve +
/// commit, uniform over 100,000 SKUs, 1 ms per batch) after each of `checkpoints` pairs:
/// with a constant number of live holds, anything that grows here grows without bound
/// until the hold TTL (one hour here) lets it go.
fn steady_growth(checkpoints: &[u64]) -> Vec<(u64, i64)> {
    const SKUS: u32 = 100_000;
    let (mut engine, mut workload, now) = Target::steady(false, Popularity::Uniform, SKUS, 1, Finish::Commit);
    let mut buffer = AlignedVec::new();
    let mut batch = RequestBatch::default();
    let (mut pairs, mut now, mut heap) = (0u64, now + 1, 0i64);
    let mut samples = Vec::new();
    for &checkpoint in checkpoints {
        while pairs < checkpoint {
            workload.pairs(128, &mut batch);
            buffer = archive_into(&batch, buffer);
            let archived = access(&buffer);
            let live_before = live_bytes();
            engine.apply(now, archived);
            heap += live_bytes() - live_before;
            pairs += 128;
            now += 1;
        }
        samples.push((pairs, heap));
    }
    assert_eq!(engine.live_holds(), LIVE_HOLDS);
    assert_eq!(engine.outcomes().first_failure, None, "{:?}", engine.outcomes());
    samples
}

fn main() {
    let mut report = Report { rows: Vec::new() };
    skus(&mut report);
    let defaults = ShardConfig::new(0, 1);
    let default_ratio = (1_000_000u64 * u64::from(defaults.holds_finished_max) / u64::from(defaults.holds_max)) as u32;
    holds(&mut report, default_ratio, &format!("{default_ratio} finished kept"));
    holds(&mut report, 0, "no finished kept");

    print!("{}", stockplane_loadgen::machine::report_header("stockplane shard memory (benches/src/bin/memory.rs)"));
    println!("Heap bytes counted by a global allocator wrapper.");
    println!();
    println!("| what | heap | bytes per item | note |");
    println!("|---|---:|---:|---|");
    for [what, heap, per, note] in &report.rows {
        println!("| {what} | {heap} | {per} | {note} |");
    }
    println!();
    println!(
        "Heap allocations on the hot path (steady state after a warm-up, 10,000 live holds, uniform over \
         100,000 SKUs, 1 ms per 256-request batch):"
    );
    println!();
    println!(
        "| workload | requests measured | allocator calls | bytes allocated per request | live heap growth per pair |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, lines, finish) in [
        ("1-line reserve + commit", 1, Finish::Commit),
        ("1-line reserve + release", 1, Finish::Release),
        ("5-line reserve + commit", 5, Finish::Commit),
    ] {
        let hot = hot_path(lines, finish);
        println!("| {name} | {} | {} | {:.1} | {:.1} |", hot.requests, hot.calls, hot.bytes, hot.growth_per_pair);
    }
    println!();
    println!("Shard heap growth with a constant 10,000 live holds (1-line reserve + commit, 1 h TTL):");
    println!();
    println!("| pairs applied | shard heap growth | per pair |");
    println!("|---:|---:|---:|");
    for (pairs, heap) in steady_growth(&[1 << 20, 1 << 21, 1 << 22]) {
        println!("| {pairs} | {:.1} MiB | {:.1} B |", heap as f64 / MIB, heap as f64 / pairs as f64);
    }
}
