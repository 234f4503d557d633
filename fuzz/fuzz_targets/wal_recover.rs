//! Fuzzes WAL parsing and recovery: arbitrary bytes as a shard's log.
//!
//! `wal::decode` must never panic; `Shard::recover` must either rebuild a shard whose
//! invariants hold (no row oversold, `held` equal to the live lines) or refuse the log
//! with an error, never panic on a record that does not apply.
//! Seeds: `fuzz/seeds/wal_recover`, logs written by the engine's tests.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stockplane_engine::{wal, Shard, ShardConfig};

/// Rewrites the checksum and position of every record-shaped chunk, so that the fuzzer
/// reaches `apply` with arbitrary payloads instead of stopping at the checksum.
fn with_valid_checksums(data: &[u8]) -> Vec<u8> {
    let mut log = data.to_vec();
    let (mut offset, mut position) = (0usize, 1u64);
    while offset + wal::HEADER_BYTES <= log.len() {
        let len = usize::from(u16::from_le_bytes([log[offset], log[offset + 1]]));
        if len < wal::HEADER_BYTES || len % 8 != 0 || offset + len > log.len() {
            break;
        }
        log[offset + 8..offset + 16].copy_from_slice(&position.to_le_bytes());
        let record = &log[offset..offset + len];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&record[0..4]), &record[8..]);
        log[offset + 4..offset + 8].copy_from_slice(&crc.to_le_bytes());
        offset += len;
        position += 1;
    }
    log
}

fn recover_and_check(log: &[u8]) {
    let mut config = ShardConfig::new(0, 1);
    config.skus_max = 64;
    config.sku_locations_max = 128;
    config.holds_max = 64;
    config.holds_finished_max = 16;
    config.hold_extra_lines_max = 256;
    config.carts_max = 32;
    config.carts_finished_max = 8;
    // The journal is allocated at its bound: keep it small, or every run pays for it.
    config.journal_entries_max = 256;
    if let Ok((mut shard, valid)) = Shard::recover(&config, 1_000, log) {
        assert!(valid <= log.len());
        // Holds that expired while "down" expire at the first call after recovery.
        shard.handle_timeout(1_000);
        shard.check_invariants();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut offset = 0;
    while let Ok((_, _, len)) = wal::decode(&data[offset..]) {
        offset += len;
    }
    recover_and_check(data);
    recover_and_check(&with_valid_checksums(data));
});
