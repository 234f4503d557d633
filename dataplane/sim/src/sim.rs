//! The simulation loop: shards on a simulated clock, network and disk, driven by seeded
//! clients, with every invariant of DESIGN.md checked after every step.
//!
//! A step is one call into a shard (`handle_request`, `handle_peer`, `handle_durable`,
//! `handle_timeout`, or recovery), followed by draining its outputs in the order the
//! engine documents: WAL bytes to the disk, replies to the clients, messages to peers.
//! After each step the stepped shard is compared with its reference model (`model.rs`),
//! and each output is checked as it leaves (nothing leaves before what it promises is
//! durable). At the end of a seed the faults stop, every hold runs out, and the books
//! are closed: every cart's sales, every acknowledged answer and the journal must agree.
//!
//! # The disk's faults, and how they are modelled
//!
//! - **Lost and torn unsynced writes**: at a crash, the writes no completed fsync
//!   covered are lost, but for a random prefix (`crash_keeps_prefix`) whose next write
//!   may survive in part (`crash_tears`), possibly followed by zeros. The whole records
//!   that survived become durable; recovery must accept exactly them.
//! - **Failed fsyncs** (`fsync_fail`): the shard's disk is failed from then on, as the
//!   real driver's is after a failed write or `fdatasync`: nothing more is written and
//!   `handle_durable` is never called again in this life, so the engine never answers
//!   for what it appends. The driver layer here refuses state changes (reserve, commit,
//!   release, extend, upsert, adjust) with `Unavailable` without reaching the engine, and
//!   serves reads. Peer messages still reach the engine, as in the real driver: its
//!   votes and commit decisions wait for a durability that never comes, so they never
//!   leave, and its coordinators' carts end by timeout elsewhere. What the failed fsync
//!   covered stays unknown: it is kept with the other unsynced writes, and the restart
//!   keeps a random prefix of them (possibly torn), or none. An operator restarts the
//!   shard (its supervisor would) after up to `failed_restart_ms_max`.
//! - **Bit flips in unsynced bytes** (`flip_unsynced`): a crash may flip one bit in the
//!   bytes it kept beyond the last fsync. The CRC must catch it: recovery must keep
//!   exactly the records before the damaged one (never one beyond what was durable plus
//!   what survived intact). Where the damaged record is followed by more bytes, the
//!   engine cannot tell it from damage to synced records and refuses with `Corrupt`;
//!   as everything from there on was never synced, the operator cuts the log there
//!   (`--truncate-corrupt-tail`), which the simulation does, and counts.
//! - **Bit flips in synced bytes** (`flip_durable`, media corruption): a restart may find
//!   one bit of a synced record flipped. Recovery must refuse the log with `Corrupt`:
//!   starting (with a cut or not) would lose or alter acknowledged work silently. The
//!   simulation then restores the pristine log, as an operator would from a replica or
//!   a backup, and the seed goes on. The last synced record is never flipped: with
//!   nothing after it, its damage looks exactly like a torn last write to this log
//!   format (no redundant header or durable end marker), so recovery would cut it; that
//!   is a known limit of the format, not something the simulation checks.
//! - **Snapshots and a truncated log**: before a restart, a shard may take a snapshot (as
//!   the data plane does in the background) from its previous one and its synced records
//!   up to a random record boundary, and its log's start moves to a random boundary at or
//!   before that (segments are deleted whole). The restart then rebuilds the shard twice:
//!   from the whole log (every check above) and from the snapshot and the log after it,
//!   which must reach the same head and state hash; the second is the shard that runs on.
//!
//! The loop must not read the wall clock, iterate a randomly seeded map, or draw a
//! random number anywhere but from its seeded generators (the main one, and one of the
//! snapshots' own, seeded from the seed, so that they changed no other choice): a seed
//! replays exactly.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use stockplane_engine::wal::{self, CartOutcome, WalRecord, ANY_LOCATION};
use stockplane_engine::{Decision, PeerMessage, RecoverError, Reply, Shard, ShardConfig, ShardId, SnapshotBytes, Tick};
use stockplane_wire::{Body, Op, Status};

use crate::disk::{CrashKept, Disk};
use crate::model::{location_matches, Effect, HoldPhase, Model};
use crate::params::{Faults, Params};
use crate::queue::{Agenda, Event};
use crate::workload::{Client, OpKind};

/// What one seed ran and what happened: for the summary line and for tuning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Client requests sent, retries included: the "operations" of `--ops`.
    pub ops: u64,
    /// Calls into shards (requests, messages, durability, timeouts, recoveries).
    pub steps: u64,
    /// Simulated time at the end, in ms.
    pub sim_ms: u64,
    /// Shards in the seed.
    pub shards: u32,
    /// Crashes (power losses).
    pub crashes: u64,
    /// Crashes that left a torn write behind.
    pub torn_writes: u64,
    /// Checkpoints at which a replay of the durable bytes was compared with a live shard.
    pub replay_checks: u64,
    /// Holds and carts the clients saw committed.
    pub commits: u64,
    /// Holds and carts the clients saw released or expired.
    pub given_back: u64,
    /// Reserves answered `Reserved`.
    pub reserved: u64,
    /// Requests answered `Busy`.
    pub busy: u64,
    /// Requests answered `Timeout` (a peer did not answer in time).
    pub timeouts: u64,
    /// Messages between shards that the network dropped.
    pub peer_dropped: u64,
    /// Participant lines held again for a duplicated `Prepare` after their cart was
    /// sold (a violation: always 0 in a passing run).
    pub phantom_shares: u64,
    /// Journal entries the control client read and checked.
    pub journal_entries: u64,
    /// Whether this seed's fsyncs may fail.
    pub fsync_failing: bool,
    /// Whether this seed's crashes may flip a bit in the unsynced bytes they keep.
    pub flipping_unsynced: bool,
    /// Whether this seed's restarts may find a bit flipped in the synced bytes.
    pub flipping_durable: bool,
    /// Fsyncs that failed (each left its shard's disk failed until a restart).
    pub fsync_failures: u64,
    /// State changes a shard with a failed disk refused with `Unavailable`.
    pub unavailable: u64,
    /// Restarts of a shard with a failed disk by its operator.
    pub operator_restarts: u64,
    /// Crashes that flipped a bit in the unsynced bytes they kept.
    pub unsynced_flips: u64,
    /// Of those, recoveries that refused the damaged record (it had bytes after it) and
    /// were cut there, as an operator does with `--truncate-corrupt-tail`; the others cut
    /// it as a torn tail by themselves.
    pub unsynced_flips_refused: u64,
    /// Restarts that found a bit flipped in the synced bytes: recovery refused each, and
    /// the log was restored from a pristine copy.
    pub durable_flips: u64,
    /// Snapshots taken of a shard's synced log before a restart.
    pub snapshots: u64,
    /// Restarts that ran on the shard rebuilt from its snapshot and the log after it
    /// (each checked equal to the one rebuilt from the whole log).
    pub snapshot_restarts: u64,
}

