//! Requests and responses: what a checkout service or the control plane asks a shard,
//! and what it answers.
//!
//! These are the protocol's types: rkyv archives them into frames (see `frame`), and the
//! data plane reads the archived form in place, after validation, without copying.
//! Every id that makes a request idempotent (the hold id, the adjustment id) is chosen by
//! the client; request ids only match a response to its request within a connection.
//! Field ranges (quantities, TTLs, cart sizes) are checked by the data plane, which
//! answers `Status::InvalidArgument`; the types themselves accept any value.

// rkyv generates archived and resolver types for enums with fields whose fields carry no
// docs; every type written here is documented.
#![allow(missing_docs)]

use rkyv::{Archive, Deserialize, Serialize};

use crate::Status;

/// The client-chosen 128-bit id of a hold: the idempotency key of a cart's reservation.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct HoldId(pub u128);

impl From<&ArchivedHoldId> for HoldId {
    fn from(archived: &ArchivedHoldId) -> HoldId {
        HoldId(archived.0.to_native())
    }
}

/// Who is asking. The data plane takes the role from the client's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Checkout services: reserve, commit, release, extend and query.
    Checkout,
    /// The control plane: everything, including stock changes and the journal.
    Control,
}

/// One line of a cart: `qty` units of `sku`, at `location` or wherever the shard picks.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct CartLine {
    /// The SKU to hold.
    pub sku: u64,
    /// The warehouse to hold it in; `None` lets the shard pick one with enough stock.
    pub location: Option<u32>,
    /// Units to hold; at least 1 and at most the configured maximum.
    pub qty: u32,
}

/// A SKU, optionally at one location: names a line to commit, or stock to query.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct SkuAt {
    /// The SKU.
    pub sku: u64,
    /// The location; `None` means every location of the SKU.
    pub location: Option<u32>,
}

/// Which holds a holds query lists.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub enum HoldsOf {
    /// The open holds that have a line of this SKU (at any location).
    Sku(u64),
    /// One cart's hold, whatever its state.
    Hold(HoldId),
}

/// What a request asks for.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Op {
    /// Hold every line of a cart until `ttl_ms` from now, all or nothing.
    Reserve {
        /// The cart's hold id; repeating the request with it returns the first answer.
        hold: HoldId,
        /// How long the hold lives unless committed, released or extended.
        ttl_ms: u32,
        /// The cart's lines; a SKU and location appear at most once.
        lines: Vec<CartLine>,
    },
    /// Sell the held lines (all, or the named subset, releasing the rest).
    Commit {
        /// The hold to commit.
        hold: HoldId,
        /// `None` commits every line; `Some` commits the named lines and releases the others.
        /// Name a line by its SKU alone, or by its SKU and the location the reserve named.
        lines: Option<Vec<SkuAt>>,
    },
    /// Give the held stock back.
    Release {
        /// The hold to release.
        hold: HoldId,
    },
    /// Move the hold's expiry to `ttl_ms` from now.
    Extend {
        /// The hold to extend.
        hold: HoldId,
        /// The new time to live, from now.
        ttl_ms: u32,
    },
    /// Read the stock of one or many SKUs.
    QueryStock {
        /// The SKUs (and locations) to read.
        items: Vec<SkuAt>,
    },
    /// Read open holds, by SKU or by cart.
    QueryHolds {
        /// Which holds to list.
        of: HoldsOf,
    },
    /// Control only: create a SKU at a location, or change its backorder limit.
    UpsertSku {
        /// The SKU.
        sku: u64,
        /// The location.
        location: u32,
        /// How far below zero `available` may go (0: no backorders).
        backorder_limit: u32,
    },
    /// Control only: add `delta` units to `on_hand` (restock > 0, shrinkage < 0), once.
    Adjust {
        /// The adjustment's id; a retry with the same id is applied once.
        adjustment: u128,
        /// The SKU.
        sku: u64,
        /// The location.
        location: u32,
        /// Units to add (negative: remove).
        delta: i64,
    },
    /// Control only: read committed changes from a journal position.
    Journal {
        /// The shard whose journal to read (each shard keeps its own).
        shard: u32,
        /// The first position to return.
        from: u64,
        /// At most this many entries.
        max_entries: u32,
    },
}

