//! A reference model of one shard, rebuilt from the WAL records it writes.
//!
//! The simulator decodes every record a shard appends (with the engine's own decoder,
//! which is all it shares with the engine) and applies it here, in plain `BTreeMap`s,
//! by rules written from DESIGN.md rather than from the engine's code. Two models live
//! per shard: one of every record appended (the live state) and one of the durable
//! records only (what a crash keeps). The simulator compares the live model with the
//! shard after every step, and reads facts about durability from the durable one.
//!
//! Invariants the model itself asserts, by returning an error for a record that breaks
//! them: positions follow each other; a hold's lines are held at most once; a sale
//! comes only from a live hold; no row is oversold; an adjustment id is applied once.
//!
//! The model must not look inside the engine (it has no access to its private state)
//! and must not forget anything during a run: it is small, and memory per seed is cheap.

use std::collections::{BTreeMap, BTreeSet};

use stockplane_engine::wal::{CartOutcome, CartPhase, WalLine, WalRecord, ANY_LOCATION};
use stockplane_engine::{shard_for, ShardId};

/// One stock row (SKU at a location) as the records built it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Sellable units.
    pub on_hand: i64,
    /// Units in live holds.
    pub held: i64,
    /// How far below zero `on_hand - held` may go.
    pub backorder_limit: u32,
}

/// Where a hold is in its life, as far as its shard's records tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPhase {
    /// Holding stock for a single-shard hold, or a kept participant hold.
    Held,
    /// A participant hold whose cart's reserve is not decided yet.
    Prepared,
    /// A participant hold pinned for a commit attempt: it cannot expire.
    Pinned,
    /// Sold (the lines of its mask) and released (the others).
    Committed,
    /// Given back by request or by its cart's decision.
    Released,
    /// Given back because its time ran out.
    Expired,
}

impl HoldPhase {
    /// True while the hold counts against stock.
    pub fn is_live(self) -> bool {
        matches!(self, HoldPhase::Held | HoldPhase::Prepared | HoldPhase::Pinned)
    }
}

/// A hold (or a participant's share of a cart) on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelHold {
    /// Resolved lines: (sku, location, qty).
    pub lines: Vec<(u64, u32, u32)>,
    /// Its phase.
    pub phase: HoldPhase,
    /// For a participant's share: the coordinator and the reserve transaction.
    pub prepared_for: Option<(ShardId, u64)>,
    /// The commit attempt it is pinned for, if any.
    pub pin_txn: u64,
    /// Its expiry.
    pub expires_at_ms: u64,
}

/// A cross-shard cart that this shard coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCart {
    /// The lines as asked (location `ANY_LOCATION` when the client let the shard pick).
    pub lines: Vec<WalLine>,
    /// How many times a cart with this id was opened here (after being forgotten).
    pub incarnation: u32,
    /// The mask of the commit attempt last started.
    pub mask: u64,
    /// The last decision, if any.
    pub outcome: Option<CartOutcome>,
    /// True once a `Reserved` decision was recorded (in this incarnation).
    pub reserved: bool,
    /// True once a `Committed` decision was recorded (in this incarnation).
    pub committed: bool,
    /// True once an outcome that gives the stock back was recorded (in this incarnation).
    pub given_back: bool,
    /// True once the cart was forgotten.
    pub forgotten: bool,
}

impl ModelCart {
    /// The lines that participant `shard` owns, in cart order, with their cart index.
    pub fn lines_of(&self, shard: ShardId, shards: u32) -> Vec<(usize, WalLine)> {
        self.lines.iter().copied().enumerate().filter(|(_, l)| shard_for(l.sku, shards) == shard).collect()
    }
}