/// A shard with its disk and its reference models.
pub(crate) struct Node {
    pub(crate) config: ShardConfig,
    pub(crate) shard: Option<Shard>,
    pub(crate) disk: Disk,
    pub(crate) epoch: u64,
    /// Every record appended (what the live shard should be).
    pub(crate) live: Model,
    /// Durable records only (what a crash keeps).
    pub(crate) durable: Model,
    /// Records a crash kept beyond the last fsync, already in `durable`: recovery must
    /// accept exactly these bytes.
    pub(crate) crash_valid: usize,
    /// What the last crash kept of the unsynced writes, for failure messages.
    pub(crate) crash_kept: Option<CrashKept>,
    /// Bytes that were synced when the last crash came (the rest of `disk.durable` is
    /// what it kept of the unsynced writes).
    pub(crate) synced_bytes: usize,
    /// The byte the last crash flipped in the unsynced bytes it kept, if it did.
    pub(crate) unsynced_flip: Option<usize>,
    /// True once an fsync failed, until the shard restarts: nothing more is written or
    /// becomes durable, and state changes are refused.
    pub(crate) failed: bool,
    /// The shard's newest snapshot and the byte of the durable log its segments start at
    /// now (the log before it counts as deleted: recovery from the snapshot never reads it).
    pub(crate) snapshot: Option<(SnapshotBytes, usize)>,
}

/// What the clients saw of one hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct HoldTrack {
    /// The lines asked for: (sku, location or `ANY_LOCATION`, qty).
    pub(crate) lines: Vec<(u64, u32, u32)>,
    /// The commit request sent, if any: the indexes of the lines it names.
    pub(crate) commit_lines: Option<Vec<usize>>,
    /// True once a client heard that the hold is sold.
    pub(crate) committed: bool,
    /// True once a client heard that the hold gave its stock back.
    pub(crate) given_back: bool,
}

/// One seeded run.
pub struct Sim {
    pub(crate) seed: u64,
    pub(crate) rng: ChaCha8Rng,
    /// Draws the snapshots a shard takes before its restarts.
    pub(crate) snapshot_rng: ChaCha8Rng,
    /// Chance that a restart is preceded by a snapshot; `None`: this seed never snapshots.
    pub(crate) snapshot_chance: Option<f64>,
    pub(crate) now: Tick,
    pub(crate) agenda: Agenda,
    pub(crate) params: Params,
    pub(crate) faults: Faults,
    pub(crate) nodes: Vec<Node>,
    pub(crate) clients: Vec<Client>,
    /// The catalog: (sku, location, backorder limit, initial stock).
    pub(crate) catalog: Vec<(u64, u32, u32, i64)>,
    pub(crate) holds: BTreeMap<u128, HoldTrack>,
    /// Participants' shares of carts that were sold: (cart, participant).
    pub(crate) shares_sold: BTreeSet<(u128, ShardId)>,
    /// The same, from durable records only.
    pub(crate) shares_sold_durable: BTreeSet<(u128, ShardId)>,
    /// Durable sales by hold: (shard, sku, location, qty).
    pub(crate) sold: BTreeMap<u128, Vec<(ShardId, u64, u32, u32)>>,
    /// Lines that coordinators durably decided to sell, by cart: (sku, location, qty).
    pub(crate) expected: BTreeMap<u128, Vec<(u64, u32, u32)>>,
    /// Journal as the control client read it: per shard, units by (sku, location).
    pub(crate) books: Vec<BTreeMap<(u64, u32), i64>>,
    /// Per shard: false once the control client missed journal entries (truncated).
    pub(crate) books_complete: Vec<bool>,
    pub(crate) draining: bool,
    pub(crate) summary: Summary,
    ops_max: u64,
    wal_buf: Vec<u8>,
    effects: Vec<Effect>,
    /// Steps until the next replay checkpoint.
    replay_in: u64,
    /// A hold whose every record, message and answer is printed (for debugging a seed).
    trace: Option<u128>,
}

/// Panics with the seed and the simulated time: an invariant is broken.
macro_rules! violation {
    ($sim:expr, $($arg:tt)*) => {
        panic!("invariant violated (seed {}, t={} ms): {}", $sim.seed, $sim.now, format!($($arg)*))
    };
}
pub(crate) use violation;

