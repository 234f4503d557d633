//! One shard against a reference model (`BTreeMap`s), with `proptest-state-machine`.
//!
//! The model is the specification in its simplest form: rows with `on_hand`, `held` and a
//! backorder limit; holds with lines, an expiry and a state. Every transition is applied
//! to both; the statuses must agree, every row must agree after every step, no row may
//! be oversold, and a crash (rebuilding the shard from its WAL) must change nothing.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use stockplane_wire::{HoldId, Op, Status};

const SKUS: u64 = 4;
const LOCATIONS: u32 = 2;
const QTY_MAX: u32 = 100;
const TTL_MIN: u32 = 1;
const TTL_MAX: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldPhase {
    Held,
    Committed,
    Released,
    Expired,
}

#[derive(Debug, Clone)]
struct ModelHold {
    lines: Vec<(u64, u32, u32)>,
    ttl_ms: u32,
    expires_at: u64,
    phase: HoldPhase,
}

#[derive(Debug, Clone)]
struct Model {
    now: u64,
    /// (sku, location) -> (on_hand, held, backorder_limit)
    rows: BTreeMap<(u64, u32), (i64, i64, u32)>,
    holds: BTreeMap<u128, ModelHold>,
    adjustments: BTreeMap<u128, (u64, u32, i64)>,
    /// The status the last transition must produce.
    expected: Option<Status>,
}

#[derive(Debug, Clone)]
enum Step {
    Upsert { sku: u64, location: u32, backorder_limit: u32 },
    Adjust { id: u128, sku: u64, location: u32, delta: i64 },
    Reserve { hold: u128, ttl_ms: u32, lines: Vec<(u64, u32, u32)> },
    Commit { hold: u128 },
    Release { hold: u128 },
    Extend { hold: u128, ttl_ms: u32 },
    Advance { ms: u64 },
    Crash,
}

impl Model {
    fn expire(&mut self) {
        let now = self.now;
        for hold in self.holds.values_mut() {
            if hold.phase == HoldPhase::Held && hold.expires_at <= now {
                hold.phase = HoldPhase::Expired;
                for &(sku, location, qty) in &hold.lines {
                    self.rows.get_mut(&(sku, location)).unwrap().1 -= i64::from(qty);
                }
            }
        }
    }

    fn give_back(&mut self, hold: u128, phase: HoldPhase, sell: bool) {
        let record = self.holds.get_mut(&hold).unwrap();
        record.phase = phase;
        for &(sku, location, qty) in &record.lines {
            let row = self.rows.get_mut(&(sku, location)).unwrap();
            row.1 -= i64::from(qty);
            if sell {
                row.0 -= i64::from(qty);
            }
        }
    }

    fn step(&mut self, step: &Step) -> Option<Status> {
        self.expire();
        let status = match *step {
            Step::Upsert { sku, location, backorder_limit } => match self.rows.get_mut(&(sku, location)) {
                Some(row) if row.0 - row.1 < -i64::from(backorder_limit) => Status::InvalidArgument,
                Some(row) => {
                    row.2 = backorder_limit;
                    Status::Ok
                }
                None => {
                    self.rows.insert((sku, location), (0, 0, backorder_limit));
                    Status::Ok
                }
            },
            Step::Adjust { id, sku, location, delta } => {
                if delta == 0 {
                    Status::InvalidArgument
                } else if let Some(previous) = self.adjustments.get(&id) {
                    if *previous == (sku, location, delta) {
                        Status::Ok
                    } else {
                        Status::Conflict
                    }
                } else {
                    match self.rows.get_mut(&(sku, location)) {
                        None => Status::UnknownSku,
                        Some(row) if row.0 - row.1 + delta < -i64::from(row.2) => Status::InsufficientStock,
                        Some(row) => {
                            row.0 += delta;
                            self.adjustments.insert(id, (sku, location, delta));
                            Status::Ok
                        }
                    }
                }
            }
            Step::Reserve { hold, ttl_ms, ref lines } => {
                let duplicate =
                    lines.iter().enumerate().any(|(i, a)| lines[..i].iter().any(|b| (a.0, a.1) == (b.0, b.1)));
                let bad_qty = lines.iter().any(|l| l.2 == 0 || l.2 > QTY_MAX);
                if !(TTL_MIN..=TTL_MAX).contains(&ttl_ms) || lines.is_empty() || duplicate || bad_qty {
                    Status::InvalidArgument
                } else if let Some(existing) = self.holds.get(&hold) {
                    if existing.lines == *lines && existing.ttl_ms == ttl_ms {
                        Status::Reserved
                    } else {
                        Status::Conflict
                    }
                } else if let Some(refusal) = lines.iter().find_map(|l| match self.rows.get(&(l.0, l.1)) {
                    // Lines are checked in order; the first one that fails says why.
                    None => Some(Status::UnknownSku),
                    Some(row) if row.0 - row.1 - i64::from(l.2) < -i64::from(row.2) => Some(Status::InsufficientStock),
                    Some(_) => None,
                }) {
                    refusal
                } else {
                    for &(sku, location, qty) in lines {
                        self.rows.get_mut(&(sku, location)).unwrap().1 += i64::from(qty);
                    }
                    let expires_at = self.now + u64::from(ttl_ms);
                    self.holds
                        .insert(hold, ModelHold { lines: lines.clone(), ttl_ms, expires_at, phase: HoldPhase::Held });
                    Status::Reserved
                }
            }
            Step::Commit { hold } => match self.holds.get(&hold).map(|h| h.phase) {
                None => Status::UnknownHold,
                Some(HoldPhase::Held) => {
                    self.give_back(hold, HoldPhase::Committed, true);
                    Status::Committed
                }
                Some(HoldPhase::Committed) => Status::Committed,
                Some(HoldPhase::Released) => Status::AlreadyReleased,
                Some(HoldPhase::Expired) => Status::HoldExpired,
            },
            Step::Release { hold } => match self.holds.get(&hold).map(|h| h.phase) {
                None => Status::UnknownHold,
                Some(HoldPhase::Held) => {
                    self.give_back(hold, HoldPhase::Released, false);
                    Status::Released
                }
                Some(HoldPhase::Committed) => Status::AlreadyCommitted,
                Some(HoldPhase::Released) => Status::Released,
                Some(HoldPhase::Expired) => Status::HoldExpired,
            },
            Step::Extend { hold, ttl_ms } => {
                if !(TTL_MIN..=TTL_MAX).contains(&ttl_ms) {
                    Status::InvalidArgument
                } else {
                    let now = self.now;
                    match self.holds.get_mut(&hold) {
                        None => Status::UnknownHold,
                        Some(h) => match h.phase {
                            HoldPhase::Held => {
                                h.expires_at = h.expires_at.max(now + u64::from(ttl_ms));
                                Status::Extended
                            }
                            HoldPhase::Committed => Status::AlreadyCommitted,
                            HoldPhase::Released => Status::AlreadyReleased,
                            HoldPhase::Expired => Status::HoldExpired,
                        },
                    }
                }
            }
            Step::Advance { ms } => {
                self.now += ms;
                self.expire();
                return None;
            }
            Step::Crash => return None,
        };
        Some(status)
    }
}

