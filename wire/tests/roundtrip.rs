//! Property tests of the frame codec: every message the protocol can express survives
//! encode → decode → deserialize unchanged, and no byte string, random or a damaged valid
//! frame, makes the decoder panic; whatever it accepts is a valid archive.

use proptest::{collection::vec, option, prelude::*};
use rkyv::{rancor, util::AlignedVec};

use stockplane_wire::{
    frame::{
        decode_requests, decode_responses, encode_requests, encode_requests_into, encode_responses, header_parse,
        FrameBuf, FrameError, Limits, FRAME_ALIGN, HEADER_LEN,
    },
    Body, CartLine, HeldLine, HoldId, HoldInfo, HoldState, HoldsOf, JournalChange, JournalEntry, Op, Request,
    RequestBatch, Response, ResponseBatch, SkuAt, Status, StockLevel,
};

// ---- strategies: one per message type -------------------------------------------------

fn hold_id() -> impl Strategy<Value = HoldId> {
    any::<u128>().prop_map(HoldId)
}

fn cart_line() -> impl Strategy<Value = CartLine> {
    (any::<u64>(), option::of(any::<u32>()), any::<u32>()).prop_map(|(sku, location, qty)| CartLine {
        sku,
        location,
        qty,
    })
}

fn sku_at() -> impl Strategy<Value = SkuAt> {
    (any::<u64>(), option::of(any::<u32>())).prop_map(|(sku, location)| SkuAt { sku, location })
}

fn holds_of() -> impl Strategy<Value = HoldsOf> {
    prop_oneof![any::<u64>().prop_map(HoldsOf::Sku), hold_id().prop_map(HoldsOf::Hold)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (hold_id(), any::<u32>(), vec(cart_line(), 0..6))
            .prop_map(|(hold, ttl_ms, lines)| { Op::Reserve { hold, ttl_ms, lines } }),
        (hold_id(), option::of(vec(sku_at(), 0..4))).prop_map(|(hold, lines)| Op::Commit { hold, lines }),
        hold_id().prop_map(|hold| Op::Release { hold }),
        (hold_id(), any::<u32>()).prop_map(|(hold, ttl_ms)| Op::Extend { hold, ttl_ms }),
        vec(sku_at(), 0..6).prop_map(|items| Op::QueryStock { items }),
        holds_of().prop_map(|of| Op::QueryHolds { of }),
        (any::<u64>(), any::<u32>(), any::<u32>())
            .prop_map(|(sku, location, backorder_limit)| { Op::UpsertSku { sku, location, backorder_limit } }),
        (any::<u128>(), any::<u64>(), any::<u32>(), any::<i64>())
            .prop_map(|(adjustment, sku, location, delta)| Op::Adjust { adjustment, sku, location, delta }),
        (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(shard, from, max_entries)| Op::Journal {
            shard,
            from,
            max_entries
        }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u64>(), op()).prop_map(|(id, op)| Request { id, op })
}

fn request_batch() -> impl Strategy<Value = RequestBatch> {
    vec(request(), 0..24).prop_map(|requests| RequestBatch { requests })
}

fn status() -> impl Strategy<Value = Status> {
    proptest::sample::select(Status::ALL.to_vec())
}

fn hold_state() -> impl Strategy<Value = HoldState> {
    proptest::sample::select(vec![HoldState::Held, HoldState::Committed, HoldState::Released, HoldState::Expired])
}

fn held_line() -> impl Strategy<Value = HeldLine> {
    (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(sku, location, qty)| HeldLine { sku, location, qty })
}

fn hold_info() -> impl Strategy<Value = HoldInfo> {
    (hold_id(), hold_state(), any::<u64>(), vec(held_line(), 0..4))
        .prop_map(|(hold, state, expires_at_ms, lines)| HoldInfo { hold, state, expires_at_ms, lines })
}

fn stock_level() -> impl Strategy<Value = StockLevel> {
    (any::<u64>(), any::<u32>(), any::<i64>(), any::<i64>(), any::<i64>(), any::<u32>()).prop_map(
        |(sku, location, on_hand, held, available, backorder_limit)| StockLevel {
            sku,
            location,
            on_hand,
            held,
            available,
            backorder_limit,
        },
    )
}

fn journal_change() -> impl Strategy<Value = JournalChange> {
    prop_oneof![
        (hold_id(), any::<u32>(), any::<u64>()).prop_map(|(hold, qty, at_ms)| JournalChange::Sale { hold, qty, at_ms }),
        (any::<u128>(), any::<i64>()).prop_map(|(adjustment, delta)| JournalChange::Adjustment { adjustment, delta }),
    ]
}

fn journal_entry() -> impl Strategy<Value = JournalEntry> {
    (any::<u64>(), any::<u64>(), any::<u32>(), journal_change())
        .prop_map(|(position, sku, location, change)| JournalEntry { position, sku, location, change })
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        Just(Body::Empty),
        hold_info().prop_map(Body::Hold),
        vec(stock_level(), 0..4).prop_map(Body::Stock),
        vec(hold_info(), 0..3).prop_map(Body::Holds),
        (vec(journal_entry(), 0..4), any::<u64>(), any::<u64>())
            .prop_map(|(entries, next, incarnation)| Body::Journal { entries, next, incarnation }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    (any::<u64>(), status(), body()).prop_map(|(id, status, body)| Response { id, status, body })
}

fn response_batch() -> impl Strategy<Value = ResponseBatch> {
    vec(response(), 0..16).prop_map(|responses| ResponseBatch { responses })
}

// ---- damage to valid frames ------------------------------------------------------------

/// One way to damage a frame: what a broken peer, a bug, or an attacker might send.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (index taken modulo the length) with a non-zero mask.
    Flip(usize, u8),
    /// Keep only the first bytes (length taken modulo the length).
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite a header byte (index below 16).
    HeaderByte(usize, u8),
    /// Overwrite the payload length field.
    PayloadLen(u32),
    /// Overwrite four payload bytes with an arbitrary word (a relative pointer or a length).
    PayloadWord(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=u8::MAX).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        1 => (0..HEADER_LEN, any::<u8>()).prop_map(|(at, byte)| Mutation::HeaderByte(at, byte)),
        1 => any::<u32>().prop_map(Mutation::PayloadLen),
        2 => (any::<usize>(), any::<u32>()).prop_map(|(at, word)| Mutation::PayloadWord(at, word)),
    ]
}

