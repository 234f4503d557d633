//! The coordinator's side of cross-shard carts: two-phase reserve, commit and extend.
//!
//! A cart whose lines live on more than one shard (or on a shard other than its home) is
//! coordinated by its home shard (`home_for(hold)`). Each phase is a transaction with a
//! number logged before any message about it leaves (messages wait for durability like
//! replies), so numbers are never reused across crashes. The coordinator:
//! - reserve: `CartOpened`, then `Prepare` to every participant; all yes: `Reserved` and
//!   `Keep`; any no or timeout: `ReserveFailed` and `Abort`;
//! - commit: `CartStarted(Commit)`, then `Pin`; all yes: `Committed` and `Commit`; a
//!   participant whose lines expired says no: `CommitFailed`, the whole cart expires and
//!   every participant hears `Release`; a timeout: `CommitTimedOut` and `Unpin`;
//! - extend: `CartStarted(Extend)`, then `Extend`; all yes: `Extended`; any no: the cart
//!   expires; a timeout keeps the old expiry.
//!
//! Decisions are pushed to participants until each acknowledges (the ack leaves the
//! participant only once the decision is durable there), and after a restart every
//! decided cart pushes again, so a participant never needs to ask: this is the
//! coordinator-driven form of DESIGN.md's "participants ask for the decision". A vote
//! for a transaction this coordinator has moved past is answered with that
//! transaction's outcome, and a vote for a cart it does not know with `Release`: a
//! decision it never recorded is an abort. A finished cart is forgotten (logged) only
//! after every participant acknowledged its last decision.

use stockplane_wire::{Body, HeldLine, HoldId, HoldInfo, HoldState, Status};

use crate::peer::{Decision, PeerLine, PeerMessage};
use crate::route::{shard_for, ShardId};
use crate::shard::{commit_mask, ApplyResult, Origin, Shard};
use crate::wal::{CartOutcome, CartPhase, WalLine, WalRecord, ANY_LOCATION};
use crate::Tick;

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
enum CartState {
    Preparing,
    Reserved,
    Committing,
    Extending,
    /// Over: committed, released, expired, or never reserved (`ReserveFailed`).
    Finished(HoldState),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
enum Push {
    Keep,
    Abort,
    Commit,
    Unpin,
    Release,
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Participant {
    shard: ShardId,
    vote: Option<Status>,
    acked: bool,
}

/// A cart this shard coordinates.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct Cart {
    fingerprint: u32,
    expires_at: Tick,
    lines: Vec<WalLine>,
    participants: Vec<Participant>,
    reserve_txn: u64,
    txn: u64,
    state: CartState,
    reserve_failed: bool,
    mask: u64,
    new_expires_at: Tick,
    /// The decision to push to participants until each acknowledges it, and its txn.
    push: Option<(Push, u64)>,
    waiters: Vec<(u64, u64)>,
    phase_deadline: Tick,
    deadline: Option<Tick>,
}

impl Cart {
    pub(crate) fn info(&self, hold: u128) -> HoldInfo {
        let state = match self.state {
            CartState::Finished(state) => state,
            _ => HoldState::Held,
        };
        HoldInfo {
            hold: HoldId(hold),
            state,
            expires_at_ms: self.expires_at,
            lines: self.lines.iter().map(|l| HeldLine { sku: l.sku, location: l.location, qty: l.qty }).collect(),
        }
    }

    fn body(&self, hold: u128) -> Body {
        let mut info = self.info(hold);
        info.lines.clear();
        Body::Hold(info)
    }

    /// The durable fields, for `Shard::state_hash` (votes, acks and waiters are not).
    pub(crate) fn hash_parts(&self, parts: &mut Vec<u64>) {
        let state = match self.state {
            CartState::Preparing => 1,
            CartState::Reserved => 2,
            CartState::Committing => 3,
            CartState::Extending => 4,
            CartState::Finished(state) => 10 + state as u64,
        };
        parts.extend([
            u64::from(self.fingerprint),
            self.expires_at,
            self.reserve_txn,
            self.txn,
            state,
            u64::from(self.reserve_failed),
            self.mask,
            self.new_expires_at,
        ]);
        for line in &self.lines {
            parts.extend([line.sku, u64::from(line.location), u64::from(line.qty)]);
        }
    }

