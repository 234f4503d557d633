//! One shard's write-ahead log on disk: segments of preallocated, zero-filled files written
//! with O_DIRECT through io_uring (glommio DMA files), group commit, and recovery.
//!
//! Layout: `<data_dir>/shard-<k>/wal-<sequence>.seg`, sequence in 16 hex digits from 1,
//! each file exactly `segment_bytes` long. Records (`docs/wal.md`) follow each other from
//! byte 0; a record never spans two segments; the rest of a segment is zeros. Because a
//! segment is written full of zeros (and synced) before its first record, an `fdatasync`
//! only overwrites blocks the file already owns and never changes its metadata, which is
//! what makes it cheap (about 0.1 ms here instead of 0.3 ms for an appending one).
//!
//! Group commit: the core appends what the engine emits to `WalQueue`; the writer task
//! takes everything queued, writes it in one `write_at` (rewriting the partly filled last
//! block with its new tail), then `fdatasync`s it, and tells the core which position is
//! now durable. The next batch is written while that sync runs (`write_unsynced`, then
//! `sync` of `file`; see the writer task in `server.rs`): no timer adds latency at low
//! load, and one sync covers many records at high load.
//!
//! Recovery reads every segment in order (plain reads, before the core serves), cuts a
//! torn tail of the last segment (zeroing it on disk, so that it cannot resurface), and
//! gives the records to `Shard::recover`. Damage before the tail is an error naming the
//! file and the offset, unless the operator asks to cut the log there.
//!
//! After a failed write or sync nothing more is written and nothing more becomes durable:
//! the core answers state changes `Unavailable` and `/readyz` says why.

use std::cell::RefCell;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use glommio::io::{DmaFile, OpenOptions};
use rkyv::util::AlignedVec;
use stockplane_engine::{RecoverError, Shard, ShardConfig, Tick};
use tracing::{info, warn};

/// O_DIRECT alignment we write with (the file's own alignment is checked at open).
pub(crate) const BLOCK: u64 = 4096;
/// Bytes written (zeros of a new segment; a snapshot's, each chunk synced) or read (a
/// segment a snapshot replays) per call at the whole disk's pace: before any core serves
/// (recovery), when the writer waits for its next segment, and at [`DiskShare::ALL`]
/// (tools, benchmarks, tests).
const FULL_IO_CHUNK: usize = 1 << 20;
/// Bytes written or read per call beside a serving log: what a log `fdatasync` may find
/// ahead of it in the disk's queue and cache, at most.
///
/// The next segment is zero-filled while the log fills the open one. Written as fast as
/// the disk takes them, in 1 MiB calls, the zeros of a 64 MiB segment filled the disk's
/// write cache, and every `fdatasync` of the log that ran meanwhile waited for them to be
/// flushed too: group commit stalled for 20 to 100 ms in each segment at saturation. So
/// the preparation keeps pace with the log instead: one chunk at a time, and no further
/// than `PREPARE_LEAD_DIVISOR`'s share of a segment ahead of the log's own end in the open
/// segment (it waits `PACED_ZERO_GAP` while it is that far ahead). Each of the log's syncs
/// then finds at most a chunk or two of zeros in the cache with its records, and the
/// segment is ready that share of a segment before the log needs it. A snapshot beside
/// the log reads and writes the same chunks, paced by its share of the disk's time
/// ([`DiskShare`]).
const PACED_IO_CHUNK: usize = 128 << 10;
const PACED_ZERO_GAP: std::time::Duration = std::time::Duration::from_millis(1);
const PREPARE_LEAD_DIVISOR: u64 = 4;
/// Segments the log let go that are kept, renamed `spare-<sequence>.seg`, for the writer
/// to zero and use again as its next segment; more are deleted. Deleting a segment frees
/// its blocks, and on a file system mounted with `discard` (the benchmark guest's) that
/// sends the disk a discard of the whole segment, which the log's `fdatasync`s then
/// wait behind: in a probe on that guest, unlinking a 64 MiB file and syncing its
/// directory took 14 ms and stalled a loop of synced 16 KiB writes for as long, where
/// renaming it took 0.3 ms; at 800 k requests/s the server's batches took 22 to 24 ms
/// while a snapshot deleted the segments it covered. In a steady state the writer uses
/// about as many segments between two snapshots as each snapshot lets go.
const SPARE_SEGMENTS_MAX: usize = 8;
/// Bytes read from a segment's start to find its first record (a record is at most
/// `u16::MAX` bytes long).
const FIRST_RECORD_READ: usize = 1 << 16;

/// How acknowledgements relate to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A reply to a state change leaves only after an `fdatasync` that covers it.
    Sync,
    /// Replies leave at once; the log is synced every this many milliseconds, so that at
    /// most that much acknowledged work is lost with the machine.
    Batch {
        /// Milliseconds between syncs.
        ms: u32,
    },
    /// Nothing is written: every restart starts empty. For benchmarks that measure the
    /// server without its disk, never for service.
    None,
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(text: &str) -> Result<Durability, String> {
        match text {
            "sync" => Ok(Durability::Sync),
            "none" => Ok(Durability::None),
            _ => match text.strip_prefix("batch=").map(str::parse::<u32>) {
                Some(Ok(ms)) if ms > 0 => Ok(Durability::Batch { ms }),
                _ => Err(format!("durability must be \"sync\", \"batch=<ms>\" with ms > 0, or \"none\", not {text:?}")),
            },
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Durability::Sync => write!(f, "sync"),
            Durability::Batch { ms } => write!(f, "batch={ms}"),
            Durability::None => write!(f, "none"),
        }
    }
}

/// The share of the disk's time that a snapshot's own reads and writes may take beside a
/// serving log (`wal.snapshot_disk_percent`).
///
/// A log `fdatasync` waits for whatever else is in the disk's queue and write cache. A
/// snapshot that reads a segment with the kernel's readahead (8 MiB on the benchmark
/// machine's disk), or writes 1 MiB and syncs it, as fast as the disk goes, puts that much
/// ahead of every log sync. Measured on the benchmark machine (a loop of 16 KiB O_DIRECT
/// writes, each synced with `fdatasync`, beside one other writer or reader): the loop's
/// sync p99 went from 0.23 to 0.61 ms alone to 5 to 6.6 ms beside 1 MiB synced writes
/// (650 MB/s), and to 3.6 to 5.6 ms beside 1 MiB reads with a 1 ms pause after each (the
/// snapshot's pace before this share); beside 128 KiB synced writes that took an eighth of
/// the time (34 MB/s), 0.35 and 0.61 ms. So a paced snapshot reads and writes
/// `PACED_IO_CHUNK` at a time, without readahead, and after each waits so that its I/O is
/// busy this share of the time: on a fast disk it goes fast, on a slow one it yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskShare(u8);

impl DiskShare {
    /// The whole disk: no pause, larger chunks (tools, benchmarks and tests).
    pub const ALL: DiskShare = DiskShare(100);

    /// `percent` of the disk's time, 1 to 100.
    pub fn percent(percent: u8) -> anyhow::Result<DiskShare> {
        if !(1..=100).contains(&percent) {
            bail!("a snapshot's share of the disk must be 1 to 100 percent, not {percent}");
        }
        Ok(DiskShare(percent))
    }

    fn paced(self) -> bool {
        self.0 < 100
    }

    /// Bytes to read, or write and sync, at a time.
    fn chunk(self) -> usize {
        if self.paced() {
            PACED_IO_CHUNK
        } else {
            FULL_IO_CHUNK
        }
    }

    /// How long to wait after I/O that kept the disk busy for `busy`, so that the I/O
    /// takes this share of the time.
    pub fn rest(self, busy: std::time::Duration) -> std::time::Duration {
        busy * u32::from(100 - self.0) / u32::from(self.0)
    }

    /// Waits out [`DiskShare::rest`] for I/O that started at `started`.
    fn yield_after(self, started: std::time::Instant) {
        if self.paced() {
            std::thread::sleep(self.rest(started.elapsed()));
        }
    }
}

/// How far apart group commit's rounds start while the core is busy
/// (`wal.busy_round_interval_us`).
///
/// Each round costs the serving core a fixed price whatever it carries: a write and an
/// `fdatasync` submitted through io_uring (the sync on one of the kernel's io-wq workers,
/// woken on the core's CPU), the disk's doorbell (a VM exit on a virtual machine), and two
/// completion interrupts. Profiled on the benchmark guest at sync saturation, with rounds
/// back to back (about 1,000 a second, each ~85 KB), that price was most of the 85 ns per
/// request that the kernel spent beyond `--durability none`'s. A round therefore waits
/// until `interval` after the previous one started, but only while the core has been
/// serving (datagrams, replies) at least `BUSY_PERCENT` of the time, on average over the
/// last `SMOOTHING` or so: then CPU is what limits it, and a later round carries more
/// records for the same price. Below that the round starts as soon as the previous one
/// allows, as before: at low and moderate load nothing waits on a timer. The average, not
/// one round's share, decides: at 800,000 requests/s (about half of sync saturation) on
/// the benchmark guest the share since the previous round was 0.54 at the median but 0.75
/// or more in about one round of a hundred (a burst, or the core's thread preempted in
/// the middle of serving); at saturation it was 0.80 on average. With the average and
/// 75%, 1 to 88 rounds of about 50,000 waited at 800,000 requests/s, and 93 to 95% of
/// them at saturation.
#[derive(Debug, Clone, Copy)]
pub struct RoundSpacing {
    interval: std::time::Duration,
    /// The share of the time spent serving, averaged over about `SMOOTHING`.
    busy: f64,
}

