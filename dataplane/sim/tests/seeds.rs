//! The simulation as a test: a bounded number of seeds, over a million client
//! operations with faults in all, meant for `cargo test --release -p stockplane-sim`
//! (the Makefile's target). Each seed is printed before it runs, so a failure names the
//! seed that replays it: `cargo run -p stockplane-sim --release -- --seed N --ops M`.
//!
//! Half the seeds are fixed, so that part is the same on every run; the other half start
//! from a base taken from the clock, so every run also explores seeds nobody ran before
//! (each is printed before it runs, and a failure names its replay command). Set
//! `STOCKPLANE_SIM_SEED` to fix both bases. The work is split in two tests so that the
//! test harness runs them on two cores.

use std::time::Instant;

use stockplane_sim::run_seed;

/// Client operations per seed: long enough for carts to live through crashes and
/// expiries, short enough that a seed's WAL replays quickly.
const OPS_PER_SEED: u64 = 10_000;
/// Seeds per test; two tests make 2,000,000 operations or more.
const SEEDS_PER_TEST: u64 = 100;

fn base_seed(default: u64) -> u64 {
    match std::env::var("STOCKPLANE_SIM_SEED") {
        Ok(text) => text.parse::<u64>().expect("STOCKPLANE_SIM_SEED is a u64").wrapping_add(default),
        Err(_) => default,
    }
}

fn run_seeds(base: u64) {
    let started = Instant::now();
    let mut ops = 0;
    for index in 0..SEEDS_PER_TEST {
        let seed = base.wrapping_add(index);
        println!("seed {seed}; replay: cargo run -p stockplane-sim --release -- --seed {seed} --ops {OPS_PER_SEED}");
        ops += run_seed(seed, OPS_PER_SEED, None).ops;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{SEEDS_PER_TEST} seeds, {ops} ops in {secs:.1} s ({:.0} ops/s)", ops as f64 / secs);
    assert!(ops >= SEEDS_PER_TEST * OPS_PER_SEED, "every seed runs its operations");
}

#[test]
fn seeds_first_half_fixed() {
    run_seeds(base_seed(1_000_000));
}

#[test]
fn seeds_second_half_random() {
    let fresh = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(2_000_000, |since| since.as_nanos() as u64);
    let base = match std::env::var("STOCKPLANE_SIM_SEED") {
        Ok(_) => base_seed(2_000_000),
        Err(_) => fresh,
    };
    println!("random base seed {base}");
    run_seeds(base);
}

/// A seed is its run: two runs of one seed take the same steps and end the same, which
/// is what lets a failing seed replay.
#[test]
fn a_seed_replays_exactly() {
    let seed = base_seed(42);
    println!("seed {seed}");
    assert_eq!(run_seed(seed, 3_000, None), run_seed(seed, 3_000, None));
}