impl Sim {
    /// A simulation of `ops` client operations, every choice drawn from `seed`.
    pub fn new(seed: u64, ops: u64, shards: Option<u32>) -> Sim {
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let params = Params::draw(&mut rng, shards);
        let nodes = (0..params.shards)
            .map(|shard| {
                let config = ShardConfig { shard, ..params.config.clone() };
                let engine = match Shard::new(&config, 0) {
                    Ok(engine) => engine,
                    Err(error) => panic!("seed {seed}: drawn configuration is invalid: {error}"),
                };
                Node {
                    config,
                    shard: Some(engine),
                    disk: Disk::default(),
                    epoch: 0,
                    live: Model::new(shard, params.shards),
                    durable: Model::new(shard, params.shards),
                    crash_valid: 0,
                    crash_kept: None,
                    synced_bytes: 0,
                    unsynced_flip: None,
                    failed: false,
                    snapshot: None,
                }
            })
            .collect();
        let mut catalog = Vec::new();
        let mut sku = rng.gen_range(1..1u64 << 40);
        for _ in 0..params.skus {
            sku += rng.gen_range(1..1_000);
            for location in 1..=rng.gen_range(1..=params.locations_max) {
                let backorder_limit = if rng.gen_bool(0.15) { rng.gen_range(1..5) } else { 0 };
                catalog.push((sku, location, backorder_limit, rng.gen_range(0..40)));
            }
        }
        let shard_count = params.shards as usize;
        let faults = params.faults.clone();
        let disk_faults = Summary {
            shards: shard_count as u32,
            fsync_failing: faults.fsync_fail.is_some(),
            flipping_unsynced: faults.flip_unsynced.is_some(),
            flipping_durable: faults.flip_durable.is_some(),
            ..Summary::default()
        };
        // Snapshot choices come from a stream of their own, so that adding them changed no
        // other choice of a seed: a quarter of the seeds never snapshot.
        let mut snapshot_rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0x5a4a_b5b0_7000_0000);
        let snapshot_chance = if snapshot_rng.gen_bool(0.25) { None } else { Some(snapshot_rng.gen_range(0.3..1.0)) };
        let mut sim = Sim {
            seed,
            rng,
            snapshot_rng,
            snapshot_chance,
            now: 0,
            agenda: Agenda::default(),
            params,
            faults,
            nodes,
            clients: Vec::new(),
            catalog,
            holds: BTreeMap::new(),
            shares_sold: BTreeSet::new(),
            shares_sold_durable: BTreeSet::new(),
            sold: BTreeMap::new(),
            expected: BTreeMap::new(),
            books: vec![BTreeMap::new(); shard_count],
            books_complete: vec![true; shard_count],
            draining: false,
            summary: disk_faults,
            ops_max: ops,
            wal_buf: Vec::new(),
            effects: Vec::new(),
            replay_in: 0,
            trace: None,
        };
        sim.replay_in = sim.rng.gen_range(100..3_000);
        sim.clients_start();
        if let Some(every) = sim.faults.crash_every_ms {
            let at = sim.rng.gen_range(0..every * 2);
            let shard = sim.rng.gen_range(0..sim.params.shards);
            sim.agenda.push(at, Event::Crash { shard });
        }
        sim
    }

    /// Prints every record, message and answer about `hold` as the run goes.
    pub fn trace(&mut self, hold: u128) {
        self.trace = Some(hold);
    }

    pub(crate) fn is_traced(&self, hold: u128) -> bool {
        self.traced(hold)
    }

    fn traced(&self, hold: u128) -> bool {
        self.trace == Some(hold)
    }

    /// The parameters drawn for this seed.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Runs the seed to the end and closes the books; panics on a broken invariant.
    pub fn run(mut self) -> Summary {
        let mut idle_timeouts = 0u32;
        let mut drain_deadline = u64::MAX;
        loop {
            if !self.draining && self.summary.ops >= self.ops_max {
                self.drain_start();
                drain_deadline = self.now + 600_000;
            }
            if self.now > drain_deadline {
                self.report_stuck();
            }
            let timer = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.shard.as_ref().and_then(|s| s.poll_timeout()).map(|at| (at, i as ShardId)))
                .min();
            let event_at = self.agenda.next_at();
            let timer_first = match (timer, event_at) {
                (Some((at, _)), Some(event)) => at <= event,
                (timer, _) => timer.is_some(),
            };
            match (timer, event_at) {
                (Some((at, shard)), _) if timer_first => {
                    if at <= self.now {
                        idle_timeouts += 1;
                        if idle_timeouts > 10_000 {
                            violation!(self, "shard {shard} asks for a timeout at {at} again and again");
                        }
                    } else {
                        idle_timeouts = 0;
                    }
                    self.now = self.now.max(at);
                    let now = self.now;
                    self.step(shard, |shard| shard.handle_timeout(now));
                }
                (_, Some(_)) => {
                    idle_timeouts = 0;
                    let (at, event) = self.agenda.pop().expect("peeked");
                    self.now = self.now.max(at);
                    self.dispatch(event);
                }
                _ => break,
            }
        }
        self.close_books();
        self.summary.sim_ms = self.now;
        self.summary
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Wake { client, token } => self.client_wake(client, token),
            Event::Request { shard, client, request } => {
                let origin = self.clients[client].origin();
                let node = &self.nodes[shard as usize];
                if node.failed && node.shard.is_some() && changes_state(&request.op) {
                    // The driver refuses it without reaching the engine, as the real
                    // one does after a failed write or sync.
                    self.summary.unavailable += 1;
                    let reply = Reply {
                        client: origin.client,
                        request_id: request.id,
                        status: Status::Unavailable,
                        body: Body::Empty,
                    };
                    self.check_reply_leaving(shard, &reply);
                    self.send_reply(reply);
                    return;
                }
                let now = self.now;
                self.step(shard, |engine| engine.handle_owned(now, origin, &request));
            }
            Event::Reply { client, reply } => self.client_reply(client, reply),
            Event::Peer { to, from, message } => {
                if self.traced(message.hold().0) {
                    let down = if self.nodes[to as usize].shard.is_none() { " (down)" } else { "" };
                    println!("t={} shard {to} <- {from}{down}: {message:?}", self.now);
                }
                if self.nodes[to as usize].shard.is_none() {
                    return;
                }
                let now = self.now;
                self.step(to, |engine| engine.handle_peer(now, from, message));
            }
            Event::Fsync { shard, epoch } => self.fsync_done(shard, epoch),
            Event::Crash { shard } => self.crash(shard),
            Event::Restart { shard } => self.restart(shard),
            Event::OperatorRestart { shard, epoch } => self.operator_restart(shard, epoch),
        }
    }

    /// Calls into an up shard, then drains and checks it.
    fn step(&mut self, shard: ShardId, call: impl FnOnce(&mut Shard)) {
        let Some(engine) = self.nodes[shard as usize].shard.as_mut() else { return };
        call(engine);
        self.summary.steps += 1;
        self.drain(shard);
        self.check_shard(shard);
        self.replay_in = self.replay_in.saturating_sub(1);
        if self.replay_in == 0 {
            // A replay costs the whole log: space the checkpoints out as the log grows,
            // so that they cost about as much per step however long the seed runs.
            let records = self.nodes[shard as usize].durable.position;
            self.replay_in = self.rng.gen_range(100..3_000 + records);
            self.replay_check(shard);
        }
    }

    // ------------------------------------------------------------------ outputs

    /// Moves a shard's outputs out: WAL bytes to the disk, replies, peer messages.
    fn drain(&mut self, shard: ShardId) {
        let mut buf = std::mem::take(&mut self.wal_buf);
        let node = &mut self.nodes[shard as usize];
        let engine = node.shard.as_mut().expect("drained shards are up");
        if let Some(position) = engine.poll_wal_append(&mut buf) {
            if let Some(hold) = self.trace {
                let mut offset = 0;
                while let Ok((record, position, len)) = wal::decode(&buf[offset..]) {
                    if record_hold(&record) == Some(hold) {
                        println!("t={} shard {shard} appends #{position}: {record:?}", self.now);
                    }
                    offset += len;
                }
            }
            let mut effects = std::mem::take(&mut self.effects);
            effects.clear();
            if let Err(error) = apply_bytes(&mut node.live, &buf, &mut effects) {
                violation!(self, "shard {shard}: appended records do not fit the model: {error}");
            }
            if node.live.position != position {
                violation!(
                    self,
                    "shard {shard}: poll_wal_append says {position}, records end at {}",
                    node.live.position
                );
            }
            // After a failed fsync the driver writes nothing more (the engine goes on,
            // but what it appends never becomes durable, so it never answers for it).
            if !node.failed {
                node.disk.write(&buf, position);
            }
            for effect in &effects {
                self.check_live_effect(shard, effect);
            }
            self.effects = effects;
            self.sync_if_needed(shard);
        }
        self.wal_buf = buf;
        loop {
            let engine = self.nodes[shard as usize].shard.as_mut().expect("up");
            let Some(reply) = engine.poll_reply() else { break };
            self.check_reply_leaving(shard, &reply);
            self.send_reply(reply);
        }
        loop {
            let engine = self.nodes[shard as usize].shard.as_mut().expect("up");
            let Some((to, message)) = engine.poll_peer() else { break };
            self.check_peer_leaving(shard, to, &message);
            self.send_peer(shard, to, message);
        }
    }

    fn sync_if_needed(&mut self, shard: ShardId) {
        let node = &mut self.nodes[shard as usize];
        if !node.failed && node.disk.needs_sync() {
            node.disk.start_sync();
            let epoch = node.epoch;
            let delay = self.rng.gen_range(0..=self.faults.fsync_ms_max);
            self.agenda.push(self.now + delay, Event::Fsync { shard, epoch });
        }
    }

    fn fsync_done(&mut self, shard: ShardId, epoch: u64) {
        let node = &mut self.nodes[shard as usize];
        if node.epoch != epoch || node.shard.is_none() || !node.disk.is_syncing() {
            return;
        }
        if self.faults.fsync_fail.is_some_and(|chance| self.rng.gen_bool(chance)) {
            return self.fsync_failed(shard);
        }
        let node = &mut self.nodes[shard as usize];
        let (start, position) = node.disk.finish_sync();
        self.durable_bytes(shard, start);
        if self.nodes[shard as usize].durable.position != position {
            violation!(self, "shard {shard}: durable records end at {}", self.nodes[shard as usize].durable.position);
        }
        self.step(shard, |engine| engine.handle_durable(position));
        self.sync_if_needed(shard);
    }

    /// The fsync in flight failed: the shard's disk is failed until an operator restarts
    /// it (the real process would be restarted by its supervisor).
    fn fsync_failed(&mut self, shard: ShardId) {
        let node = &mut self.nodes[shard as usize];
        node.disk.fail_sync();
        node.failed = true;
        let epoch = node.epoch;
        self.summary.fsync_failures += 1;
        if self.trace.is_some() {
            println!("t={} shard {shard}: fsync fails", self.now);
        }
        let at = self.now + self.rng.gen_range(1..=self.faults.failed_restart_ms_max);
        self.agenda.push(at, Event::OperatorRestart { shard, epoch });
    }

    /// Applies the durable bytes from `start` on to the durable model and the ledger.
    fn durable_bytes(&mut self, shard: ShardId, start: usize) {
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let node = &mut self.nodes[shard as usize];
        if let Err(error) = apply_bytes(&mut node.durable, &node.disk.durable[start..], &mut effects) {
            violation!(self, "shard {shard}: durable records do not fit the model: {error}");
        }
        for effect in &effects {
            match *effect {
                Effect::Sale { hold, sku, location, qty } => {
                    self.sold.entry(hold).or_default().push((shard, sku, location, qty));
                }
                Effect::ShareCommitted { hold, .. } if !self.shares_sold_durable.insert((hold, shard)) => {
                    violation!(self, "shard {shard} sold its share of cart {hold:#x} twice");
                }
                Effect::CartDecided { hold, outcome: CartOutcome::Committed } => {
                    let cart = &self.nodes[shard as usize].durable.carts[&hold];
                    let lines = cart
                        .lines
                        .iter()
                        .enumerate()
                        .filter(|(index, _)| cart.mask & (1 << index) != 0)
                        .map(|(_, l)| (l.sku, l.location, l.qty));
                    self.expected.entry(hold).or_default().extend(lines);
                }
                _ => {}
            }
        }
        self.effects = effects;
    }

    fn send_reply(&mut self, reply: Reply) {
        if let Some(hold) = self.trace {
            let op = self.clients[(reply.client - 1) as usize].sent[(reply.request_id - 1) as usize];
            if op.hold == hold {
                println!("t={} answer to {:?}: {:?} {:?}", self.now, op.kind, reply.status, reply.body);
            }
        }
        if self.rng.gen_bool(self.faults.reply_drop) {
            return;
        }
        let delay = self.rng.gen_range(0..=self.faults.client_delay_ms_max);
        let client = (reply.client - 1) as usize;
        self.agenda.push(self.now + delay, Event::Reply { client, reply });
    }

    fn send_peer(&mut self, from: ShardId, to: ShardId, message: PeerMessage) {
        let dropped = self.rng.gen_bool(self.faults.peer_drop);
        if self.traced(message.hold().0) {
            println!("t={} shard {from} -> {to}{}: {message:?}", self.now, if dropped { " (lost)" } else { "" });
        }
        if dropped {
            self.summary.peer_dropped += 1;
            return;
        }
        let copies = if self.rng.gen_bool(self.faults.peer_duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.rng.gen_bool(self.faults.peer_late) {
                self.rng.gen_range(0..=self.faults.peer_late_ms_max)
            } else {
                self.rng.gen_range(0..=self.faults.peer_delay_ms_max)
            };
            self.agenda.push(self.now + delay, Event::Peer { to, from, message: message.clone() });
        }
    }

    // ------------------------------------------------------------------ crashes

    fn crash(&mut self, shard: ShardId) {
        if self.draining {
            return;
        }
        if let Some(every) = self.faults.crash_every_ms {
            let at = self.now + self.rng.gen_range(1..every * 2);
            let next = self.rng.gen_range(0..self.params.shards);
            self.agenda.push(at, Event::Crash { shard: next });
        }
        if self.nodes[shard as usize].shard.is_none() {
            return;
        }
        self.power_off(shard, self.faults.crash_keeps_prefix);
        let down = self.rng.gen_range(0..=self.faults.down_ms_max);
        self.agenda.push(self.now + down, Event::Restart { shard });
    }

    /// An operator restarts a shard whose disk failed. The writes the failed fsync
    /// covered, and any before it, may have reached the disk in part or not at all.
    fn operator_restart(&mut self, shard: ShardId, epoch: u64) {
        let node = &self.nodes[shard as usize];
        if node.epoch != epoch || node.shard.is_none() || !node.failed {
            return;
        }
        self.summary.operator_restarts += 1;
        self.power_off(shard, true);
        let down = self.rng.gen_range(0..=self.faults.down_ms_max);
        self.agenda.push(self.now + down, Event::Restart { shard });
    }

    /// Stops an up shard as a power cut does: what was never synced is gone, but for a
    /// prefix (`keep`), possibly torn, possibly with a bit flipped.
    fn power_off(&mut self, shard: ShardId, keep: bool) {
        let tear = self.faults.crash_tears;
        let flip_unsynced = self.faults.flip_unsynced;
        let node = &mut self.nodes[shard as usize];
        node.shard = None;
        node.epoch += 1;
        if self.trace.is_some() {
            println!("t={} shard {shard} crashes", self.now);
        }
        self.summary.crashes += 1;
        let (start, kept) = node.disk.crash(&mut self.rng, keep, tear);
        if kept.torn_bytes > 0 {
            self.summary.torn_writes += 1;
        }
        node.crash_kept = Some(kept);
        node.synced_bytes = start;
        node.unsynced_flip = None;
        let written = node.disk.durable.len() - start - kept.zero_bytes;
        if written > 0 && flip_unsynced.is_some_and(|chance| self.rng.gen_bool(chance)) {
            let at = start + self.rng.gen_range(0..written);
            node.disk.flip(at, self.rng.gen_range(0..8));
            node.unsynced_flip = Some(at);
            self.summary.unsynced_flips += 1;
        }
        // The whole records that survived are durable from now on; a torn one is not.
        let mut end = start;
        let bytes = &node.disk.durable;
        while end < bytes.len() {
            match wal::decode(&bytes[end..]) {
                Ok((_, _, len)) => end += len,
                Err(_) => break,
            }
        }
        node.crash_valid = end;
        let kept_bytes = node.disk.durable.split_off(end);
        self.durable_bytes(shard, start);
        self.nodes[shard as usize].disk.durable.extend_from_slice(&kept_bytes);
    }

    fn restart(&mut self, shard: ShardId) {
        if self.nodes[shard as usize].shard.is_some() {
            return;
        }
        self.restart_snapshot(shard);
        self.restart_flip_durable(shard);
        let node = &mut self.nodes[shard as usize];
        node.failed = false;
        let (mut engine, valid) = match Shard::recover(&node.config, self.now, &node.disk.durable) {
            Ok(recovered) => recovered,
            // A flipped bit in the unsynced bytes, with more bytes after its record: the
            // engine cannot tell it from damage to synced records, and refuses. What
            // follows it was never synced, so nothing acknowledged is there: the operator
            // cuts the log at it (`--truncate-corrupt-tail`).
            Err(RecoverError::Corrupt { offset, .. })
                if node.unsynced_flip.is_some() && offset == node.crash_valid && offset >= node.synced_bytes =>
            {
                self.summary.unsynced_flips_refused += 1;
                match Shard::recover(&node.config, self.now, &node.disk.durable[..offset]) {
                    Ok(recovered) => recovered,
                    Err(error) => violation!(self, "shard {shard} cannot recover after the cut at {offset}: {error}"),
                }
            }
            Err(error) => violation!(
                self,
                "shard {shard} cannot recover from its {} durable bytes ({} valid, crash kept {:?}): {error}",
                node.disk.durable.len(),
                node.crash_valid,
                node.crash_kept
            ),
        };
        if valid != node.crash_valid {
            violation!(
                self,
                "shard {shard}: recovery kept {valid} bytes, the valid records end at {}",
                node.crash_valid
            );
        }
        let position = node.durable.position;
        if engine.wal_head() != position {
            violation!(
                self,
                "shard {shard}: recovered head {} but durable records end at {position}",
                engine.wal_head()
            );
        }
        if let Some((snapshot, from)) = &node.snapshot {
            // The same restart from the snapshot and the log after it: it must rebuild the
            // same state, and it is the shard that runs on.
            let (resumed, resumed_valid) =
                match Shard::recover_from(&node.config, self.now, Some(snapshot), &node.disk.durable[*from..valid]) {
                    Ok(recovered) => recovered,
                    Err(error) => violation!(self, "shard {shard} cannot recover from its snapshot and log: {error}"),
                };
            if resumed_valid != valid - from
                || resumed.wal_head() != engine.wal_head()
                || resumed.state_hash() != engine.state_hash()
            {
                violation!(
                    self,
                    "shard {shard}: the snapshot and the log after it rebuild another state than the whole log \
                     (head {} vs {}, {resumed_valid} of {} bytes)",
                    resumed.wal_head(),
                    engine.wal_head(),
                    valid - from
                );
            }
            engine = resumed;
            self.summary.snapshot_restarts += 1;
        }
        let node = &mut self.nodes[shard as usize];
        node.disk.truncate(valid, position);
        node.live = node.durable.clone();
        // Sales of shares that the crash took back may happen again.
        self.shares_sold.retain(|&(_, s)| s != shard);
        let durable = self.shares_sold_durable.iter().filter(|&&(_, s)| s == shard).copied();
        self.shares_sold.extend(durable.collect::<Vec<_>>());
        let node = &mut self.nodes[shard as usize];
        node.shard = Some(engine);
        if self.trace.is_some() {
            println!("t={} shard {shard} restarts at position {position}", self.now);
        }
        // Holds whose time ran out while the shard was down expire at its first call.
        let now = self.now;
        self.step(shard, |engine| engine.handle_timeout(now));
    }

    /// Maybe takes a snapshot of the shard's synced log before a restart, as the data
    /// plane does in the background while a shard runs: from the previous snapshot and the
    /// records after it up to a record boundary within the synced bytes; then the log's
    /// start moves to a record boundary at or before the new snapshot's end (segments are
    /// deleted whole, and only below a snapshot).
    fn restart_snapshot(&mut self, shard: ShardId) {
        let Some(chance) = self.snapshot_chance else { return };
        if !self.snapshot_rng.gen_bool(chance) {
            return;
        }
        let node = &self.nodes[shard as usize];
        let from = node.snapshot.as_ref().map_or(0, |(_, from)| *from);
        let mut boundaries = vec![from];
        let synced = &node.disk.durable[..node.synced_bytes];
        while let Ok((_, _, len)) = wal::decode(&synced[*boundaries.last().expect("one")..]) {
            boundaries.push(boundaries.last().expect("one") + len);
        }
        let cut = self.snapshot_rng.gen_range(0..boundaries.len());
        let start = boundaries[self.snapshot_rng.gen_range(0..=cut)];
        let previous = node.snapshot.as_ref().map(|(bytes, _)| bytes.as_slice());
        let (snapshot, valid) =
            match Shard::compact(&node.config, self.now, previous, &node.disk.durable[from..boundaries[cut]]) {
                Ok(compacted) => compacted,
                Err(error) => violation!(self, "shard {shard}: a snapshot of its synced log fails: {error}"),
            };
        if valid != boundaries[cut] - from {
            violation!(self, "shard {shard}: a snapshot replayed {valid} of {} synced bytes", boundaries[cut] - from);
        }
        self.nodes[shard as usize].snapshot = Some((snapshot, start));
        self.summary.snapshots += 1;
    }

    /// Maybe flips a bit of a synced record (media corruption) before a restart, and
    /// checks that recovery refuses the log with `Corrupt` rather than applying or
    /// cutting anything; then restores the pristine log, as an operator restoring a
    /// replica or a backup would. The last synced record is spared: a damaged last
    /// record cannot be told from a torn write by this log format (see the module docs).
    fn restart_flip_durable(&mut self, shard: ShardId) {
        let Some(chance) = self.faults.flip_durable else { return };
        if !self.rng.gen_bool(chance) {
            return;
        }
        let node = &self.nodes[shard as usize];
        let last = last_record_start(&node.disk.durable[..node.synced_bytes]);
        if last == 0 {
            return;
        }
        let at = self.rng.gen_range(0..last);
        let bit = self.rng.gen_range(0..8);
        let node = &mut self.nodes[shard as usize];
        let pristine = node.disk.durable.clone();
        node.disk.flip(at, bit);
        self.summary.durable_flips += 1;
        match Shard::recover(&node.config, self.now, &node.disk.durable) {
            Err(RecoverError::Corrupt { offset, .. }) if offset <= at => {}
            Err(error) => {
                violation!(self, "shard {shard}: synced byte {at} flipped, recovery fails otherwise: {error}")
            }
            Ok((_, valid)) => violation!(
                self,
                "shard {shard}: synced byte {at} flipped (bit {bit}), recovery accepts {valid} of {} bytes",
                node.disk.durable.len()
            ),
        }
        self.nodes[shard as usize].disk.durable = pristine;
    }

    /// Replays a shard's durable bytes into a fresh shard and compares its state with the
    /// live one, when everything appended is durable.
    fn replay_check(&mut self, shard: ShardId) {
        let node = &self.nodes[shard as usize];
        let Some(engine) = node.shard.as_ref() else { return };
        if engine.durable_position() != engine.wal_head() {
            return;
        }
        self.summary.replay_checks += 1;
        let (replayed, valid) = match Shard::recover(&node.config, self.now, &node.disk.durable) {
            Ok(recovered) => recovered,
            Err(error) => violation!(self, "shard {shard}: replay of the durable bytes fails: {error}"),
        };
        if valid != node.disk.durable.len() {
            violation!(self, "shard {shard}: replay accepts {valid} of {} durable bytes", node.disk.durable.len());
        }
        if replayed.state_hash() != engine.state_hash() {
            violation!(self, "shard {shard}: replay of the durable prefix differs from the live shard");
        }
    }

    // ------------------------------------------------------------------ checks

    /// Compares a shard with its reference model and runs its own invariant checks.
    fn check_shard(&self, shard: ShardId) {
        let node = &self.nodes[shard as usize];
        let Some(engine) = node.shard.as_ref() else { return };
        engine.check_invariants();
        let model = &node.live;
        if engine.wal_head() != model.position {
            violation!(self, "shard {shard}: head {} but the model has {}", engine.wal_head(), model.position);
        }
        if engine.durable_position() > engine.wal_head() || engine.durable_position() > node.disk.durable_position {
            violation!(self, "shard {shard}: durable position {} beyond the disk", engine.durable_position());
        }
        let mut rows = 0;
        for level in engine.stock_levels() {
            rows += 1;
            let Some(row) = model.rows.get(&(level.sku, level.location)) else {
                violation!(self, "shard {shard}: row {}@{} is not in the records", level.sku, level.location)
            };
            if (row.on_hand, row.held, row.backorder_limit) != (level.on_hand, level.held, level.backorder_limit)
                || level.available != level.on_hand - level.held
            {
                violation!(self, "shard {shard}: row {level:?} but the records say {row:?}");
            }
            if level.available < -i64::from(level.backorder_limit) {
                violation!(self, "shard {shard}: oversold {level:?}");
            }
        }
        if rows != model.rows.len() {
            violation!(self, "shard {shard}: {rows} rows but the records have {}", model.rows.len());
        }
        if engine.live_holds() != model.live_holds {
            violation!(self, "shard {shard}: {} live holds, the records say {}", engine.live_holds(), model.live_holds);
        }
        let mut lines: Vec<(u128, u64, u32, u32)> = engine
            .live_hold_lines()
            .into_iter()
            .map(|(hold, sku, location, qty)| (hold.0, sku, location, qty))
            .collect();
        lines.sort_unstable();
        let mut expected = model.live_lines();
        expected.sort_unstable();
        if lines != expected {
            violation!(self, "shard {shard}: live hold lines {lines:?} but the records say {expected:?}");
        }
    }

    /// Checks what an appended record does to carts (before it is even durable): a
    /// participant sells its share only after its coordinator durably decided so, and
    /// gives it back only if the coordinator never decided to sell.
    fn check_live_effect(&mut self, shard: ShardId, effect: &Effect) {
        match *effect {
            Effect::ShareCommitted { hold, coordinator, mask } => {
                if !self.shares_sold.insert((hold, shard)) {
                    violation!(self, "shard {shard} sells its share of cart {hold:#x} again");
                }
                let Some(cart) = self.nodes[coordinator as usize].durable.carts.get(&hold) else {
                    violation!(self, "shard {shard} sold its share of cart {hold:#x}, unknown to its coordinator")
                };
                if !cart.committed {
                    violation!(self, "shard {shard} sold its share of cart {hold:#x} before the decision was durable");
                }
                let mut share = 0u64;
                for (bit, (index, _)) in cart.lines_of(shard, self.params.shards).into_iter().enumerate() {
                    if cart.mask & (1 << index) != 0 {
                        share |= 1 << bit;
                    }
                }
                if share != mask {
                    violation!(self, "shard {shard} sold mask {mask:#b} of cart {hold:#x}, decided {share:#b}");
                }
            }
            Effect::ShareKept { .. } => {}
            Effect::ShareGivenBack { hold, coordinator } => {
                if self.shares_sold.contains(&(hold, shard)) {
                    // Lines held again for a duplicated Prepare after the share was sold
                    // and forgotten: participants remember forgotten shares until their
                    // cart expires, so this must not happen.
                    self.summary.phantom_shares += 1;
                    violation!(self, "shard {shard} held its sold share of cart {hold:#x} again");
                }
                let committed = self.nodes[coordinator as usize].durable.carts.get(&hold).is_some_and(|c| c.committed);
                let live_committed =
                    self.nodes[coordinator as usize].live.carts.get(&hold).is_some_and(|c| c.committed && !c.forgotten);
                if committed || live_committed {
                    violation!(self, "shard {shard} gave back its share of cart {hold:#x}, which its coordinator sold");
                }
            }
            _ => {}
        }
    }

    /// Checks a reply as it leaves: what it acknowledges must be durable.
    fn check_reply_leaving(&self, shard: ShardId, reply: &Reply) {
        let client = &self.clients[(reply.client - 1) as usize];
        let Some(op) = client.sent.get((reply.request_id - 1) as usize) else {
            violation!(
                self,
                "shard {shard} answers request {} that client {} never sent",
                reply.request_id,
                reply.client
            )
        };
        let model = &self.nodes[shard as usize].durable;
        let hold = op.hold;
        // A cart may be forgotten (after every participant acknowledged its end) between
        // the answer's queueing and its leaving: the model keeps what it knew of it.
        let cart = model.carts.get(&hold);
        let local = model.holds.get(&hold).filter(|h| h.prepared_for.is_none());
        let durable = match (op.kind, reply.status) {
            (OpKind::Reserve, Status::Reserved) => cart.is_some_and(|c| c.reserved) || local.is_some(),
            (OpKind::Commit, Status::Committed) => {
                cart.is_some_and(|c| c.committed) || local.is_some_and(|h| h.phase == HoldPhase::Committed)
            }
            (OpKind::Release, Status::Released) => {
                cart.is_some_and(|c| c.outcome == Some(CartOutcome::Released))
                    || local.is_some_and(|h| h.phase == HoldPhase::Released)
            }
            (OpKind::Adjust, Status::Ok) => model.adjustments.contains_key(&op.adjustment),
            (OpKind::Upsert, Status::Ok) => model.rows.contains_key(&(op.sku, op.location)),
            _ => true,
        };
        if !durable {
            violation!(
                self,
                "shard {shard} answers {:?} to {:?} of {hold:#x} before its record is durable",
                reply.status,
                op.kind
            );
        }
        if reply.status == Status::WrongShard {
            violation!(self, "shard {shard} answers WrongShard to {:?}: the simulator routed it wrongly", op.kind);
        }
    }

    /// Checks a peer message as it leaves: a vote or a decision must be durable first.
    fn check_peer_leaving(&self, shard: ShardId, to: ShardId, message: &PeerMessage) {
        let model = &self.nodes[shard as usize].durable;
        match message {
            PeerMessage::Vote { hold, status: Status::Ok, .. } => {
                let prepared = model.holds.get(&hold.0).is_some_and(|h| h.prepared_for.is_some_and(|(c, _)| c == to));
                if !prepared {
                    violation!(self, "shard {shard} votes yes on cart {:#x} before its lines are durable", hold.0);
                }
            }
            PeerMessage::Decide { hold, decision: Decision::Commit { .. }, .. }
                if !model.carts.get(&hold.0).is_some_and(|c| c.committed) =>
            {
                violation!(self, "shard {shard} sends Commit for cart {:#x} before deciding durably", hold.0);
            }
            _ => {}
        }
    }

    // ------------------------------------------------------------------ the end

    fn drain_start(&mut self) {
        self.draining = true;
        self.faults = self.faults.none();
        for shard in 0..self.params.shards {
            if self.nodes[shard as usize].shard.is_none() {
                self.agenda.push(self.now, Event::Restart { shard });
            }
        }
    }

    fn report_stuck(&self) -> ! {
        let mut stuck = Vec::new();
        for (shard, node) in self.nodes.iter().enumerate() {
            if let Some(engine) = &node.shard {
                stuck.push(format!(
                    "shard {shard}: live holds {}, next timeout {:?}, head {}, durable {}",
                    engine.live_holds(),
                    engine.poll_timeout(),
                    engine.wal_head(),
                    engine.durable_position()
                ));
            }
        }
        violation!(self, "the shards do not settle after the faults stopped: {}", stuck.join("; "))
    }

    /// After the drain: nothing is held, every cart is whole, the books balance.
    fn close_books(&mut self) {
        for shard in 0..self.params.shards {
            let node = &self.nodes[shard as usize];
            let Some(engine) = node.shard.as_ref() else { violation!(self, "shard {shard} is down at the end") };
            if engine.live_holds() != 0 {
                violation!(self, "shard {shard} still holds {} holds at the end", engine.live_holds());
            }
            if let Some(level) = engine.stock_levels().find(|l| l.held != 0) {
                violation!(self, "shard {shard}: {level:?} still held at the end");
            }
            if engine.durable_position() != engine.wal_head() {
                violation!(self, "shard {shard}: WAL not durable at the end");
            }
            for (&hold, cart) in &node.durable.carts {
                if !(cart.forgotten || cart.committed || cart.given_back) {
                    violation!(self, "cart {hold:#x} of shard {shard} is still undecided ({:?})", cart.outcome);
                }
            }
            // The books: every row's stock is its adjustments minus its sales.
            let mut units: BTreeMap<(u64, u32), i64> = BTreeMap::new();
            for &(sku, location, change) in &node.durable.journal {
                let delta = match change {
                    crate::model::ModelChange::Sale { qty, .. } => -i64::from(qty),
                    crate::model::ModelChange::Adjustment { delta, .. } => delta,
                };
                *units.entry((sku, location)).or_default() += delta;
            }
            for level in engine.stock_levels() {
                let journal = units.get(&(level.sku, level.location)).copied().unwrap_or(0);
                if journal != level.on_hand {
                    violation!(self, "shard {shard}: {level:?} but its journal adds up to {journal}");
                }
            }
        }
        for shard in 0..self.params.shards {
            self.replay_check(shard);
        }
        self.close_journal_books();
        // Carts: what was sold is exactly what coordinators decided, line by line.
        let carts: BTreeMap<u128, ()> =
            self.nodes.iter().flat_map(|n| n.durable.carts.keys().map(|hold| (*hold, ()))).collect();
        for &hold in carts.keys() {
            let sold = self.sold.get(&hold).cloned().unwrap_or_default();
            let expected = self.expected.get(&hold).cloned().unwrap_or_default();
            if !same_lines(&sold, &expected) {
                violation!(self, "cart {hold:#x}: sold {sold:?} but its coordinator decided {expected:?}");
            }
        }
        // What the clients heard: a commit they heard of is sold exactly, a release
        // they heard of sold nothing.
        for (&hold, track) in &self.holds {
            let sold = self.sold.get(&hold).cloned().unwrap_or_default();
            if track.committed {
                let named = track.commit_lines.as_ref().expect("a commit was sent");
                let expected: Vec<(u64, u32, u32)> = named.iter().map(|&index| track.lines[index]).collect();
                if !same_lines(&sold, &expected) {
                    violation!(self, "hold {hold:#x} was acknowledged committed as {expected:?}, sold {sold:?}");
                }
                self.summary.commits += 1;
            } else if track.given_back {
                if !sold.is_empty() {
                    violation!(self, "hold {hold:#x} was acknowledged given back, but sold {sold:?}");
                }
                self.summary.given_back += 1;
            } else if !sold.is_empty() {
                let all: Vec<(u64, u32, u32)> = match &track.commit_lines {
                    Some(named) => named.iter().map(|&index| track.lines[index]).collect(),
                    None => violation!(self, "hold {hold:#x} sold {sold:?} but nobody asked to commit it"),
                };
                if !same_lines(&sold, &all) {
                    violation!(self, "hold {hold:#x} sold {sold:?}, a part of {all:?}");
                }
            }
        }
    }

    /// Reads every shard's journal to its end as the control plane would, and checks
    /// that the books it keeps match each row's stock.
    fn close_journal_books(&mut self) {
        for shard in 0..self.params.shards {
            let control = self.clients.len() - 1;
            loop {
                let from = self.clients[control].journal_from[shard as usize];
                let request = self.clients[control].journal_request(shard, from, self.params.config.journal_read_max);
                let origin = self.clients[control].origin();
                let now = self.now;
                self.nodes[shard as usize].shard.as_mut().expect("up").handle_owned(now, origin, &request);
                let engine = self.nodes[shard as usize].shard.as_mut().expect("up");
                let reply = engine.poll_reply().expect("a journal read answers at once when all is durable");
                let Body::Journal { entries, .. } = &reply.body else {
                    if reply.status == Status::JournalTruncated {
                        self.books_complete[shard as usize] = false;
                        break;
                    }
                    violation!(self, "shard {shard}: journal read answers {:?}", reply.status)
                };
                if entries.is_empty() {
                    break;
                }
                self.client_reply_journal(shard, from, &reply);
            }
            if !self.books_complete[shard as usize] {
                continue;
            }
            let engine = self.nodes[shard as usize].shard.as_ref().expect("up");
            for level in engine.stock_levels() {
                let books = self.books[shard as usize].get(&(level.sku, level.location)).copied().unwrap_or(0);
                if books != level.on_hand {
                    violation!(self, "shard {shard}: {level:?} but the control plane's books say {books}");
                }
            }
        }
    }

    pub(crate) fn count_op(&mut self) {
        self.summary.ops += 1;
    }

    pub(crate) fn note_status(&mut self, status: Status) {
        match status {
            Status::Busy => self.summary.busy += 1,
            Status::Timeout => self.summary.timeouts += 1,
            Status::Reserved => self.summary.reserved += 1,
            _ => {}
        }
    }
}

