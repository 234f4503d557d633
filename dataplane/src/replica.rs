//! Snapshots from memory: a replica of one shard's state, kept on a background thread
//! and fed the log's records as they become durable, writes each snapshot without
//! reading the log back (`wal.snapshot_source = "replica"`; by default the same thread
//! builds each snapshot from the files instead, `wal::take_snapshot`).
//!
//! Built from the files, a snapshot reads every closed segment again and replays it in
//! bursts that fall behind under load (at 850 k requests/s on the 2-vCPU benchmark guest,
//! one snapshot per run and about 500 MB read back). The replica replays the same records
//! as they come, from the writer's own buffers, so it keeps up and reads nothing; at a
//! snapshot it archives its state, writes it, and loads it back to go on (which checks
//! what it wrote). The price is a second copy of the shard's state in memory and a steady
//! share of a CPU: worth it where a core is spare beside the shards (on the benchmark
//! guest, whose only other CPU is the load generator's, it raised the half-load tail;
//! `docs/wal.md`).
//!
//! The replica starts at the position its core recovered to, from the newest snapshot
//! and the log up to there; every batch after it is fed. It falls back on the files when
//! it cannot follow: when it cannot start, when a snapshot fails, and when it falls
//! `feed_max_bytes` behind the writer (the writer stops feeding it; the gap that leaves
//! in the positions it receives makes it drop its state). Its next due snapshot is then
//! taken from the files, and it follows from that snapshot's state. A snapshot never
//! covers a record that is not durable: the writer feeds a batch only after the
//! `fdatasync` that covers it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use stockplane_engine::{Shard, ShardConfig, Tick};
use tracing::{info, warn};

use crate::wal::{self, DiskShare, SnapshotDone};

/// How long the replica sleeps when it finds nothing fed: the first time, and at most.
const FEED_POLL_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const FEED_POLL_MAX: std::time::Duration = std::time::Duration::from_millis(32);

/// What the writer tells the replica, in log order.
enum Feed {
    /// A durable batch's records (whole records, in order).
    Durable(Vec<u8>),
    /// Every segment before `open` is closed, and every record in them was fed before
    /// this message (a batch that spans segments is fed after it).
    Closed { open: u64 },
}

/// The replica's state and the snapshots it takes.
pub struct Replica {
    dir: PathBuf,
    config: ShardConfig,
    segment_bytes: u64,
    /// A snapshot after this many more closed segments.
    every: u64,
    /// Whether to keep the state between snapshots (`wal.snapshot_source = "replica"`): when not,
    /// every snapshot is taken from the files and nothing is fed.
    follow: bool,
    /// The share of the disk's time its reads and writes may take.
    share: DiskShare,
    /// The shard's state up to the last record fed (`None`: not following the log).
    state: Option<Shard>,
    /// Segments closed when the last snapshot was taken.
    closed_at_last: u64,
}

/// How a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From the replica's state.
    Memory,
    /// From the newest snapshot and the closed segments on disk.
    Files,
    /// From a forked copy of the serving process (`crate::fork`).
    Fork,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Files => "files",
            Source::Fork => "fork",
        }
    }
}

/// A shard's snapshot metrics, and the log lines of each snapshot taken or failed.
pub(crate) struct SnapshotMetrics {
    shard: u32,
    took: metrics::Histogram,
    bytes: metrics::Gauge,
    position: metrics::Gauge,
    deleted: metrics::Counter,
    failures: metrics::Counter,
}

impl SnapshotMetrics {
    pub(crate) fn new(shard: u32) -> SnapshotMetrics {
        let labels = [("shard", shard.to_string())];
        SnapshotMetrics {
            shard,
            took: metrics::histogram!("stockplane_snapshot_seconds", &labels),
            bytes: metrics::gauge!("stockplane_snapshot_bytes", &labels),
            position: metrics::gauge!("stockplane_snapshot_position", &labels),
            deleted: metrics::counter!("stockplane_wal_segments_deleted_total", &labels),
            failures: metrics::counter!("stockplane_snapshot_failures_total", &labels),
        }
    }

    /// A snapshot from `source`, started at `started`, did `done`.
    pub(crate) fn taken(&self, source: Source, started: Instant, done: &SnapshotDone) {
        let shard = self.shard;
        self.took.record(started.elapsed().as_secs_f64());
        self.deleted.increment(done.segments_deleted.len() as u64);
        metrics::counter!("stockplane_snapshots_total", "shard" => shard.to_string(), "source" => source.name())
            .increment(1);
        if let Some((path, at)) = &done.written {
            self.bytes.set(done.bytes as f64);
            self.position.set(*at as f64);
            info!(
                shard,
                file = %path.display(),
                position = at,
                bytes = done.bytes,
                source = source.name(),
                seconds = started.elapsed().as_secs_f64(),
                segments_deleted = ?done.segments_deleted,
                "snapshot written"
            );
        }
    }