struct ShardModel;

impl ReferenceStateMachine for ShardModel {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            now: 1_000_000,
            rows: BTreeMap::new(),
            holds: BTreeMap::new(),
            adjustments: BTreeMap::new(),
            expected: None,
        })
        .boxed()
    }

    fn transitions(_state: &Model) -> BoxedStrategy<Step> {
        let sku = 1..=SKUS;
        let location = 1..=LOCATIONS;
        let hold = 1u128..12;
        let line = (1..=SKUS, 1..=LOCATIONS, 0u32..12);
        prop_oneof![
            1 => (sku.clone(), location.clone(), 0u32..3)
                .prop_map(|(sku, location, backorder_limit)| Step::Upsert { sku, location, backorder_limit }),
            2 => (1u128..6, sku, location, -8i64..15)
                .prop_map(|(id, sku, location, delta)| Step::Adjust { id, sku, location, delta }),
            4 => (hold.clone(), prop_oneof![Just(0u32), 1u32..5_000], proptest::collection::vec(line, 0..4))
                .prop_map(|(hold, ttl_ms, lines)| Step::Reserve { hold, ttl_ms, lines }),
            2 => hold.clone().prop_map(|hold| Step::Commit { hold }),
            1 => hold.clone().prop_map(|hold| Step::Release { hold }),
            1 => (hold, 0u32..5_000).prop_map(|(hold, ttl_ms)| Step::Extend { hold, ttl_ms }),
            2 => (0u64..3_000).prop_map(|ms| Step::Advance { ms }),
            1 => Just(Step::Crash),
        ]
        .boxed()
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        state.expected = state.step(step);
        state
    }
}

struct ShardUnderTest;

impl StateMachineTest for ShardUnderTest {
    type SystemUnderTest = Cluster;
    type Reference = ShardModel;

    fn init_test(_model: &Model) -> Cluster {
        let mut cluster = Cluster::new(1, |config| {
            config.qty_max = QTY_MAX;
            config.hold_ttl_ms_min = TTL_MIN;
            config.hold_ttl_ms_max = TTL_MAX;
            config.cart_lines_max = 4;
        });
        cluster.now = 1_000_000;
        cluster
    }

    fn apply(mut cluster: Cluster, model: &Model, step: Step) -> Cluster {
        let op = match step {
            Step::Upsert { sku, location, backorder_limit } => {
                Some((CONTROL, Op::UpsertSku { sku, location, backorder_limit }))
            }
            Step::Adjust { id, sku, location, delta } => {
                Some((CONTROL, Op::Adjust { adjustment: id, sku, location, delta }))
            }
            Step::Reserve { hold, ttl_ms, ref lines } => {
                let lines: Vec<_> = lines.iter().map(|&(sku, location, qty)| (sku, Some(location), qty)).collect();
                Some((CHECKOUT, reserve(hold, ttl_ms, &lines)))
            }
            Step::Commit { hold } => Some((CHECKOUT, commit(hold))),
            Step::Release { hold } => Some((CHECKOUT, release(hold))),
            Step::Extend { hold, ttl_ms } => Some((CHECKOUT, Op::Extend { hold: HoldId(hold), ttl_ms })),
            Step::Advance { ms } => {
                cluster.advance(ms);
                None
            }
            Step::Crash => {
                let before = cluster.shards[0].state_hash();
                cluster.crash(0);
                assert_eq!(cluster.shards[0].state_hash(), before, "recovery changed the state");
                None
            }
        };
        if let Some((origin, op)) = op {
            let status = cluster.status(origin, op.clone());
            let expected = model.expected.expect("the model answers every request");
            assert_eq!(status, expected, "{op:?}");
        }
        cluster
    }

    fn check_invariants(cluster: &Cluster, model: &Model) {
        cluster.check();
        let levels: BTreeMap<(u64, u32), (i64, i64, u32)> = cluster.shards[0]
            .stock_levels()
            .map(|l| ((l.sku, l.location), (l.on_hand, l.held, l.backorder_limit)))
            .collect();
        assert_eq!(levels, model.rows);
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn shard_matches_reference_model(sequential 1..80 => ShardUnderTest);
}
