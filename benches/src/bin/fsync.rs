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
//! `cargo run --release -p stockplane-benches --bin fsync -- --dir target --syncs 2000 [--write-bytes 4096] [--gap-us 0]`

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
    let result = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(move || async move { measure(&dir, syncs, write_bytes, gap).await })
        .map_err(|e| anyhow::anyhow!("start an executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("the executor failed: {e:?}"))?;
    result
}

async fn measure(dir: &std::path::Path, syncs: usize, write_bytes: usize, gap: Duration) -> anyhow::Result<()> {
    let cases = [
        ("overwrite (zero-filled, synced file): write+fdatasync", true, false),
        ("append (growing file): write+fdatasync", false, false),
        ("overwrite, O_DSYNC (the write is the sync): write", true, true),
    ];
    for (name, preallocate, dsync) in cases {
        let path = dir.join(format!("fsync-bench-{}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(if dsync { libc::O_DSYNC } else { 0 })
            .dma_open(&path)
            .await
            .map_err(std::io::Error::from)
            .with_context(|| format!("create {}", path.display()))?;
        if preallocate {
            let bytes = syncs * write_bytes;
            let mut at = 0;
            while at < bytes {
                let n = (bytes - at).min(1 << 20);
                let mut buffer = file.alloc_dma_buffer(n);
                buffer.as_bytes_mut().fill(0);
                file.write_at(buffer, at as u64).await.map_err(std::io::Error::from)?;
                at += n;
            }
            file.fdatasync().await.map_err(std::io::Error::from)?;
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
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
        println!(
            "{name} us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            at(0.50),
            at(0.90),
            at(0.99),
            at(0.999),
            samples.last().unwrap().as_secs_f64() * 1e6
        );
    }
    Ok(())
}
