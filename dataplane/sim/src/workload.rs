//! The simulated clients: checkout services that reserve, commit, release, extend and
//! query carts, and one control client that builds the catalog, adjusts stock and
//! drains the journal, as the control plane would.
//!
//! Each client has at most one request outstanding. It retries a request, with the same
//! ids, when no answer comes in time (the request or its answer was lost, or the shard
//! crashed) and when the answer is `Busy`; it gives up after a bounded number of
//! attempts. Every answer, including late answers to earlier attempts, is checked
//! against what the client heard before about the same hold: a hold once acknowledged
//! as sold is never heard of as given back, and the reverse.
//!
//! The clients must not look into a shard: they learn only from answers. (The journal
//! check compares answers with the simulator's durable model, which is not the shard.)

use rand::seq::SliceRandom;
use rand::Rng;
use stockplane_engine::{home_for, shard_for, Origin, Reply, ShardId};
use stockplane_wire::{Body, CartLine, HoldId, HoldsOf, JournalChange, Op, Request, Role, SkuAt, Status};

use crate::model::ModelChange;
use crate::queue::Event;
use crate::sim::{violation, HoldTrack, Sim};

/// What a request asked, remembered by request id for checking its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Reserve a cart.
    Reserve,
    /// Commit a hold.
    Commit,
    /// Release a hold.
    Release,
    /// Extend a hold.
    Extend,
    /// Read stock.
    QueryStock,
    /// Read a hold.
    QueryHold,
    /// Create a SKU-location or change its backorder limit.
    Upsert,
    /// Change stock.
    Adjust,
    /// Read the journal.
    Journal,
}

/// A request as sent, for the checks of its answers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SentOp {
    pub(crate) kind: OpKind,
    pub(crate) hold: u128,
    pub(crate) adjustment: u128,
    pub(crate) sku: u64,
    pub(crate) location: u32,
}

struct Pending {
    request: Request,
    shard: ShardId,
    attempts: u32,
}

struct ClientCart {
    hold: u128,
    lines: Vec<CartLine>,
    ttl_ms: u32,
    reserved: bool,
}

/// One simulated client connection.
pub(crate) struct Client {
    conn: u64,
    pub(crate) role: Role,
    token: u64,
    pending: Option<Pending>,
    cart: Option<ClientCart>,
    /// Every request sent, by request id minus one.
    pub(crate) sent: Vec<SentOp>,
    setup: usize,
    setup_adjusted: bool,
    /// Per shard: the journal position the control client reads next.
    pub(crate) journal_from: Vec<u64>,
    last_adjust: Option<(Request, ShardId)>,
}

impl Client {
    /// Who the client is, for the shard.
    pub(crate) fn origin(&self) -> Origin {
        Origin { client: self.conn, role: self.role }
    }

    /// A journal read from `from`, registered as sent.
    pub(crate) fn journal_request(&mut self, shard: u32, from: u64, max_entries: u32) -> Request {
        let id = self.register(SentOp { kind: OpKind::Journal, hold: 0, adjustment: 0, sku: 0, location: 0 });
        Request { id, op: Op::Journal { shard, from, max_entries } }
    }

    fn register(&mut self, op: SentOp) -> u64 {
        self.sent.push(op);
        self.sent.len() as u64
    }
}

impl Sim {
    /// Creates the clients and wakes each for the first time.
    pub(crate) fn clients_start(&mut self) {
        let shards = self.params.shards as usize;
        let count = self.params.checkout_clients + 1;
        for index in 0..count {
            let role = if index + 1 == count { Role::Control } else { Role::Checkout };
            self.clients.push(Client {
                conn: index as u64 + 1,
                role,
                token: 0,
                pending: None,
                cart: None,
                sent: Vec::new(),
                setup: 0,
                setup_adjusted: false,
                journal_from: vec![1; shards],
                last_adjust: None,
            });
            let at =
                if role == Role::Control { 0 } else { self.rng.gen_range(0..(self.catalog.len() as u64 * 3 + 50)) };
            self.client_sleep(index, at);
        }
    }

    fn client_sleep(&mut self, client: usize, delay_ms: u64) {
        let c = &mut self.clients[client];
        c.token += 1;
        let token = c.token;
        self.agenda.push(self.now + delay_ms, Event::Wake { client, token });
    }