    fn lines_of(&self, shard: ShardId, shards: u32) -> impl Iterator<Item = (usize, &WalLine)> {
        self.lines.iter().enumerate().filter(move |(_, l)| shard_for(l.sku, shards) == shard)
    }

    fn all_voted_yes(&self) -> bool {
        self.participants.iter().all(|p| p.vote == Some(Status::Ok))
    }

    fn in_flight(&self) -> bool {
        matches!(self.state, CartState::Preparing | CartState::Committing | CartState::Extending)
    }
}

impl Shard {
    // ---------------------------------------------------------------- client requests

    /// Forgets cart `hold` if its reserve failed and every participant has acknowledged
    /// the abort, so that the hold id can be reserved afresh; true if it did.
    pub(crate) fn cart_forget_failed(&mut self, hold: u128) -> bool {
        let cart = &self.carts[&hold];
        if !(cart.reserve_failed && cart.push.is_none()) {
            return false;
        }
        self.log(WalRecord::CartForgotten { hold });
        true
    }

    pub(crate) fn cart_reserve_retry(&mut self, origin: Origin, id: u64, hold: u128, fingerprint: u32) {
        let cart = &self.carts[&hold];
        if cart.fingerprint != fingerprint {
            let body = cart.body(hold);
            return self.reply_after_log(origin.client, id, Status::Conflict, body);
        }
        match cart.state {
            CartState::Preparing => self.carts.get_mut(&hold).expect("cart").waiters.push((origin.client, id)),
            // The abort is still reaching participants: the id is free once they have it.
            CartState::Finished(_) if cart.reserve_failed => {
                self.reply_after_log(origin.client, id, Status::Busy, Body::Empty)
            }
            _ => {
                let body = cart.body(hold);
                self.reply_after_log(origin.client, id, Status::Reserved, body)
            }
        }
    }

    pub(crate) fn cart_open(
        &mut self,
        origin: Origin,
        id: u64,
        hold: u128,
        ttl_ms: u32,
        fingerprint: u32,
        lines: Vec<WalLine>,
    ) {
        if self.carts.len() >= self.config.carts_max as usize && !self.cart_forget_oldest() {
            return self.reply_now(origin, id, Status::Busy, Body::Empty);
        }
        let txn = self.next_txn;
        let expires_at_ms = self.now + u64::from(ttl_ms);
        self.log(WalRecord::CartOpened {
            hold,
            txn,
            fingerprint,
            expires_at_ms,
            lines: crate::wal::Lines::Slice(&lines),
        });
        let deadline = self.now + u64::from(self.config.peer_timeout_ms);
        let cart = self.carts.get_mut(&hold).expect("cart just opened");
        cart.waiters.push((origin.client, id));
        cart.phase_deadline = deadline;
        self.cart_send(hold);
    }

    pub(crate) fn cart_commit(&mut self, origin: Origin, id: u64, hold: u128, subset: Option<&[(u64, Option<u32>)]>) {
        let cart = &self.carts[&hold];
        let status = match cart.state {
            CartState::Reserved => {
                let lines: Vec<(u64, u32)> = cart.lines.iter().map(|l| (l.sku, l.location)).collect();
                match commit_mask(&lines, subset) {
                    Ok(mask) => return self.cart_start(origin, id, hold, CartPhase::Commit { mask }),
                    Err(status) => status,
                }
            }
            CartState::Committing => {
                self.carts.get_mut(&hold).expect("cart").waiters.push((origin.client, id));
                return;
            }
            CartState::Preparing | CartState::Extending => Status::Busy,
            CartState::Finished(_) if cart.reserve_failed => Status::UnknownHold,
            CartState::Finished(HoldState::Committed) => Status::Committed,
            CartState::Finished(HoldState::Released) => Status::AlreadyReleased,
            CartState::Finished(_) => Status::HoldExpired,
        };
        let body = cart.body(hold);
        self.reply_after_log(origin.client, id, status, body);
    }

