//! Engine batch apply: how many checkouts one shard on one core completes per second.
//!
//! Setup (not measured): one shard (`ShardConfig::new(0, 1)` with room for 1,000,000
//! SKUs), 1,000,000 SKUs of one location each with stock that never runs out, and 10,000
//! live holds. Each measured iteration hands the shard one pre-archived batch of 256
//! requests through `Shard::handle_batch` (checkout role) and drains it as a driver
//! does (WAL bytes, durability at once, replies, peers, timeout). A batch is 128 *pairs*:
//! reserve a new hold, then commit (or release) the oldest live one, so 10,000 holds
//! stay live. Throughput is counted in pairs: criterion's elements per second is
//! single-line checkouts (or five-line carts) per second.
//!
//! Hold ids are fresh in every batch, so batches cannot be reused: `iter_custom` builds
//! and archives a ring of batches, validates them with `rkyv::access`, and only then
//! starts the clock for applying the whole ring. Time advances 1 ms per batch and holds
//! live an hour, so nothing expires.
//!
//! Back of the envelope for the targets (at least 3M single-line pairs/s uniform, 5M
//! zipf, 600k five-line carts/s): 3M pairs/s is 333 ns per pair, that is two requests
//! and two WAL records (`Held`, 64 bytes, and `Committed`, 40 bytes) encoded with a
//! CRC32C and applied. With uniform popularity each reserve misses cache on the SKU
//! index and on the stock row (two DRAM misses, about 100 ns each unless overlapped),
//! which is why `handle_batch` prefetches a chunk of requests at a time; Zipf keeps the
//! hot rows in cache.

use std::time::{Duration, Instant};

use criterion::{criterion_main, Criterion, Throughput};
use rkyv::util::AlignedVec;
use stockplane_benches::{access, archive_into, catalog_config, fill_catalog, Driver, Finish, Workload, CHECKOUT};
use stockplane_engine::{Shard, ShardConfig, Tick};
use stockplane_loadgen::Popularity;
use stockplane_wire::{ArchivedRequestBatch, RequestBatch};

const SKUS: u32 = 1_000_000;
const LIVE_HOLDS: u64 = 10_000;
const BATCH_REQUESTS: usize = 256;
const PAIRS_PER_BATCH: usize = BATCH_REQUESTS / 2;
/// Batches built, archived and validated before each timed stretch.
const RING_BATCHES: usize = 32;

/// The shard's bounds: room for the catalog; the default hold bounds (131,072 live,
/// 65,536 finished kept for retries) except extra cart lines, raised so that five-line
/// carts kept as finished holds do not exhaust them.
fn config() -> ShardConfig {
    let mut config = catalog_config(SKUS);
    config.hold_extra_lines_max = (config.holds_max + config.holds_finished_max) * 4;
    config
}

/// One benchmark case: a shard in steady state and the workload that keeps it there.
struct Case {
    shard: Shard,
    driver: Driver,
    workload: Workload,
    now: Tick,
    batch: RequestBatch,
    ring: Vec<AlignedVec>,
    /// WAL records and bytes once the steady state was reached, to count the run's own.
    wal_at_start: (u64, u64),
}

impl Case {
    fn new(popularity: Popularity, lines: usize, finish: Finish) -> Case {
        let started = Instant::now();
        let mut now = 1;
        let mut shard = Shard::new(&config(), now).expect("valid configuration");
        let mut driver = Driver::new();
        fill_catalog(&mut shard, &mut driver, now, SKUS);
        let mut workload = Workload::new(popularity, SKUS, lines, finish, LIVE_HOLDS, 0x5eed);
        let mut buffer = AlignedVec::new();
        for batch in workload.prefill(BATCH_REQUESTS) {
            now += 1;
            buffer = archive_into(&batch, buffer);
            driver.apply(&mut shard, now, CHECKOUT, access(&buffer));
        }
        assert_eq!(u64::from(shard.live_holds()), LIVE_HOLDS);
        assert_eq!(driver.outcomes.first_failure, None, "setup failed: {:?}", driver.outcomes);
        eprintln!("engine: setup of {SKUS} SKUs and {LIVE_HOLDS} live holds took {:.1?}", started.elapsed());
        let ring = (0..RING_BATCHES).map(|_| AlignedVec::new()).collect();
        let wal_at_start = (shard.stats().wal_records, driver.wal_bytes);
        Case { shard, driver, workload, now, batch: RequestBatch::default(), ring, wal_at_start }
    }

