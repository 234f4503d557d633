//! stockplane's shard engine: one shard's stock and holds as a pure, deterministic state
//! machine.
//!
//! The engine performs no I/O, reads no clock, starts no thread and seeds no hasher from
//! the OS: time comes in as an argument (`now`, milliseconds), and everything else is a
//! function of the inputs, so a seeded simulation can drive it and replay a failure.
//! It is driven like `quinn-proto`: inputs go in through `handle_*`, outputs come out
//! through `poll_*`, and after any `handle_*` a driver drains, in this order,
//! [`Shard::poll_wal_append`] (write those bytes, then call [`Shard::handle_durable`]),
//! [`Shard::poll_reply`] (or all at once, [`Shard::drain_replies`]), [`Shard::poll_peer`],
//! then arms a timer for [`Shard::poll_timeout`] and calls [`Shard::handle_timeout`] when
//! it fires.
//!
//! Invariants the engine keeps at every step (checked by assertions that stay on in
//! release builds, by property tests and by the simulation in `dataplane/sim`):
//! - for every SKU and location, `on_hand - held >= -backorder_limit`;
//! - `held` equals the sum of the quantities of the live holds' lines;
//! - a reply, and a message to a peer, leave only after every WAL record appended before
//!   them is durable;
//! - replaying the WAL into a fresh shard yields the same [`Shard::state_hash`], and so
//!   does loading a snapshot taken at any position and replaying the records after it.
//!
//! Every capacity is bounded by [`ShardConfig`]; a full bound is answered with
//! `Status::Busy`, never with growth.

mod cart;
mod config;
mod index;
mod peer;
mod ring;
mod route;
mod shard;
pub mod wal;
mod wheel;

pub use config::{ConfigError, ShardConfig};
pub use peer::{Decision, PeerLine, PeerMessage};
pub use route::{home_for, shard_for, ShardId};
pub use shard::{
    Origin, RecoverError, Reply, Shard, ShardStats, SnapshotBytes, SnapshotError, SnapshotHeader, SNAPSHOT_FORMAT,
    SNAPSHOT_HEADER_BYTES, SNAPSHOT_MAGIC,
};

/// Milliseconds on the data plane's clock; the driver supplies them, never decreasing.
pub type Tick = u64;
