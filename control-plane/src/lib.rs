//! The stockplane control plane: PostgreSQL as the system of record for the catalog and
//! the books, the back-office HTTP API, and the sync with the data plane in both
//! directions (catalog and stock deltas out, committed sales in, exactly once).
//!
//! - [`db`]: every SQL statement, and what is stored and why;
//! - [`api`]: the back-office HTTP API (axum, OpenAPI at `/openapi.json`);
//! - [`dataplane`]: the QUIC link to the data plane with the `control` role;
//! - [`sync`]: the drain of each shard's journal into the books, the pusher that tells
//!   shards the catalog and stock changes, and the epoch change of a shard that
//!   restarted empty (its bootstrap);
//! - [`reconcile`]: the books against the data plane, per SKU and location;
//! - [`app`]: wires them into the service, with `/metrics`, `/healthz` and `/readyz`.

pub mod api;
pub mod app;
pub mod config;
pub mod dataplane;
pub mod db;
pub mod reconcile;
pub mod sync;

pub use app::App;
pub use config::Config;
