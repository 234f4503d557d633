//! Snapshots from a fork (`wal.snapshot_source = "fork"`): when a snapshot is due, the
//! serving core forks the process, and the copy archives the shard's state as it was at
//! that instant and writes it to a temporary file; the core's snapshot thread waits for
//! the copy to exit and for the log to be durable through the snapshot's position, then
//! renames the file into place and deletes the log it covers (`wal::publish_snapshot`).
//!
//! The other two sources replay the log to rebuild the state the serving core already
//! has (`crate::replica`): a snapshot from the files reads back and replays every closed
//! segment, the replica replays every batch as it comes. Either way the snapshot thread's
//! work grows with the log, not with the state: at 850 k requests/s on the 2-vCPU
//! benchmark guest, a fifth to a quarter of the CPU beside the shard's. A fork shares
//! the process's memory copy-on-write, so its work is the state's size, once per
//! snapshot. The serving core pays the `fork` itself (copying the page tables: a pause
//! that grows with the process's memory, `stockplane_snapshot_fork_seconds`), and a page
//! copy for each page it writes while the copy runs. The copy writes nothing the log
//! does not already hold, and a snapshot never covers what is not durable: the file is
//! renamed into place only once the writer's durable position reaches it.
//!
//! The copy runs at `SCHED_IDLE` and the idle I/O class on the background CPUs, dies
//! with the core's thread (`PR_SET_PDEATHSIG`: a crash or a stop leaves no writer behind,
//! and a restart removes its temporary file), and touches nothing of the server's but the
//! shard's state: no lock, no log line (an error goes to standard error with one
//! `write`), no I/O ring. A snapshot that fails leaves the log whole; the next due one is
//! tried after another `every` closed segments. After a WAL failure the durable position
//! stops, so a copy's file waits unpublished until the server stops (a restart removes
//! it).
//!
//! Not the default: on the 2-vCPU benchmark guest it took the snapshot thread's CPU from
//! 12 to 25% to 0.2%, but did not lower the half-load tail (`docs/wal.md`, "Why not the
//! fork, then").

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::bail;
use stockplane_engine::Shard;
use tracing::warn;

use crate::replica::{SnapshotMetrics, Source};
use crate::wal::{self, DiskShare};

/// How often the snapshot thread looks at a running copy, and at the durable position,
/// and at the stop flag between snapshots.
const POLL: Duration = Duration::from_millis(2);
const STOP_POLL: Duration = Duration::from_millis(50);

/// A copy forked to write a snapshot.
struct Forked {
    pid: libc::pid_t,
    /// The snapshot's position: the shard's last record when it forked.
    position: u64,
    /// The open segment when it forked (every segment before it is closed).
    open: u64,
    forked: Instant,
}

/// The serving core's end: decides when a snapshot is due, forks, and tells the writer's
/// durable position.
pub struct ForkSnapshots {
    dir: PathBuf,
    shard: u32,
    every: u64,
    /// Closed segments when the last snapshot was forked.
    closed_at_last: Cell<u64>,
    /// Where the copy runs.
    cpus: libc::cpu_set_t,
    /// The share of the disk's time the copy's writes may take.
    share: DiskShare,
    /// A copy runs or waits for its publication: no second fork meanwhile.
    busy: Arc<AtomicBool>,
    durable: Arc<AtomicU64>,
    sender: mpsc::Sender<Forked>,
    fork_seconds: metrics::Histogram,
    failures: metrics::Counter,
}

impl ForkSnapshots {
    /// Every record through `position` is durable.
    pub fn durable(&self, position: u64) {
        self.durable.store(position, Ordering::Release);
    }

