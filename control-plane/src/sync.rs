//! The sync between the books and the data plane, in both directions.
//!
//! **Drain (data plane → books, exactly once).** One drainer per shard reads the shard's
//! journal from the drained position that PostgreSQL holds and writes it into the books
//! in batches. Each batch is one transaction (ledger rows, stock changes, adjustments
//! seen applied) and is idempotent: an entry already in the books, by its (shard,
//! epoch, position) or its adjustment id, is skipped ([`Db::drain_write`]). The drained
//! position moves after its batches, in order, and only from where it is
//! ([`Db::drain_advance`]); with `drain.writers = 1` batch and position share one
//! transaction ([`Db::drain_apply`]). A drainer killed anywhere leaves committed batches
//! and a position at or below them; the next one starts from the position and skips
//! what is already there. Reads run ahead of writes, and `drain.writers` batches may be
//! in flight at once, their books updates queued behind the shard's advisory lock.
//!
//! **Push (books → data plane).** One pusher per shard closes the gap between what
//! PostgreSQL intends and what the shard acknowledged: every stock row (an upsert) and
//! adjustment (by its id, so a push retried after a lost answer is applied once) above
//! the shard's cursor, in `push_seq` order ([`Db::push_batch`]), after which the cursor
//! moves past what the shard acknowledged ([`Db::push_advance`]).
//!
//! **A shard that restarted empty.** It answers with another incarnation than the one
//! this epoch drains (or its journal is shorter than the books' drained position); the drainer then begins a new epoch ([`Db::epoch_begin`]): the drain starts
//! again at 1, and every row, a bootstrap adjustment that gives each row the books'
//! on-hand figure, and every adjustment that never came back through the journal are
//! queued again. An empty data plane at first start is the same case without the epoch
//! change: everything is above the cursor.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use stockplane_wire::{JournalChange, JournalEntry, Op, Status};
use tokio::sync::mpsc;

use crate::app::App;
use crate::dataplane::{CallError, Dataplane, JournalRead};
use crate::db::{Db, DrainedEntry, DrainedKind, PushAdjustment};

/// Starts a drainer and a pusher for every shard once the data plane is reached.
pub fn spawn(app: App) {
    tokio::spawn(async move {
        let dataplane = app.link.wait().await;
        for shard in 0..dataplane.shards() {
            tokio::spawn(drainer(app.clone(), dataplane.clone(), shard));
            tokio::spawn(pusher(app.clone(), dataplane.clone(), shard));
        }
    });
}

/// What one drain pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainPass {
    /// Entries written into the books.
    pub entries: u64,
    /// Transactions committed.
    pub batches: u64,
    /// True if the shard was found to have restarted empty (a new epoch began).
    pub new_epoch: bool,
    /// Time spent waiting for journal reads (not overlapped with a write).
    pub read_wait: Duration,
    /// Time spent writing into PostgreSQL.
    pub write: Duration,
}

impl DrainPass {
    /// Counts a batch that is in the books, with the drained position now `next`.
    fn batch_done(&mut self, shard: u32, entries: u64, next: u64, started: Instant) {
        let took = started.elapsed();
        self.write += took;
        self.entries += entries;
        self.batches += 1;
        metrics::histogram!("stockplane_cp_drain_write_seconds").record(took.as_secs_f64());
        metrics::counter!("stockplane_cp_drained_entries_total", "shard" => shard.to_string()).increment(entries);
        metrics::gauge!("stockplane_cp_drained_position", "shard" => shard.to_string()).set(next as f64);
    }
}

/// One batch read from a journal: entries from `from` up to `next`.
struct ReadBatch {
    from: u64,
    next: u64,
    entries: Vec<JournalEntry>,
}

/// What the read-ahead tells the drain, in order.
enum Read {
    /// The shard's incarnation, from the first read (before any batch).
    Seen(u64),
    /// A batch of entries.
    Batch(ReadBatch),
    /// The reads stopped.
    End(ReadEnd),
}

/// Why a read-ahead stopped.
enum ReadEnd {
    /// Caught up with the journal's end.
    CaughtUp,
    /// The shard's journal is behind the books: it restarted empty.
    Behind,
    /// The shard no longer keeps entries from this position.
    Truncated(u64),
    /// The data plane failed.
    Failed(CallError),
}

