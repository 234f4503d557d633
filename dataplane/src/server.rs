//! Starting and stopping the data plane: one pinned glommio executor per core, the mesh
//! between them, and the admin endpoint.
//!
//! Each executor runs four kinds of task around its `Core`: one waits for datagrams, one
//! per peer core waits for mesh messages, one fires timers (QUIC's and the shard's expiry)
//! and watches for the stop signal, and one publishes metrics every second. Each task
//! borrows the core only between awaits, so they never contend.

use std::cell::RefCell;
use std::net::{SocketAddr, UdpSocket};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::{ExecutorJoinHandle, GlommioError, LocalExecutorBuilder, Placement, ResourceType};
use stockplane_engine::ShardId;
use tracing::{error, info};

use crate::admin::{Admin, Health};
use crate::config::Config;
use crate::core::{Core, MeshMessage};
use crate::metrics::CoreGauges;
use crate::udp::{bind_reuseport, Udp};

/// The longest a core sleeps without looking at its timers and the stop signal.
const TICK_MAX: Duration = Duration::from_millis(1);
/// How often each core publishes its metrics.
const METRICS_EVERY: Duration = Duration::from_secs(1);

/// A running data plane.
pub struct Server {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
    cores: Vec<ExecutorJoinHandle<anyhow::Result<()>>>,
    _admin: Admin,
}

impl Server {
    /// Starts every core and the admin endpoint; returns once every core serves.
    pub fn start(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
        let cores = config.core_count();
        let crypto = crate::tls::server_crypto(&config.tls.cert, &config.tls.key, &config.tls.client_ca)
            .context("load the TLS certificates")?;
        let server_config = Arc::new(quic_config(&config, crypto)?);
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
        for (shard, socket) in sockets.into_iter().enumerate() {
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
            };
            let cpu = config.cpu_first + shard as usize;
            let placement = if cpu < available_cpus() { Placement::Fixed(cpu) } else { Placement::Unbound };
            let builder = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{shard}"))
                .io_memory(config.io_memory_bytes)
                .spin_before_park(Duration::from_micros(50));
            let thread = builder
                .spawn(move || async move {
                    let failed = context.failed.clone();
                    let result = run_core(context, socket).await;
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
        Ok(Server { addr, admin_addr, stop, health, cores: threads, _admin: admin })
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

    /// Waits until the server stops (after the stop flag is set), and says whether every
    /// core stopped cleanly.
    pub fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        for thread in self.cores.drain(..) {
            let result = thread.join().map_err(|_| anyhow!("a core panicked"))?;
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        }
        self.health.set_not_ready("stopped");
        first_error.map_or(Ok(()), Err)
    }

    /// Closes every connection (with `SHUTTING_DOWN`) and stops every core.
    pub fn stop(self) -> anyhow::Result<()> {
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

async fn run_core(context: CoreContext, socket: UdpSocket) -> anyhow::Result<()> {
    let CoreContext { shard, shards, config, server_config, mesh, members, stop, ready, .. } = context;
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
    let (udp, readiness) = Udp::new(socket)?;
    let core = Rc::new(RefCell::new(Core::new(shard, shards, &config, server_config, udp)?));
    let service = metrics::histogram!("stockplane_service_seconds", "shard" => shard.to_string());

    // Mesh receivers: one task per peer core.
    for (_, receiver) in receivers.streams() {
        let core = core.clone();
        let mesh_out = mesh_out.clone();
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
        .detach();
    }

    // Datagrams. A socket error ends the task and, through `socket_error`, the core.
    let socket_error: Rc<RefCell<Option<anyhow::Error>>> = Rc::new(RefCell::new(None));
    {
        let core = core.clone();
        let mesh_out = mesh_out.clone();
        let socket_error = socket_error.clone();
        glommio::spawn_local(async move {
            let result: anyhow::Result<()> = async {
                loop {
                    readiness.readable().await.context("wait for datagrams")?;
                    let now = Instant::now();
                    let out = {
                        let mut core = core.borrow_mut();
                        core.receive(now).context("receive datagrams")?;
                        core.flush(now)
                    };
                    mesh_out.send(out);
                    service.record(now.elapsed().as_secs_f64());
                }
            }
            .await;
            *socket_error.borrow_mut() = result.err();
        })
        .detach();
    }

    // Metrics.
    {
        let core = core.clone();
        let mesh_out = mesh_out.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(METRICS_EVERY).await;
                let mut core = core.borrow_mut();
                let gauges = CoreGauges {
                    live_holds: core.live_holds(),
                    connections: core.connections(),
                    mesh_queued: *mesh_out.queued.borrow(),
                    udp_send_dropped: core.udp_send_dropped(),
                };
                core.metrics.publish(&gauges);
            }
        })
        .detach();
    }

    ready.fetch_add(1, Ordering::AcqRel);
    info!(shard, "core serving");

    // Timers and the stop signal, on this task.
    let mut stopping_since = None;
    loop {
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
            // Connections get a moment to hear the close; then the core goes.
            if core.borrow().drained() || now.duration_since(since) > Duration::from_millis(500) {
                break;
            }
        }
        if let Some(error) = socket_error.borrow_mut().take() {
            return Err(error);
        }
    }
    info!(shard, "core stopped");
    Ok(())
}
