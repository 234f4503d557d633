//! Frames: how a [`RequestBatch`] or a [`ResponseBatch`] travels on a stream.
//!
//! A frame is a fixed 16-byte header followed by one rkyv 0.8 archive, the payload.
//! `docs/wire.md` draws the header byte by byte; in short, all little-endian:
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..4   | magic `b"SKPL"`                                    |
//! | 4..6   | protocol version, u16 ([`crate::PROTOCOL_VERSION`]) |
//! | 6      | frame kind, u8 ([`FrameKind`])                     |
//! | 7      | flags, u8, must be 0                               |
//! | 8..12  | payload length in bytes, u32                       |
//! | 12..16 | reserved, must be 0                                |
//!
//! Invariants:
//! - the payload starts 16 bytes after the frame, so a frame that starts on a 16-byte
//!   boundary has an aligned payload (archived `u128` hold ids need 16); a frame that does
//!   not is refused ([`FrameError::Misaligned`]) rather than copied behind the caller's
//!   back: [`FrameBuf`] is the explicit copy;
//! - a frame is exactly `16 + payload length` bytes: decoding refuses both missing and
//!   trailing bytes, so one frame is one slice;
//! - every payload is validated with bytecheck (`rkyv::access`) before anything reads it;
//!   validation is linear in the payload's size, and the size is bounded by [`Limits`]
//!   before validation starts. Nothing here calls `access_unchecked`.
//!
//! This module performs no I/O and keeps no state: it turns batches into bytes and
//! checked bytes into archived batches. It does not judge the requests themselves
//! (quantities, TTLs, roles): the data plane does, and answers with a [`crate::Status`].

use rkyv::{
    api::high::{HighSerializer, HighValidator},
    bytecheck::CheckBytes,
    rancor,
    ser::allocator::ArenaHandle,
    Portable, Serialize,
};

use crate::{ArchivedRequestBatch, ArchivedResponseBatch, RequestBatch, ResponseBatch, PROTOCOL_VERSION};

/// The 16-byte aligned buffer that frames are encoded into, re-exported so that callers
/// need not depend on rkyv (with the same features) to hold a frame.
pub use rkyv::util::AlignedVec;

/// The length of the frame header in bytes; the payload starts at this offset.
pub const HEADER_LEN: usize = 16;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SKPL";

/// The alignment, in bytes, that a frame (and so its payload) must start on.
pub const FRAME_ALIGN: usize = 16;

/// The bounds that a decoder enforces on every frame, so that a peer cannot make it
/// buffer or validate without limit.
///
/// A server keeps one `Limits` per listener (from its configuration); a client may use
/// the default. Every bound is answered with a [`FrameError`], never with a hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// The largest frame accepted, header included, in bytes. Checked on the header
    /// alone, before the payload is buffered or validated.
    pub frame_bytes_max: u32,
    /// The most requests that one request frame may carry. Checked after validation,
    /// since the count is only trustworthy once the payload is validated (validation
    /// itself is bounded by `frame_bytes_max`).
    pub requests_per_frame_max: u32,
}

impl Limits {
    /// The default frame size bound: 1 MiB, header included.
    pub const FRAME_BYTES_MAX_DEFAULT: u32 = 1 << 20;
    /// The default bound on requests per frame.
    pub const REQUESTS_PER_FRAME_MAX_DEFAULT: u32 = 4096;
}

impl Default for Limits {
    /// 1 MiB frames of at most 4096 requests: room for the largest cart batches a
    /// checkout service sends, small enough that one frame never stalls a shard.
    fn default() -> Limits {
        Limits {
            frame_bytes_max: Limits::FRAME_BYTES_MAX_DEFAULT,
            requests_per_frame_max: Limits::REQUESTS_PER_FRAME_MAX_DEFAULT,
        }
    }
}

/// What a frame's payload is; byte 6 of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// An archived [`RequestBatch`], from a client to the data plane.
    Requests = 1,
    /// An archived [`ResponseBatch`], from the data plane to a client.
    Responses = 2,
}

impl FrameKind {
    /// The kind's stable number on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The kind with this number, if there is one.
    pub fn from_code(code: u8) -> Option<FrameKind> {
        match code {
            1 => Some(FrameKind::Requests),
            2 => Some(FrameKind::Responses),
            _ => None,
        }
    }
}

