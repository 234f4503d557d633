//! A plain loop over the engine benchmark's workload, for profilers that count
//! instructions (criterion's statistics would drown them):
//!
//! ```sh
//! cargo build --release -p stockplane-benches --example engine_profile
//! valgrind --tool=callgrind --toggle-collect='*engine_profile::measured*' \
//!     target/release/examples/engine_profile zipf 1 100000 200
//! ```
//! Arguments: popularity (`uniform` or `zipf`), lines per hold, SKUs, batches of 256
//! requests (128 reserve+commit pairs), and the target (`engine`, the default, or
//! `plain`, the plain-map baseline of the engine benchmark). It prints the pairs applied
//! and, as a rough probe only, their rate (the batches stream from memory here, unlike
//! the criterion benchmark's cache-sized ring).
//! As in the criterion benchmark, the batches are archived and validated before the
//! measured part, which applies them (and drains the engine) only.
//!
//! `scripts/instructions.sh` (`make bench-instructions`) runs it under callgrind for
//! each case and reports instructions per pair: a figure that, unlike throughput on a
//! shared host, repeats exactly from run to run.

use rkyv::util::AlignedVec;
use stockplane_benches::{access, archive_into, Finish, Target};
use stockplane_loadgen::Popularity;
use stockplane_wire::{ArchivedRequestBatch, RequestBatch};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |index: usize, default: &str| args.get(index).cloned().unwrap_or_else(|| default.to_string());
    let popularity = if arg(1, "zipf") == "uniform" { Popularity::Uniform } else { Popularity::zipf() };
    let lines: usize = arg(2, "1").parse().expect("lines per hold");
    let skus: u32 = arg(3, "100000").parse().expect("SKUs");
    let batches: usize = arg(4, "200").parse().expect("batches");
    let plain = match arg(5, "engine").as_str() {
        "engine" => false,
        "plain" => true,
        other => panic!("target {other:?}: engine or plain"),
    };
    let (mut target, mut workload, now) = Target::steady(plain, popularity, skus, lines, Finish::Commit);
    let mut ring: Vec<AlignedVec> = Vec::with_capacity(batches);
    let mut batch = RequestBatch::default();
    for _ in 0..batches {
        workload.pairs(128, &mut batch);
        ring.push(archive_into(&batch, AlignedVec::new()));
    }
    let ring: Vec<&ArchivedRequestBatch> = ring.iter().map(|bytes| access(bytes)).collect();
    let started = std::time::Instant::now();
    measured(&mut target, now, &ring);
    let elapsed = started.elapsed();
    let outcomes = target.outcomes();
    assert_eq!(outcomes.first_failure, None, "a request failed: {outcomes:?}");
    let pairs = batches * 128;
    println!("{pairs} pairs applied in {elapsed:.3?}: {:.0} pairs/s", pairs as f64 / elapsed.as_secs_f64());
}

/// The measured part alone, out of line so that a profiler can collect it by name
/// (`--toggle-collect='*engine_profile::measured*'`) and leave the setup out.
#[inline(never)]
fn measured(target: &mut Target, mut now: u64, ring: &[&ArchivedRequestBatch]) {
    for batch in ring {
        now += 1;
        target.apply(now, batch);
    }
}