impl RoundSpacing {
    /// The average share of the time, in percent, that the core must have spent serving
    /// for rounds to wait.
    pub const BUSY_PERCENT: u32 = 75;
    /// The time constant of the average.
    pub const SMOOTHING: std::time::Duration = std::time::Duration::from_millis(10);

    /// Rounds at least `interval` apart while busy; zero: never wait.
    pub fn new(interval: std::time::Duration) -> RoundSpacing {
        RoundSpacing { interval, busy: 0.0 }
    }

    /// Adds `elapsed` of time, of which the core was busy `busy`, to the average.
    pub fn observe(&mut self, elapsed: std::time::Duration, busy: std::time::Duration) {
        if elapsed.is_zero() {
            return;
        }
        let share = (busy.as_secs_f64() / elapsed.as_secs_f64()).min(1.0);
        let weight = 1.0 - (-elapsed.as_secs_f64() / Self::SMOOTHING.as_secs_f64()).exp();
        self.busy += weight * (share - self.busy);
    }

    /// How long the next round waits, when the previous one started `since` ago.
    pub fn wait(&self, since: std::time::Duration) -> std::time::Duration {
        if since >= self.interval || self.busy * 100.0 < f64::from(Self::BUSY_PERCENT) {
            return std::time::Duration::ZERO;
        }
        self.interval - since
    }
}

/// glommio's errors as `std::io::Error` (glommio's own type is not `Sync`).
fn io(error: glommio::GlommioError<()>) -> std::io::Error {
    error.into()
}

/// The directory of shard `shard`'s log.
pub fn shard_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("wal-{sequence:016x}.seg"))
}

/// The segments in `dir`, by sequence.
fn segments(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    numbered_files(dir, "wal-", ".seg")
}

/// Where a segment the log no longer needs waits to be used again (`spare-<sequence>.seg`,
/// the sequence it had).
fn spare_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("spare-{sequence:016x}.seg"))
}

fn spares(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    numbered_files(dir, "spare-", ".seg")
}

/// Whether the file at `path` is `segment_bytes` long.
fn segment_sized(path: &Path, segment_bytes: u64) -> anyhow::Result<bool> {
    Ok(fs::metadata(path).with_context(|| format!("look at {}", path.display()))?.len() == segment_bytes)
}

/// Lets go of the file of segment `sequence` at `path`: renamed a spare while fewer than
/// `SPARE_SEGMENTS_MAX` wait (`spares` counts them), else deleted.
fn let_go(dir: &Path, sequence: u64, path: &Path, spares: &mut usize) -> anyhow::Result<()> {
    if *spares < SPARE_SEGMENTS_MAX {
        fs::rename(path, spare_path(dir, sequence)).with_context(|| format!("rename {}", path.display()))?;
        *spares += 1;
    } else {
        fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// Lets go of the next segments a stop left half prepared (`wal-<n>.tmp` of
/// `segment_bytes`: a spare or a new file, partly zeroed) as of segments the log no longer
/// needs: they own their blocks, and deleting them would free (and discard) those. The
/// next preparation zeroes a spare whole before it becomes a segment. Shorter ones are
/// left to `remove_temporaries`.
fn spare_half_prepared(dir: &Path, segment_bytes: u64) -> anyhow::Result<()> {
    let mut waiting = spares(dir)?.len();
    for (sequence, path) in numbered_files(dir, "wal-", ".tmp")? {
        if segment_sized(&path, segment_bytes)? {
            let_go(dir, sequence, &path, &mut waiting)?;
        }
    }
    Ok(())
}

/// Takes the oldest spare segment of `segment_bytes` as `temp` (renamed), and returns
/// whether there was one; spares of another size (`wal.segment_bytes` changed) are deleted.
fn take_spare(dir: &Path, temp: &Path, segment_bytes: u64) -> anyhow::Result<bool> {
    for (_, path) in spares(dir)? {
        if segment_sized(&path, segment_bytes)? {
            fs::rename(&path, temp).with_context(|| format!("rename {}", path.display()))?;
            return Ok(true);
        }
        fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(false)
}

/// The files in `dir` named `<prefix><16 hex digits><suffix>`, by that number.
fn numbered_files(dir: &Path, prefix: &str, suffix: &str) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(hex) = name.strip_prefix(prefix).and_then(|n| n.strip_suffix(suffix)) else { continue };
        let number = u64::from_str_radix(hex, 16).with_context(|| format!("file name {name}"))?;
        found.push((number, path));
    }
    found.sort();
    Ok(found)
}

/// The length of the records at the start of a segment: they end at the first record
/// header whose length is zero, or at the end of the bytes.
fn records_end(bytes: &[u8]) -> usize {
    let mut offset = 0;
    while offset + 2 <= bytes.len() {
        let len = u16::from_le_bytes([bytes[offset], bytes[offset + 1]]) as usize;
        if len == 0 {
            break;
        }
        if offset + len > bytes.len() {
            return bytes.len();
        }
        offset += len;
    }
    offset
}

/// Where the writer continues after recovery.
#[derive(Debug, Clone)]
pub struct WalStart {
    /// The shard's log directory.
    pub dir: PathBuf,
    /// The segment the writer continues in.
    pub sequence: u64,
    /// Bytes of records in the segment `sequence`.
    pub end: u64,
    /// The size of every segment.
    pub segment_bytes: u64,
    /// Segments before `sequence` with records after the newest snapshot's position:
    /// the log a new snapshot would include (a restart takes one at once when there are
    /// enough, so that a shard that restarts often still snapshots).
    pub closed_after_snapshot: u64,
}

/// Rebuilds shard `config.shard` from its newest valid snapshot and its log in
/// `data_dir` (creating an empty log if there is none). `cut_corrupt` cuts the log at a
/// damaged record instead of failing.
pub fn recover(
    data_dir: &Path,
    config: &ShardConfig,
    now: Tick,
    segment_bytes: u64,
    cut_corrupt: bool,
) -> anyhow::Result<(Shard, WalStart)> {
    let dir = shard_dir(data_dir, config.shard);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    spare_half_prepared(&dir, segment_bytes)?;
    remove_temporaries(&dir, "")?;
    let found = segments(&dir)?;
    if found.is_empty() {
        if let Some((_, path)) = snapshots(&dir)?.last() {
            bail!("{} exists but the log segments after it are gone: refusing to start without them", path.display());
        }
        prepare_segment(&dir, 1, segment_bytes, None, &AtomicBool::new(false))?;
        let shard = Shard::new(config, now)?;
        let start = WalStart { dir, sequence: 1, end: 0, segment_bytes, closed_after_snapshot: 0 };
        return Ok((shard, start));
    }
    // Each segment's records, concatenated; where each segment's bytes begin in `log`.
    let mut log = Vec::new();
    let mut starts = Vec::with_capacity(found.len());
    for (sequence, path) in &found {
        let bytes = read_segment(path, segment_bytes, DiskShare::ALL)?;
        // Earlier segments end at their first zero-length header (a damaged length there
        // makes the next segment's first position a gap: an error, never a silent cut).
        // The last segment goes to recovery whole: it tells a torn tail (nothing valid
        // after it) from damage (valid records after it) itself.
        let last = Some(sequence) == found.last().map(|(s, _)| s);
        let end = if last { bytes.len() } else { records_end(&bytes) };
        starts.push((*sequence, path.clone(), log.len(), end));
        log.extend_from_slice(&bytes[..end]);
    }
    let locate = |offset: usize| {
        let (_, path, start, _) = starts.iter().rev().find(|(_, _, start, _)| *start <= offset).expect("offset in log");
        (path.clone(), offset - start)
    };
    let (snapshot, base) = match newest_snapshot(&dir, config, now)? {
        Some((path, shard)) => (Some(path), shard),
        None => (None, Shard::new(config, now)?),
    };
    let snapshot_at = base.wal_head();
    let closed_after_snapshot = starts[..starts.len() - 1]
        .iter()
        .filter(|(_, _, start, end)| last_position(&log[*start..start + end]).is_some_and(|last| last > snapshot_at))
        .count() as u64;
    let (shard, valid) = match base.resume(&log) {
        Ok(recovered) => recovered,
        Err(RecoverError::Corrupt { offset, source }) if cut_corrupt => {
            let (path, at) = locate(offset);
            warn!(file = %path.display(), offset = at, error = %source, "cutting the log at a damaged record (--truncate-corrupt-tail)");
            let base = match &snapshot {
                Some(path) => Shard::from_snapshot(config, now, &read_snapshot(path)?)?,
                None => Shard::new(config, now)?,
            };
            base.resume(&log[..offset]).context("recover before the cut")?
        }
        Err(RecoverError::Corrupt { offset, source }) => {
            let (path, at) = locate(offset);
            bail!(
                "{} is damaged at byte {at}: {source}; start with --truncate-corrupt-tail to cut the log there \
                 (losing what follows)",
                path.display()
            );
        }
        Err(error @ RecoverError::Gap { .. }) if offset_is_first(&error) => {
            let after = snapshot.as_ref().map_or_else(|| "no snapshot".to_string(), |path| path.display().to_string());
            return Err(error).context(format!(
                "the log in {} starts after {after}: the segments in between are gone (a damaged newest snapshot \
                 whose log was already truncated?)",
                dir.display()
            ));
        }
        Err(error) => return Err(error).context(format!("replay the log in {}", dir.display())),
    };
    // Cut whatever follows the valid records: zero it on disk, drop later segments.
    let (sequence, path, start, end) = starts.iter().rev().find(|(_, _, start, _)| *start <= valid).cloned().unwrap();
    let valid_in_segment = (valid - start) as u64;
    let leftovers = log[valid..start + end].iter().any(|&b| b != 0);
    if leftovers || starts.last().map(|s| s.0) != Some(sequence) {
        warn!(file = %path.display(), offset = valid_in_segment, "cutting a torn or damaged log tail");
        zero_from(&path, valid_in_segment, segment_bytes)?;
        for (later, later_path, _, _) in starts.iter().filter(|s| s.0 > sequence) {
            warn!(file = %later_path.display(), sequence = later, "removing a segment after the cut");
            fs::remove_file(later_path)?;
        }
    }
    info!(
        shard = config.shard,
        snapshot = snapshot.as_ref().map(|path| path.display().to_string()),
        records = shard.wal_head(),
        bytes = valid,
        "log replayed"
    );
    let start = WalStart { dir, sequence, end: valid_in_segment, segment_bytes, closed_after_snapshot };
    Ok((shard, start))
}

/// True for a gap at the log's first record (the log starts too late), as opposed to
/// a record missing in the middle.
fn offset_is_first(error: &RecoverError) -> bool {
    matches!(error, RecoverError::Gap { offset: 0, .. })
}

/// Reads a whole segment and checks its size, in `share` of the disk's time
/// ([`DiskShare`]; recovery, before any core serves, reads at the whole disk's pace with
/// the kernel's readahead).
fn read_segment(path: &Path, segment_bytes: u64, share: DiskShare) -> anyhow::Result<Vec<u8>> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    if share.paced() {
        // Each read then reads its own chunk, and the pause after it is its share.
        // SAFETY: posix_fadvise only reads its arguments; the descriptor is open.
        let advised = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        if advised != 0 {
            warn!(file = %path.display(), error = %std::io::Error::from_raw_os_error(advised), "could not turn readahead off");
        }
    }
    let chunk = share.chunk();
    let mut bytes = Vec::with_capacity(segment_bytes as usize);
    loop {
        let before = bytes.len();
        let started = std::time::Instant::now();
        (&mut file).take(chunk as u64).read_to_end(&mut bytes).with_context(|| format!("read {}", path.display()))?;
        if bytes.len() == before {
            break;
        }
        share.yield_after(started);
    }
    if bytes.len() as u64 != segment_bytes {
        bail!(
            "{} is {} bytes, not the configured segment size {segment_bytes} (wal.segment_bytes changed?)",
            path.display(),
            bytes.len()
        );
    }
    Ok(bytes)
}