    pub(crate) fn client_wake(&mut self, client: usize, token: u64) {
        if self.clients[client].token != token {
            return;
        }
        if self.clients[client].pending.is_some() {
            return self.client_retry(client);
        }
        if self.draining {
            return;
        }
        match self.clients[client].role {
            Role::Control => self.control_next(client),
            Role::Checkout => self.checkout_next(client),
        }
    }

    fn client_send(&mut self, client: usize, shard: ShardId, op: Op, sent: SentOp) {
        let id = self.clients[client].register(sent);
        let request = Request { id, op };
        self.clients[client].pending = Some(Pending { request, shard, attempts: 0 });
        self.client_transmit(client);
    }

    fn client_transmit(&mut self, client: usize) {
        self.count_op();
        let pending = self.clients[client].pending.as_mut().expect("pending");
        pending.attempts += 1;
        let (request, shard) = (pending.request.clone(), pending.shard);
        self.trace_request(client, &request);
        if !self.rng.gen_bool(self.faults.request_drop) {
            let delay = self.rng.gen_range(0..=self.faults.client_delay_ms_max);
            self.agenda.push(self.now + delay, Event::Request { shard, client, request });
        }
        let timeout = self.params.client_timeout_ms;
        self.client_sleep(client, timeout);
    }

    fn trace_request(&self, client: usize, request: &Request) {
        let op = self.clients[client].sent[(request.id - 1) as usize];
        if self.is_traced(op.hold) {
            println!("t={} client {client} sends {:?}", self.now, request.op);
        }
    }

    fn client_retry(&mut self, client: usize) {
        let attempts = self.clients[client].pending.as_ref().expect("pending").attempts;
        if attempts >= self.params.attempts_max {
            // Give up: an abandoned cart's hold will expire on its own.
            self.clients[client].pending = None;
            self.clients[client].cart = None;
            if self.clients[client].role == Role::Control {
                self.control_setup_advance(client);
            }
            return self.client_think(client);
        }
        self.client_transmit(client);
    }

    fn client_think(&mut self, client: usize) {
        let max = match self.clients[client].role {
            Role::Control => 20,
            Role::Checkout => self.params.think_ms_max,
        };
        let delay = self.rng.gen_range(0..=max);
        self.client_sleep(client, delay);
    }

    fn client_backoff(&mut self, client: usize) {
        let delay = self.rng.gen_range(1..=20);
        self.client_sleep(client, delay);
    }

    // ------------------------------------------------------------------ answers

    pub(crate) fn client_reply(&mut self, client: usize, reply: Reply) {
        let op = self.clients[client].sent[(reply.request_id - 1) as usize];
        self.note_status(reply.status);
        self.client_track(op, &reply);
        let current = self.clients[client].pending.as_ref().is_some_and(|p| p.request.id == reply.request_id);
        if !current {
            return;
        }
        if matches!(reply.status, Status::Busy | Status::RateLimited | Status::Unavailable) {
            return self.client_backoff(client);
        }
        let shard = self.clients[client].pending.as_ref().expect("pending").shard;
        let journal_from = match &self.clients[client].pending.as_ref().expect("pending").request.op {
            Op::Journal { from, .. } => *from,
            _ => 0,
        };
        self.clients[client].pending = None;
        match (op.kind, reply.status) {
            (OpKind::Reserve, Status::Reserved) => {
                if let Some(cart) = self.clients[client].cart.as_mut() {
                    cart.reserved = true;
                }
            }
            (OpKind::Reserve, _) => self.clients[client].cart = None,
            (OpKind::Commit, Status::Timeout) => {
                // The commit attempt timed out and the cart is still held: the next
                // wake commits the same lines again.
            }
            (OpKind::Commit, Status::InvalidArgument) => {
                violation!(self, "a commit of valid lines of {:#x} is refused as invalid", op.hold)
            }
            (OpKind::Commit | OpKind::Release, _) => self.clients[client].cart = None,
            (OpKind::Extend, Status::Extended | Status::Timeout) => {}
            (OpKind::Extend, _) => self.clients[client].cart = None,
            (OpKind::QueryStock, _) => self.client_check_levels(&reply),
            (OpKind::Journal, Status::Ok) => self.client_reply_journal(shard, journal_from, &reply),
            (OpKind::Journal, Status::JournalTruncated) => {
                self.books_complete[shard as usize] = false;
                self.clients[client].journal_from[shard as usize] =
                    self.nodes[shard as usize].durable.journal.len() as u64 + 1;
            }
            (OpKind::Upsert | OpKind::Adjust, _) if self.clients[client].role == Role::Control => {
                self.control_setup_advance(client)
            }
            (OpKind::Adjust, status) if status != Status::Forbidden => {
                violation!(self, "a checkout client's adjustment is answered {status:?}, not Forbidden");
            }
            _ => {}
        }
        self.client_think(client);
    }

