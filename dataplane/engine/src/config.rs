//! A shard's configuration: its place among the shards, and a bound on everything it keeps.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::route::ShardId;

/// Every bound a shard keeps, and its place among the shards.
///
/// The shard allocates its tables for these bounds when it is created and never grows
/// them, so its memory is known up front and a full table answers `busy`.
///
/// The bounds are also the `[shard]` table of the data plane's configuration file; the
/// shard's place (`shard`, `shards`) is the driver's to set, never the file's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// This shard's number.
    #[serde(skip)]
    pub shard: ShardId,
    /// How many shards share the SKUs.
    #[serde(skip)]
    pub shards: u32,
    /// Which life of this shard's data this is: the driver draws it when it creates the
    /// data directory and keeps it there, so a shard that restarted without its data
    /// answers journal reads with another incarnation, and the control plane can tell
    /// its journal from the one it drained before (0 in tests and the simulation).
    #[serde(skip)]
    pub incarnation: u64,
    /// Distinct SKUs this shard can hold.
    pub skus_max: u32,
    /// SKU-locations (stock rows) this shard can hold.
    pub sku_locations_max: u32,
    /// Live holds (reserved, not yet committed, released or expired).
    pub holds_max: u32,
    /// Finished holds kept so that a retried request gets its first answer.
    pub holds_finished_max: u32,
    /// Hold lines beyond each hold's first, across all holds kept.
    pub hold_extra_lines_max: u32,
    /// Lines in one cart (at most 64).
    pub cart_lines_max: u32,
    /// Cross-shard carts this shard coordinates at once, finished ones included.
    pub carts_max: u32,
    /// Finished carts kept for retries before they are forgotten.
    pub carts_finished_max: u32,
    /// Units in one line.
    pub qty_max: u32,
    /// Shortest hold TTL accepted.
    pub hold_ttl_ms_min: u32,
    /// Longest hold TTL accepted.
    pub hold_ttl_ms_max: u32,
    /// Largest absolute stock adjustment accepted.
    pub adjust_delta_max: u64,
    /// Adjustment ids remembered so that a retried adjustment is applied once.
    pub adjustments_retained_max: u32,
    /// Journal entries kept in memory for the control plane to read.
    pub journal_entries_max: u32,
    /// Journal entries returned by one read.
    pub journal_read_max: u32,
    /// SKUs in one stock query.
    pub query_items_max: u32,
    /// Holds listed by one holds query.
    pub query_holds_max: u32,
    /// Replies and peer messages waiting for durability before the shard answers busy.
    pub outbox_max: u32,
    /// How long a coordinator waits before resending an unanswered peer message.
    pub peer_retransmit_ms: u32,
    /// How long a coordinator waits for every participant's vote before giving up.
    pub peer_timeout_ms: u32,
}

impl Default for ShardConfig {
    /// The defaults of [`ShardConfig::new`] for the only shard of one.
    fn default() -> ShardConfig {
        ShardConfig::new(0, 1)
    }
}

impl ShardConfig {
    /// A configuration for shard `shard` of `shards`, with defaults sized for a shard of
    /// a million SKUs and a hundred thousand live holds.
    pub fn new(shard: ShardId, shards: u32) -> ShardConfig {
        ShardConfig {
            shard,
            shards,
            incarnation: 0,
            skus_max: 1 << 20,
            sku_locations_max: 1 << 20,
            holds_max: 1 << 17,
            holds_finished_max: 1 << 16,
            hold_extra_lines_max: 1 << 18,
            cart_lines_max: 32,
            carts_max: 1 << 14,
            carts_finished_max: 1 << 12,
            qty_max: 10_000,
            hold_ttl_ms_min: 1_000,
            hold_ttl_ms_max: 3_600_000,
            adjust_delta_max: 1 << 40,
            adjustments_retained_max: 1 << 16,
            journal_entries_max: 1 << 18,
            journal_read_max: 4_096,
            query_items_max: 256,
            query_holds_max: 1_000,
            outbox_max: 1 << 16,
            peer_retransmit_ms: 50,
            peer_timeout_ms: 2_000,
        }
    }

    /// Checks that the bounds are usable together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |what: &'static str| Err(ConfigError(what));
        if self.shards == 0 || self.shard >= self.shards {
            return fail("shard must be below shards, and shards above zero");
        }
        if self.cart_lines_max == 0 || self.cart_lines_max > 64 {
            return fail("cart_lines_max must be in 1..=64");
        }
        if self.skus_max == 0 || self.sku_locations_max < self.skus_max {
            return fail("sku_locations_max must be at least skus_max, which must be above zero");
        }
        if self.holds_max == 0 || self.carts_max == 0 || self.carts_finished_max >= self.carts_max {
            return fail("holds_max and carts_max must be above zero, carts_finished_max below carts_max");
        }
        if u64::from(self.holds_max) + u64::from(self.holds_finished_max) > HOLD_SLOTS_MAX {
            return fail("holds_max + holds_finished_max must be at most 2^30");
        }
        if self.qty_max == 0 || self.hold_ttl_ms_min == 0 || self.hold_ttl_ms_min > self.hold_ttl_ms_max {
            return fail("qty_max and hold_ttl_ms_min must be above zero, and the TTL range not empty");
        }
        if self.journal_entries_max == 0 || self.journal_read_max == 0 || self.outbox_max == 0 {
            return fail("journal and outbox bounds must be above zero");
        }
        if self.peer_retransmit_ms == 0 || self.peer_timeout_ms < self.peer_retransmit_ms {
            return fail("peer_retransmit_ms must be above zero and at most peer_timeout_ms");
        }
        Ok(())
    }
}

/// The most hold slots (live and finished) a shard may have: slot numbers stay far from
/// the values the engine reserves as markers, and the hold index below `u32::MAX` buckets.
pub const HOLD_SLOTS_MAX: u64 = 1 << 30;

/// A configuration whose bounds cannot work together.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid shard configuration: {0}")]
pub struct ConfigError(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_bounds_are_refused() {
        assert_eq!(ShardConfig::new(0, 4).validate(), Ok(()));
        assert!(ShardConfig::new(4, 4).validate().is_err());
        let mut config = ShardConfig::new(0, 1);
        config.cart_lines_max = 65;
        assert!(config.validate().is_err());
        let mut config = ShardConfig::new(0, 1);
        config.hold_ttl_ms_min = config.hold_ttl_ms_max + 1;
        assert!(config.validate().is_err());
        let mut config = ShardConfig::new(0, 1);
        (config.holds_max, config.holds_finished_max) = (u32::MAX, 1);
        assert!(config.validate().is_err());
        (config.holds_max, config.holds_finished_max) = (1 << 29, 1 << 29);
        assert_eq!(config.validate(), Ok(()));
    }
}