fn snapshot_path(dir: &Path, position: u64) -> PathBuf {
    dir.join(format!("snap-{position:016x}.snap"))
}

/// The snapshots in `dir`, by position.
fn snapshots(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    numbered_files(dir, "snap-", ".snap")
}

/// Removes the files whose name starts with `prefix` and ends in `.tmp`: a segment being
/// zero-filled or a snapshot being written when a crash or a failed round stopped it.
/// Never renamed into place, they were never part of the log.
fn remove_temporaries(dir: &Path, prefix: &str) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(prefix) && name.ends_with(".tmp") {
            warn!(file = %path.display(), "removing a file left half written");
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// A snapshot file's bytes, 16-byte aligned as the engine reads them.
fn read_snapshot(path: &Path) -> anyhow::Result<AlignedVec<16>> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(&bytes);
    Ok(aligned)
}

/// The newest snapshot in `dir` that loads for `config` (older ones are tried when a
/// newer one is damaged; each refusal is logged with its reason).
fn newest_snapshot(dir: &Path, config: &ShardConfig, now: Tick) -> anyhow::Result<Option<Loaded>> {
    newest_snapshot_and_skipped(dir, config, now).map(|(newest, _)| newest)
}

/// A snapshot file and the shard loaded from it.
type Loaded = (PathBuf, Shard);

/// [`newest_snapshot`], and the newer snapshots that did not load.
fn newest_snapshot_and_skipped(
    dir: &Path,
    config: &ShardConfig,
    now: Tick,
) -> anyhow::Result<(Option<Loaded>, Vec<PathBuf>)> {
    let mut skipped = Vec::new();
    for (_, path) in snapshots(dir)?.into_iter().rev() {
        let bytes = read_snapshot(&path)?;
        match Shard::from_snapshot(config, now, &bytes) {
            Ok(shard) => return Ok((Some((path, shard)), skipped)),
            Err(error) => {
                warn!(file = %path.display(), error = %error, "skipping a snapshot that does not load");
                skipped.push(path);
            }
        }
    }
    Ok((None, skipped))
}

/// What one background snapshot did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotDone {
    /// The new snapshot's file and position (`None`: nothing new to include).
    pub written: Option<(PathBuf, u64)>,
    /// Bytes of the new snapshot.
    pub bytes: u64,
    /// Log segments that two snapshots cover, gone from the log: kept as spares for the
    /// writer to reuse (up to `SPARE_SEGMENTS_MAX`), or deleted.
    pub segments_deleted: Vec<u64>,
    /// Snapshots deleted (older than the two kept).
    pub snapshots_deleted: Vec<u64>,
}

/// A closed segment: its sequence, its file, and the position of its last record.
type SegmentEnd = (u64, PathBuf, u64);

fn check_stop(stop: &AtomicBool) -> anyhow::Result<()> {
    if stop.load(Ordering::Acquire) {
        bail!("stopped: the server is stopping")
    }
    Ok(())
}

/// Takes shard `config.shard`'s next snapshot from files alone, beside the serving core:
/// loads the newest snapshot, replays the closed segments (those before `open_sequence`,
/// which the writer no longer touches) into that state, writes the result as a new
/// snapshot (temporary file, synced, renamed, directory synced), keeps the two newest
/// snapshots, and deletes the segments whose every record the older of the two includes
/// (so that a damaged newest snapshot still leaves a snapshot and the whole log after it).
/// Blocking I/O and CPU work: run it on a thread of its own. `stop` ends it early (before
/// the next segment is read, or before anything is written or deleted), with an error.
pub fn take_snapshot(
    dir: &Path,
    config: &ShardConfig,
    now: Tick,
    segment_bytes: u64,
    open_sequence: u64,
    share: DiskShare,
    stop: &AtomicBool,
) -> anyhow::Result<SnapshotDone> {
    snapshot_from_files(dir, config, now, segment_bytes, open_sequence, false, share, stop).map(|(done, _)| done)
}

/// [`take_snapshot`]; with `keep`, also the new snapshot's state, loaded back from the
/// bytes it wrote (`None` when nothing new was written), for the replica to follow from.
#[expect(clippy::too_many_arguments, reason = "take_snapshot's seven and the replica's `keep`")]
pub fn snapshot_from_files(
    dir: &Path,
    config: &ShardConfig,
    now: Tick,
    segment_bytes: u64,
    open_sequence: u64,
    keep: bool,
    share: DiskShare,
    stop: &AtomicBool,
) -> anyhow::Result<(SnapshotDone, Option<Shard>)> {
    remove_temporaries(dir, "snap-")?;
    let (newest, damaged) = newest_snapshot_and_skipped(dir, config, now)?;
    // A snapshot that does not load must not count as one of the two kept (the log below
    // it would go): it is set aside as `.damaged`, for the operator to look at.
    for path in damaged {
        let aside = path.with_extension("snap.damaged");
        warn!(file = %path.display(), aside = %aside.display(), "setting a damaged snapshot aside");
        fs::rename(&path, &aside).with_context(|| format!("rename {}", path.display()))?;
    }
    let mut shard = match newest {
        Some((_, shard)) => shard,
        None => Shard::new(config, now)?,
    };
    let base_position = shard.wal_head();
    let ends = replay_segments(dir, &mut shard, segment_bytes, open_sequence, None, share, stop)?;
    let mut done = SnapshotDone::default();
    let mut kept = None;
    if shard.wal_head() > base_position {
        check_stop(stop)?;
        kept = write_snapshot(dir, shard, now, keep, share, &mut done)?;
    }
    prune(dir, &ends, &mut done, stop)?;
    Ok((done, kept))
}

