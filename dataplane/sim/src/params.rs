//! What one seed simulates: the shards' bounds, the workload's shape and the faults,
//! all drawn from the seed (swarm testing: each seed turns different knobs, so that
//! rare paths such as `Busy` answers or torn writes are exercised by some seeds hard).
//!
//! This module draws numbers only; it must not run anything.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use stockplane_engine::ShardConfig;

/// How the network, the disks and the power misbehave in one seed.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Chance that a client's request is lost.
    pub request_drop: f64,
    /// Chance that a shard's reply is lost.
    pub reply_drop: f64,
    /// Chance that a message between shards is lost.
    pub peer_drop: f64,
    /// Chance that a message between shards is delivered twice.
    pub peer_duplicate: f64,
    /// Longest ordinary delay of a message between shards, in ms.
    pub peer_delay_ms_max: u64,
    /// Chance that a message between shards is held up for long (it then overtakes nothing
    /// and is overtaken by much).
    pub peer_late: f64,
    /// Longest delay of a held-up message, in ms.
    pub peer_late_ms_max: u64,
    /// Longest one-way delay between a client and a shard, in ms.
    pub client_delay_ms_max: u64,
    /// Longest fsync, in ms.
    pub fsync_ms_max: u64,
    /// Mean time between crashes of some shard, in ms; `None`: no crashes.
    pub crash_every_ms: Option<u64>,
    /// Whether some unsynced writes survive a crash.
    pub crash_keeps_prefix: bool,
    /// Whether the first lost write may be torn (a prefix of it survives).
    pub crash_tears: bool,
    /// Longest time a crashed shard stays down, in ms.
    pub down_ms_max: u64,
    /// Chance that an fsync fails; `None`: fsyncs never fail. A failed fsync leaves its
    /// shard's disk failed (nothing more becomes durable) until an operator restarts it.
    pub fsync_fail: Option<f64>,
    /// Longest time before an operator restarts a shard whose disk failed, in ms.
    pub failed_restart_ms_max: u64,
    /// Chance that a crash flips one bit in the unsynced bytes it kept (a damaged torn
    /// write); `None`: never.
    pub flip_unsynced: Option<f64>,
    /// Chance that a restart finds one bit flipped in the synced bytes (media
    /// corruption, which an operator repairs from a replica); `None`: never.
    pub flip_durable: Option<f64>,
}

impl Faults {
    /// No faults at all: what the simulation uses while it drains at the end of a seed.
    pub fn none(&self) -> Faults {
        Faults {
            request_drop: 0.0,
            reply_drop: 0.0,
            peer_drop: 0.0,
            peer_duplicate: 0.0,
            peer_late: 0.0,
            crash_every_ms: None,
            fsync_fail: None,
            flip_unsynced: None,
            flip_durable: None,
            ..self.clone()
        }
    }
}

/// Everything one seed simulates.
#[derive(Debug, Clone)]
pub struct Params {
    /// Shards.
    pub shards: u32,
    /// The configuration every shard gets (with its own number).
    pub config: ShardConfig,
    /// Distinct SKUs in the catalog.
    pub skus: usize,
    /// Most locations of one SKU.
    pub locations_max: u32,
    /// Checkout clients (one control client comes on top).
    pub checkout_clients: usize,
    /// Most lines in one cart.
    pub cart_lines_max: usize,
    /// Shortest and longest TTL the clients ask for, in ms.
    pub ttl_ms: (u32, u32),
    /// How long a client waits for an answer before it retries, in ms.
    pub client_timeout_ms: u64,
    /// Most attempts at one request before a client gives up on it.
    pub attempts_max: u32,
    /// Longest think time of a checkout client between operations, in ms.
    pub think_ms_max: u64,
    /// The faults.
    pub faults: Faults,
}

