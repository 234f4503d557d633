//! The write-ahead log through the real server: a restart rebuilds exactly the state that
//! was there (state hashes), holds that expired while the server was down expire once on
//! start, and a disk that fails stops state changes but not reads.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use stockplane_dataplane::config::SnapshotSource;
use stockplane_engine::shard_for;
use stockplane_wire::client::Client;
use stockplane_wire::{Body, CartLine, HoldId, HoldState, HoldsOf, Op, Request, SkuAt, Status};

const LOCATION: u32 = 1;

fn line(sku: u64, qty: u32) -> CartLine {
    CartLine { sku, location: Some(LOCATION), qty }
}

async fn stock(control: &Client, skus: &[u64], units: i64) {
    for &sku in skus {
        assert_eq!(control.upsert_sku(sku, LOCATION, 0).await.unwrap().status, Status::Ok);
        assert_eq!(control.adjust(u128::from(sku) << 32, sku, LOCATION, units).await.unwrap().status, Status::Ok);
    }
}

async fn levels(client: &Client, skus: &[u64]) -> Vec<(u64, i64, i64)> {
    let items = skus.iter().map(|&sku| SkuAt { sku, location: Some(LOCATION) }).collect();
    let Body::Stock(mut levels) = client.query_stock(items).await.unwrap().body else { panic!("no stock") };
    levels.sort_by_key(|l| l.sku);
    levels.iter().map(|l| (l.sku, l.on_hand, l.held)).collect()
}

async fn hold_state(client: &Client, hold: HoldId) -> HoldState {
    match client.query_holds(HoldsOf::Hold(hold)).await.unwrap().body {
        Body::Holds(holds) => holds[0].state,
        Body::Hold(info) => info.state,
        body => panic!("no hold: {body:?}"),
    }
}

/// Stops a server and starts another on its certificates and data directory.
fn restart(server: TestServer) -> TestServer {
    let TestServer { server, dir, ca } = server;
    server.stop().unwrap();
    TestServer { server: start_on(&dir, 2), dir, ca }
}

