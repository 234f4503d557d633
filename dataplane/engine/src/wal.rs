//! WAL records: every state change of a shard, as bytes with a checksum and a position.
//!
//! The engine changes its state only by applying records (`Shard::apply`), on the live
//! path right after encoding them and on recovery by decoding them, so replaying a
//! shard's durable records into a fresh shard reproduces its state exactly. This module
//! encodes and decodes; it performs no I/O. `docs/wal.md` draws the layout.
//!
//! Layout of one record (little endian), always a multiple of 8 bytes:
//! ```text
//! 0..2   u16  length of the whole record, header included
//! 2      u8   kind
//! 3      u8   flags (kind-specific, 0 otherwise)
//! 4..8   u32  CRC32C of bytes 0..4 then 8..length (everything but itself)
//! 8..16  u64  position (1, 2, 3, ... per shard)
//! 16..   kind-specific payload, then zero padding to a multiple of 8
//! ```
//! A line is 16 bytes: sku u64, location u32 (`u32::MAX`: let the shard pick), qty u32.

use thiserror::Error;

/// The location value that means "any location" in a WAL line.
pub const ANY_LOCATION: u32 = u32::MAX;
/// Bytes in a record header.
pub const HEADER_BYTES: usize = 16;
const LINE_BYTES: usize = 16;

/// A cart line as the WAL records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalLine {
    /// The SKU.
    pub sku: u64,
    /// The location, or [`ANY_LOCATION`].
    pub location: u32,
    /// Units.
    pub qty: u32,
}

/// The lines of a record: borrowed from the caller when encoding, from bytes when decoding.
#[derive(Debug, Clone, Copy)]
pub enum Lines<'a> {
    /// Lines the engine built.
    Slice(&'a [WalLine]),
    /// Lines inside a decoded record, 16 bytes each.
    Bytes(&'a [u8]),
}

impl<'a> Lines<'a> {
    /// Number of lines.
    pub fn len(&self) -> usize {
        match self {
            Lines::Slice(lines) => lines.len(),
            Lines::Bytes(bytes) => bytes.len() / LINE_BYTES,
        }
    }

    /// True when there are no lines.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Line `index`, which must be below `len()`.
    pub fn at(&self, index: usize) -> WalLine {
        match self {
            Lines::Slice(lines) => lines[index],
            Lines::Bytes(bytes) => {
                let line = &bytes[index * LINE_BYTES..(index + 1) * LINE_BYTES];
                WalLine {
                    sku: u64::from_le_bytes(line[0..8].try_into().expect("8 bytes")),
                    location: u32::from_le_bytes(line[8..12].try_into().expect("4 bytes")),
                    qty: u32::from_le_bytes(line[12..16].try_into().expect("4 bytes")),
                }
            }
        }
    }

    /// The lines in order.
    pub fn iter(&self) -> impl Iterator<Item = WalLine> + '_ {
        (0..self.len()).map(move |index| self.at(index))
    }
}

/// How a cross-shard cart's phase ended, as its coordinator decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CartOutcome {
    /// Every participant holds its lines: the cart is reserved.
    Reserved = 1,
    /// A participant could not hold its lines: nothing is held.
    ReserveFailed = 2,
    /// Every participant pinned its lines: the cart is sold.
    Committed = 3,
    /// A participant's lines had expired: the whole cart expired.
    CommitFailed = 4,
    /// Participants did not answer in time: the commit did not happen, the cart is held.
    CommitTimedOut = 5,
    /// Every participant moved its expiry.
    Extended = 6,
    /// A participant's lines had expired: the whole cart expired.
    ExtendFailed = 7,
    /// Participants did not answer in time: the old expiry stands.
    ExtendTimedOut = 8,
    /// The client released the cart.
    Released = 9,
    /// Nobody committed the cart in time.
    Expired = 10,
}

impl CartOutcome {
    fn from_u8(value: u8) -> Option<CartOutcome> {
        use CartOutcome::*;
        [
            Reserved,
            ReserveFailed,
            Committed,
            CommitFailed,
            CommitTimedOut,
            Extended,
            ExtendFailed,
            ExtendTimedOut,
            Released,
            Expired,
        ]
        .into_iter()
        .find(|outcome| *outcome as u8 == value)
    }
}