/// A parsed, checked frame header: what a stream reader needs to know how many bytes
/// the whole frame takes before it has them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload's length in bytes (the header not included).
    pub payload_len: u32,
}

impl Header {
    /// The whole frame's length in bytes: the header plus the payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Refuses a frame larger than `limits` allows. A stream reader calls this right
    /// after [`header_parse`], before it buffers the payload.
    pub fn check_limits(&self, limits: &Limits) -> Result<(), FrameError> {
        let len = HEADER_LEN as u64 + u64::from(self.payload_len);
        if len > u64::from(limits.frame_bytes_max) {
            return Err(FrameError::Oversized { len, max: limits.frame_bytes_max });
        }
        Ok(())
    }

    /// The header's 16 bytes, for the current [`PROTOCOL_VERSION`].
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes[6] = self.kind.code();
        bytes[7] = 0; // flags
        bytes[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        // bytes 12..16 are reserved and stay zero.
        bytes
    }
}

/// Why a frame was refused. Every variant means the frame as a whole was not read: a
/// server answers none of its requests and tells the client with [`FrameError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a header: `needed` bytes are needed before anything can be parsed.
    #[error("frame too short: {len} bytes, a header needs {needed}")]
    TooShort {
        /// Bytes needed to parse the header.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// The header promises more payload than the bytes hold: `needed` bytes in all.
    #[error("frame truncated: {len} bytes, the header announces {needed}")]
    Truncated {
        /// Bytes that the whole frame takes, by its header.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// Bytes 0..4 are not `SKPL`: this is not a stockplane frame, or the stream lost sync.
    #[error("bad magic {found:02x?}, expected \"SKPL\"")]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The frame speaks a protocol version that this build does not.
    #[error("unsupported protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u16),
    /// The frame kind is unknown, or is not the kind that this call decodes.
    #[error("unexpected frame kind {found}")]
    UnexpectedKind {
        /// The kind byte found.
        found: u8,
    },
    /// The flags byte or the reserved bytes are not zero (a feature this build lacks).
    #[error("reserved header bits set: flags {flags:#04x}, reserved {reserved:#010x}")]
    ReservedBitsSet {
        /// The flags byte (byte 7).
        flags: u8,
        /// The reserved bytes 12..16, as a little-endian u32.
        reserved: u32,
    },
    /// The frame, header included, is larger than the receiver's limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// The frame's length by its header, header included.
        len: u64,
        /// The limit, [`Limits::frame_bytes_max`].
        max: u32,
    },
    /// More bytes than the header announces: a frame must be exactly one slice.
    #[error("trailing bytes: {len} bytes, the header announces {expected}")]
    TrailingBytes {
        /// Bytes that the frame takes, by its header.
        expected: usize,
        /// Bytes present.
        len: usize,
    },
    /// The frame does not start on a 16-byte boundary; copy it into a [`FrameBuf`].
    #[error("frame not aligned to {FRAME_ALIGN} bytes")]
    Misaligned,
    /// The payload is not a valid archive of the expected type (bytecheck said why).
    #[error("invalid payload: {0}")]
    Invalid(String),
    /// A valid request frame carries more requests than the receiver's limit.
    #[error("{count} requests in one frame exceed the limit of {max}")]
    TooManyRequests {
        /// Requests in the frame.
        count: usize,
        /// The limit, [`Limits::requests_per_frame_max`].
        max: u32,
    },
}

impl FrameError {
    /// The error's stable number: the application error code a server puts in the QUIC
    /// stream reset (or connection close) that refuses the frame. `docs/wire.md` lists
    /// them; numbers never change meaning and are never reused.
    pub fn code(&self) -> u8 {
        match self {
            FrameError::TooShort { .. } => 1,
            FrameError::Truncated { .. } => 2,
            FrameError::BadMagic { .. } => 3,
            FrameError::UnsupportedVersion(_) => 4,
            FrameError::UnexpectedKind { .. } => 5,
            FrameError::ReservedBitsSet { .. } => 6,
            FrameError::Oversized { .. } => 7,
            FrameError::TrailingBytes { .. } => 8,
            FrameError::Misaligned => 9,
            FrameError::Invalid(_) => 10,
            FrameError::TooManyRequests { .. } => 11,
        }
    }

