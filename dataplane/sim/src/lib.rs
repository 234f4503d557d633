//! stockplane's deterministic simulator: shards of the pure engine on a simulated
//! clock, network and disk, driven by seeded clients, with faults.
//!
//! One `u64` seed drives everything (a `ChaCha8Rng`): the shards' bounds, the catalog,
//! the clients' choices, every delay, drop, duplicate, crash, torn write, failed fsync
//! and bit flip. Nothing
//! reads the wall clock and no map iterates in a random order, so a failing seed
//! replays exactly: `cargo run -p stockplane-sim --release -- --seed N`.
//!
//! - [`queue`]: the agenda of timed events (the simulated clock);
//! - [`disk`]: a WAL file whose live and durable bytes are kept apart;
//! - [`model`]: a reference model of a shard, rebuilt from its WAL records;
//! - [`params`]: what a seed simulates (bounds, workload, faults);
//! - `sim` and `workload`: the loop, the checks, and the clients.
//!
//! The invariants checked after every step are DESIGN.md's: nothing oversold, `held`
//! equal to the live lines, no answer or vote before its record is durable, stock that
//! returns exactly once, carts all or nothing, replay equal to the durable prefix, and
//! (at the end of each seed) no hold or cart left stuck. A broken invariant panics with
//! the seed and the simulated time.
//!
//! The simulator must not change the engine's behaviour: it calls only the engine's
//! public API, in the order the engine documents.

pub mod disk;
pub mod model;
pub mod params;
pub mod queue;
mod sim;
mod workload;

pub use sim::{Sim, Summary};
pub use workload::OpKind;

/// Runs one seed of `ops` client operations (`shards` overrides the drawn shard count);
/// panics with the seed on a broken invariant.
pub fn run_seed(seed: u64, ops: u64, shards: Option<u32>) -> Summary {
    Sim::new(seed, ops, shards).run()
}