/// Which phase a coordinator starts on a reserved cart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CartPhase {
    /// Commit the lines whose bit is set in the mask (cart line order), release the rest.
    Commit {
        /// Bit `i` set: line `i` is sold.
        mask: u64,
    },
    /// Move the expiry of every line.
    Extend {
        /// The new expiry.
        expires_at_ms: u64,
    },
}

/// One state change of a shard.
#[derive(Debug, Clone, Copy)]
pub enum WalRecord<'a> {
    /// A SKU at a location was created or its backorder limit changed.
    SkuUpserted {
        /// The SKU.
        sku: u64,
        /// The location.
        location: u32,
        /// The new backorder limit.
        backorder_limit: u32,
    },
    /// `on_hand` changed by `delta` under adjustment id `adjustment`.
    Adjusted {
        /// The adjustment's id.
        adjustment: u128,
        /// The SKU.
        sku: u64,
        /// The location.
        location: u32,
        /// Units added.
        delta: i64,
    },
    /// Lines are held (locations resolved) for hold `hold` until `expires_at_ms`.
    Held {
        /// The hold.
        hold: u128,
        /// Its expiry.
        expires_at_ms: u64,
        /// A digest of the reserve request, to tell a retry from a conflicting reuse.
        fingerprint: u32,
        /// For a line of a cross-shard cart: its coordinator and the reserve's txn.
        prepared_for: Option<(u32, u64)>,
        /// The held lines.
        lines: Lines<'a>,
    },
    /// A prepared participant hold learnt that its cart is reserved.
    Kept {
        /// The hold.
        hold: u128,
    },
    /// The lines of `hold` whose bit is set in `mask` are sold, the others released.
    Committed {
        /// The hold.
        hold: u128,
        /// Bit `i`: line `i` is sold.
        mask: u64,
        /// When the shard decided the sale (data-plane milliseconds); the journal's sales
        /// carry it to the control plane's ledger.
        at_ms: u64,
    },
    /// The hold's lines are released by request.
    Released {
        /// The hold.
        hold: u128,
    },
    /// The hold's lines are released because it expired.
    Expired {
        /// The hold.
        hold: u128,
    },
    /// The hold's expiry moved.
    Extended {
        /// The hold.
        hold: u128,
        /// The new expiry.
        expires_at_ms: u64,
    },
    /// A participant hold is pinned for commit attempt `txn`: it cannot expire.
    Pinned {
        /// The hold.
        hold: u128,
        /// The commit attempt.
        txn: u64,
    },
    /// A pinned participant hold is unpinned (its commit attempt was abandoned).
    Unpinned {
        /// The hold.
        hold: u128,
    },
    /// This shard coordinates a cross-shard cart; its reserve is transaction `txn`.
    CartOpened {
        /// The cart's hold id.
        hold: u128,
        /// The reserve transaction.
        txn: u64,
        /// Digest of the reserve request.
        fingerprint: u32,
        /// The cart's expiry.
        expires_at_ms: u64,
        /// The lines as the client asked for them.
        lines: Lines<'a>,
    },
    /// The coordinator starts transaction `txn` on a reserved cart.
    CartStarted {
        /// The cart's hold id.
        hold: u128,
        /// The new transaction.
        txn: u64,
        /// What it does.
        phase: CartPhase,
    },
    /// The coordinator decided transaction `txn` of a cart.
    CartDecided {
        /// The cart's hold id.
        hold: u128,
        /// The transaction decided.
        txn: u64,
        /// The decision.
        outcome: CartOutcome,
        /// The status the client hears (for failures: why).
        status: u8,
    },
    /// A finished cart whose participants all acknowledged is forgotten.
    CartForgotten {
        /// The cart's hold id.
        hold: u128,
    },
}

/// Why bytes are not a valid WAL record.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WalDecodeError {
    /// Fewer bytes than a header, or than the header's length says: a torn tail.
    #[error("record truncated: {available} bytes of {needed}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The length field is not a multiple of 8 or is shorter than a header.
    #[error("bad record length {0}")]
    BadLength(usize),
    /// The checksum does not match the bytes.
    #[error("checksum mismatch")]
    Checksum,
    /// The kind byte names no record kind.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// The payload is too short or malformed for its kind.
    #[error("malformed payload for kind {0}")]
    Malformed(u8),
}

