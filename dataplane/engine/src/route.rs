//! Routing: which shard owns a SKU, and which shard coordinates a hold.
//!
//! Routing is a pure function of the key and the shard count, the same in every process,
//! so that clients, drivers and the simulator agree without talking. The mixing function
//! is fixed (not seeded per process): changing it re-partitions every deployment.

use stockplane_wire::HoldId;

/// A shard's number, `0..shards`.
pub type ShardId = u32;

/// A 64-bit finaliser (from SplitMix64): spreads nearby ids across shards and buckets.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Maps a hash onto `0..n` without a division (Lemire's multiply-shift reduction).
pub fn reduce(hash: u64, n: u32) -> u32 {
    ((u128::from(hash) * u128::from(n)) >> 64) as u32
}

/// The shard that owns `sku` (every location of it) among `shards` shards.
pub fn shard_for(sku: u64, shards: u32) -> ShardId {
    debug_assert!(shards > 0);
    if shards == 1 {
        return 0;
    }
    reduce(mix64(sku ^ 0x5bd1_e995_6a09_e667), shards)
}

/// The shard that coordinates hold `hold`: its home, which keeps the cart's decisions.
///
/// Every request naming a hold (reserve, commit, release, extend) goes to its home, so a
/// retry reaches the shard that knows the first answer, whichever connection carries it.
pub fn home_for(hold: HoldId, shards: u32) -> ShardId {
    debug_assert!(shards > 0);
    if shards == 1 {
        return 0;
    }
    let folded = (hold.0 as u64) ^ mix64((hold.0 >> 64) as u64);
    reduce(mix64(folded ^ 0x3c6e_f372_fe94_f82b), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_in_range_and_spreads() {
        let shards = 8;
        let mut counts = [0u32; 8];
        for sku in 0..80_000u64 {
            let shard = shard_for(sku, shards);
            assert!(shard < shards);
            counts[shard as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "uneven spread: {counts:?}");
        }
        assert_eq!(shard_for(42, 1), 0);
        assert_eq!(home_for(HoldId(42), 1), 0);
    }

    #[test]
    fn homes_spread_over_high_and_low_bits() {
        let mut counts = [0u32; 4];
        for i in 0..40_000u128 {
            counts[home_for(HoldId(i << 64), 4) as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "uneven spread: {counts:?}");
        }
    }
}
