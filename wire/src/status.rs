//! Status codes: the outcome of every request, as a plain value with a stable number.
//!
//! Business outcomes (not enough stock, the hold expired) are statuses, never errors: a
//! checkout service branches on them. The numbers are part of the protocol: they never
//! change meaning and are never reused. `docs/wire.md` lists them.

use rkyv::{Archive, Deserialize, Serialize};

/// The outcome of one request. Each variant's number is stable on the wire.
///
/// Numbers 1–19 are successes, 20–39 business refusals that a retry will not change,
/// 40–59 refusals of the request itself, 60–79 transient refusals worth retrying later.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq, Clone, Copy))]
#[repr(u8)]
pub enum Status {
    /// A read or a control operation succeeded.
    Ok = 1,
    /// Every line of the hold is held until its expiry.
    Reserved = 2,
    /// The hold's lines (or the named subset) are sold; the rest are released.
    Committed = 3,
    /// The hold is released and its stock is available again.
    Released = 4,
    /// The hold's expiry moved to the new time.
    Extended = 5,

    /// At least one line cannot be held: there is not enough available stock.
    InsufficientStock = 20,
    /// A named SKU (or SKU at a location) is not in the catalog.
    UnknownSku = 21,
    /// No hold with this id is known (never reserved, or forgotten after retention).
    UnknownHold = 22,
    /// The hold expired before the operation; its stock has returned.
    HoldExpired = 23,
    /// The hold is already committed; it cannot be released or extended.
    AlreadyCommitted = 24,
    /// The hold is already released; it cannot be committed or extended.
    AlreadyReleased = 25,
    /// The id was used before with different content.
    Conflict = 26,
    /// The journal no longer holds the requested position.
    JournalTruncated = 27,

    /// A field is out of its allowed range (zero or huge quantity, TTL, empty cart, ...).
    InvalidArgument = 40,
    /// The caller's role may not perform this operation.
    Forbidden = 41,
    /// The request reached a shard that does not own its SKU or hold: a routing bug.
    WrongShard = 42,

    /// A bounded resource is full; retry later with the same ids.
    Busy = 60,
    /// The caller sent more than its rate allows; retry later.
    RateLimited = 61,
    /// The shard cannot accept state changes now (for example its disk failed).
    Unavailable = 62,
    /// A peer shard did not answer in time; the outcome was not applied.
    Timeout = 63,
}

impl Status {
    /// Every status, in number order; the list that `docs/wire.md` documents.
    pub const ALL: [Status; 20] = [
        Status::Ok,
        Status::Reserved,
        Status::Committed,
        Status::Released,
        Status::Extended,
        Status::InsufficientStock,
        Status::UnknownSku,
        Status::UnknownHold,
        Status::HoldExpired,
        Status::AlreadyCommitted,
        Status::AlreadyReleased,
        Status::Conflict,
        Status::JournalTruncated,
        Status::InvalidArgument,
        Status::Forbidden,
        Status::WrongShard,
        Status::Busy,
        Status::RateLimited,
        Status::Unavailable,
        Status::Timeout,
    ];

    /// The stable wire number of this status.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The status with this wire number, if there is one.
    pub fn from_code(code: u8) -> Option<Status> {
        Status::ALL.iter().copied().find(|status| status.code() == code)
    }

    /// True when the request did what it asked.
    pub fn is_success(self) -> bool {
        self.code() < 20
    }

    /// True when the same request may succeed if retried later (with the same ids).
    pub fn is_retryable(self) -> bool {
        self.code() >= 60
    }
}

impl From<ArchivedStatus> for Status {
    fn from(archived: ArchivedStatus) -> Status {
        Status::from_code(archived as u8).expect("archived status was validated")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for status in Status::ALL {
            assert_eq!(Status::from_code(status.code()), Some(status));
        }
        let mut codes: Vec<u8> = Status::ALL.iter().map(|s| s.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Status::ALL.len());
        assert_eq!(Status::from_code(0), None);
        assert_eq!(Status::from_code(255), None);
    }

    #[test]
    fn classes_follow_number_ranges() {
        assert!(Status::Reserved.is_success());
        assert!(!Status::InsufficientStock.is_success());
        assert!(Status::Busy.is_retryable());
        assert!(!Status::Conflict.is_retryable());
    }
}
