//! Behaviour of one shard and of carts across shards, through the public API.

mod common;

use common::*;
use stockplane_engine::{Shard, ShardConfig};
use stockplane_wire::{Body, HoldId, HoldState, HoldsOf, JournalChange, Op, Request, SkuAt, Status};

fn one_shard() -> Cluster {
    let mut cluster = Cluster::new(1, |_| {});
    cluster.stock(100, 1, 10, 0);
    cluster.stock(100, 2, 5, 0);
    cluster.stock(200, 1, 3, 2);
    cluster
}

#[test]
fn reserve_commit_moves_stock_once() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 4)])), Status::Reserved);
    assert_eq!(c.level(100, 1), (10, 4));
    assert_eq!(c.status(CHECKOUT, commit(1)), Status::Committed);
    assert_eq!(c.level(100, 1), (6, 0));
    // A retried commit answers the same and sells nothing more.
    assert_eq!(c.status(CHECKOUT, commit(1)), Status::Committed);
    assert_eq!(c.level(100, 1), (6, 0));
    assert_eq!(c.status(CHECKOUT, release(1)), Status::AlreadyCommitted);
    c.check();
}

#[test]
fn release_returns_stock_and_answers_retries() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 10)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(2, 60_000, &[(100, Some(1), 1)])), Status::InsufficientStock);
    assert_eq!(c.status(CHECKOUT, release(1)), Status::Released);
    assert_eq!(c.level(100, 1), (10, 0));
    assert_eq!(c.status(CHECKOUT, release(1)), Status::Released);
    assert_eq!(c.status(CHECKOUT, commit(1)), Status::AlreadyReleased);
    assert_eq!(c.status(CHECKOUT, reserve(2, 60_000, &[(100, Some(1), 10)])), Status::Reserved);
    c.check();
}

#[test]
fn engine_picks_a_location_with_enough_stock() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, None, 8)])), Status::Reserved);
    assert_eq!(c.level(100, 1), (10, 8));
    // Location 1 has 2 left; 4 units must come from location 2.
    assert_eq!(c.status(CHECKOUT, reserve(2, 60_000, &[(100, None, 4)])), Status::Reserved);
    assert_eq!(c.level(100, 2), (5, 4));
    assert_eq!(c.status(CHECKOUT, reserve(3, 60_000, &[(100, None, 3)])), Status::InsufficientStock);
    c.check();
}

#[test]
fn all_lines_or_none() {
    let mut c = one_shard();
    let status = c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 2), (200, Some(1), 6)]));
    assert_eq!(status, Status::InsufficientStock);
    assert_eq!(c.level(100, 1), (10, 0));
    assert_eq!(c.level(200, 1), (3, 0));
    // 200@1 allows two backorders: 5 units fit.
    let status = c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 2), (200, Some(1), 5)]));
    assert_eq!(status, Status::Reserved);
    assert_eq!(c.level(200, 1), (3, 5));
    c.check();
}

#[test]
fn holds_expire_at_their_deadline_exactly_once() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 5_000, &[(100, Some(1), 10)])), Status::Reserved);
    c.advance(4_999);
    assert_eq!(c.level(100, 1), (10, 10));
    c.advance(1);
    assert_eq!(c.level(100, 1), (10, 0));
    assert_eq!(c.shards[0].stats().expired, 1);
    c.advance(100_000);
    assert_eq!(c.level(100, 1), (10, 0));
    assert_eq!(c.shards[0].stats().expired, 1);
    assert_eq!(c.status(CHECKOUT, commit(1)), Status::HoldExpired);
    assert_eq!(c.status(CHECKOUT, Op::Extend { hold: HoldId(1), ttl_ms: 5_000 }), Status::HoldExpired);
    c.check();
}

#[test]
fn an_expired_hold_stops_counting_before_any_timer_fires() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 5_000, &[(100, Some(1), 10)])), Status::Reserved);
    // No handle_timeout: the next request, at a later time, must see the stock back.
    c.now += 5_000;
    assert_eq!(c.status(CHECKOUT, reserve(2, 5_000, &[(100, Some(1), 10)])), Status::Reserved);
    c.check();
}