/// Something a record did that the simulator's global ledger follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Units of a hold's line were sold.
    Sale {
        /// The hold.
        hold: u128,
        /// The SKU.
        sku: u64,
        /// The location sold from.
        location: u32,
        /// Units sold.
        qty: u32,
    },
    /// A participant's share of a cart was sold (mask over the share's lines).
    ShareCommitted {
        /// The cart.
        hold: u128,
        /// Its coordinator.
        coordinator: ShardId,
        /// The share's mask.
        mask: u64,
    },
    /// A participant's prepared share of a cart was kept (the cart is reserved).
    ShareKept {
        /// The cart.
        hold: u128,
    },
    /// A participant's share of a cart was given back (released or expired).
    ShareGivenBack {
        /// The cart.
        hold: u128,
        /// Its coordinator.
        coordinator: ShardId,
    },
    /// A coordinator decided a cart's transaction.
    CartDecided {
        /// The cart.
        hold: u128,
        /// The outcome.
        outcome: CartOutcome,
    },
}

/// One journal entry as the model derives it: (sku, location, change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChange {
    /// A sale of `qty` units for `hold`.
    Sale {
        /// The hold.
        hold: u128,
        /// Units.
        qty: u32,
    },
    /// An adjustment.
    Adjustment {
        /// Its id.
        adjustment: u128,
        /// Units added.
        delta: i64,
    },
}

/// The reference model of one shard.
#[derive(Debug, Clone)]
pub struct Model {
    shard: ShardId,
    shards: u32,
    /// Position of the last record applied.
    pub position: u64,
    /// Stock rows by (sku, location).
    pub rows: BTreeMap<(u64, u32), Row>,
    /// Holds by id (finished ones are kept).
    pub holds: BTreeMap<u128, ModelHold>,
    /// Carts this shard coordinates, by id.
    pub carts: BTreeMap<u128, ModelCart>,
    /// Adjustment ids applied, with how often.
    pub adjustments: BTreeMap<u128, u32>,
    /// The journal, from position 1: (sku, location, change).
    pub journal: Vec<(u64, u32, ModelChange)>,
    /// Holds whose lines are live.
    pub live_holds: u32,
    /// The ids of those holds, so that comparing live lines costs what is live, not
    /// every hold the seed ever made.
    live: BTreeSet<u128>,
}

impl Model {
    /// An empty model of shard `shard` of `shards`.
    pub fn new(shard: ShardId, shards: u32) -> Model {
        Model {
            shard,
            shards,
            position: 0,
            rows: BTreeMap::new(),
            holds: BTreeMap::new(),
            carts: BTreeMap::new(),
            adjustments: BTreeMap::new(),
            journal: Vec::new(),
            live_holds: 0,
            live: BTreeSet::new(),
        }
    }