mod kind {
    pub const SKU_UPSERTED: u8 = 1;
    pub const ADJUSTED: u8 = 2;
    pub const HELD: u8 = 3;
    pub const KEPT: u8 = 4;
    pub const COMMITTED: u8 = 5;
    pub const RELEASED: u8 = 6;
    pub const EXPIRED: u8 = 7;
    pub const EXTENDED: u8 = 8;
    pub const PINNED: u8 = 9;
    pub const UNPINNED: u8 = 10;
    pub const CART_OPENED: u8 = 11;
    pub const CART_STARTED: u8 = 12;
    pub const CART_DECIDED: u8 = 13;
    pub const CART_FORGOTTEN: u8 = 14;
}

/// A CRC32C being folded over a record one 8-byte word at a time, as it is written.
trait Checksum {
    fn new(head: u32) -> Self;
    fn word(&mut self, word: u64);
    fn finish(self) -> u32;
}

/// The `crc32c` crate's table-driven CRC: for CPUs without the CRC32C instruction.
struct PortableCrc(u32);

impl Checksum for PortableCrc {
    fn new(head: u32) -> Self {
        PortableCrc(crc32c::crc32c(&head.to_le_bytes()))
    }
    fn word(&mut self, word: u64) {
        self.0 = crc32c::crc32c_append(self.0, &word.to_le_bytes());
    }
    fn finish(self) -> u32 {
        self.0
    }
}

/// The CPU's CRC32C instruction. Only [`encode_sse42`], which runs once SSE4.2 was
/// detected, creates one.
#[cfg(target_arch = "x86_64")]
struct Sse42Crc(u32);

#[cfg(target_arch = "x86_64")]
impl Checksum for Sse42Crc {
    #[inline(always)]
    fn new(head: u32) -> Self {
        // SAFETY: a `Sse42Crc` exists only inside `encode_sse42`, which runs on CPUs
        // that have SSE4.2 (its caller checks).
        Sse42Crc(unsafe { std::arch::x86_64::_mm_crc32_u32(!0, head) })
    }
    #[inline(always)]
    fn word(&mut self, word: u64) {
        // SAFETY: as in `new`.
        self.0 = unsafe { std::arch::x86_64::_mm_crc32_u64(u64::from(self.0), word) } as u32;
    }
    #[inline(always)]
    fn finish(self) -> u32 {
        !self.0
    }
}

/// Appends a record's words to the output (its room reserved up front) and folds each
/// into the checksum on the way, so that the record is written and summed in one pass.
struct Writer<'b, C> {
    out: &'b mut Vec<u8>,
    crc: C,
    /// Where the record starts in `out`, its length as its header declares, and how
    /// many of its bytes are written. They go into `out`'s spare capacity; its length
    /// covers them only once `finish` has checked that all were written.
    start: usize,
    len: usize,
    written: usize,
}

impl<'b, C: Checksum> Writer<'b, C> {
    /// Starts a record of `kind` with `payload` bytes after its header at the end of
    /// `out`: reserves its room and writes the header, its checksum left zero.
    #[inline(always)]
    fn begin(out: &'b mut Vec<u8>, position: u64, kind: u8, flags: u8, payload: usize) -> Self {
        let len = (HEADER_BYTES + payload).next_multiple_of(8);
        assert!(len <= usize::from(u16::MAX), "record of {len} bytes");
        let head = u32::from_le_bytes([len as u8, (len >> 8) as u8, kind, flags]);
        out.reserve(len);
        let start = out.len();
        let mut w = Writer { out, crc: C::new(head), start, len, written: 0 };
        w.put(u64::from(head));
        w.word(position);
        w
    }

    /// Ends the record: fills in its checksum; returns its length.
    #[inline(always)]
    fn finish(self) -> usize {
        assert_eq!(self.written, self.len, "a record's words disagree with the length its header declares");
        let crc = self.crc.finish();
        // SAFETY: `begin` reserved `len` bytes after `start`, and `put` wrote every one
        // of them (it writes whole words, in order; the assertion above counted them).
        unsafe { self.out.set_len(self.start + self.len) };
        self.out[self.start + 4..self.start + 8].copy_from_slice(&crc.to_le_bytes());
        self.len
    }

