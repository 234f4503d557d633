//! Starting and stopping the data plane: one pinned glommio executor per core, the mesh
//! between them, and the admin endpoint.
//!
//! Each executor runs four kinds of task around its `Core`: one waits for datagrams, one
//! per peer core waits for mesh messages, one fires timers (QUIC's and the shard's expiry)
//! and watches for the stop signal, and one publishes metrics every second. Each task
//! borrows the core only between awaits, so they never contend.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::{ExecutorJoinHandle, GlommioError, LocalExecutorBuilder, Placement, ResourceType};
use stockplane_engine::{Shard, ShardId};
use tracing::{error, info, warn};

use crate::admin::{Admin, Health};
use crate::config::{Config, SnapshotSource};
use crate::core::{Core, MeshMessage};
use crate::fork;
use crate::metrics::CoreGauges;
use crate::replica::{self, Replica};
use crate::udp::{bind_reuseport, Udp};
use crate::wal::{self, Durability, RoundSpacing, WalStart, WalWriter};

/// The timer `reactor_turn` waits for.
const REACTOR_TURN: Duration = Duration::from_micros(1);
/// The longest a core sleeps without looking at its timers and the stop signal.
const TICK_MAX: Duration = Duration::from_millis(1);
/// How often each core publishes its metrics.
const METRICS_EVERY: Duration = Duration::from_secs(1);
/// A WAL batch that takes at least this long from being taken to durable is logged (the
/// disk stalled, or the core did).
const WAL_BATCH_SLOW: Duration = Duration::from_millis(20);

/// A running data plane.
pub struct Server {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
    cores: Vec<ExecutorJoinHandle<anyhow::Result<u64>>>,
    recovered_state_hashes: Vec<u64>,
    _admin: Admin,
}

