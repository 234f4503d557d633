//! A minimal synchronous driver for tests: every WAL byte is durable as soon as it is
//! appended (kept in `log`), peer messages are delivered in order, replies are collected.

#![allow(dead_code, missing_docs)]

use stockplane_engine::{home_for, shard_for, Origin, PeerMessage, Reply, Shard, ShardConfig, ShardId, Tick};
use stockplane_wire::{CartLine, HoldId, Op, Request, Role, Status};

pub const CHECKOUT: Origin = Origin { client: 7, role: Role::Checkout };
pub const CONTROL: Origin = Origin { client: 9, role: Role::Control };

/// Shards with their durable logs, a clock, and the messages in flight between them.
pub struct Cluster {
    pub shards: Vec<Shard>,
    pub configs: Vec<ShardConfig>,
    pub logs: Vec<Vec<u8>>,
    pub now: Tick,
    pub in_flight: Vec<(ShardId, ShardId, PeerMessage)>,
    /// When false, peer messages stay in `in_flight` until `deliver` is called.
    pub auto_deliver: bool,
    next_request: u64,
}

impl Cluster {
    pub fn new(shards: u32, tune: impl Fn(&mut ShardConfig)) -> Cluster {
        let configs: Vec<ShardConfig> = (0..shards)
            .map(|i| {
                let mut config = ShardConfig::new(i, shards);
                config.skus_max = 1_000;
                config.sku_locations_max = 2_000;
                config.holds_max = 1_000;
                config.holds_finished_max = 1_000;
                config.hold_extra_lines_max = 4_000;
                config.carts_max = 1_000;
                config.carts_finished_max = 500;
                tune(&mut config);
                config
            })
            .collect();
        let now = 1_000_000;
        Cluster {
            shards: configs.iter().map(|c| Shard::new(c, now).expect("valid config")).collect(),
            logs: vec![Vec::new(); shards as usize],
            configs,
            now,
            in_flight: Vec::new(),
            auto_deliver: true,
            next_request: 1,
        }
    }

    /// Drains every shard's outputs (WAL made durable at once) until nothing moves.
    pub fn pump(&mut self) -> Vec<Reply> {
        let mut replies = Vec::new();
        let mut buffer = Vec::new();
        loop {
            let mut progress = false;
            for index in 0..self.shards.len() {
                let shard = &mut self.shards[index];
                if let Some(position) = shard.poll_wal_append(&mut buffer) {
                    self.logs[index].extend_from_slice(&buffer);
                    shard.handle_durable(position);
                    progress = true;
                }
                while let Some(reply) = shard.poll_reply() {
                    replies.push(reply);
                    progress = true;
                }
                while let Some((to, message)) = shard.poll_peer() {
                    self.in_flight.push((index as ShardId, to, message));
                    progress = true;
                }
            }
            if self.auto_deliver && !self.in_flight.is_empty() {
                self.deliver_all();
                progress = true;
            }
            if !progress {
                return replies;
            }
        }
    }

    pub fn deliver_all(&mut self) {
        let messages = std::mem::take(&mut self.in_flight);
        for (from, to, message) in messages {
            self.shards[to as usize].handle_peer(self.now, from, message);
        }
    }

    /// Sends `op` to the shard that owns it and returns its reply.
    pub fn call(&mut self, origin: Origin, op: Op) -> Reply {
        let id = self.next_request;
        self.next_request += 1;
        let shards = self.shards.len() as u32;
        let target = match &op {
            Op::Reserve { hold, .. } | Op::Commit { hold, .. } | Op::Release { hold } | Op::Extend { hold, .. } => {
                home_for(*hold, shards)
            }
            Op::QueryHolds { of: stockplane_wire::HoldsOf::Hold(hold) } => home_for(*hold, shards),
            Op::QueryHolds { of: stockplane_wire::HoldsOf::Sku(sku) } => shard_for(*sku, shards),
            Op::QueryStock { items } => items.first().map_or(0, |item| shard_for(item.sku, shards)),
            Op::UpsertSku { sku, .. } | Op::Adjust { sku, .. } => shard_for(*sku, shards),
            Op::Journal { .. } => 0,
        };
        let now = self.now;
        self.shards[target as usize].handle_owned(now, origin, &Request { id, op });
        let replies = self.pump();
        replies.into_iter().find(|r| r.request_id == id).unwrap_or_else(|| panic!("no reply to request {id}"))
    }

    pub fn status(&mut self, origin: Origin, op: Op) -> Status {
        self.call(origin, op).status
    }

    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        for shard in &mut self.shards {
            shard.handle_timeout(now);
        }
        self.pump();
    }

    /// Creates `sku` at `location` with `on_hand` units.
    pub fn stock(&mut self, sku: u64, location: u32, on_hand: i64, backorder_limit: u32) {
        let status = self.status(CONTROL, Op::UpsertSku { sku, location, backorder_limit });
        assert_eq!(status, Status::Ok);
        if on_hand != 0 {
            let adjustment = (u128::from(sku) << 32) | u128::from(location) | (1 << 100);
            let status = self.status(CONTROL, Op::Adjust { adjustment, sku, location, delta: on_hand });
            assert_eq!(status, Status::Ok);
        }
    }

    /// (on_hand, held) of `sku` at `location`, read from the owning shard.
    pub fn level(&self, sku: u64, location: u32) -> (i64, i64) {
        let shard = &self.shards[shard_for(sku, self.shards.len() as u32) as usize];
        let level = shard.stock_levels().find(|l| l.sku == sku && l.location == location).expect("row exists");
        (level.on_hand, level.held)
    }

    pub fn check(&self) {
        for shard in &self.shards {
            shard.check_invariants();
        }
    }

    /// Rebuilds shard `index` from its durable log, as after kill -9.
    pub fn crash(&mut self, index: usize) {
        let (shard, valid) = Shard::recover(&self.configs[index], self.now, &self.logs[index]).expect("recovers");
        assert_eq!(valid, self.logs[index].len());
        self.shards[index] = shard;
        self.in_flight.retain(|(_, to, _)| *to as usize != index);
    }
}

pub fn reserve(hold: u128, ttl_ms: u32, lines: &[(u64, Option<u32>, u32)]) -> Op {
    Op::Reserve {
        hold: HoldId(hold),
        ttl_ms,
        lines: lines.iter().map(|&(sku, location, qty)| CartLine { sku, location, qty }).collect(),
    }
}

pub fn commit(hold: u128) -> Op {
    Op::Commit { hold: HoldId(hold), lines: None }
}

pub fn release(hold: u128) -> Op {
    Op::Release { hold: HoldId(hold) }
}

/// A hold id whose home is `shard` among `shards`.
pub fn hold_homed_at(shard: u32, shards: u32, seed: u128) -> u128 {
    (seed << 16..).find(|id| home_for(HoldId(*id), shards) == shard).expect("some id is homed there")
}

/// A SKU owned by `shard` among `shards`.
pub fn sku_owned_by(shard: u32, shards: u32, seed: u64) -> u64 {
    (seed << 16..).find(|sku| shard_for(*sku, shards) == shard).expect("some sku is owned there")
}