    /// Writes the next word of the record without checksumming it.
    #[inline(always)]
    fn put(&mut self, word: u64) {
        assert!(self.written + 8 <= self.len, "a record's words overrun the length its header declares");
        // SAFETY: `begin` reserved `len` bytes after `start` (the length stays at `start`
        // until `finish`), and the assertion keeps this word within them.
        unsafe {
            let at = self.out.as_mut_ptr().add(self.start + self.written);
            at.cast::<u64>().write_unaligned(word.to_le());
        }
        self.written += 8;
    }

    #[inline(always)]
    fn word(&mut self, word: u64) {
        self.put(word);
        self.crc.word(word);
    }
    #[inline(always)]
    fn pair(&mut self, low: u32, high: u32) {
        self.word(u64::from(low) | u64::from(high) << 32);
    }
    #[inline(always)]
    fn id(&mut self, id: u128) {
        self.word(id as u64);
        self.word((id >> 64) as u64);
    }
    #[inline(always)]
    fn lines(&mut self, lines: &Lines<'_>) {
        match lines {
            Lines::Bytes(bytes) => {
                for word in bytes.chunks_exact(8) {
                    self.word(u64::from_le_bytes(word.try_into().expect("8 bytes")));
                }
            }
            Lines::Slice(lines) => {
                for line in *lines {
                    self.word(line.sku);
                    self.pair(line.location, line.qty);
                }
            }
        }
    }
}

/// [`WalRecord::encode`] with the CRC32C instruction.
///
/// # Safety
/// The CPU must support SSE4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn encode_sse42(record: &WalRecord<'_>, position: u64, out: &mut Vec<u8>) -> usize {
    record.encode_with::<Sse42Crc>(position, out)
}

impl WalRecord<'_> {
    /// Appends this record, at `position`, to `out`; returns the bytes written.
    pub fn encode(&self, position: u64, out: &mut Vec<u8>) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("sse4.2") {
                // SAFETY: the CPU supports SSE4.2, checked just above.
                return unsafe { encode_sse42(self, position, out) };
            }
        }
        self.encode_with::<PortableCrc>(position, out)
    }

    #[inline(always)]
    fn encode_with<C: Checksum>(&self, position: u64, out: &mut Vec<u8>) -> usize {
        // Each kind starts its record with its header, declaring its payload's bytes (so
        // one match decides everything), then writes the payload.
        let lines_bytes = |lines: &Lines<'_>| lines.len() * LINE_BYTES;
        let w = match *self {
            WalRecord::SkuUpserted { sku, location, backorder_limit } => {
                let mut w = Writer::<C>::begin(out, position, kind::SKU_UPSERTED, 0, 16);
                w.word(sku);
                w.pair(location, backorder_limit);
                w
            }
            WalRecord::Adjusted { adjustment, sku, location, delta } => {
                let mut w = Writer::<C>::begin(out, position, kind::ADJUSTED, 0, 40);
                w.id(adjustment);
                w.word(sku);
                w.pair(location, 0);
                w.word(delta as u64);
                w
            }
            WalRecord::Held { hold, expires_at_ms, fingerprint, prepared_for, ref lines } => {
                let (flags, extra) = if prepared_for.is_some() { (1, 16) } else { (0, 0) };
                let mut w = Writer::<C>::begin(out, position, kind::HELD, flags, 32 + extra + lines_bytes(lines));
                w.id(hold);
                w.word(expires_at_ms);
                w.pair(fingerprint, lines.len() as u32);
                if let Some((coordinator, txn)) = prepared_for {
                    w.pair(coordinator, 0);
                    w.word(txn);
                }
                w.lines(lines);
                w
            }
            WalRecord::Kept { hold }
            | WalRecord::Released { hold }
            | WalRecord::Expired { hold }
            | WalRecord::Unpinned { hold }
            | WalRecord::CartForgotten { hold } => {
                let kind = match *self {
                    WalRecord::Kept { .. } => kind::KEPT,
                    WalRecord::Released { .. } => kind::RELEASED,
                    WalRecord::Expired { .. } => kind::EXPIRED,
                    WalRecord::Unpinned { .. } => kind::UNPINNED,
                    _ => kind::CART_FORGOTTEN,
                };
                let mut w = Writer::<C>::begin(out, position, kind, 0, 16);
                w.id(hold);
                w
            }
            WalRecord::Committed { hold, mask, at_ms } => {
                let mut w = Writer::<C>::begin(out, position, kind::COMMITTED, 0, 32);
                w.id(hold);
                w.word(mask);
                w.word(at_ms);
                w
            }
            WalRecord::Extended { hold, expires_at_ms: value } | WalRecord::Pinned { hold, txn: value } => {
                let kind = if matches!(self, WalRecord::Extended { .. }) { kind::EXTENDED } else { kind::PINNED };
                let mut w = Writer::<C>::begin(out, position, kind, 0, 24);
                w.id(hold);
                w.word(value);
                w
            }
            WalRecord::CartOpened { hold, txn, fingerprint, expires_at_ms, ref lines } => {
                let mut w = Writer::<C>::begin(out, position, kind::CART_OPENED, 0, 40 + lines_bytes(lines));
                w.id(hold);
                w.word(txn);
                w.word(expires_at_ms);
                w.pair(fingerprint, lines.len() as u32);
                w.lines(lines);
                w
            }
            WalRecord::CartStarted { hold, txn, phase } => {
                let (flags, value) = match phase {
                    CartPhase::Commit { mask } => (1, mask),
                    CartPhase::Extend { expires_at_ms } => (2, expires_at_ms),
                };
                let mut w = Writer::<C>::begin(out, position, kind::CART_STARTED, flags, 32);
                w.id(hold);
                w.word(txn);
                w.word(value);
                w
            }
            WalRecord::CartDecided { hold, txn, outcome, status } => {
                let mut w = Writer::<C>::begin(out, position, kind::CART_DECIDED, 0, 26);
                w.id(hold);
                w.word(txn);
                // Two bytes, then zero padding to the word's end.
                w.word(u64::from(outcome as u8) | u64::from(status) << 8);
                w
            }
        };
        w.finish()
    }
}

