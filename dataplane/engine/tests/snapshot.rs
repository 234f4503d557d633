//! Snapshots: loading one taken at any WAL position and replaying the records after it
//! rebuilds the state the whole log rebuilds, and behaves the same afterwards; a damaged,
//! foreign or inconsistent snapshot is an error, never a panic.

mod common;

use common::*;
use proptest::prelude::*;
use stockplane_engine::{wal, RecoverError, Shard, SnapshotError, SnapshotHeader, SNAPSHOT_HEADER_BYTES};
use stockplane_wire::{Op, Status};

const SHARDS: u32 = 3;

/// Three shards with a small finished-hold memory (so that evictions and slot reuse
/// happen), stock on every shard, and SKUs of every shard.
fn cluster() -> (Cluster, Vec<u64>) {
    let mut c = Cluster::new(SHARDS, |config| {
        config.holds_finished_max = 8;
        config.carts_finished_max = 4;
        config.adjustments_retained_max = 16;
        config.journal_entries_max = 64;
    });
    let skus: Vec<u64> = (0..6).map(|i| sku_owned_by(i % SHARDS, SHARDS, u64::from(i) + 1)).collect();
    for &sku in &skus {
        c.stock(sku, 1, 50, 0);
        c.stock(sku, 2, 20, 1);
    }
    (c, skus)
}

/// Round `round` of a fixed workload: single-line and multi-shard holds, commits,
/// partial commits, releases, extensions, restocks and expiries.
fn round(c: &mut Cluster, skus: &[u64], round: u32) {
    let base = u128::from(round) * 100;
    let (a, b, d) = (skus[round as usize % 6], skus[(round as usize + 1) % 6], skus[(round as usize + 2) % 6]);
    let single = hold_homed_at(round % SHARDS, SHARDS, base + 1);
    let cart = hold_homed_at((round + 1) % SHARDS, SHARDS, base + 2);
    let short = hold_homed_at((round + 2) % SHARDS, SHARDS, base + 3);
    let kept = hold_homed_at(round % SHARDS, SHARDS, base + 4);
    assert_eq!(c.status(CHECKOUT, reserve(single, 60_000, &[(a, None, 2)])), Status::Reserved);
    assert_eq!(
        c.status(CHECKOUT, reserve(cart, 60_000, &[(a, Some(1), 1), (b, None, 1), (d, Some(2), 1)])),
        Status::Reserved
    );
    assert_eq!(c.status(CHECKOUT, reserve(short, 2_000, &[(b, None, 1), (d, None, 1)])), Status::Reserved);
    assert_eq!(c.status(CHECKOUT, reserve(kept, 600_000, &[(d, Some(1), 1)])), Status::Reserved);
    assert_eq!(
        c.status(CHECKOUT, Op::Extend { hold: stockplane_wire::HoldId(kept), ttl_ms: 900_000 }),
        Status::Extended
    );
    assert_eq!(c.status(CHECKOUT, commit(single)), Status::Committed);
    let subset = Some(vec![stockplane_wire::SkuAt { sku: b, location: None }]);
    assert_eq!(
        c.status(CHECKOUT, Op::Commit { hold: stockplane_wire::HoldId(cart), lines: subset }),
        Status::Committed
    );
    let restock = (1u128 << 120) | base;
    assert_eq!(c.status(CONTROL, Op::Adjust { adjustment: restock, sku: a, location: 1, delta: 3 }), Status::Ok);
    if round.is_multiple_of(3) {
        assert_eq!(c.status(CHECKOUT, release(kept)), Status::Released);
    }
    c.advance(2_500);
}

/// The byte offsets where the records of `log` end.
fn boundaries(log: &[u8]) -> Vec<usize> {
    let mut ends = vec![0];
    let mut offset = 0;
    while offset < log.len() {
        let (_, _, len) = wal::decode(&log[offset..]).expect("whole records");
        offset += len;
        ends.push(offset);
    }
    ends
}

