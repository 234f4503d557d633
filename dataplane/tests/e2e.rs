//! The data plane end to end: the real server on loopback (every core, QUIC with mutual
//! TLS), driven through the `wire` client, and through raw quinn for what a well-behaved
//! client never sends.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use stockplane_engine::{home_for, shard_for};
use stockplane_wire::client::{Client, ClientConfig, ClientError, Outcome};
use stockplane_wire::frame::{self, FrameError, HEADER_LEN};
use stockplane_wire::{transport, Body, CartLine, HoldId, HoldState, HoldsOf, Op, Request, SkuAt, Status};

const LOCATION: u32 = 1;

/// A SKU that lives on `shard` of `shards`, at or above `from`.
fn sku_on(shard: u32, shards: u32, from: u64) -> u64 {
    (from..).find(|&sku| shard_for(sku, shards) == shard).unwrap()
}

/// A hold id whose home is `shard` of `shards`.
fn hold_on(shard: u32, shards: u32, seed: u128) -> HoldId {
    (seed..).map(HoldId).find(|&hold| home_for(hold, shards) == shard).unwrap()
}

/// Creates `skus` at `LOCATION` with `units` on hand each.
async fn stock(control: &Client, skus: &[u64], units: i64) {
    for &sku in skus {
        assert_eq!(control.upsert_sku(sku, LOCATION, 0).await.unwrap().status, Status::Ok);
        let adjustment = u128::from(sku) << 64 | 1;
        assert_eq!(control.adjust(adjustment, sku, LOCATION, units).await.unwrap().status, Status::Ok);
    }
}

fn line(sku: u64, qty: u32) -> CartLine {
    CartLine { sku, location: Some(LOCATION), qty }
}

/// The `(on_hand, held, available)` of one SKU at `LOCATION`.
async fn level(client: &Client, sku: u64) -> (i64, i64, i64) {
    let outcome = client.query_stock(vec![SkuAt { sku, location: Some(LOCATION) }]).await.unwrap();
    let Body::Stock(levels) = outcome.body else { panic!("no stock body: {outcome:?}") };
    (levels[0].on_hand, levels[0].held, levels[0].available)
}

