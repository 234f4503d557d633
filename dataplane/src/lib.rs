//! The stockplane data plane: the drivers around the pure engine.
//!
//! One glommio executor per core, each owning one engine shard (`stockplane-engine`), its
//! own QUIC endpoint on a `SO_REUSEPORT` UDP socket, and its end of the cross-core mesh.
//! Everything here is I/O and scheduling; every decision about stock and holds is the
//! engine's. Nothing on a core's hot path takes a lock or allocates per request.
//!
//! Modules:
//! - [`server`]: starts one pinned executor per core and the admin endpoint, and stops them;
//! - [`config`]: the TOML configuration and its defaults (`dataplane/dataplane.toml`);
//! - `core`: one core's shard, QUIC connections and mesh end, as a synchronous state machine;
//! - [`udp`]: the core's socket (batched receives and GSO sends with `quinn-udp`), and
//!   [`udp::bind_reuseport`], which the benchmarks' null server binds with too;
//! - `route`: which shard serves a request;
//! - [`wal`]: each shard's write-ahead log on disk (group commit, segments, recovery);
//! - `replica` and [`fork`]: where each shard's background snapshots take its state from;
//! - [`tls`]: rustls server configuration with client authentication, roles from certificates;
//! - [`certs`]: development certificates (`make certs`);
//! - [`admin`]: the HTTP endpoint for Prometheus metrics, `/healthz` and `/readyz`.

pub mod admin;
pub mod certs;
pub mod config;
mod core;
pub mod fork;
mod ids;
mod metrics;
mod replica;
mod route;
pub mod server;
pub mod tls;
pub mod udp;
pub mod wal;

pub use config::Config;
pub use server::Server;