    /// One error of every kind (with placeholder fields), in code order: for the
    /// documentation and the tests that keep it and the codes honest.
    pub fn kinds() -> Vec<FrameError> {
        vec![
            FrameError::TooShort { needed: 0, len: 0 },
            FrameError::Truncated { needed: 0, len: 0 },
            FrameError::BadMagic { found: [0; 4] },
            FrameError::UnsupportedVersion(0),
            FrameError::UnexpectedKind { found: 0 },
            FrameError::ReservedBitsSet { flags: 0, reserved: 0 },
            FrameError::Oversized { len: 0, max: 0 },
            FrameError::TrailingBytes { expected: 0, len: 0 },
            FrameError::Misaligned,
            FrameError::Invalid(String::new()),
            FrameError::TooManyRequests { count: 0, max: 0 },
        ]
    }
}

/// Parses and checks the 16-byte header at the start of `bytes`, ignoring what follows.
///
/// A stream reader calls this once it has 16 bytes, then [`Header::check_limits`], then
/// waits for [`Header::frame_len`] bytes. Magic and version are checked first, so that a
/// future version may change the other fields.
pub fn header_parse(bytes: &[u8]) -> Result<Header, FrameError> {
    let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::TooShort { needed: HEADER_LEN, len: bytes.len() });
    };
    let field = |range: std::ops::Range<usize>| {
        let mut word = [0u8; 4];
        word[..range.len()].copy_from_slice(&header[range]);
        u32::from_le_bytes(word)
    };
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let flags = header[7];
    let reserved = field(12..16);
    if flags != 0 || reserved != 0 {
        return Err(FrameError::ReservedBitsSet { flags, reserved });
    }
    let Some(kind) = FrameKind::from_code(header[6]) else {
        return Err(FrameError::UnexpectedKind { found: header[6] });
    };
    Ok(Header { kind, payload_len: field(8..12) })
}

/// Encodes `batch` as a request frame in a new buffer.
///
/// # Panics
/// If the payload cannot be addressed by rkyv's 32-bit relative pointers (2 GiB); a
/// caller that bounds its batches by [`Limits`] is far below that.
pub fn encode_requests(batch: &RequestBatch) -> AlignedVec<FRAME_ALIGN> {
    let mut out = AlignedVec::new();
    encode_requests_into(&mut out, batch);
    out
}

/// Encodes `batch` as a request frame into `out`, replacing its contents and reusing its
/// capacity: the hot path allocates nothing once `out` has grown to the usual size.
///
/// # Panics
/// As [`encode_requests`].
pub fn encode_requests_into(out: &mut AlignedVec<FRAME_ALIGN>, batch: &RequestBatch) {
    encode_into(out, FrameKind::Requests, batch);
}

/// Encodes `batch` as a response frame in a new buffer.
///
/// # Panics
/// As [`encode_requests`].
pub fn encode_responses(batch: &ResponseBatch) -> AlignedVec<FRAME_ALIGN> {
    let mut out = AlignedVec::new();
    encode_responses_into(&mut out, batch);
    out
}

/// Encodes `batch` as a response frame into `out`, replacing its contents and reusing
/// its capacity.
///
/// # Panics
/// As [`encode_requests`].
pub fn encode_responses_into(out: &mut AlignedVec<FRAME_ALIGN>, batch: &ResponseBatch) {
    encode_into(out, FrameKind::Responses, batch);
}

/// Writes a zeroed header, serializes the payload right after it in the same buffer (no
/// second copy), then fills the header in. rkyv's relative pointers are offsets between
/// positions of the buffer, and the header's 16 bytes keep every position's alignment,
/// so the payload read from byte 16 on is the same archive as if serialized alone.
fn encode_into<T>(out: &mut AlignedVec<FRAME_ALIGN>, kind: FrameKind, value: &T)
where
    T: for<'a> Serialize<HighSerializer<AlignedVec<FRAME_ALIGN>, ArenaHandle<'a>, rancor::Error>>,
{
    let mut buffer = std::mem::take(out);
    buffer.clear();
    buffer.extend_from_slice(&[0u8; HEADER_LEN]);
    let mut buffer = match rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, buffer) {
        Ok(buffer) => buffer,
        Err(error) => panic!("encode a {kind:?} frame: {error}"),
    };
    let payload_len = u32::try_from(buffer.len() - HEADER_LEN)
        .unwrap_or_else(|_| panic!("encode a {kind:?} frame: payload exceeds u32::MAX bytes"));
    let header = Header { kind, payload_len };
    buffer[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    *out = buffer;
}