#[test]
fn a_snapshot_at_any_position_plus_the_rest_of_the_log_rebuilds_the_same_state() {
    let (mut c, skus) = cluster();
    for r in 0..12 {
        round(&mut c, &skus, r);
    }
    for index in 0..SHARDS as usize {
        let (config, log) = (&c.configs[index], &c.logs[index]);
        let (whole, _) = Shard::recover(config, c.now, log).unwrap();
        assert_eq!(whole.state_hash(), c.shards[index].state_hash());
        let ends = boundaries(log);
        for (i, &end) in ends.iter().enumerate() {
            let (snapshot, valid) = Shard::compact(config, c.now, None, &log[..end]).unwrap();
            assert_eq!(valid, end);
            let header = SnapshotHeader::read(&snapshot).unwrap();
            assert_eq!(header.position, i as u64);
            // The rest of the log from the snapshot's end, or from an earlier record (a
            // segment that holds records the snapshot includes is not deleted yet).
            for from in [end, ends[i / 2]] {
                let bytes = aligned(&snapshot);
                let (loaded, valid) = Shard::recover_from(config, c.now, Some(&bytes), &log[from..]).unwrap();
                assert_eq!(valid, log.len() - from);
                assert_eq!(
                    loaded.state_hash(),
                    whole.state_hash(),
                    "shard {index}, snapshot at record {i}, log from {from}"
                );
                assert_eq!(loaded.wal_head(), whole.wal_head());
                loaded.check_invariants();
            }
        }
    }
}

#[test]
fn snapshots_taken_from_snapshots_chain_and_their_bytes_depend_only_on_the_state() {
    let (mut c, skus) = cluster();
    for r in 0..9 {
        round(&mut c, &skus, r);
    }
    let (config, log) = (&c.configs[1], &c.logs[1]);
    let ends = boundaries(log);
    let (third, half) = (ends[ends.len() / 3], ends[ends.len() / 2]);
    let (first, _) = Shard::compact(config, c.now, None, &log[..third]).unwrap();
    let (second, _) = Shard::compact(config, c.now, Some(&aligned(&first)), &log[..half]).unwrap();
    let (direct, _) = Shard::compact(config, c.now, None, &log[..half]).unwrap();
    let differ = second.iter().zip(direct.iter()).position(|(a, b)| a != b);
    assert!(
        second.len() == direct.len() && differ.is_none(),
        "a snapshot of a snapshot plus records differs at byte {differ:?}"
    );
}