#[test]
fn extend_pushes_the_expiry() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 5_000, &[(100, Some(1), 1)])), Status::Reserved);
    c.advance(4_000);
    assert_eq!(c.status(CHECKOUT, Op::Extend { hold: HoldId(1), ttl_ms: 10_000 }), Status::Extended);
    c.advance(9_999);
    assert_eq!(c.level(100, 1), (10, 1));
    c.advance(1);
    assert_eq!(c.level(100, 1), (10, 0));
}

#[test]
fn same_hold_id_with_other_content_is_a_conflict() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 1)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 1)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 2)])), Status::Conflict);
    assert_eq!(c.level(100, 1), (10, 1));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut c = one_shard();
    let hash = c.shards[0].state_hash();
    let cases = [
        (reserve(1, 60_000, &[(100, Some(1), 0)]), Status::InvalidArgument),
        (reserve(1, 60_000, &[(100, Some(1), 10_001)]), Status::InvalidArgument),
        (reserve(1, 60_000, &[]), Status::InvalidArgument),
        (reserve(1, 60_000, &[(100, Some(1), 1), (100, Some(1), 1)]), Status::InvalidArgument),
        (reserve(1, 10, &[(100, Some(1), 1)]), Status::InvalidArgument),
        (reserve(1, u32::MAX, &[(100, Some(1), 1)]), Status::InvalidArgument),
        (reserve(1, 60_000, &[(999, None, 1)]), Status::UnknownSku),
        (reserve(1, 60_000, &[(100, Some(9), 1)]), Status::UnknownSku),
        (commit(42), Status::UnknownHold),
        (release(42), Status::UnknownHold),
        (Op::Extend { hold: HoldId(42), ttl_ms: 5_000 }, Status::UnknownHold),
        (Op::Extend { hold: HoldId(42), ttl_ms: 0 }, Status::InvalidArgument),
        (Op::QueryStock { items: vec![] }, Status::InvalidArgument),
        (Op::Adjust { adjustment: 5, sku: 100, location: 1, delta: 1 }, Status::Forbidden),
        (Op::UpsertSku { sku: 5, location: 1, backorder_limit: 0 }, Status::Forbidden),
        (Op::Journal { shard: 0, from: 1, max_entries: 10 }, Status::Forbidden),
    ];
    for (op, expected) in cases {
        assert_eq!(c.status(CHECKOUT, op.clone()), expected, "{op:?}");
    }
    let control_cases = [
        (Op::Adjust { adjustment: 5, sku: 100, location: 1, delta: 0 }, Status::InvalidArgument),
        (Op::Adjust { adjustment: 5, sku: 100, location: 1, delta: i64::MAX }, Status::InvalidArgument),
        (Op::Adjust { adjustment: 5, sku: 100, location: 1, delta: -11 }, Status::InsufficientStock),
        (Op::Adjust { adjustment: 5, sku: 999, location: 1, delta: 1 }, Status::UnknownSku),
        (Op::UpsertSku { sku: 7, location: u32::MAX, backorder_limit: 0 }, Status::InvalidArgument),
        (Op::Journal { shard: 0, from: 0, max_entries: 10 }, Status::JournalTruncated),
        (Op::Journal { shard: 0, from: 1_000, max_entries: 10 }, Status::InvalidArgument),
    ];
    for (op, expected) in control_cases {
        assert_eq!(c.status(CONTROL, op.clone()), expected, "{op:?}");
    }
    assert_eq!(c.shards[0].state_hash(), hash, "a refused request changed state");
}

#[test]
fn a_retried_adjustment_is_applied_once() {
    let mut c = one_shard();
    for _ in 0..10 {
        let op = Op::Adjust { adjustment: 77, sku: 100, location: 1, delta: 5 };
        assert_eq!(c.status(CONTROL, op), Status::Ok);
    }
    assert_eq!(c.level(100, 1), (15, 0));
    let other = Op::Adjust { adjustment: 77, sku: 100, location: 1, delta: 6 };
    assert_eq!(c.status(CONTROL, other), Status::Conflict);
    assert_eq!(c.level(100, 1), (15, 0));
}

