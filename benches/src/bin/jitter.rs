//! How much of its time a CPU of this machine is not given to the thread pinned on it:
//! a loop that does nothing but read the monotonic clock, and counts every gap between
//! two reads longer than `--gap-us` (the hypervisor or the kernel took the CPU away).
//!
//! A server on that CPU cannot answer faster than it runs: a request that arrives during
//! a gap waits for its end. The fraction of instants that fall more than 500 µs before a
//! gap ends is therefore a floor, for any server, on the share of requests slower than
//! 500 µs; the server issue's p99 target needs it well under 1%.
//!
//! With `--cpus 1,0` it watches several CPUs at the same time, one pinned thread each.
//! That is a different question: whether the machine gives all its CPUs at once. This
//! virtual machine does not always (measured on 2026-12-07: alone, a CPU lost at most
//! 0.3 ms at a time; both watched at once, each lost up to 101 ms every few seconds, as
//! a CPU quota of the VM would), so a server and a load generator that both keep their
//! CPU busy stall together.
//!
//! With `--disk DIR` as well, a thread pinned to the first of those CPUs writes and syncs
//! a file in `DIR` the way the WAL does (`O_DIRECT` writes of `--disk-write-bytes` into
//! a zero-filled, synced file, each followed by `fdatasync`, back to back) while the CPUs
//! are watched. On a virtual machine whose disk is served by the host's CPUs, that I/O
//! can cost the guest CPU time it never sees as its own work. Measured on 2026-12-07 (an
//! AMD EPYC guest under Firecracker, 2 vCPUs, `--cpus 1,0`, 6 s, twice each): with the
//! disk idle, CPU 0 lost 6.1 and 6.7% of its time and the hypervisor stole 0.3 to 1.2%;
//! with 1,600 to 1,900 writes of 64 KiB a second from CPU 1, CPU 0, which ran none of it,
//! lost 13.4 and 21.7%, and the steal was 9.2 and 17.7% there (16.2 and 18.8% on CPU 1,
//! where the loop itself took 9%). The report prints the loop's own CPU time (which its
//! CPU's watcher also loses) and the steal of every CPU over the window.
//!
//! `taskset -c 0 cargo run --release -p stockplane-benches --bin jitter -- --seconds 10`

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rkyv::util::AlignedVec;
use stockplane_loadgen::machine::Stolen;

/// Command-line arguments.
#[derive(Debug, Parser)]
struct Args {
    /// How long to watch the clock.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The shortest interval between two clock reads counted as a gap, in microseconds
    /// (at least 1: a read takes tens of nanoseconds, and every one is not a gap).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    gap_us: u64,
    /// CPUs to watch at the same time, one thread pinned to each (`1,0`); without it the
    /// calling thread watches wherever it runs (pin it with `taskset`).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// While watching (with `--cpus`), write and sync a scratch file in this directory
    /// from a thread pinned to the first CPU, as the WAL does (the file is unlinked as
    /// soon as it is open, so nothing is left behind).
    #[arg(long, requires = "cpus")]
    disk: Option<PathBuf>,
    /// Bytes each write of `--disk` puts down before its `fdatasync` (a multiple of 4096).
    #[arg(long, default_value_t = 65536, value_parser = parse_write_bytes)]
    disk_write_bytes: usize,
}

/// The size of the `--disk` scratch file: writes wrap around in it.
const DISK_FILE_BYTES: usize = 64 << 20;

/// A `--disk-write-bytes`: a positive multiple of 4096, at most `DISK_FILE_BYTES`.
fn parse_write_bytes(text: &str) -> Result<usize, String> {
    let bytes: usize = text.parse().map_err(|error| format!("{error}"))?;
    if bytes == 0 || !bytes.is_multiple_of(4096) || bytes > DISK_FILE_BYTES {
        return Err(format!("{bytes} is not a multiple of 4096 between 4096 and {DISK_FILE_BYTES}"));
    }
    Ok(bytes)
}

/// The delays a report gives the share of: an instant is delayed by `d` when the CPU
/// comes back to the thread more than `d` after it.
const DELAYS_US: [u64; 4] = [100, 500, 1_000, 5_000];

/// Gap lengths counted per bucket: [lower, upper) in microseconds.
const BUCKETS_US: [(u64, u64); 5] = [(0, 100), (100, 500), (500, 1_000), (1_000, 5_000), (5_000, u64::MAX)];