fn mutate(frame: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = frame.to_vec();
    for mutation in mutations {
        match mutation {
            Mutation::Flip(at, mask) if !bytes.is_empty() => {
                let at = at % bytes.len();
                bytes[at] ^= mask;
            }
            Mutation::Truncate(len) => bytes.truncate(len % (bytes.len() + 1)),
            Mutation::Extend(tail) => bytes.extend_from_slice(tail),
            Mutation::HeaderByte(at, byte) if *at < bytes.len() => bytes[*at] = *byte,
            Mutation::PayloadLen(len) if bytes.len() >= 12 => {
                bytes[8..12].copy_from_slice(&len.to_le_bytes());
            }
            Mutation::PayloadWord(at, word) if bytes.len() >= HEADER_LEN + 4 => {
                let at = HEADER_LEN + at % (bytes.len() - HEADER_LEN - 3);
                bytes[at..at + 4].copy_from_slice(&word.to_le_bytes());
            }
            _ => {}
        }
    }
    bytes
}

/// Decodes `bytes` both ways; whatever is accepted must deserialize and re-encode into a
/// frame that decodes again. Returns whether either decode accepted the bytes.
fn decode_checked(bytes: &[u8]) -> bool {
    let mut buf = FrameBuf::new();
    let frame = buf.fill(bytes);
    let limits = Limits::default();
    let _ = header_parse(frame);
    let mut accepted = false;
    if let Ok(archived) = decode_requests(frame, &limits) {
        let batch: RequestBatch =
            rkyv::deserialize::<_, rancor::Error>(archived).expect("a validated archive deserializes");
        let again = encode_requests(&batch);
        assert!(decode_requests(&again, &limits).is_ok());
        accepted = true;
    }
    if let Ok(archived) = decode_responses(frame, &limits) {
        let batch: ResponseBatch =
            rkyv::deserialize::<_, rancor::Error>(archived).expect("a validated archive deserializes");
        for response in archived.responses.iter() {
            assert_eq!(Status::from(response.status).code(), response.status as u8);
        }
        let again = encode_responses(&batch);
        assert!(decode_responses(&again, &limits).is_ok());
        accepted = true;
    }
    accepted
}

