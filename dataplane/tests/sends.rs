//! The server's UDP sends under a burst of replies, alone in its process: the metrics
//! registry is one per process, so no other test's server adds to the counters read here.

mod common;

use std::time::{Duration, Instant};

use common::*;
use stockplane_wire::{Op, Request, Status};

const LOCATION: u32 = 1;

/// The sum of counter `name` over its label sets (0 when absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && matches!(line.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A burst of replies of well over 64 KiB leaves in sends the kernel takes: the server
/// counts no failed send. It once asked for up to 64 datagrams of 1,200 bytes in one GSO
/// send, more than one UDP datagram may carry; the kernel refused each such send, and
/// every datagram in it was lost.
#[tokio::test]
async fn a_burst_of_replies_leaves_in_sends_the_kernel_takes() {
    let server = start(1, |_| {});
    let conn = server.raw("control").await;
    let upsert = Request { id: 0, op: Op::UpsertSku { sku: 9, location: LOCATION, backorder_limit: 0 } };
    assert_eq!(round_trip(&conn, vec![upsert]).await[0].status, Status::Ok);
    // 4,000 adjustments in one frame: their replies are answered together, over 100 KiB.
    let burst: Vec<Request> = (0..4_000u64)
        .map(|i| Request {
            id: i,
            op: Op::Adjust { adjustment: (1u128 << 90) + u128::from(i), sku: 9, location: LOCATION, delta: 1 },
        })
        .collect();
    let responses = round_trip(&conn, burst).await;
    assert_eq!(responses.len(), 4_000);
    assert!(
        responses.iter().all(|r| r.status == Status::Ok),
        "{:?}",
        responses.iter().find(|r| r.status != Status::Ok)
    );
    // Counters are published once a second. One published after a second connection was
    // accepted, which is after every reply above arrived, counts every send made for
    // them.
    let _second = server.raw("control").await;
    let admin = server.server.admin_addr();
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = http_get(admin, "/metrics");
        if counter(&metrics, "stockplane_connections_accepted_total") >= 2 {
            break metrics;
        }
        assert!(Instant::now() < deadline, "the second connection was never counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sent = counter(&metrics, "stockplane_quic_packets_sent_total");
    assert!(sent > 64, "only {sent} packets sent: the burst was not one");
    assert_eq!(counter(&metrics, "stockplane_udp_send_errors_total"), 0, "failed sends:\n{metrics}");
    server.stop();
}