fn main() {
    let args = Args::parse();
    println!("{}", stockplane_loadgen::machine::report_header("stockplane CPU jitter (benches/src/bin/jitter.rs)"));
    let watch = Duration::from_secs_f64(args.seconds);
    let gap = Duration::from_micros(args.gap_us);
    println!("parameters: {:.1} s of clock reads; a gap is {} us or more between two reads", args.seconds, args.gap_us);
    if args.cpus.is_empty() {
        let gaps = watch_clock(watch, gap);
        print!("{}", summarize(watch, &gaps));
        return;
    }
    println!("watching CPUs {:?} at the same time, one pinned thread each", args.cpus);
    let disk = match &args.disk {
        None => None,
        Some(dir) => match DiskLoad::start(dir, args.cpus[0], args.disk_write_bytes) {
            Ok(load) => Some(load),
            Err(error) => {
                eprintln!("the disk load in {}: {error:#}", dir.display());
                std::process::exit(1);
            }
        },
    };
    let stolen_before = Stolen::sample();
    let watchers: Vec<_> = args
        .cpus
        .iter()
        .map(|&cpu| {
            std::thread::spawn(move || {
                stockplane_dataplane::server::pin_to_cpu(cpu)
                    .map_err(|error| format!("pin a thread to CPU {cpu}: {error}"))?;
                Ok::<_, String>(watch_clock(watch, gap))
            })
        })
        .collect();
    let mut failed = false;
    for (cpu, watcher) in args.cpus.iter().zip(watchers) {
        match watcher.join().expect("a watcher thread panicked") {
            Ok(gaps) => print!("CPU {cpu}:\n{}", summarize(watch, &gaps)),
            Err(error) => {
                eprintln!("{error}");
                failed = true;
            }
        }
    }
    if let Some(load) = disk {
        match load.stop() {
            Ok(line) => println!("{line}"),
            Err(error) => {
                eprintln!("the disk load: {error:#}");
                failed = true;
            }
        }
    }
    match (stolen_before, Stolen::sample()) {
        (Ok(before), Ok(after)) => {
            println!("{}", Stolen::between(watch, &before, &after).line("the window"))
        }
        (Err(error), _) | (_, Err(error)) => eprintln!("steal not read: {error:#}"),
    }
    if failed {
        std::process::exit(1);
    }
}

/// The WAL's write pattern on a scratch file, from a pinned thread, until stopped.
struct DiskLoad {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<String>>,
}

impl DiskLoad {
    /// Creates, zero-fills and syncs the scratch file (before returning, so that none of
    /// that overlaps the watch), then writes and syncs it from a thread on `cpu`.
    fn start(dir: &Path, cpu: usize, write_bytes: usize) -> anyhow::Result<DiskLoad> {
        let path = dir.join(format!("jitter-disk-{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .with_context(|| format!("create {}", path.display()))?;
        // Unlinked at once: nothing is left behind, whatever happens.
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        // O_DIRECT takes block-aligned memory.
        let mut buffer = AlignedVec::<4096>::with_capacity(1 << 20);
        buffer.resize(1 << 20, 0);
        for at in (0..DISK_FILE_BYTES).step_by(1 << 20) {
            file.write_all_at(&buffer, at as u64).context("zero-fill the scratch file")?;
        }
        file.sync_all().context("sync the scratch file")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            stockplane_dataplane::server::pin_to_cpu(cpu).with_context(|| format!("pin the disk load to CPU {cpu}"))?;
            buffer.fill(0xa5);
            run_disk_load(&file, &buffer[..write_bytes], &stopping, cpu)
        });
        Ok(DiskLoad { stop, thread })
    }

    /// Stops the load; returns its summary line.
    fn stop(self) -> anyhow::Result<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("the disk load thread panicked"))?
    }
}