    pub(crate) fn cart_extend(&mut self, origin: Origin, id: u64, hold: u128, ttl_ms: u32) {
        let cart = &self.carts[&hold];
        let status = match cart.state {
            CartState::Reserved => {
                let expires_at_ms = cart.expires_at.max(self.now + u64::from(ttl_ms));
                return self.cart_start(origin, id, hold, CartPhase::Extend { expires_at_ms });
            }
            CartState::Preparing | CartState::Committing | CartState::Extending => Status::Busy,
            CartState::Finished(_) if cart.reserve_failed => Status::UnknownHold,
            CartState::Finished(HoldState::Committed) => Status::AlreadyCommitted,
            CartState::Finished(HoldState::Released) => Status::AlreadyReleased,
            CartState::Finished(_) => Status::HoldExpired,
        };
        let body = cart.body(hold);
        self.reply_after_log(origin.client, id, status, body);
    }

    pub(crate) fn cart_release(&mut self, origin: Origin, id: u64, hold: u128) {
        let cart = &self.carts[&hold];
        let status = match cart.state {
            CartState::Reserved => {
                self.carts.get_mut(&hold).expect("cart").waiters.push((origin.client, id));
                return self.cart_decide(hold, CartOutcome::Released, Status::Released);
            }
            CartState::Preparing | CartState::Committing | CartState::Extending => Status::Busy,
            CartState::Finished(_) if cart.reserve_failed => Status::UnknownHold,
            CartState::Finished(HoldState::Committed) => Status::AlreadyCommitted,
            CartState::Finished(HoldState::Released) => Status::Released,
            CartState::Finished(_) => Status::HoldExpired,
        };
        let body = cart.body(hold);
        self.reply_after_log(origin.client, id, status, body);
    }

    fn cart_start(&mut self, origin: Origin, id: u64, hold: u128, phase: CartPhase) {
        let txn = self.next_txn;
        self.log(WalRecord::CartStarted { hold, txn, phase });
        let deadline = self.now + u64::from(self.config.peer_timeout_ms);
        let cart = self.carts.get_mut(&hold).expect("cart");
        cart.waiters.push((origin.client, id));
        cart.phase_deadline = deadline;
        self.cart_send(hold);
    }

    // ---------------------------------------------------------------- decisions

    /// Logs the outcome of the cart's current transaction, answers its waiters and pushes
    /// the decision to the participants.
    fn cart_decide(&mut self, hold: u128, outcome: CartOutcome, status: Status) {
        let fresh = matches!(outcome, CartOutcome::Released | CartOutcome::Expired);
        let txn = if fresh { self.next_txn } else { self.carts[&hold].txn };
        self.log(WalRecord::CartDecided { hold, txn, outcome, status: status.code() });
        let cart = self.carts.get_mut(&hold).expect("cart");
        let waiters = std::mem::take(&mut cart.waiters);
        let body = cart.body(hold);
        for (client, request_id) in waiters {
            self.reply_after_log(client, request_id, status, body.clone());
        }
        self.cart_send(hold);
    }

