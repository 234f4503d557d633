//! Which shard serves a request: a pure function of the request, shared by every core.
//!
//! Holds live on the shard `home_for(hold)` (which coordinates a cart whose lines span
//! shards); SKU operations on `shard_for(sku)`; a journal read names its shard.

use stockplane_engine::{home_for, shard_for, ShardId};
use stockplane_wire::{ArchivedHoldsOf, ArchivedOp, HoldId, Status};

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The shard that owns the request's hold or SKU.
    Shard(ShardId),
    /// A stock query whose SKUs live on several shards: split, then merged.
    Split,
    /// Refused before any shard sees it.
    Refuse(Status),
}

/// The shard that serves `op` among `shards`.
pub(crate) fn route(op: &ArchivedOp, shards: u32) -> Route {
    if shards == 1 {
        return match op {
            ArchivedOp::Journal { shard, .. } if shard.to_native() != 0 => Route::Refuse(Status::InvalidArgument),
            _ => Route::Shard(0),
        };
    }
    match op {
        ArchivedOp::Reserve { hold, .. }
        | ArchivedOp::Commit { hold, .. }
        | ArchivedOp::Release { hold }
        | ArchivedOp::Extend { hold, .. } => Route::Shard(home_for(HoldId(hold.0.to_native()), shards)),
        ArchivedOp::QueryHolds { of: ArchivedHoldsOf::Hold(hold) } => {
            Route::Shard(home_for(HoldId(hold.0.to_native()), shards))
        }
        ArchivedOp::QueryHolds { of: ArchivedHoldsOf::Sku(sku) } => Route::Shard(shard_for(sku.to_native(), shards)),
        ArchivedOp::QueryStock { items } => {
            let mut shard = None;
            for item in items.iter() {
                let s = shard_for(item.sku.to_native(), shards);
                match shard {
                    None => shard = Some(s),
                    Some(first) if first != s => return Route::Split,
                    Some(_) => {}
                }
            }
            // An empty query goes anywhere: the engine answers it `InvalidArgument`.
            Route::Shard(shard.unwrap_or(0))
        }
        ArchivedOp::UpsertSku { sku, .. } | ArchivedOp::Adjust { sku, .. } => {
            Route::Shard(shard_for(sku.to_native(), shards))
        }
        ArchivedOp::Journal { shard, .. } => {
            let shard = shard.to_native();
            if shard < shards {
                Route::Shard(shard)
            } else {
                Route::Refuse(Status::InvalidArgument)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use stockplane_wire::{CartLine, Op, Request, RequestBatch, SkuAt};

    use super::*;

    fn routed(op: Op, shards: u32) -> Route {
        let batch = RequestBatch { requests: vec![Request { id: 1, op }] };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&batch).unwrap();
        let archived = rkyv::access::<stockplane_wire::ArchivedRequestBatch, rkyv::rancor::Error>(&bytes).unwrap();
        route(&archived.requests[0].op, shards)
    }

    #[test]
    fn holds_go_home_and_skus_to_their_shard() {
        let hold = HoldId(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let line = CartLine { sku: 99, location: None, qty: 1 };
        let home = Route::Shard(home_for(hold, 4));
        assert_eq!(routed(Op::Reserve { hold, ttl_ms: 1_000, lines: vec![line] }, 4), home);
        assert_eq!(routed(Op::Release { hold }, 4), home);
        assert_eq!(
            routed(Op::UpsertSku { sku: 99, location: 0, backorder_limit: 0 }, 4),
            Route::Shard(shard_for(99, 4))
        );
        assert_eq!(routed(Op::Journal { shard: 3, from: 0, max_entries: 1 }, 4), Route::Shard(3));
        assert_eq!(
            routed(Op::Journal { shard: 4, from: 0, max_entries: 1 }, 4),
            Route::Refuse(Status::InvalidArgument)
        );
        assert_eq!(
            routed(Op::Journal { shard: 1, from: 0, max_entries: 1 }, 1),
            Route::Refuse(Status::InvalidArgument)
        );
    }

    #[test]
    fn a_query_across_shards_is_split() {
        let sku_on = |shard: u32| (0u64..).find(|&sku| shard_for(sku, 2) == shard).unwrap();
        let (a, b) = (sku_on(0), sku_on(1));
        let items = |skus: &[u64]| skus.iter().map(|&sku| SkuAt { sku, location: None }).collect::<Vec<_>>();
        assert_eq!(routed(Op::QueryStock { items: items(&[a, a]) }, 2), Route::Shard(0));
        assert_eq!(routed(Op::QueryStock { items: items(&[b]) }, 2), Route::Shard(1));
        assert_eq!(routed(Op::QueryStock { items: items(&[a, b]) }, 2), Route::Split);
        assert_eq!(routed(Op::QueryStock { items: items(&[a, b]) }, 1), Route::Shard(0));
    }
}