/// Waits (within a bound) until a SKU's level is `expected`: for what a participant
/// shard applies when a cart's decision reaches it.
async fn settled(client: &Client, sku: u64, expected: (i64, i64, i64)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = level(client, sku).await;
        if now == expected {
            return;
        }
        assert!(Instant::now() < deadline, "sku {sku}: {now:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn hold_state(outcome: &Outcome) -> HoldState {
    match &outcome.body {
        Body::Hold(info) => info.state,
        Body::Holds(holds) if holds.len() == 1 => holds[0].state,
        body => panic!("no hold in {body:?}"),
    }
}

#[tokio::test]
async fn every_operation_end_to_end_through_the_client() {
    let server = start(2, |_| {});
    let control = server.client("control").await;
    let checkout = server.client("checkout").await;
    let (a, b) = (sku_on(0, 2, 100), sku_on(1, 2, 100));
    stock(&control, &[a, b], 10).await;

    // Reserve, look at it, extend it, commit part of it.
    let hold = HoldId(0xfeed_0001);
    let reserved = checkout.reserve(hold, 60_000, vec![line(a, 2), line(b, 3)]).await.unwrap();
    assert_eq!(reserved.status, Status::Reserved, "{reserved:?}");
    settled(&checkout, a, (10, 2, 8)).await;
    let holds = checkout.query_holds(HoldsOf::Hold(hold)).await.unwrap();
    assert_eq!((holds.status, hold_state(&holds)), (Status::Ok, HoldState::Held));
    let extended = checkout.extend(hold, 120_000).await.unwrap();
    assert_eq!(extended.status, Status::Extended, "{extended:?}");
    let committed = checkout.commit(hold, Some(vec![SkuAt { sku: a, location: Some(LOCATION) }])).await.unwrap();
    assert_eq!(committed.status, Status::Committed, "{committed:?}");
    // The cart's lines live on two shards: a participant applies the decision just after
    // the coordinator answers.
    settled(&checkout, a, (8, 0, 8)).await;
    settled(&checkout, b, (10, 0, 10)).await;

    // A query across both shards is split and merged.
    let both = checkout
        .query_stock(vec![SkuAt { sku: a, location: Some(LOCATION) }, SkuAt { sku: b, location: Some(LOCATION) }])
        .await
        .unwrap();
    let Body::Stock(levels) = both.body else { panic!("no stock") };
    let mut skus: Vec<u64> = levels.iter().map(|l| l.sku).collect();
    skus.sort();
    assert_eq!(skus, {
        let mut s = vec![a, b];
        s.sort();
        s
    });

    // Release, and the business refusals.
    let other = HoldId(0xfeed_0002);
    assert_eq!(checkout.reserve(other, 60_000, vec![line(b, 1)]).await.unwrap().status, Status::Reserved);
    assert_eq!(checkout.release(other).await.unwrap().status, Status::Released);
    assert_eq!(checkout.release(other).await.unwrap().status, Status::Released, "a retry gets the first answer");
    assert_eq!(checkout.commit(other, None).await.unwrap().status, Status::AlreadyReleased);
    let too_many = checkout.reserve(HoldId(0xfeed_0003), 60_000, vec![line(b, 11)]).await.unwrap();
    assert_eq!(too_many.status, Status::InsufficientStock);
    let unknown = checkout.reserve(HoldId(0xfeed_0004), 60_000, vec![line(999_999, 1)]).await.unwrap();
    assert_eq!(unknown.status, Status::UnknownSku);
    assert_eq!(checkout.commit(HoldId(0xdead), None).await.unwrap().status, Status::UnknownHold);
    let zero = checkout.reserve(HoldId(0xfeed_0005), 60_000, vec![line(a, 0)]).await.unwrap();
    assert_eq!(zero.status, Status::InvalidArgument);
    let huge = checkout.reserve(HoldId(0xfeed_0006), 60_000, vec![line(a, u32::MAX)]).await.unwrap();
    assert_eq!(huge.status, Status::InvalidArgument);
    let conflict = checkout.reserve(hold, 60_000, vec![line(a, 1)]).await.unwrap();
    assert_eq!(conflict.status, Status::Conflict, "same hold id, other content");

    // Holds of a SKU, and each shard's journal for the control role.
    let of_sku = checkout.query_holds(HoldsOf::Sku(a)).await.unwrap();
    assert_eq!(of_sku.status, Status::Ok);
    let mut sold = 0;
    for shard in 0..2 {
        let journal = control.journal(shard, 1, 100).await.unwrap();
        assert_eq!(journal.status, Status::Ok, "{journal:?}");
        let Body::Journal { entries, .. } = journal.body else { panic!("no journal") };
        sold += entries.len();
    }
    assert!(sold >= 1, "the commit is in a journal");
    assert_eq!(control.journal(2, 1, 10).await.unwrap().status, Status::InvalidArgument, "no shard 2");
    settled(&checkout, b, (10, 0, 10)).await;
    control.close().await;
    checkout.close().await;
    server.stop();
}

#[tokio::test]
async fn a_cart_across_every_shard_commits_whole_or_expires_whole() {
    let shards = 2;
    let server = start(shards as usize, |_| {});
    let control = server.client("control").await;
    let checkout = server.client("checkout").await;
    let skus: Vec<u64> = (0..shards).map(|s| sku_on(s, shards, 1_000)).collect();
    stock(&control, &skus, 5).await;
    let lines: Vec<CartLine> = skus.iter().map(|&sku| line(sku, 2)).collect();

    // Coordinated by each shard in turn: every line is sold.
    for (i, home) in (0..shards).enumerate() {
        let hold = hold_on(home, shards, 0x1000 * (i as u128 + 1));
        assert_eq!(checkout.reserve(hold, 60_000, lines.clone()).await.unwrap().status, Status::Reserved);
        assert_eq!(checkout.commit(hold, None).await.unwrap().status, Status::Committed);
    }
    for &sku in &skus {
        // A participant turns its prepared lines into a sale when the decision reaches it,
        // just after the coordinator answers; availability is right at once.
        assert_eq!(level(&checkout, sku).await.2, 1, "two carts of 2 sold on every shard");
        settled(&checkout, sku, (1, 0, 1)).await;
    }

    // A cart that nobody commits expires on every shard at once.
    let hold = hold_on(1, shards, 0x9000);
    let short = vec![line(skus[0], 1), line(skus[1], 1)];
    assert_eq!(checkout.reserve(hold, 50, short).await.unwrap().status, Status::Reserved);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = hold_state(&checkout.query_holds(HoldsOf::Hold(hold)).await.unwrap());
        if state == HoldState::Expired {
            break;
        }
        assert!(Instant::now() < deadline, "the hold never expired: {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(checkout.commit(hold, None).await.unwrap().status, Status::HoldExpired);
    for &sku in &skus {
        settled(&checkout, sku, (1, 0, 1)).await;
    }
    server.stop();
}

#[tokio::test]
async fn handshakes_without_a_good_certificate_are_refused() {
    let server = start(1, |_| {});
    let addr = server.server.addr();
    let (ca, _, _) = server.pems("checkout");
    let now = SystemTime::now();

    let anonymous = raw_connect(addr, &ca, None).await;
    let stranger_ca = stockplane_dataplane::certs::DevCa::new().unwrap();
    let (cert, key) = client_cert(&stranger_ca, &["checkout"], now - DAY, now + DAY);
    let stranger = raw_connect(addr, &ca, Some((cert.as_bytes(), key.as_bytes()))).await;
    let (cert, key) = client_cert(&server.ca, &["checkout"], now - DAY * 10, now - DAY);
    let expired = raw_connect(addr, &ca, Some((cert.as_bytes(), key.as_bytes()))).await;
    for (what, result) in [("no certificate", anonymous), ("another CA", stranger), ("expired", expired)] {
        let refused = match result {
            Err(_) => true,
            // TLS 1.3 lets a client finish before the server has checked its certificate:
            // then the refusal arrives as the connection's close.
            Ok(conn) => {
                let round = tokio::time::timeout(Duration::from_secs(5), conn.open_bi()).await;
                matches!(round, Ok(Err(_))) || conn.closed().await.to_string().contains("certificate")
            }
        };
        assert!(refused, "{what}: the handshake must fail");
    }

    // A certificate of the right CA without a role is closed with NO_ROLE.
    let (cert, key) = client_cert(&server.ca, &[], now - DAY, now + DAY);
    let conn = raw_connect(addr, &ca, Some((cert.as_bytes(), key.as_bytes()))).await.unwrap();
    let reason = conn.closed().await;
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(transport::close::NO_ROLE))
        }
        other => panic!("expected NO_ROLE, got {other}"),
    }

    // The client reports a refused handshake as an error, not a hang.
    let (cert, key) = client_cert(&server.ca, &["checkout"], now - DAY * 10, now - DAY);
    let mut config = ClientConfig::from_pem(vec![addr], ca, cert.into_bytes(), key.into_bytes());
    config.connect_timeout = Duration::from_secs(5);
    config.retries = 0;
    let result = match Client::connect(config).await {
        Err(error) => Err(error),
        Ok(client) => client.query_stock(vec![SkuAt { sku: 1, location: None }]).await.map(|_| ()),
    };
    assert!(result.is_err(), "an expired certificate is refused: {result:?}");
    server.stop();
}

