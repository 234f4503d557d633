//! Recovery time of one shard with 10,000,000 SKUs and 1,000,000 live holds: the data
//! plane's own log reader (`stockplane_dataplane::wal::recover`) on real segment files.
//!
//! 1. A shard is filled through its ordinary inputs (archived `UpsertSku` and `Adjust`
//!    batches, then single-line reserves), and every WAL record it emits is kept.
//! 2. The records are laid out as the shard's log (`wal::write_log`: 64 MiB segments,
//!    synced), and, when run as root, the page cache is dropped so that the files are
//!    read from the disk.
//! 3. `wal::recover` is timed: read every segment, check every record's CRC, replay it.
//!    The recovered shard's state hash must equal the original's.
//! 4. Two snapshots are taken with the data plane's own `wal::take_snapshot` (the first
//!    covers every segment but the last, the second all of them and lets the first's
//!    segments go), and recovery is timed again from the newest snapshot, then from the
//!    older one and the segment after it (as when the newest is damaged).
//! 5. Before the snapshots, the recovered shard is written once more from a fork of this
//!    process (`stockplane_dataplane::fork::write_by_fork`, as `wal.snapshot_source =
//!    "fork"` does): the fork's pause is printed, and the file must equal the snapshot of
//!    every segment byte for byte.
//!
//! `cargo run --release -p stockplane-benches --bin recovery -- --skus 10000000 --holds 1000000`

use std::time::Instant;

use anyhow::{ensure, Context};
use clap::Parser;
use stockplane_benches::{access, archive_into, fill_catalog, hold_id, sku_id, Driver, CHECKOUT};
use stockplane_engine::Shard;
use stockplane_wire::frame::AlignedVec;
use stockplane_wire::{CartLine, Op, Request, RequestBatch};