    /// Applies `iters` fresh batches; returns the time spent applying and draining them.
    fn run(&mut self, iters: u64) -> Duration {
        let mut elapsed = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let count = left.min(RING_BATCHES as u64) as usize;
            for buffer in &mut self.ring[..count] {
                self.workload.pairs(PAIRS_PER_BATCH, &mut self.batch);
                *buffer = archive_into(&self.batch, std::mem::take(buffer));
            }
            let batches: Vec<&ArchivedRequestBatch> = self.ring[..count].iter().map(|b| access(b)).collect();
            let (shard, driver) = (&mut self.shard, &mut self.driver);
            let mut now = self.now;
            let start = Instant::now();
            for batch in batches {
                now += 1;
                driver.apply(shard, now, CHECKOUT, batch);
            }
            elapsed += start.elapsed();
            self.now = now;
            left -= count as u64;
            assert_eq!(u64::from(self.shard.live_holds()), LIVE_HOLDS, "the steady state drifted");
        }
        elapsed
    }

    /// Checks that every request of the run succeeded and reports WAL volume.
    fn finish(self, name: &str) {
        let outcomes = self.driver.outcomes;
        assert_eq!(outcomes.first_failure, None, "{name}: a request failed: {outcomes:?}");
        let pairs = self.workload.holds_reserved() - LIVE_HOLDS;
        let records = self.shard.stats().wal_records - self.wal_at_start.0;
        let bytes = self.driver.wal_bytes - self.wal_at_start.1;
        eprintln!(
            "engine/{name}: {pairs} pairs applied, {} live holds, {:.1} WAL bytes and {:.2} records per pair",
            self.shard.live_holds(),
            bytes as f64 / pairs as f64,
            records as f64 / pairs as f64,
        );
    }
}

fn engine(c: &mut Criterion) {
    let cases: [(&str, &str, Popularity, usize, Finish); 5] = [
        ("reserve_commit_1_line", "uniform", Popularity::Uniform, 1, Finish::Commit),
        ("reserve_commit_1_line", "zipf_1.1", Popularity::zipf(), 1, Finish::Commit),
        ("reserve_release_1_line", "uniform", Popularity::Uniform, 1, Finish::Release),
        ("reserve_commit_5_line_cart", "uniform", Popularity::Uniform, 5, Finish::Commit),
        ("reserve_commit_5_line_cart", "zipf_1.1", Popularity::zipf(), 5, Finish::Commit),
    ];
    for (group_name, popularity_name, popularity, lines, finish) in cases {
        // Built on first use, so that a filtered-out case costs no setup.
        let mut case: Option<Case> = None;
        let mut group = c.benchmark_group(format!("engine/{group_name}"));
        group.throughput(Throughput::Elements(PAIRS_PER_BATCH as u64));
        group.bench_function(popularity_name, |b| {
            let case = case.get_or_insert_with(|| Case::new(popularity, lines, finish));
            b.iter_custom(|iters| case.run(iters))
        });
        group.finish();
        if let Some(case) = case {
            case.finish(&format!("{group_name}/{popularity_name}"));
        }
    }
}

// criterion_group! defines an undocumented `pub fn benches`; a private module keeps it
// out of the workspace's missing_docs lint.
mod group {
    criterion::criterion_group!(benches, super::engine);
}
criterion_main!(group::benches);