    /// A snapshot failed; the log is whole without it.
    pub(crate) fn failed(&self, error: &anyhow::Error) {
        self.failures.increment(1);
        warn!(shard = self.shard, error = format!("{error:#}"), "a snapshot failed; the log is kept whole");
    }
}

impl Replica {
    /// A replica of the shard logged in `dir`, which takes a snapshot whenever `every`
    /// more segments were closed than `closed_at_last` (the closed segments that the
    /// newest snapshot covered when the shard started). `follow`: keep the state between
    /// snapshots and take them from memory (else each one comes from the files).
    pub fn new(
        dir: PathBuf,
        config: ShardConfig,
        segment_bytes: u64,
        every: u64,
        closed_at_last: u64,
        follow: bool,
    ) -> Replica {
        Replica {
            dir,
            config,
            segment_bytes,
            every: every.max(1),
            follow,
            share: DiskShare::ALL,
            state: None,
            closed_at_last,
        }
    }

    /// Reads and writes in `share` of the disk's time (the whole disk until this is set).
    pub fn sharing_the_disk(mut self, share: DiskShare) -> Replica {
        self.share = share;
        self
    }

    /// Starts following the log at position `until` (the serving shard's position when it
    /// started, before it wrote anything; every batch after it is fed), from the newest
    /// snapshot and the segments after it. On an error (or when not following) the
    /// replica stays empty, and the next due snapshot comes from the files.
    pub fn start(&mut self, until: u64, now: Tick, stop: &AtomicBool) {
        if !self.follow {
            return;
        }
        match wal::state_through(&self.dir, &self.config, now, self.segment_bytes, until, self.share, stop) {
            Ok(shard) => self.state = Some(shard),
            Err(error) => warn!(
                shard = self.config.shard,
                error = format!("{error:#}"),
                "the snapshot replica could not start following the log; its next snapshot is taken from the files"
            ),
        }
    }

    /// Applies a durable batch's records. Records it already has are skipped; a batch
    /// that does not continue its state (a batch was left out) or does not replay ends
    /// the following, until the next snapshot is taken from the files.
    pub fn feed(&mut self, records: &[u8]) {
        let Some(shard) = &mut self.state else { return };
        let head = shard.wal_head();
        let reason = match shard.replay_log(records) {
            Ok(valid) if valid == records.len() => return,
            Ok(valid) => format!("a record it was fed is damaged at byte {valid}"),
            Err(error) => error.to_string(),
        };
        warn!(
            shard = self.config.shard,
            position = head,
            reason,
            "the snapshot replica stopped following the log; its next snapshot is taken from the files"
        );
        self.state = None;
    }

    /// The disk's share for a snapshot when `closed` segments are closed: its own, unless
    /// the snapshot is a whole interval late (`2 × every` closed since the last one, as
    /// when snapshots from the files fall behind the log): then the whole disk, to catch
    /// up before the log grows further.
    fn share_for(&self, closed: u64) -> DiskShare {
        if closed >= self.closed_at_last + 2 * self.every {
            DiskShare::ALL
        } else {
            self.share
        }
    }

    /// Segments before `open` are closed: when `every` more were closed since the last
    /// snapshot, takes the next one (from memory when following, else from the files,
    /// whose state it then follows). `now` is the wall clock, for loading. On an error the
    /// replica stops following; the log is whole without the snapshot.
    pub fn closed(
        &mut self,
        open: u64,
        now: Tick,
        stop: &AtomicBool,
    ) -> anyhow::Result<Option<(Source, SnapshotDone)>> {
        let closed = open.saturating_sub(1);
        if closed < self.closed_at_last + self.every {
            return Ok(None);
        }
        let share = self.share_for(closed);
        let (source, done) = match self.state.take() {
            Some(shard) => {
                let (done, state) = wal::snapshot_from_memory(&self.dir, shard, now, open, share, stop)?;
                self.state = Some(state);
                (Source::Memory, done)
            }
            None => {
                // When following, from the new snapshot's state (it covers every closed
                // segment, and what came after is still to be fed).
                let (done, state) = wal::snapshot_from_files(
                    &self.dir,
                    &self.config,
                    now,
                    self.segment_bytes,
                    open,
                    self.follow,
                    share,
                    stop,
                )?;
                self.state = state;
                (Source::Files, done)
            }
        };
        self.closed_at_last = closed;
        Ok(Some((source, done)))
    }
}

