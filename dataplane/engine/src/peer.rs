//! Messages between shards: the two-phase protocol that keeps a cart all-or-nothing.
//!
//! Every message names the hold and a transaction number (`txn`) that the cart's
//! coordinator allocated and logged before sending anything about it, so that a message
//! handled twice, late or out of order changes nothing: a participant acts only on the
//! transaction it knows, and a coordinator answers a stale vote with its decision.
//! Messages are plain `Send` values; the driver moves them between cores.

use stockplane_wire::{HoldId, Status};

use crate::Tick;

/// A line sent to the participant that owns its SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerLine {
    /// The SKU.
    pub sku: u64,
    /// The location asked for; `None` lets the participant pick.
    pub location: Option<u32>,
    /// Units.
    pub qty: u32,
}

/// A coordinator's decision on one transaction, for one participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The reserve succeeded: keep the prepared lines until they expire.
    Keep,
    /// The reserve failed: release the prepared lines.
    Abort,
    /// The commit succeeded: sell the lines whose bit is set, release the others.
    Commit {
        /// Bit `i`: this participant's line `i` (in the order it was sent) is sold.
        mask: u64,
    },
    /// The commit attempt was abandoned: unpin the lines, which may expire again.
    Unpin,
    /// The cart is over (released, expired, or its commit failed): release the lines.
    Release,
}

/// A message between the coordinator of a cart and a participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// Coordinator to participant: hold these lines until `expires_at_ms`, then vote.
    Prepare {
        /// The cart.
        hold: HoldId,
        /// The reserve transaction.
        txn: u64,
        /// The cart's expiry.
        expires_at_ms: Tick,
        /// The lines this participant owns.
        lines: Vec<PeerLine>,
    },
    /// Coordinator to participant: pin your lines for commit attempt `txn`, then vote.
    Pin {
        /// The cart.
        hold: HoldId,
        /// The commit attempt.
        txn: u64,
    },
    /// Coordinator to participant: move your lines' expiry, then vote.
    Extend {
        /// The cart.
        hold: HoldId,
        /// The extend transaction.
        txn: u64,
        /// The new expiry.
        expires_at_ms: Tick,
    },
    /// Participant to coordinator: `Status::Ok` for yes, otherwise why not.
    Vote {
        /// The cart.
        hold: HoldId,
        /// The transaction voted on.
        txn: u64,
        /// The vote.
        status: Status,
    },
    /// Coordinator to participant: the outcome of transaction `txn`.
    Decide {
        /// The cart.
        hold: HoldId,
        /// The transaction decided.
        txn: u64,
        /// The decision.
        decision: Decision,
    },
    /// Participant to coordinator: the decision on `txn` is applied and durable.
    Ack {
        /// The cart.
        hold: HoldId,
        /// The transaction acknowledged.
        txn: u64,
    },
}

impl PeerMessage {
    /// The hold the message is about.
    pub fn hold(&self) -> HoldId {
        match self {
            PeerMessage::Prepare { hold, .. }
            | PeerMessage::Pin { hold, .. }
            | PeerMessage::Extend { hold, .. }
            | PeerMessage::Vote { hold, .. }
            | PeerMessage::Decide { hold, .. }
            | PeerMessage::Ack { hold, .. } => *hold,
        }
    }
}