#[test]
fn a_shard_loaded_from_a_snapshot_behaves_like_one_rebuilt_from_its_log() {
    // Two runs of the same workload; halfway, one rebuilds every shard from its whole log
    // and the other from a snapshot of all but the last records plus those records.
    let runs: Vec<Vec<u64>> = [false, true]
        .into_iter()
        .map(|from_snapshot| {
            let (mut c, skus) = cluster();
            for r in 0..6 {
                round(&mut c, &skus, r);
            }
            let hold = hold_homed_at(0, SHARDS, 999_999);
            assert_eq!(
                c.status(CHECKOUT, reserve(hold, 4_000, &[(skus[0], None, 1), (skus[1], None, 1)])),
                Status::Reserved
            );
            for index in 0..SHARDS as usize {
                if from_snapshot {
                    let ends = boundaries(&c.logs[index]);
                    let cut = ends[ends.len() - 3];
                    let (snapshot, _) = Shard::compact(&c.configs[index], c.now, None, &c.logs[index][..cut]).unwrap();
                    let (shard, _) =
                        Shard::recover_from(&c.configs[index], c.now, Some(&aligned(&snapshot)), &c.logs[index][cut..])
                            .unwrap();
                    c.shards[index] = shard;
                    c.in_flight.retain(|(_, to, _)| *to as usize != index);
                } else {
                    c.crash(index);
                }
            }
            c.pump();
            let mut hashes = Vec::new();
            for r in 6..12 {
                round(&mut c, &skus, r);
                hashes.extend(c.shards.iter().map(|s| s.state_hash()));
                c.check();
            }
            // The cart expired meanwhile and has been forgotten since, in both runs alike.
            assert_eq!(c.status(CHECKOUT, commit(hold)), Status::UnknownHold);
            hashes
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
}

/// `bytes` at a 16-byte aligned address, as a driver reads a snapshot file.
fn aligned(bytes: &[u8]) -> rkyv::util::AlignedVec<16> {
    let mut out = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    out.extend_from_slice(bytes);
    out
}

/// A shard's snapshot with some history, for the refusal tests.
fn some_snapshot() -> (Cluster, Vec<u8>) {
    let (mut c, skus) = cluster();
    for r in 0..3 {
        round(&mut c, &skus, r);
    }
    let (snapshot, _) = Shard::compact(&c.configs[0], c.now, None, &c.logs[0]).unwrap();
    (c, snapshot.to_vec())
}

#[test]
fn a_damaged_truncated_or_foreign_snapshot_is_refused() {
    let (c, snapshot) = some_snapshot();
    let config = &c.configs[0];
    let load = |bytes: &[u8]| Shard::from_snapshot(config, c.now, &aligned(bytes)).err();
    assert_eq!(load(&snapshot), None);
    assert!(matches!(load(&snapshot[..10]), Some(SnapshotError::Truncated { .. })));
    assert!(matches!(load(&snapshot[..snapshot.len() - 1]), Some(SnapshotError::Truncated { .. })));
    let mut magic = snapshot.clone();
    magic[0] ^= 0xff;
    assert_eq!(load(&magic), Some(SnapshotError::Magic));
    let mut format = snapshot.clone();
    format[8] = 99;
    assert_eq!(load(&format), Some(SnapshotError::Format(99)));
    let mut flipped = snapshot.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    assert!(matches!(load(&flipped), Some(SnapshotError::Checksum { .. })));
    // Another shard's snapshot, and this shard's under another shard count.
    let other = Shard::from_snapshot(&c.configs[1], c.now, &aligned(&snapshot)).err();
    assert!(matches!(other, Some(SnapshotError::WrongShard { found: 0, shard: 1, .. })), "{other:?}");
    let mut fewer = config.clone();
    fewer.skus_max = 2;
    fewer.sku_locations_max = 2;
    let small = Shard::from_snapshot(&fewer, c.now, &aligned(&snapshot)).err();
    assert!(matches!(small, Some(SnapshotError::DoesNotFit(_))), "{small:?}");
}

#[test]
fn a_log_that_starts_after_the_snapshot_is_a_gap() {
    let (c, _) = some_snapshot();
    let (config, log) = (&c.configs[0], &c.logs[0]);
    let ends = boundaries(log);
    let (snapshot, _) = Shard::compact(config, c.now, None, &log[..ends[3]]).unwrap();
    let error = Shard::recover_from(config, c.now, Some(&aligned(&snapshot)), &log[ends[4]..]).err();
    assert!(matches!(error, Some(RecoverError::Gap { expected: 4, found: 5, .. })), "{error:?}");
    // Without a snapshot, a log that does not start at position 1 is a gap too.
    let error = Shard::recover(config, c.now, &log[ends[1]..]).err();
    assert!(matches!(error, Some(RecoverError::Gap { expected: 1, found: 2, .. })), "{error:?}");
}

/// Recomputes the checksum of a snapshot whose bytes were changed, so that the change
/// reaches the payload's validation instead of stopping at the checksum.
fn reseal(bytes: &mut [u8]) {
    let head = crc32c::crc32c(&bytes[..48]);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(head, &bytes[52..SNAPSHOT_HEADER_BYTES]),
        &bytes[SNAPSHOT_HEADER_BYTES..],
    );
    bytes[48..52].copy_from_slice(&crc.to_le_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Mutated payloads with a valid checksum (what a bug, not the disk, would write)
    /// are refused or load into a shard that keeps its invariants; they never panic.
    #[test]
    fn a_resealed_mutated_snapshot_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let (config, now, snapshot) = some_snapshot_cached();
        let mut bytes = snapshot.clone();
        let payload = bytes.len() - SNAPSHOT_HEADER_BYTES;
        for (at, value) in flips {
            bytes[SNAPSHOT_HEADER_BYTES + at.index(payload)] = value;
        }
        reseal(&mut bytes);
        if let Ok(mut shard) = Shard::from_snapshot(config, *now, &aligned(&bytes)) {
            // A changed expiry may be overdue: it expires at the first call.
            shard.handle_timeout(*now);
            shard.check_invariants();
        }
    }
}

fn some_snapshot_cached() -> &'static (stockplane_engine::ShardConfig, u64, Vec<u8>) {
    static CACHED: std::sync::OnceLock<(stockplane_engine::ShardConfig, u64, Vec<u8>)> = std::sync::OnceLock::new();
    CACHED.get_or_init(|| {
        let (c, snapshot) = some_snapshot();
        (c.configs[0].clone(), c.now, snapshot)
    })
}
