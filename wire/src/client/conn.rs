//! One pooled connection: a QUIC connection on its own endpoint (its own UDP port, so its
//! own 4-tuple and so, on the server, possibly its own core), one long-lived
//! bidirectional stream, a writer task and a reader task.
//!
//! The writer owns the queue's receiving end and the send half of the stream: it batches
//! calls (see `batch`), gives each request an id unique on the connection, registers the
//! reply channel under that id, encodes one frame into a reused buffer and writes it,
//! never waiting for responses (pipelining). The reader owns the receive half: it reads
//! frames as `docs/wire.md` ("A stream reader") prescribes and hands each response to
//! the reply channel registered under its id.
//!
//! Invariants: an id is registered before its frame is written, so a response always
//! finds its caller; when the connection fails, whichever task sees it first marks it
//! dead, closes it and fails every registered call, and the writer fails every call still
//! queued, so no caller waits on a dead connection beyond its own timeout. A dead
//! connection is never revived: the client opens a new one in its slot.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quinn::{Endpoint, ReadExactError, RecvStream, SendStream, VarInt};
use rkyv::rancor;
use tokio::sync::{mpsc, oneshot};

use super::batch::batch_collect;
use crate::frame::{self, AlignedVec, FrameBuf, Limits, FRAME_ALIGN, HEADER_LEN};
use crate::transport::close;
use crate::{Op, Request, RequestBatch, Response};

/// The capacity a frame buffer starts with: a typical 256-request frame is about 27 KiB.
const FRAME_CAPACITY_BYTES: usize = 64 * 1024;

/// Why a call got no response on this connection.
#[derive(Debug, Clone)]
pub(crate) enum Lost {
    /// The connection or its stream failed; the outcome is unknown, a retry may succeed.
    Connection(Arc<str>),
    /// The request alone encodes to a frame larger than the frame limit.
    TooLarge {
        /// The frame's length with this request alone.
        bytes: usize,
        /// The frame limit.
        max: u32,
    },
}

/// Where a call's answer goes.
pub(crate) type Reply = oneshot::Sender<Result<Response, Lost>>;

/// A call waiting in a connection's queue.
pub(crate) struct Call {
    /// What to ask.
    pub(crate) op: Op,
    /// Where the answer goes.
    pub(crate) reply: Reply,
}

/// What the writer, the reader and the callers share.
struct Shared {
    /// The calls whose frames are written (or being written), by request id.
    pending: Mutex<HashMap<u64, Reply>>,
    /// Set once, when the connection failed or was closed.
    dead: AtomicBool,
    connection: quinn::Connection,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Reply>> {
        // A panic while holding the lock cannot leave the map inconsistent (each
        // operation is one insert or remove), so a poisoned lock is still usable.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the connection dead, closes it and fails every registered call. Only the
    /// first failure is logged: the later ones are its consequences.
    fn fail(&self, code: u32, reason: Arc<str>) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            tracing::warn!(remote = %self.connection.remote_address(), %reason, "connection lost");
        }
        self.connection.close(VarInt::from_u32(code), reason.as_bytes());
        let pending: Vec<Reply> = self.pending().drain().map(|(_, reply)| reply).collect();
        for reply in pending {
            let _ = reply.send(Err(Lost::Connection(reason.clone())));
        }
    }
}

/// A pooled connection, as the client sees it.
pub(crate) struct Conn {
    queue: mpsc::Sender<Call>,
    shared: Arc<Shared>,
    endpoint: Endpoint,
}

/// What a connection needs to open.
pub(crate) struct ConnParams<'a> {
    pub(crate) addr: SocketAddr,
    pub(crate) server_name: &'a str,
    pub(crate) quic: &'a quinn::ClientConfig,
    pub(crate) linger: Duration,
    pub(crate) batch_requests_max: usize,
    pub(crate) queue_depth: usize,
}

