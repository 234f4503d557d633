//! Fuzzes frame decoding: arbitrary bytes, copied to a 16-byte aligned buffer as a
//! server's `FrameBuf` would, go through `decode_requests` and `decode_responses`.
//!
//! The decoder must never panic; whatever it accepts must be safe to read in full (every
//! archived field is walked, so a validation gap shows up as a crash or a sanitizer
//! report) and must deserialize into a value that survives another encode/decode.

#![no_main]

use std::hint::black_box;

use libfuzzer_sys::fuzz_target;
use rkyv::{rancor, vec::ArchivedVec};

use stockplane_wire::{
    frame::{decode_requests, decode_responses, encode_requests, encode_responses, header_parse, FrameBuf, Limits},
    ArchivedBody, ArchivedCartLine, ArchivedHoldId, ArchivedHoldInfo, ArchivedHoldState, ArchivedHoldsOf,
    ArchivedJournalChange, ArchivedOp, ArchivedRequestBatch, ArchivedResponseBatch, ArchivedSkuAt, RequestBatch,
    ResponseBatch, Status,
};

fuzz_target!(|data: &[u8]| {
    let mut buf = FrameBuf::with_capacity(data.len());
    let frame = buf.fill(data);
    let _ = black_box(header_parse(frame));
    let limits = Limits::default();

    if let Ok(batch) = decode_requests(frame, &limits) {
        black_box(requests_walk(batch));
        let value: RequestBatch = rkyv::deserialize::<_, rancor::Error>(batch).expect("validated requests deserialize");
        let again = encode_requests(&value);
        let archived = decode_requests(&again, &limits).expect("re-encoded requests decode");
        let back: RequestBatch =
            rkyv::deserialize::<_, rancor::Error>(archived).expect("re-encoded requests deserialize");
        assert_eq!(back, value);
    }

    if let Ok(batch) = decode_responses(frame, &limits) {
        black_box(responses_walk(batch));
        let value: ResponseBatch =
            rkyv::deserialize::<_, rancor::Error>(batch).expect("validated responses deserialize");
        let again = encode_responses(&value);
        let archived = decode_responses(&again, &limits).expect("re-encoded responses decode");
        let back: ResponseBatch =
            rkyv::deserialize::<_, rancor::Error>(archived).expect("re-encoded responses deserialize");
        assert_eq!(back, value);
    }
});

/// Reads every field of a request batch and folds it into one number.
fn requests_walk(batch: &ArchivedRequestBatch) -> u64 {
    let mut sum = 0u64;
    for request in batch.requests.iter() {
        sum = sum.wrapping_add(request.id.to_native());
        sum = sum.wrapping_add(u64::from(request.op.is_control_only()));
        sum = sum.wrapping_add(match &request.op {
            ArchivedOp::Reserve { hold, ttl_ms, lines } => {
                hold_walk(hold) ^ u64::from(ttl_ms.to_native()) ^ cart_lines_walk(lines)
            }
            ArchivedOp::Commit { hold, lines } => hold_walk(hold) ^ lines.as_ref().map_or(1, sku_ats_walk),
            ArchivedOp::Release { hold } => hold_walk(hold),
            ArchivedOp::Extend { hold, ttl_ms } => hold_walk(hold) ^ u64::from(ttl_ms.to_native()),
            ArchivedOp::QueryStock { items } => sku_ats_walk(items),
            ArchivedOp::QueryHolds { of } => match of {
                ArchivedHoldsOf::Sku(sku) => sku.to_native(),
                ArchivedHoldsOf::Hold(hold) => hold_walk(hold),
            },
            ArchivedOp::UpsertSku { sku, location, backorder_limit } => {
                sku.to_native() ^ u64::from(location.to_native()) ^ u64::from(backorder_limit.to_native())
            }
            ArchivedOp::Adjust { adjustment, sku, location, delta } => {
                fold_u128(adjustment.to_native())
                    ^ sku.to_native()
                    ^ u64::from(location.to_native())
                    ^ delta.to_native() as u64
            }
            ArchivedOp::Journal { shard, from, max_entries } => {
                from.to_native() ^ u64::from(max_entries.to_native()) ^ u64::from(shard.to_native())
            },
        });
    }
    sum
}

/// Reads every field of a response batch and folds it into one number.
fn responses_walk(batch: &ArchivedResponseBatch) -> u64 {
    let mut sum = 0u64;
    for response in batch.responses.iter() {
        let status = Status::from(response.status);
        sum = sum.wrapping_add(response.id.to_native() ^ u64::from(status.code()));
        sum = sum.wrapping_add(match &response.body {
            ArchivedBody::Empty => 0,
            ArchivedBody::Hold(info) => hold_info_walk(info),
            ArchivedBody::Stock(levels) => levels.iter().fold(0, |sum, level| {
                sum ^ level.sku.to_native()
                    ^ u64::from(level.location.to_native())
                    ^ level.on_hand.to_native() as u64
                    ^ level.held.to_native() as u64
                    ^ level.available.to_native() as u64
                    ^ u64::from(level.backorder_limit.to_native())
            }),
            ArchivedBody::Holds(holds) => holds.iter().fold(0, |sum, info| sum ^ hold_info_walk(info)),
            ArchivedBody::Journal { entries, next, incarnation } => entries.iter().fold(next.to_native() ^ incarnation.to_native(), |sum, entry| {
                let change = match &entry.change {
                    ArchivedJournalChange::Sale { hold, qty, at_ms } => {
                        hold_walk(hold) ^ u64::from(qty.to_native()) ^ at_ms.to_native()
                    }
                    ArchivedJournalChange::Adjustment { adjustment, delta } => {
                        fold_u128(adjustment.to_native()) ^ delta.to_native() as u64
                    }
                };
                sum ^ entry.position.to_native()
                    ^ entry.sku.to_native()
                    ^ u64::from(entry.location.to_native())
                    ^ change
            }),
        });
    }
    sum
}

fn hold_info_walk(info: &ArchivedHoldInfo) -> u64 {
    info.lines
        .iter()
        .fold(hold_walk(&info.hold) ^ hold_state_walk(&info.state) ^ info.expires_at_ms.to_native(), |sum, line| {
            sum ^ line.sku.to_native() ^ u64::from(line.location.to_native()) ^ u64::from(line.qty.to_native())
        })
}

fn hold_state_walk(state: &ArchivedHoldState) -> u64 {
    match state {
        ArchivedHoldState::Held => 1,
        ArchivedHoldState::Committed => 2,
        ArchivedHoldState::Released => 3,
        ArchivedHoldState::Expired => 4,
    }
}

fn cart_lines_walk(lines: &ArchivedVec<ArchivedCartLine>) -> u64 {
    lines.iter().fold(0, |sum, line| {
        sum ^ line.sku.to_native()
            ^ line.location.as_ref().map_or(1 << 40, |at| u64::from(at.to_native()))
            ^ u64::from(line.qty.to_native())
    })
}

fn sku_ats_walk(items: &ArchivedVec<ArchivedSkuAt>) -> u64 {
    items.iter().fold(0, |sum, item| {
        sum ^ item.sku.to_native() ^ item.location.as_ref().map_or(1 << 40, |at| u64::from(at.to_native()))
    })
}

fn hold_walk(hold: &ArchivedHoldId) -> u64 {
    fold_u128(hold.0.to_native())
}

fn fold_u128(value: u128) -> u64 {
    (value as u64) ^ ((value >> 64) as u64)
}
