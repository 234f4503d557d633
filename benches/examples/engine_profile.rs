//! A plain loop over the engine benchmark's workload, for profilers that count
//! instructions (criterion's statistics would drown them):
//!
//! ```sh
//! cargo build --release -p stockplane-benches --example engine_profile
//! valgrind --tool=callgrind --toggle-collect='*engine_profile::measured*' \
//!     target/release/examples/engine_profile zipf 1 100000 200
//! ```
//! Arguments: popularity (`uniform` or `zipf`), lines per hold, SKUs, batches of 256
//! requests (128 reserve+commit pairs). It prints the pairs applied.

use rkyv::util::AlignedVec;
use stockplane_benches::{access, archive_into, catalog_config, fill_catalog, Driver, Finish, Workload, CHECKOUT};
use stockplane_engine::Shard;
use stockplane_loadgen::Popularity;
use stockplane_wire::RequestBatch;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |index: usize, default: &str| args.get(index).cloned().unwrap_or_else(|| default.to_string());
    let popularity = if arg(1, "zipf") == "uniform" { Popularity::Uniform } else { Popularity::zipf() };
    let lines: usize = arg(2, "1").parse().expect("lines per hold");
    let skus: u32 = arg(3, "100000").parse().expect("SKUs");
    let batches: usize = arg(4, "200").parse().expect("batches");
    let mut config = catalog_config(skus);
    config.hold_extra_lines_max = (config.holds_max + config.holds_finished_max) * 4;
    let mut now = 1;
    let mut shard = Shard::new(&config, now).expect("valid configuration");
    let mut driver = Driver::new();
    fill_catalog(&mut shard, &mut driver, now, skus);
    let mut workload = Workload::new(popularity, skus, lines, Finish::Commit, 10_000, 0x5eed);
    let mut buffer = AlignedVec::new();
    for batch in workload.prefill(256) {
        now += 1;
        buffer = archive_into(&batch, buffer);
        driver.apply(&mut shard, now, CHECKOUT, access(&buffer));
    }
    let mut ring: Vec<AlignedVec> = Vec::with_capacity(batches);
    let mut batch = RequestBatch::default();
    for _ in 0..batches {
        workload.pairs(128, &mut batch);
        ring.push(archive_into(&batch, AlignedVec::new()));
    }
    measured(&mut shard, &mut driver, now, &ring);
    assert_eq!(driver.outcomes.first_failure, None, "a request failed: {:?}", driver.outcomes);
    println!("{} pairs applied", batches * 128);
}

/// The measured part alone, out of line so that a profiler can collect it by name
/// (`--toggle-collect='*engine_profile::measured*'`) and leave the setup out.
#[inline(never)]
fn measured(shard: &mut Shard, driver: &mut Driver, mut now: u64, ring: &[AlignedVec]) {
    for bytes in ring {
        now += 1;
        driver.apply(shard, now, CHECKOUT, access(bytes));
    }
}