impl Conn {
    /// Binds a fresh endpoint on an ephemeral port, connects, opens the stream and
    /// starts the writer and reader tasks. Must run inside a tokio runtime.
    pub(crate) async fn open(params: ConnParams<'_>) -> Result<Conn, String> {
        let bind: SocketAddr = match params.addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut endpoint = Endpoint::client(bind).map_err(|error| format!("bind a UDP socket on {bind}: {error}"))?;
        endpoint.set_default_client_config(params.quic.clone());
        let connecting = endpoint.connect(params.addr, params.server_name).map_err(|error| error.to_string())?;
        let connection = connecting.await.map_err(|error| format!("handshake: {error}"))?;
        let (send, recv) = connection.open_bi().await.map_err(|error| format!("open a stream: {error}"))?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::with_capacity(params.queue_depth)),
            dead: AtomicBool::new(false),
            connection,
        });
        let (queue, calls) = mpsc::channel(params.queue_depth.max(1));
        tokio::spawn(conn_write(calls, send, shared.clone(), params.linger, params.batch_requests_max.max(1)));
        tokio::spawn(conn_read(recv, shared.clone()));
        tracing::debug!(remote = %params.addr, local = ?endpoint.local_addr().ok(), "connection open");
        Ok(Conn { queue, shared, endpoint })
    }

    /// True once the connection failed or was closed; the client then replaces it.
    pub(crate) fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Queues `call`, waiting while the queue is full (backpressure). Gives the call
    /// back when the connection is dead.
    pub(crate) async fn submit(&self, call: Call) -> Result<(), Call> {
        if self.is_dead() {
            return Err(call);
        }
        self.queue.send(call).await.map_err(|error| error.0)
    }

    /// Waits until no call is queued or awaiting its response, or until `deadline`, then
    /// closes the connection with `NORMAL` and waits (bounded) for the close to be sent.
    pub(crate) async fn close(&self, deadline: tokio::time::Instant) {
        while !self.is_dead() && tokio::time::Instant::now() < deadline {
            let queued = self.queue.max_capacity() - self.queue.capacity();
            if queued == 0 && self.shared.pending().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.shared.dead.store(true, Ordering::Release);
        self.shared.connection.close(VarInt::from_u32(close::NORMAL), b"client closing");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// The writer task: batches queued calls into frames until the queue closes (the client
/// dropped the connection) or the connection fails.
async fn conn_write(
    mut calls: mpsc::Receiver<Call>,
    mut send: SendStream,
    shared: Arc<Shared>,
    linger: Duration,
    batch_requests_max: usize,
) {
    let mut writer = Writer {
        shared,
        batch: RequestBatch { requests: Vec::with_capacity(batch_requests_max) },
        replies: Vec::with_capacity(batch_requests_max),
        frame: AlignedVec::with_capacity(FRAME_CAPACITY_BYTES),
        next_id: 0,
    };
    let mut gathered: Vec<Call> = Vec::with_capacity(batch_requests_max);
    let reason: Arc<str> = loop {
        let Some(first) = calls.recv().await else {
            // Every sender is gone: the client is done with this connection. Finishing
            // the stream lets the server answer what is in flight and finish its side.
            let _ = send.finish();
            return;
        };
        if writer.shared.dead.load(Ordering::Acquire) {
            gathered.push(first);
            break "the connection is closed".into();
        }
        batch_collect(&mut calls, first, &mut gathered, linger, batch_requests_max).await;
        for call in gathered.drain(..) {
            let id = writer.next_id;
            writer.next_id += 1;
            writer.batch.requests.push(Request { id, op: call.op });
            writer.replies.push((id, call.reply));
        }
        if let Err(reason) = writer.write(&mut send).await {
            break reason;
        }
    };
    writer.shared.fail(close::NORMAL, reason.clone());
    calls.close();
    let failed = writer.replies.drain(..).map(|(_, reply)| reply).chain(gathered.drain(..).map(|call| call.reply));
    for reply in failed {
        let _ = reply.send(Err(Lost::Connection(reason.clone())));
    }
    while let Ok(call) = calls.try_recv() {
        let _ = call.reply.send(Err(Lost::Connection(reason.clone())));
    }
}

/// The writer's reused state: the batch being built, its reply channels, the frame.
struct Writer {
    shared: Arc<Shared>,
    batch: RequestBatch,
    replies: Vec<(u64, Reply)>,
    frame: AlignedVec<FRAME_ALIGN>,
    next_id: u64,
}

impl Writer {
    /// Encodes the batch and writes it; in the rare case that the frame exceeds the
    /// frame limit, splits the batch until each part fits.
    async fn write(&mut self, send: &mut SendStream) -> Result<(), Arc<str>> {
        frame::encode_requests_into(&mut self.frame, &self.batch);
        if self.frame.len() <= Limits::FRAME_BYTES_MAX_DEFAULT as usize {
            return self.write_frame(send).await;
        }
        self.write_split(send).await
    }

    /// Registers the batch's reply channels, drops its ops and writes the encoded frame.
    async fn write_frame(&mut self, send: &mut SendStream) -> Result<(), Arc<str>> {
        self.shared.pending().extend(self.replies.drain(..));
        self.batch.requests.clear();
        send.write_all(&self.frame).await.map_err(|error| format!("write a request frame: {error}").into())
    }

    /// Sends the batch in parts, halving the part size until each frame fits; a request
    /// that does not fit alone is answered [`Lost::TooLarge`].
    async fn write_split(&mut self, send: &mut SendStream) -> Result<(), Arc<str>> {
        let max = Limits::FRAME_BYTES_MAX_DEFAULT;
        let requests = std::mem::take(&mut self.batch.requests);
        let mut todo: VecDeque<(Request, (u64, Reply))> = requests.into_iter().zip(self.replies.drain(..)).collect();
        let mut part_len = todo.len().div_ceil(2);
        while !todo.is_empty() {
            let n = part_len.min(todo.len());
            for (request, reply) in todo.drain(..n) {
                self.batch.requests.push(request);
                self.replies.push(reply);
            }
            frame::encode_requests_into(&mut self.frame, &self.batch);
            if self.frame.len() <= max as usize {
                self.write_frame(send).await?;
                continue;
            }
            if n > 1 {
                while let (Some(request), Some(reply)) = (self.batch.requests.pop(), self.replies.pop()) {
                    todo.push_front((request, reply));
                }
                part_len = n.div_ceil(2);
                continue;
            }
            let bytes = self.frame.len();
            self.batch.requests.clear();
            for (_, reply) in self.replies.drain(..) {
                let _ = reply.send(Err(Lost::TooLarge { bytes, max }));
            }
        }
        Ok(())
    }
}

/// The reader task: reads response frames and delivers their responses until the stream
/// ends or fails, then fails the connection (which fails whatever is still registered).
async fn conn_read(mut recv: RecvStream, shared: Arc<Shared>) {
    let limits = Limits::default();
    let mut frame = FrameBuf::with_capacity(FRAME_CAPACITY_BYTES);
    let mut replies: Vec<Option<Reply>> = Vec::new();
    let (code, reason): (u32, Arc<str>) = loop {
        match conn_read_frame(&mut recv, &mut frame, &limits).await {
            Ok(true) => {}
            Ok(false) if shared.pending().is_empty() => {
                // A clean end: the client finished its side and every request is answered.
                shared.dead.store(true, Ordering::Release);
                shared.connection.close(VarInt::from_u32(close::NORMAL), b"done");
                return;
            }
            Ok(false) => break (close::NORMAL, "the server finished the stream with requests outstanding".into()),
            Err(ReadFailure::Stream(reason)) => break (close::NORMAL, reason.into()),
            Err(ReadFailure::Frame(error)) => {
                break (close::PROTOCOL_VIOLATION, format!("bad response frame: {error}").into());
            }
        }
        let batch = match frame::decode_responses(frame.as_bytes(), &limits) {
            Ok(batch) => batch,
            Err(error) => break (close::PROTOCOL_VIOLATION, format!("bad response frame: {error}").into()),
        };
        {
            let mut pending = shared.pending();
            replies.extend(batch.responses.iter().map(|response| pending.remove(&response.id.to_native())));
        }
        for (archived, reply) in batch.responses.iter().zip(replies.drain(..)) {
            let Some(reply) = reply else {
                tracing::warn!(id = archived.id.to_native(), "response to no outstanding request");
                continue;
            };
            let response = rkyv::deserialize::<Response, rancor::Error>(archived)
                .map_err(|error| Lost::Connection(format!("deserialize a response: {error}").into()));
            let _ = reply.send(response);
        }
    };
    shared.fail(code, reason);
}

/// Why the reader stopped.
enum ReadFailure {
    /// The stream or the connection failed.
    Stream(String),
    /// The bytes are not a frame this client accepts.
    Frame(frame::FrameError),
}

/// Reads one frame into `frame` (steps 1 to 3 of "A stream reader" in `docs/wire.md`);
/// false when the stream ended cleanly between frames.
async fn conn_read_frame(recv: &mut RecvStream, frame: &mut FrameBuf, limits: &Limits) -> Result<bool, ReadFailure> {
    let mut header_bytes = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header_bytes).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(false),
        Err(ReadExactError::FinishedEarly(len)) => {
            return Err(ReadFailure::Frame(frame::FrameError::TooShort { needed: HEADER_LEN, len }));
        }
        Err(ReadExactError::ReadError(error)) => return Err(ReadFailure::Stream(format!("read a frame: {error}"))),
    }
    let header = frame::header_parse(&header_bytes).map_err(ReadFailure::Frame)?;
    header.check_limits(limits).map_err(ReadFailure::Frame)?;
    frame.clear();
    frame.extend_from_slice(&header_bytes);
    let mut remaining = header.payload_len as usize;
    while remaining > 0 {
        match recv.read_chunk(remaining, true).await {
            Ok(Some(chunk)) => {
                remaining -= chunk.bytes.len();
                frame.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                let needed = header.frame_len();
                return Err(ReadFailure::Frame(frame::FrameError::Truncated { needed, len: frame.len() }));
            }
            Err(error) => return Err(ReadFailure::Stream(format!("read a frame: {error}"))),
        }
    }
    Ok(true)
}