impl Op {
    /// True for operations that only the `control` role may perform.
    pub fn is_control_only(&self) -> bool {
        matches!(self, Op::UpsertSku { .. } | Op::Adjust { .. } | Op::Journal { .. })
    }
}

impl ArchivedOp {
    /// True for operations that only the `control` role may perform.
    pub fn is_control_only(&self) -> bool {
        matches!(self, ArchivedOp::UpsertSku { .. } | ArchivedOp::Adjust { .. } | ArchivedOp::Journal { .. })
    }
}

/// One request of a batch: the client's id for matching the response, and the operation.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// The payload of a request frame: many requests, answered independently.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct RequestBatch {
    /// The requests, in the order the client sent them.
    pub requests: Vec<Request>,
}

/// One held line as the shard recorded it (the location is the one it picked).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct HeldLine {
    /// The SKU.
    pub sku: u64,
    /// The location the units are held at.
    pub location: u32,
    /// Units held.
    pub qty: u32,
}

/// The state of a hold, as a query reports it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum HoldState {
    /// Holding stock until `expires_at_ms`.
    Held = 1,
    /// Sold.
    Committed = 2,
    /// Given back by the client.
    Released = 3,
    /// Given back because nobody committed it in time.
    Expired = 4,
}

/// A hold as a query or a reserve reports it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HoldInfo {
    /// The hold's id.
    pub hold: HoldId,
    /// Its state.
    pub state: HoldState,
    /// When it expires (data-plane milliseconds), if it is still held.
    pub expires_at_ms: u64,
    /// Its lines that this shard knows of.
    pub lines: Vec<HeldLine>,
}

/// The stock of one SKU at one location.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct StockLevel {
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// Sellable units: set by the back office, lowered by each sale.
    pub on_hand: i64,
    /// Units in live holds.
    pub held: i64,
    /// `on_hand - held`; never below `-backorder_limit`.
    pub available: i64,
    /// How far below zero `available` may go.
    pub backorder_limit: u32,
}

/// What a journal entry records.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub enum JournalChange {
    /// A committed line of a hold: `on_hand` fell by `qty`.
    Sale {
        /// The hold the sale belongs to.
        hold: HoldId,
        /// Units sold.
        qty: u32,
        /// When the shard committed it (data-plane milliseconds: Unix time).
        at_ms: u64,
    },
    /// An adjustment: `on_hand` changed by `delta`.
    Adjustment {
        /// The adjustment's id.
        adjustment: u128,
        /// Units added (negative: removed).
        delta: i64,
    },
}

/// One committed change of stock, at a position of the shard's journal.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct JournalEntry {
    /// The entry's position; positions of one shard increase by one.
    pub position: u64,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// What changed.
    pub change: JournalChange,
}

/// Data that comes with a status, for the operations that return data.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub enum Body {
    /// Nothing beyond the status.
    #[default]
    Empty,
    /// The hold that a reserve, commit, release or extend acted on.
    Hold(HoldInfo),
    /// Stock levels, for a stock query.
    Stock(Vec<StockLevel>),
    /// Holds, for a holds query.
    Holds(Vec<HoldInfo>),
    /// Journal entries, and the position to read from next.
    Journal {
        /// The entries, in position order.
        entries: Vec<JournalEntry>,
        /// The position after the last entry returned.
        next: u64,
        /// The shard's incarnation: it changes when the shard starts without its data,
        /// and with it the journal's positions start again.
        incarnation: u64,
    },
}

/// The answer to one request.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Response {
    /// The id of the request this answers.
    pub id: u64,
    /// The outcome.
    pub status: Status,
    /// Data, for operations that return data.
    pub body: Body,
}

/// The payload of a response frame.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct ResponseBatch {
    /// The responses, in any order; match them by id.
    pub responses: Vec<Response>,
}
