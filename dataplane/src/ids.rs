//! The engine's `Origin::client` as the driver uses it: which core, connection and stream a
//! request came from, packed into a `u64` so that a reply finds its way back.
//!
//! Generations make a stale address harmless: a reply for a connection or stream that has
//! closed (and whose slot was reused) does not match the new occupant and is dropped.

/// Where a request came from: the core that holds the connection, the connection's slot
/// and generation on that core, and the stream's slot and generation on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientAddr {
    /// The core (shard) that owns the connection.
    pub core: u8,
    /// The connection's slot on that core.
    pub conn: u16,
    /// The connection slot's generation.
    pub conn_gen: u16,
    /// The stream's slot on the connection.
    pub stream: u8,
    /// The stream slot's generation.
    pub stream_gen: u16,
}

impl ClientAddr {
    /// Packs the address into the engine's `Origin::client`.
    pub fn pack(self) -> u64 {
        (u64::from(self.core) << 56)
            | (u64::from(self.conn) << 40)
            | (u64::from(self.conn_gen) << 24)
            | (u64::from(self.stream) << 16)
            | u64::from(self.stream_gen)
    }

    /// Unpacks an address packed by [`ClientAddr::pack`].
    pub fn unpack(client: u64) -> ClientAddr {
        ClientAddr {
            core: (client >> 56) as u8,
            conn: (client >> 40) as u16,
            conn_gen: (client >> 24) as u16,
            stream: (client >> 16) as u8,
            stream_gen: client as u16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_are_inverse() {
        for addr in [
            ClientAddr { core: 0, conn: 0, conn_gen: 0, stream: 0, stream_gen: 0 },
            ClientAddr { core: 255, conn: 65_535, conn_gen: 65_535, stream: 255, stream_gen: 65_535 },
            ClientAddr { core: 3, conn: 17, conn_gen: 2, stream: 9, stream_gen: 40_000 },
        ] {
            assert_eq!(ClientAddr::unpack(addr.pack()), addr);
        }
    }
}