impl Server {
    /// Starts every core and the admin endpoint; returns once every core serves.
    pub fn start(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
        remember_process_cpus();
        let cores = config.core_count();
        let crypto = crate::tls::server_crypto(&config.tls.cert, &config.tls.key, &config.tls.client_ca)
            .context("load the TLS certificates")?;
        let server_config = Arc::new(quic_config(&config, crypto)?);
        check_shard_count(&config.data_dir, cores)?;
        let mut config = config;
        config.shard.incarnation = data_dir_incarnation(&config.data_dir)?;
        // Recovery before any executor starts: a shard that cannot start stops the server
        // here, with no core left waiting for it in the mesh.
        let recovered = recover_all(&config, cores)?;
        let recovered_state_hashes = recovered.iter().map(|(shard, _)| shard.state_hash()).collect();
        let sockets = bind_reuseport(config.listen, cores, config.quic.socket_buffer_bytes)?;
        let addr = sockets[0].local_addr()?;
        let health = Arc::new(Health::new());
        let handle = crate::admin::install_recorder()?;
        let admin = Admin::start(config.admin_listen, handle, health.clone()).context("start the admin endpoint")?;
        let admin_addr = admin.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let mesh = MeshBuilder::<MeshMessage, Full>::full(cores, config.mesh.channel_messages_max);
        let members = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::with_capacity(cores);
        // The CPU each shard is pinned to: core k on `cpu_first + k`, unbound past the last CPU.
        let cpus = available_cpus();
        let pinned: Vec<Option<usize>> =
            (0..cores).map(|shard| Some(config.cpu_first + shard).filter(|&cpu| cpu < cpus)).collect();
        let background =
            background_cpus(PROCESS_CPUS.get().expect("remembered above"), pinned.iter().flatten().copied());
        for (shard, (socket, recovered)) in sockets.into_iter().zip(recovered).enumerate() {
            let shard = shard as ShardId;
            let context = CoreContext {
                shard,
                shards: cores as u32,
                config: config.clone(),
                server_config: server_config.clone(),
                mesh: mesh.clone(),
                failed: failed.clone(),
                members: members.clone(),
                stop: stop.clone(),
                ready: ready.clone(),
                health: health.clone(),
                background,
            };
            let placement = pinned[shard as usize].map_or(Placement::Unbound, Placement::Fixed);
            let builder = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{shard}"))
                .io_memory(config.io_memory_bytes)
                .spin_before_park(Duration::from_micros(config.spin_before_park_us));
            let thread = builder
                .spawn(move || async move {
                    let failed = context.failed.clone();
                    let result = run_core(context, socket, recovered).await;
                    if let Err(error) = &result {
                        error!(shard, error = format!("{error:#}"), "core stopped with an error");
                        failed.fetch_add(1, Ordering::AcqRel);
                    }
                    result
                })
                .map_err(|e| anyhow!("start the executor of shard {shard}: {e}"))?;
            threads.push(thread);
        }
        // Wait for every core to serve (or for one to fail).
        while ready.load(Ordering::Acquire) < cores {
            if failed.load(Ordering::Acquire) > 0 {
                stop.store(true, Ordering::Release);
                let mut first_error = None;
                for thread in threads {
                    if let Ok(Err(error)) = thread.join() {
                        first_error.get_or_insert(error);
                    }
                }
                return Err(first_error.unwrap_or_else(|| anyhow!("a core stopped while starting")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        health.set_ready();
        info!(%addr, %admin_addr, cores, "data plane serving");
        Ok(Server { addr, admin_addr, stop, health, cores: threads, recovered_state_hashes, _admin: admin })
    }

    /// The UDP address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP address of metrics and health.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// A flag that stops the server when set (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Each shard's state hash just after recovery (before holds that expired while the
    /// server was down were expired).
    pub fn recovered_state_hashes(&self) -> &[u64] {
        &self.recovered_state_hashes
    }

    /// Waits until the server stops (after the stop flag is set); returns each shard's
    /// final state hash, or the first core's error.
    pub fn wait(mut self) -> anyhow::Result<Vec<u64>> {
        let mut first_error = None;
        let mut hashes = Vec::new();
        for thread in self.cores.drain(..) {
            match thread.join().map_err(|_| anyhow!("a core panicked"))? {
                Ok(hash) => hashes.push(hash),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        self.health.set_not_ready("stopped");
        first_error.map_or(Ok(hashes), Err)
    }

    /// Closes every connection (with `SHUTTING_DOWN`), writes what the log still holds,
    /// and stops every core; returns each shard's final state hash.
    pub fn stop(self) -> anyhow::Result<Vec<u64>> {
        self.health.set_not_ready("shutting down");
        self.stop.store(true, Ordering::Release);
        self.wait()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for thread in self.cores.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A data directory belongs to one shard count: SKUs are spread over shards by it, so a
/// log written with one count cannot be read with another.
fn check_shard_count(data_dir: &std::path::Path, cores: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let path = data_dir.join("shards");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let written: usize = text.trim().parse().with_context(|| format!("read {}", path.display()))?;
            if written != cores {
                anyhow::bail!(
                    "{} was written by {written} shards; this server runs {cores} (use --cores {written}, \
                     or another --data-dir)",
                    data_dir.display()
                );
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, format!("{cores}\n")).with_context(|| format!("write {}", path.display()))
        }
        Err(error) => Err(error).with_context(|| format!("read {}", path.display())),
    }
}

/// The incarnation of a data directory: drawn when the directory is first used and kept
/// in it (`incarnation`), so it changes exactly when the shards start without their data.
/// Drawn from the clock and the process id: it must differ between lives of one
/// directory, not be secret.
fn data_dir_incarnation(data_dir: &std::path::Path) -> anyhow::Result<u64> {
    let path = data_dir.join("incarnation");
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().with_context(|| format!("read {}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
            // splitmix64's finaliser, so that close clocks give far-apart values.
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let incarnation = (x ^ (x >> 31)).max(1);
            let tmp = data_dir.join("incarnation.tmp");
            std::fs::write(&tmp, format!("{incarnation}\n")).with_context(|| format!("write {}", tmp.display()))?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("sync {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
            std::fs::File::open(data_dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("sync {}", data_dir.display()))?;
            Ok(incarnation)
        }
        Err(error) => Err(error).with_context(|| format!("read {}", path.display())),
    }
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The QUIC transport settings of every connection.
fn quic_config(config: &Config, crypto: rustls::ServerConfig) -> anyhow::Result<quinn_proto::ServerConfig> {
    let mut server_config = crate::tls::quic_server_config(crypto)?;
    let q = &config.quic;
    let mut transport = quinn_proto::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(config.limits.streams_per_connection_max.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(quinn_proto::VarInt::from_u32(q.idle_timeout_ms).into()))
        .stream_receive_window(q.stream_receive_window_bytes.into())
        .receive_window(q.connection_receive_window_bytes.into())
        .send_window(q.send_window_bytes)
        .datagram_receive_buffer_size(None);
    // Ask clients to acknowledge within a millisecond: with durable replies a frame's
    // answer can leave milliseconds after the frame, and a client's acknowledgements then
    // wait out QUIC's default 25 ms delay instead of riding on the reply.
    let mut acks = quinn_proto::AckFrequencyConfig::default();
    acks.max_ack_delay(Some(Duration::from_millis(1)));
    transport.ack_frequency_config(Some(acks));
    let mut cubic = quinn_proto::congestion::CubicConfig::default();
    cubic.initial_window(q.initial_window_bytes);
    transport.congestion_controller_factory(Arc::new(cubic));
    let mut mtu = quinn_proto::MtuDiscoveryConfig::default();
    mtu.upper_bound(q.udp_payload_bytes_max);
    transport.mtu_discovery_config(Some(mtu));
    server_config.transport_config(Arc::new(transport));
    server_config.migration(false);
    Ok(server_config)
}

/// What one executor needs to run its core.
struct CoreContext {
    shard: ShardId,
    shards: u32,
    config: Config,
    server_config: Arc<quinn_proto::ServerConfig>,
    mesh: MeshBuilder<MeshMessage, Full>,
    failed: Arc<AtomicUsize>,
    members: Arc<Mutex<Vec<(usize, ShardId)>>>,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicUsize>,
    health: Arc<Health>,
    /// Where the core's background threads run ([`background_cpus`]).
    background: libc::cpu_set_t,
}

/// The mesh as a core sees it: senders, and shard number to mesh peer index.
struct MeshOut {
    senders: Senders<MeshMessage>,
    peer_of: Vec<usize>,
    queued: RefCell<usize>,
}

impl MeshOut {
    /// Sends each message to its core; a full channel parks the message in a task that
    /// waits for room (the engine tolerates reordering, so nothing waits behind it).
    fn send(self: &Rc<Self>, messages: Vec<(ShardId, MeshMessage)>) {
        for (shard, message) in messages {
            let peer = self.peer_of[shard as usize];
            if let Err(error) = self.senders.try_send_to(peer, message) {
                let message = match error {
                    GlommioError::WouldBlock(ResourceType::Channel(message)) => message,
                    // The peer core is gone (stopping): nothing more to tell it.
                    _ => continue,
                };
                *self.queued.borrow_mut() += 1;
                let mesh = self.clone();
                glommio::spawn_local(async move {
                    let _ = mesh.senders.send_to(peer, message).await;
                    *mesh.queued.borrow_mut() -= 1;
                })
                .detach();
            }
        }
    }
}

/// Which of a WAL write and the previous batch's sync ended first.
enum First {
    Synced(anyhow::Result<()>),
    Written(anyhow::Result<()>),
}

/// A batch of records the WAL writer took: its last position, size, when, and (once
/// written) its records, when they go to the snapshot replica once they are durable.
struct Batch {
    position: u64,
    bytes: usize,
    taken: Instant,
    records: Option<Vec<u8>>,
}

/// A WAL batch and the fdatasync that makes it durable, running.
type Syncing = (Batch, glommio::Task<anyhow::Result<()>>);

/// Where a core's snapshots come from, as the WAL writer sees it: it hands over durable
/// batches and closed segments, and the source takes what it needs of them.
enum Snapshots {
    /// Snapshots are off.
    Off,
    /// The snapshot thread's replica (which follows the log or, from the files, not).
    Replica(replica::ReplicaFeed),
    /// A forked copy of the process per snapshot.
    Fork(fork::ForkSnapshots),
}

impl Snapshots {
    /// A written batch's buffer: to the replica when it takes it (the second value is a
    /// buffer it is done with, for the next batch), else back for the next batch.
    fn keep(&self, bytes: Vec<u8>) -> (Option<Vec<u8>>, Vec<u8>) {
        match self {
            Snapshots::Replica(feed) if feed.accepts(bytes.len()) => (Some(bytes), feed.spare()),
            _ => (None, bytes),
        }
    }

    /// The batch ending at `position` is durable; `records` are its records when
    /// [`Snapshots::keep`] took them.
    fn durable(&self, position: u64, records: Option<Vec<u8>>) {
        match (self, records) {
            (Snapshots::Replica(feed), Some(records)) => feed.durable(records),
            (Snapshots::Fork(forks), _) => forks.durable(position),
            _ => {}
        }
    }

    /// Every segment before `open` is closed; `engine` is the serving state (call before
    /// the batch that closed them is durable).
    fn closed(&self, open: u64, engine: &Shard) {
        match self {
            Snapshots::Off => {}
            Snapshots::Replica(feed) => feed.closed(open),
            Snapshots::Fork(forks) => {
                forks.closed(open, engine);
            }
        }
    }
}

/// Waits for the running sync, if there is one, and acknowledges its batch.
async fn finish_sync(syncing: &mut Option<Syncing>, durable: &impl Fn(Batch)) -> anyhow::Result<()> {
    if let Some((batch, sync)) = syncing.take() {
        sync.await?;
        durable(batch);
    }
    Ok(())
}

/// The CPUs the process may run on, as it started (before the executors pinned their
/// threads): where background threads go.
static PROCESS_CPUS: std::sync::OnceLock<libc::cpu_set_t> = std::sync::OnceLock::new();

fn remember_process_cpus() {
    PROCESS_CPUS.get_or_init(|| {
        thread_cpus().unwrap_or_else(|error| {
            warn!(%error, "could not read the process's CPUs");
            // SAFETY: cpu_set_t is plain bits, the empty set when zeroed.
            unsafe { std::mem::zeroed() }
        })
    });
}

/// The CPUs the calling thread may run on.
pub(crate) fn thread_cpus() -> std::io::Result<libc::cpu_set_t> {
    cpus_of_thread(0)
}

/// The CPUs thread `tid` may run on (0: the calling thread).
pub(crate) fn cpus_of_thread(tid: libc::pid_t) -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain bits, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into the
    // set and reads nothing else.
    if unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(set)
}

/// How many CPUs `set` names.
fn cpu_count(set: &libc::cpu_set_t) -> usize {
    // SAFETY: CPU_COUNT only reads the set's bits.
    unsafe { libc::CPU_COUNT(set) as usize }
}

/// Suspends the calling task until the executor has polled its rings and timers once.
///
/// Between rounds the datagram task must let glommio's reactor run: under load the socket
/// is never empty, so `Readiness::readable` returns at once and the task never waits; a
/// yield (`yield_if_needed`, `yield_now`) only lets the other tasks of its queue run, and
/// glommio reaps I/O completions and submits new I/O only between task queue runs, which
/// a task queue that always has work reaches only at its preemption timer (100 ms). Until
/// then the WAL writer's writes and fdatasyncs finish unseen and its next ones are not
/// submitted: group commit stalled for 20 to 80 ms several times a second at saturation.
/// (A shorter preemption timer made those rarer here but brought stalls of half a second
/// and more, ending on the next one-second timer.) A pending timer empties the task queue,
/// so the executor polls the rings, fires the timer and runs the woken tasks: the WAL
/// writer's and the timers' as well as this one. One turn after every round: turning at
/// most every 200 µs instead gained the sync server a few percent at saturation but, in
/// three 6 s runs of each, left 5 to 17 batches of 20 ms or more (up to 64 ms) against 1
/// or 2 (up to 23 ms).
async fn reactor_turn() {
    // Due as soon as possible, but in the future when the timer is first polled, which
    // is nanoseconds after its creation; if it is somehow already due, the round simply
    // goes on.
    glommio::timer::sleep(REACTOR_TURN).await;
}

/// Where background threads run: the CPUs the process started with that no shard is
/// pinned to, or all of them when the shards take every one. A shard spins when idle
/// (`spin_before_park_us`), so on its CPU even a `SCHED_IDLE` thread gets the idle
/// policy's small share, in slices of milliseconds that stall the shard (measured: 4 ms
/// of a snapshot thread on a spinning shard's CPU during a 21 ms latency spike).
fn background_cpus(process: &libc::cpu_set_t, shard_cpus: impl IntoIterator<Item = usize>) -> libc::cpu_set_t {
    let mut set = *process;
    for cpu in shard_cpus.into_iter().filter(|&cpu| cpu < libc::CPU_SETSIZE as usize) {
        // SAFETY: CPU_CLR writes one bit of the set, in range (checked above).
        unsafe { libc::CPU_CLR(cpu, &mut set) };
    }
    if cpu_count(&set) == 0 {
        *process
    } else {
        set
    }
}

/// Moves the calling thread onto `cpus` (a no-op for an empty set: the process's CPUs
/// could not be read).
pub(crate) fn move_to_cpus(cpus: &libc::cpu_set_t) -> std::io::Result<()> {
    if cpu_count(cpus) == 0 {
        return Ok(());
    }
    // SAFETY: sched_setaffinity reads the set and changes only the calling thread's CPUs
    // (pid 0).
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), cpus) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The set of `cpus`; a CPU beyond what a set holds is an `InvalidInput` error.
fn cpu_set(cpus: &[usize]) -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain bits, the empty set when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no such CPU"));
        }
        // SAFETY: CPU_SET writes one bit of the set, in range (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    Ok(set)
}

/// Pins the calling thread to `cpu` alone (the benchmarks' probes pin their threads so).
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    move_to_cpus(&cpu_set(&[cpu])?)
}

/// Runs `work` on a thread of its own at the idle scheduling policy (`SCHED_IDLE`: it
/// gets a CPU only when nothing else wants it, so a shard preempts it at once) and the idle
/// I/O class ([`lower_to_idle`]: its reads and writes wait for the log's), on
/// `cpus` ([`background_cpus`]) rather than only its shard's (a snapshot takes
/// seconds of CPU; kept on the shard's core it took that core's idle moments and caches:
/// one run at half load measured a sync p99 of 198 ms there, 57.5 ms free to move). Not
/// glommio's blocking pool, which runs on the shard's CPU.
fn spawn_idle_thread(
    name: String,
    cpus: libc::cpu_set_t,
    work: impl FnOnce() + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Err(error) = lower_to_idle() {
                warn!(%error, "could not lower a background thread to the idle policy and I/O class");
            }
            if let Err(error) = move_to_cpus(&cpus) {
                warn!(%error, "could not move a background thread off the shards' CPUs");
            }
            work();
        })
        .context("start a background thread")
}

/// Moves the calling thread behind everything else: to the idle scheduling policy
/// (`SCHED_IDLE`) and the idle I/O class ([`lower_io_to_idle`]). Both are tried; the
/// first failure is returned, naming which.
pub(crate) fn lower_to_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param` and changes only the calling thread's
    // policy (pid 0); it has no other effect on memory.
    let policy = if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        let error = std::io::Error::last_os_error();
        Err(std::io::Error::new(error.kind(), format!("SCHED_IDLE: {error}")))
    } else {
        Ok(())
    };
    let io =
        lower_io_to_idle().map_err(|error| std::io::Error::new(error.kind(), format!("the idle I/O class: {error}")));
    policy.and(io)
}

/// `ioprio_set`'s and `ioprio_get`'s target: a thread (`who` 0: the calling one).
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
/// The idle I/O class, and where a priority keeps its class (`linux/ioprio.h`).
const IOPRIO_CLASS_IDLE: libc::c_int = 3;
const IOPRIO_CLASS_SHIFT: u32 = 13;

/// Moves the calling thread's disk I/O to the idle class (`IOPRIO_CLASS_IDLE`): a disk
/// scheduler that honours classes (mq-deadline, BFQ) sends its reads and writes to the disk
/// only while no request of a higher class waits, so they do not queue ahead of the log's
/// writes. mq-deadline still sends one that has waited `prio_aging_expire` (10 s by
/// default). Cache flushes bypass the scheduler, whoever asks for them. Measured in
/// `docs/wal.md` ("The snapshot's I/O at the idle class").
fn lower_io_to_idle() -> std::io::Result<()> {
    // SAFETY: ioprio_set takes plain integers and changes only the calling thread's I/O
    // priority (who 0: this thread); it touches no memory of ours.
    let set = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_int,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Recovers every shard from its log, in parallel.
fn recover_all(config: &Config, cores: usize) -> anyhow::Result<Vec<(Shard, WalStart)>> {
    let now = crate::core::wall_clock_ms();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cores as u32)
            .map(|shard| {
                scope.spawn(move || {
                    let shard_config = config.shard_config(shard, cores as u32);
                    wal::recover(
                        &config.data_dir,
                        &shard_config,
                        now,
                        config.wal.segment_bytes,
                        config.wal.truncate_corrupt_tail,
                    )
                    .with_context(|| format!("recover shard {shard}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow!("recovery panicked"))?).collect()
    })
}

async fn run_core(context: CoreContext, socket: UdpSocket, recovered: (Shard, WalStart)) -> anyhow::Result<u64> {
    let CoreContext { shard, shards, config, server_config, mesh, members, stop, ready, health, background, .. } =
        context;
    members.lock().expect("members lock").push((glommio::executor().id(), shard));
    let (senders, mut receivers) = mesh.join().await.map_err(|e| anyhow!("join the mesh: {e}"))?;
    // Mesh peers are numbered by executor id; map shard numbers onto them.
    let mut peer_of = vec![usize::MAX; shards as usize];
    {
        let mut members = members.lock().expect("members lock").clone();
        members.sort();
        for (peer, (_, member)) in members.iter().enumerate() {
            peer_of[*member as usize] = peer;
        }
    }
    let mesh_out = Rc::new(MeshOut { senders, peer_of, queued: RefCell::new(0) });
    // The core's tasks, cancelled when it stops: a detached task left pending would keep
    // the core, and with it the socket's share of the port, alive after the stop.
    let mut tasks: Vec<glommio::task::JoinHandle<()>> = Vec::new();
    let (udp, readiness) = Udp::new(socket)?;
    // The shard as its log left it, then the writer at the log's end.
    let (engine, wal_start) = recovered;
    // Where the snapshot replica starts following: every record after it is fed to it.
    let recovered_position = engine.wal_head();
    let mut writer = WalWriter::open(&wal_start, shard, background).await?;
    let (wal_wake, wal_woken) = glommio::channels::local_channel::new_bounded(1);
    let core = Rc::new(RefCell::new(Core::new(engine, shards, &config, server_config, udp, wal_wake)?));
    // Holds that expired while the server was down expire now, once (their records are
    // the writer's first work).
    {
        let now = Instant::now();
        let mut core = core.borrow_mut();
        core.on_timer(now);
        let out = core.flush(now);
        mesh_out.send(out);
    }

    // Snapshots: after every `wal.snapshot_every_segments` closed segments, the snapshot
    // thread writes the next one, from the files or its replica of the shard's state (fed
    // each durable batch), or publishes the one a forked copy of the process wrote; the
    // log below the older of the two newest snapshots is deleted. The serving core never
    // waits for it. The thread outlives the writer task's cancellation: a stopping core
    // tells it to stop and waits for it, so that it cannot write or delete files under a
    // restart.
    let snapshot_stop = Arc::new(AtomicBool::new(false));
    let mut snapshot_thread = None;
    // As if the last snapshot had been taken `closed_after_snapshot` segments ago: the
    // `closed` below takes one at once when that is already `every` or more.
    let closed_at_last = (wal_start.sequence - 1).saturating_sub(wal_start.closed_after_snapshot);
    let every = u64::from(config.wal.snapshot_every_segments);
    let share = wal::DiskShare::percent(config.wal.snapshot_disk_percent)?;
    let snapshots = if every == 0 {
        Snapshots::Off
    } else if config.wal.snapshot_source == SnapshotSource::Fork {
        let (forks, body) = fork::channel(
            wal_start.dir.clone(),
            shard,
            every,
            closed_at_last,
            background,
            share,
            snapshot_stop.clone(),
        );
        snapshot_thread = Some(spawn_idle_thread(format!("snapshot-{shard}"), background, body)?);
        // Everything recovered is durable.
        forks.durable(recovered_position);
        Snapshots::Fork(forks)
    } else {
        let replica = Replica::new(
            wal_start.dir.clone(),
            config.shard_config(shard, shards),
            config.wal.segment_bytes,
            every,
            closed_at_last,
            config.wal.snapshot_source == SnapshotSource::Replica,
        )
        .sharing_the_disk(share);
        // The replica may fall two segments behind (while it starts, or when it gets too
        // little CPU) before the writer stops feeding it.
        let feed_max_bytes = (2 * config.wal.segment_bytes) as usize;
        let (feed, body) = replica::channel(replica, recovered_position, feed_max_bytes, snapshot_stop.clone());
        snapshot_thread = Some(spawn_idle_thread(format!("snapshot-{shard}"), background, body)?);
        Snapshots::Replica(feed)
    };
    snapshots.closed(wal_start.sequence, core.borrow().engine());

    // The time this core spent serving (datagrams in, replies out) since the WAL writer
    // last took it, for group commit to tell a busy core from one with time to spare
    // (`wal::RoundSpacing`).
    let serving = Rc::new(Cell::new(Duration::ZERO));

    // The WAL writer: group commit, pipelined. A batch is written while the previous
    // one's fdatasync runs, and gets its own fdatasync, started once its write is done; so
    // a round costs about the longer of a write and a sync rather than both.
    {
        let core = core.clone();
        let mesh_out = mesh_out.clone();
        let health = health.clone();
        let serving = serving.clone();
        let durability = config.durability()?;
        let batch_ms = match durability {
            Durability::Sync | Durability::None => None,
            Durability::Batch { ms } => Some(Duration::from_millis(u64::from(ms))),
        };
        // Only acknowledgements that wait for the disk gain from fuller rounds.
        let interval = Duration::from_micros(u64::from(config.wal.busy_round_interval_us));
        let mut spacing = (durability == Durability::Sync && !interval.is_zero()).then(|| RoundSpacing::new(interval));
        let spaced = metrics::counter!("stockplane_wal_rounds_spaced_total", "shard" => shard.to_string());
        let sync_seconds = metrics::histogram!("stockplane_wal_sync_seconds", "shard" => shard.to_string());
        let batch_bytes = metrics::histogram!("stockplane_wal_batch_bytes", "shard" => shard.to_string());
        tasks.push(
            glommio::spawn_local(async move {
                // A batch made durable: metrics, then the replies and peer messages it held.
                let durable = |batch: Batch| {
                    let started = Instant::now();
                    snapshots.durable(batch.position, batch.records);
                    let took = batch.taken.elapsed();
                    sync_seconds.record(took.as_secs_f64());
                    batch_bytes.record(batch.bytes as f64);
                    if took >= WAL_BATCH_SLOW {
                        warn!(
                            shard,
                            ms = took.as_secs_f64() * 1e3,
                            bytes = batch.bytes,
                            "a WAL batch took long to become durable; replies waited for it"
                        );
                    }
                    let now = Instant::now();
                    let out = {
                        let mut core = core.borrow_mut();
                        core.on_durable(batch.position);
                        core.flush(now)
                    };
                    mesh_out.send(out);
                    serving.set(serving.get() + started.elapsed());
                };
                let mut spare = Vec::new();
                let mut open_sequence = writer.sequence();
                // The batch whose fdatasync is running, and that sync.
                let mut syncing: Option<Syncing> = None;
                // When the last round took its batch; when the core's serving time was
                // last taken into the spacing's average.
                let mut round_started = Instant::now();
                let mut observed = Instant::now();
                loop {
                    if syncing.is_none() {
                        if wal_woken.recv().await.is_none() {
                            break;
                        }
                        if let Some(interval) = batch_ms {
                            glommio::timer::sleep(interval).await;
                        }
                    }
                    let step: anyhow::Result<()> = async {
                        if let Some(spacing) = &mut spacing {
                            let now = Instant::now();
                            spacing.observe(now - observed, serving.take());
                            observed = now;
                            let wait = spacing.wait(now - round_started);
                            if !wait.is_zero() {
                                let until = now + wait;
                                // The running sync's replies leave when it is done, not
                                // after the wait.
                                finish_sync(&mut syncing, &durable).await?;
                                spaced.increment(1);
                                glommio::timer::sleep(until.saturating_duration_since(Instant::now())).await;
                            }
                        }
                        let taken = core.borrow_mut().take_wal(std::mem::take(&mut spare));
                        let Some((bytes, position)) = taken else {
                            // Nothing new: wait for the running sync.
                            return finish_sync(&mut syncing, &durable).await;
                        };
                        let mut batch = Batch { position, bytes: bytes.len(), taken: Instant::now(), records: None };
                        round_started = batch.taken;
                        if writer.fits(&bytes) {
                            match syncing.take() {
                                None => writer.write_unsynced(&bytes).await?,
                                Some((previous, mut sync)) => {
                                    // The write and the previous sync run together; the
                                    // previous batch is acknowledged as soon as it is durable.
                                    let write = writer.write_unsynced(&bytes);
                                    futures_lite::pin!(write);
                                    let first = futures_lite::future::poll_fn(|cx| {
                                        if let Poll::Ready(synced) = Pin::new(&mut sync).poll(cx) {
                                            return Poll::Ready(First::Synced(synced));
                                        }
                                        write.as_mut().poll(cx).map(First::Written)
                                    })
                                    .await;
                                    match first {
                                        First::Synced(synced) => {
                                            synced?;
                                            durable(previous);
                                            write.await?;
                                        }
                                        First::Written(written) => {
                                            written?;
                                            sync.await?;
                                            durable(previous);
                                        }
                                    }
                                }
                            }
                            (batch.records, spare) = snapshots.keep(bytes);
                            syncing = Some((batch, glommio::spawn_local(writer.sync())));
                        } else {
                            // The batch ends this segment: finish the running sync, then
                            // write and sync segment by segment.
                            finish_sync(&mut syncing, &durable).await?;
                            writer.append(&bytes).await?;
                            if writer.sequence() != open_sequence {
                                open_sequence = writer.sequence();
                                // Before the batch: its records in the closed segments
                                // were not fed yet, those after them follow.
                                snapshots.closed(open_sequence, core.borrow().engine());
                            }
                            (batch.records, spare) = snapshots.keep(bytes);
                            durable(batch);
                        }
                        Ok(())
                    }
                    .await;
                    if let Err(error) = step {
                        let reason = format!("shard {shard}: the WAL failed: {error:#}");
                        error!(shard, error = %reason, "refusing state changes from now on");
                        health.set_not_ready(reason.clone());
                        core.borrow_mut().on_wal_failed(reason);
                        return;
                    }
                }
            })
            .detach(),
        );
    }
    let service = metrics::histogram!("stockplane_service_seconds", "shard" => shard.to_string());

    // Mesh receivers: one task per peer core.
    for (_, receiver) in receivers.streams() {
        let core = core.clone();
        let mesh_out = mesh_out.clone();
        tasks.push(
            glommio::spawn_local(async move {
                while let Some(message) = receiver.recv().await {
                    let now = Instant::now();
                    let out = {
                        let mut core = core.borrow_mut();
                        core.on_mesh(now, message);
                        core.flush(now)
                    };
                    mesh_out.send(out);
                }
            })
            .detach(),
        );
    }

    // Datagrams. A socket error ends the task and, through `socket_error`, the core.
    let socket_error: Rc<RefCell<Option<anyhow::Error>>> = Rc::new(RefCell::new(None));
    {
        let core = core.clone();
        let mesh_out = mesh_out.clone();
        let socket_error = socket_error.clone();
        tasks.push(
            glommio::spawn_local(async move {
                let result: anyhow::Result<()> = async {
                    loop {
                        if !core.borrow().datagrams_waiting() {
                            readiness.readable().await.context("wait for datagrams")?;
                        }
                        let now = Instant::now();
                        let out = {
                            let mut core = core.borrow_mut();
                            core.receive(now).context("receive datagrams")?;
                            core.flush(now)
                        };
                        mesh_out.send(out);
                        let took = now.elapsed();
                        service.record(took.as_secs_f64());
                        serving.set(serving.get() + took);
                        reactor_turn().await;
                    }
                }
                .await;
                *socket_error.borrow_mut() = result.err();
            })
            .detach(),
        );
    }

    // Metrics.
    {
        let core = core.clone();
        let mesh_out = mesh_out.clone();
        tasks.push(
            glommio::spawn_local(async move {
                loop {
                    glommio::timer::sleep(METRICS_EVERY).await;
                    let mut core = core.borrow_mut();
                    core.refresh_quic();
                    let gauges = CoreGauges {
                        live_holds: core.live_holds(),
                        connections: core.connections(),
                        mesh_queued: *mesh_out.queued.borrow(),
                        udp_send_dropped: core.udp_send_dropped(),
                        wal_unsynced_bytes: core.wal_unsynced_bytes(),
                        wal_failed: core.wal_failed(),
                    };
                    core.metrics.publish(&gauges);
                }
            })
            .detach(),
        );
    }

    ready.fetch_add(1, Ordering::AcqRel);
    info!(shard, "core serving");

    // Timers and the stop signal, on this task.
    let mut stopping_since = None;
    let stopped: anyhow::Result<u64> = loop {
        let now = Instant::now();
        let wait = core.borrow().next_deadline(now).map_or(TICK_MAX, |at| at.saturating_duration_since(now));
        glommio::timer::sleep(wait.min(TICK_MAX)).await;
        let now = Instant::now();
        let out = {
            let mut core = core.borrow_mut();
            if stop.load(Ordering::Acquire) && stopping_since.is_none() {
                core.stop(now);
                stopping_since = Some(now);
            }
            core.on_timer(now);
            core.flush(now)
        };
        mesh_out.send(out);
        if let Some(since) = stopping_since {
            // Connections get a moment to hear the close, and the log writes what it holds;
            // then the core goes.
            let core = core.borrow();
            let closed = core.drained() || now.duration_since(since) > Duration::from_millis(500);
            if closed && core.wal_idle() {
                break Ok(core.state_hash());
            }
        }
        if let Some(error) = socket_error.borrow_mut().take() {
            break Err(error);
        }
    };
    snapshot_stop.store(true, Ordering::Release);
    for task in tasks {
        task.cancel();
        task.await;
    }
    if let Some(handle) = snapshot_thread {
        let _ = handle.join();
    }
    let hash = stopped?;
    info!(shard, state_hash = format!("{hash:016x}"), "core stopped");
    Ok(hash)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A set of the given CPUs.
    pub(crate) fn cpus(list: &[usize]) -> libc::cpu_set_t {
        cpu_set(list).expect("CPUs in range")
    }

    /// The CPUs in a set, in order.
    pub(crate) fn members(set: &libc::cpu_set_t) -> Vec<usize> {
        // SAFETY: CPU_ISSET reads one bit of the set, in range (below CPU_SETSIZE).
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) }).collect()
    }

    #[test]
    fn background_threads_go_where_no_shard_is_pinned() {
        assert_eq!(members(&background_cpus(&cpus(&[0, 1]), [1])), [0]);
        assert_eq!(members(&background_cpus(&cpus(&[0, 1, 2, 3]), [0, 1])), [2, 3]);
        // Shards on every CPU: background threads may run on any of them.
        assert_eq!(members(&background_cpus(&cpus(&[0, 1]), [0, 1])), [0, 1]);
        // A shard pinned outside the process's CPUs changes nothing.
        assert_eq!(members(&background_cpus(&cpus(&[2, 3]), [0])), [2, 3]);
    }

    /// The calling thread's I/O priority class (`ioprio_get`).
    fn io_class() -> libc::c_long {
        // SAFETY: ioprio_get takes plain integers and reads this thread's I/O priority.
        let priority = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0 as libc::c_int) };
        assert!(priority >= 0, "ioprio_get: {}", std::io::Error::last_os_error());
        priority >> IOPRIO_CLASS_SHIFT
    }

    /// The snapshot thread runs at the idle policy and the idle I/O class; the thread that
    /// started it keeps its own.
    #[test]
    fn a_background_thread_is_idle_for_the_cpu_and_the_disk() {
        let (sender, received) = std::sync::mpsc::channel();
        let before = io_class();
        spawn_idle_thread("idle-check".into(), thread_cpus().expect("read the CPUs"), move || {
            // SAFETY: sched_getscheduler reads the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            sender.send((policy, io_class())).expect("the test waits");
        })
        .expect("start the thread")
        .join()
        .expect("the thread ran");
        let idle = libc::c_long::from(IOPRIO_CLASS_IDLE);
        assert_eq!(received.recv().expect("the thread answered"), (libc::SCHED_IDLE, idle));
        assert_eq!(io_class(), before);
        assert_ne!(before, idle);
    }

    #[test]
    fn pinning_to_a_cpu_that_does_not_exist_is_an_error() {
        let outside = libc::CPU_SETSIZE as usize;
        let error = std::thread::spawn(move || pin_to_cpu(outside)).join().expect("the thread runs");
        assert_eq!(error.expect_err("no such CPU").kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_background_thread_leaves_its_pinned_shard() {
        remember_process_cpus();
        let process = *PROCESS_CPUS.get().expect("remembered");
        let first = members(&process)[0];
        let background = background_cpus(&process, [first]);
        let moved = std::thread::spawn(move || {
            // Pinned to one CPU, as a shard's thread is (and as a thread it spawns starts).
            pin_to_cpu(first).expect("pin to one CPU");
            assert_eq!(members(&thread_cpus().unwrap()), [first]);
            move_to_cpus(&background).expect("move");
            members(&thread_cpus().unwrap())
        })
        .join()
        .expect("the thread ran");
        assert_eq!(moved, members(&background));
        if members(&process).len() > 1 {
            assert!(!moved.contains(&first), "{moved:?} still holds the shard's CPU {first}");
        }
    }
}