/// Drains `shard` until its journal's end (as seen when the pass began), with reads
/// running ahead of the writes. Returns what it did; an error leaves the books as the
/// last committed batch left them.
pub async fn drain_pass(
    db: &Db,
    dataplane: &Dataplane,
    shard: u32,
    options: DrainOptions,
) -> anyhow::Result<DrainPass> {
    let writers = options.writers;
    let position = db.position(shard).await?;
    let mut pass = DrainPass::default();
    let (tx, mut rx) = mpsc::channel::<Read>(4);
    // The furthest journal position read so far: the drain's lag is how far the books
    // are behind it.
    let read_end = Arc::new(AtomicU64::new(position.drained));
    let lag = metrics::gauge!("stockplane_cp_drain_lag_entries", "shard" => shard.to_string());
    let reader = {
        let dataplane = dataplane.clone();
        let from = position.drained;
        let read_end = read_end.clone();
        tokio::spawn(async move { read_ahead(dataplane, shard, from, options, tx, read_end).await })
    };
    let mut from = position.drained;
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let epoch = position.epoch;
    let result = loop {
        let waited = Instant::now();
        let Some(read) = rx.recv().await else { break Ok(pass) };
        pass.read_wait += waited.elapsed();
        let batch: Result<ReadBatch, ReadEnd> = match read {
            Read::Seen(incarnation) => {
                // Which life of the shard answers: one other than the epoch drains
                // started without its data, whatever the length of its new journal.
                match db.incarnation_note(shard, epoch, incarnation).await? {
                    Some(recorded) if recorded != incarnation => {
                        epoch_restart(db, shard, epoch, "it answers as another incarnation").await?;
                        pass.new_epoch = true;
                        break Ok(pass);
                    }
                    _ => continue,
                }
            }
            Read::Batch(batch) => Ok(batch),
            Read::End(end) => {
                // Whatever ended the reads, the batches already read go into the books.
                if !settle(db, shard, epoch, &mut inflight, 0, &mut pass).await? {
                    break Ok(pass);
                }
                Err(end)
            }
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(ReadEnd::CaughtUp) => {
                lag.set(0.0);
                break Ok(pass);
            }
            Err(ReadEnd::Behind) if from == position.drained && from > 1 => {
                epoch_restart(db, shard, epoch, "its journal is behind the books").await?;
                pass.new_epoch = true;
                break Ok(pass);
            }
            Err(ReadEnd::Behind) => break Ok(pass),
            Err(ReadEnd::Truncated(first)) => {
                tracing::error!(shard, from, first, "the shard no longer keeps journal entries the books never drained; the books skip them and reconcile will show the difference");
                metrics::counter!("stockplane_cp_journal_gaps_total", "shard" => shard.to_string()).increment(1);
                db.drain_apply(shard, position.epoch, from, first, &[]).await?;
                break Ok(pass);
            }
            Err(ReadEnd::Failed(error)) => break Err(anyhow::Error::new(error).context("read the journal")),
        };
        debug_assert_eq!(batch.from, from);
        let drained: Vec<DrainedEntry> = batch.entries.iter().map(drained_of).collect();
        let started = Instant::now();
        if writers > 1 {
            // Concurrent, idempotent writes; the position follows them in order.
            let entries = drained.len() as u64;
            let write = {
                let db = db.clone();
                tokio::spawn(async move { db.drain_write(shard, epoch, &drained).await })
            };
            inflight.push_back(InFlight { from: batch.from, next: batch.next, entries, started, write });
            from = batch.next;
            if !settle(db, shard, epoch, &mut inflight, writers - 1, &mut pass).await? {
                break Ok(pass);
            }
            let drained = inflight.front().map_or(from, |oldest| oldest.from);
            lag.set(read_end.load(Ordering::Relaxed).saturating_sub(drained) as f64);
            continue;
        }
        if !db.drain_apply(shard, position.epoch, batch.from, batch.next, &drained).await? {
            // Someone else moved the position (another control plane): start over later.
            tracing::warn!(shard, from, "the drained position moved under us; starting the pass again");
            break Ok(pass);
        }
        pass.batch_done(shard, drained.len() as u64, batch.next, started);
        lag.set(read_end.load(Ordering::Relaxed).saturating_sub(batch.next) as f64);
        from = batch.next;
    };
    reader.abort();
    for rest in inflight {
        rest.write.abort();
    }
    result
}