/// Writes `data` and syncs it, back to back, wrapping around in `file`, until `stop`;
/// returns the summary line.
fn run_disk_load(file: &File, data: &[u8], stop: &AtomicBool, cpu: usize) -> anyhow::Result<String> {
    let started = Instant::now();
    let cpu_before = thread_cpu_time();
    let (mut rounds, mut at) = (0u64, 0usize);
    // At least one round, however soon it is stopped.
    loop {
        file.write_all_at(data, at as u64).context("write the scratch file")?;
        file.sync_data().context("fdatasync the scratch file")?;
        rounds += 1;
        at = (at + data.len()) % (DISK_FILE_BYTES - DISK_FILE_BYTES % data.len());
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let busy = (thread_cpu_time() - cpu_before).as_secs_f64();
    Ok(format!(
        "disk load on CPU {cpu}: {rounds} writes of {} bytes, each followed by fdatasync, in {elapsed:.1} s \
         ({:.0} a second, {:.1} MB/s); its own CPU time {:.1}% of one CPU",
        data.len(),
        rounds as f64 / elapsed,
        rounds as f64 * data.len() as f64 / elapsed / 1e6,
        100.0 * busy / elapsed
    ))
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// Reads the clock in a loop for `watch`; returns every interval of `gap` or longer.
fn watch_clock(watch: Duration, gap: Duration) -> Vec<Duration> {
    let mut gaps = Vec::with_capacity(1 << 16);
    let started = Instant::now();
    let mut last = started;
    loop {
        let now = Instant::now();
        let since = now - last;
        if since >= gap {
            gaps.push(since);
        }
        last = now;
        if now - started >= watch {
            return gaps;
        }
    }
}

/// The share of the instants in `total` that wait more than `delay` for the CPU: within
/// a gap `g`, the first `g - delay` of it.
fn delayed_share(total: Duration, gaps: &[Duration], delay: Duration) -> f64 {
    let late: Duration = gaps.iter().map(|g| g.saturating_sub(delay)).sum();
    late.as_secs_f64() / total.as_secs_f64()
}

/// The report: time lost, gaps per length, and the delayed share for each of `DELAYS_US`.
fn summarize(total: Duration, gaps: &[Duration]) -> String {
    let lost: Duration = gaps.iter().sum();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    let mut out = format!(
        "lost: {:.3}% of {:.1} s in {} gaps; longest {} us\n",
        100.0 * lost.as_secs_f64() / total.as_secs_f64(),
        total.as_secs_f64(),
        gaps.len(),
        longest.as_micros()
    );
    out.push_str("gaps by length:\n");
    for (low, high) in BUCKETS_US {
        let count =
            gaps.iter().filter(|g| (low..high).contains(&u64::try_from(g.as_micros()).unwrap_or(u64::MAX))).count();
        let range = if high == u64::MAX { format!(">= {low} us") } else { format!("{low}..{high} us") };
        out.push_str(&format!("  {range:>16}: {count}\n"));
    }
    out.push_str("share of instants that wait for the CPU longer than (a floor on a server's tail there):\n");
    for delay in DELAYS_US {
        let share = delayed_share(total, gaps, Duration::from_micros(delay));
        out.push_str(&format!("  {delay:>6} us: {:.4}%\n", 100.0 * share));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn an_instant_is_delayed_only_by_the_part_of_a_gap_beyond_the_delay() {
        // One second with a 2 ms gap and a 300 us gap: 1.5 ms of instants wait > 500 us.
        let gaps = [us(2_000), us(300)];
        let share = delayed_share(Duration::from_secs(1), &gaps, us(500));
        assert!((share - 0.0015).abs() < 1e-12, "{share}");
        assert_eq!(delayed_share(Duration::from_secs(1), &gaps, us(5_000)), 0.0);
    }

    #[test]
    fn the_report_counts_each_gap_in_the_bucket_of_its_length() {
        let gaps = [us(50), us(100), us(700), us(7_000)];
        let report = summarize(Duration::from_secs(1), &gaps);
        assert!(report.contains("in 4 gaps; longest 7000 us"), "{report}");
        assert!(report.contains("0..100 us: 1\n"), "{report}");
        assert!(report.contains("100..500 us: 1\n"), "{report}");
        assert!(report.contains("500..1000 us: 1\n"), "{report}");
        assert!(report.contains("1000..5000 us: 0\n"), "{report}");
        assert!(report.contains(">= 5000 us: 1\n"), "{report}");
        // 7 ms + 0.7 ms + 0.1 ms + 0.05 ms of 1 s.
        assert!(report.contains("lost: 0.785% of 1.0 s"), "{report}");
    }

    #[test]
    fn disk_writes_are_whole_blocks_that_fit_in_the_file() {
        assert_eq!(parse_write_bytes("4096"), Ok(4096));
        assert_eq!(parse_write_bytes("65536"), Ok(65536));
        for bad in ["0", "1000", "4097", "134217728", "-4096", "many"] {
            assert!(parse_write_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_disk_load_writes_and_syncs_and_leaves_nothing_behind() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&dir).unwrap();
        let load = DiskLoad::start(&dir, 0, 8192).unwrap();
        let scratch = format!("jitter-disk-{}.tmp", std::process::id());
        assert!(!dir.join(&scratch).exists(), "the scratch file is unlinked once open");
        let line = load.stop().unwrap();
        assert!(line.starts_with("disk load on CPU 0: "), "{line}");
        assert!(line.contains(" writes of 8192 bytes, each followed by fdatasync"), "{line}");
        let rounds: u64 = line["disk load on CPU 0: ".len()..].split(' ').next().unwrap().parse().unwrap();
        assert!(rounds >= 1, "{line}");
    }
}
