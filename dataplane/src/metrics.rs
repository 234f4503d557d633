//! Per-core counters, kept as plain integers on the hot path and published to the
//! process's `metrics` recorder (Prometheus, see `admin`) once a second by each core.
//!
//! Nothing on the hot path touches an atomic or a lock: a core counts into its own
//! `CoreMetrics`, and its metrics task adds the differences to the labelled counters.

use stockplane_engine::ShardId;
use stockplane_wire::{ArchivedOp, Status};

/// Operation names, in the order of `op_index`.
const OPS: [&str; 9] =
    ["reserve", "commit", "release", "extend", "query_stock", "query_holds", "upsert_sku", "adjust", "journal"];

fn op_index(op: &ArchivedOp) -> usize {
    match op {
        ArchivedOp::Reserve { .. } => 0,
        ArchivedOp::Commit { .. } => 1,
        ArchivedOp::Release { .. } => 2,
        ArchivedOp::Extend { .. } => 3,
        ArchivedOp::QueryStock { .. } => 4,
        ArchivedOp::QueryHolds { .. } => 5,
        ArchivedOp::UpsertSku { .. } => 6,
        ArchivedOp::Adjust { .. } => 7,
        ArchivedOp::Journal { .. } => 8,
    }
}

/// One core's counters since it started.
#[derive(Debug, Clone)]
pub(crate) struct CoreMetrics {
    shard: String,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub forwarded_frames: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub connections_closed: u64,
    pub wal_bytes: u64,
    pub wal_syncs: u64,
    pub send_errors: u64,
    /// QUIC packets sent and declared lost, bytes declared lost, and congestion events,
    /// over every connection this core has had (`Core::refresh_quic`).
    pub quic: QuicCounts,
    pub frame_errors: [u64; 16],
    pub ops: [u64; OPS.len()],
    pub statuses: [u64; 256],
    published: Option<Box<CoreMetrics>>,
}

impl CoreMetrics {
    /// Zeroed counters for shard `shard`.
    pub fn new(shard: ShardId) -> CoreMetrics {
        CoreMetrics {
            shard: shard.to_string(),
            datagrams_in: 0,
            datagrams_out: 0,
            frames_in: 0,
            frames_out: 0,
            forwarded_frames: 0,
            connections_accepted: 0,
            connections_refused: 0,
            connections_closed: 0,
            wal_bytes: 0,
            wal_syncs: 0,
            send_errors: 0,
            quic: QuicCounts::default(),
            frame_errors: [0; 16],
            ops: [0; OPS.len()],
            statuses: [0; 256],
            published: None,
        }
    }

    /// Counts a request by its operation.
    pub fn count_op(&mut self, op: &ArchivedOp) {
        self.ops[op_index(op)] += 1;
    }

    /// Counts a reply by its status.
    pub fn count_status(&mut self, status: Status) {
        self.statuses[status.code() as usize] += 1;
    }

    /// Adds what changed since the last call to the process's counters, and sets gauges.
    pub fn publish(&mut self, gauges: &CoreGauges) {
        let before = self.published.take().map(|b| *b).unwrap_or_else(|| CoreMetrics::new(0));
        let shard = self.shard.clone();
        let add = |name: &'static str, now: u64, then: u64| {
            if now > then {
                metrics::counter!(name, "shard" => shard.clone()).increment(now - then);
            }
        };
        add("stockplane_datagrams_received_total", self.datagrams_in, before.datagrams_in);
        add("stockplane_datagrams_sent_total", self.datagrams_out, before.datagrams_out);
        add("stockplane_frames_received_total", self.frames_in, before.frames_in);
        add("stockplane_frames_sent_total", self.frames_out, before.frames_out);
        add("stockplane_frames_forwarded_total", self.forwarded_frames, before.forwarded_frames);
        add("stockplane_connections_accepted_total", self.connections_accepted, before.connections_accepted);
        add("stockplane_connections_refused_total", self.connections_refused, before.connections_refused);
        add("stockplane_connections_closed_total", self.connections_closed, before.connections_closed);
        add("stockplane_wal_bytes_total", self.wal_bytes, before.wal_bytes);
        add("stockplane_wal_syncs_total", self.wal_syncs, before.wal_syncs);
        add("stockplane_udp_send_errors_total", self.send_errors, before.send_errors);
        add("stockplane_quic_packets_sent_total", self.quic.sent_packets, before.quic.sent_packets);
        add("stockplane_quic_packets_lost_total", self.quic.lost_packets, before.quic.lost_packets);
        add("stockplane_quic_lost_bytes_total", self.quic.lost_bytes, before.quic.lost_bytes);
        add("stockplane_quic_congestion_events_total", self.quic.congestion_events, before.quic.congestion_events);
        for (code, (&now, &then)) in self.frame_errors.iter().zip(&before.frame_errors).enumerate() {
            if now > then {
                metrics::counter!("stockplane_frame_errors_total", "shard" => shard.clone(), "code" => code.to_string())
                    .increment(now - then);
            }
        }
        for (op, (&now, &then)) in OPS.iter().zip(self.ops.iter().zip(&before.ops)) {
            if now > then {
                metrics::counter!("stockplane_requests_total", "shard" => shard.clone(), "op" => *op)
                    .increment(now - then);
            }
        }
        for status in Status::ALL {
            let code = status.code() as usize;
            let (now, then) = (self.statuses[code], before.statuses[code]);
            if now > then {
                metrics::counter!("stockplane_replies_total", "shard" => shard.clone(), "status" => format!("{status:?}"))
                    .increment(now - then);
            }
        }
        metrics::gauge!("stockplane_live_holds", "shard" => shard.clone()).set(f64::from(gauges.live_holds));
        metrics::gauge!("stockplane_connections", "shard" => shard.clone()).set(gauges.connections as f64);
        metrics::gauge!("stockplane_mesh_queued_messages", "shard" => shard.clone()).set(gauges.mesh_queued as f64);
        metrics::gauge!("stockplane_udp_send_dropped", "shard" => shard.clone()).set(gauges.udp_send_dropped as f64);
        metrics::gauge!("stockplane_wal_unsynced_bytes", "shard" => shard.clone())
            .set(gauges.wal_unsynced_bytes as f64);
        metrics::gauge!("stockplane_wal_failed", "shard" => shard).set(if gauges.wal_failed { 1.0 } else { 0.0 });
        let mut snapshot = self.clone();
        snapshot.published = None;
        self.published = Some(Box::new(snapshot));
    }
}

/// QUIC path counters summed over connections (each connection's own are monotonic while
/// it lives; a closed one's are kept in the sum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QuicCounts {
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
    pub congestion_events: u64,
}

impl QuicCounts {
    /// Adds one connection's path counters.
    pub fn add(&mut self, path: &quinn_proto::PathStats) {
        self.sent_packets += path.sent_packets;
        self.lost_packets += path.lost_packets;
        self.lost_bytes += path.lost_bytes;
        self.congestion_events += path.congestion_events;
    }
}

/// Values a core reports as gauges.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CoreGauges {
    pub live_holds: u32,
    pub connections: usize,
    pub mesh_queued: usize,
    pub udp_send_dropped: u64,
    pub wal_unsynced_bytes: usize,
    pub wal_failed: bool,
}