    /// Sends what the cart's participants still owe or are owed, and schedules a resend.
    fn cart_send(&mut self, hold: u128) {
        let shards = self.config.shards;
        let cart = &self.carts[&hold];
        let mut out: Vec<(ShardId, PeerMessage)> = Vec::new();
        for participant in &cart.participants {
            let shard = participant.shard;
            let message = match cart.state {
                CartState::Preparing if participant.vote.is_none() => {
                    let lines = cart
                        .lines_of(shard, shards)
                        .map(|(_, l)| PeerLine {
                            sku: l.sku,
                            location: (l.location != ANY_LOCATION).then_some(l.location),
                            qty: l.qty,
                        })
                        .collect();
                    Some(PeerMessage::Prepare {
                        hold: HoldId(hold),
                        txn: cart.txn,
                        expires_at_ms: cart.expires_at,
                        lines,
                    })
                }
                CartState::Committing if participant.vote.is_none() => {
                    Some(PeerMessage::Pin { hold: HoldId(hold), txn: cart.txn })
                }
                CartState::Extending if participant.vote.is_none() => {
                    Some(PeerMessage::Extend { hold: HoldId(hold), txn: cart.txn, expires_at_ms: cart.new_expires_at })
                }
                _ => match cart.push {
                    Some((push, txn)) if !participant.acked => Some(PeerMessage::Decide {
                        hold: HoldId(hold),
                        txn,
                        decision: decision_for(cart, push, shard, shards),
                    }),
                    _ => None,
                },
            };
            if let Some(message) = message {
                out.push((shard, message));
            }
        }
        for (shard, message) in out {
            self.send_peer(shard, message);
        }
        self.cart_schedule(hold);
    }

    /// Puts the cart's next deadline (timeout, resend or expiry) in the schedule.
    fn cart_schedule(&mut self, hold: u128) {
        let now = self.now;
        let retransmit = u64::from(self.config.peer_retransmit_ms);
        let cart = self.carts.get_mut(&hold).expect("cart");
        let unacked = cart.push.is_some() && cart.participants.iter().any(|p| !p.acked);
        let next = match cart.state {
            _ if cart.in_flight() => Some((now + retransmit).min(cart.phase_deadline)),
            CartState::Reserved if unacked => Some((now + retransmit).min(cart.expires_at)),
            CartState::Reserved => Some(cart.expires_at),
            _ if unacked => Some(now + retransmit),
            _ => None,
        };
        if let Some(old) = cart.deadline.take() {
            self.cart_deadlines.remove(&(old, hold));
        }
        cart.deadline = next;
        if let Some(at) = next {
            self.cart_deadlines.insert((at, hold));
        }
    }

    /// Handles every cart whose deadline has come: timeouts, expiries and resends.
    pub(crate) fn cart_tick(&mut self) {
        while let Some(&(at, hold)) = self.cart_deadlines.first() {
            if at > self.now {
                break;
            }
            self.cart_deadlines.remove(&(at, hold));
            let now = self.now;
            let cart = self.carts.get_mut(&hold).expect("scheduled cart exists");
            cart.deadline = None;
            let (state, timed_out, expired) = (cart.state, now >= cart.phase_deadline, now >= cart.expires_at);
            match state {
                CartState::Preparing if timed_out => {
                    self.cart_decide(hold, CartOutcome::ReserveFailed, Status::Timeout)
                }
                CartState::Committing if timed_out => {
                    self.cart_decide(hold, CartOutcome::CommitTimedOut, Status::Timeout)
                }
                CartState::Extending if timed_out => {
                    self.cart_decide(hold, CartOutcome::ExtendTimedOut, Status::Timeout)
                }
                CartState::Reserved if expired => self.cart_decide(hold, CartOutcome::Expired, Status::HoldExpired),
                _ => self.cart_send(hold),
            }
        }
    }

    // ---------------------------------------------------------------- peer messages

