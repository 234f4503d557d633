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
//!
//! The `baseline` groups run the same workload on [`PlainMaps`]: SKUs and holds in two
//! plain hash maps, none of the engine's log, retention or gating. The issue sets the
//! engine's targets against such maps (about 2.5 to 4.5 million pairs per second on the
//! host it was written on); measured in the same run, the baseline also shows how fast the
//! host was that day, which on a shared virtual machine moves by tens of percent.

use std::time::{Duration, Instant};

use criterion::{criterion_main, Criterion, Throughput};
use rkyv::util::AlignedVec;
use stockplane_benches::{access, archive_into, Finish, Target, Workload, LIVE_HOLDS};
use stockplane_engine::Tick;
use stockplane_loadgen::Popularity;
use stockplane_wire::{ArchivedRequestBatch, RequestBatch};

const SKUS: u32 = 1_000_000;
const BATCH_REQUESTS: usize = 256;
const PAIRS_PER_BATCH: usize = BATCH_REQUESTS / 2;
/// Batches built, archived and validated before each timed stretch.
const RING_BATCHES: usize = 32;

/// One benchmark case: a target in steady state and the workload that keeps it there.
/// The engine's bounds are `cart_config`'s: room for the catalog, the default hold bounds
/// (131,072 live, 65,536 finished kept for retries), extra cart lines raised so that
/// five-line carts kept as finished holds do not exhaust them.
struct Case {
    target: Target,
    workload: Workload,
    now: Tick,
    batch: RequestBatch,
    ring: Vec<AlignedVec>,
    /// The engine's WAL records and bytes once the steady state was reached, to count
    /// the run's own.
    wal_at_start: Option<(u64, u64)>,
}

impl Case {
    fn new(plain: bool, popularity: Popularity, lines: usize, finish: Finish) -> Case {
        let started = Instant::now();
        let (target, workload, now) = Target::steady(plain, popularity, SKUS, lines, finish);
        eprintln!("setup of {SKUS} SKUs and {LIVE_HOLDS} live holds took {:.1?}", started.elapsed());
        let ring = (0..RING_BATCHES).map(|_| AlignedVec::new()).collect();
        let wal_at_start = target.wal();
        Case { target, workload, now, batch: RequestBatch::default(), ring, wal_at_start }
    }

    /// Applies `iters` fresh batches; returns the time spent applying them (and, for the
    /// engine, draining it).
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
            let target = &mut self.target;
            let mut now = self.now;
            let start = Instant::now();
            for batch in batches {
                now += 1;
                target.apply(now, batch);
            }
            elapsed += start.elapsed();
            self.now = now;
            left -= count as u64;
            assert_eq!(self.target.live_holds(), LIVE_HOLDS, "the steady state drifted");
        }
        elapsed
    }

    /// Checks that every request of the run succeeded and reports WAL volume.
    fn finish(self, name: &str) {
        let outcomes = self.target.outcomes();
        assert_eq!(outcomes.first_failure, None, "{name}: a request failed: {outcomes:?}");
        let pairs = self.workload.holds_reserved() - LIVE_HOLDS;
        let live = self.target.live_holds();
        match (self.wal_at_start, self.target.wal()) {
            (Some((records_before, bytes_before)), Some((records, bytes))) => eprintln!(
                "{name}: {pairs} pairs applied, {live} live holds, {:.1} WAL bytes and {:.2} records per pair",
                (bytes - bytes_before) as f64 / pairs as f64,
                (records - records_before) as f64 / pairs as f64,
            ),
            _ => eprintln!("{name}: {pairs} pairs applied, {live} live holds"),
        }
    }
}

fn engine(c: &mut Criterion) {
    // (baseline, group, popularity's name, popularity, lines, finish)
    let cases: [(bool, &str, &str, Popularity, usize, Finish); 8] = [
        (false, "reserve_commit_1_line", "uniform", Popularity::Uniform, 1, Finish::Commit),
        (false, "reserve_commit_1_line", "zipf_1.1", Popularity::zipf(), 1, Finish::Commit),
        (false, "reserve_release_1_line", "uniform", Popularity::Uniform, 1, Finish::Release),
        (false, "reserve_commit_5_line_cart", "uniform", Popularity::Uniform, 5, Finish::Commit),
        (false, "reserve_commit_5_line_cart", "zipf_1.1", Popularity::zipf(), 5, Finish::Commit),
        (true, "reserve_commit_1_line", "uniform", Popularity::Uniform, 1, Finish::Commit),
        (true, "reserve_commit_1_line", "zipf_1.1", Popularity::zipf(), 1, Finish::Commit),
        (true, "reserve_commit_5_line_cart", "uniform", Popularity::Uniform, 5, Finish::Commit),
    ];
    for (plain, group_name, popularity_name, popularity, lines, finish) in cases {
        let prefix = if plain { "baseline" } else { "engine" };
        // Built on first use, so that a filtered-out case costs no setup.
        let mut case: Option<Case> = None;
        let mut group = c.benchmark_group(format!("{prefix}/{group_name}"));
        group.throughput(Throughput::Elements(PAIRS_PER_BATCH as u64));
        group.bench_function(popularity_name, |b| {
            let case = case.get_or_insert_with(|| Case::new(plain, popularity, lines, finish));
            b.iter_custom(|iters| case.run(iters))
        });
        group.finish();
        if let Some(case) = case {
            case.finish(&format!("{prefix}/{group_name}/{popularity_name}"));
        }
    }
}

// criterion_group! defines an undocumented `pub fn benches`; a private module keeps it
// out of the workspace's missing_docs lint.
mod group {
    criterion::criterion_group!(benches, super::engine);
}
criterion_main!(group::benches);