/// Replays into `shard` (the newest snapshot's state, or a new shard) the records of the
/// segments before `open_sequence` that follow its position, up to position `until`
/// (`None`: all), one segment at a time (memory: one segment beside the state), reading
/// nothing and changing no file. Returns the position each segment it went over ends at
/// (a segment cut at `until` at `until`). Consecutive segments must continue each other's
/// positions, as they must in recovery.
fn replay_segments(
    dir: &Path,
    shard: &mut Shard,
    segment_bytes: u64,
    open_sequence: u64,
    until: Option<u64>,
    share: DiskShare,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<SegmentEnd>> {
    let base_position = shard.wal_head();
    let mut segments = segments(dir)?.into_iter().filter(|(s, _)| *s < open_sequence).peekable();
    let mut ends: Vec<SegmentEnd> = Vec::new();
    // Covered segments come first: once the next one is seen to start after the
    // snapshot's position, no later segment is covered, and no more starts are probed
    // (none is without a snapshot).
    let mut probing = base_position > 0;
    while let Some((sequence, path)) = segments.next() {
        if until.is_some_and(|until| shard.wal_head() >= until) {
            break;
        }
        check_stop(stop)?;
        // A segment that the next one shows to end at or before the snapshot's position
        // is covered whole: it is not read (the log between the two kept snapshots was
        // half of what each snapshot read, only to learn where it ends). When the next
        // one's start cannot be read, this one is read whole, as any other.
        if let Some((_, next)) = segments.peek().filter(|_| probing) {
            match first_position(next)? {
                Some(next_first) if next_first <= base_position.saturating_add(1) => {
                    ends.push((sequence, path, next_first.saturating_sub(1)));
                    continue;
                }
                Some(_) => probing = false,
                None => {}
            }
        }
        let bytes = read_segment(&path, segment_bytes, share)?;
        let mut records = &bytes[..records_end(&bytes)];
        if let Some(until) = until {
            records = &records[..records_through(records, until)];
        }
        if records.is_empty() {
            // An empty segment goes with the one before it.
            let last = ends.last().map_or(0, |e| e.2);
            ends.push((sequence, path, last));
            continue;
        }
        let first = u64::from_le_bytes(records[8..16].try_into().expect("a record header"));
        if let Some((_, previous, previous_last)) = ends.last() {
            if first != previous_last + 1 {
                bail!("{} starts at position {first}, {} ends at {previous_last}", path.display(), previous.display());
            }
        }
        let replay = |shard: &mut Shard| -> anyhow::Result<()> {
            let valid = shard.replay_log(records).with_context(|| format!("replay {}", path.display()))?;
            if valid != records.len() {
                bail!("{} has a damaged record at byte {valid}", path.display());
            }
            Ok(())
        };
        // A segment wholly after the snapshot ends where the replay leaves the state (no
        // walk over its records to find its last one first); one that starts within it
        // is replayed only when it reaches past it.
        let last = if first > base_position {
            replay(shard)?;
            shard.wal_head()
        } else {
            let last = last_position(records).expect("a segment with records has a last one");
            if last > base_position {
                replay(shard)?;
            }
            last
        };
        ends.push((sequence, path, last));
    }
    Ok(ends)
}

/// Writes `shard`, a replica of the serving shard's state whose every record is durable
/// and in the closed segments before `open_sequence`, as the next snapshot, without
/// reading the log; then keeps the two newest snapshots and deletes the segments the
/// older covers, as [`take_snapshot`] does (each closed segment's end is read from its
/// successor's first record). Returns the state as loaded back from the new snapshot.
pub fn snapshot_from_memory(
    dir: &Path,
    shard: Shard,
    now: Tick,
    open_sequence: u64,
    share: DiskShare,
    stop: &AtomicBool,
) -> anyhow::Result<(SnapshotDone, Shard)> {
    check_stop(stop)?;
    remove_temporaries(dir, "snap-")?;
    let mut done = SnapshotDone::default();
    let newest = snapshots(dir)?.last().map_or(0, |(position, _)| *position);
    let shard = if shard.wal_head() > newest {
        write_snapshot(dir, shard, now, true, share, &mut done)?.expect("kept")
    } else {
        shard
    };
    prune_closed(dir, open_sequence, &mut done, stop)?;
    Ok((done, shard))
}

/// Keeps the two newest snapshots and deletes the closed segments (those before
/// `open_sequence`) that the older covers, each closed segment's end read from its
/// successor's first record (a successor whose first record cannot be read, the open
/// segment before its first write, ends the list).
fn prune_closed(dir: &Path, open_sequence: u64, done: &mut SnapshotDone, stop: &AtomicBool) -> anyhow::Result<()> {
    let closed: Vec<_> = segments(dir)?.into_iter().filter(|(s, _)| *s <= open_sequence).collect();
    let mut ends: Vec<SegmentEnd> = Vec::new();
    for pair in closed.windows(2) {
        let Some(next_first) = first_position(&pair[1].1)? else { break };
        ends.push((pair[0].0, pair[0].1.clone(), next_first.saturating_sub(1)));
    }
    prune(dir, &ends, done, stop)
}

/// Where a snapshot at `position` is written before it is renamed into place (a crash
/// leaves it to `remove_temporaries`).
pub(crate) fn snapshot_temp_path(dir: &Path, position: u64) -> PathBuf {
    snapshot_path(dir, position).with_extension("tmp")
}

/// Publishes the snapshot at `position` that a forked copy of the serving process wrote
/// to [`snapshot_temp_path`] with [`write_synced`] (every record through `position` must
/// be durable by now): renames it into place and syncs the directory, unless a snapshot
/// at or beyond `position` exists (the temporary file is then removed); then keeps the
/// two newest snapshots and deletes the closed segments (before `open_sequence`) that
/// the older covers, as [`snapshot_from_memory`] does.
pub fn publish_snapshot(
    dir: &Path,
    position: u64,
    open_sequence: u64,
    stop: &AtomicBool,
) -> anyhow::Result<SnapshotDone> {
    check_stop(stop)?;
    let temp = snapshot_temp_path(dir, position);
    let mut done = SnapshotDone::default();
    let newest = snapshots(dir)?.last().map_or(0, |(position, _)| *position);
    if position > newest {
        let path = snapshot_path(dir, position);
        done.bytes = fs::metadata(&temp).with_context(|| format!("read {}", temp.display()))?.len();
        publish(&temp, &path)?;
        done.written = Some((path, position));
    } else {
        fs::remove_file(&temp).with_context(|| format!("remove {}", temp.display()))?;
    }
    prune_closed(dir, open_sequence, &mut done, stop)?;
    Ok(done)
}

/// The shard's state at position `until`, which must be durable: the newest snapshot that
/// loads and the records after it up to `until`, read from the segments without changing
/// any file (beside a serving core that goes on writing the open one). Segments the
/// snapshot covers whole (their successor starts at or before its position plus one) are
/// not read. For a replica that starts beside a serving core (`crate::replica`).
pub fn state_through(
    dir: &Path,
    config: &ShardConfig,
    now: Tick,
    segment_bytes: u64,
    until: u64,
    share: DiskShare,
    stop: &AtomicBool,
) -> anyhow::Result<Shard> {
    let mut shard = match newest_snapshot(dir, config, now)? {
        Some((_, shard)) => shard,
        None => Shard::new(config, now)?,
    };
    replay_segments(dir, &mut shard, segment_bytes, u64::MAX, Some(until), share, stop)?;
    if shard.wal_head() != until {
        bail!("the log in {} reaches position {}, not {until}", dir.display(), shard.wal_head());
    }
    Ok(shard)
}

/// The length of the whole records at the start of `records` whose positions are at most
/// `until`.
fn records_through(records: &[u8], until: u64) -> usize {
    whole_records(records).take_while(|(_, position)| *position <= until).last().map_or(0, |(end, _)| end)
}

/// The whole records at the start of `records`: where each ends, and its position.
fn whole_records(records: &[u8]) -> impl Iterator<Item = (usize, u64)> + '_ {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset + stockplane_engine::wal::HEADER_BYTES > records.len() {
            return None;
        }
        let len = u16::from_le_bytes([records[offset], records[offset + 1]]) as usize;
        if len == 0 || offset + len > records.len() {
            return None;
        }
        let position = u64::from_le_bytes(records[offset + 8..offset + 16].try_into().expect("8 bytes"));
        offset += len;
        Some((offset, position))
    })
}

/// Writes `shard` as the snapshot at its position and records it in `done`; with `keep`,
/// returns the state loaded back from the bytes written (which checks them as recovery
/// would).
fn write_snapshot(
    dir: &Path,
    shard: Shard,
    now: Tick,
    keep: bool,
    share: DiskShare,
    done: &mut SnapshotDone,
) -> anyhow::Result<Option<Shard>> {
    let config = shard.config().clone();
    let at = shard.wal_head();
    let snapshot = shard.into_snapshot();
    let path = snapshot_path(dir, at);
    write_durably(&path, &snapshot, share)?;
    done.written = Some((path, at));
    done.bytes = snapshot.len() as u64;
    keep.then(|| Shard::from_snapshot(&config, now, &snapshot).context("load the snapshot just written")).transpose()
}

/// Keeps the two newest snapshots, and deletes the segments of `ends` whose every record
/// the older of the two includes.
fn prune(dir: &Path, ends: &[SegmentEnd], done: &mut SnapshotDone, stop: &AtomicBool) -> anyhow::Result<()> {
    check_stop(stop)?;
    let kept = snapshots(dir)?;
    let keep_from = kept.len().saturating_sub(2);
    for (position, path) in &kept[..keep_from] {
        fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
        done.snapshots_deleted.push(*position);
    }
    if kept.len() >= 2 {
        let older = kept[keep_from].0;
        let mut waiting = spares(dir)?.len();
        for (sequence, path, last) in ends {
            if *last <= older {
                let_go(dir, *sequence, path, &mut waiting)?;
                done.segments_deleted.push(*sequence);
            }
        }
    }
    if !done.segments_deleted.is_empty() || !done.snapshots_deleted.is_empty() {
        fs::File::open(dir)?.sync_all().with_context(|| format!("sync directory {}", dir.display()))?;
    }
    Ok(())
}

/// Writes `bytes` as `path`: a temporary file, synced, renamed, and the directory synced.
///
/// The bytes go out a chunk at a time, each chunk synced before the next is written: a
/// snapshot's tens of megabytes handed to the kernel at once and synced at the end reached
/// the disk as one burst, and the shard's log `fdatasync`s behind it waited for all of it
/// (20 to 100 ms stalls of group commit while a snapshot was written). Beside a serving
/// log the chunks are small and take `share` of the disk's time ([`DiskShare`]).
fn write_durably(path: &Path, bytes: &[u8], share: DiskShare) -> anyhow::Result<()> {
    let temp = path.with_extension("tmp");
    write_synced(&temp, bytes, share)?;
    publish(&temp, path)
}

/// Writes `bytes` as the new file `temp`, synced chunk by chunk (see [`write_durably`]).
pub(crate) fn write_synced(temp: &Path, bytes: &[u8], share: DiskShare) -> anyhow::Result<()> {
    let mut file = fs::File::create(temp).with_context(|| format!("create {}", temp.display()))?;
    for chunk in bytes.chunks(share.chunk()) {
        let started = std::time::Instant::now();
        file.write_all(chunk).with_context(|| format!("write {}", temp.display()))?;
        file.sync_data().with_context(|| format!("sync {}", temp.display()))?;
        share.yield_after(started);
    }
    file.sync_all().with_context(|| format!("sync {}", temp.display()))
}