#[test]
fn journal_lists_sales_and_adjustments_in_order() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 2), (200, Some(1), 1)])), Status::Reserved);
    let subset = Some(vec![SkuAt { sku: 200, location: None }]);
    assert_eq!(c.status(CHECKOUT, Op::Commit { hold: HoldId(1), lines: subset }), Status::Committed);
    // Only the named line is sold; the other is released.
    assert_eq!(c.level(100, 1), (10, 0));
    assert_eq!(c.level(200, 1), (2, 0));
    let reply = c.call(CONTROL, Op::Journal { shard: 0, from: 1, max_entries: 100 });
    let Body::Journal { entries, next, .. } = reply.body else { panic!("no journal body") };
    assert_eq!(entries.len(), 4, "three stock adjustments and one sale");
    assert_eq!(next, 5);
    // The sale carries the time the shard committed it.
    assert_eq!(entries[3].change, JournalChange::Sale { hold: HoldId(1), qty: 1, at_ms: c.now });
    assert!(entries.windows(2).all(|w| w[1].position == w[0].position + 1));
}

/// A lone shard with room for ten SKUs, driven by hand (no cluster to pump it).
fn bare_shard() -> Shard {
    let mut config = ShardConfig::new(0, 1);
    config.skus_max = 10;
    config.sku_locations_max = 10;
    Shard::new(&config, 0).unwrap()
}

#[test]
fn replies_wait_for_durability() {
    let mut shard = bare_shard();
    let request = Request { id: 1, op: Op::UpsertSku { sku: 1, location: 1, backorder_limit: 0 } };
    shard.handle_owned(0, CONTROL, &request);
    assert!(shard.poll_reply().is_none(), "a reply left before its record was durable");
    let mut bytes = Vec::new();
    let position = shard.poll_wal_append(&mut bytes).expect("a record");
    assert!(!bytes.is_empty());
    assert!(shard.poll_reply().is_none());
    shard.handle_durable(position);
    assert_eq!(shard.poll_reply().map(|r| r.status), Some(Status::Ok));
    // Reads do not wait.
    let query = Request { id: 2, op: Op::QueryStock { items: vec![SkuAt { sku: 1, location: None }] } };
    shard.handle_owned(0, CHECKOUT, &query);
    assert_eq!(shard.poll_reply().map(|r| r.status), Some(Status::Ok));
}

/// `drain_replies` hands out exactly what calling `poll_reply` until `None` would, in the
/// same order: read answers at once, logged answers only up to the durable position.
#[test]
fn drain_replies_equals_polling_until_none() {
    let (mut polled, mut drained) = (bare_shard(), bare_shard());
    let query = |id| Request { id, op: Op::QueryStock { items: vec![SkuAt { sku: 1, location: None }] } };
    let upsert = |id, sku| Request { id, op: Op::UpsertSku { sku, location: 1, backorder_limit: 0 } };
    let requests = [
        (CONTROL, upsert(1, 1)),
        (CHECKOUT, query(2)),
        (CONTROL, upsert(3, 2)),
        (CHECKOUT, upsert(4, 3)),
        (CONTROL, upsert(5, 3)),
        (CHECKOUT, query(6)),
    ];
    let mut positions = Vec::new();
    for (origin, request) in &requests {
        polled.handle_owned(0, *origin, request);
        drained.handle_owned(0, *origin, request);
        let mut bytes = Vec::new();
        if let Some(position) = polled.poll_wal_append(&mut bytes) {
            positions.push(position);
        }
        drained.poll_wal_append(&mut bytes);
    }
    assert_eq!(positions, [1, 2, 3], "three upserts were logged");
    let ids =
        |replies: Vec<stockplane_engine::Reply>| replies.iter().map(|r| (r.request_id, r.status)).collect::<Vec<_>>();
    // Nothing durable yet: only the reads and the refused upsert may leave (the gated
    // answers all wait, and the first of them says so). Then durable up to the second
    // record: the first two logged answers may leave; the third waits.
    for (position, expected) in [(None, 3), (Some(2), 2), (Some(3), 1)] {
        if let Some(position) = position {
            polled.handle_durable(position);
            drained.handle_durable(position);
        }
        let mut by_poll = Vec::new();
        while let Some(reply) = polled.poll_reply() {
            by_poll.push(reply);
        }
        let mut by_drain = Vec::new();
        drained.drain_replies(|reply| by_drain.push(reply));
        assert_eq!(by_poll.len(), expected, "at position {position:?}: {:?}", ids(by_poll.clone()));
        assert_eq!(ids(by_drain), ids(by_poll), "at position {position:?}");
        assert!(drained.poll_reply().is_none(), "drain_replies left a reply that may leave");
    }
}