    /// Follows what the clients heard about each hold; contradictions are violations.
    fn client_track(&mut self, op: SentOp, reply: &Reply) {
        let hold = op.hold;
        if !matches!(op.kind, OpKind::Reserve | OpKind::Commit | OpKind::Release | OpKind::Extend) {
            return;
        }
        let Some(track) = self.holds.get_mut(&hold) else { return };
        let sold = matches!(
            (op.kind, reply.status),
            (OpKind::Commit, Status::Committed) | (OpKind::Release | OpKind::Extend, Status::AlreadyCommitted)
        );
        let given_back = matches!(
            (op.kind, reply.status),
            (OpKind::Release, Status::Released)
                | (OpKind::Commit | OpKind::Extend, Status::AlreadyReleased)
                | (OpKind::Commit | OpKind::Release | OpKind::Extend, Status::HoldExpired)
        );
        if sold {
            if track.commit_lines.is_none() {
                violation!(self, "hold {hold:#x} is reported sold ({:?}) but no commit was sent", reply.status);
            }
            if track.given_back {
                violation!(self, "hold {hold:#x} is reported sold after it was reported given back");
            }
            track.committed = true;
        }
        if given_back {
            if track.committed {
                violation!(self, "hold {hold:#x} is reported {:?} after it was reported sold", reply.status);
            }
            track.given_back = true;
        }
    }

    fn client_check_levels(&self, reply: &Reply) {
        if let Body::Stock(levels) = &reply.body {
            for level in levels {
                if level.available != level.on_hand - level.held
                    || level.held < 0
                    || level.available < -i64::from(level.backorder_limit)
                {
                    violation!(self, "a stock query reports {level:?}");
                }
            }
        }
    }

    /// Checks a journal answer against the shard's durable records and books it.
    pub(crate) fn client_reply_journal(&mut self, shard: ShardId, from: u64, reply: &Reply) {
        let control = self.clients.len() - 1;
        if self.clients[control].journal_from[shard as usize] != from {
            return; // An answer to an earlier read, already booked.
        }
        let Body::Journal { entries, next, .. } = &reply.body else {
            violation!(self, "a journal read is answered Ok without entries")
        };
        let journal = &self.nodes[shard as usize].durable.journal;
        for (offset, entry) in entries.iter().enumerate() {
            let position = from + offset as u64;
            if entry.position != position {
                violation!(self, "shard {shard}: journal entry at {} where {position} was due", entry.position);
            }
            let Some(&(sku, location, change)) = journal.get(position as usize - 1) else {
                violation!(self, "shard {shard}: journal entry {position} is not durable")
            };
            let same = (sku, location) == (entry.sku, entry.location)
                && match (change, entry.change) {
                    (ModelChange::Sale { hold, qty }, JournalChange::Sale { hold: h, qty: q, .. }) => {
                        hold == h.0 && qty == q
                    }
                    (
                        ModelChange::Adjustment { adjustment, delta },
                        JournalChange::Adjustment { adjustment: a, delta: d },
                    ) => adjustment == a && delta == d,
                    _ => false,
                };
            if !same {
                violation!(
                    self,
                    "shard {shard}: journal entry {entry:?} but the records say {:?}",
                    (sku, location, change)
                );
            }
            let units = match entry.change {
                JournalChange::Sale { qty, .. } => -i64::from(qty),
                JournalChange::Adjustment { delta, .. } => delta,
            };
            *self.books[shard as usize].entry((entry.sku, entry.location)).or_default() += units;
        }
        if *next != from + entries.len() as u64 {
            violation!(
                self,
                "shard {shard}: journal read from {from} returns {} entries and next {next}",
                entries.len()
            );
        }
        self.summary.journal_entries += entries.len() as u64;
        self.clients[control].journal_from[shard as usize] = *next;
    }