    pub(crate) fn cart_on_vote(&mut self, from: ShardId, hold: u128, txn: u64, status: Status) {
        let Some(cart) = self.carts.get_mut(&hold) else {
            if status == Status::Ok {
                // A decision this coordinator never recorded (or forgot after everyone
                // acknowledged it) is an abort.
                self.send_peer(from, PeerMessage::Decide { hold: HoldId(hold), txn, decision: Decision::Release });
            }
            return;
        };
        if txn != cart.txn || !cart.in_flight() {
            if status != Status::Ok || txn > cart.txn {
                return;
            }
            // A late vote: answer with that transaction's outcome.
            let decision = if txn == cart.txn {
                match cart.push {
                    Some((push, _)) => decision_for(cart, push, from, self.config.shards),
                    None => return,
                }
            } else if txn == cart.reserve_txn {
                if cart.reserve_failed {
                    Decision::Abort
                } else {
                    Decision::Keep
                }
            } else {
                Decision::Unpin
            };
            return self.send_peer(from, PeerMessage::Decide { hold: HoldId(hold), txn, decision });
        }
        let Some(participant) = cart.participants.iter_mut().find(|p| p.shard == from) else { return };
        if participant.vote.is_some() {
            return;
        }
        participant.vote = Some(status);
        let all_yes = cart.all_voted_yes();
        let state = cart.state;
        match (state, status == Status::Ok) {
            (CartState::Preparing, false) => self.cart_decide(hold, CartOutcome::ReserveFailed, status),
            (CartState::Committing, false) => self.cart_decide(hold, CartOutcome::CommitFailed, Status::HoldExpired),
            (CartState::Extending, false) => self.cart_decide(hold, CartOutcome::ExtendFailed, Status::HoldExpired),
            (CartState::Preparing, true) if all_yes => self.cart_decide(hold, CartOutcome::Reserved, Status::Reserved),
            (CartState::Committing, true) if all_yes => {
                self.cart_decide(hold, CartOutcome::Committed, Status::Committed)
            }
            (CartState::Extending, true) if all_yes => self.cart_decide(hold, CartOutcome::Extended, Status::Extended),
            _ => {}
        }
    }

    pub(crate) fn cart_on_ack(&mut self, from: ShardId, hold: u128, txn: u64) {
        let Some(cart) = self.carts.get_mut(&hold) else { return };
        if cart.push.map(|(_, push_txn)| push_txn) != Some(txn) {
            return;
        }
        if let Some(participant) = cart.participants.iter_mut().find(|p| p.shard == from) {
            participant.acked = true;
        }
        if cart.participants.iter().all(|p| p.acked) {
            cart.push = None;
            let finished = matches!(cart.state, CartState::Finished(_));
            self.cart_schedule(hold);
            if finished {
                // Forgetting may take this very cart (its id can stand in the ring twice
                // when a failed reserve was retried), so it comes after the schedule.
                self.carts_finished.push_back(hold);
                while self.carts_finished.len() > self.config.carts_finished_max as usize {
                    self.cart_forget_oldest();
                }
            }
        }
    }

    /// Forgets the oldest finished, fully acknowledged cart; false if there is none.
    fn cart_forget_oldest(&mut self) -> bool {
        while let Some(hold) = self.carts_finished.pop_front() {
            let forgettable = self
                .carts
                .get(&hold)
                .is_some_and(|cart| matches!(cart.state, CartState::Finished(_)) && cart.push.is_none());
            if forgettable {
                self.log(WalRecord::CartForgotten { hold });
                return true;
            }
        }
        false
    }

    /// After recovery: resume every cart (resend, restart phase timeouts).
    pub(crate) fn cart_recover(&mut self) {
        // In id order, so that the messages a recovery sends do not depend on the map.
        let mut holds: Vec<u128> = self.carts.keys().copied().collect();
        holds.sort_unstable();
        let deadline = self.now + u64::from(self.config.peer_timeout_ms);
        for hold in holds {
            self.carts.get_mut(&hold).expect("cart").phase_deadline = deadline;
            self.cart_send(hold);
        }
    }

    // ---------------------------------------------------------------- apply