/// The checksum of a whole record: CRC32C of every byte but the checksum field itself.
fn record_crc(record: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU supports SSE4.2, checked just above.
            return unsafe { record_crc_sse42(record) };
        }
    }
    crc32c::crc32c_append(crc32c::crc32c(&record[0..4]), &record[8..])
}

/// `record_crc` with the CPU's CRC32C instruction, eight bytes at a time: records are
/// multiples of 8 bytes, so the words after the header's first half are whole.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn record_crc_sse42(record: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u32, _mm_crc32_u64, _mm_crc32_u8};
    let head = u32::from_le_bytes(record[0..4].try_into().expect("4 bytes"));
    let mut crc = _mm_crc32_u32(!0, head);
    let mut words = record[8..].chunks_exact(8);
    for word in &mut words {
        crc = _mm_crc32_u64(u64::from(crc), u64::from_le_bytes(word.try_into().expect("8 bytes"))) as u32;
    }
    for byte in words.remainder() {
        crc = _mm_crc32_u8(crc, *byte);
    }
    !crc
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    kind: u8,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WalDecodeError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(WalDecodeError::Malformed(self.kind))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, WalDecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WalDecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WalDecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn u128(&mut self) -> Result<u128, WalDecodeError> {
        Ok(u128::from_le_bytes(self.take(16)?.try_into().expect("16 bytes")))
    }
    fn lines(&mut self, count: u32) -> Result<Lines<'a>, WalDecodeError> {
        let bytes = (count as usize).checked_mul(LINE_BYTES).ok_or(WalDecodeError::Malformed(self.kind))?;
        Ok(Lines::Bytes(self.take(bytes)?))
    }
}

/// The SKU (of the first line) and the hold a record names, read from its bytes without
/// checking them, for prefetching during recovery: `decode` checks the record later.
pub(crate) fn peek_keys(bytes: &[u8]) -> (Option<u64>, Option<u128>) {
    let u64_at = |at: usize| bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let u128_at = |at: usize| bytes.get(at..at + 16).map(|b| u128::from_le_bytes(b.try_into().expect("16 bytes")));
    let (Some(&kind), Some(&flags)) = (bytes.get(2), bytes.get(3)) else { return (None, None) };
    match kind {
        // SkuUpserted: sku at 16.
        1 => (u64_at(16), None),
        // Adjusted: sku at 16 + 16.
        2 => (u64_at(32), None),
        // Held: hold at 16; lines at 16 + 32, or 16 + 48 for a participant's lines.
        3 => (u64_at(if flags == 1 { 64 } else { 48 }), u128_at(16)),
        // Records that name a hold first.
        4..=10 | 14 => (None, u128_at(16)),
        _ => (None, None),
    }
}