    // ------------------------------------------------------------------ checkout

    fn checkout_next(&mut self, client: usize) {
        let shards = self.params.shards;
        if let Some(cart) = self.clients[client].cart.as_ref() {
            if cart.reserved {
                let hold = cart.hold;
                let lines = cart.lines.clone();
                let ttl_ms = cart.ttl_ms;
                let home = home_for(HoldId(hold), shards);
                let sent = SentOp { kind: OpKind::Commit, hold, adjustment: 0, sku: 0, location: 0 };
                let committing = self.holds.get(&hold).is_some_and(|t| t.commit_lines.is_some());
                let roll = if committing { 0 } else { self.rng.gen_range(0..100) };
                match roll {
                    0..=69 => {
                        let named: Vec<usize> = if committing {
                            self.holds[&hold].commit_lines.clone().expect("committing")
                        } else if roll < 60 || lines.len() == 1 {
                            (0..lines.len()).collect()
                        } else {
                            let mut named: Vec<usize> = (0..lines.len()).filter(|_| self.rng.gen_bool(0.5)).collect();
                            if named.is_empty() {
                                named.push(self.rng.gen_range(0..lines.len()));
                            }
                            named
                        };
                        let subset = (named.len() < lines.len()).then(|| {
                            named.iter().map(|&i| SkuAt { sku: lines[i].sku, location: lines[i].location }).collect()
                        });
                        self.holds.get_mut(&hold).expect("tracked").commit_lines = Some(named);
                        self.client_send(client, home, Op::Commit { hold: HoldId(hold), lines: subset }, sent);
                    }
                    70..=79 => {
                        let sent = SentOp { kind: OpKind::Release, ..sent };
                        self.client_send(client, home, Op::Release { hold: HoldId(hold) }, sent);
                    }
                    80..=87 => {
                        let sent = SentOp { kind: OpKind::Extend, ..sent };
                        self.client_send(client, home, Op::Extend { hold: HoldId(hold), ttl_ms }, sent);
                    }
                    88..=92 => {
                        let sent = SentOp { kind: OpKind::QueryHold, ..sent };
                        self.client_send(client, home, Op::QueryHolds { of: HoldsOf::Hold(HoldId(hold)) }, sent);
                    }
                    _ => {
                        // Walk away: the hold expires on its own.
                        self.clients[client].cart = None;
                        self.client_think(client);
                    }
                }
                return;
            }
        }
        match self.rng.gen_range(0..100) {
            0..=6 => self.checkout_query_stock(client),
            7 => {
                let &(sku, location, ..) = self.catalog.choose(&mut self.rng).expect("catalog");
                let adjustment = self.rng.gen();
                let sent = SentOp { kind: OpKind::Adjust, hold: 0, adjustment, sku, location };
                let op = Op::Adjust { adjustment, sku, location, delta: 1 };
                self.client_send(client, shard_for(sku, shards), op, sent);
            }
            _ => self.checkout_reserve(client),
        }
    }

    fn checkout_query_stock(&mut self, client: usize) {
        let shards = self.params.shards;
        let &(sku, ..) = self.catalog.choose(&mut self.rng).expect("catalog");
        let shard = shard_for(sku, shards);
        let mut items = vec![SkuAt { sku, location: None }];
        for _ in 0..self.rng.gen_range(0..4) {
            let &(other, location, ..) = self.catalog.choose(&mut self.rng).expect("catalog");
            if shard_for(other, shards) == shard {
                items.push(SkuAt { sku: other, location: Some(location) });
            }
        }
        let sent = SentOp { kind: OpKind::QueryStock, hold: 0, adjustment: 0, sku, location: 0 };
        self.client_send(client, shard, Op::QueryStock { items }, sent);
    }