/// Renames the synced file `temp` to `path` and syncs their directory.
fn publish(temp: &Path, path: &Path) -> anyhow::Result<()> {
    fs::rename(temp, path).with_context(|| format!("rename {}", temp.display()))?;
    let dir = path.parent().expect("a file in a directory");
    fs::File::open(dir)?.sync_all().with_context(|| format!("sync directory {}", dir.display()))?;
    Ok(())
}

/// The position of the first record of the segment at `path`, read from its start and
/// checked by the record's checksum; `None` when it has no whole, valid first record.
fn first_position(path: &Path) -> anyhow::Result<Option<u64>> {
    let mut head = Vec::with_capacity(FIRST_RECORD_READ);
    fs::File::open(path)
        .and_then(|file| file.take(FIRST_RECORD_READ as u64).read_to_end(&mut head))
        .with_context(|| format!("read the start of {}", path.display()))?;
    Ok(stockplane_engine::wal::decode(&head).ok().map(|(_, position, _)| position))
}

/// The position of the last record in `records` (whole records).
pub(crate) fn last_position(records: &[u8]) -> Option<u64> {
    whole_records(records).last().map(|(_, position)| position)
}

/// Lays `records` (whole encoded records, from position 1) out as shard `shard`'s log in
/// `data_dir`, in segments as the writer fills them, with plain synced writes: for tools
/// and benchmarks that need a log without running a server.
pub fn write_log(data_dir: &Path, shard: u32, segment_bytes: u64, records: &[u8]) -> anyhow::Result<()> {
    let dir = shard_dir(data_dir, shard);
    fs::create_dir_all(&dir)?;
    let mut rest = records;
    let mut sequence = 1;
    loop {
        let fits = fitting_records(rest, segment_bytes as usize);
        let path = segment_path(&dir, sequence);
        let mut file = fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        file.write_all(&rest[..fits])?;
        file.set_len(segment_bytes)?;
        file.sync_all()?;
        rest = &rest[fits..];
        if rest.is_empty() {
            break;
        }
        sequence += 1;
    }
    fs::File::open(&dir)?.sync_all()?;
    Ok(())
}

/// Zeroes `path` from `offset` to its end, and syncs it.
fn zero_from(path: &Path, offset: u64, segment_bytes: u64) -> anyhow::Result<()> {
    let file = fs::OpenOptions::new().write(true).open(path).with_context(|| format!("open {}", path.display()))?;
    zero_and_sync(&file, path, &vec![0u8; FULL_IO_CHUNK], offset, segment_bytes, |_| Ok(()))
}

/// Writes zeros over `from..to` of `file` (at `path`), `zeros.len()` bytes at a time,
/// letting `pace` hold or stop each write (it gets the write's offset first), then syncs
/// the file's data.
fn zero_and_sync(
    file: &fs::File,
    path: &Path,
    zeros: &[u8],
    from: u64,
    to: u64,
    mut pace: impl FnMut(u64) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut at = from;
    while at < to {
        pace(at)?;
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at).with_context(|| format!("zero {}", path.display()))?;
        at += n as u64;
    }
    file.sync_data().with_context(|| format!("sync {}", path.display()))
}

/// What the core has handed to the log and what the disk has confirmed.
#[derive(Debug, Default)]
pub(crate) struct WalQueue {
    /// Encoded records waiting for the writer.
    pub pending: Vec<u8>,
    /// The position of the last record in `pending` (or already written).
    pub head: u64,
    /// Set once a write or sync failed: nothing is written or acknowledged again.
    pub failed: Option<String>,
}

/// The writer's side: the open segment, its partly filled last block, the next segment.
pub(crate) struct WalWriter {
    dir: PathBuf,
    segment_bytes: u64,
    sequence: u64,
    file: Rc<DmaFile>,
    /// Offset of the block that holds the end of the records.
    tail_offset: u64,
    /// The records' bytes from `tail_offset` to their end (less than a block).
    tail: Vec<u8>,
    next: Rc<RefCell<NextSegment>>,
    /// The end of the records in the open segment, for the preparation of the next one
    /// to keep pace with (`PACED_IO_CHUNK`).
    log_end: Arc<AtomicU64>,
    /// The thread that zero-fills the next segment, off the shard's CPU.
    preparer: Preparer,
    /// Each write's and each `fdatasync`'s time on its own, from the call to the
    /// completion the core saw: a slow round shows which of the two made it slow (or
    /// neither: then the core noticed late).
    write_seconds: metrics::Histogram,
    fdatasync_seconds: metrics::Histogram,
}

impl WalWriter {
    /// Opens the segment recovery ended in, at the end of its records; its metrics are
    /// labelled with `shard`. The next segments are prepared by a thread of the shard's
    /// own on `background` (the CPUs no shard is pinned to; an empty set: wherever the
    /// kernel puts it).
    pub async fn open(start: &WalStart, shard: u32, background: libc::cpu_set_t) -> anyhow::Result<WalWriter> {
        let path = segment_path(&start.dir, start.sequence);
        let file = open_segment(&path).await?;
        if file.alignment() > BLOCK {
            bail!("{} needs {}-byte alignment; the log writes {BLOCK}-byte blocks", path.display(), file.alignment());
        }
        let tail_offset = start.end / BLOCK * BLOCK;
        let tail = if start.end > tail_offset {
            let read = file.read_at_aligned(tail_offset, BLOCK as usize).await.map_err(io)?;
            read[..(start.end - tail_offset) as usize].to_vec()
        } else {
            Vec::new()
        };
        Ok(WalWriter {
            dir: start.dir.clone(),
            segment_bytes: start.segment_bytes,
            sequence: start.sequence,
            file: Rc::new(file),
            tail_offset,
            tail,
            next: Rc::new(RefCell::new(NextSegment::None)),
            log_end: Arc::new(AtomicU64::new(start.end)),
            preparer: Preparer::start(shard, start.dir.clone(), start.segment_bytes, background)?,
            write_seconds: metrics::histogram!("stockplane_wal_write_seconds", "shard" => shard.to_string()),
            fdatasync_seconds: metrics::histogram!("stockplane_wal_fdatasync_seconds", "shard" => shard.to_string()),
        })
    }

    /// The sequence of the segment being written.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Starts preparing the next segment in the background, once per segment (`advance`
    /// takes it from there).
    fn prepare_next(&mut self) {
        if matches!(*self.next.borrow(), NextSegment::None) {
            let preparing = self.start_preparing(Some(self.log_end.clone()));
            *self.next.borrow_mut() = preparing;
        }
        self.advance();
    }

    /// Once the preparer has written the next segment's zeros, opens it in a task of its
    /// own, so that the writer finds it open when it needs it.
    fn advance(&mut self) {
        if !matches!(*self.next.borrow(), NextSegment::Zeroing) {
            return;
        }
        let state = match self.preparer.outcomes.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => return,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                NextSegment::Failed(anyhow::anyhow!("the WAL segment preparer stopped"))
            }
            Ok(Err(error)) => NextSegment::Failed(error),
            Ok(Ok(())) => {
                let (path, next) = (segment_path(&self.dir, self.sequence + 1), self.next.clone());
                glommio::spawn_local(async move {
                    *next.borrow_mut() = match open_segment(&path).await {
                        Ok(file) => NextSegment::Ready(Rc::new(file)),
                        Err(error) => NextSegment::Failed(error),
                    };
                })
                .detach();
                NextSegment::Opening
            }
        };
        *self.next.borrow_mut() = state;
    }

    /// Hands the next segment to the preparer, kept to the log's pace (`Some`: the end of
    /// the records in the open segment) or as fast as the disk goes.
    fn start_preparing(&self, pace: Option<Arc<AtomicU64>>) -> NextSegment {
        if self.preparer.send(self.sequence + 1, pace) {
            NextSegment::Zeroing
        } else {
            NextSegment::Failed(anyhow::anyhow!("the WAL segment preparer stopped"))
        }
    }

    /// Writes `bytes` (whole records) after what is on disk and syncs; returns when they
    /// are durable.
    pub async fn append(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = (self.segment_bytes - self.end()) as usize;
            let fits = fitting_records(rest, room);
            if fits == 0 {
                self.rotate().await?;
                continue;
            }
            self.write_unsynced(&rest[..fits]).await?;
            self.sync().await?;
            rest = &rest[fits..];
        }
        Ok(())
    }

    /// The offset just after the last record of the open segment.
    fn end(&self) -> u64 {
        self.tail_offset + self.tail.len() as u64
    }

    /// True when `bytes` (whole records) fit in the open segment after what is there:
    /// then `write_unsynced` takes them in one write, with no rotation.
    pub fn fits(&self, bytes: &[u8]) -> bool {
        self.end() + bytes.len() as u64 <= self.segment_bytes
    }

    /// An `fdatasync` of the open segment, which may run while the next write goes out
    /// (it holds the segment, not the writer): every write to it that completed before
    /// this started is durable when it returns.
    pub fn sync(&self) -> impl std::future::Future<Output = anyhow::Result<()>> + 'static {
        let (file, took) = (self.file.clone(), self.fdatasync_seconds.clone());
        async move {
            let started = std::time::Instant::now();
            file.fdatasync().await.map_err(io).context("fdatasync the WAL")?;
            took.record(started.elapsed().as_secs_f64());
            Ok(())
        }
    }

    /// Writes `bytes` (whole records that `fits`) after what is on disk, without syncing:
    /// they are durable once a `sync` that starts after this returns has completed. The
    /// write rewrites the block that holds the end of the earlier records with the same
    /// bytes there, so whichever version of that block a crash leaves, the earlier records
    /// are whole (the new ones may be torn, and recovery cuts them).
    pub async fn write_unsynced(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        debug_assert!(self.fits(bytes));
        self.prepare_next();
        let data = self.tail.len() + bytes.len();
        let size = (data as u64).div_ceil(BLOCK) * BLOCK;
        let mut buffer = self.file.alloc_dma_buffer(size as usize);
        let out = buffer.as_bytes_mut();
        out[..self.tail.len()].copy_from_slice(&self.tail);
        out[self.tail.len()..data].copy_from_slice(bytes);
        out[data..].fill(0);
        let started = std::time::Instant::now();
        let written = self.file.write_at(buffer, self.tail_offset).await.map_err(io).context("write the WAL")?;
        self.write_seconds.record(started.elapsed().as_secs_f64());
        if written as u64 != size {
            bail!("short WAL write: {written} of {size} bytes");
        }
        let end = self.tail_offset + data as u64;
        let new_tail_offset = end / BLOCK * BLOCK;
        let keep = (end - new_tail_offset) as usize;
        let mut tail = std::mem::take(&mut self.tail);
        if new_tail_offset == self.tail_offset {
            tail.extend_from_slice(bytes);
        } else {
            tail.clear();
            tail.extend_from_slice(&bytes[bytes.len() - keep..]);
        }
        self.tail = tail;
        self.tail_offset = new_tail_offset;
        self.log_end.store(end, Ordering::Relaxed);
        Ok(())
    }

    async fn rotate(&mut self) -> anyhow::Result<()> {
        // Take the segment prepared in the background; if it is still being prepared,
        // wait for it (preparing the same file twice at once would race on its name). If
        // its preparation failed, prepare it again as fast as the disk goes, once.
        let started = std::time::Instant::now();
        let mut retried = false;
        let file = loop {
            self.advance();
            let state = std::mem::replace(&mut *self.next.borrow_mut(), NextSegment::None);
            let error = match state {
                NextSegment::Ready(file) => break file,
                waiting @ (NextSegment::Zeroing | NextSegment::Opening) => {
                    *self.next.borrow_mut() = waiting;
                    glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
                    continue;
                }
                NextSegment::Failed(error) => error,
                // Nothing was written to this segment, so nothing asked for the next one.
                NextSegment::None => {
                    let preparing = self.start_preparing(None);
                    *self.next.borrow_mut() = preparing;
                    continue;
                }
            };
            if retried {
                return Err(error.context(format!("prepare WAL segment {}", self.sequence + 1)));
            }
            warn!(error = format!("{error:#}"), "preparing the next WAL segment failed; preparing it again");
            retried = true;
            let preparing = self.start_preparing(None);
            *self.next.borrow_mut() = preparing;
        };
        self.sequence += 1;
        self.file = file;
        self.tail_offset = 0;
        self.tail.clear();
        self.log_end.store(0, Ordering::Relaxed);
        let waited = started.elapsed();
        info!(segment = self.sequence, waited_us = waited.as_micros() as u64, "WAL segment started");
        Ok(())
    }
}