#[tokio::test]
async fn checkout_may_not_change_stock_or_read_the_journal() {
    let server = start(2, |_| {});
    let checkout = server.client("checkout").await;
    let control = server.client("control").await;
    let sku = sku_on(0, 2, 5);
    stock(&control, &[sku], 3).await;
    assert_eq!(checkout.adjust(77, sku, LOCATION, 1_000).await.unwrap().status, Status::Forbidden);
    assert_eq!(checkout.upsert_sku(sku + 1, LOCATION, 0).await.unwrap().status, Status::Forbidden);
    assert_eq!(checkout.journal(0, 1, 10).await.unwrap().status, Status::Forbidden);
    assert_eq!(level(&checkout, sku).await, (3, 0, 3), "nothing changed");
    server.stop();
}

/// Writes `bytes` on a new stream, finishes it, and returns the reset code it gets.
async fn reset_code(conn: &quinn::Connection, bytes: &[u8]) -> u64 {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    match tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .unwrap_or_else(|_| panic!("a hang: no reset for {:?}", &bytes[..bytes.len().min(16)]))
    {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => code.into_inner(),
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_frames_reset_only_their_stream() {
    let server = start(2, |config| config.limits.requests_per_frame_max = 64);
    let control = server.client("control").await;
    let sku = sku_on(0, 2, 10);
    stock(&control, &[sku], 7).await;
    let conn = server.raw("checkout").await;
    let good = request_frame(vec![Request {
        id: 1,
        op: Op::Reserve { hold: HoldId(0xbad), ttl_ms: 60_000, lines: vec![line(sku, 1)] },
    }]);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = good.clone();
        f(&mut frame);
        frame
    };
    let too_many = request_frame(
        (0..65).map(|id| Request { id, op: Op::QueryStock { items: vec![SkuAt { sku, location: None }] } }).collect(),
    );
    let response_frame = frame::encode_responses(&stockplane_wire::ResponseBatch { responses: vec![] }).to_vec();
    let mut invalid = good.clone();
    let n = invalid.len();
    invalid[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, FrameError)> = vec![
        ("too short", good[..5].to_vec(), FrameError::TooShort { needed: HEADER_LEN, len: 5 }),
        ("truncated", good[..good.len() - 3].to_vec(), FrameError::Truncated { needed: 0, len: 0 }),
        ("bad magic", edit(&|f| f[0] = b'X'), FrameError::BadMagic { found: [0; 4] }),
        ("wrong version", edit(&|f| f[4] = 9), FrameError::UnsupportedVersion(9)),
        ("response kind", response_frame, FrameError::UnexpectedKind { found: 2 }),
        ("reserved bits", edit(&|f| f[7] = 1), FrameError::ReservedBitsSet { flags: 1, reserved: 0 }),
        (
            "oversized",
            edit(&|f| f[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes())),
            FrameError::Oversized { len: 0, max: 0 },
        ),
        ("invalid payload", invalid, FrameError::Invalid(String::new())),
        ("too many requests", too_many, FrameError::TooManyRequests { count: 0, max: 0 }),
    ];
    for (what, bytes, error) in cases {
        assert_eq!(reset_code(&conn, &bytes).await, u64::from(error.code()), "{what}");
        // The same connection still serves a good frame on another stream.
        let responses = round_trip(
            &conn,
            vec![Request { id: 9, op: Op::QueryStock { items: vec![SkuAt { sku, location: Some(LOCATION) }] } }],
        )
        .await;
        assert_eq!(responses[0].status, Status::Ok, "after {what}");
    }
    // No bad frame reserved anything, and other clients are served.
    let checkout = server.client("checkout").await;
    assert_eq!(level(&checkout, sku).await, (7, 0, 7));
    server.stop();
}

#[tokio::test]
async fn a_flooding_client_is_limited_and_others_are_served() {
    let server = start(1, |config| {
        config.limits.requests_per_s_per_connection = 1_000;
        config.limits.requests_burst_per_connection = 100;
        config.limits.requests_in_flight_per_connection_max = 50_000;
    });
    let control = server.client("control").await;
    stock(&control, &[42], 1).await;
    let query = |id| Request { id, op: Op::QueryStock { items: vec![SkuAt { sku: 42, location: None }] } };
    let flooder = server.raw("checkout").await;
    let responses = round_trip(&flooder, (0..1_000).map(query).collect()).await;
    let limited = responses.iter().filter(|r| r.status == Status::RateLimited).count();
    let served = responses.iter().filter(|r| r.status == Status::Ok).count();
    assert_eq!(limited + served, 1_000);
    assert!(limited >= 800, "a burst of 100 at 1,000/s lets about 100 through: {served} served");
    let other = server.raw("checkout").await;
    assert_eq!(round_trip(&other, vec![query(1)]).await[0].status, Status::Ok, "another client is not starved");
    server.stop();
}

#[tokio::test]
async fn requests_beyond_a_connections_in_flight_bound_are_busy() {
    let server = start(1, |config| config.limits.requests_in_flight_per_connection_max = 10);
    let control = server.client("control").await;
    stock(&control, &[42], 100).await;
    let conn = server.raw("checkout").await;
    let reserves = (0..30)
        .map(|id| Request {
            id,
            op: Op::Reserve { hold: HoldId(0x5000 + u128::from(id)), ttl_ms: 60_000, lines: vec![line(42, 1)] },
        })
        .collect();
    let responses = round_trip(&conn, reserves).await;
    let busy = responses.iter().filter(|r| r.status == Status::Busy).count();
    let reserved = responses.iter().filter(|r| r.status == Status::Reserved).count();
    assert_eq!((reserved, busy), (10, 20));
    let checkout = server.client("checkout").await;
    assert_eq!(level(&checkout, 42).await, (100, 10, 90), "only what was answered Reserved is held");
    server.stop();
}

#[tokio::test]
async fn metrics_and_health_are_served_over_http() {
    let server = start(2, |_| {});
    let checkout = server.client("checkout").await;
    let _ = checkout.query_stock(vec![SkuAt { sku: 1, location: None }]).await.unwrap();
    // A state change: answered only after its WAL round, whose write, fdatasync and whole
    // round are timed before the answer leaves.
    stock(&server.client("control").await, &[5], 1).await;
    let admin = server.server.admin_addr();
    let get = |path: &str| http_get(admin, path);
    assert!(get("/readyz").starts_with("HTTP/1.1 200"));
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    // Cores publish their counters every second (into one registry per process: other
    // tests' servers publish there too, so look for this test's query).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get("/metrics");
        if metrics.contains("stockplane_requests_total{shard=\"0\",op=\"query_stock\"}")
            || metrics.contains("stockplane_requests_total{shard=\"1\",op=\"query_stock\"}")
        {
            for name in [
                "stockplane_connections",
                "stockplane_service_seconds",
                "stockplane_live_holds",
                "stockplane_wal_sync_seconds_count",
                "stockplane_wal_write_seconds_count",
                "stockplane_wal_fdatasync_seconds_count",
            ] {
                assert!(metrics.contains(name), "{name} missing: {metrics}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "no request counters published: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop();
}

#[tokio::test]
async fn the_client_fails_fast_while_the_server_is_down_and_comes_back_with_it() {
    let first = start(1, |_| {});
    let addr = first.server.addr();
    let (ca, cert, key) = first.pems("checkout");
    let mut config = ClientConfig::from_pem(vec![addr], ca, cert, key);
    config.connections = 1;
    config.retries = 0;
    config.call_timeout = Duration::from_millis(300);
    config.connect_timeout = Duration::from_millis(300);
    config.breaker_failures = 2;
    config.breaker_open = Duration::from_millis(500);
    let client = Client::connect(config).await.unwrap();
    let query = || client.query_stock(vec![SkuAt { sku: 7, location: None }]);
    assert_eq!(query().await.unwrap().status, Status::UnknownSku, "served (an empty catalog)");

    // The server goes away: calls fail, then the breaker opens and calls fail at once.
    let dir = first.dir.clone();
    first.server.stop().unwrap();
    let mut failures = 0;
    let open = loop {
        match query().await {
            Err(ClientError::CircuitOpen) => break true,
            Err(_) => failures += 1,
            Ok(outcome) => panic!("answered by a stopped server: {outcome:?}"),
        }
        if failures > 10 {
            break false;
        }
    };
    assert!(open, "the breaker opened after {failures} failures");
    let started = Instant::now();
    assert!(matches!(query().await, Err(ClientError::CircuitOpen)));
    assert!(started.elapsed() < Duration::from_millis(100), "an open breaker fails fast");

    // A server comes back on the same address: a probe gets through and closes the breaker.
    let mut config = test_config(1);
    config.listen = addr;
    config.tls.cert = dir.join("server.pem");
    config.tls.key = dir.join("server.key");
    config.tls.client_ca = dir.join("ca.pem");
    config.data_dir = dir.join("data");
    let second = stockplane_dataplane::Server::start(config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match query().await {
            Ok(outcome) => {
                assert_eq!(outcome.status, Status::UnknownSku);
                break;
            }
            Err(error) => assert!(Instant::now() < deadline, "never reconnected: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.close().await;
    second.stop().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_core_refuses_connections_beyond_its_bound() {
    let server = start(1, |config| config.limits.connections_per_core_max = 1);
    let first = server.raw("checkout").await;
    let (ca, cert, key) = server.pems("checkout");
    let second = raw_connect(server.server.addr(), &ca, Some((&cert, &key))).await;
    match second {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(close.error_code, quinn::TransportErrorCode::CONNECTION_REFUSED)
        }
        other => panic!("expected CONNECTION_REFUSED, got {other:?}"),
    }
    let query = Request { id: 1, op: Op::QueryStock { items: vec![SkuAt { sku: 1, location: None }] } };
    assert_eq!(round_trip(&first, vec![query]).await[0].status, Status::UnknownSku, "the first one is served");
    server.stop();
}

#[tokio::test]
async fn carts_quantities_and_ttls_out_of_bounds_are_invalid() {
    let server = start(2, |config| {
        config.shard.cart_lines_max = 4;
        config.shard.qty_max = 10;
        config.shard.hold_ttl_ms_min = 1_000;
        config.shard.hold_ttl_ms_max = 60_000;
    });
    let control = server.client("control").await;
    let checkout = server.client("checkout").await;
    let skus: Vec<u64> = (100..105).collect();
    stock(&control, &skus, 100).await;
    let lines = |n: usize, qty: u32| skus[..n].iter().map(|&sku| line(sku, qty)).collect::<Vec<_>>();
    let cases = [
        ("five lines", 60_000, lines(5, 1)),
        ("no lines", 60_000, lines(0, 1)),
        ("eleven units", 60_000, lines(1, 11)),
        ("ttl too short", 999, lines(1, 1)),
        ("ttl too long", 60_001, lines(1, 1)),
    ];
    for (i, (what, ttl_ms, lines)) in cases.into_iter().enumerate() {
        let outcome = checkout.reserve(HoldId(0x7000 + i as u128), ttl_ms, lines).await.unwrap();
        assert_eq!(outcome.status, Status::InvalidArgument, "{what}");
    }
    let ok = checkout.reserve(HoldId(0x7100), 60_000, lines(4, 10)).await.unwrap();
    assert_eq!(ok.status, Status::Reserved, "at the bounds is fine");
    for &sku in &skus[..4] {
        assert_eq!(level(&checkout, sku).await.2, 90);
    }
    assert_eq!(level(&checkout, skus[4]).await, (100, 0, 100), "refused carts held nothing");
    server.stop();
}

/// Creates `skus` at `LOCATION` with one `call_many`: one answer per SKU, each `Ok`.
async fn upsert_all(control: &Client, skus: &[u64]) {
    let upserts = skus.iter().map(|&sku| Op::UpsertSku { sku, location: LOCATION, backorder_limit: 0 }).collect();
    let answers = control.call_many(upserts).await;
    assert_eq!(answers.len(), skus.len());
    assert!(answers.iter().all(|a| matches!(a, Ok(o) if o.status == Status::Ok)), "every upsert is acknowledged");
}

/// `call_many` sends a batch larger than a frame across every shard and answers each op
/// in its own place, mixed statuses included: what the control plane's pusher relies
/// on when it matches answers to the rows and adjustments it sent.
#[tokio::test]
async fn many_calls_at_once_are_answered_in_order() {
    let server = start(2, |_| {});
    let control = server.client("control").await;
    let skus: Vec<u64> = (1..=1_000).collect();
    upsert_all(&control, &skus).await;
    // Even SKUs get sku units; odd positions name a SKU nobody made, answered UnknownSku.
    let adjusts: Vec<Op> = (0..2_000u64)
        .map(|i| {
            let sku = if i % 2 == 0 { i / 2 + 1 } else { 1_000_000 + i };
            Op::Adjust { adjustment: u128::from(i) + 1, sku, location: LOCATION, delta: sku as i64 }
        })
        .collect();
    let answers = control.call_many(adjusts).await;
    for (i, answer) in answers.iter().enumerate() {
        let expected = if i % 2 == 0 { Status::Ok } else { Status::UnknownSku };
        assert_eq!(answer.as_ref().map(|o| o.status).ok(), Some(expected), "answer {i}");
    }
    let checkout = server.client("checkout").await;
    for sku in [1, 500, 1_000] {
        assert_eq!(level(&checkout, sku).await.0, sku as i64);
    }
    assert!(control.call_many(Vec::new()).await.is_empty());
}

/// Answers that together exceed a frame are split across frames: 512 queries of 256
/// SKU-locations each (about 5 MB of answers) sent at once come back whole. They once
/// went out as one frame larger than a client may read, which failed the connection
/// (the control plane's reconcile of a million rows tripped its circuit breaker).
#[tokio::test]
async fn answers_larger_than_a_frame_are_split_across_frames() {
    let server = start(1, |_| {});
    let control = server.client("control").await;
    let skus: Vec<u64> = (1..=256).collect();
    upsert_all(&control, &skus).await;
    let items: Vec<SkuAt> = skus.iter().map(|&sku| SkuAt { sku, location: Some(LOCATION) }).collect();
    let queries = (0..512).map(|_| Op::QueryStock { items: items.clone() }).collect();
    let answers = control.call_many(queries).await;
    for (i, answer) in answers.iter().enumerate() {
        let outcome = answer.as_ref().unwrap_or_else(|error| panic!("query {i}: {error}"));
        let Body::Stock(levels) = &outcome.body else { panic!("query {i}: {outcome:?}") };
        assert_eq!(levels.len(), 256, "query {i}");
    }
}