/// Decodes a request frame in place: checks every header field, the exact length, the
/// alignment and the limits, validates the payload, and refuses more requests than
/// [`Limits::requests_per_frame_max`].
///
/// `frame` must be exactly one frame and start on a 16-byte boundary (see [`FrameBuf`]
/// for bytes that do not). Nothing is copied: the archived batch borrows `frame`.
pub fn decode_requests<'a>(frame: &'a [u8], limits: &Limits) -> Result<&'a ArchivedRequestBatch, FrameError> {
    let batch: &ArchivedRequestBatch = decode_payload(frame, limits, FrameKind::Requests)?;
    let count = batch.requests.len();
    if count > limits.requests_per_frame_max as usize {
        return Err(FrameError::TooManyRequests { count, max: limits.requests_per_frame_max });
    }
    Ok(batch)
}

/// Decodes a response frame in place, with the same checks as [`decode_requests`] except
/// the request count: responses are matched to requests by id, not counted.
pub fn decode_responses<'a>(frame: &'a [u8], limits: &Limits) -> Result<&'a ArchivedResponseBatch, FrameError> {
    decode_payload(frame, limits, FrameKind::Responses)
}

/// The checks common to every frame kind, then bytecheck validation of the payload.
fn decode_payload<'a, T>(frame: &'a [u8], limits: &Limits, kind: FrameKind) -> Result<&'a T, FrameError>
where
    T: Portable + for<'v> CheckBytes<HighValidator<'v, rancor::Error>>,
{
    let header = header_parse(frame)?;
    if header.kind != kind {
        return Err(FrameError::UnexpectedKind { found: header.kind.code() });
    }
    header.check_limits(limits)?;
    let frame_len = header.frame_len();
    if frame.len() < frame_len {
        return Err(FrameError::Truncated { needed: frame_len, len: frame.len() });
    }
    if frame.len() > frame_len {
        return Err(FrameError::TrailingBytes { expected: frame_len, len: frame.len() });
    }
    if frame.as_ptr().addr() & (FRAME_ALIGN - 1) != 0 {
        return Err(FrameError::Misaligned);
    }
    rkyv::access::<T, rancor::Error>(&frame[HEADER_LEN..]).map_err(|error| FrameError::Invalid(error.to_string()))
}

/// A reusable, 16-byte aligned buffer for frames that arrive in unaligned memory (a
/// network buffer, a slice at an odd offset of a datagram): one copy in, then decode.
///
/// It also serves stream reassembly: [`FrameBuf::extend_from_slice`] appends chunks
/// until [`header_parse`] says the frame is complete.
#[derive(Debug, Default, Clone)]
pub struct FrameBuf {
    bytes: AlignedVec<FRAME_ALIGN>,
}

impl FrameBuf {
    /// An empty buffer; it allocates on first use.
    pub fn new() -> FrameBuf {
        FrameBuf::default()
    }

    /// An empty buffer with room for `capacity` bytes, so that frames up to that size
    /// never allocate.
    pub fn with_capacity(capacity: usize) -> FrameBuf {
        FrameBuf { bytes: AlignedVec::with_capacity(capacity) }
    }

    /// Replaces the contents with a copy of `bytes` and returns the aligned copy, ready
    /// for [`decode_requests`] or [`decode_responses`].
    pub fn fill(&mut self, bytes: &[u8]) -> &[u8] {
        self.bytes.clear();
        self.bytes.extend_from_slice(bytes);
        self.bytes.as_slice()
    }

