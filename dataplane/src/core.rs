//! One core: its engine shard, its QUIC endpoint and connections, and its end of the mesh.
//!
//! `Core` is a synchronous state machine driven by three glommio tasks (see `server`):
//! datagrams in, mesh messages in, timers. Each task borrows the core, feeds it an input,
//! and calls [`Core::flush`], which moves everything the input produced to where it goes:
//! WAL records to durability, peer messages and forwarded requests to other cores, replies
//! to their streams, and QUIC packets to the socket. Nothing here blocks or awaits.
//!
//! Requests flow like this: a stream's bytes are reassembled into frames, each frame
//! decoded and validated in place; if every request of the frame belongs to this core's
//! shard (always, with one core) the whole archived batch goes to `Shard::handle_batch`
//! without a copy; otherwise each request goes to its shard: local ones one by one, others
//! re-encoded into one batch per destination core and sent over the mesh. Replies come back
//! addressed by `ClientAddr` and are written to their stream as response frames.
//!
//! Durability: [`Core::flush`] queues what the engine emits for the WAL writer (`wal`),
//! whose `fdatasync` tells the core which position is durable ([`Core::on_durable`]); only
//! then do the replies and peer messages that waited for it leave. In `batch` durability
//! the core acknowledges at once and the writer syncs every few milliseconds. After a
//! failed write the core answers state changes `Unavailable` and keeps serving reads.

use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, Event, ReadError, StreamEvent, StreamId, VarInt, WriteError,
};
use rustls::pki_types::CertificateDer;
use stockplane_engine::{Origin, PeerMessage, Reply, Shard, ShardId, Tick};
use stockplane_wire::frame::{self, AlignedVec, FrameBuf, FrameError, Limits, FRAME_ALIGN, HEADER_LEN};
use stockplane_wire::{
    transport, ArchivedOp, ArchivedRequest, ArchivedRequestBatch, Body, Op, Request, RequestBatch, Response,
    ResponseBatch, Role, Status, StockLevel,
};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::ids::ClientAddr;
use crate::metrics::{CoreMetrics, QuicCounts};
use crate::route::{route, Route};
use crate::udp::Udp;
use crate::wal::{Durability, WalQueue};

/// Replies in one response frame at most (a client's frame limit is 1 MiB by default).
const RESPONSES_PER_FRAME_MAX: usize = 2_048;
/// Datagrams handled between two flushes at most.
const DATAGRAMS_PER_FLUSH: usize = 64;
/// The stream slot that marks a split query's parts: replies to it go to the merger.
const SPLIT_STREAM: u8 = u8::MAX;
/// Frames that cores build for each other are checked like any frame, but hold no more
/// than a client's frame did, so they need no limit of their own.
const INTERNAL_LIMITS: Limits = Limits { frame_bytes_max: u32::MAX, requests_per_frame_max: u32::MAX };

/// A message between cores; each one carries a batch.
#[derive(Debug)]
pub(crate) enum MeshMessage {
    /// Requests for the receiving core's shard, from one client stream, as a request frame.
    Requests {
        /// The stream they came from.
        origin: Origin,
        /// An encoded request frame.
        frame: AlignedVec<FRAME_ALIGN>,
    },
    /// Replies for clients connected to the receiving core.
    Replies(Vec<Reply>),
    /// Two-phase cart messages from shard `from`.
    Peers {
        /// The sending shard.
        from: ShardId,
        /// The messages, in the order the engine emitted them.
        messages: Vec<PeerMessage>,
    },
}

/// What a core has queued for another core, sent as a few messages per flush.
#[derive(Debug, Default)]
struct Outgoing {
    requests: Vec<MeshMessage>,
    replies: Vec<Reply>,
    peers: Vec<PeerMessage>,
}

/// A client stream: reassembly of request frames, replies waiting to be written.
struct Stream {
    id: StreamId,
    generation: u16,
    inbound: FrameBuf,
    /// Bytes of response frames that QUIC's flow control has not yet taken.
    outbound: Vec<u8>,
    outbound_sent: usize,
    replies: Vec<Response>,
    /// Requests accepted from this stream and not yet answered.
    in_flight: u32,
    /// The client finished its side: answer what is in flight, then finish ours.
    finished: bool,
    /// The stream was reset or stopped: drop whatever is still to come for it.
    broken: bool,
}

/// A client connection.
struct Conn {
    conn: quinn_proto::Connection,
    handle: ConnectionHandle,
    generation: u16,
    role: Option<Role>,
    streams: Vec<Option<Stream>>,
    stream_generations: Vec<u16>,
    in_flight: u32,
    tokens: f64,
    refilled_at: Instant,
    timeout: Option<Instant>,
    dirty: bool,
}

/// A stock query whose SKUs live on several shards, waiting for its parts.
struct SplitQuery {
    generation: u16,
    reply_to: ClientAddr,
    request_id: u64,
    parts_left: u32,
    levels: Vec<StockLevel>,
    status: Status,
}

/// A datagram as received, before the endpoint sees it.
struct Datagram {
    addr: SocketAddr,
    dst_ip: Option<std::net::IpAddr>,
    ecn: Option<quinn_proto::EcnCodepoint>,
    data: BytesMut,
}