/// Command-line arguments.
#[derive(Debug, Parser)]
struct Args {
    /// SKUs in the shard (one location each).
    #[arg(long, default_value_t = 10_000_000)]
    skus: u32,
    /// Live single-line holds.
    #[arg(long, default_value_t = 1_000_000)]
    holds: u32,
    /// Where to write the log (a fresh subdirectory, removed afterwards).
    #[arg(long, default_value = "target")]
    dir: std::path::PathBuf,
    /// Segment size.
    #[arg(long, default_value_t = 64 << 20)]
    segment_bytes: u64,
    /// Keep the page cache (measure replay from memory rather than from the disk).
    #[arg(long)]
    warm: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{}",
        stockplane_loadgen::machine::report_header("stockplane shard recovery (benches/src/bin/recovery.rs)")
    );
    let mut config = stockplane_benches::catalog_config(args.skus);
    config.holds_max = args.holds.next_power_of_two().max(1 << 10);
    config.holds_finished_max = 1 << 10;
    config.adjustments_retained_max = 1 << 10;
    config.journal_entries_max = 1 << 10;
    config.outbox_max = 1 << 16;
    let now = 1_800_000_000_000;

    let built = Instant::now();
    let mut shard = Shard::new(&config, now)?;
    let mut driver = Driver::new();
    driver.kept_log = Some(Vec::with_capacity(1 << 30));
    fill_catalog(&mut shard, &mut driver, now, args.skus);
    let mut buffer = AlignedVec::new();
    let mut serial = 0u64;
    while serial < u64::from(args.holds) {
        let count = (u64::from(args.holds) - serial).min(4_096);
        let requests = (serial..serial + count)
            .map(|s| Request {
                id: s,
                op: Op::Reserve {
                    hold: hold_id(s),
                    ttl_ms: 3_600_000,
                    lines: vec![CartLine {
                        sku: sku_id((stockplane_benches::splitmix64(s) % u64::from(args.skus)) as u32),
                        location: None,
                        qty: 1,
                    }],
                },
            })
            .collect();
        buffer = archive_into(&RequestBatch { requests }, buffer);
        driver.apply(&mut shard, now, CHECKOUT, access(&buffer));
        serial += count;
    }
    ensure!(shard.live_holds() == args.holds, "only {} holds are live", shard.live_holds());
    let log = driver.kept_log.take().expect("kept");
    println!(
        "built: {} SKUs, {} live holds, {} records, {:.1} MiB of log, in {:.1} s",
        args.skus,
        shard.live_holds(),
        shard.wal_head(),
        log.len() as f64 / (1 << 20) as f64,
        built.elapsed().as_secs_f64()
    );

    let data = args.dir.join(format!("recovery-bench-{}", std::process::id()));
    let written = Instant::now();
    stockplane_dataplane::wal::write_log(&data, 0, args.segment_bytes, &log).context("write the log")?;
    println!("log written as {}-byte segments in {:.1} s", args.segment_bytes, written.elapsed().as_secs_f64());
    let expected = shard.state_hash();
    drop(shard);
    drop(log);
    let cold = !args.warm && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    println!(
        "page cache: {}",
        if cold {
            "dropped (segments read from the disk)"
        } else if args.warm {
            "kept (--warm): replay from memory"
        } else {
            "not dropped (not root): warm reads"
        }
    );

    // The data plane's recovery, timed, checked against the original state.
    let recover = |case: &str| -> anyhow::Result<(Shard, f64)> {
        let started = Instant::now();
        let (recovered, _) =
            stockplane_dataplane::wal::recover(&data, &config, now, args.segment_bytes, false).context("recover")?;
        let seconds = started.elapsed().as_secs_f64();
        ensure!(recovered.state_hash() == expected, "the shard recovered from {case} differs from the original");
        Ok((recovered, seconds))
    };
    let (recovered, seconds) = recover("the log")?;
    println!(
        "recovery: {seconds:.2} s for {} records ({} SKUs, {} live holds); state hash equal to the original's",
        recovered.wal_head(),
        args.skus,
        recovered.live_holds()
    );
    // A snapshot of the recovered state from a fork of this process, as a serving core
    // takes one with `wal.snapshot_source = "fork"`: the fork pauses the caller for a time
    // that grows with the process's memory. Checked below against the snapshot of every
    // segment, which is at the same position.
    let resident = resident_mib()?;
    let forked = data.join("forked.snap");
    let (paused, took) = stockplane_dataplane::fork::write_by_fork(&recovered, &forked)?;
    println!(
        "snapshot from a fork of this process ({resident:.0} MiB resident): the fork paused the caller for {:.1} ms; \
         the copy wrote {:.1} MiB, synced, and exited {:.2} s after the fork",
        paused.as_secs_f64() * 1e3,
        std::fs::metadata(&forked)?.len() as f64 / (1 << 20) as f64,
        took.as_secs_f64()
    );
    drop(recovered);

    // Snapshots, as the data plane takes them: the first covers every segment but the
    // last (the writer's open one); the second covers the last too, and, as the newer
    // of two, lets the data plane delete the segments the first covers.
    let dir = stockplane_dataplane::wal::shard_dir(&data, 0);
    let segments = || -> anyhow::Result<u64> {
        let names = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.file_name().into_string().ok());
        // The log's own segments (not the spares a snapshot lets go of).
        Ok(names.filter(|n| n.starts_with("wal-") && n.ends_with(".seg")).count() as u64)
    };
    let last = segments()?;
    let never = std::sync::atomic::AtomicBool::new(false);
    for (open, what) in [(last, "every segment but the last"), (last + 1, "every segment")] {
        let started = Instant::now();
        let done = stockplane_dataplane::wal::take_snapshot(
            &dir,
            &config,
            now,
            args.segment_bytes,
            open,
            stockplane_dataplane::wal::DiskShare::ALL,
            &never,
        )?;
        let (path, position) = done.written.clone().context("a snapshot")?;
        println!(
            "snapshot of {what}: position {position}, {:.1} MiB, taken in {:.2} s (previous snapshot + closed \
             segments replayed beside the shard, written, synced); segments let go: {:?}",
            done.bytes as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64(),
            done.segments_deleted
        );
        ensure!(path.exists(), "the snapshot file is missing");
        if open == last + 1 {
            ensure!(
                std::fs::read(&path)? == std::fs::read(&forked)?,
                "the snapshot from the fork differs from the one from the files"
            );
            println!("the snapshot from the fork is byte for byte the snapshot of every segment");
        }
    }
    let newest = std::fs::read_dir(&dir)?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .max()
        .context("a snapshot")?;
    for case in ["the newest snapshot and the log after it", "the older snapshot and the segment after it"] {
        if case.starts_with("the older") {
            // As if the newest were damaged: recovery falls back to the older one.
            std::fs::remove_file(&newest)?;
        }
        if cold {
            std::fs::write("/proc/sys/vm/drop_caches", "3")?;
        }
        let (recovered, seconds) = recover(case)?;
        println!(
            "recovery from {case} ({} segment left): {seconds:.2} s, {} live holds; state hash equal to the original's",
            segments()?,
            recovered.live_holds()
        );
    }
    std::fs::remove_dir_all(&data)?;
    Ok(())
}

/// This process's resident memory (`VmRSS`), in MiB.
fn resident_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("VmRSS in /proc/self/status")?;
    Ok(kib / 1024.0)
}