    /// Appends `bytes` to the contents (stream reassembly).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// Drops the first `count` bytes (a frame just handled), moving the rest to the front
    /// so that the next frame starts on a 16-byte boundary.
    pub fn consume(&mut self, count: usize) {
        let len = self.bytes.len();
        let count = count.min(len);
        self.bytes.as_mut_slice().copy_within(count..len, 0);
        self.bytes.resize(len - count, 0);
    }

    /// Empties the buffer and keeps its capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }

    /// The contents; they start on a 16-byte boundary.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// The number of bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ArchivedOp, Body, CartLine, HoldId, Op, Request, Response, Status};

    fn requests(count: usize) -> RequestBatch {
        RequestBatch {
            requests: (0..count as u64)
                .map(|id| Request {
                    id,
                    op: Op::Reserve {
                        hold: HoldId((u128::from(id) << 64) | 7),
                        ttl_ms: 60_000,
                        lines: vec![CartLine { sku: 1000 + id, location: Some(3), qty: 2 }],
                    },
                })
                .collect(),
        }
    }

    fn responses() -> ResponseBatch {
        ResponseBatch { responses: vec![Response { id: 9, status: Status::InsufficientStock, body: Body::Empty }] }
    }

    /// A copy of `frame` at an address that is 16-byte aligned, with `f` applied.
    fn edited(frame: &[u8], f: impl FnOnce(&mut AlignedVec<FRAME_ALIGN>)) -> FrameBuf {
        let mut bytes = AlignedVec::<FRAME_ALIGN>::new();
        bytes.extend_from_slice(frame);
        f(&mut bytes);
        let mut buf = FrameBuf::new();
        buf.fill(&bytes);
        buf
    }

    fn decode_err(frame: &FrameBuf) -> FrameError {
        match decode_requests(frame.as_bytes(), &Limits::default()) {
            Ok(batch) => panic!("expected an error, decoded {batch:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn header_layout_is_as_documented() {
        let frame = encode_requests(&requests(1));
        assert_eq!(&frame[0..4], b"SKPL");
        assert_eq!(u16::from_le_bytes([frame[4], frame[5]]), PROTOCOL_VERSION);
        assert_eq!(frame[6], 1);
        assert_eq!(frame[7], 0);
        let payload_len = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]);
        assert_eq!(payload_len as usize, frame.len() - HEADER_LEN);
        assert_eq!(&frame[12..16], &[0, 0, 0, 0]);
        let header = header_parse(&frame).expect("valid header");
        assert_eq!(header.kind, FrameKind::Requests);
        assert_eq!(header.frame_len(), frame.len());
        assert_eq!(encode_responses(&responses())[6], 2);
    }

    #[test]
    fn payload_after_header_is_the_standalone_archive() {
        let batch = requests(3);
        let frame = encode_requests(&batch);
        let alone = rkyv::to_bytes::<rancor::Error>(&batch).expect("serialize");
        assert_eq!(&frame[HEADER_LEN..], alone.as_slice());
    }

    #[test]
    fn round_trips_requests_and_responses() {
        let batch = requests(5);
        let frame = encode_requests(&batch);
        let archived = decode_requests(&frame, &Limits::default()).expect("decode");
        let back: RequestBatch = rkyv::deserialize::<_, rancor::Error>(archived).expect("de");
        assert_eq!(back, batch);

        let batch = responses();
        let frame = encode_responses(&batch);
        let archived = decode_responses(&frame, &Limits::default()).expect("decode");
        assert_eq!(Status::from(archived.responses[0].status), Status::InsufficientStock);
        let back: ResponseBatch = rkyv::deserialize::<_, rancor::Error>(archived).expect("de");
        assert_eq!(back, batch);
    }

    #[test]
    fn encode_into_reuses_the_buffer() {
        let mut out = AlignedVec::new();
        encode_requests_into(&mut out, &requests(50));
        let capacity = out.capacity();
        encode_requests_into(&mut out, &requests(2));
        assert_eq!(out.capacity(), capacity);
        assert_eq!(out.as_slice(), encode_requests(&requests(2)).as_slice());
        let archived = decode_requests(&out, &Limits::default()).expect("decode");
        assert_eq!(archived.requests.len(), 2);
    }

    #[test]
    fn empty_batch_round_trips() {
        let frame = encode_requests(&RequestBatch::default());
        let archived = decode_requests(&frame, &Limits::default()).expect("decode");
        assert!(archived.requests.is_empty());
    }