// ---- properties ------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn requests_round_trip(batch in request_batch()) {
        let frame = encode_requests(&batch);
        prop_assert_eq!(frame.as_ptr() as usize % FRAME_ALIGN, 0);
        let header = header_parse(&frame).expect("header");
        prop_assert_eq!(header.frame_len(), frame.len());
        let archived = decode_requests(&frame, &Limits::default()).expect("decode");
        prop_assert_eq!(archived.requests.len(), batch.requests.len());
        for (archived, request) in archived.requests.iter().zip(&batch.requests) {
            prop_assert_eq!(archived.op.is_control_only(), request.op.is_control_only());
        }
        let back: RequestBatch = rkyv::deserialize::<_, rancor::Error>(archived).expect("de");
        prop_assert_eq!(back, batch);
    }

    #[test]
    fn responses_round_trip(batch in response_batch()) {
        let frame = encode_responses(&batch);
        let archived = decode_responses(&frame, &Limits::default()).expect("decode");
        let back: ResponseBatch = rkyv::deserialize::<_, rancor::Error>(archived).expect("de");
        prop_assert_eq!(back, batch);
    }

    #[test]
    fn encode_into_a_dirty_buffer_equals_fresh_encode(
        first in request_batch(),
        second in request_batch(),
    ) {
        let mut out = AlignedVec::new();
        encode_requests_into(&mut out, &first);
        encode_requests_into(&mut out, &second);
        let fresh = encode_requests(&second);
        prop_assert_eq!(out.as_slice(), fresh.as_slice());
    }

    #[test]
    fn request_count_limit_is_exact(batch in request_batch(), max in 0u32..30) {
        let frame = encode_requests(&batch);
        let limits = Limits { requests_per_frame_max: max, ..Limits::default() };
        let count = batch.requests.len();
        match decode_requests(&frame, &limits) {
            Ok(_) => prop_assert!(count <= max as usize),
            Err(error) => prop_assert_eq!(error, FrameError::TooManyRequests { count, max }),
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        decode_checked(&bytes);
    }

    #[test]
    fn random_payload_behind_a_valid_header_never_panics(
        kind in 1u8..=2,
        payload in vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(b"SKPL");
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&[kind, 0]);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&payload);
        decode_checked(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_request_frames_never_panic(
        batch in request_batch(),
        mutations in vec(mutation(), 1..4),
    ) {
        let frame = encode_requests(&batch);
        decode_checked(&mutate(&frame, &mutations));
    }

    #[test]
    fn mutated_response_frames_never_panic(
        batch in response_batch(),
        mutations in vec(mutation(), 1..4),
    ) {
        let frame = encode_responses(&batch);
        decode_checked(&mutate(&frame, &mutations));
    }
}

/// Random payloads behind a valid header are almost always refused: validation is not a
/// formality. A fixed xorshift stream keeps the test deterministic.
#[test]
fn random_payloads_are_mostly_refused() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let trials = 2000;
    let mut accepted = 0;
    for _ in 0..trials {
        let len = (next() % 300) as usize;
        let mut bytes = Vec::with_capacity(HEADER_LEN + len);
        bytes.extend_from_slice(b"SKPL");
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&[1 + (next() % 2) as u8, 0]);
        bytes.extend_from_slice(&(len as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend((0..len).map(|_| next() as u8));
        if decode_checked(&bytes) {
            accepted += 1;
        }
    }
    assert!(accepted * 20 < trials, "{accepted} of {trials} random payloads accepted");
}
