//! The stockplane data plane: the drivers around the pure engine.
//!
//! One glommio executor per core, each owning one engine shard (`stockplane-engine`), its
//! own QUIC endpoint on a `SO_REUSEPORT` UDP socket, and its end of the cross-core mesh.
//! Everything here is I/O and scheduling; every decision about stock and holds is the
//! engine's. Nothing on a core's hot path takes a lock or allocates per request.
//!
//! Modules:
//! - [`tls`]: rustls server configuration with client authentication, roles from certificates;
//! - [`certs`]: development certificates (`make certs`);
//! - [`admin`]: the HTTP endpoint for Prometheus metrics, `/healthz` and `/readyz`.

pub mod admin;
pub mod certs;
pub mod tls;