    #[test]
    fn too_short() {
        let frame = encode_requests(&requests(1));
        let error = header_parse(&frame[..HEADER_LEN - 1]).unwrap_err();
        assert_eq!(error, FrameError::TooShort { needed: 16, len: 15 });
        let error = decode_err(&edited(&frame, |f| f.resize(3, 0)));
        assert_eq!(error, FrameError::TooShort { needed: 16, len: 3 });
    }

    #[test]
    fn truncated() {
        let frame = encode_requests(&requests(2));
        let error = decode_err(&edited(&frame, |f| f.resize(f.len() - 1, 0)));
        assert_eq!(error, FrameError::Truncated { needed: frame.len(), len: frame.len() - 1 });
    }

    #[test]
    fn bad_magic() {
        let frame = encode_requests(&requests(1));
        let error = decode_err(&edited(&frame, |f| f[0] = b'X'));
        assert_eq!(error, FrameError::BadMagic { found: *b"XKPL" });
    }

    #[test]
    fn unsupported_version() {
        let frame = encode_requests(&requests(1));
        let error = decode_err(&edited(&frame, |f| f[4] = 2));
        assert_eq!(error, FrameError::UnsupportedVersion(2));
        let error = decode_err(&edited(&frame, |f| f[5] = 1));
        assert_eq!(error, FrameError::UnsupportedVersion(257));
    }

    #[test]
    fn unexpected_kind() {
        let frame = encode_responses(&responses());
        let error = decode_requests(&frame, &Limits::default()).unwrap_err();
        assert_eq!(error, FrameError::UnexpectedKind { found: 2 });
        let frame = encode_requests(&requests(1));
        let error = decode_responses(&frame, &Limits::default()).unwrap_err();
        assert_eq!(error, FrameError::UnexpectedKind { found: 1 });
        let error = decode_err(&edited(&frame, |f| f[6] = 0));
        assert_eq!(error, FrameError::UnexpectedKind { found: 0 });
        let error = decode_err(&edited(&frame, |f| f[6] = 3));
        assert_eq!(error, FrameError::UnexpectedKind { found: 3 });
    }

    #[test]
    fn reserved_bits_set() {
        let frame = encode_requests(&requests(1));
        let error = decode_err(&edited(&frame, |f| f[7] = 0x80));
        assert_eq!(error, FrameError::ReservedBitsSet { flags: 0x80, reserved: 0 });
        let error = decode_err(&edited(&frame, |f| f[15] = 1));
        assert_eq!(error, FrameError::ReservedBitsSet { flags: 0, reserved: 1 << 24 });
    }

    #[test]
    fn oversized_is_refused_on_the_header_alone() {
        let frame = encode_requests(&requests(1));
        // Only the header: the limit applies before the payload is there.
        let header = edited(&frame[..HEADER_LEN], |f| f[8..12].copy_from_slice(&[0xff; 4]));
        let parsed = header_parse(header.as_bytes()).expect("header");
        assert_eq!(
            parsed.check_limits(&Limits::default()),
            Err(FrameError::Oversized { len: 16 + u64::from(u32::MAX), max: 1 << 20 })
        );
        let error = decode_err(&header);
        assert!(matches!(error, FrameError::Oversized { .. }), "{error:?}");

        let limits = Limits { frame_bytes_max: frame.len() as u32 - 1, ..Limits::default() };
        let error = decode_requests(&frame, &limits).unwrap_err();
        assert_eq!(error, FrameError::Oversized { len: frame.len() as u64, max: frame.len() as u32 - 1 });
        let limits = Limits { frame_bytes_max: frame.len() as u32, ..Limits::default() };
        assert!(decode_requests(&frame, &limits).is_ok());
    }

    #[test]
    fn trailing_bytes() {
        let frame = encode_requests(&requests(1));
        let error = decode_err(&edited(&frame, |f| f.push(0)));
        assert_eq!(error, FrameError::TrailingBytes { expected: frame.len(), len: frame.len() + 1 });
    }