/// A shard's thread that zero-fills its next segments (`wal-prep-<shard>`), one at a time,
/// on the CPUs no shard is pinned to, at the normal scheduling policy (the writer waits for
/// it when the log reaches the end of a segment first). It stops when the writer is dropped.
struct Preparer {
    /// The segments to prepare, each with its pace (`prepare_segment`); `None` once
    /// dropped.
    jobs: Option<std::sync::mpsc::Sender<(u64, Option<Arc<AtomicU64>>)>>,
    /// Each preparation's outcome, in order (a panic disconnects it).
    outcomes: std::sync::mpsc::Receiver<anyhow::Result<()>>,
    /// Set when the writer is dropped: a preparation under way stops at its next chunk
    /// (a stop, or a failed core); recovery puts what it wrote back with the spares.
    abandoned: Arc<AtomicBool>,
    /// The thread, joined on drop.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Preparer {
    fn start(shard: u32, dir: PathBuf, segment_bytes: u64, background: libc::cpu_set_t) -> anyhow::Result<Preparer> {
        let (jobs, received) = std::sync::mpsc::channel::<(u64, Option<Arc<AtomicU64>>)>();
        let (done, outcomes) = std::sync::mpsc::channel();
        let abandoned = Arc::new(AtomicBool::new(false));
        let stop = abandoned.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wal-prep-{shard}"))
            .spawn(move || {
                if let Err(error) = crate::server::move_to_cpus(&background) {
                    warn!(%error, "could not move the WAL segment preparer off the shards' CPUs");
                }
                for (sequence, pace) in received {
                    let outcome = prepare_segment(&dir, sequence, segment_bytes, pace.as_deref(), &stop);
                    if done.send(outcome).is_err() {
                        break;
                    }
                }
            })
            .context("start the WAL segment preparer")?;
        Ok(Preparer { jobs: Some(jobs), outcomes, abandoned, thread: Some(thread) })
    }

    /// Asks for segment `sequence`, kept to `pace` (`prepare_segment`).
    fn send(&self, sequence: u64, pace: Option<Arc<AtomicU64>>) -> bool {
        self.jobs.as_ref().is_some_and(|jobs| jobs.send((sequence, pace)).is_ok())
    }
}

impl Drop for Preparer {
    /// Stops the preparation under way and waits for the thread: once a writer is gone,
    /// nothing of it touches the log's directory (a recovery right after, in the same
    /// process, once found a `wal-<n>.tmp` renamed under it).
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
        // Without a sender the thread's loop ends.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the WAL segment preparer panicked");
            }
        }
    }
}

/// The segment after the current one.
enum NextSegment {
    /// Not asked for yet (or taken).
    None,
    /// Being zero-filled by the preparer.
    Zeroing,
    /// Zero-filled, being opened.
    Opening,
    /// Ready for the writer.
    Ready(Rc<DmaFile>),
    /// Its preparation failed: the writer prepares it again when it needs it.
    Failed(anyhow::Error),
}

/// Opens a prepared segment for the writer.
async fn open_segment(path: &Path) -> anyhow::Result<DmaFile> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(path)
        .await
        .map_err(io)
        .with_context(|| format!("open {}", path.display()))
}

/// How many bytes of whole records at the front of `bytes` fit in `room`.
fn fitting_records(bytes: &[u8], room: usize) -> usize {
    let mut offset = 0;
    while offset + 2 <= bytes.len() {
        let len = u16::from_le_bytes([bytes[offset], bytes[offset + 1]]) as usize;
        assert!(len > 0, "the engine emits whole records");
        if offset + len > room {
            break;
        }
        offset += len;
    }
    offset
}