/// True for operations that write the WAL: what a shard with a failed disk refuses
/// (the same list as the real driver's).
fn changes_state(op: &Op) -> bool {
    !matches!(op, Op::QueryStock { .. } | Op::QueryHolds { .. } | Op::Journal { .. })
}

/// The offset of the last whole record in `bytes` (records from the start), 0 if there
/// are fewer than two.
fn last_record_start(bytes: &[u8]) -> usize {
    let (mut offset, mut last) = (0, 0);
    while let Ok((_, _, len)) = wal::decode(&bytes[offset..]) {
        last = offset;
        offset += len;
    }
    last
}

/// The hold a record is about, if any.
fn record_hold(record: &WalRecord<'_>) -> Option<u128> {
    match *record {
        WalRecord::Held { hold, .. }
        | WalRecord::Kept { hold }
        | WalRecord::Committed { hold, .. }
        | WalRecord::Released { hold }
        | WalRecord::Expired { hold }
        | WalRecord::Extended { hold, .. }
        | WalRecord::Pinned { hold, .. }
        | WalRecord::Unpinned { hold }
        | WalRecord::CartOpened { hold, .. }
        | WalRecord::CartStarted { hold, .. }
        | WalRecord::CartDecided { hold, .. }
        | WalRecord::CartForgotten { hold } => Some(hold),
        WalRecord::SkuUpserted { .. } | WalRecord::Adjusted { .. } => None,
    }
}

/// Decodes records from `bytes` and applies them to `model`.
fn apply_bytes(model: &mut Model, bytes: &[u8], effects: &mut Vec<Effect>) -> Result<(), String> {
    let mut offset = 0;
    while offset < bytes.len() {
        let (record, position, len): (WalRecord<'_>, u64, usize) =
            wal::decode(&bytes[offset..]).map_err(|e| format!("undecodable record at byte {offset}: {e}"))?;
        model.apply(position, &record, effects)?;
        offset += len;
    }
    Ok(())
}

/// True when two lists of lines are the same multiset of (sku, qty), and every sale's
/// location matches the location asked for (`ANY_LOCATION`: any).
fn same_lines(sold: &[(ShardId, u64, u32, u32)], asked: &[(u64, u32, u32)]) -> bool {
    if sold.len() != asked.len() {
        return false;
    }
    let mut used = vec![false; sold.len()];
    for &(sku, location, qty) in asked {
        let found = sold.iter().enumerate().position(|(i, &(_, s, l, q))| {
            !used[i] && s == sku && q == qty && (location == ANY_LOCATION || location_matches(location, l))
        });
        match found {
            Some(i) => used[i] = true,
            None => return false,
        }
    }
    true
}
