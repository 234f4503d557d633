//! The simulator's command line: run one seed, or many, and print a failing seed first.
//!
//! `--seed N` replays seed N exactly; `--seeds K` runs K seeds from a base (given with
//! `--seed`, or taken from the wall clock: the only clock read, outside any seed).
//! Every seed is printed before it runs, so a crash of the process still names it.
//! `--jobs N` runs N seeds at once on N threads (for long runs such as `make sim-long`).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use stockplane_sim::{Sim, Summary};

/// Seeded deterministic simulation of stockplane shards with faults.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The seed to run (with --seeds: the first of them).
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds to run, one after the other from the base seed.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Client operations (requests sent, retries included) per seed.
    #[arg(long, default_value_t = 20_000)]
    ops: u64,
    /// Seeds run at once, one per thread (each seed stays deterministic).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Shards per seed (default: drawn from the seed).
    #[arg(long)]
    shards: Option<u32>,
    /// Print every record, message and answer about this hold (hex), to debug a seed.
    #[arg(long, value_parser = parse_hold)]
    trace: Option<u128>,
    /// Print a summary line for every seed.
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let base = cli.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        (nanos as u64) ^ ((nanos >> 64) as u64)
    });
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let steps = AtomicU64::new(0);
    let disk = Mutex::new(DiskFaults::default());
    std::thread::scope(|scope| {
        for _ in 0..cli.jobs.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= cli.seeds || failed.load(Ordering::Relaxed) {
                    return;
                }
                let seed = base.wrapping_add(index);
                println!("seed {seed}");
                let _ = std::io::stdout().flush();
                let outcome = std::panic::catch_unwind(|| {
                    let mut sim = Sim::new(seed, cli.ops, cli.shards);
                    if cli.verbose && cli.seeds == 1 {
                        println!("  params: {:?}", sim.params());
                    }
                    if let Some(hold) = cli.trace {
                        sim.trace(hold);
                    }
                    sim.run()
                });
                match outcome {
                    Ok(summary) => {
                        ops.fetch_add(summary.ops, Ordering::Relaxed);
                        steps.fetch_add(summary.steps, Ordering::Relaxed);
                        disk.lock().unwrap_or_else(|e| e.into_inner()).add(&summary);
                        if cli.verbose {
                            println!("  seed {seed}: {summary:?}");
                        }
                    }
                    Err(_) => {
                        failed.store(true, Ordering::Relaxed);
                        let shards = cli.shards.map(|n| format!(" --shards {n}")).unwrap_or_default();
                        println!(
                            "FAILED seed {seed}; replay: cargo run -p stockplane-sim --release -- --seed {seed} --ops {}{shards}",
                            cli.ops
                        );
                        return;
                    }
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        return ExitCode::FAILURE;
    }
    let (ops, steps) = (ops.into_inner(), steps.into_inner());
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds passed: {ops} ops, {steps} steps in {secs:.1} s ({:.0} ops/s, {:.0} steps/s)",
        cli.seeds,
        ops as f64 / secs,
        steps as f64 / secs
    );
    println!("{}", disk.into_inner().unwrap_or_else(|e| e.into_inner()));
    ExitCode::SUCCESS
}

/// The disk's failures and bit flips over a run: in how many seeds each was drawn, and
/// how often it happened.
#[derive(Debug, Default)]
struct DiskFaults {
    fsync_seeds: u64,
    fsync_failures: u64,
    unavailable: u64,
    operator_restarts: u64,
    unsynced_seeds: u64,
    unsynced_flips: u64,
    unsynced_refused: u64,
    durable_seeds: u64,
    durable_flips: u64,
    crashes: u64,
    torn_writes: u64,
    snapshots: u64,
    snapshot_restarts: u64,
}

impl DiskFaults {
    fn add(&mut self, summary: &Summary) {
        self.fsync_seeds += u64::from(summary.fsync_failing);
        self.fsync_failures += summary.fsync_failures;
        self.unavailable += summary.unavailable;
        self.operator_restarts += summary.operator_restarts;
        self.unsynced_seeds += u64::from(summary.flipping_unsynced);
        self.unsynced_flips += summary.unsynced_flips;
        self.unsynced_refused += summary.unsynced_flips_refused;
        self.durable_seeds += u64::from(summary.flipping_durable);
        self.durable_flips += summary.durable_flips;
        self.crashes += summary.crashes;
        self.torn_writes += summary.torn_writes;
        self.snapshots += summary.snapshots;
        self.snapshot_restarts += summary.snapshot_restarts;
    }
}

impl std::fmt::Display for DiskFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "disk faults: {} crashes, {} torn writes", self.crashes, self.torn_writes)?;
        writeln!(
            f,
            "  snapshots: {} taken, {} restarts from a snapshot and the log after it (each equal to the whole log's)",
            self.snapshots, self.snapshot_restarts
        )?;
        writeln!(
            f,
            "  fsync failures: {} seeds, {} failed fsyncs, {} state changes refused Unavailable, {} operator restarts",
            self.fsync_seeds, self.fsync_failures, self.unavailable, self.operator_restarts
        )?;
        writeln!(
            f,
            "  unsynced bit flips: {} seeds, {} flips ({} cut as a torn tail, {} refused and cut by the operator)",
            self.unsynced_seeds,
            self.unsynced_flips,
            self.unsynced_flips - self.unsynced_refused,
            self.unsynced_refused
        )?;
        write!(
            f,
            "  synced bit flips: {} seeds, {} flips (each refused as Corrupt and restored)",
            self.durable_seeds, self.durable_flips
        )
    }
}

fn parse_hold(text: &str) -> Result<u128, String> {
    u128::from_str_radix(text.trim_start_matches("0x"), 16).map_err(|e| format!("not a hex hold id: {e}"))
}
