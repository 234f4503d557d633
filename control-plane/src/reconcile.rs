//! Reconcile: the books against the data plane, per SKU and location.
//!
//! For every stock row in PostgreSQL, the data plane's `on_hand` should be the books'
//! `on_hand`, plus what the shard's journal holds beyond the drained position (its sales
//! and its adjustments, which the books will receive when drained), minus bootstrap
//! adjustments the shard has not yet received (the books hold those already). Holds do
//! not change `on_hand`; they are reported beside it (`held`, `available`). When nothing
//! is in flight the difference is exactly zero; every row where it is not is listed.
//! The journal tail and the stock are read one after the other, so under load a sale
//! between the two reads can show as a difference of that sale: reconcile an idle
//! system for an exact answer, or compare two runs.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use stockplane_wire::{JournalChange, SkuAt};
use uuid::Uuid;

use crate::dataplane::{Dataplane, JournalRead};
use crate::db::Db;

/// Journal entries beyond the drained position that reconcile reads per shard, at most.
const TAIL_ENTRIES_MAX: u64 = 4_000_000;

/// What reconcile found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Report {
    /// Stock rows compared.
    pub rows: u64,
    /// Rows where the data plane differs from the books (empty: the books reconcile).
    pub differences: Vec<Difference>,
    /// Per shard: the drained position and the journal entries not yet drained.
    pub shards: Vec<ShardTail>,
}

/// A shard's journal beyond the books.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ShardTail {
    /// The shard.
    pub shard: u32,
    /// Its epoch in the books.
    pub epoch: i64,
    /// The books' drained position.
    pub drained: u64,
    /// Entries in the journal not yet drained.
    pub undrained: u64,
}

/// One row that does not reconcile.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Difference {
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// The books' on hand.
    pub books_on_hand: i64,
    /// Stock changes in the journal not yet drained (adjustments minus sales).
    pub undrained_delta: i64,
    /// Bootstrap adjustments the shard has not yet received.
    pub bootstrap_pending: i64,
    /// What the data plane should have: books + undrained − bootstrap pending.
    pub expected_on_hand: i64,
    /// What the data plane has (`None`: it does not know the row).
    pub dataplane_on_hand: Option<i64>,
    /// Units in live holds at the data plane.
    pub held: Option<i64>,
    /// `dataplane_on_hand - expected_on_hand`.
    pub difference: i64,
}

/// Compares the books with the data plane.
pub async fn reconcile(db: &Db, dataplane: &Dataplane) -> anyhow::Result<Report> {
    let positions = db.positions().await?;
    let mut undrained: HashMap<(u64, u32), i64> = HashMap::new();
    let mut tail_adjustments: Vec<(Uuid, u64, u32, i64)> = Vec::new();
    let mut shards = Vec::new();
    for position in &positions {
        let mut from = position.drained;
        let mut count = 0;
        loop {
            let read = dataplane.journal(position.shard, from, 4096).await?;
            let JournalRead::Entries { entries, next, .. } = read else {
                anyhow::bail!("shard {} cannot give its journal from {from}: {read:?}", position.shard)
            };
            if entries.is_empty() {
                break;
            }
            for entry in &entries {
                match entry.change {
                    JournalChange::Sale { qty, .. } => {
                        *undrained.entry((entry.sku, entry.location)).or_default() -= i64::from(qty)
                    }
                    JournalChange::Adjustment { adjustment, delta } => {
                        tail_adjustments.push((Uuid::from_u128(adjustment), entry.sku, entry.location, delta))
                    }
                }
            }
            count += entries.len() as u64;
            from = next;
            anyhow::ensure!(
                count <= TAIL_ENTRIES_MAX,
                "shard {} has over {TAIL_ENTRIES_MAX} entries not drained",
                position.shard
            );
        }
        shards.push(ShardTail {
            shard: position.shard,
            epoch: position.epoch,
            drained: position.drained,
            undrained: count,
        });
    }
    let tail: Vec<Uuid> = tail_adjustments.iter().map(|a| a.0).collect();
    let bootstrap: HashSet<Uuid> = db.bootstrap_ids_among(&tail).await?.into_iter().collect();
    for (id, sku, location, delta) in tail_adjustments {
        if !bootstrap.contains(&id) {
            *undrained.entry((sku, location)).or_default() += delta;
        }
    }
    // Bootstrap adjustments in neither the books nor the journal's tail: not received.
    // (Every bootstrap adjustment in the tail is in `bootstrap`.)
    let mut bootstrap_pending: HashMap<(u64, u32), i64> = HashMap::new();
    for pending in db.bootstrap_pending().await? {
        if !bootstrap.contains(&pending.id) {
            *bootstrap_pending.entry((pending.sku, pending.location)).or_default() += pending.delta;
        }
    }
    let shard_ids: Vec<u32> = positions.iter().map(|p| p.shard).collect();
    let books = db.books_of_shards(&shard_ids).await?;
    let items: Vec<SkuAt> = books.keys().map(|&(sku, location)| SkuAt { sku, location: Some(location) }).collect();
    let levels = dataplane.stock(&items).await?;
    let live: HashMap<(u64, u32), (i64, i64)> =
        levels.iter().map(|l| ((l.sku, l.location), (l.on_hand, l.held))).collect();
    let mut differences = Vec::new();
    for (key, row) in &books {
        let undrained_delta = undrained.get(key).copied().unwrap_or(0);
        let pending = bootstrap_pending.get(key).copied().unwrap_or(0);
        let expected = row.on_hand + undrained_delta - pending;
        let found = live.get(key).copied();
        let difference = match found {
            Some((on_hand, _)) => on_hand - expected,
            // A row the shard has not been told of yet is fine while the books say zero.
            None => -expected,
        };
        if difference != 0 || (found.is_none() && expected != 0) {
            differences.push(Difference {
                sku: key.0,
                location: key.1,
                books_on_hand: row.on_hand,
                undrained_delta,
                bootstrap_pending: pending,
                expected_on_hand: expected,
                dataplane_on_hand: found.map(|f| f.0),
                held: found.map(|f| f.1),
                difference,
            });
        }
    }
    differences.sort_by_key(|d| (d.sku, d.location));
    Ok(Report { rows: books.len() as u64, differences, shards })
}