/// Begins a new epoch for a shard found to have restarted without its state (`why`).
async fn epoch_restart(db: &Db, shard: u32, epoch: i64, why: &str) -> anyhow::Result<()> {
    tracing::warn!(shard, epoch, why, "the shard restarted without its state; beginning a new epoch");
    metrics::counter!("stockplane_cp_epochs_begun_total", "shard" => shard.to_string()).increment(1);
    db.epoch_begin(shard, epoch).await?;
    Ok(())
}

/// How a drain pass reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOptions {
    /// Journal entries per PostgreSQL transaction, at most.
    pub batch_entries: u32,
    /// Journal entries per read from the shard.
    pub read_entries: u32,
    /// Transactions in flight at once (1: each batch moves the position itself).
    pub writers: usize,
}

impl DrainOptions {
    /// The options of the configuration's `[drain]` section.
    pub fn of(config: &crate::config::DrainConfig) -> DrainOptions {
        DrainOptions {
            batch_entries: config.batch_entries,
            read_entries: config.read_entries,
            writers: config.writers as usize,
        }
    }
}

/// A batch being written by its own transaction.
struct InFlight {
    from: u64,
    next: u64,
    entries: u64,
    started: Instant,
    write: tokio::task::JoinHandle<Result<u64, crate::db::DbError>>,
}

/// Waits for the oldest writes until at most `keep` are in flight, moving the drained
/// position past each in order. Returns false if the position moved under us (another
/// drainer): the rest are then abandoned (they are idempotent, so whoever drains next
/// finds their entries and skips them).
async fn settle(
    db: &Db,
    shard: u32,
    epoch: i64,
    inflight: &mut VecDeque<InFlight>,
    keep: usize,
    pass: &mut DrainPass,
) -> anyhow::Result<bool> {
    while inflight.len() > keep {
        let done = inflight.pop_front().expect("more than `keep` in flight");
        done.write.await.context("a drain write task")??;
        if !db.drain_advance(shard, epoch, done.from, done.next).await? {
            tracing::warn!(shard, from = done.from, "the drained position moved under us; starting the pass again");
            return Ok(false);
        }
        pass.batch_done(shard, done.entries, done.next, done.started);
    }
    Ok(true)
}

/// Reads batches of up to `batch_entries` from `from` on, sending each as it fills,
/// until the journal's end, an error, or the receiver leaves.
async fn read_ahead(
    dataplane: Dataplane,
    shard: u32,
    mut from: u64,
    options: DrainOptions,
    tx: mpsc::Sender<Read>,
    read_end: Arc<AtomicU64>,
) {
    let DrainOptions { batch_entries, read_entries, .. } = options;
    let mut batch = ReadBatch { from, next: from, entries: Vec::new() };
    let mut seen = None;
    loop {
        let end = match dataplane.journal(shard, from, read_entries).await {
            Ok(JournalRead::Entries { entries, next, incarnation }) => {
                if seen.is_none() {
                    // Said before any batch, so the drain checks it before writing.
                    seen = Some(incarnation);
                    if tx.send(Read::Seen(incarnation)).await.is_err() {
                        return;
                    }
                }
                if seen != Some(incarnation) {
                    // The shard restarted since the pass began: this pass ends here.
                    Some(ReadEnd::Failed(CallError::Status(Status::Unavailable)))
                } else {
                    let done = entries.is_empty();
                    batch.entries.extend(entries);
                    batch.next = next;
                    from = next;
                    read_end.store(next, Ordering::Relaxed);
                    if done {
                        Some(ReadEnd::CaughtUp)
                    } else {
                        None
                    }
                }
            }
            Ok(JournalRead::Behind) => Some(ReadEnd::Behind),
            Ok(JournalRead::Truncated) => Some(match truncation_end(&dataplane, shard, from).await {
                Ok(first) => ReadEnd::Truncated(first),
                Err(error) => ReadEnd::Failed(error),
            }),
            Err(error) => Some(ReadEnd::Failed(error)),
        };
        let full = batch.entries.len() >= batch_entries as usize;
        if (full || end.is_some()) && !batch.entries.is_empty() {
            let next = batch.next;
            let sent = std::mem::replace(&mut batch, ReadBatch { from: next, next, entries: Vec::new() });
            if tx.send(Read::Batch(sent)).await.is_err() {
                return;
            }
        }
        if let Some(end) = end {
            let _ = tx.send(Read::End(end)).await;
            return;
        }
    }
}