    fn checkout_reserve(&mut self, client: usize) {
        let count = self.rng.gen_range(1..=self.params.cart_lines_max);
        let mut lines: Vec<CartLine> = Vec::new();
        for _ in 0..count {
            let &(sku, location, ..) = self.catalog.choose(&mut self.rng).expect("catalog");
            if lines.iter().any(|l| l.sku == sku) {
                continue;
            }
            let location = match self.rng.gen_range(0..100) {
                0..=44 => Some(location),
                45 => Some(9),
                _ => None,
            };
            let qty = if self.rng.gen_bool(0.01) { self.params.config.qty_max + 1 } else { self.rng.gen_range(1..=4) };
            lines.push(CartLine { sku, location, qty });
        }
        let (ttl_min, ttl_max) = self.params.ttl_ms;
        let ttl_ms = if self.rng.gen_bool(0.01) { 1 } else { self.rng.gen_range(ttl_min..=ttl_max) };
        let hold: u128 = self.rng.gen();
        let track = HoldTrack {
            lines: lines.iter().map(|l| (l.sku, l.location.unwrap_or(u32::MAX), l.qty)).collect(),
            ..HoldTrack::default()
        };
        self.holds.insert(hold, track);
        self.clients[client].cart = Some(ClientCart { hold, lines: lines.clone(), ttl_ms, reserved: false });
        let home = home_for(HoldId(hold), self.params.shards);
        let sent = SentOp { kind: OpKind::Reserve, hold, adjustment: 0, sku: 0, location: 0 };
        self.client_send(client, home, Op::Reserve { hold: HoldId(hold), ttl_ms, lines }, sent);
    }

    // ------------------------------------------------------------------ control

    fn control_setup_advance(&mut self, client: usize) {
        let c = &mut self.clients[client];
        if c.setup >= self.catalog.len() {
            return;
        }
        if c.setup_adjusted || self.catalog[c.setup].3 == 0 {
            c.setup += 1;
            c.setup_adjusted = false;
        } else {
            c.setup_adjusted = true;
        }
    }

    fn control_next(&mut self, client: usize) {
        let shards = self.params.shards;
        let setup = self.clients[client].setup;
        if setup < self.catalog.len() {
            let (sku, location, backorder_limit, initial) = self.catalog[setup];
            let shard = shard_for(sku, shards);
            if !self.clients[client].setup_adjusted {
                let sent = SentOp { kind: OpKind::Upsert, hold: 0, adjustment: 0, sku, location };
                let op = Op::UpsertSku { sku, location, backorder_limit };
                return self.client_send(client, shard, op, sent);
            }
            return self.control_adjust(client, sku, location, initial);
        }
        let &(sku, location, ..) = self.catalog.choose(&mut self.rng).expect("catalog");
        let shard = shard_for(sku, shards);
        match self.rng.gen_range(0..100) {
            0..=34 => {
                let delta = self.rng.gen_range(1..=10);
                self.control_adjust(client, sku, location, delta)
            }
            35..=44 => {
                let delta = -self.rng.gen_range(1..=3);
                self.control_adjust(client, sku, location, delta)
            }
            45..=54 => match self.clients[client].last_adjust.clone() {
                Some((request, shard)) => {
                    let Op::Adjust { adjustment, sku, location, .. } = request.op else {
                        unreachable!("an adjustment")
                    };
                    let sent = SentOp { kind: OpKind::Adjust, hold: 0, adjustment, sku, location };
                    self.client_send(client, shard, request.op, sent);
                }
                None => self.client_think(client),
            },
            55..=61 => {
                let backorder_limit = if self.rng.gen_bool(0.5) { 0 } else { self.rng.gen_range(1..5) };
                let sent = SentOp { kind: OpKind::Upsert, hold: 0, adjustment: 0, sku, location };
                self.client_send(client, shard, Op::UpsertSku { sku, location, backorder_limit }, sent);
            }
            _ => {
                let shard = self.rng.gen_range(0..shards);
                let from = self.clients[client].journal_from[shard as usize];
                let max_entries = self.rng.gen_range(1..=64);
                let request = self.clients[client].journal_request(shard, from, max_entries);
                self.clients[client].pending = Some(Pending { request, shard, attempts: 0 });
                self.client_transmit(client);
            }
        }
    }

    fn control_adjust(&mut self, client: usize, sku: u64, location: u32, delta: i64) {
        let shard = shard_for(sku, self.params.shards);
        let adjustment: u128 = self.rng.gen();
        let op = Op::Adjust { adjustment, sku, location, delta };
        self.clients[client].last_adjust = Some((Request { id: 0, op: op.clone() }, shard));
        let sent = SentOp { kind: OpKind::Adjust, hold: 0, adjustment, sku, location };
        self.client_send(client, shard, op, sent);
    }
}