    /// Segments before `open` are closed and `shard` is the serving state: when `every`
    /// more were closed since the last snapshot and none is under way, forks the copy that
    /// writes the next one. Returns whether it forked.
    pub fn closed(&self, open: u64, shard: &Shard) -> bool {
        let closed = open.saturating_sub(1);
        if closed < self.closed_at_last.get() + self.every || self.busy.load(Ordering::Acquire) {
            return false;
        }
        let position = shard.wal_head();
        let temp = wal::snapshot_temp_path(&self.dir, position);
        let started = Instant::now();
        match fork_writer(shard, &temp, &self.cpus, self.share) {
            Ok(pid) => {
                self.fork_seconds.record(started.elapsed().as_secs_f64());
                self.busy.store(true, Ordering::Release);
                self.closed_at_last.set(closed);
                let _ = self.sender.send(Forked { pid, position, open, forked: started });
                true
            }
            Err(error) => {
                self.failures.increment(1);
                warn!(shard = self.shard, %error, "could not fork to write a snapshot; the log is kept whole");
                false
            }
        }
    }
}

/// The core's end of fork snapshots for the shard logged in `dir`, and the snapshot
/// thread's body (run it on a thread of its own; it returns when the core's end is
/// dropped or `stop` is set, after killing a copy still running). A snapshot is due
/// whenever `every` more segments were closed than `closed_at_last`; the copy runs on
/// `cpus` and writes in `share` of the disk's time.
pub fn channel(
    dir: PathBuf,
    shard: u32,
    every: u64,
    closed_at_last: u64,
    cpus: libc::cpu_set_t,
    share: DiskShare,
    stop: Arc<AtomicBool>,
) -> (ForkSnapshots, impl FnOnce() + Send + 'static) {
    let (sender, receiver) = mpsc::channel::<Forked>();
    let busy = Arc::new(AtomicBool::new(false));
    let durable = Arc::new(AtomicU64::new(0));
    let labels = [("shard", shard.to_string())];
    let snapshots = ForkSnapshots {
        dir: dir.clone(),
        shard,
        every: every.max(1),
        closed_at_last: Cell::new(closed_at_last),
        cpus,
        share,
        busy: busy.clone(),
        durable: durable.clone(),
        sender,
        fork_seconds: metrics::histogram!("stockplane_snapshot_fork_seconds", &labels),
        failures: metrics::counter!("stockplane_snapshot_failures_total", &labels),
    };
    let body = move || {
        let metrics = SnapshotMetrics::new(shard);
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let forked = match receiver.recv_timeout(STOP_POLL) {
                Ok(forked) => forked,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let outcome = finish(&dir, &forked, &durable, &stop);
            busy.store(false, Ordering::Release);
            match outcome {
                Ok(done) => metrics.taken(Source::Fork, forked.forked, &done),
                Err(_) if stop.load(Ordering::Acquire) => break,
                Err(error) => metrics.failed(&error),
            }
        }
    };
    (snapshots, body)
}

/// Writes `shard`'s state as a snapshot file to `path` from a forked copy of the process,
/// as a serving core does, and waits for the copy: returns how long the fork paused the
/// caller and how long the copy took from the fork to its exit (for benchmarks; the copy
/// runs on the caller's CPUs, at `SCHED_IDLE` and the idle I/O class).
pub fn write_by_fork(shard: &Shard, path: &Path) -> anyhow::Result<(Duration, Duration)> {
    let cpus = crate::server::thread_cpus()?;
    let started = Instant::now();
    let pid = fork_writer(shard, path, &cpus, DiskShare::ALL)?;
    let paused = started.elapsed();
    wait_for(pid, &AtomicBool::new(false))?;
    Ok((paused, started.elapsed()))
}

/// Waits for the copy to exit, then publishes its snapshot once the log is durable
/// through its position. On a stop, kills the copy; on any failure, removes its file.
fn finish(dir: &Path, forked: &Forked, durable: &AtomicU64, stop: &AtomicBool) -> anyhow::Result<wal::SnapshotDone> {
    if let Err(error) = wait_for(forked.pid, stop) {
        let _ = std::fs::remove_file(wal::snapshot_temp_path(dir, forked.position));
        return Err(error);
    }
    publish_when_durable(dir, forked, durable, stop)
}

