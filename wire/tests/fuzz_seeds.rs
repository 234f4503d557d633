//! The seed corpus of the `frame_decode` fuzz target (`fuzz/seeds/frame_decode/`): one
//! valid frame per operation and per response body, plus mixed and empty batches. From
//! an empty corpus libFuzzer rarely builds a valid archive; from these it mutates real
//! frames and reaches the validator's deep paths at once.
//!
//! This test checks that every committed seed still decodes (a protocol change that
//! breaks them fails here). To write the seeds anew, run
//! `STOCKPLANE_FUZZ_SEEDS_WRITE=1 cargo test -p stockplane-wire --test fuzz_seeds`.

use std::path::PathBuf;

use stockplane_wire::{
    frame::{decode_requests, decode_responses, encode_requests, encode_responses, Limits},
    Body, CartLine, HeldLine, HoldId, HoldInfo, HoldState, HoldsOf, JournalChange, JournalEntry, Op, Request,
    RequestBatch, Response, ResponseBatch, SkuAt, Status, StockLevel,
};

fn seeds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/frame_decode")
}

fn ops() -> Vec<(&'static str, Op)> {
    let hold = HoldId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let line = CartLine { sku: 1_000_042, location: Some(3), qty: 2 };
    let sku_at = SkuAt { sku: 1_000_042, location: None };
    vec![
        ("reserve", Op::Reserve { hold, ttl_ms: 600_000, lines: vec![line, CartLine { location: None, ..line }] }),
        ("commit_all", Op::Commit { hold, lines: None }),
        ("commit_some", Op::Commit { hold, lines: Some(vec![sku_at]) }),
        ("release", Op::Release { hold }),
        ("extend", Op::Extend { hold, ttl_ms: 60_000 }),
        ("query_stock", Op::QueryStock { items: vec![sku_at, SkuAt { location: Some(7), ..sku_at }] }),
        ("query_holds_sku", Op::QueryHolds { of: HoldsOf::Sku(1_000_042) }),
        ("query_holds_hold", Op::QueryHolds { of: HoldsOf::Hold(hold) }),
        ("upsert_sku", Op::UpsertSku { sku: 1_000_042, location: 3, backorder_limit: 10 }),
        ("adjust", Op::Adjust { adjustment: 77, sku: 1_000_042, location: 3, delta: -5 }),
        ("journal", Op::Journal { shard: 0, from: 1000, max_entries: 256 }),
    ]
}

fn bodies() -> Vec<(&'static str, Status, Body)> {
    let hold = HoldId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let info = HoldInfo {
        hold,
        state: HoldState::Held,
        expires_at_ms: 1_700_000_600_000,
        lines: vec![HeldLine { sku: 1_000_042, location: 3, qty: 2 }],
    };
    vec![
        ("status_only", Status::InsufficientStock, Body::Empty),
        ("hold", Status::Reserved, Body::Hold(info.clone())),
        (
            "stock",
            Status::Ok,
            Body::Stock(vec![StockLevel {
                sku: 1_000_042,
                location: 3,
                on_hand: 100,
                held: 2,
                available: 98,
                backorder_limit: 0,
            }]),
        ),
        ("holds", Status::Ok, Body::Holds(vec![info.clone(), HoldInfo { state: HoldState::Committed, ..info }])),
        (
            "journal",
            Status::Ok,
            Body::Journal {
                entries: vec![
                    JournalEntry {
                        position: 1000,
                        sku: 1_000_042,
                        location: 3,
                        change: JournalChange::Sale { hold, qty: 2, at_ms: 1_795_000_000_000 },
                    },
                    JournalEntry {
                        position: 1001,
                        sku: 1_000_042,
                        location: 3,
                        change: JournalChange::Adjustment { adjustment: 77, delta: -5 },
                    },
                ],
                next: 1002,
                incarnation: 0x5eed_1dea,
            },
        ),
    ]
}

/// Every seed: its file name and its bytes.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let ops = ops();
    for (id, (name, op)) in ops.iter().enumerate() {
        let batch = RequestBatch { requests: vec![Request { id: id as u64, op: op.clone() }] };
        seeds.push((format!("req_{name}"), encode_requests(&batch).to_vec()));
    }
    let all = RequestBatch {
        requests: ops.into_iter().enumerate().map(|(id, (_, op))| Request { id: id as u64, op }).collect(),
    };
    seeds.push(("req_all".into(), encode_requests(&all).to_vec()));
    seeds.push(("req_empty".into(), encode_requests(&RequestBatch::default()).to_vec()));

    let bodies = bodies();
    for (id, (name, status, body)) in bodies.iter().enumerate() {
        let batch = ResponseBatch { responses: vec![Response { id: id as u64, status: *status, body: body.clone() }] };
        seeds.push((format!("resp_{name}"), encode_responses(&batch).to_vec()));
    }
    let all = ResponseBatch {
        responses: bodies
            .into_iter()
            .enumerate()
            .map(|(id, (_, status, body))| Response { id: id as u64, status, body })
            .collect(),
    };
    seeds.push(("resp_all".into(), encode_responses(&all).to_vec()));
    seeds.push(("resp_empty".into(), encode_responses(&ResponseBatch::default()).to_vec()));
    seeds
}

#[test]
fn fuzz_seeds_decode() {
    let dir = seeds_dir();
    if std::env::var_os("STOCKPLANE_FUZZ_SEEDS_WRITE").is_some() {
        std::fs::create_dir_all(&dir).expect("create the seeds directory");
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(name), bytes).expect("write a seed");
        }
    }
    let limits = Limits::default();
    let mut count = 0;
    for (name, _) in seeds() {
        let bytes = std::fs::read(dir.join(&name))
            .unwrap_or_else(|error| panic!("read seed {name} ({error}); write them anew"));
        let mut buf = stockplane_wire::frame::FrameBuf::new();
        let frame = buf.fill(&bytes);
        let decoded = if name.starts_with("req_") {
            decode_requests(frame, &limits).map(|_| ())
        } else {
            decode_responses(frame, &limits).map(|_| ())
        };
        assert_eq!(decoded, Ok(()), "seed {name} no longer decodes; write them anew");
        count += 1;
    }
    assert!(count >= 20);
}