    pub(crate) fn cart_apply(&mut self, record: &WalRecord<'_>) -> ApplyResult {
        let shards = self.config.shards;
        match *record {
            WalRecord::CartOpened { hold, txn, fingerprint, expires_at_ms, lines } => {
                if self.carts.contains_key(&hold) {
                    return Err("a cart with this id exists");
                }
                if lines.is_empty() || lines.len() > 64 {
                    return Err("a cart needs 1 to 64 lines");
                }
                let lines: Vec<WalLine> = lines.iter().collect();
                let mut participants: Vec<Participant> = Vec::new();
                for line in &lines {
                    let shard = shard_for(line.sku, shards);
                    if !participants.iter().any(|p| p.shard == shard) {
                        participants.push(Participant { shard, vote: None, acked: false });
                    }
                }
                self.carts.insert(
                    hold,
                    Cart {
                        fingerprint,
                        expires_at: expires_at_ms,
                        lines,
                        participants,
                        reserve_txn: txn,
                        txn,
                        state: CartState::Preparing,
                        reserve_failed: false,
                        mask: 0,
                        new_expires_at: 0,
                        push: None,
                        waiters: Vec::new(),
                        phase_deadline: 0,
                        deadline: None,
                    },
                );
                self.next_txn = self.next_txn.max(txn.checked_add(1).ok_or("transaction numbers exhausted")?);
                Ok(())
            }
            WalRecord::CartStarted { hold, txn, phase } => {
                let cart = self.carts.get_mut(&hold).ok_or("start on an unknown cart")?;
                if cart.state != CartState::Reserved {
                    return Err("start on a cart that is not reserved");
                }
                cart.txn = txn;
                cart.push = None;
                for participant in &mut cart.participants {
                    participant.vote = None;
                }
                match phase {
                    CartPhase::Commit { mask } => {
                        cart.state = CartState::Committing;
                        cart.mask = mask;
                    }
                    CartPhase::Extend { expires_at_ms } => {
                        cart.state = CartState::Extending;
                        cart.new_expires_at = expires_at_ms;
                    }
                }
                self.next_txn = self.next_txn.max(txn.checked_add(1).ok_or("transaction numbers exhausted")?);
                Ok(())
            }
            WalRecord::CartDecided { hold, txn, outcome, .. } => {
                let cart = self.carts.get_mut(&hold).ok_or("decision on an unknown cart")?;
                let (state, push) = match outcome {
                    CartOutcome::Reserved => (CartState::Reserved, Some(Push::Keep)),
                    CartOutcome::ReserveFailed => {
                        cart.reserve_failed = true;
                        (CartState::Finished(HoldState::Released), Some(Push::Abort))
                    }
                    CartOutcome::Committed => (CartState::Finished(HoldState::Committed), Some(Push::Commit)),
                    CartOutcome::CommitFailed | CartOutcome::ExtendFailed | CartOutcome::Expired => {
                        (CartState::Finished(HoldState::Expired), Some(Push::Release))
                    }
                    CartOutcome::CommitTimedOut => (CartState::Reserved, Some(Push::Unpin)),
                    CartOutcome::Extended => {
                        cart.expires_at = cart.new_expires_at;
                        (CartState::Reserved, None)
                    }
                    CartOutcome::ExtendTimedOut => (CartState::Reserved, None),
                    CartOutcome::Released => (CartState::Finished(HoldState::Released), Some(Push::Release)),
                };
                cart.state = state;
                cart.txn = txn;
                cart.push = push.map(|push| (push, txn));
                for participant in &mut cart.participants {
                    participant.acked = push.is_none();
                }
                self.next_txn = self.next_txn.max(txn.checked_add(1).ok_or("transaction numbers exhausted")?);
                Ok(())
            }
            WalRecord::CartForgotten { hold } => {
                let cart = self.carts.remove(&hold).ok_or("forgetting an unknown cart")?;
                if let Some(at) = cart.deadline {
                    self.cart_deadlines.remove(&(at, hold));
                }
                Ok(())
            }
            _ => Err("not a cart record"),
        }
    }
}

/// What participant `shard` must hear for the cart's decision `push`.
fn decision_for(cart: &Cart, push: Push, shard: ShardId, shards: u32) -> Decision {
    match push {
        Push::Keep => Decision::Keep,
        Push::Abort => Decision::Abort,
        Push::Unpin => Decision::Unpin,
        Push::Release => Decision::Release,
        Push::Commit => {
            let mut mask = 0u64;
            for (bit, (index, _)) in cart.lines_of(shard, shards).enumerate() {
                if cart.mask & (1 << index) != 0 {
                    mask |= 1 << bit;
                }
            }
            Decision::Commit { mask }
        }
    }
}