/// Publishes the snapshot the copy wrote once `durable` reaches its position (never
/// before: a snapshot must not hold what a crash could take from the log). On a stop or
/// a failure, removes its file.
fn publish_when_durable(
    dir: &Path,
    forked: &Forked,
    durable: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<wal::SnapshotDone> {
    let outcome = (|| {
        while durable.load(Ordering::Acquire) < forked.position {
            if stop.load(Ordering::Acquire) {
                bail!("stopped: the server is stopping");
            }
            std::thread::sleep(POLL);
        }
        wal::publish_snapshot(dir, forked.position, forked.open, stop)
    })();
    if outcome.is_err() {
        let _ = std::fs::remove_file(wal::snapshot_temp_path(dir, forked.position));
    }
    outcome
}

/// Waits for child `pid` (killed when `stop` is set); an error unless it exited with 0.
fn wait_for(pid: libc::pid_t, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid writes the child's status into `status` and nothing else.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => {}
            -1 => bail!("wait for the snapshot copy (pid {pid}): {}", std::io::Error::last_os_error()),
            _ if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 => return Ok(()),
            _ => bail!("the copy forked to write a snapshot (pid {pid}) failed: {}", describe(status)),
        }
        if stop.load(Ordering::Acquire) {
            // SAFETY: kill and waitpid act on our own child, which has not been waited for.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            bail!("stopped: the server is stopping");
        }
        std::thread::sleep(POLL);
    }
}

/// A wait status in words.
fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status}")
    }
}

/// Forks a copy of the process that writes `shard`'s state as a snapshot to `temp`
/// (synced) and exits: 0 when written, 1 when the write failed (the error on standard
/// error), 2 when its parent was already gone, 3 on a panic.
fn fork_writer(shard: &Shard, temp: &Path, cpus: &libc::cpu_set_t, share: DiskShare) -> std::io::Result<libc::pid_t> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child runs only `child`, which touches the copy of `shard` and files
    // and never returns into the parent's code (it ends in `_exit`).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            let code =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child(shard, temp, parent, cpus, share)))
                    .unwrap_or(3);
            // SAFETY: _exit ends this process without running the parent's exit handlers
            // or destructors on copies of state that belongs to the parent.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(pid),
    }
}