/// One core's whole state.
pub(crate) struct Core {
    shard_id: ShardId,
    shards: u32,
    shard: Shard,
    endpoint: Endpoint,
    server_config: Arc<quinn_proto::ServerConfig>,
    udp: Udp,
    conns: Vec<Option<Conn>>,
    conn_generations: Vec<u16>,
    conn_free: Vec<u16>,
    /// `ConnectionHandle.0` to connection slot.
    by_handle: Vec<u16>,
    dirty: Vec<u16>,
    /// No connection's timer is due before this (it may be earlier than any).
    conns_deadline: Option<Instant>,
    /// The QUIC path counters of the connections closed so far.
    quic_closed: QuicCounts,
    splits: Vec<Option<SplitQuery>>,
    split_generations: Vec<u16>,
    outgoing: Vec<Outgoing>,
    limits: Limits,
    config: Config,
    started: Instant,
    started_ms: u64,
    transmit: Vec<u8>,
    received: Vec<Datagram>,
    /// The first datagram of `received` not yet handled.
    received_next: usize,
    encoded: AlignedVec<FRAME_ALIGN>,
    response_batch: ResponseBatch,
    forward: Vec<Vec<Request>>,
    wal: Vec<u8>,
    wal_queue: WalQueue,
    /// The writer holds records taken from the queue and not yet durable.
    /// Batches taken by the WAL writer and not yet durable (two while one syncs and the
    /// next is written).
    wal_batches_unsynced: u32,
    wal_wake: glommio::channels::local_channel::LocalSender<()>,
    durability: Durability,
    stopping: bool,
    /// Counters and histograms, published by the metrics task.
    pub metrics: CoreMetrics,
}

impl Core {
    /// A core for `shard` (recovered from its log) of `shards`, serving QUIC on `udp`;
    /// `wal_wake` wakes the WAL writer when records wait.
    pub fn new(
        shard: Shard,
        shards: u32,
        config: &Config,
        server_config: Arc<quinn_proto::ServerConfig>,
        udp: Udp,
        wal_wake: glommio::channels::local_channel::LocalSender<()>,
    ) -> anyhow::Result<Core> {
        let shard_id = shard.config().shard;
        let started = Instant::now();
        let started_ms = wall_clock_ms();
        let mut endpoint_config = quinn_proto::EndpointConfig::default();
        endpoint_config.max_udp_payload_size(config.quic.udp_payload_bytes_max.max(1_200))?;
        let endpoint = Endpoint::new(Arc::new(endpoint_config), Some(server_config.clone()), true, None);
        let connections = config.limits.connections_per_core_max as usize;
        Ok(Core {
            shard_id,
            shards,
            shard,
            endpoint,
            server_config,
            udp,
            conns: Vec::new(),
            conn_generations: Vec::new(),
            conn_free: Vec::new(),
            by_handle: Vec::with_capacity(connections),
            dirty: Vec::new(),
            conns_deadline: None,
            quic_closed: QuicCounts::default(),
            splits: Vec::new(),
            split_generations: Vec::new(),
            outgoing: (0..shards).map(|_| Outgoing::default()).collect(),
            limits: config.frame_limits(),
            config: config.clone(),
            started,
            started_ms,
            transmit: Vec::with_capacity(64 * 1024),
            received: Vec::with_capacity(crate::udp::RECV_BATCH * 4),
            received_next: 0,
            encoded: AlignedVec::with_capacity(64 * 1024),
            response_batch: ResponseBatch { responses: Vec::with_capacity(RESPONSES_PER_FRAME_MAX) },
            forward: (0..shards).map(|_| Vec::new()).collect(),
            wal: Vec::with_capacity(1 << 20),
            wal_queue: WalQueue { head: 0, ..WalQueue::default() },
            wal_batches_unsynced: 0,
            wal_wake,
            durability: config.durability()?,
            stopping: false,
            metrics: CoreMetrics::new(shard_id),
        })
    }

    /// The engine's clock: wall-clock milliseconds at start, advanced by the monotonic clock.
    pub fn tick(&self, now: Instant) -> Tick {
        self.started_ms + now.duration_since(self.started).as_millis() as u64
    }

    /// The engine shard, as its last request left it.
    pub fn engine(&self) -> &Shard {
        &self.shard
    }

    /// Takes the records waiting for the WAL writer (and their last position), leaving
    /// `spare`'s allocation in their place.
    pub fn take_wal(&mut self, spare: Vec<u8>) -> Option<(Vec<u8>, u64)> {
        if self.wal_queue.pending.is_empty() || self.wal_queue.failed.is_some() {
            return None;
        }
        let mut spare = spare;
        spare.clear();
        let bytes = mem::replace(&mut self.wal_queue.pending, spare);
        self.wal_batches_unsynced += 1;
        Some((bytes, self.wal_queue.head))
    }

    /// True when every record the engine emitted is on disk (or the disk failed).
    pub fn wal_idle(&self) -> bool {
        self.wal_queue.failed.is_some() || (self.wal_queue.pending.is_empty() && self.wal_batches_unsynced == 0)
    }

    /// The shard's state hash (equal to that of a shard rebuilt from its durable log once
    /// the log is idle).
    pub fn state_hash(&self) -> u64 {
        self.shard.state_hash()
    }

    /// The WAL writer made every record up to `position` durable.
    pub fn on_durable(&mut self, position: u64) {
        debug_assert!(self.wal_batches_unsynced > 0, "a batch made durable that was never taken");
        self.wal_batches_unsynced = self.wal_batches_unsynced.saturating_sub(1);
        self.metrics.wal_syncs += 1;
        if let Durability::Sync = self.durability {
            self.shard.handle_durable(position);
        }
    }

    /// The WAL writer failed: nothing more is written or acknowledged; state changes are
    /// answered `Unavailable` from now on, reads still served.
    pub fn on_wal_failed(&mut self, reason: String) {
        self.wal_batches_unsynced = 0;
        self.wal_queue.pending.clear();
        self.wal_queue.failed = Some(reason);
    }

    /// True once the WAL failed (state changes are refused from then on).
    pub fn wal_failed(&self) -> bool {
        self.wal_queue.failed.is_some()
    }