/// Decodes the record at the start of `bytes`: the record, its position and its length.
///
/// Checks the length, the checksum and the payload's shape; never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<(WalRecord<'_>, u64, usize), WalDecodeError> {
    if bytes.len() < HEADER_BYTES {
        return Err(WalDecodeError::Truncated { needed: HEADER_BYTES, available: bytes.len() });
    }
    let len = usize::from(u16::from_le_bytes([bytes[0], bytes[1]]));
    if len < HEADER_BYTES || len % 8 != 0 {
        return Err(WalDecodeError::BadLength(len));
    }
    if bytes.len() < len {
        return Err(WalDecodeError::Truncated { needed: len, available: bytes.len() });
    }
    let (kind, flags) = (bytes[2], bytes[3]);
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if record_crc(&bytes[..len]) != crc {
        return Err(WalDecodeError::Checksum);
    }
    let position = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let mut r = Reader { bytes: &bytes[..len], at: HEADER_BYTES, kind };
    let record = match kind {
        kind::SKU_UPSERTED => WalRecord::SkuUpserted { sku: r.u64()?, location: r.u32()?, backorder_limit: r.u32()? },
        kind::ADJUSTED => {
            let adjustment = r.u128()?;
            let sku = r.u64()?;
            let location = r.u32()?;
            r.u32()?;
            WalRecord::Adjusted { adjustment, sku, location, delta: r.u64()? as i64 }
        }
        kind::HELD => {
            let hold = r.u128()?;
            let expires_at_ms = r.u64()?;
            let fingerprint = r.u32()?;
            let count = r.u32()?;
            let prepared_for = match flags {
                0 => None,
                1 => {
                    let coordinator = r.u32()?;
                    r.u32()?;
                    Some((coordinator, r.u64()?))
                }
                _ => return Err(WalDecodeError::Malformed(kind)),
            };
            let lines = r.lines(count)?;
            WalRecord::Held { hold, expires_at_ms, fingerprint, prepared_for, lines }
        }
        kind::KEPT => WalRecord::Kept { hold: r.u128()? },
        kind::COMMITTED => WalRecord::Committed { hold: r.u128()?, mask: r.u64()?, at_ms: r.u64()? },
        kind::RELEASED => WalRecord::Released { hold: r.u128()? },
        kind::EXPIRED => WalRecord::Expired { hold: r.u128()? },
        kind::EXTENDED => WalRecord::Extended { hold: r.u128()?, expires_at_ms: r.u64()? },
        kind::PINNED => WalRecord::Pinned { hold: r.u128()?, txn: r.u64()? },
        kind::UNPINNED => WalRecord::Unpinned { hold: r.u128()? },
        kind::CART_OPENED => {
            let hold = r.u128()?;
            let txn = r.u64()?;
            let expires_at_ms = r.u64()?;
            let fingerprint = r.u32()?;
            let count = r.u32()?;
            WalRecord::CartOpened { hold, txn, fingerprint, expires_at_ms, lines: r.lines(count)? }
        }
        kind::CART_STARTED => {
            let hold = r.u128()?;
            let txn = r.u64()?;
            let value = r.u64()?;
            let phase = match flags {
                1 => CartPhase::Commit { mask: value },
                2 => CartPhase::Extend { expires_at_ms: value },
                _ => return Err(WalDecodeError::Malformed(kind)),
            };
            WalRecord::CartStarted { hold, txn, phase }
        }
        kind::CART_DECIDED => {
            let hold = r.u128()?;
            let txn = r.u64()?;
            let outcome = CartOutcome::from_u8(r.u8()?).ok_or(WalDecodeError::Malformed(kind))?;
            WalRecord::CartDecided { hold, txn, outcome, status: r.u8()? }
        }
        kind::CART_FORGOTTEN => WalRecord::CartForgotten { hold: r.u128()? },
        other => return Err(WalDecodeError::UnknownKind(other)),
    };
    // Only zero padding (less than 8 bytes) may follow the payload.
    if len - r.at >= 8 || bytes[r.at..len].iter().any(|b| *b != 0) {
        return Err(WalDecodeError::Malformed(kind));
    }
    Ok((record, position, len))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn line_strategy() -> impl Strategy<Value = WalLine> + Clone {
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(sku, location, qty)| WalLine { sku, location, qty })
    }

    /// Records as owned values, so that proptest can generate them.
    #[derive(Debug, Clone)]
    enum Owned {
        Upsert(u64, u32, u32),
        Adjust(u128, u64, u32, i64),
        Held(u128, u64, u32, Option<(u32, u64)>, Vec<WalLine>),
        Commit(u128, u64, u64),
        Release(u128),
        Pinned(u128, u64),
        Opened(u128, u64, u32, u64, Vec<WalLine>),
        Started(u128, u64, bool, u64),
        Decided(u128, u64, u8, u8),
    }

    impl Owned {
        fn record(&self) -> WalRecord<'_> {
            match self {
                Owned::Upsert(sku, location, backorder_limit) => {
                    WalRecord::SkuUpserted { sku: *sku, location: *location, backorder_limit: *backorder_limit }
                }
                Owned::Adjust(adjustment, sku, location, delta) => {
                    WalRecord::Adjusted { adjustment: *adjustment, sku: *sku, location: *location, delta: *delta }
                }
                Owned::Held(hold, expires_at_ms, fingerprint, prepared_for, lines) => WalRecord::Held {
                    hold: *hold,
                    expires_at_ms: *expires_at_ms,
                    fingerprint: *fingerprint,
                    prepared_for: *prepared_for,
                    lines: Lines::Slice(lines),
                },
                Owned::Commit(hold, mask, at_ms) => WalRecord::Committed { hold: *hold, mask: *mask, at_ms: *at_ms },
                Owned::Release(hold) => WalRecord::Released { hold: *hold },
                Owned::Pinned(hold, txn) => WalRecord::Pinned { hold: *hold, txn: *txn },
                Owned::Opened(hold, txn, fingerprint, expires_at_ms, lines) => WalRecord::CartOpened {
                    hold: *hold,
                    txn: *txn,
                    fingerprint: *fingerprint,
                    expires_at_ms: *expires_at_ms,
                    lines: Lines::Slice(lines),
                },
                Owned::Started(hold, txn, commit, value) => WalRecord::CartStarted {
                    hold: *hold,
                    txn: *txn,
                    phase: if *commit {
                        CartPhase::Commit { mask: *value }
                    } else {
                        CartPhase::Extend { expires_at_ms: *value }
                    },
                },
                Owned::Decided(hold, txn, outcome, status) => WalRecord::CartDecided {
                    hold: *hold,
                    txn: *txn,
                    outcome: CartOutcome::from_u8(*outcome).expect("valid outcome"),
                    status: *status,
                },
            }
        }
    }

    fn owned_strategy() -> impl Strategy<Value = Owned> {
        let lines = proptest::collection::vec(line_strategy(), 0..8);
        prop_oneof![
            (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c)| Owned::Upsert(a, b, c)),
            (any::<u128>(), any::<u64>(), any::<u32>(), any::<i64>())
                .prop_map(|(a, b, c, d)| Owned::Adjust(a, b, c, d)),
            (any::<u128>(), any::<u64>(), any::<u32>(), any::<Option<(u32, u64)>>(), lines.clone())
                .prop_map(|(a, b, c, d, e)| Owned::Held(a, b, c, d, e)),
            (any::<u128>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Owned::Commit(a, b, c)),
            any::<u128>().prop_map(Owned::Release),
            (any::<u128>(), any::<u64>()).prop_map(|(a, b)| Owned::Pinned(a, b)),
            (any::<u128>(), any::<u64>(), any::<u32>(), any::<u64>(), lines)
                .prop_map(|(a, b, c, d, e)| Owned::Opened(a, b, c, d, e)),
            (any::<u128>(), any::<u64>(), any::<bool>(), any::<u64>())
                .prop_map(|(a, b, c, d)| Owned::Started(a, b, c, d)),
            (any::<u128>(), any::<u64>(), 1u8..=10, any::<u8>()).prop_map(|(a, b, c, d)| Owned::Decided(a, b, c, d)),
        ]
    }

    fn same(a: &WalRecord<'_>, b: &WalRecord<'_>) -> bool {
        let mut left = Vec::new();
        let mut right = Vec::new();
        a.encode(7, &mut left);
        b.encode(7, &mut right);
        left == right
    }

    proptest! {
        #[test]
        fn records_round_trip(owned in owned_strategy(), position in any::<u64>()) {
            let record = owned.record();
            let mut bytes = Vec::new();
            let len = record.encode(position, &mut bytes);
            prop_assert_eq!(len, bytes.len());
            prop_assert_eq!(len % 8, 0);
            let (decoded, decoded_position, decoded_len) = decode(&bytes).expect("decodes");
            prop_assert_eq!(decoded_position, position);
            prop_assert_eq!(decoded_len, len);
            prop_assert!(same(&record, &decoded));
        }

        /// A corrupted or truncated record is refused, never misread and never a panic.
        #[test]
        fn damage_is_detected(owned in owned_strategy(), flip in any::<(usize, u8)>(), cut in any::<usize>()) {
            let mut bytes = Vec::new();
            owned.record().encode(3, &mut bytes);
            let truncated = &bytes[..cut % bytes.len()];
            prop_assert!(decode(truncated).is_err());
            let (at, mask) = (flip.0 % bytes.len(), flip.1.max(1));
            bytes[at] ^= mask;
            prop_assert!(decode(&bytes).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    proptest! {
        /// The hardware checksum equals the portable one on any bytes.
        #[test]
        fn checksum_paths_agree(bytes in proptest::collection::vec(any::<u8>(), 8..300)) {
            let portable = crc32c::crc32c_append(crc32c::crc32c(&bytes[0..4]), &bytes[8..]);
            prop_assert_eq!(record_crc(&bytes), portable);
        }
    }

    proptest! {
        /// The encoder that sums with the CRC32C instruction writes the same bytes as the
        /// portable one, after whatever the output already held.
        #[test]
        fn encoders_agree(owned in owned_strategy(), position in any::<u64>(), prefix in 0usize..24) {
            let record = owned.record();
            let mut portable = vec![0xa5; prefix];
            let len = record.encode_with::<PortableCrc>(position, &mut portable);
            prop_assert_eq!(portable.len(), prefix + len);
            prop_assert_eq!(record_crc(&portable[prefix..]).to_le_bytes(), &portable[prefix + 4..prefix + 8]);
            let mut chosen = vec![0xa5; prefix];
            record.encode(position, &mut chosen);
            prop_assert_eq!(chosen, portable);
        }
    }

    /// A `Held` record byte by byte, as `docs/wal.md` draws it.
    #[test]
    fn held_record_layout() {
        let lines = [WalLine { sku: 0x0102_0304_0506_0708, location: 7, qty: 3 }];
        let hold = 0x1112_1314_1516_1718_191a_1b1c_1d1e_1f20u128;
        let record = WalRecord::Held {
            hold,
            expires_at_ms: 900,
            fingerprint: 0xabcd,
            prepared_for: None,
            lines: Lines::Slice(&lines),
        };
        let mut bytes = Vec::new();
        record.encode(5, &mut bytes);
        let mut expected = vec![64, 0, kind::HELD, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&5u64.to_le_bytes());
        expected.extend_from_slice(&hold.to_le_bytes());
        expected.extend_from_slice(&900u64.to_le_bytes());
        expected.extend_from_slice(&0xabcdu32.to_le_bytes());
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        expected.extend_from_slice(&7u32.to_le_bytes());
        expected.extend_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&expected[0..4]), &expected[8..]);
        expected[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn single_line_reserve_fits_in_64_bytes() {
        let lines = [WalLine { sku: 1, location: 2, qty: 3 }];
        let record = WalRecord::Held {
            hold: 9,
            expires_at_ms: 10,
            fingerprint: 11,
            prepared_for: None,
            lines: Lines::Slice(&lines),
        };
        let mut bytes = Vec::new();
        assert_eq!(record.encode(1, &mut bytes), 64);
    }
}
