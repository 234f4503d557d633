//! The disk's own `fdatasync` latency, measured the way the WAL writes: 4 KiB O_DIRECT
//! writes through io_uring (glommio DMA files), each followed by `fdatasync`, into
//!
//! - a file already written full of zeros and synced (an *overwrite*: what the WAL does,
//!   its segments being zero-filled ahead of use), and
//! - a file that grows with every write (an *append*: what a log without preallocation
//!   would do, each sync also committing the file's new size and blocks), and
//! - the zero-filled file opened with `O_DSYNC`, each write durable when it completes,
//!   with no `fdatasync` after it (one operation a round instead of two).
//!
//! The durability issue asks for the p99 of a durable request to stay within the disk's
//! own p99 plus 500 µs; this prints the disk's figures for the same run.
//!
//! With `--seconds`, it then writes and syncs back to back into a zero-filled file for that
//! long, as group commit does under load, and prints three distributions of the same
//! rounds: each round's own time (the disk's `fdatasync` over as long as a benchmark's
//! measured window, where 2,000 rounds see a fifth of a second); what a request arriving
//! at a uniformly random moment would wait with this disk under an ideal group commit (the
//! end of the round after the one running when it arrives, which does not cover it); and
//! the end of the running round, a floor for any server that syncs from the same CPU. A
//! slow round is one among thousands, but every request that arrives during it waits for
//! it: the last two weigh each round by its length, as a server's requests do.
//!
//! Where the probe runs matters: on a disk with one interrupt (a virtio disk), each write
//! and flush is finished by kernel workers on the interrupt's CPU, which wait behind
//! whatever runs there, up to a scheduler tick (`docs/wal.md`, "What sets the half-load
//! tail under `sync`"). Run it on the CPU the shard will use.
//!
//! `cargo run --release -p stockplane-benches --bin fsync -- --dir target --syncs 2000 [--write-bytes 4096] [--gap-us 0] [--seconds 10]`

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use glommio::io::OpenOptions;
use glommio::{LocalExecutorBuilder, Placement};