/// The forked copy's work: see [`fork_writer`].
fn child(shard: &Shard, temp: &Path, parent: libc::pid_t, cpus: &libc::cpu_set_t, share: DiskShare) -> libc::c_int {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid only read their arguments. The signal
    // comes when the thread that forked (the serving core) ends; a parent already gone
    // before the prctl is caught by the getppid check.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent {
            return 2;
        }
    }
    // The descriptors the copy inherited are the server's (its sockets, its admin
    // listener, its log and rings): held here, a stopped server's ports stay taken and
    // its sockets open for as long as the copy runs. It needs none of them: close all
    // but the standard ones. (Each close only drops this process's reference; kernels
    // before 5.9 lack the call, and the copy then goes on holding them.)
    // SAFETY: close_range takes plain integers and closes this process's descriptors
    // only.
    unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, 0 as libc::c_uint) };
    // Off the serving core's CPU, behind everything else (failures only slow the copy).
    let _ = crate::server::lower_to_idle();
    let _ = crate::server::move_to_cpus(cpus);
    // SAFETY: this process is the fork's copy and never returns to the code that owns
    // `shard`: the bitwise copy read here is the only one used again in this process, and
    // it is consumed once.
    let shard = unsafe { std::ptr::read(shard) };
    let bytes = shard.into_snapshot();
    match wal::write_synced(temp, &bytes, share) {
        Ok(()) => 0,
        Err(error) => {
            let line = format!("snapshot copy: could not write {}: {error:#}\n", temp.display());
            // SAFETY: write reads `line`'s bytes; standard error's lock is not taken (another
            // thread may have held it when the process forked).
            unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;
    use crate::wal::tests::{config, laid_out, laid_out_with_twin, names, segment_records, GO, NOW, SEGMENT};

    fn cpus() -> libc::cpu_set_t {
        crate::server::thread_cpus().unwrap()
    }

    /// The shard's state through the end of segment `sequence` of the log in `dir`.
    fn state_after(dir: &Path, sequence: u64) -> Shard {
        let until = wal::last_position(&segment_records(dir, sequence)).unwrap();
        wal::state_through(dir, &config(), NOW, SEGMENT, until, DiskShare::ALL, &GO).unwrap()
    }

    /// Copies of the process write, segment for segment and at half the disk's time, the
    /// same snapshot files (byte for byte) as snapshots built from the files at the whole
    /// disk's, and the same segments are deleted; one is
    /// due every `every` closed segments, and the log recovers to the state that wrote it.
    #[test]
    fn forked_copies_write_the_snapshots_the_files_would() {
        let (data, dir, last, hash, twin) = laid_out_with_twin("fork");
        assert!(last >= 6, "only {last} segments");
        let stop = Arc::new(AtomicBool::new(false));
        for open in [3, 5] {
            let share = DiskShare::percent(50).unwrap();
            let (forks, body) = channel(dir.clone(), 0, 2, open - 3, cpus(), share, stop.clone());
            let thread = std::thread::spawn(body);
            let shard = state_after(&dir, open - 1);
            forks.durable(shard.wal_head());
            assert!(!forks.closed(open - 1, &shard), "due after one closed segment");
            assert!(forks.closed(open, &shard), "not due after two closed segments");
            // The thread publishes what is under way, then sees the core's end gone.
            drop(forks);
            thread.join().unwrap();
            let done = wal::take_snapshot(&twin, &config(), NOW, SEGMENT, open, DiskShare::ALL, &GO).unwrap();
            let (twin_path, at) = done.written.expect("a new snapshot");
            assert_eq!(at, shard.wal_head());
            let path = dir.join(twin_path.file_name().unwrap());
            assert!(fs::read(&path).unwrap() == fs::read(&twin_path).unwrap(), "snapshot {at:#x} differs");
            assert_eq!(names(&dir), names(&twin));
        }
        assert!(!names(&dir).iter().any(|n| n == "wal-0000000000000001.seg"), "no segment let go: {:?}", names(&dir));
        let (recovered, _) = wal::recover(&data, &config(), NOW, SEGMENT, false).unwrap();
        assert_eq!(recovered.state_hash(), hash);
        fs::remove_dir_all(&data).unwrap();
        fs::remove_dir_all(&twin).unwrap();
    }

    /// A snapshot whose position is not yet durable is not published: it waits, and a
    /// stop removes its file. Once durable, it is published.
    #[test]
    fn a_snapshot_is_published_only_once_its_position_is_durable() {
        let (data, dir, _, _) = laid_out("fork-durable");
        let shard = state_after(&dir, 2);
        let position = shard.wal_head();
        let temp = wal::snapshot_temp_path(&dir, position);
        for durable_at in [position - 1, position] {
            let pid = fork_writer(&shard, &temp, &cpus(), DiskShare::ALL).unwrap();
            // An error unless the copy exited with 0.
            wait_for(pid, &GO).unwrap();
            assert!(temp.exists());
            let forked = Forked { pid, position, open: 3, forked: Instant::now() };
            let durable = AtomicU64::new(durable_at);
            // Not durable: with the stop already set, the wait gives up at once.
            let stop = AtomicBool::new(durable_at < position);
            let outcome = publish_when_durable(&dir, &forked, &durable, &stop);
            let snapshots: Vec<_> = names(&dir).into_iter().filter(|n| n.ends_with(".snap")).collect();
            if durable_at < position {
                assert!(outcome.is_err());
                assert!(snapshots.is_empty(), "published before durable: {snapshots:?}");
                assert!(!temp.exists(), "the file of a stopped snapshot is left");
            } else {
                assert_eq!(outcome.unwrap().written.unwrap().1, position);
                assert_eq!(snapshots.len(), 1);
            }
        }
        fs::remove_dir_all(&data).unwrap();
    }

    /// A copy holds none of the server's descriptors: with a listening socket and the
    /// FIFO's reading end open in the server, the copy's only descriptors beside 0, 1 and
    /// 2 are its snapshot file's, open for writing.
    /// (The file is a FIFO with a one-page buffer, so the copy stays blocked writing it,
    /// with its descriptors to be read, until it is killed.)
    #[test]
    fn a_copy_holds_none_of_the_servers_descriptors() {
        let (data, dir, _, _) = laid_out("fork-descriptors");
        let shard = state_after(&dir, 2);
        let bytes = state_after(&dir, 2).into_snapshot().len();
        let fifo = dir.join("snapshot.fifo");
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "{}", std::io::Error::last_os_error());
        let reader = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        // SAFETY: F_SETPIPE_SZ takes an integer; the kernel rounds it up to a page.
        let pipe_bytes = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&reader), libc::F_SETPIPE_SZ, 4096) };
        assert!(pipe_bytes > 0 && (pipe_bytes as usize) < bytes, "{pipe_bytes}-byte pipe, {bytes}-byte snapshot");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server_socket =
            fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&listener))).unwrap();
        let pid = fork_writer(&shard, &fifo, &cpus(), DiskShare::ALL).unwrap();
        // The copy's descriptors: number, what it names, and whether it is open for writing
        // (`/proc/<pid>/fdinfo`: its flags in octal).
        let descriptors = || -> Vec<(String, PathBuf, bool)> {
            fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .filter_map(|entry| {
                    let entry = entry.ok()?;
                    let fd = entry.file_name().to_string_lossy().into_owned();
                    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
                    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
                    let writing = i32::from_str_radix(flags, 8).ok()? & libc::O_ACCMODE == libc::O_WRONLY;
                    Some((fd, fs::read_link(entry.path()).ok()?, writing))
                })
                .collect()
        };
        // Until the copy has opened its file for writing (before, it may still hold this
        // process's reading end, inherited); from then on its descriptors stay as they are
        // (it blocks on the full pipe), so a listing begun after that one shows them all.
        let writes_fifo = |held: &[(String, PathBuf, bool)]| held.iter().any(|(_, target, w)| *w && *target == fifo);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !writes_fifo(&descriptors()) {
            assert!(Instant::now() < deadline, "the copy did not open its file: {:?}", descriptors());
            std::thread::yield_now();
        }
        let held = descriptors();
        assert!(writes_fifo(&held), "{held:?}");
        // SAFETY: kill and waitpid act on our own child, which has not been waited for.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert!(!held.iter().any(|(_, target, _)| *target == server_socket), "the copy holds the listener: {held:?}");
        let others: Vec<_> = held
            .iter()
            .filter(|(fd, target, writing)| !(["0", "1", "2"].contains(&fd.as_str()) || *writing && *target == fifo))
            .collect();
        assert!(others.is_empty(), "the copy holds the server's descriptors: {others:?}");
        drop((reader, listener));
        fs::remove_dir_all(&data).unwrap();
    }

    /// A copy that cannot write its file exits with 1, and the failure is told.
    #[test]
    fn a_copy_that_cannot_write_fails_and_publishes_nothing() {
        let (data, dir, _, _) = laid_out("fork-fails");
        let shard = state_after(&dir, 2);
        let missing = dir.join("no-such-dir");
        let temp = wal::snapshot_temp_path(&missing, shard.wal_head());
        let pid = fork_writer(&shard, &temp, &cpus(), DiskShare::ALL).unwrap();
        let forked = Forked { pid, position: shard.wal_head(), open: 3, forked: Instant::now() };
        let error = finish(&missing, &forked, &AtomicU64::new(u64::MAX), &GO).unwrap_err();
        assert!(format!("{error:#}").contains("exit status 1"), "{error:#}");
        assert!(!names(&dir).iter().any(|n| n.ends_with(".snap")));
        fs::remove_dir_all(&data).unwrap();
    }
}