#[tokio::test]
async fn a_restart_rebuilds_exactly_the_state_that_was_there() {
    let server = start(2, |_| {});
    let skus: Vec<u64> = (0..2).flat_map(|s| (0u64..).filter(move |&k| shard_for(k, 2) == s).take(3)).collect();
    {
        let control = server.client("control").await;
        let checkout = server.client("checkout").await;
        stock(&control, &skus, 50).await;
        for i in 0..60u128 {
            let lines = vec![line(skus[i as usize % 6], 1), line(skus[(i as usize + 1) % 6], 2)];
            let hold = HoldId(0x100 + i);
            assert_eq!(checkout.reserve(hold, 600_000, lines).await.unwrap().status, Status::Reserved);
            match i % 3 {
                0 => assert_eq!(checkout.commit(hold, None).await.unwrap().status, Status::Committed),
                1 => assert_eq!(checkout.release(hold).await.unwrap().status, Status::Released),
                _ => assert_eq!(checkout.extend(hold, 900_000).await.unwrap().status, Status::Extended),
            }
        }
        control.close().await;
        checkout.close().await;
    }
    // What the carts leave: every third sold, every third released, the rest held. Wait
    // (within a bound) until every participant has applied its carts' decisions.
    let mut expected: Vec<(u64, i64, i64)> = skus.iter().map(|&sku| (sku, 50, 0)).collect();
    for i in 0..60usize {
        for (index, qty) in [(i % 6, 1), ((i + 1) % 6, 2)] {
            match i % 3 {
                0 => expected[index].1 -= qty,
                2 => expected[index].2 += qty,
                _ => {}
            }
        }
    }
    expected.sort_by_key(|l| l.0);
    let checkout = server.client("checkout").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while levels(&checkout, &skus).await != expected {
        assert!(Instant::now() < deadline, "the carts never settled: {:?}", levels(&checkout, &skus).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = expected;
    checkout.close().await;
    let TestServer { server, dir, ca } = server;
    let hashes = server.stop().unwrap();
    let server = TestServer { server: start_on(&dir, 2), dir, ca };
    assert_eq!(server.server.recovered_state_hashes(), &hashes[..], "every shard rebuilt from its log is the same");
    let checkout = server.client("checkout").await;
    assert_eq!(levels(&checkout, &skus).await, before);
    assert_eq!(hold_state(&checkout, HoldId(0x100)).await, HoldState::Committed);
    assert_eq!(hold_state(&checkout, HoldId(0x101)).await, HoldState::Released);
    assert_eq!(hold_state(&checkout, HoldId(0x102)).await, HoldState::Held);
    checkout.close().await;
    server.stop();
}

#[tokio::test]
async fn holds_that_expired_while_the_server_was_down_expire_once_on_start() {
    let server = start(2, |_| {});
    let skus = [shard_for(0, 2) as u64, 10, 11];
    let hold = HoldId(0xe0);
    let expires_at_ms;
    {
        let control = server.client("control").await;
        let checkout = server.client("checkout").await;
        stock(&control, &skus, 5).await;
        let reserved = checkout.reserve(hold, 300, vec![line(10, 2), line(11, 1)]).await.unwrap();
        assert_eq!(reserved.status, Status::Reserved);
        let Body::Hold(info) = reserved.body else { panic!("no hold body") };
        expires_at_ms = info.expires_at_ms;
        control.close().await;
        checkout.close().await;
    }
    let TestServer { server, dir, ca } = server;
    server.stop().unwrap();
    // Down until the hold's expiry has passed by the wall clock the engine uses.
    while wall_ms() <= expires_at_ms + 5 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut server = TestServer { server: start_on(&dir, 2), dir, ca };
    for round in 0..2 {
        let checkout = server.client("checkout").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = levels(&checkout, &[10, 11]).await;
            if now == vec![(10, 5, 0), (11, 5, 0)] {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: {now:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(hold_state(&checkout, hold).await, HoldState::Expired, "round {round}");
        checkout.close().await;
        // A second restart finds the expiry in the log: the stock comes back only once.
        server = restart(server);
    }
    server.stop();
}

/// Starts a server on the certificates and data directory that `start` made in `dir`.
fn start_on(dir: &std::path::Path, cores: usize) -> stockplane_dataplane::Server {
    let mut config = test_config(cores);
    config.tls.cert = dir.join("server.pem");
    config.tls.key = dir.join("server.key");
    config.tls.client_ca = dir.join("ca.pem");
    config.data_dir = dir.join("data");
    stockplane_dataplane::Server::start(config).unwrap()
}

/// Runs `chattr` on `path`; false when the file system does not support it.
fn chattr(flag: &str, path: &std::path::Path) -> bool {
    Command::new("chattr").arg(flag).arg(path).status().is_ok_and(|s| s.success())
}

#[tokio::test]
async fn a_failed_disk_stops_state_changes_but_not_reads() {
    let server = start(1, |config| config.shard.adjustments_retained_max = 1 << 12);
    let shard_dir = server.dir.join("data").join("shard-0");
    let control = server.client("control").await;
    stock(&control, &[7], 1).await;
    // An immutable directory: the log cannot create its next segment, so the write that
    // needs it fails (a real failure of the file system, not a simulated one).
    if !chattr("+i", &shard_dir) {
        eprintln!("skipped: chattr +i is not supported here");
        server.stop();
        return;
    }
    // Whatever happens below, the directory becomes removable again.
    struct Mutable(std::path::PathBuf);
    impl Drop for Mutable {
        fn drop(&mut self) {
            chattr("-i", &self.0);
        }
    }
    let mutable = Mutable(shard_dir.clone());
    let conn = server.raw("control").await;
    let mut next = 1u128 << 100;
    let mut failed = false;
    // Each adjustment is a 56-byte record: a 1 MiB segment fills after about 19,000.
    for _ in 0..100 {
        let requests: Vec<Request> = (0..500)
            .map(|i| {
                next += 1;
                Request { id: i, op: Op::Adjust { adjustment: next, sku: 7, location: LOCATION, delta: 1 } }
            })
            .collect();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&request_frame(requests)).await.unwrap();
        send.finish().unwrap();
        match tokio::time::timeout(Duration::from_secs(3), read_responses(&mut recv, 500)).await {
            Ok(responses) if responses.iter().all(|r| r.status == Status::Ok) => continue,
            // Unanswered (their records will never be durable) or answered Unavailable.
            _ => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the log never needed a new segment");
    let adjust = Request { id: 1, op: Op::Adjust { adjustment: 1, sku: 7, location: LOCATION, delta: 1 } };
    assert_eq!(round_trip(&conn, vec![adjust]).await[0].status, Status::Unavailable);
    let query = Request { id: 2, op: Op::QueryStock { items: vec![SkuAt { sku: 7, location: Some(LOCATION) }] } };
    assert_eq!(round_trip(&conn, vec![query]).await[0].status, Status::Ok, "reads are still served");
    let readyz = http_get(server.server.admin_addr(), "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503") && readyz.contains("WAL"), "{readyz}");
    drop(mutable);
    server.stop();
}

/// `count` restocks of one unit of SKU 9, with adjustment ids after `next`.
fn restocks(next: &mut u128, count: u64) -> Vec<Request> {
    (0..count)
        .map(|i| {
            *next += 1;
            Request { id: i, op: Op::Adjust { adjustment: *next, sku: 9, location: LOCATION, delta: 1 } }
        })
        .collect()
}

#[tokio::test]
async fn the_log_moves_to_new_segments_and_recovers_across_them() {
    // 1 MiB segments; about 60,000 adjustments of 56 bytes fill three of them.
    let server = start(1, |_| {});
    let control = server.client("control").await;
    stock(&control, &[9], 1).await;
    let conn = server.raw("control").await;
    let mut next = 1u128 << 90;
    for _ in 0..60 {
        let responses = round_trip(&conn, restocks(&mut next, 1_000)).await;
        assert!(
            responses.iter().all(|r| r.status == Status::Ok),
            "{:?}",
            responses.iter().find(|r| r.status != Status::Ok)
        );
    }
    control.close().await;
    let segments = std::fs::read_dir(server.dir.join("data").join("shard-0"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".seg"))
        .count();
    assert!(segments >= 3, "only {segments} segments");
    let TestServer { server: running, dir, ca } = server;
    let hashes = running.stop().unwrap();
    let server = TestServer { server: start_on(&dir, 1), dir, ca };
    let checkout = server.client("checkout").await;
    assert_eq!(levels(&checkout, &[9]).await, vec![(9, 60_001, 0)]);
    assert_eq!(server.server.recovered_state_hashes(), &hashes[..]);
    checkout.close().await;
    server.stop();
}

#[tokio::test]
async fn snapshots_are_taken_while_serving_and_the_log_below_them_is_deleted() {
    // The first snapshot comes from the files (the replica has followed nothing yet), the
    // next from the replica's memory, which the writer fed each durable batch.
    snapshots_while_serving(SnapshotSource::Replica, "memory").await;
}

#[tokio::test]
async fn snapshots_from_a_fork_are_taken_while_serving_and_the_log_below_them_is_deleted() {
    snapshots_while_serving(SnapshotSource::Fork, "fork").await;
}

/// With 1 MiB segments and a snapshot after every closed one, from `source`, while holds
/// stay live: two snapshots are written, the first segment leaves the log, a segment let
/// go comes back as a new one (the same file: its inode), a snapshot counted as from
/// `counted` is seen, and a restart recovers the state the server stopped with.
async fn snapshots_while_serving(source: SnapshotSource, counted: &str) {
    let server = start(1, |config| {
        config.wal.snapshot_every_segments = 1;
        config.wal.snapshot_source = source;
    });
    let control = server.client("control").await;
    let checkout = server.client("checkout").await;
    stock(&control, &[9, 10], 1_000_000).await;
    let conn = server.raw("control").await;
    let dir = server.dir.join("data").join("shard-0");
    // Names with their inodes, both from the directory listing itself: a file listed may
    // be renamed (a spare becoming a segment) or deleted (a segment below a snapshot)
    // before a later `stat` of it, while the server goes on.
    let entries = |suffix: &str| -> Vec<(String, u64)> {
        let mut names: Vec<(String, u64)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::os::unix::fs::DirEntryExt::ino(&e)))
            .filter(|(n, _)| n.ends_with(suffix))
            .collect();
        names.sort();
        names
    };
    let listing = |suffix: &str| -> Vec<String> { entries(suffix).into_iter().map(|(n, _)| n).collect() };
    let mut spare_inodes = std::collections::HashSet::new();
    let mut reused = false;
    let mut next = 1u128 << 90;
    let mut held = 0;
    // Until two snapshots exist, the first segment is gone from the log and a spare came
    // back as a log segment (each round closes about a sixth of a segment; a round of
    // holds between rounds of restocks).
    let deadline = Instant::now() + Duration::from_secs(120);
    while listing(".snap").len() < 2 || listing(".seg").iter().any(|s| s == "wal-0000000000000001.seg") || !reused {
        let segments = entries(".seg");
        spare_inodes.extend(segments.iter().filter(|(s, _)| s.starts_with("spare-")).map(|(_, ino)| *ino));
        reused = reused || segments.iter().any(|(s, ino)| s.starts_with("wal-") && spare_inodes.contains(ino));
        assert!(Instant::now() < deadline, "no snapshots after {next:#x}: {:?}", listing(""));
        let responses = round_trip(&conn, restocks(&mut next, 3_000)).await;
        assert!(responses.iter().all(|r| r.status == Status::Ok));
        held += 1;
        let hold = HoldId(u128::from(held as u32) | 1 << 70);
        let status = checkout.reserve(hold, 3_600_000, vec![line(10, 1)]).await.unwrap().status;
        assert_eq!(status, Status::Reserved);
    }
    let adjusted = (next - (1u128 << 90)) as i64;
    // (A snapshot is counted just after its files are in place: look until it is.)
    let from_source = format!("stockplane_snapshots_total{{shard=\"0\",source=\"{counted}\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http_get(server.server.admin_addr(), "/metrics");
        if metrics.lines().any(|l| l.starts_with(&from_source)) {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot from {counted}:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    control.close().await;
    checkout.close().await;
    let TestServer { server: running, dir: root, ca } = server;
    let hashes = running.stop().unwrap();
    let server = TestServer { server: start_on(&root, 1), dir: root, ca };
    assert_eq!(server.server.recovered_state_hashes(), &hashes[..]);
    let checkout = server.client("checkout").await;
    assert_eq!(levels(&checkout, &[9, 10]).await, vec![(9, 1_000_000 + adjusted, 0), (10, 1_000_000, held)]);
    checkout.close().await;
    server.stop();
}

/// A stopped server gives its port back, so a restart in the same process can bind it
/// again. It once did not: the cores' detached tasks (receive, WAL writer, mesh, metrics)
/// stayed pending after the stop and kept every core's socket open.
#[test]
fn a_stopped_server_frees_its_port() {
    let server = common::start(2, |_| {});
    let addr = server.server.addr();
    server.stop();
    let rebound = std::net::UdpSocket::bind(addr);
    assert!(rebound.is_ok(), "the port is still taken after the stop: {rebound:?}");
}