/// The writer's end of the replica: durable batches' buffers (when it follows the log),
/// and closed segments.
pub struct ReplicaFeed {
    follow: bool,
    sender: mpsc::Sender<Feed>,
    /// Buffers the replica is done with, for the next batches.
    spares: mpsc::Receiver<Vec<u8>>,
    /// Bytes sent and not yet applied.
    queued: Arc<AtomicUsize>,
    feed_max_bytes: usize,
    left_out: metrics::Counter,
}

impl ReplicaFeed {
    /// Whether the replica takes a written batch of `len` bytes (to be sent with
    /// [`ReplicaFeed::durable`] once it is durable): not when it does not follow, nor
    /// when it is already `feed_max_bytes` behind (it then catches up from the files at
    /// its next snapshot).
    pub fn accepts(&self, len: usize) -> bool {
        if !self.follow {
            return false;
        }
        if self.queued.load(Ordering::Relaxed) + len > self.feed_max_bytes {
            self.left_out.increment(1);
            return false;
        }
        true
    }

    /// A buffer the replica is done with (empty), or a new one.
    pub fn spare(&self) -> Vec<u8> {
        let mut spare = self.spares.try_recv().unwrap_or_default();
        spare.clear();
        spare
    }

    /// A batch it accepted is durable: its records go to the replica.
    pub fn durable(&self, records: Vec<u8>) {
        self.queued.fetch_add(records.len(), Ordering::Relaxed);
        let _ = self.sender.send(Feed::Durable(records));
    }

    /// Every segment before `open` is closed (send before feeding the batch that closed
    /// the last of them).
    pub fn closed(&self, open: u64) {
        let _ = self.sender.send(Feed::Closed { open });
    }
}