#[test]
fn recovery_rebuilds_the_same_state_and_expires_overdue_holds_once() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 5_000, &[(100, Some(1), 3)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(2, 60_000, &[(100, None, 2), (200, Some(1), 1)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, commit(2)), Status::Committed);
    assert_eq!(c.status(CHECKOUT, reserve(3, 60_000, &[(100, Some(2), 5)])), Status::Reserved);
    let before = c.shards[0].state_hash();
    c.crash(0);
    assert_eq!(c.shards[0].state_hash(), before);
    c.check();
    // Down for a minute: hold 1 expired meanwhile and returns its stock once.
    c.now += 60_000;
    c.crash(0);
    c.advance(0);
    assert_eq!(c.level(100, 1), (8, 0));
    assert_eq!(c.status(CHECKOUT, commit(1)), Status::HoldExpired);
    c.crash(0);
    c.advance(1);
    assert_eq!(c.level(100, 1), (8, 0));
    assert_eq!(c.shards[0].stats().expired, 0, "recovery replays the expiry, it does not redo it");
}

#[test]
fn recovery_cuts_a_torn_tail_and_refuses_corruption_in_the_middle() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 3)])), Status::Reserved);
    let log = c.logs[0].clone();
    let config = c.configs[0].clone();
    // Torn: the last record is partly written.
    let torn = &log[..log.len() - 10];
    let (shard, valid) = Shard::recover(&config, c.now, torn).unwrap();
    assert!(valid < torn.len());
    assert_eq!(shard.hold_state(HoldId(1)), None);
    // Zeros after the end (preallocated space) are not an error.
    let mut padded = log.clone();
    padded.extend_from_slice(&[0u8; 4096]);
    let (shard, valid) = Shard::recover(&config, c.now, &padded).unwrap();
    assert_eq!(valid, log.len());
    assert_eq!(shard.hold_state(HoldId(1)), Some(HoldState::Held));
    // A flipped bit in an early record, with valid records after it, is corruption.
    let mut corrupt = log.clone();
    corrupt[20] ^= 1;
    let error = Shard::recover(&config, c.now, &corrupt).err().expect("corruption is an error");
    assert!(error.to_string().contains("byte 0"), "{error}");
}

/// The simulation's media bit flips (seed 1000011) found this: a flipped high bit in the
/// length of a record in the middle of the log made it claim more bytes than remained,
/// which is what a torn last write looks like, so recovery cut the log there and started
/// without every acknowledged record after it. Recovery now calls a damaged record the
/// torn tail only if no valid record of a later position follows it.
#[test]
fn recovery_refuses_a_damaged_length_that_hides_the_records_after_it() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 3)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(2, 60_000, &[(100, Some(2), 1)])), Status::Reserved);
    let log = c.logs[0].clone();
    let config = c.configs[0].clone();
    let (_, valid) = Shard::recover(&config, c.now, &log).unwrap();
    assert_eq!(valid, log.len());
    // The first record's length gains 32768: it claims far more bytes than the log has.
    let mut corrupt = log.clone();
    corrupt[1] ^= 0x80;
    let error = Shard::recover(&config, c.now, &corrupt).err().expect("a damaged length mid-log is corruption");
    assert!(error.to_string().contains("byte 0"), "{error}");
    // The same damage to the last record alone is still a torn tail (nothing follows it).
    let (mut offset, mut last) = (0, 0);
    while offset < log.len() {
        last = offset;
        offset += usize::from(u16::from_le_bytes([log[offset], log[offset + 1]]));
    }
    let mut torn = log.clone();
    torn[last + 1] ^= 0x80;
    let (_, valid) = Shard::recover(&config, c.now, &torn).unwrap();
    assert_eq!(valid, last);
}

