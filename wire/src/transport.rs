//! How frames travel: the QUIC conventions shared by the data plane and its clients.
//!
//! `docs/wire.md` ("Transport") is the contract; these constants are its numbers. The
//! data plane and the client both take them from here, so that they cannot disagree.

/// The ALPN protocol id both ends must offer; a connection without it fails the handshake.
pub const ALPN: &[u8] = b"stockplane/1";

/// The prefix of the URI subject-alternative-name that carries a client's role:
/// `urn:stockplane:role:checkout` or `urn:stockplane:role:control`.
pub const ROLE_URI_PREFIX: &str = "urn:stockplane:role:";

/// QUIC application error codes with which the data plane closes a connection.
///
/// Stream resets use the frame error codes (`FrameError::code`, 1–11) instead.
pub mod close {
    /// The peer is done (client or server closing normally).
    pub const NORMAL: u32 = 0;
    /// The client's certificate is valid but names no role, or more than one.
    pub const NO_ROLE: u32 = 0x101;
    /// The server is shutting down; reconnect to another node or later.
    pub const SHUTTING_DOWN: u32 = 0x103;
    /// The client broke the transport rules (for example it opened a unidirectional stream).
    pub const PROTOCOL_VIOLATION: u32 = 0x104;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameError;

    #[test]
    fn close_codes_do_not_collide_with_frame_error_codes() {
        let codes = [close::NORMAL, close::NO_ROLE, close::SHUTTING_DOWN, close::PROTOCOL_VIOLATION];
        for error in FrameError::kinds() {
            assert!(!codes[1..].contains(&u32::from(error.code())), "{error:?}");
        }
        assert_eq!(ALPN, b"stockplane/1");
    }
}