    /// Bytes of records acknowledged (batch durability) or queued but not yet on disk.
    pub fn wal_unsynced_bytes(&self) -> usize {
        self.wal_queue.pending.len()
    }

    /// Datagrams dropped because the socket's send buffer was full.
    pub fn udp_send_dropped(&self) -> u64 {
        self.udp.send_dropped
    }

    /// Live holds of the shard, for metrics.
    pub fn live_holds(&self) -> u32 {
        self.shard.live_holds()
    }

    /// Connections open on this core.
    pub fn connections(&self) -> usize {
        self.conns.len() - self.conn_free.len()
    }

    /// Sets `metrics.quic` to the QUIC path counters of every connection this core has
    /// had: packets sent and lost, bytes lost, congestion events (a loss on loopback or
    /// in one data centre means a datagram dropped on the way, by a full socket buffer or
    /// a send the kernel refused, and each one shrinks that connection's congestion
    /// window and pacing rate).
    pub fn refresh_quic(&mut self) {
        let mut counts = self.quic_closed;
        for conn in self.conns.iter().flatten() {
            counts.add(&conn.conn.stats().path);
        }
        self.metrics.quic = counts;
    }

    // ------------------------------------------------------------------ inputs

    /// Handles up to `DATAGRAMS_PER_FLUSH` datagrams: those left from the last read, or
    /// a new batch read from the socket (one `recvmmsg`, which with GRO can hold more than
    /// a thousand datagrams); returns how many it handled. Not everything waiting: under
    /// load the socket is never empty, and the replies to these must leave (`flush`)
    /// before more is handled, or latency grows with the queue.
    pub fn receive(&mut self, now: Instant) -> anyhow::Result<usize> {
        if self.received_next == self.received.len() {
            self.received.clear();
            self.received_next = 0;
            let mut received = mem::take(&mut self.received);
            self.udp.recv(|meta, bytes| {
                let ecn = meta.ecn.and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                let mut data = BytesMut::from(bytes);
                while !data.is_empty() {
                    let segment = data.split_to(meta.stride.min(data.len()));
                    received.push(Datagram { addr: meta.addr, dst_ip: meta.dst_ip, ecn, data: segment });
                }
            })?;
            self.received = received;
        }
        let end = self.received.len().min(self.received_next + DATAGRAMS_PER_FLUSH);
        let mut handled = 0;
        while self.received_next < end {
            let index = self.received_next;
            self.received_next += 1;
            let datagram = mem::replace(&mut self.received[index].data, BytesMut::new());
            let (addr, dst_ip, ecn) =
                (self.received[index].addr, self.received[index].dst_ip, self.received[index].ecn);
            self.metrics.datagrams_in += 1;
            self.on_datagram(now, addr, dst_ip, ecn, datagram);
            handled += 1;
        }
        Ok(handled)
    }

    /// True when datagrams already read wait to be handled (the receive task then goes on
    /// without waiting for the socket).
    pub fn datagrams_waiting(&self) -> bool {
        self.received_next < self.received.len()
    }