    /// Applies the record at `position`; returns what it did for the ledger, or why the
    /// record cannot follow the state (an invariant violation).
    pub fn apply(&mut self, position: u64, record: &WalRecord<'_>, effects: &mut Vec<Effect>) -> Result<(), String> {
        if position != self.position + 1 {
            return Err(format!("record at position {position} follows {}", self.position));
        }
        self.position = position;
        match *record {
            WalRecord::SkuUpserted { sku, location, backorder_limit } => {
                self.owned(sku)?;
                let row = self.rows.entry((sku, location)).or_insert(Row { on_hand: 0, held: 0, backorder_limit });
                row.backorder_limit = backorder_limit;
                check_row(sku, location, row)
            }
            WalRecord::Adjusted { adjustment, sku, location, delta } => {
                let row = self.rows.get_mut(&(sku, location)).ok_or("adjustment of an unknown row")?;
                row.on_hand += delta;
                check_row(sku, location, row)?;
                let count = self.adjustments.entry(adjustment).or_insert(0);
                *count += 1;
                if *count > 1 {
                    return Err(format!("adjustment {adjustment:#x} applied twice"));
                }
                self.journal.push((sku, location, ModelChange::Adjustment { adjustment, delta }));
                Ok(())
            }
            WalRecord::Held { hold, expires_at_ms, prepared_for, ref lines, .. } => {
                if self.holds.get(&hold).is_some_and(|h| h.phase.is_live()) {
                    return Err(format!("hold {hold:#x} held twice"));
                }
                let lines: Vec<(u64, u32, u32)> = lines.iter().map(|l| (l.sku, l.location, l.qty)).collect();
                for &(sku, location, qty) in &lines {
                    self.owned(sku)?;
                    let row = self.rows.get_mut(&(sku, location)).ok_or("hold of an unknown row")?;
                    row.held += i64::from(qty);
                }
                for &(sku, location, _) in &lines {
                    check_row(sku, location, &self.rows[&(sku, location)])?;
                }
                let phase = if prepared_for.is_some() { HoldPhase::Prepared } else { HoldPhase::Held };
                self.holds.insert(hold, ModelHold { lines, phase, prepared_for, pin_txn: 0, expires_at_ms });
                self.live_holds += 1;
                self.live.insert(hold);
                Ok(())
            }
            WalRecord::Kept { hold } => {
                let h = self.holds.get_mut(&hold).ok_or("keep of an unknown hold")?;
                if h.phase != HoldPhase::Prepared {
                    return Err(format!("keep of hold {hold:#x} in phase {:?}", h.phase));
                }
                h.phase = HoldPhase::Held;
                effects.push(Effect::ShareKept { hold });
                Ok(())
            }
            WalRecord::Committed { hold, mask, .. } => {
                let h = self.live(hold)?.clone();
                for (index, &(sku, location, qty)) in h.lines.iter().enumerate() {
                    let row = self.rows.get_mut(&(sku, location)).expect("held rows exist");
                    row.held -= i64::from(qty);
                    if mask & (1 << index) != 0 {
                        row.on_hand -= i64::from(qty);
                        self.journal.push((sku, location, ModelChange::Sale { hold, qty }));
                        effects.push(Effect::Sale { hold, sku, location, qty });
                    }
                }
                if let Some((coordinator, _)) = h.prepared_for {
                    effects.push(Effect::ShareCommitted { hold, coordinator, mask });
                }
                self.finish(hold, HoldPhase::Committed);
                Ok(())
            }
            WalRecord::Released { hold } => self.give_back(hold, HoldPhase::Released, effects),
            WalRecord::Expired { hold } => {
                let h = self.live(hold)?;
                if h.phase == HoldPhase::Pinned {
                    return Err(format!("pinned hold {hold:#x} expired"));
                }
                self.give_back(hold, HoldPhase::Expired, effects)
            }
            WalRecord::Extended { hold, expires_at_ms } => {
                self.live(hold)?;
                self.holds.get_mut(&hold).expect("live").expires_at_ms = expires_at_ms;
                Ok(())
            }
            WalRecord::Pinned { hold, txn } => {
                let h = self.live(hold)?;
                if h.prepared_for.is_none() {
                    return Err(format!("pin of hold {hold:#x}, which is no participant"));
                }
                let h = self.holds.get_mut(&hold).expect("live");
                h.phase = HoldPhase::Pinned;
                h.pin_txn = txn;
                Ok(())
            }
            WalRecord::Unpinned { hold } => {
                let h = self.holds.get_mut(&hold).ok_or("unpin of an unknown hold")?;
                if h.phase != HoldPhase::Pinned {
                    return Err(format!("unpin of hold {hold:#x} in phase {:?}", h.phase));
                }
                h.phase = HoldPhase::Held;
                Ok(())
            }
            WalRecord::CartOpened { hold, ref lines, .. } => {
                let incarnation = match self.carts.get(&hold) {
                    Some(cart) if !cart.forgotten => return Err(format!("cart {hold:#x} opened twice")),
                    Some(cart) => cart.incarnation + 1,
                    None => 1,
                };
                let lines: Vec<WalLine> = lines.iter().collect();
                self.carts.insert(
                    hold,
                    ModelCart {
                        lines,
                        incarnation,
                        mask: 0,
                        outcome: None,
                        reserved: false,
                        committed: false,
                        given_back: false,
                        forgotten: false,
                    },
                );
                Ok(())
            }
            WalRecord::CartStarted { hold, phase, .. } => {
                let cart = self.cart(hold)?;
                if cart.committed || cart.given_back {
                    return Err(format!("cart {hold:#x} started a phase after it ended"));
                }
                if let CartPhase::Commit { mask } = phase {
                    cart.mask = mask;
                }
                Ok(())
            }
            WalRecord::CartDecided { hold, outcome, .. } => {
                let cart = self.cart(hold)?;
                if cart.committed || cart.given_back {
                    return Err(format!("cart {hold:#x} decided {outcome:?} after it ended"));
                }
                cart.outcome = Some(outcome);
                match outcome {
                    CartOutcome::Committed => cart.committed = true,
                    CartOutcome::Reserved => cart.reserved = true,
                    CartOutcome::ReserveFailed
                    | CartOutcome::CommitFailed
                    | CartOutcome::ExtendFailed
                    | CartOutcome::Released
                    | CartOutcome::Expired => cart.given_back = true,
                    CartOutcome::CommitTimedOut | CartOutcome::Extended | CartOutcome::ExtendTimedOut => {}
                }
                effects.push(Effect::CartDecided { hold, outcome });
                Ok(())
            }
            WalRecord::CartForgotten { hold } => {
                let cart = self.cart(hold)?;
                if !(cart.committed || cart.given_back) {
                    return Err(format!("cart {hold:#x} forgotten before it ended"));
                }
                cart.forgotten = true;
                Ok(())
            }
        }
    }

