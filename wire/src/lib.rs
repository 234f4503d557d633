//! The stockplane wire contract: what checkout services and the control plane send to the
//! data plane, what it answers, and how both travel in frames.
//!
//! - [`message`]: requests, responses and their payload types (rkyv 0.8 archives);
//! - [`Status`]: every outcome as a plain value with a stable number;
//! - [`frame`]: the fixed frame header and validated, zero-copy decoding;
//! - [`transport`]: the QUIC conventions (ALPN, roles in certificates, close codes);
//! - `client` (feature `client`): the checkout services' client, on tokio and quinn.
//!
//! Without the `client` feature this crate performs no I/O. Every byte that comes from a
//! network is validated (bytecheck) before it is read; nothing here trusts its input.

#[cfg(feature = "client")]
pub mod client;
pub mod frame;
pub mod message;
mod status;
pub mod transport;

pub use message::*;
pub use status::{ArchivedStatus, Status};

/// The protocol version that frames carry; a frame with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;