    #[test]
    fn misaligned_then_copied() {
        let frame = encode_requests(&requests(2));
        let mut shifted = AlignedVec::<FRAME_ALIGN>::new();
        shifted.push(0);
        shifted.extend_from_slice(&frame);
        let unaligned = &shifted[1..];
        let error = decode_requests(unaligned, &Limits::default()).unwrap_err();
        assert_eq!(error, FrameError::Misaligned);

        let mut buf = FrameBuf::with_capacity(1024);
        let aligned = buf.fill(unaligned);
        let archived = decode_requests(aligned, &Limits::default()).expect("decode");
        assert_eq!(archived.requests.len(), 2);
    }

    #[test]
    fn frame_buf_reassembles_a_stream() {
        let frame = encode_requests(&requests(4));
        let mut buf = FrameBuf::new();
        for chunk in frame.chunks(7) {
            buf.extend_from_slice(chunk);
            if let Ok(header) = header_parse(buf.as_bytes()) {
                if buf.len() == header.frame_len() {
                    break;
                }
            }
        }
        assert_eq!(buf.len(), frame.len());
        assert!(decode_requests(buf.as_bytes(), &Limits::default()).is_ok());
        buf.clear();
        assert!(buf.is_empty());
    }

    #[test]
    fn frame_buf_consumes_frames_from_its_front() {
        let first = encode_requests(&requests(3));
        let second = encode_requests(&requests(5));
        let mut buf = FrameBuf::new();
        buf.extend_from_slice(&first);
        buf.extend_from_slice(&second[..20]);
        let header = header_parse(buf.as_bytes()).expect("header");
        assert_eq!(
            decode_requests(&buf.as_bytes()[..header.frame_len()], &Limits::default()).unwrap().requests.len(),
            3
        );
        buf.consume(header.frame_len());
        assert_eq!(buf.as_bytes(), &second[..20]);
        buf.extend_from_slice(&second[20..]);
        assert_eq!(decode_requests(buf.as_bytes(), &Limits::default()).unwrap().requests.len(), 5);
        buf.consume(usize::MAX);
        assert!(buf.is_empty());
    }

    #[test]
    fn invalid_payload() {
        let frame = encode_requests(&requests(3));
        // The root (the Vec's offset and length) is the payload's last 8 bytes: a huge
        // length points far outside the payload.
        let error = decode_err(&edited(&frame, |f| {
            let n = f.len();
            f[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        }));
        assert!(matches!(error, FrameError::Invalid(_)), "{error:?}");
        // An empty payload holds no root at all.
        let error = decode_err(&edited(&frame[..HEADER_LEN], |f| f[8..12].fill(0)));
        assert!(matches!(error, FrameError::Invalid(_)), "{error:?}");
        // Enum tags out of range, deep in the last request: every element is checked,
        // not only the first. Tags are the first byte of an archived enum.
        let (op_tag, option_tag) = {
            let archived = decode_requests(&frame, &Limits::default()).expect("decode");
            let last = &archived.requests[2];
            let ArchivedOp::Reserve { lines, .. } = &last.op else { panic!("a reserve") };
            (frame_offset(&frame, &last.op), frame_offset(&frame, &lines[0].location))
        };
        for at in [op_tag, option_tag] {
            let error = decode_err(&edited(&frame, |f| f[at] = 0xee));
            assert!(matches!(error, FrameError::Invalid(_)), "{error:?}");
        }
    }

    /// The offset of `field` (which lies inside `frame`) from the frame's start.
    fn frame_offset<T>(frame: &[u8], field: &T) -> usize {
        field as *const T as usize - frame.as_ptr() as usize
    }

    #[test]
    fn too_many_requests() {
        let frame = encode_requests(&requests(5));
        let limits = Limits { requests_per_frame_max: 4, ..Limits::default() };
        let error = decode_requests(&frame, &limits).unwrap_err();
        assert_eq!(error, FrameError::TooManyRequests { count: 5, max: 4 });
        let limits = Limits { requests_per_frame_max: 5, ..Limits::default() };
        assert!(decode_requests(&frame, &limits).is_ok());
    }

    #[test]
    fn error_codes_are_distinct() {
        let errors = FrameError::kinds();
        let mut codes: Vec<u8> = errors.iter().map(FrameError::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes, (1..=11).collect::<Vec<u8>>());
    }
}