    fn owned(&self, sku: u64) -> Result<(), String> {
        if shard_for(sku, self.shards) != self.shard {
            return Err(format!("sku {sku} does not belong to shard {}", self.shard));
        }
        Ok(())
    }

    fn live(&self, hold: u128) -> Result<&ModelHold, String> {
        match self.holds.get(&hold) {
            Some(h) if h.phase.is_live() => Ok(h),
            Some(h) => Err(format!("record for hold {hold:#x}, which is over ({:?})", h.phase)),
            None => Err(format!("record for unknown hold {hold:#x}")),
        }
    }

    fn cart(&mut self, hold: u128) -> Result<&mut ModelCart, String> {
        match self.carts.get_mut(&hold) {
            Some(cart) if !cart.forgotten => Ok(cart),
            _ => Err(format!("record for unknown cart {hold:#x}")),
        }
    }

    fn give_back(&mut self, hold: u128, phase: HoldPhase, effects: &mut Vec<Effect>) -> Result<(), String> {
        let h = self.live(hold)?.clone();
        for &(sku, location, qty) in &h.lines {
            self.rows.get_mut(&(sku, location)).expect("held rows exist").held -= i64::from(qty);
        }
        if let Some((coordinator, _)) = h.prepared_for {
            effects.push(Effect::ShareGivenBack { hold, coordinator });
        }
        self.finish(hold, phase);
        Ok(())
    }

    fn finish(&mut self, hold: u128, phase: HoldPhase) {
        self.holds.get_mut(&hold).expect("hold exists").phase = phase;
        self.live_holds -= 1;
        self.live.remove(&hold);
    }

    /// The lines of live holds, sorted: (hold, sku, location, qty).
    pub fn live_lines(&self) -> Vec<(u128, u64, u32, u32)> {
        let mut lines = Vec::new();
        for hold in &self.live {
            let h = &self.holds[hold];
            lines.extend(h.lines.iter().map(|&(sku, location, qty)| (*hold, sku, location, qty)));
        }
        lines
    }
}

fn check_row(sku: u64, location: u32, row: &Row) -> Result<(), String> {
    if row.on_hand - row.held < -i64::from(row.backorder_limit) || row.held < 0 {
        return Err(format!(
            "sku {sku} at {location} oversold in the records: on_hand {} held {} limit {}",
            row.on_hand, row.held, row.backorder_limit
        ));
    }
    Ok(())
}

/// True when a cart line asked for `location` (or any) matches a sale at `sold_at`.
pub fn location_matches(asked: u32, sold_at: u32) -> bool {
    asked == ANY_LOCATION || asked == sold_at
}