/// The replica's thread body and the writer's end of it. The body returns when the feed
/// is dropped or `stop` is set; run it on a thread of its own (its work is blocking I/O
/// and CPU).
/// `start`: the serving shard's position before it wrote anything (see [`Replica::start`]).
pub fn channel(
    mut replica: Replica,
    start: u64,
    feed_max_bytes: usize,
    stop: Arc<AtomicBool>,
) -> (ReplicaFeed, impl FnOnce() + Send + 'static) {
    let (sender, receiver) = mpsc::channel();
    let (spare_sender, spares) = mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let shard = replica.config.shard;
    let labels = [("shard", shard.to_string())];
    let feed = ReplicaFeed {
        follow: replica.follow,
        sender,
        spares,
        queued: queued.clone(),
        feed_max_bytes,
        left_out: metrics::counter!("stockplane_snapshot_feed_left_out_total", &labels),
    };
    let metrics = SnapshotMetrics::new(shard);
    let body = move || {
        let take = |replica: &mut Replica, records: Vec<u8>| {
            replica.feed(&records);
            queued.fetch_sub(records.len(), Ordering::Relaxed);
            let _ = spare_sender.send(records);
        };
        replica.start(start, crate::core::wall_clock_ms(), &stop);
        let mut idle = FEED_POLL_MIN;
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            // Polled, not waited for: a receiver parked in `recv` is woken by each send, a
            // futex call (and in a virtual machine, an interrupt sent to this thread's CPU,
            // which exits to the hypervisor) on the serving core for every batch. The
            // sleeps grow while nothing comes.
            let message = match receiver.try_recv() {
                Ok(message) => message,
                Err(mpsc::TryRecvError::Empty) => {
                    std::thread::sleep(idle);
                    idle = (idle * 2).min(FEED_POLL_MAX);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
            };
            idle = FEED_POLL_MIN;
            match message {
                Feed::Durable(records) => take(&mut replica, records),
                Feed::Closed { mut open } => {
                    // Closes that queued up while the last snapshot ran: when the replica
                    // does not follow, a snapshot from the files takes every closed
                    // segment, so the newest close is the one to act on (a replica that
                    // does not follow is fed no batch; one would still be taken in order).
                    if !replica.follow {
                        while let Ok(next) = receiver.try_recv() {
                            match next {
                                Feed::Closed { open: newer } => open = newer,
                                Feed::Durable(records) => take(&mut replica, records),
                            }
                        }
                    }
                    let started = Instant::now();
                    match replica.closed(open, crate::core::wall_clock_ms(), &stop) {
                        Ok(None) => {}
                        Ok(Some((source, done))) => metrics.taken(source, started, &done),
                        Err(_) if stop.load(Ordering::Acquire) => break,
                        // The next closed segment tries again, from the files.
                        Err(error) => metrics.failed(&error),
                    }
                }
            }
        }
    };
    (feed, body)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;
    use crate::wal::tests::{config, laid_out, laid_out_with_twin, names, segment_records, GO, NOW, SEGMENT};

    /// `records` cut in two at the first record boundary at or after its middle.
    fn halves(records: &[u8]) -> (&[u8], &[u8]) {
        let mut at = 0;
        while at < records.len() / 2 {
            at += u16::from_le_bytes([records[at], records[at + 1]]) as usize;
        }
        records.split_at(at)
    }

    /// The log in `data` recovers to the state whose hash is `hash`; then `data` goes.
    fn recovers_then_goes(data: &Path, hash: u64) {
        let (recovered, _) = wal::recover(data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        fs::remove_dir_all(data).unwrap();
    }

    fn source(taken: Option<(Source, SnapshotDone)>) -> Source {
        taken.expect("a snapshot was due").0
    }

    /// Fed the writer's batches, the replica writes, segment for segment, the same
    /// snapshot files (byte for byte) as snapshots built from the files, deletes the same
    /// segments, and the log recovers to the state that wrote it.
    #[test]
    fn a_replica_fed_the_log_writes_the_snapshots_the_files_would() {
        let (data, dir, last, hash, twin) = laid_out_with_twin("replica");
        assert!(last >= 6, "only {last} segments");
        let mut replica = Replica::new(dir.clone(), config(), SEGMENT, 2, 0, true);
        // One segment closed: not due. Two: due, and taken from the files (the replica
        // has followed nothing yet).
        assert!(replica.closed(2, NOW, &GO).unwrap().is_none());
        assert_eq!(source(replica.closed(3, NOW, &GO).unwrap()), Source::Files);
        wal::take_snapshot(&twin, &config(), NOW, SEGMENT, 3, DiskShare::ALL, &GO).unwrap();
        let mut from_memory = 0;
        for sequence in 3..last {
            // The writer's batches of this segment, then its close.
            let records = segment_records(&dir, sequence);
            let (first, second) = halves(&records);
            replica.feed(first);
            replica.feed(second);
            let taken = replica.closed(sequence + 1, NOW, &GO).unwrap();
            if sequence % 2 == 1 {
                assert!(taken.is_none(), "a snapshot after one more segment");
                continue;
            }
            let (source, done) = taken.expect("a snapshot after two more segments");
            assert_eq!(source, Source::Memory);
            let twin_done =
                wal::take_snapshot(&twin, &config(), NOW, SEGMENT, sequence + 1, DiskShare::ALL, &GO).unwrap();
            let (path, at) = done.written.expect("a new snapshot");
            let (twin_path, twin_at) = twin_done.written.expect("a new snapshot");
            assert_eq!(at, twin_at);
            assert!(fs::read(&path).unwrap() == fs::read(&twin_path).unwrap(), "snapshot {at:#x} differs");
            assert_eq!(done.segments_deleted, twin_done.segments_deleted);
            assert_eq!(done.snapshots_deleted, twin_done.snapshots_deleted);
            assert_eq!(names(&dir), names(&twin));
            from_memory += 1;
        }
        assert!(from_memory >= 1, "no snapshot from memory");
        recovers_then_goes(&data, hash);
        fs::remove_dir_all(&twin).unwrap();
    }

    /// A batch left out (the writer stops feeding a replica that lags) ends the
    /// following: the next snapshot comes from the files, whose state the replica then
    /// follows again. A batch fed twice changes nothing.
    #[test]
    fn a_replica_that_misses_a_batch_takes_its_next_snapshot_from_the_files() {
        let (data, dir, last, hash) = laid_out("replica-gap");
        assert!(last >= 5, "only {last} segments");
        let mut replica = Replica::new(dir.clone(), config(), SEGMENT, 1, 0, true);
        assert_eq!(source(replica.closed(2, NOW, &GO).unwrap()), Source::Files);
        let records = segment_records(&dir, 2);
        let (_, second) = halves(&records);
        replica.feed(second);
        assert_eq!(source(replica.closed(3, NOW, &GO).unwrap()), Source::Files);
        let records = segment_records(&dir, 3);
        replica.feed(&records);
        replica.feed(&records);
        assert_eq!(source(replica.closed(4, NOW, &GO).unwrap()), Source::Memory);
        recovers_then_goes(&data, hash);
    }

    /// A replica started at the serving shard's position (a restart whose log ended in
    /// segment 3; the writer then wrote segment 4 and fed it) takes its first snapshot
    /// from memory, reading only the log up to that position; started at a position the
    /// log does not reach, it stays empty and takes the next one from the files.
    #[test]
    fn a_started_replica_takes_its_first_snapshot_from_memory() {
        let (data, dir, last, hash) = laid_out("replica-start");
        assert!(last >= 5, "only {last} segments");
        wal::take_snapshot(&dir, &config(), NOW, SEGMENT, 3, DiskShare::ALL, &GO).unwrap();
        let restarted = wal::last_position(&segment_records(&dir, 3)).unwrap();
        let mut replica = Replica::new(dir.clone(), config(), SEGMENT, 2, 2, true);
        replica.start(restarted, NOW, &GO);
        replica.feed(&segment_records(&dir, 4));
        assert_eq!(source(replica.closed(5, NOW, &GO).unwrap()), Source::Memory);
        let mut beyond = Replica::new(dir.clone(), config(), SEGMENT, 1, 4, true);
        beyond.start(u64::MAX, NOW, &GO);
        beyond.feed(&segment_records(&dir, 5));
        assert_eq!(source(beyond.closed(6, NOW, &GO).unwrap()), Source::Files);
        recovers_then_goes(&data, hash);
    }

    /// `wal.snapshot_source = "files"`: nothing is copied to the replica, which keeps no
    /// state and takes every snapshot from the files.
    #[test]
    fn a_replica_that_does_not_follow_takes_every_snapshot_from_the_files() {
        let (data, dir, last, hash) = laid_out("replica-off");
        assert!(last >= 4, "only {last} segments");
        let (feed, _) = channel(Replica::new(dir.clone(), config(), SEGMENT, 1, 0, false), 0, 1 << 20, Arc::default());
        assert!(!feed.accepts(60));
        let mut replica = Replica::new(dir.clone(), config(), SEGMENT, 1, 0, false);
        assert_eq!(source(replica.closed(2, NOW, &GO).unwrap()), Source::Files);
        replica.feed(&segment_records(&dir, 2));
        assert_eq!(source(replica.closed(3, NOW, &GO).unwrap()), Source::Files);
        recovers_then_goes(&data, hash);
    }

    /// Closes that queued up while a snapshot from the files ran are taken together: one
    /// snapshot of every closed segment, not one per close.
    #[test]
    fn closes_that_queued_up_make_one_snapshot_from_the_files() {
        let (data, dir, last, hash) = laid_out("replica-queued");
        assert!(last >= 4, "only {last} segments");
        let stop = Arc::new(AtomicBool::new(false));
        let (feed, body) = channel(Replica::new(dir.clone(), config(), SEGMENT, 1, 0, false), 0, 1 << 20, stop);
        for open in 2..=last {
            feed.closed(open);
        }
        drop(feed);
        body();
        let snapshots: Vec<_> = names(&dir).into_iter().filter(|n| n.ends_with(".snap")).collect();
        let end = wal::last_position(&segment_records(&dir, last - 1)).unwrap();
        assert_eq!(snapshots, vec![format!("snap-{end:016x}.snap")]);
        recovers_then_goes(&data, hash);
    }

    /// A snapshot a whole interval late takes the whole disk; otherwise its own share.
    #[test]
    fn a_late_snapshot_takes_the_whole_disk() {
        let half = DiskShare::percent(50).unwrap();
        let replica = Replica::new(std::env::temp_dir(), config(), SEGMENT, 2, 3, false).sharing_the_disk(half);
        assert_eq!(replica.share_for(5), half);
        assert_eq!(replica.share_for(6), half);
        assert_eq!(replica.share_for(7), DiskShare::ALL);
    }

    /// The writer's end: copies until the replica is `feed_max_bytes` behind, then leaves
    /// batches out; buffers come back for reuse.
    #[test]
    fn the_feed_leaves_batches_out_while_the_replica_is_too_far_behind() {
        let (dir, stop) = (std::env::temp_dir(), Arc::new(AtomicBool::new(false)));
        let (feed, body) = channel(Replica::new(dir, config(), SEGMENT, 1, 0, true), 0, 100, stop);
        assert!(feed.accepts(60));
        feed.durable(vec![7; 60]);
        assert!(!feed.accepts(60), "60 bytes queued and 60 more are over 100");
        assert!(feed.accepts(40));
        // The replica takes the queued batch (it follows nothing: it ignores it), gives
        // the buffer back, and ends when the feed goes.
        let spares = {
            let ReplicaFeed { sender, spares, queued, .. } = feed;
            drop(sender);
            body();
            assert_eq!(queued.load(Ordering::Relaxed), 0);
            spares
        };
        assert_eq!(spares.try_recv().map(|spare| spare.capacity() >= 60), Ok(true));
    }
}