    fn on_datagram(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        dst_ip: Option<std::net::IpAddr>,
        ecn: Option<quinn_proto::EcnCodepoint>,
        data: BytesMut,
    ) {
        let mut buf = mem::take(&mut self.transmit);
        match self.endpoint.handle(now, addr, dst_ip, ecn, data, &mut buf) {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(slot) = self.slot_of(handle) {
                    let conn = self.conns[slot as usize].as_mut().expect("indexed connections exist");
                    conn.conn.handle_event(event);
                    self.mark_dirty(slot);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                if self.stopping || self.connections() >= self.config.limits.connections_per_core_max as usize {
                    self.metrics.connections_refused += 1;
                    let transmit = self.endpoint.refuse(incoming, &mut buf);
                    self.send_transmit(&transmit, &buf);
                } else {
                    match self.endpoint.accept(incoming, now, &mut buf, Some(self.server_config.clone())) {
                        Ok((handle, conn)) => self.insert_conn(handle, conn, now),
                        Err(error) => {
                            debug!(error = %error.cause, "handshake refused");
                            if let Some(transmit) = error.response {
                                self.send_transmit(&transmit, &buf);
                            }
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => self.send_transmit(&transmit, &buf),
            None => {}
        }
        buf.clear();
        self.transmit = buf;
    }

    fn insert_conn(&mut self, handle: ConnectionHandle, conn: quinn_proto::Connection, now: Instant) {
        let slot = match self.conn_free.pop() {
            Some(slot) => slot,
            None => {
                self.conns.push(None);
                self.conn_generations.push(0);
                (self.conns.len() - 1) as u16
            }
        };
        let generation = self.conn_generations[slot as usize];
        let streams = self.config.limits.streams_per_connection_max as usize;
        self.conns[slot as usize] = Some(Conn {
            conn,
            handle,
            generation,
            role: None,
            streams: (0..streams).map(|_| None).collect(),
            stream_generations: vec![0; streams],
            in_flight: 0,
            tokens: f64::from(self.config.limits.requests_burst_per_connection),
            refilled_at: now,
            timeout: None,
            dirty: false,
        });
        if self.by_handle.len() <= handle.0 {
            self.by_handle.resize(handle.0 + 1, u16::MAX);
        }
        self.by_handle[handle.0] = slot;
        self.metrics.connections_accepted += 1;
        self.mark_dirty(slot);
    }

    fn slot_of(&self, handle: ConnectionHandle) -> Option<u16> {
        match self.by_handle.get(handle.0) {
            Some(&slot) if slot != u16::MAX => Some(slot),
            _ => None,
        }
    }

    fn mark_dirty(&mut self, slot: u16) {
        mark_dirty(&mut self.conns, &mut self.dirty, slot);
    }

    /// The shard and, borrowed beside it, what delivering a reply changes: so that replies
    /// can go from the shard's queue to their streams without a copy in between.
    fn shard_and_delivery(&mut self) -> (&mut Shard, Delivery<'_>) {
        let delivery = Delivery {
            shard_id: self.shard_id,
            outgoing: &mut self.outgoing,
            splits: &mut self.splits,
            split_generations: &mut self.split_generations,
            conns: &mut self.conns,
            dirty: &mut self.dirty,
        };
        (&mut self.shard, delivery)
    }

    /// Sends a reply to its stream: here, or through the mesh to the core that holds it.
    fn deliver(&mut self, reply: Reply) {
        self.shard_and_delivery().1.deliver(reply);
    }

    /// Handles a batch from another core.
    pub fn on_mesh(&mut self, now: Instant, message: MeshMessage) {
        let tick = self.tick(now);
        match message {
            MeshMessage::Requests { origin, frame } => match frame::decode_requests(&frame, &INTERNAL_LIMITS) {
                Ok(batch) if self.wal_queue.failed.is_none() => self.shard.handle_batch(tick, origin, batch),
                Ok(batch) => {
                    for request in batch.requests.iter() {
                        if changes_state(&request.op) {
                            let id = request.id.to_native();
                            let reply = Reply {
                                client: origin.client,
                                request_id: id,
                                status: Status::Unavailable,
                                body: Body::Empty,
                            };
                            self.deliver(reply);
                        } else {
                            self.shard.handle_request(tick, origin, request);
                        }
                    }
                }
                Err(error) => unreachable!("a core forwarded a frame it encoded itself, which failed: {error}"),
            },
            MeshMessage::Replies(replies) => {
                for reply in replies {
                    self.deliver(reply);
                }
            }
            MeshMessage::Peers { from, messages } => {
                for message in messages {
                    self.shard.handle_peer(tick, from, message);
                }
            }
        }
    }

    /// Lets time pass for the shard (expiries) and every connection whose timer is due.
    pub fn on_timer(&mut self, now: Instant) {
        let tick = self.tick(now);
        if self.shard.poll_timeout().is_some_and(|at| at <= tick) {
            self.shard.handle_timeout(tick);
        }
        // Connections are scanned only when the earliest of their timers is due; the scan
        // finds the next earliest (a timer that moved later leaves it early: a scan for
        // nothing, never a late timer).
        if self.conns_deadline.is_none_or(|at| at > now) {
            return;
        }
        self.conns_deadline = None;
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else { continue };
            match conn.timeout {
                Some(at) if at <= now => {
                    conn.timeout = None;
                    conn.conn.handle_timeout(now);
                    self.mark_dirty(slot as u16);
                }
                Some(at) => self.conns_deadline = Some(self.conns_deadline.map_or(at, |d| d.min(at))),
                None => {}
            }
        }
    }

    /// When [`Core::on_timer`] must next run.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let shard = self.shard.poll_timeout().map(|at| {
            let tick = self.tick(now);
            now + Duration::from_millis(at.saturating_sub(tick))
        });
        match (shard, self.conns_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Closes every connection (the server is stopping) and refuses new ones.
    pub fn stop(&mut self, now: Instant) {
        self.stopping = true;
        for slot in 0..self.conns.len() {
            if let Some(conn) = self.conns[slot].as_mut() {
                conn.conn.close(now, VarInt::from_u32(transport::close::SHUTTING_DOWN), "shutting down".into());
                self.mark_dirty(slot as u16);
            }
        }
    }

    /// True once every connection is gone after [`Core::stop`].
    pub fn drained(&self) -> bool {
        self.stopping && self.conns.iter().all(|c| c.is_none())
    }

    // ------------------------------------------------------------------ flushing

    /// Moves every output to its destination; returns the mesh messages to send, by core.
    pub fn flush(&mut self, now: Instant) -> Vec<(ShardId, MeshMessage)> {
        let tick = self.tick(now);
        let mut mesh = Vec::new();
        // Connections first: reading streams feeds the shard.
        self.drive_connections(now, tick);
        loop {
            let mut progress = false;
            if let Some(position) = self.shard.poll_wal_append(&mut self.wal) {
                progress = true;
                self.metrics.wal_bytes += self.wal.len() as u64;
                if self.durability == Durability::None {
                    self.shard.handle_durable(position);
                } else if self.wal_queue.failed.is_none() {
                    if self.wal_queue.pending.is_empty() {
                        let _ = self.wal_wake.try_send(());
                    }
                    self.wal_queue.pending.extend_from_slice(&self.wal);
                    self.wal_queue.head = position;
                    if let Durability::Batch { .. } = self.durability {
                        // Acknowledged before the disk: at most `ms` of this is at risk.
                        self.shard.handle_durable(position);
                    }
                }
            }
            while let Some((to, message)) = self.shard.poll_peer() {
                progress = true;
                if to == self.shard_id {
                    self.shard.handle_peer(tick, self.shard_id, message);
                } else {
                    self.outgoing[to as usize].peers.push(message);
                }
            }
            // Each reply goes from the shard's queue straight to its stream.
            let (shard, mut delivery) = self.shard_and_delivery();
            shard.drain_replies(|reply| {
                progress = true;
                delivery.deliver(reply);
            });
            if !progress {
                break;
            }
        }
        for core in 0..self.outgoing.len() {
            let out = &mut self.outgoing[core];
            for message in out.requests.drain(..) {
                mesh.push((core as ShardId, message));
            }
            if !out.replies.is_empty() {
                mesh.push((core as ShardId, MeshMessage::Replies(mem::take(&mut out.replies))));
            }
            if !out.peers.is_empty() {
                let messages = mem::take(&mut out.peers);
                mesh.push((core as ShardId, MeshMessage::Peers { from: self.shard_id, messages }));
            }
        }
        self.drive_connections(now, tick);
        mesh
    }

    fn drive_connections(&mut self, now: Instant, tick: Tick) {
        while let Some(slot) = self.dirty.pop() {
            let Some(conn) = self.conns[slot as usize].as_mut() else { continue };
            conn.dirty = false;
            self.drive(slot, now, tick);
        }
    }

    /// Runs one connection until it has nothing more to say: events, streams, replies,
    /// packets, timer.
    fn drive(&mut self, slot: u16, now: Instant, tick: Tick) {
        loop {
            let conn = self.conns[slot as usize].as_mut().expect("driven connections exist");
            let mut progress = false;
            while let Some(event) = conn.conn.poll_endpoint_events() {
                if let Some(event) = self.endpoint.handle_event(conn.handle, event) {
                    conn.conn.handle_event(event);
                }
                progress = true;
            }
            loop {
                let conn = self.conns[slot as usize].as_mut().expect("exists");
                let Some(event) = conn.conn.poll() else { break };
                progress = true;
                match event {
                    Event::Connected => self.on_connected(slot, now, tick),
                    Event::ConnectionLost { reason } => {
                        debug!(%reason, "connection lost");
                    }
                    Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => self.accept_streams(slot, now, tick),
                    Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                        conn.conn.close(
                            now,
                            VarInt::from_u32(transport::close::PROTOCOL_VIOLATION),
                            "unidirectional streams are not part of the protocol".into(),
                        );
                    }
                    Event::Stream(StreamEvent::Readable { id }) => self.read_stream(slot, id, now, tick),
                    Event::Stream(StreamEvent::Writable { id }) => self.write_stream(slot, id),
                    Event::Stream(StreamEvent::Stopped { id, .. }) => self.break_stream(slot, id),
                    Event::Stream(_) | Event::HandshakeDataReady | Event::DatagramReceived => {}
                    Event::DatagramsUnblocked => {}
                }
            }
            self.write_replies(slot);
            let mut buf = mem::take(&mut self.transmit);
            loop {
                let conn = self.conns[slot as usize].as_mut().expect("exists");
                buf.clear();
                // Every datagram of a transmit is at most the path's MTU long.
                let max_segments = self.udp.segments_per_send(usize::from(conn.conn.current_mtu()));
                match conn.conn.poll_transmit(now, max_segments, &mut buf) {
                    Some(transmit) => {
                        progress = true;
                        self.send_transmit(&transmit, &buf);
                    }
                    None => break,
                }
            }
            buf.clear();
            self.transmit = buf;
            let conn = self.conns[slot as usize].as_mut().expect("exists");
            conn.timeout = conn.conn.poll_timeout();
            if let Some(at) = conn.timeout {
                self.conns_deadline = Some(self.conns_deadline.map_or(at, |d| d.min(at)));
            }
            if conn.conn.is_drained() {
                self.remove_conn(slot);
                return;
            }
            if !progress {
                return;
            }
        }
    }

    /// The handshake is confirmed: the client's certificate decides its role, and frames
    /// that arrived before (0.5-RTT data) are handled now.
    fn on_connected(&mut self, slot: u16, now: Instant, tick: Tick) {
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        let identity = conn.conn.crypto_session().peer_identity();
        let certs = identity.and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
        let role = match certs.as_deref().and_then(|certs| certs.first()) {
            Some(cert) => crate::tls::role_of(cert.as_ref()),
            None => Err(crate::tls::RoleError::Unparsable),
        };
        match role {
            Ok(role) => {
                debug!(remote = %conn.conn.remote_address(), ?role, "connected");
                conn.role = Some(role);
                for index in 0..conn.streams.len() {
                    let waiting = self.conns[slot as usize].as_ref().expect("exists").streams[index]
                        .as_ref()
                        .is_some_and(|s| !s.inbound.is_empty() || s.finished);
                    if waiting {
                        self.handle_frames(slot, index, now, tick);
                    }
                }
            }
            Err(error) => {
                warn!(remote = %conn.conn.remote_address(), %error, "client certificate grants no role; closing");
                self.metrics.connections_refused += 1;
                conn.conn.close(now, VarInt::from_u32(transport::close::NO_ROLE), error.to_string().into());
            }
        }
    }

    /// Takes every newly opened stream, and reads what it already carries (quinn-proto
    /// reports a new stream as opened, not as readable).
    fn accept_streams(&mut self, slot: u16, now: Instant, tick: Tick) {
        loop {
            let conn = self.conns[slot as usize].as_mut().expect("exists");
            let Some(id) = conn.conn.streams().accept(Dir::Bi) else { return };
            // QUIC lets a client open a stream once its previous ones are closed, which
            // can be before their last in-flight replies have come back and freed their
            // slots here: then the table grows (slot 255 is the split-query merger's).
            let index = match conn.streams.iter().position(|s| s.is_none()) {
                Some(index) => index,
                None if conn.streams.len() < usize::from(SPLIT_STREAM) => {
                    conn.streams.push(None);
                    conn.stream_generations.push(0);
                    conn.streams.len() - 1
                }
                None => {
                    warn!(%id, "no stream slot free; closing the connection");
                    conn.conn.close(
                        now,
                        VarInt::from_u32(transport::close::PROTOCOL_VIOLATION),
                        "too many streams".into(),
                    );
                    return;
                }
            };
            let generation = conn.stream_generations[index];
            conn.streams[index] = Some(Stream {
                id,
                generation,
                inbound: FrameBuf::new(),
                outbound: Vec::new(),
                outbound_sent: 0,
                replies: Vec::new(),
                in_flight: 0,
                finished: false,
                broken: false,
            });
            self.read_stream(slot, id, now, tick);
        }
    }

    fn stream_index(conn: &Conn, id: StreamId) -> Option<usize> {
        conn.streams.iter().position(|s| s.as_ref().is_some_and(|s| s.id == id))
    }

    /// Reads what a stream has, then handles every complete frame in it.
    fn read_stream(&mut self, slot: u16, id: StreamId, now: Instant, tick: Tick) {
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        let Some(index) = Self::stream_index(conn, id) else { return };
        let Conn { conn: quic, streams, .. } = conn;
        let stream = streams[index].as_mut().expect("found");
        let mut recv = quic.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else { return };
        let mut reset = false;
        let frame_max = self.limits.frame_bytes_max as usize;
        loop {
            match chunks.next(frame_max) {
                Ok(Some(chunk)) => stream.inbound.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    stream.finished = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(_)) => {
                    reset = true;
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        if reset {
            return self.break_stream(slot, id);
        }
        self.handle_frames(slot, index, now, tick);
    }

    /// Handles every complete frame at the front of a stream's buffer.
    fn handle_frames(&mut self, slot: u16, index: usize, now: Instant, tick: Tick) {
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        if conn.role.is_none() {
            // Before the handshake is confirmed the client's role is unknown: keep the
            // bytes until `on_connected`.
            return;
        }
        let stream = conn.streams[index].as_mut().expect("exists");
        let mut inbound = mem::take(&mut stream.inbound);
        let finished = stream.finished;
        let mut failure = None;
        loop {
            let bytes = inbound.as_bytes();
            if bytes.len() < HEADER_LEN {
                if finished && !bytes.is_empty() {
                    failure = Some(FrameError::TooShort { needed: HEADER_LEN, len: bytes.len() });
                }
                break;
            }
            let header = match frame::header_parse(&bytes[..HEADER_LEN]).and_then(|h| {
                h.check_limits(&self.limits)?;
                Ok(h)
            }) {
                Ok(header) => header,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            let len = header.frame_len();
            if bytes.len() < len {
                if finished {
                    failure = Some(FrameError::Truncated { needed: len, len: bytes.len() });
                }
                break;
            }
            match frame::decode_requests(&bytes[..len], &self.limits) {
                Ok(batch) => self.handle_frame(slot, index, batch, now, tick),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
            inbound.consume(len);
        }
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        if let Some(stream) = conn.streams[index].as_mut() {
            stream.inbound = inbound;
        }
        if let Some(error) = failure {
            self.metrics.frame_errors[error.code() as usize] += 1;
            let conn = self.conns[slot as usize].as_mut().expect("exists");
            warn!(remote = %conn.conn.remote_address(), role = ?conn.role, %error, "bad frame; resetting the stream");
            let id = conn.streams[index].as_ref().expect("exists").id;
            let code = VarInt::from_u32(u32::from(error.code()));
            let _ = conn.conn.send_stream(id).reset(code);
            let _ = conn.conn.recv_stream(id).stop(code);
            self.break_stream(slot, id);
        }
        self.mark_dirty(slot);
    }

    /// Handles one decoded frame of requests from a stream.
    fn handle_frame(&mut self, slot: u16, index: usize, batch: &ArchivedRequestBatch, now: Instant, tick: Tick) {
        let requests = batch.requests.as_slice();
        let count = requests.len() as u32;
        self.metrics.frames_in += 1;
        for request in requests {
            self.metrics.count_op(&request.op);
        }
        let limits = &self.config.limits;
        let (burst, rate, in_flight_max) = (
            f64::from(limits.requests_burst_per_connection),
            f64::from(limits.requests_per_s_per_connection),
            limits.requests_in_flight_per_connection_max,
        );
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        let role = conn.role.expect("frames are handled once the role is known");
        let elapsed = now.duration_since(conn.refilled_at).as_secs_f64();
        conn.tokens = (conn.tokens + elapsed * rate).min(burst);
        conn.refilled_at = now;
        let stream = conn.streams[index].as_mut().expect("exists");
        let origin = Origin {
            client: ClientAddr {
                core: self.shard_id as u8,
                conn: slot,
                conn_gen: conn.generation,
                stream: index as u8,
                stream_gen: stream.generation,
            }
            .pack(),
            role,
        };
        // A failed log sends every request the slow way, where state changes are refused.
        let all_here = self.wal_queue.failed.is_none()
            && (self.shards == 1 || requests.iter().all(|r| route(&r.op, self.shards) == Route::Shard(self.shard_id)));
        if all_here && conn.tokens >= f64::from(count) && conn.in_flight + count <= in_flight_max {
            // The fast path: the archived batch goes to the shard as it arrived.
            conn.tokens -= f64::from(count);
            conn.in_flight += count;
            stream.in_flight += count;
            self.shard.handle_batch(tick, origin, batch);
            return;
        }
        for request in requests {
            self.handle_one(slot, index, origin, request, tick);
        }
        for core in 0..self.forward.len() {
            if self.forward[core].is_empty() {
                continue;
            }
            let requests = mem::take(&mut self.forward[core]);
            let batch = RequestBatch { requests };
            let frame = frame::encode_requests(&batch);
            let mut requests = batch.requests;
            requests.clear();
            self.forward[core] = requests;
            self.metrics.forwarded_frames += 1;
            self.outgoing[core].requests.push(MeshMessage::Requests { origin, frame });
        }
    }

    /// Handles one request of a frame that is not all for this shard, or that meets a limit.
    fn handle_one(&mut self, slot: u16, index: usize, origin: Origin, request: &ArchivedRequest, tick: Tick) {
        let id = request.id.to_native();
        let in_flight_max = self.config.limits.requests_in_flight_per_connection_max;
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        let stream = conn.streams[index].as_mut().expect("exists");
        let refuse = |stream: &mut Stream, status: Status| {
            stream.replies.push(Response { id, status, body: Body::Empty });
        };
        if conn.tokens < 1.0 {
            return refuse(stream, Status::RateLimited);
        }
        if conn.in_flight >= in_flight_max {
            return refuse(stream, Status::Busy);
        }
        let target = route(&request.op, self.shards);
        if let Route::Refuse(status) = target {
            return refuse(stream, status);
        }
        if self.wal_queue.failed.is_some() && changes_state(&request.op) && target == Route::Shard(self.shard_id) {
            return refuse(stream, Status::Unavailable);
        }
        conn.tokens -= 1.0;
        conn.in_flight += 1;
        stream.in_flight += 1;
        match target {
            Route::Shard(shard) if shard == self.shard_id => self.shard.handle_request(tick, origin, request),
            Route::Shard(shard) => self.forward[shard as usize].push(deserialize(request)),
            Route::Split => self.split_query(origin, request, tick),
            Route::Refuse(_) => unreachable!("handled above"),
        }
    }

    /// Sends each shard its part of a stock query that spans shards; the merged answer
    /// goes back to the client once every part is in.
    fn split_query(&mut self, origin: Origin, request: &ArchivedRequest, tick: Tick) {
        let ArchivedOp::QueryStock { items } = &request.op else { unreachable!("only stock queries split") };
        let index = match self.splits.iter().position(|s| s.is_none()) {
            Some(index) => index,
            None => {
                self.splits.push(None);
                self.split_generations.push(0);
                self.splits.len() - 1
            }
        };
        let generation = self.split_generations[index];
        let mut parts: Vec<Vec<stockplane_wire::SkuAt>> = (0..self.shards).map(|_| Vec::new()).collect();
        for item in items.iter() {
            let sku = item.sku.to_native();
            let location = item.location.as_ref().map(|l| l.to_native());
            parts[stockplane_engine::shard_for(sku, self.shards) as usize]
                .push(stockplane_wire::SkuAt { sku, location });
        }
        let parts_left = parts.iter().filter(|p| !p.is_empty()).count() as u32;
        self.splits[index] = Some(SplitQuery {
            generation,
            reply_to: ClientAddr::unpack(origin.client),
            request_id: request.id.to_native(),
            parts_left,
            levels: Vec::with_capacity(items.len()),
            status: Status::Ok,
        });
        let merger = Origin {
            client: ClientAddr {
                core: self.shard_id as u8,
                conn: index as u16,
                conn_gen: generation,
                stream: SPLIT_STREAM,
                stream_gen: 0,
            }
            .pack(),
            role: origin.role,
        };
        for (shard, items) in parts.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let request = Request { id: request.id.to_native(), op: Op::QueryStock { items } };
            let frame = frame::encode_requests(&RequestBatch { requests: vec![request] });
            if shard as ShardId == self.shard_id {
                let batch = frame::decode_requests(&frame, &INTERNAL_LIMITS).expect("encoded just now");
                self.shard.handle_batch(tick, merger, batch);
            } else {
                self.outgoing[shard].requests.push(MeshMessage::Requests { origin: merger, frame });
            }
        }
    }

    /// Encodes every stream's waiting replies into response frames and writes them.
    fn write_replies(&mut self, slot: u16) {
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        for index in 0..conn.streams.len() {
            let Some(stream) = conn.streams[index].as_mut() else { continue };
            // A frame holds what fits in the smaller of our frame limit and the protocol's
            // default (what a client reads with): answers to many large queries are
            // halved into more frames until each fits.
            let frame_max = self.limits.frame_bytes_max.min(Limits::FRAME_BYTES_MAX_DEFAULT) as usize;
            while !stream.replies.is_empty() {
                let take = stream.replies.len().min(RESPONSES_PER_FRAME_MAX);
                self.response_batch.responses.clear();
                self.response_batch.responses.extend(stream.replies.drain(..take));
                loop {
                    frame::encode_responses_into(&mut self.encoded, &self.response_batch);
                    let batched = self.response_batch.responses.len();
                    if self.encoded.len() <= frame_max || batched == 1 {
                        break;
                    }
                    let back = self.response_batch.responses.split_off(batched / 2);
                    stream.replies.splice(0..0, back);
                }
                // Every answer passes here, the engine's and the driver's own refusals.
                for response in &self.response_batch.responses {
                    self.metrics.count_status(response.status);
                }
                self.metrics.frames_out += 1;
                stream.outbound.extend_from_slice(&self.encoded);
            }
            self.response_batch.responses.clear();
            let id = stream.id;
            Self::write_outbound(conn, index);
            let stream = conn.streams[index].as_mut().expect("exists");
            let done = stream.finished && stream.in_flight == 0 && stream.outbound.is_empty();
            if done || (stream.broken && stream.in_flight == 0) {
                if done {
                    let _ = conn.conn.send_stream(id).finish();
                }
                conn.streams[index] = None;
                conn.stream_generations[index] = conn.stream_generations[index].wrapping_add(1);
            }
        }
    }

    /// Gives QUIC as much of a stream's outbound bytes as flow control allows.
    fn write_outbound(conn: &mut Conn, index: usize) {
        let Conn { conn: quic, streams, .. } = conn;
        let stream = streams[index].as_mut().expect("exists");
        if stream.outbound.is_empty() {
            return;
        }
        let mut send = quic.send_stream(stream.id);
        while stream.outbound_sent < stream.outbound.len() {
            match send.write(&stream.outbound[stream.outbound_sent..]) {
                Ok(written) => stream.outbound_sent += written,
                Err(WriteError::Blocked) => break,
                Err(WriteError::Stopped(_)) | Err(WriteError::ClosedStream) => {
                    stream.broken = true;
                    stream.outbound.clear();
                    stream.outbound_sent = 0;
                    return;
                }
            }
        }
        if stream.outbound_sent == stream.outbound.len() {
            stream.outbound.clear();
            stream.outbound_sent = 0;
        }
    }

    fn write_stream(&mut self, slot: u16, id: StreamId) {
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        if let Some(index) = Self::stream_index(conn, id) {
            Self::write_outbound(conn, index);
        }
    }

    /// The client reset or stopped a stream: nothing more is read from it or written to it.
    fn break_stream(&mut self, slot: u16, id: StreamId) {
        let conn = self.conns[slot as usize].as_mut().expect("exists");
        if let Some(index) = Self::stream_index(conn, id) {
            let stream = conn.streams[index].as_mut().expect("found");
            stream.broken = true;
            stream.replies.clear();
            stream.outbound.clear();
            stream.outbound_sent = 0;
            stream.inbound.clear();
        }
    }

    fn remove_conn(&mut self, slot: u16) {
        let conn = self.conns[slot as usize].take().expect("exists");
        self.quic_closed.add(&conn.conn.stats().path);
        self.by_handle[conn.handle.0] = u16::MAX;
        self.conn_generations[slot as usize] = self.conn_generations[slot as usize].wrapping_add(1);
        self.conn_free.push(slot);
        self.metrics.connections_closed += 1;
        if conn.role.is_some() {
            info!(remote = %conn.conn.remote_address(), "connection closed");
        }
    }

    fn send_transmit(&mut self, transmit: &quinn_proto::Transmit, buf: &[u8]) {
        let contents = &buf[..transmit.size];
        let udp_transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn.map(|e| quinn_udp::EcnCodepoint::from_bits(e as u8).expect("valid ECN bits")),
            contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        self.metrics.datagrams_out += transmit.segment_size.map_or(1, |s| transmit.size.div_ceil(s)) as u64;
        if let Err(error) = self.udp.send(&udp_transmit) {
            self.metrics.send_errors += 1;
            debug!(%error, destination = %transmit.destination, "UDP send failed");
        }
    }
}

/// True for operations that write the WAL (a shard whose disk failed refuses them).
fn changes_state(op: &ArchivedOp) -> bool {
    !matches!(op, ArchivedOp::QueryStock { .. } | ArchivedOp::QueryHolds { .. } | ArchivedOp::Journal { .. })
}

/// Milliseconds since the Unix epoch: the engine's clock survives restarts, so that a
/// hold's expiry means the same after recovery.
pub(crate) fn wall_clock_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// An owned copy of an archived request, for forwarding to another core.
fn deserialize(request: &ArchivedRequest) -> Request {
    rkyv::deserialize::<Request, rkyv::rancor::Error>(request).expect("a validated archive deserializes")
}

/// What delivering a reply changes in a core, borrowed apart from its shard (see
/// `Core::shard_and_delivery`).
struct Delivery<'a> {
    shard_id: ShardId,
    outgoing: &'a mut [Outgoing],
    splits: &'a mut [Option<SplitQuery>],
    split_generations: &'a mut [u16],
    conns: &'a mut [Option<Conn>],
    dirty: &'a mut Vec<u16>,
}

impl Delivery<'_> {
    /// Merges a part of a split query; answers the client when it is the last.
    fn merge_split(&mut self, addr: ClientAddr, reply: Reply) {
        let index = addr.conn as usize;
        let Some(Some(split)) = self.splits.get_mut(index) else { return };
        if split.generation != addr.conn_gen {
            return;
        }
        match reply.body {
            Body::Stock(levels) if reply.status == Status::Ok => split.levels.extend(levels),
            _ if split.status == Status::Ok => split.status = reply.status,
            _ => {}
        }
        split.parts_left -= 1;
        if split.parts_left > 0 {
            return;
        }
        let split = self.splits[index].take().expect("checked");
        self.split_generations[index] = self.split_generations[index].wrapping_add(1);
        let body = if split.status == Status::Ok { Body::Stock(split.levels) } else { Body::Empty };
        let reply = Reply { client: split.reply_to.pack(), request_id: split.request_id, status: split.status, body };
        self.deliver(reply);
    }

    /// Sends a reply to its stream: here, or through the mesh to the core that holds it.
    fn deliver(&mut self, reply: Reply) {
        let addr = ClientAddr::unpack(reply.client);
        if u32::from(addr.core) != self.shard_id {
            self.outgoing[addr.core as usize].replies.push(reply);
            return;
        }
        if addr.stream == SPLIT_STREAM {
            return self.merge_split(addr, reply);
        }
        let Some(Some(conn)) = self.conns.get_mut(addr.conn as usize) else { return };
        if conn.generation != addr.conn_gen {
            return;
        }
        conn.in_flight = conn.in_flight.saturating_sub(1);
        let Some(Some(stream)) = conn.streams.get_mut(addr.stream as usize) else { return };
        if stream.generation != addr.stream_gen {
            return;
        }
        stream.in_flight = stream.in_flight.saturating_sub(1);
        if !stream.broken {
            stream.replies.push(Response { id: reply.request_id, status: reply.status, body: reply.body });
        }
        mark_dirty(self.conns, self.dirty, addr.conn);
    }
}

/// Queues connection `slot` to be driven, once.
fn mark_dirty(conns: &mut [Option<Conn>], dirty: &mut Vec<u16>, slot: u16) {
    if let Some(conn) = conns[slot as usize].as_mut() {
        if !conn.dirty {
            conn.dirty = true;
            dirty.push(slot);
        }
    }
}