impl Params {
    /// Draws the parameters of one seed; `shards` overrides the drawn shard count.
    pub fn draw(rng: &mut ChaCha8Rng, shards: Option<u32>) -> Params {
        let shards = shards.unwrap_or_else(|| *[1, 2, 3, 3, 4, 4, 5, 8].get(rng.gen_range(0..8)).expect("in range"));
        let skus = rng.gen_range(6..80);
        let tight = rng.gen_bool(0.3);
        let mut config = ShardConfig::new(0, shards);
        config.skus_max = if rng.gen_bool(0.1) { (skus as u32 / shards).max(2) } else { 1024 };
        config.sku_locations_max = config.skus_max * 3;
        config.holds_max = if tight { rng.gen_range(4..16) } else { rng.gen_range(16..256) };
        config.holds_finished_max = rng.gen_range(4..128);
        config.hold_extra_lines_max = if tight { rng.gen_range(2..16) } else { rng.gen_range(16..512) };
        config.cart_lines_max = rng.gen_range(3..=8);
        config.carts_max = if tight { rng.gen_range(3..12) } else { rng.gen_range(12..256) };
        config.carts_finished_max = rng.gen_range(1..config.carts_max);
        config.qty_max = rng.gen_range(3..20);
        config.hold_ttl_ms_min = 20;
        config.hold_ttl_ms_max = 10_000;
        config.adjust_delta_max = 1_000;
        config.adjustments_retained_max = 4_096;
        config.journal_entries_max = if rng.gen_bool(0.2) { rng.gen_range(16..256) } else { 1 << 16 };
        config.journal_read_max = rng.gen_range(1..128);
        config.query_items_max = 16;
        config.query_holds_max = rng.gen_range(1..32);
        config.outbox_max = if tight { rng.gen_range(2..16) } else { rng.gen_range(16..1024) };
        config.peer_retransmit_ms = rng.gen_range(5..60);
        config.peer_timeout_ms = config.peer_retransmit_ms * rng.gen_range(2..20);
        let ttl_min = rng.gen_range(30..300);
        let crash_every_ms = match rng.gen_range(0..10) {
            0..=1 => None,
            2..=4 => Some(rng.gen_range(200..1_000)),
            _ => Some(rng.gen_range(1_000..10_000)),
        };
        let lossy = rng.gen_bool(0.7);
        let faults = Faults {
            request_drop: if lossy { rng.gen_range(0.0..0.05) } else { 0.0 },
            reply_drop: if lossy { rng.gen_range(0.0..0.05) } else { 0.0 },
            peer_drop: if lossy { rng.gen_range(0.0..0.2) } else { 0.0 },
            peer_duplicate: if lossy { rng.gen_range(0.0..0.1) } else { 0.0 },
            peer_delay_ms_max: rng.gen_range(0..8),
            peer_late: if lossy { rng.gen_range(0.0..0.05) } else { 0.0 },
            peer_late_ms_max: rng.gen_range(10..2_000),
            client_delay_ms_max: rng.gen_range(0..4),
            fsync_ms_max: rng.gen_range(0..12),
            crash_every_ms,
            crash_keeps_prefix: rng.gen_bool(0.6),
            crash_tears: rng.gen_bool(0.6),
            down_ms_max: rng.gen_range(0..500),
            fsync_fail: None,
            failed_restart_ms_max: 0,
            flip_unsynced: None,
            flip_durable: None,
        };
        let mut params = Params {
            shards,
            config,
            skus,
            locations_max: rng.gen_range(1..=3),
            checkout_clients: rng.gen_range(2..32),
            cart_lines_max: rng.gen_range(1..=5),
            ttl_ms: (ttl_min, ttl_min + rng.gen_range(10..3_000)),
            client_timeout_ms: rng.gen_range(50..600),
            attempts_max: rng.gen_range(3..30),
            think_ms_max: rng.gen_range(1..400),
            faults,
        };
        // Drawn last, so that adding these faults changed no other parameter of a seed.
        params.draw_disk_faults(rng);
        params
    }

    /// Draws the disk's failures and bit flips: a third of the seeds fail fsyncs (some
    /// of them often), half flip bits in torn writes, a fifth corrupt synced bytes (at a
    /// few restarts); the other seeds never do.
    fn draw_disk_faults(&mut self, rng: &mut ChaCha8Rng) {
        let faults = &mut self.faults;
        faults.fsync_fail = match rng.gen_range(0..6) {
            0 => Some(rng.gen_range(0.000_1..0.002)),
            1 => Some(rng.gen_range(0.002..0.02)),
            _ => None,
        };
        faults.failed_restart_ms_max = rng.gen_range(10..3_000);
        faults.flip_unsynced = if rng.gen_bool(0.5) { Some(rng.gen_range(0.1..1.0)) } else { None };
        faults.flip_durable = if rng.gen_bool(0.2) { Some(rng.gen_range(0.01..0.2)) } else { None };
    }
}