/// The first position a shard still keeps, found by doubling then bisecting from a
/// position it no longer keeps.
async fn truncation_end(dataplane: &Dataplane, shard: u32, gone: u64) -> Result<u64, CallError> {
    let kept = |read: &JournalRead| !matches!(read, JournalRead::Truncated);
    let (mut low, mut step) = (gone, 1u64);
    let mut high = loop {
        let probe = gone + step;
        if kept(&dataplane.journal(shard, probe, 1).await?) {
            break probe;
        }
        low = probe;
        step *= 2;
    };
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if kept(&dataplane.journal(shard, mid, 1).await?) {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(high)
}

fn drained_of(entry: &JournalEntry) -> DrainedEntry {
    let kind = match entry.change {
        JournalChange::Sale { hold, qty, at_ms } => DrainedKind::Sale { hold: hold.0, qty, at_ms },
        JournalChange::Adjustment { adjustment, delta } => DrainedKind::Adjustment { id: adjustment, delta },
    };
    DrainedEntry { position: entry.position, sku: entry.sku, location: entry.location, kind }
}

/// Drains one shard for ever, backing off on errors.
async fn drainer(app: App, dataplane: Arc<Dataplane>, shard: u32) {
    let idle = Duration::from_millis(app.config.drain.idle_ms);
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let pass = drain_pass(&app.db, &dataplane, shard, DrainOptions::of(&app.config.drain));
        match pass.await {
            Ok(pass) => {
                if failing {
                    tracing::info!(shard, "the drain works again");
                    failing = false;
                }
                backoff = Duration::from_millis(100);
                if pass.new_epoch {
                    app.push_wake.notify_waiters();
                }
                if pass.entries == 0 {
                    tokio::time::sleep(idle).await;
                }
            }
            Err(error) => {
                metrics::counter!("stockplane_cp_drain_errors_total", "shard" => shard.to_string()).increment(1);
                if !failing {
                    tracing::warn!(shard, error = format!("{error:#}"), "the drain failed; retrying");
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What one push pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushPass {
    /// Stock rows the shard acknowledged.
    pub upserted: u64,
    /// Adjustments the shard applied.
    pub applied: u64,
    /// Stock rows and adjustments the shard refused for good (an adjustment whose row
    /// was refused is refused with it).
    pub rejected: u64,
    /// Calls that failed (transport, busy): tried again next pass.
    pub failed: u64,
    /// Time spent waiting for the data plane's answers.
    pub dataplane: Duration,
    /// Time spent reading what is due from PostgreSQL.
    pub read: Duration,
}

impl PushPass {
    /// True if the pass found nothing to do.
    pub fn is_idle(&self) -> bool {
        self.upserted + self.applied + self.rejected + self.failed == 0
    }
}

/// One pass of the pusher for `shard`: the next batch in `push_seq` order (at most
/// `batch` stock rows and `batch` adjustments), the upserts first, then the adjustments,
/// each group's calls concurrent; then the shard's cursor moves past what it
/// acknowledged, stopping before the first call that failed (tried again next pass:
/// upserts are idempotent and adjustments deduplicated by id, so telling the shard
/// again what it already has changes nothing). Nothing is pushed to a shard that
/// answers as another incarnation than the one its epoch drains: it restarted empty,
/// and the drain begins its new epoch first.
pub async fn push_pass(db: &Db, dataplane: &Dataplane, shard: u32, batch: u32) -> anyhow::Result<PushPass> {
    let mut pass = PushPass::default();
    let reading = Instant::now();
    let due = db.push_batch(shard, batch).await?;
    pass.read = reading.elapsed();
    if due.is_empty() {
        if due.upto > due.cursor {
            // Values taken by writes that were rolled back: nothing to tell.
            db.push_advance(shard, due.cursor, due.upto).await?;
        }
        return Ok(pass);
    }
    if let Ok(JournalRead::Entries { incarnation, .. }) = dataplane.journal(shard, 1, 1).await {
        if db.incarnation_note(shard, due.epoch, incarnation).await? != Some(incarnation) {
            tracing::info!(shard, incarnation, "the shard answers as a new incarnation; pushing after its new epoch");
            pass.failed += 1;
            return Ok(pass);
        }
    }
    // The first place in the order where the shard did not acknowledge: the cursor
    // stops before it.
    let mut stop = i64::MAX;
    let mut refused_rows = std::collections::HashSet::new();
    let started = Instant::now();
    let upserts = due
        .rows
        .iter()
        .map(|row| Op::UpsertSku { sku: row.sku, location: row.location, backorder_limit: row.backorder_limit })
        .collect();
    for (row, answer) in due.rows.iter().zip(dataplane.client().call_many(upserts).await) {
        match answer {
            Ok(outcome) if outcome.status == Status::Ok => pass.upserted += 1,
            // Refused for good (the row is out of the shard's bounds): telling it again
            // would not help, and holding the cursor back would stop every row behind it.
            Ok(outcome) if !outcome.status.is_retryable() => {
                tracing::error!(shard, sku = row.sku, location = row.location, status = ?outcome.status, "the shard refuses a stock row");
                metrics::counter!("stockplane_cp_upserts_refused_total", "shard" => shard.to_string()).increment(1);
                refused_rows.insert((row.sku, row.location));
                pass.rejected += 1;
            }
            answer => {
                tracing::debug!(sku = row.sku, location = row.location, ?answer, "an upsert was not acknowledged");
                pass.failed += 1;
                stop = stop.min(row.seq);
            }
        }
    }
    let (mut rejected, mut unknown) = (Vec::new(), Vec::<PushAdjustment>::new());
    let mut pushes: Vec<PushAdjustment> = due.adjustments.iter().copied().filter(|a| a.seq < stop).collect();
    pushes.retain(|a| {
        let refused = refused_rows.contains(&(a.sku, a.location));
        if refused {
            rejected.push((a.id, "StockRowRefused".to_string()));
        }
        !refused
    });
    let adjusts = pushes
        .iter()
        .map(|a| Op::Adjust { adjustment: a.id, sku: a.sku, location: a.location, delta: a.delta })
        .collect();
    for (push, answer) in pushes.iter().zip(dataplane.client().call_many(adjusts).await) {
        match answer.map(|outcome| outcome.status) {
            Ok(Status::Ok) => pass.applied += 1,
            // The shard does not know the row: it lost it, so it must be told again.
            Ok(Status::UnknownSku) => unknown.push(*push),
            Ok(status) if !status.is_retryable() => rejected.push((push.id, format!("{status:?}"))),
            Ok(_) | Err(_) => {
                pass.failed += 1;
                stop = stop.min(push.seq);
            }
        }
    }
    pass.dataplane += started.elapsed();
    if !unknown.is_empty() {
        tracing::warn!(shard, rows = unknown.len(), "the shard does not know rows it acknowledged; telling it again");
        let rows: Vec<(u64, u32)> = unknown.iter().map(|a| (a.sku, a.location)).collect();
        let ids: Vec<u128> = unknown.iter().map(|a| a.id).collect();
        db.push_again(&rows, &ids).await?;
        pass.failed += unknown.len() as u64;
    }
    pass.rejected += rejected.len() as u64;
    db.pushes_rejected(&rejected).await?;
    let to = if stop == i64::MAX { due.upto } else { stop - 1 };
    if to > due.cursor && !db.push_advance(shard, due.cursor, to).await? {
        tracing::warn!(shard, "the push cursor moved under us (another pusher)");
    }
    Ok(pass)
}

/// Pushes to one shard for ever: a pass, then a wait for a wake-up or the idle period.
async fn pusher(app: App, dataplane: Arc<Dataplane>, shard: u32) {
    let idle = Duration::from_millis(app.config.push.idle_ms);
    let mut failing = false;
    loop {
        let wake = app.push_wake.notified();
        match push_pass(&app.db, &dataplane, shard, app.config.push.batch).await {
            Ok(pass) => {
                failing = false;
                metrics::counter!("stockplane_cp_upserts_total", "shard" => shard.to_string()).increment(pass.upserted);
                metrics::counter!("stockplane_cp_adjustments_applied_total", "shard" => shard.to_string())
                    .increment(pass.applied);
                metrics::counter!("stockplane_cp_adjustments_rejected_total", "shard" => shard.to_string())
                    .increment(pass.rejected);
                if pass.upserted + pass.applied + pass.rejected > 0 {
                    continue;
                }
                let wait = if pass.failed > 0 { Duration::from_secs(1) } else { idle };
                let _ = tokio::time::timeout(wait, wake).await;
            }
            Err(error) => {
                metrics::counter!("stockplane_cp_push_errors_total", "shard" => shard.to_string()).increment(1);
                if !failing {
                    tracing::warn!(shard, error = format!("{error:#}"), "the pusher failed; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