/// Command-line arguments.
#[derive(Debug, Parser)]
struct Args {
    /// Directory for the two scratch files (removed afterwards).
    #[arg(long, default_value = "target")]
    dir: std::path::PathBuf,
    /// Write+sync rounds per file.
    #[arg(long, default_value_t = 2_000)]
    syncs: usize,
    /// Bytes written before each `fdatasync` (a multiple of 4096): the WAL writes what
    /// arrived during the previous round, a few KiB at low load, ~100 KiB at saturation.
    #[arg(long, default_value_t = BLOCK, value_parser = whole_blocks)]
    write_bytes: usize,
    /// Microseconds to wait between rounds (0: back to back): at low load the WAL writes
    /// one round per arrival, far apart.
    #[arg(long, default_value_t = 0)]
    gap_us: u64,
    /// Seconds of back-to-back overwrite rounds for the group-commit figures (0: none).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

const BLOCK: usize = 4096;

/// `--write-bytes`: O_DIRECT writes whole blocks.
fn whole_blocks(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(bytes) if bytes > 0 && bytes.is_multiple_of(BLOCK) => Ok(bytes),
        _ => Err(format!("must be a positive multiple of {BLOCK}")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{}",
        stockplane_loadgen::machine::report_header("stockplane fdatasync latency (benches/src/bin/fsync.rs)")
    );
    println!(
        "parameters: {} rounds of one {}-byte O_DIRECT write (+ fdatasync) per file, {} us apart, in {}",
        args.syncs,
        args.write_bytes,
        args.gap_us,
        args.dir.display()
    );
    let (dir, syncs, write_bytes) = (args.dir.clone(), args.syncs, args.write_bytes);
    let gap = Duration::from_micros(args.gap_us);
    let seconds = Duration::from_secs(args.seconds);
    let result = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(move || async move {
            measure(&dir, syncs, write_bytes, gap).await?;
            if !seconds.is_zero() {
                group_commit(&dir, seconds, write_bytes).await?;
            }
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("start an executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("the executor failed: {e:?}"))?;
    result
}

/// Zero-filled bytes that the group-commit rounds go round (overwrites of blocks the file
/// owns, as the WAL's).
const GROUP_COMMIT_FILE_BYTES: usize = 16 << 20;
/// Arrivals are taken this far apart (µs) over the rounds' whole span.
const ARRIVAL_STEP_US: f64 = 1.0;

/// Back-to-back overwrite rounds for `seconds`, then the rounds' own times and what a
/// uniformly random arrival would wait for (see the module's documentation).
async fn group_commit(dir: &std::path::Path, seconds: Duration, write_bytes: usize) -> anyhow::Result<()> {
    let path = dir.join(format!("fsync-group-{}.tmp", std::process::id()));
    let file = create_scratch(&path, 0).await?;
    let bytes = GROUP_COMMIT_FILE_BYTES.max(write_bytes);
    zero_fill(&file, bytes).await?;
    // Each round's start and end, in µs from the first.
    let mut rounds: Vec<(f64, f64)> = Vec::new();
    let origin = Instant::now();
    let mut offset = 0;
    while origin.elapsed() < seconds {
        let mut buffer = file.alloc_dma_buffer(write_bytes);
        buffer.as_bytes_mut().fill(rounds.len() as u8 | 1);
        let started = origin.elapsed();
        file.write_at(buffer, offset as u64).await.map_err(std::io::Error::from)?;
        file.fdatasync().await.map_err(std::io::Error::from)?;
        rounds.push((started.as_secs_f64() * 1e6, origin.elapsed().as_secs_f64() * 1e6));
        offset = (offset + write_bytes) % (bytes - bytes % write_bytes);
    }
    file.close().await.map_err(std::io::Error::from)?;
    std::fs::remove_file(&path)?;
    let mut own: Vec<f64> = rounds.iter().map(|(start, end)| end - start).collect();
    own.sort_by(f64::total_cmp);
    let slow = |us: f64| own.iter().filter(|&&t| t > us).count();
    let slow_time: f64 = own.iter().filter(|&&t| t > 2000.0).sum();
    let span = rounds.last().map_or(0.0, |r| r.1);
    println!(
        "group commit on this disk: {} back-to-back rounds of one {write_bytes}-byte overwrite + fdatasync in {:.1} s",
        rounds.len(),
        span / 1e6
    );
    println!("  each round, us: {}", quantiles(&own));
    println!(
        "  rounds over 1 ms: {}, over 2 ms: {}, over 10 ms: {}; time inside rounds over 2 ms: {:.1} ms ({:.2}% of the run)",
        slow(1000.0),
        slow(2000.0),
        slow(10_000.0),
        slow_time / 1e3,
        100.0 * slow_time / span.max(1.0)
    );
    let (mut waits, mut floor) = arrival_waits(&rounds, ARRIVAL_STEP_US);
    waits.sort_by(f64::total_cmp);
    floor.sort_by(f64::total_cmp);
    println!(
        "  a request arriving at a random moment, until the round after the running one is durable (group commit), us: {}",
        quantiles(&waits)
    );
    println!("  the same arrivals, until the running round is durable (a floor for any server syncing from this CPU), us: {}", quantiles(&floor));
    Ok(())
}

/// Creates (or empties) the scratch file `path` for direct I/O, with the open `flags`.
async fn create_scratch(path: &std::path::Path, flags: libc::c_int) -> anyhow::Result<glommio::io::DmaFile> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(flags)
        .dma_open(path)
        .await
        .map_err(std::io::Error::from)
        .with_context(|| format!("create {}", path.display()))
}

/// Writes `bytes` of zeros from the start of `file` and syncs them, so that later writes
/// overwrite blocks the file owns.
async fn zero_fill(file: &glommio::io::DmaFile, bytes: usize) -> anyhow::Result<()> {
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(1 << 20);
        let mut buffer = file.alloc_dma_buffer(n);
        buffer.as_bytes_mut().fill(0);
        file.write_at(buffer, at as u64).await.map_err(std::io::Error::from)?;
        at += n;
    }
    file.fdatasync().await.map_err(std::io::Error::from)?;
    Ok(())
}

/// p50 to max of sorted `samples` (µs), as every figure of this probe is printed.
fn quantiles(samples: &[f64]) -> String {
    if samples.is_empty() {
        return "no samples".to_string();
    }
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!(
        "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    )
}

/// What arrivals every `step` µs from the first round's start to the last round's start
/// wait, given back-to-back `rounds` (start, end). One arriving while round k runs (from
/// its start to the next one's) is covered by round k + 1, so under group commit it waits
/// until that round ends (the first of the two vectors). A server syncing from the same
/// CPU cannot answer it before round k ends either, since what slows a round slows every
/// flush issued beside it: the second vector, until the running round ends, is a floor
/// for any way of syncing from there.
fn arrival_waits(rounds: &[(f64, f64)], step: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut next, mut running) = (Vec::new(), Vec::new());
    let Some(first) = rounds.first() else { return (next, running) };
    let mut t = first.0;
    for pair in rounds.windows(2) {
        let ((_, end), (next_start, next_end)) = (pair[0], pair[1]);
        while t < next_start {
            next.push(next_end - t);
            running.push((end - t).max(0.0));
            t += step;
        }
    }
    (next, running)
}

async fn measure(dir: &std::path::Path, syncs: usize, write_bytes: usize, gap: Duration) -> anyhow::Result<()> {
    let cases = [
        ("overwrite (zero-filled, synced file): write+fdatasync", true, false),
        ("append (growing file): write+fdatasync", false, false),
        ("overwrite, O_DSYNC (the write is the sync): write", true, true),
    ];
    for (name, preallocate, dsync) in cases {
        let path = dir.join(format!("fsync-bench-{}.tmp", std::process::id()));
        let file = create_scratch(&path, if dsync { libc::O_DSYNC } else { 0 }).await?;
        if preallocate {
            zero_fill(&file, syncs * write_bytes).await?;
        }
        let mut samples: Vec<Duration> = Vec::with_capacity(syncs);
        for round in 0..syncs {
            let mut buffer = file.alloc_dma_buffer(write_bytes);
            buffer.as_bytes_mut().fill(round as u8 | 1);
            let started = Instant::now();
            file.write_at(buffer, (round * write_bytes) as u64).await.map_err(std::io::Error::from)?;
            if !dsync {
                file.fdatasync().await.map_err(std::io::Error::from)?;
            }
            samples.push(started.elapsed());
            if !gap.is_zero() {
                glommio::timer::sleep(gap).await;
            }
        }
        file.close().await.map_err(std::io::Error::from)?;
        std::fs::remove_file(&path)?;
        let mut us: Vec<f64> = samples.iter().map(|sample| sample.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        println!("{name} us: {}", quantiles(&us));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arrival_waits_for_the_round_after_the_running_one() {
        // Rounds 0 to 3 of 10 µs, 10 µs, 100 µs and 10 µs, back to back.
        let rounds = [(0.0, 10.0), (10.0, 20.0), (20.0, 120.0), (120.0, 130.0)];
        let (waits, floor) = arrival_waits(&rounds, 1.0);
        // Arrivals at 0..120 µs: 120 of them.
        assert_eq!(waits.len(), 120);
        assert_eq!(floor.len(), 120);
        // At 0 µs: round 1 covers it, ending at 20.
        assert_eq!(waits[0], 20.0);
        // At 15 µs: round 2 (the slow one) covers it, ending at 120.
        assert_eq!(waits[15], 105.0);
        // At 119 µs: round 3 covers it, ending at 130.
        assert_eq!(waits[119], 11.0);
        // The slow round is one of four, but every arrival in it or just before it waits
        // for it to end: 100 of the 120 arrivals wait longer than 20 µs, two fast rounds.
        assert_eq!(waits.iter().filter(|&&w| w > 20.0).count(), 100);
        // The floor: until the running round ends (at 15 µs, round 1's end at 20).
        assert_eq!((floor[0], floor[15], floor[119]), (10.0, 5.0, 1.0));
        assert_eq!(floor.iter().filter(|&&w| w > 10.0).count(), 90);
    }

    #[test]
    fn quantiles_name_the_sorted_samples() {
        let samples: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(quantiles(&samples), "p50 501.0  p90 901.0  p99 991.0  p99.9 1000.0  max 1000.0");
        assert_eq!(quantiles(&[]), "no samples");
    }
}