/// Creates segment `sequence` full of zeros, synced, with its directory entry synced,
/// with plain blocking I/O (O_DIRECT) on the calling thread: the shard's `Preparer`, off
/// the shard's CPU, or recovery for a new log's first segment. Zeroing a new file allocates its blocks, which io_uring cannot do
/// without blocking: from the shard's ring each such write went to an io-wq worker on the
/// shard's CPU, and at sync saturation on the benchmark guest the workers took 5.3 to
/// 5.5% of that CPU, half of it for those writes (`docs/wal.md`, "Where the zeros are
/// written"). `pace`: keep no further than `PREPARE_LEAD_DIVISOR`'s share of a segment
/// ahead of the end of the records in the open segment, one `PACED_IO_CHUNK` at a time
/// (`None`: as fast as the disk goes, `FULL_IO_CHUNK` at a time). Stops with an error
/// before its next chunk once `abandoned` is set, leaving `wal-<n>.tmp` for recovery to
/// put back with the spares.
fn prepare_segment(
    dir: &Path,
    sequence: u64,
    segment_bytes: u64,
    pace: Option<&AtomicU64>,
    abandoned: &AtomicBool,
) -> anyhow::Result<()> {
    let path = segment_path(dir, sequence);
    let temp = path.with_extension("tmp");
    // A spare (a segment the log let go) owns its blocks already: zeroing it again
    // overwrites them, where a new file allocates.
    let reused = take_spare(dir, &temp, segment_bytes).unwrap_or_else(|error| {
        warn!(error = format!("{error:#}"), "could not reuse a spare WAL segment; creating one");
        false
    });
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(!reused)
        .custom_flags(libc::O_DIRECT)
        .open(&temp)
        .with_context(|| format!("create {}", temp.display()))?;
    let chunk = if pace.is_some() { PACED_IO_CHUNK } else { FULL_IO_CHUNK };
    let lead = segment_bytes / PREPARE_LEAD_DIVISOR;
    // O_DIRECT takes block-aligned memory.
    let mut zeros = AlignedVec::<{ BLOCK as usize }>::with_capacity(chunk);
    zeros.resize(chunk, 0);
    let stopped = || -> anyhow::Result<()> {
        if abandoned.load(Ordering::Relaxed) {
            bail!("the log stopped while {} was being prepared", temp.display());
        }
        Ok(())
    };
    zero_and_sync(&file, &temp, &zeros, 0, segment_bytes, |at| {
        stopped()?;
        if let Some(log_end) = pace {
            while at >= log_end.load(Ordering::Relaxed) + lead {
                std::thread::sleep(PACED_ZERO_GAP);
                stopped()?;
            }
        }
        Ok(())
    })?;
    fs::rename(&temp, &path).with_context(|| format!("rename {}", temp.display()))?;
    // The rename must survive a crash too.
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("sync {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::server::tests::{cpus, members};
    use stockplane_engine::Origin;
    use stockplane_wire::{CartLine, HoldId, Op, Request, Role};

    pub(crate) const SEGMENT: u64 = 1 << 20;
    pub(crate) const NOW: Tick = 1_800_000_000_000;
    /// Never stopping.
    pub(crate) static GO: AtomicBool = AtomicBool::new(false);

    pub(crate) fn config() -> ShardConfig {
        let mut config = ShardConfig::new(0, 1);
        config.skus_max = 1 << 12;
        config.sku_locations_max = 1 << 12;
        config.holds_max = 1 << 14;
        config.holds_finished_max = 1 << 10;
        config.outbox_max = 1 << 16;
        config
    }

    /// A shard's log of `rounds` rounds of restocks, holds and commits, several segments
    /// long, and the state it builds.
    fn history(rounds: u64) -> (Vec<u8>, u64) {
        let config = config();
        let mut shard = Shard::new(&config, NOW).unwrap();
        let control = Origin { client: 1, role: Role::Control };
        let checkout = Origin { client: 2, role: Role::Checkout };
        let mut log = Vec::new();
        let mut out = Vec::new();
        let mut id = 0;
        let mut call = |shard: &mut Shard, origin: Origin, op: Op| {
            id += 1;
            shard.handle_owned(NOW, origin, &Request { id, op });
            while let Some(position) = shard.poll_wal_append(&mut out) {
                log.extend_from_slice(&out);
                shard.handle_durable(position);
            }
            while shard.poll_reply().is_some() {}
        };
        for sku in 0..64 {
            call(&mut shard, control, Op::UpsertSku { sku, location: 0, backorder_limit: 0 });
        }
        for round in 0..rounds {
            let sku = round % 64;
            call(
                &mut shard,
                control,
                Op::Adjust { adjustment: u128::from(round) << 64 | 1, sku, location: 0, delta: 5 },
            );
            let hold = HoldId(u128::from(round) << 64 | 2);
            let lines = vec![CartLine { sku, location: None, qty: 2 }];
            call(&mut shard, checkout, Op::Reserve { hold, ttl_ms: 3_600_000, lines });
            if round % 3 != 0 {
                call(&mut shard, checkout, Op::Commit { hold, lines: None });
            }
        }
        (log, shard.state_hash())
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stockplane-wal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// `history(40_000)` laid out as shard 0's log under a scratch directory: the data
    /// directory, the shard's directory, the last segment's sequence, the state's hash.
    pub(crate) fn laid_out(name: &str) -> (PathBuf, PathBuf, u64, u64) {
        let data = scratch(name);
        let (log, hash) = history(40_000);
        write_log(&data, 0, SEGMENT, &log).unwrap();
        let dir = shard_dir(&data, 0);
        let last = segments(&dir).unwrap().last().unwrap().0;
        (data, dir, last, hash)
    }

    /// `laid_out`, and a copy of the shard's directory (its twin, to run the same
    /// snapshots on another way): the data directory, the shard's directory, the last
    /// segment's sequence, the state's hash, the twin.
    pub(crate) fn laid_out_with_twin(name: &str) -> (PathBuf, PathBuf, u64, u64, PathBuf) {
        let (data, dir, last, hash) = laid_out(name);
        let twin = scratch(&format!("{name}-twin"));
        copy_dir(&dir, &twin);
        (data, dir, last, hash, twin)
    }

    /// `laid_out`, then two snapshots: one of segments 1 and 2, then one of every closed
    /// segment (which deletes 1 and 2); also returns the newer snapshot's file.
    fn with_two_snapshots(name: &str) -> (PathBuf, PathBuf, u64, u64, PathBuf) {
        let (data, dir, last, hash) = laid_out(name);
        take_snapshot(&dir, &config(), NOW, SEGMENT, 3, DiskShare::ALL, &GO).unwrap();
        let (newest, _) =
            take_snapshot(&dir, &config(), NOW, SEGMENT, last, DiskShare::ALL, &GO).unwrap().written.unwrap();
        (data, dir, last, hash, newest)
    }

    /// The records of segment `sequence` in `dir`, as the writer wrote them.
    pub(crate) fn segment_records(dir: &Path, sequence: u64) -> Vec<u8> {
        let mut bytes = read_segment(&segment_path(dir, sequence), SEGMENT, DiskShare::ALL).unwrap();
        bytes.truncate(records_end(&bytes));
        bytes
    }

    /// Flips the bits `mask` of byte `at` of the file at `path` (`at` past the end: of its
    /// middle byte).
    fn flip(path: &Path, at: usize, mask: u8) {
        let mut bytes = fs::read(path).unwrap();
        let at = if at < bytes.len() { at } else { bytes.len() / 2 };
        bytes[at] ^= mask;
        fs::write(path, &bytes).unwrap();
    }

    /// Copies the files of `from` into a fresh directory `to` (a twin of a log).
    fn copy_dir(from: &Path, to: &Path) {
        let _ = fs::remove_dir_all(to);
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }

    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// A snapshot paced to half the disk's time (its reads 128 KiB at a time without
    /// readahead, its writes synced 128 KiB at a time, a pause after each) writes the same
    /// files and deletes the same segments as one at the whole disk's pace.
    #[test]
    fn a_paced_snapshot_writes_what_one_at_full_speed_does() {
        let (data, dir, last, hash, twin) = laid_out_with_twin("paced");
        let half = DiskShare::percent(50).unwrap();
        for open in [3, last] {
            let paced = take_snapshot(&dir, &config(), NOW, SEGMENT, open, half, &GO).unwrap();
            let full = take_snapshot(&twin, &config(), NOW, SEGMENT, open, DiskShare::ALL, &GO).unwrap();
            let ((path, at), (twin_path, twin_at)) = (paced.written.unwrap(), full.written.unwrap());
            assert_eq!(at, twin_at);
            assert!(paced.bytes > PACED_IO_CHUNK as u64, "a snapshot of one chunk: {} bytes", paced.bytes);
            assert!(fs::read(&path).unwrap() == fs::read(&twin_path).unwrap(), "snapshot {at:#x} differs");
            assert_eq!(paced.segments_deleted, full.segments_deleted);
        }
        assert_eq!(names(&dir), names(&twin));
        assert_eq!(recover(&data, &config(), NOW, SEGMENT, false).unwrap().0.state_hash(), hash);
        fs::remove_dir_all(&data).unwrap();
        fs::remove_dir_all(&twin).unwrap();
    }

    /// The writer fills segment after segment that its preparer thread zero-fills on the
    /// CPUs it was given (not the shard's), and the log it leaves recovers the state it
    /// wrote, whatever preparation its drop interrupted.
    #[test]
    fn the_writer_rotates_through_segments_its_preparer_readies_off_the_shard() {
        let data = scratch("writer");
        let (log, hash) = history(40_000);
        let (_, start) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        // The preparer goes to one CPU of the process's; the executor stays unpinned.
        let first = members(&crate::server::thread_cpus().unwrap())[0];
        let background = cpus(&[first]);
        let placed = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 19)
            .spawn(move || async move {
                // Shard 7: a thread name no other test's writer has.
                let mut writer = WalWriter::open(&start, 7, background).await.unwrap();
                let mut rest = &log[..];
                let mut placed = None;
                while !rest.is_empty() {
                    let chunk = fitting_records(rest, 64 << 10);
                    writer.append(&rest[..chunk]).await.unwrap();
                    rest = &rest[chunk..];
                    placed = placed.or_else(|| thread_cpus_named("wal-prep-7"));
                }
                (writer.sequence(), placed)
            })
            .unwrap()
            .join()
            .unwrap();
        let (last, placed) = placed;
        // The dropped writer waited for its preparer: nothing of it renames files under
        // the recovery below.
        assert!(thread_cpus_named("wal-prep-7").is_none(), "the preparer outlived its writer");
        assert!(last >= 4, "the log spans several segments: {last}");
        assert_eq!(members(&placed.expect("the preparer thread ran")), [first]);
        let (shard, start) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(shard.state_hash(), hash);
        // Recovery continues where the writer stopped, or in the next segment when the
        // preparer had readied it (empty).
        assert!(start.sequence == last || (start.sequence == last + 1 && start.end == 0), "{start:?}, {last}");
        assert!(!names(&shard_dir(&data, 0)).iter().any(|name| name.ends_with(".tmp")));
        fs::remove_dir_all(&data).unwrap();
    }

    /// The CPUs of this process's thread named `name`, if there is one.
    fn thread_cpus_named(name: &str) -> Option<libc::cpu_set_t> {
        for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
            if fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name) {
                let tid: libc::pid_t = task.file_name().to_string_lossy().parse().unwrap();
                return crate::server::cpus_of_thread(tid).ok();
            }
        }
        None
    }

    /// A next segment that a stop left half prepared goes back to the spares when it has
    /// the segment size (a shorter one is removed), and recovery is unchanged.
    #[test]
    fn a_half_prepared_segment_goes_back_to_the_spares() {
        let (data, dir, last, hash) = laid_out("half-prepared");
        let next = segment_path(&dir, last + 1).with_extension("tmp");
        fs::write(&next, vec![7u8; SEGMENT as usize]).unwrap();
        let short = segment_path(&dir, last + 2).with_extension("tmp");
        fs::write(&short, vec![7u8; 4096]).unwrap();
        let (recovered, start) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        assert_eq!(start.sequence, last);
        let spare = format!("spare-{:016x}.seg", last + 1);
        let names = names(&dir);
        assert!(names.contains(&spare) && !names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn a_disk_share_is_1_to_100_percent_and_rests_for_the_rest() {
        for percent in [0, 101] {
            let error = DiskShare::percent(percent).unwrap_err().to_string();
            assert!(error.contains("1 to 100 percent"), "{error}");
        }
        let busy = std::time::Duration::from_millis(4);
        assert_eq!(DiskShare::percent(25).unwrap().rest(busy), std::time::Duration::from_millis(12));
        assert_eq!(DiskShare::percent(50).unwrap().rest(busy), busy);
        assert_eq!(DiskShare::percent(100).unwrap(), DiskShare::ALL);
        assert_eq!(DiskShare::ALL.rest(busy), std::time::Duration::ZERO);
    }

    #[test]
    fn rounds_wait_only_while_the_core_stays_busy_and_only_up_to_the_interval() {
        let (ms, us) = (std::time::Duration::from_millis, std::time::Duration::from_micros);
        // Each round: `every` of time of which `busy` serving joins the average, then the
        // wait of a round that started `every` ago.
        let rounds = |spacing: &mut RoundSpacing, n: usize, every, busy| -> Vec<std::time::Duration> {
            (0..n)
                .map(|_| {
                    spacing.observe(every, busy);
                    spacing.wait(every)
                })
                .collect()
        };
        // Sustained: 1 ms rounds, each 90% serving. The average passes 75% within a few
        // rounds, and from then on each round waits out the rest of its 2 ms.
        let mut spacing = RoundSpacing::new(ms(2));
        let waits = rounds(&mut spacing, 40, ms(1), us(900));
        assert_eq!(waits[0], ms(0), "one busy round is not a busy core");
        assert!(waits[30..].iter().all(|&wait| wait == ms(1)), "{waits:?}");
        // Once the interval is over there is nothing left to wait.
        assert_eq!(spacing.wait(ms(2)), ms(0));
        assert_eq!(spacing.wait(ms(5)), ms(0));
        // Half busy for a while, then one round fully busy (a burst): no wait.
        let mut spacing = RoundSpacing::new(ms(2));
        assert!(rounds(&mut spacing, 100, ms(1), us(500)).iter().all(|wait| wait.is_zero()));
        assert_eq!(rounds(&mut spacing, 1, ms(1), ms(1)), [ms(0)]);
        // Idle (low load): never waits, however soon the rounds come.
        let mut spacing = RoundSpacing::new(ms(2));
        assert!(rounds(&mut spacing, 100, us(50), ms(0)).iter().all(|wait| wait.is_zero()));
        // The busy core goes idle: after a few rounds at 10% it stops waiting.
        let mut spacing = RoundSpacing::new(ms(2));
        rounds(&mut spacing, 40, ms(1), us(900));
        let waits = rounds(&mut spacing, 40, ms(1), us(100));
        assert!(waits[20..].iter().all(|wait| wait.is_zero()), "{waits:?}");
        // Nothing elapsed adds nothing; a zero interval never waits.
        spacing.observe(ms(0), ms(0));
        let mut spacing = RoundSpacing::new(ms(0));
        assert!(rounds(&mut spacing, 40, us(10), us(10)).iter().all(|wait| wait.is_zero()));
    }

    #[test]
    fn snapshots_cover_closed_segments_and_the_log_below_the_older_one_goes() {
        let (data, dir, last, hash) = laid_out("snapshots");
        assert!(last >= 4, "only {last} segments");
        // No snapshot yet: every closed segment is log a snapshot would include.
        let (_, start) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(start.closed_after_snapshot, last - 1);
        // First snapshot: segments 1 and 2 closed. Nothing is deleted with one snapshot.
        let first = take_snapshot(&dir, &config(), NOW, SEGMENT, 3, DiskShare::ALL, &GO).unwrap();
        let (_, first_at) = first.written.clone().expect("a snapshot");
        assert!(first.segments_deleted.is_empty());
        // Second: every segment but the last closed; segments 1 and 2, which the first
        // snapshot covers whole, go.
        let second = take_snapshot(&dir, &config(), NOW, SEGMENT, last, DiskShare::ALL, &GO).unwrap();
        let (_, second_at) = second.written.clone().expect("a snapshot");
        assert!(second_at > first_at);
        assert_eq!(second.segments_deleted, vec![1, 2]);
        // Nothing new closed: no snapshot is written.
        assert_eq!(take_snapshot(&dir, &config(), NOW, SEGMENT, last, DiskShare::ALL, &GO).unwrap().written, None);
        let (recovered, start) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        assert_eq!(start.sequence, last);
        assert_eq!(start.closed_after_snapshot, 0, "the second snapshot covers every closed segment");
        // A third snapshot drops the first one and the segments the second covers.
        let third = take_snapshot(&dir, &config(), NOW, SEGMENT, last + 1, DiskShare::ALL, &GO).unwrap();
        assert_eq!(third.snapshots_deleted, vec![first_at]);
        assert_eq!(third.segments_deleted, (3..last).collect::<Vec<_>>());
        // The first SPARE_SEGMENTS_MAX segments let go wait as spares; the rest are deleted.
        let spare_count = ((last - 1) as usize).min(SPARE_SEGMENTS_MAX) as u64;
        let mut expected: Vec<String> =
            vec![format!("snap-{second_at:016x}.snap"), format!("snap-{:016x}.snap", third.written.unwrap().1)];
        expected.extend((1..=spare_count).map(|sequence| format!("spare-{sequence:016x}.seg")));
        expected.push(format!("wal-{last:016x}.seg"));
        assert_eq!(names(&dir), expected);
        let (recovered, _) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        fs::remove_dir_all(&data).unwrap();
    }

    /// The log between the two kept snapshots is not read again: a segment that the next
    /// one shows to be covered whole by the newest snapshot is only named. Here one is
    /// emptied, which reading it would refuse, yet the next snapshot is right and deletes
    /// the covered segments when the older snapshot goes.
    #[test]
    fn a_snapshot_does_not_read_the_segments_its_predecessor_covers() {
        let (data, dir, last, hash, _) = with_two_snapshots("covered");
        assert!(last >= 6, "only {last} segments");
        fs::OpenOptions::new().write(true).open(segment_path(&dir, 4)).unwrap().set_len(0).unwrap();
        let third = take_snapshot(&dir, &config(), NOW, SEGMENT, last + 1, DiskShare::ALL, &GO).unwrap();
        assert!(third.written.is_some());
        assert_eq!(third.segments_deleted, (3..last).collect::<Vec<_>>());
        let (recovered, _) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn a_snapshot_refuses_closed_segments_that_do_not_continue_each_other() {
        let (data, dir, last, _) = laid_out("hole");
        fs::remove_file(segment_path(&dir, 2)).unwrap();
        let error =
            take_snapshot(&dir, &config(), NOW, SEGMENT, last, DiskShare::ALL, &GO).expect_err("a hole in the log");
        assert!(format!("{error:#}").contains("starts at position"), "{error:#}");
        assert!(snapshots(&dir).unwrap().is_empty());
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn a_stopping_server_stops_its_snapshot_before_it_writes_or_deletes() {
        let (data, dir, last, _) = laid_out("stopped");
        let before = names(&dir);
        let error = take_snapshot(&dir, &config(), NOW, SEGMENT, last, DiskShare::ALL, &AtomicBool::new(true))
            .expect_err("stopped");
        assert!(error.to_string().contains("stopping"), "{error:#}");
        assert_eq!(names(&dir), before);
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn a_damaged_newest_snapshot_falls_back_to_the_older_one_and_is_set_aside() {
        let (data, dir, last, hash, newest) = with_two_snapshots("fallback");
        flip(&newest, usize::MAX, 0x40);
        // A snapshot being written when the process died is not a snapshot.
        fs::write(dir.join("snap-00000000ffffffff.tmp"), b"half").unwrap();
        let (recovered, _) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        assert!(!dir.join("snap-00000000ffffffff.tmp").exists());
        // The next snapshot sets the damaged one aside rather than keep it as one of two,
        // and so deletes no segment the older good snapshot still needs.
        let next = take_snapshot(&dir, &config(), NOW, SEGMENT, last + 1, DiskShare::ALL, &GO).unwrap();
        assert!(newest.with_extension("snap.damaged").exists() && !newest.exists());
        // Kept: the first snapshot and the new one, so the segments after the first stay
        // (had the damaged one counted as the older of two, segments 3 on would be gone).
        assert_eq!(snapshots(&dir).unwrap().len(), 2);
        assert!(next.segments_deleted.is_empty());
        assert_eq!(segments(&dir).unwrap().first().map(|s| s.0), Some(3));
        // Even with the new one damaged too, the first and the log after it recover.
        let (new, _) = next.written.unwrap();
        flip(&new, 100, 1);
        let (recovered, _) = recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn a_log_that_starts_after_every_loadable_snapshot_is_refused_by_name() {
        let (data, dir, _, _, _) = with_two_snapshots("gap");
        // Both snapshots damaged: the log alone starts at segment 3, after position 1.
        for (_, path) in snapshots(&dir).unwrap() {
            flip(&path, 70, 1);
        }
        let error = format!("{:#}", recover(&data, &config(), NOW, SEGMENT, false).err().expect("refused"));
        assert!(error.contains("starts after no snapshot") && error.contains("expected 1"), "{error}");
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn durability_parses_and_prints() {
        assert_eq!("sync".parse::<Durability>(), Ok(Durability::Sync));
        assert_eq!("batch=5".parse::<Durability>(), Ok(Durability::Batch { ms: 5 }));
        assert_eq!(Durability::Batch { ms: 5 }.to_string(), "batch=5");
        assert!("batch=0".parse::<Durability>().is_err());
        assert!("fast".parse::<Durability>().is_err());
        assert_eq!("none".parse::<Durability>(), Ok(Durability::None));
    }

    #[test]
    fn records_end_at_the_first_zero_length() {
        let mut bytes = vec![0u8; 64];
        bytes[0] = 16;
        bytes[16] = 24;
        assert_eq!(records_end(&bytes), 40);
        assert_eq!(fitting_records(&bytes[..40], 39), 16);
        assert_eq!(fitting_records(&bytes[..40], 40), 40);
    }
}