#[test]
fn full_tables_answer_busy() {
    let mut c = Cluster::new(1, |config| {
        config.holds_max = 2;
        config.holds_finished_max = 1;
    });
    c.stock(1, 1, 100, 0);
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(1, None, 1)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(2, 60_000, &[(1, None, 1)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(3, 60_000, &[(1, None, 1)])), Status::Busy);
    assert_eq!(c.status(CHECKOUT, commit(1)), Status::Committed);
    assert_eq!(c.status(CHECKOUT, reserve(3, 60_000, &[(1, None, 1)])), Status::Reserved);
    // Retention of one finished hold: hold 1 is forgotten when hold 2 finishes.
    assert_eq!(c.status(CHECKOUT, commit(2)), Status::Committed);
    assert_eq!(c.status(CHECKOUT, commit(1)), Status::UnknownHold);
    assert_eq!(c.status(CHECKOUT, commit(2)), Status::Committed);
    c.check();
}

#[test]
fn holds_query_lists_open_holds_of_a_sku_and_a_cart() {
    let mut c = one_shard();
    assert_eq!(c.status(CHECKOUT, reserve(1, 60_000, &[(100, Some(1), 3)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(2, 60_000, &[(200, Some(1), 1)])), Status::Reserved);
    let reply = c.call(CHECKOUT, Op::QueryHolds { of: HoldsOf::Sku(100) });
    let Body::Holds(holds) = reply.body else { panic!("no holds body") };
    assert_eq!(holds.len(), 1);
    assert_eq!(holds[0].hold, HoldId(1));
    assert_eq!(holds[0].lines[0].qty, 3);
    let reply = c.call(CHECKOUT, Op::QueryHolds { of: HoldsOf::Hold(HoldId(2)) });
    let Body::Holds(holds) = reply.body else { panic!("no holds body") };
    assert_eq!(holds[0].state, HoldState::Held);
}

// ---------------------------------------------------------------- carts across shards

fn two_shards() -> (Cluster, u64, u64) {
    let mut c = Cluster::new(2, |_| {});
    let (a, b) = (sku_owned_by(0, 2, 1), sku_owned_by(1, 2, 2));
    c.stock(a, 1, 10, 0);
    c.stock(b, 1, 10, 0);
    (c, a, b)
}

#[test]
fn a_cart_across_shards_reserves_and_commits_everywhere() {
    let (mut c, a, b) = two_shards();
    let hold = hold_homed_at(0, 2, 5);
    assert_eq!(c.status(CHECKOUT, reserve(hold, 60_000, &[(a, None, 2), (b, None, 3)])), Status::Reserved);
    assert_eq!((c.level(a, 1), c.level(b, 1)), ((10, 2), (10, 3)));
    assert_eq!(c.status(CHECKOUT, commit(hold)), Status::Committed);
    assert_eq!((c.level(a, 1), c.level(b, 1)), ((8, 0), (7, 0)));
    assert_eq!(c.status(CHECKOUT, commit(hold)), Status::Committed);
    assert_eq!((c.level(a, 1), c.level(b, 1)), ((8, 0), (7, 0)));
    c.check();
}

#[test]
fn a_cart_that_cannot_hold_one_line_holds_nothing() {
    let (mut c, a, b) = two_shards();
    let hold = hold_homed_at(1, 2, 6);
    let status = c.status(CHECKOUT, reserve(hold, 60_000, &[(a, None, 2), (b, None, 11)]));
    assert_eq!(status, Status::InsufficientStock);
    assert_eq!((c.level(a, 1), c.level(b, 1)), ((10, 0), (10, 0)));
    c.check();
}

#[test]
fn a_cart_that_expires_during_its_commit_is_not_half_sold() {
    let (mut c, a, b) = two_shards();
    let hold = hold_homed_at(0, 2, 7);
    assert_eq!(c.status(CHECKOUT, reserve(hold, 5_000, &[(a, None, 2), (b, None, 3)])), Status::Reserved);
    // The commit starts just before the expiry, but its Pin reaches shard 1 after it.
    c.now += 4_999;
    c.auto_deliver = false;
    c.shards[0].handle_owned(c.now, CHECKOUT, &Request { id: 900, op: commit(hold) });
    c.pump();
    c.advance(10);
    c.auto_deliver = true;
    c.deliver_all();
    let replies = c.pump();
    let reply = replies.iter().find(|r| r.request_id == 900).expect("commit answered");
    assert_eq!(reply.status, Status::HoldExpired);
    assert_eq!((c.level(a, 1), c.level(b, 1)), ((10, 0), (10, 0)));
    c.check();
}

#[test]
fn a_participant_crash_keeps_the_cart_whole() {
    let (mut c, a, b) = two_shards();
    let hold = hold_homed_at(0, 2, 8);
    assert_eq!(c.status(CHECKOUT, reserve(hold, 60_000, &[(a, None, 1), (b, None, 1)])), Status::Reserved);
    c.crash(1);
    assert_eq!(c.level(b, 1), (10, 1));
    assert_eq!(c.status(CHECKOUT, commit(hold)), Status::Committed);
    c.crash(0);
    c.crash(1);
    assert_eq!((c.level(a, 1), c.level(b, 1)), ((9, 0), (9, 0)));
    c.check();
}

#[test]
fn release_and_expiry_of_a_cart_free_every_line() {
    let (mut c, a, b) = two_shards();
    let first = hold_homed_at(0, 2, 9);
    let second = hold_homed_at(1, 2, 10);
    assert_eq!(c.status(CHECKOUT, reserve(first, 60_000, &[(a, None, 1), (b, None, 1)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(second, 5_000, &[(a, None, 2), (b, None, 2)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, release(first)), Status::Released);
    c.advance(5_000);
    c.advance(100);
    assert_eq!((c.level(a, 1), c.level(b, 1)), ((10, 0), (10, 0)));
    assert_eq!(c.status(CHECKOUT, commit(second)), Status::HoldExpired);
    c.check();
}

/// Writes real WAL logs as seeds for the `wal_recover` fuzz target when
/// `STOCKPLANE_FUZZ_SEEDS_WRITE=1`; otherwise checks the committed seeds still recover.
#[test]
fn wal_fuzz_seeds_recover() {
    let mut single = one_shard();
    assert_eq!(single.status(CHECKOUT, reserve(1, 5_000, &[(100, Some(1), 3), (200, None, 1)])), Status::Reserved);
    assert_eq!(single.status(CHECKOUT, reserve(2, 60_000, &[(100, None, 2)])), Status::Reserved);
    assert_eq!(single.status(CHECKOUT, commit(2)), Status::Committed);
    assert_eq!(single.status(CHECKOUT, Op::Extend { hold: HoldId(1), ttl_ms: 9_000 }), Status::Extended);
    single.advance(10_000);
    let (mut carts, a, b) = two_shards();
    let hold = hold_homed_at(0, 2, 11);
    assert_eq!(carts.status(CHECKOUT, reserve(hold, 60_000, &[(a, None, 1), (b, None, 2)])), Status::Reserved);
    assert_eq!(carts.status(CHECKOUT, commit(hold)), Status::Committed);
    let seeds = [
        ("single", single.logs[0].clone()),
        ("coordinator", carts.logs[0].clone()),
        ("participant", carts.logs[1].clone()),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/wal_recover");
    let write = std::env::var_os("STOCKPLANE_FUZZ_SEEDS_WRITE").is_some();
    for (name, log) in seeds {
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &log).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let config = ShardConfig { skus_max: 64, sku_locations_max: 128, ..ShardConfig::new(0, 1) };
        let (_, valid) = Shard::recover(&config, 0, &stored).expect("a seed recovers");
        assert_eq!(valid, stored.len());
    }
}

/// Committed holds leave stale timers in the wheel until their expiry; the shard drops
/// them once they outnumber the live ones, so a long run with long TTLs stays bounded.
#[test]
fn stale_expiry_timers_stay_bounded() {
    let mut c = Cluster::new(1, |config| config.holds_finished_max = 16);
    c.stock(1, 1, 1_000_000, 0);
    for hold in 0..20_000u128 {
        assert_eq!(c.status(CHECKOUT, reserve(hold, 3_600_000, &[(1, None, 1)])), Status::Reserved);
        if hold >= 10 {
            assert_eq!(c.status(CHECKOUT, commit(hold - 10)), Status::Committed);
        }
        assert!(c.shards[0].expiry_timers() <= 2 * 11 + 1024, "{} timers", c.shards[0].expiry_timers());
    }
    assert_eq!(c.shards[0].live_holds(), 10);
    c.check();
}

/// Finished holds keep their lines for retries, but a new hold may take those lines
/// back: with room for exactly the live holds' extra lines, carts never run out.
#[test]
fn finished_holds_give_their_lines_back() {
    let mut c = Cluster::new(1, |config| {
        config.holds_max = 4;
        config.holds_finished_max = 8;
        config.hold_extra_lines_max = 4 * 4;
    });
    for sku in 1..=5 {
        c.stock(sku, 1, 1_000, 0);
    }
    let cart: Vec<(u64, Option<u32>, u32)> = (1..=5).map(|sku| (sku, None, 1)).collect();
    for hold in 0..100u128 {
        assert_eq!(c.status(CHECKOUT, reserve(hold, 60_000, &cart)), Status::Reserved, "cart {hold}");
        if hold >= 3 {
            assert_eq!(c.status(CHECKOUT, commit(hold - 3)), Status::Committed);
        }
    }
    assert_eq!(c.level(1, 1), (1_000 - 97, 3));
    c.check();
}

/// A cart that could not be reserved leaves its hold id free: once the abort reached
/// every participant, a retry (after a restock, say) reserves afresh.
#[test]
fn a_failed_cart_can_be_reserved_again() {
    let (mut c, a, b) = two_shards();
    let hold = hold_homed_at(0, 2, 12);
    let cart = [(a, None, 2), (b, None, 11)];
    assert_eq!(c.status(CHECKOUT, reserve(hold, 60_000, &cart)), Status::InsufficientStock);
    let restock = Op::Adjust { adjustment: 999, sku: b, location: 1, delta: 5 };
    assert_eq!(c.status(CONTROL, restock), Status::Ok);
    assert_eq!(c.status(CHECKOUT, reserve(hold, 60_000, &cart)), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, commit(hold)), Status::Committed);
    assert_eq!(c.level(a, 1), (8, 0));
    c.check();
}

#[test]
fn a_shard_rebuilt_after_many_adjustments_has_the_same_state() {
    let mut c = Cluster::new(1, |config| {
        config.adjustments_retained_max = 64;
        config.journal_entries_max = 64;
    });
    assert_eq!(c.call(CONTROL, Op::UpsertSku { sku: 9, location: 1, backorder_limit: 0 }).status, Status::Ok);
    for adjustment in 0..1_000u128 {
        let reply = c.call(CONTROL, Op::Adjust { adjustment: adjustment + 1, sku: 9, location: 1, delta: 1 });
        assert_eq!(reply.status, Status::Ok);
    }
    let config = c.shards[0].config().clone();
    let (rebuilt, _) = Shard::recover(&config, c.now, &c.logs[0]).expect("recover");
    assert_eq!(rebuilt.state_hash(), c.shards[0].state_hash());
}
