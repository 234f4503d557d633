//! The checkout services' client: calls to the data plane over QUIC with mutual TLS, on
//! tokio and quinn.
//!
//! # How a call travels
//!
//! A [`Client`] keeps a pool of connections ([`ClientConfig::connections`]), each on its
//! own UDP endpoint, so that each has its own 4-tuple and the data plane's kernel may
//! spread them over its cores. Each connection carries one long-lived bidirectional stream
//! with a writer task and a reader task. A call picks a connection round-robin (skipping
//! dead ones) and joins its queue.
//!
//! **Batching.** The writer takes the first queued call, then every call already queued,
//! then waits up to [`ClientConfig::linger`] (100 µs by default) for more, and stops at
//! [`ClientConfig::batch_requests_max`]. It gives each request an id unique on the
//! connection, encodes the batch as one frame into a reused buffer and writes it without
//! waiting for earlier frames' responses (pipelining). The reader matches each response to
//! its call by id, in whatever order and grouping the data plane answers.
//!
//! **Retries.** A call is retried, up to [`ClientConfig::retries`] times, when the
//! connection fails under it, when it gets no answer within
//! [`ClientConfig::call_timeout`], and when the data plane answers a retryable status
//! ([`Status::is_retryable`]: `Busy`, `RateLimited`, `Unavailable`, `Timeout`). Retries wait
//! [`ClientConfig::retry_backoff`], doubling up to [`ClientConfig::retry_backoff_max`]. A
//! retry resends the same [`Op`] (so the same hold or adjustment id, which makes it
//! idempotent) with a fresh request id, possibly on another connection. A connection that
//! failed is replaced by a new one in its slot, in the background or by the next call
//! that finds no live connection.
//!
//! **Outcomes are values.** Every status the data plane answers, a business refusal such
//! as `InsufficientStock` included, is returned as `Ok(`[`Outcome`]`)`; so is a retryable
//! status that was still answered on the last attempt. [`ClientError`] is for what is not
//! an answer: a transport failure or timeout on every attempt, an open circuit breaker,
//! an unusable configuration, a closed client.
//!
//! **Circuit breaker.** After [`ClientConfig::breaker_failures`] consecutive transport
//! failures or timeouts (5 by default), the breaker opens: calls fail at once with
//! [`ClientError::CircuitOpen`] for [`ClientConfig::breaker_open`] (1 s). Then one call
//! goes through as a probe; its success closes the breaker, its failure opens it again.
//! An answered status, even `Busy`, counts as a success: it proves the transport works.
//!
//! # Costs
//!
//! Per call: one oneshot channel and one copy of the op (the caller keeps the original so
//! that a retry after a timeout can resend it; ops with lines copy their `Vec`); the
//! response is deserialized into an owned [`Response`]. Frame buffers, batch vectors and
//! the id map are reused. A linger under one millisecond is waited by yielding, not with
//! a timer (tokio's timers tick in milliseconds), which costs a little CPU when idle.
//!
//! # Example
//!
//! ```no_run
//! use stockplane_wire::client::{Client, ClientConfig, ClientError};
//! use stockplane_wire::{CartLine, HoldId, Status};
//!
//! # async fn checkout() -> Result<(), ClientError> {
//! let servers = vec!["127.0.0.1:7400".parse().expect("an address")];
//! let config =
//!     ClientConfig::from_pem_files(servers, "target/certs/ca.pem", "target/certs/checkout.pem", "target/certs/checkout.key");
//! let client = Client::connect(config).await?;
//! let hold = HoldId(0x2a);
//! let cart = vec![CartLine { sku: 1001, location: None, qty: 2 }];
//! let outcome = client.reserve(hold, 60_000, cart).await?;
//! match outcome.status {
//!     Status::Reserved => {
//!         client.commit(hold, None).await?;
//!     }
//!     Status::InsufficientStock => println!("out of stock"),
//!     other => println!("not reserved: {other:?}"),
//! }
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! This module must not install process-wide state (no global crypto provider, no global
//! subscriber) and never trusts the bytes it reads: every frame is validated.

mod batch;
mod breaker;
mod conn;
mod tls;
pub use tls::tls_config;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use self::breaker::Breaker;
use self::conn::{Call, Conn, ConnParams, Lost};
use crate::frame::Limits;
use crate::{Body, CartLine, HoldId, HoldsOf, Op, Response, SkuAt, Status};

/// Where the client finds its TLS material: PEM files, or PEM bytes already in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMaterial {
    /// Paths of PEM files, read by [`Client::connect`].
    Files {
        /// The CA certificate that signed the server's certificate: the only root trusted.
        ca: PathBuf,
        /// The client's certificate (chain), which names its role.
        cert: PathBuf,
        /// The client's private key.
        key: PathBuf,
    },
    /// PEM bytes, for tests and for services that fetch their certificates themselves.
    Pem {
        /// The CA certificate: the only root trusted.
        ca: Vec<u8>,
        /// The client's certificate (chain).
        cert: Vec<u8>,
        /// The client's private key.
        key: Vec<u8>,
    },
}

/// How a [`Client`] connects, batches, retries and protects itself.
///
/// Build one with [`ClientConfig::new`] (or its file and PEM shorthands), which fills in
/// the defaults, then change the fields that need changing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The data plane's addresses; connection `i` prefers `servers[i % len]` and moves on
    /// to the next address when it cannot connect.
    pub servers: Vec<SocketAddr>,
    /// The name the server's certificate must carry (default `localhost`).
    pub server_name: String,
    /// The CA to trust and the client's certificate and key.
    pub tls: TlsMaterial,
    /// Connections in the pool (default 2); more connections let the data plane use more
    /// of its cores for this client.
    pub connections: usize,
    /// How long a batch waits for more calls once its first call is there (default
    /// 100 µs); zero sends whatever is queued at once.
    pub linger: Duration,
    /// The most requests in one frame (default 256, at most
    /// [`Limits::REQUESTS_PER_FRAME_MAX_DEFAULT`]).
    pub batch_requests_max: usize,
    /// How long one attempt may wait for its answer (default 1 s), reconnection included.
    pub call_timeout: Duration,
    /// How long a handshake with one server address may take before the next address is
    /// tried (default 2 s).
    pub connect_timeout: Duration,
    /// How many times a call is retried after the first attempt (default 3).
    pub retries: u32,
    /// The wait before the first retry (default 10 ms); each further retry doubles it.
    pub retry_backoff: Duration,
    /// The longest wait between retries (default 200 ms).
    pub retry_backoff_max: Duration,
    /// Consecutive transport failures or timeouts that open the breaker (default 5).
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before it lets a probe through (default 1 s).
    pub breaker_open: Duration,
}

impl ClientConfig {
    /// A configuration with every default, for these servers and TLS material.
    pub fn new(servers: Vec<SocketAddr>, tls: TlsMaterial) -> ClientConfig {
        ClientConfig {
            servers,
            server_name: "localhost".to_string(),
            tls,
            connections: 2,
            linger: Duration::from_micros(100),
            batch_requests_max: 256,
            call_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            retries: 3,
            retry_backoff: Duration::from_millis(10),
            retry_backoff_max: Duration::from_millis(200),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(1),
        }
    }

    /// A default configuration that reads the CA certificate, the client certificate and
    /// the client key from PEM files when connecting.
    pub fn from_pem_files(
        servers: Vec<SocketAddr>,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> ClientConfig {
        ClientConfig::new(servers, TlsMaterial::Files { ca: ca.into(), cert: cert.into(), key: key.into() })
    }

    /// A default configuration with the TLS material as PEM bytes in memory.
    pub fn from_pem(servers: Vec<SocketAddr>, ca: Vec<u8>, cert: Vec<u8>, key: Vec<u8>) -> ClientConfig {
        ClientConfig::new(servers, TlsMaterial::Pem { ca, cert, key })
    }

    /// Refuses values that cannot work, before anything is opened.
    fn check(&self) -> Result<(), ClientError> {
        let refuse = |message: String| Err(ClientError::Config(message));
        if self.servers.is_empty() {
            return refuse("no server address".into());
        }
        if self.connections == 0 {
            return refuse("a pool of zero connections".into());
        }
        let batch_max = Limits::REQUESTS_PER_FRAME_MAX_DEFAULT as usize;
        if self.batch_requests_max == 0 || self.batch_requests_max > batch_max {
            return refuse(format!("batch_requests_max {} is not in 1..={batch_max}", self.batch_requests_max));
        }
        if self.call_timeout.is_zero() || self.connect_timeout.is_zero() {
            return refuse("a call or connect timeout of zero".into());
        }
        Ok(())
    }

    /// The rustls configuration from the TLS material, reading files if need be.
    fn tls_config(&self) -> Result<rustls::ClientConfig, ClientError> {
        match &self.tls {
            TlsMaterial::Pem { ca, cert, key } => tls::tls_config(ca, cert, key),
            TlsMaterial::Files { ca, cert, key } => {
                let read = |path: &Path| {
                    std::fs::read(path).map_err(|source| ClientError::ReadPem { path: path.to_path_buf(), source })
                };
                tls::tls_config(&read(ca)?, &read(cert)?, &read(key)?)
            }
        }
    }
}

/// Why a call, or connecting, failed. Business outcomes are never errors: they are the
/// [`Outcome`]'s status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work (no server, an empty pool, a batch over the limit).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// A PEM file of the TLS material could not be read.
    #[error("read {}: {source}", path.display())]
    ReadPem {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The TLS material is unusable (no certificate, a key that does not match, ...).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A connection of the pool could not be established with any server address.
    #[error("connect to the data plane: {0}")]
    Connect(String),
    /// The transport failed on every attempt; the call's outcome is unknown.
    #[error("transport failed after {attempts} attempts: {last}")]
    Transport {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: String,
    },
    /// No answer came within the call timeout on the last attempt; the outcome is unknown.
    #[error("no answer within {timeout:?} after {attempts} attempts")]
    Timeout {
        /// Attempts made.
        attempts: u32,
        /// The per-attempt timeout.
        timeout: Duration,
    },
    /// The circuit breaker is open after repeated transport failures: the call was not sent.
    #[error("circuit breaker open: the data plane failed repeatedly, call not sent")]
    CircuitOpen,
    /// The request alone is larger than a frame may be; it can never be sent.
    #[error("request encodes to a {bytes}-byte frame, over the limit of {max}")]
    RequestTooLarge {
        /// The frame's length with this request alone.
        bytes: usize,
        /// The frame limit in bytes.
        max: u32,
    },
    /// The client was closed with [`Client::close`].
    #[error("the client is closed")]
    Closed,
}

/// What the data plane answered: a status (success, business refusal, or a retryable
/// refusal that outlived the retries) and the data that comes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The outcome of the request.
    pub status: Status,
    /// The data, for operations that return data ([`Body::Empty`] otherwise).
    pub body: Body,
}

/// A pooled, batching, retrying connection to the data plane. Cheap to clone: clones
/// share the pool, the queues and the circuit breaker.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.inner.config.servers)
            .field("connections", &self.inner.slots.len())
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// What every clone of a [`Client`] shares.
struct Inner {
    config: ClientConfig,
    quic: quinn::ClientConfig,
    slots: Box<[Slot]>,
    next_slot: AtomicUsize,
    breaker: Mutex<Breaker>,
    closed: AtomicBool,
}

/// One place in the pool: its live connection, if any, and the lock that lets one task
/// at a time replace it.
struct Slot {
    current: Mutex<Option<Arc<Conn>>>,
    reconnect: tokio::sync::Mutex<()>,
    /// Connections opened in this slot so far; rotates the preferred server address.
    opened: AtomicUsize,
}

impl Slot {
    fn current(&self) -> MutexGuard<'_, Option<Arc<Conn>>> {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The slot's connection, if it is live.
    fn live(&self) -> Option<Arc<Conn>> {
        self.current().as_ref().filter(|conn| !conn.is_dead()).cloned()
    }
}

/// Why one attempt got no status.
enum AttemptFailure {
    /// The connection failed, or could not be opened.
    Transport(String),
    /// No answer within the call timeout.
    Timeout,
    /// The request can never be sent.
    TooLarge { bytes: usize, max: u32 },
    /// The client was closed.
    Closed,
}

/// What one attempt of one call came to (see `Client::call_verdict`).
struct Verdict {
    /// The call's answer, or `None` to try it again.
    answer: Option<Result<Outcome, ClientError>>,
    /// The data plane answered it.
    answered: bool,
    /// The transport failed or timed out.
    failed: bool,
}

/// The attempt's result from what its reply channel delivered.
fn call_answer(
    delivered: Result<Result<Response, Lost>, oneshot::error::RecvError>,
) -> Result<Response, AttemptFailure> {
    match delivered {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(Lost::Connection(reason))) => Err(AttemptFailure::Transport(reason.to_string())),
        Ok(Err(Lost::TooLarge { bytes, max })) => Err(AttemptFailure::TooLarge { bytes, max }),
        Err(_) => Err(AttemptFailure::Transport("the connection dropped the call".into())),
    }
}

impl Client {
    /// Checks the configuration, builds TLS, and opens every connection of the pool.
    ///
    /// Fails if any connection cannot be established with any of the server addresses:
    /// a client that starts half-connected would hide a wrong address or certificate.
    /// Must be called inside a tokio runtime (the connections' tasks run on it).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        config.check()?;
        let quic = tls::tls_quic_config(config.tls_config()?)?;
        let slots = (0..config.connections)
            .map(|_| Slot {
                current: Mutex::new(None),
                reconnect: tokio::sync::Mutex::new(()),
                opened: AtomicUsize::new(0),
            })
            .collect();
        let breaker = Breaker::new(config.breaker_failures, config.breaker_open);
        let inner = Arc::new(Inner {
            config,
            quic,
            slots,
            next_slot: AtomicUsize::new(0),
            breaker: Mutex::new(breaker),
            closed: AtomicBool::new(false),
        });
        for index in 0..inner.slots.len() {
            inner.slot_reconnect(index).await.map_err(ClientError::Connect)?;
        }
        Ok(Client { inner })
    }

    /// Sends `op` and returns the data plane's answer, batching it with concurrent calls
    /// and retrying as the module documentation describes.
    pub async fn call(&self, op: Op) -> Result<Outcome, ClientError> {
        let mut backoff = self.inner.config.retry_backoff;
        let mut attempts = 0;
        loop {
            if let Some(refusal) = self.call_refusal() {
                return Err(refusal());
            }
            attempts += 1;
            let result = self.call_attempt(op.clone()).await;
            let verdict = self.call_verdict(result, attempts);
            self.call_record(verdict.answered, verdict.failed);
            if let Some(answer) = verdict.answer {
                return answer;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.inner.config.retry_backoff_max);
        }
    }

    /// Sends every op of `ops` and returns their answers in the same order, each retried
    /// as [`Client::call`] retries. For bulk work (the control plane pushing a catalog):
    /// the calls go into frames without a task, a timer and a breaker check each, so a
    /// large batch costs far less of the caller's CPU than as many concurrent `call`s.
    /// One attempt of the whole batch counts once for the circuit breaker: a success if
    /// any call was answered, a failure otherwise.
    pub async fn call_many(&self, ops: Vec<Op>) -> Vec<Result<Outcome, ClientError>> {
        let mut answers: Vec<Option<Result<Outcome, ClientError>>> = (0..ops.len()).map(|_| None).collect();
        let mut todo: Vec<usize> = (0..ops.len()).collect();
        let mut backoff = self.inner.config.retry_backoff;
        let mut attempts = 0;
        while !todo.is_empty() {
            if let Some(refusal) = self.call_refusal() {
                for &index in &todo {
                    answers[index] = Some(Err(refusal()));
                }
                break;
            }
            attempts += 1;
            let attempt = self.call_many_attempt(&ops, &todo).await;
            let (mut answered, mut failed, mut again) = (false, false, Vec::new());
            for (&index, result) in todo.iter().zip(attempt) {
                let verdict = self.call_verdict(result, attempts);
                answered |= verdict.answered;
                failed |= verdict.failed;
                match verdict.answer {
                    Some(answer) => answers[index] = Some(answer),
                    None => again.push(index),
                }
            }
            self.call_record(answered, failed);
            todo = again;
            if !todo.is_empty() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.inner.config.retry_backoff_max);
            }
        }
        answers.into_iter().map(|answer| answer.expect("every call is answered or refused")).collect()
    }

    /// Why no call may be sent now (the client is closed, or the breaker is open), as
    /// the error to answer with; asks the breaker once, which may admit a probe.
    fn call_refusal(&self) -> Option<fn() -> ClientError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Some(|| ClientError::Closed)
        } else if !self.inner.breaker().admit(Instant::now()) {
            Some(|| ClientError::CircuitOpen)
        } else {
            None
        }
    }

    /// What attempt number `attempts` of one call came to: its answer, or `None` when it
    /// is to be tried again (a retryable status or a transport failure with attempts
    /// left).
    fn call_verdict(&self, result: Result<Response, AttemptFailure>, attempts: u32) -> Verdict {
        let config = &self.inner.config;
        let last = attempts > config.retries;
        let (answer, answered, failed) = match result {
            Ok(response) if response.status.is_retryable() && !last => {
                tracing::debug!(status = ?response.status, attempts, "retrying a refused call");
                (None, true, false)
            }
            Ok(response) => (Some(Ok(Outcome { status: response.status, body: response.body })), true, false),
            Err(AttemptFailure::TooLarge { bytes, max }) => {
                (Some(Err(ClientError::RequestTooLarge { bytes, max })), false, false)
            }
            Err(AttemptFailure::Closed) => (Some(Err(ClientError::Closed)), false, false),
            Err(_) if !last => (None, false, true),
            Err(AttemptFailure::Timeout) => {
                (Some(Err(ClientError::Timeout { attempts, timeout: config.call_timeout })), false, true)
            }
            Err(AttemptFailure::Transport(last)) => (Some(Err(ClientError::Transport { attempts, last })), false, true),
        };
        Verdict { answer, answered, failed }
    }

    /// Tells the breaker how an attempt went: a success if anything was answered, a
    /// failure if nothing was and the transport failed.
    fn call_record(&self, answered: bool, failed: bool) {
        if answered {
            self.inner.breaker().record_success();
        } else if failed {
            self.inner.breaker().record_failure(Instant::now());
        }
    }

    /// One attempt of one call: pick a connection, queue the call, wait for its answer,
    /// all within the call timeout.
    async fn call_attempt(&self, op: Op) -> Result<Response, AttemptFailure> {
        let attempt = async {
            let conn = self.inner.conn_pick().await.map_err(AttemptFailure::Transport)?;
            let (reply, answer) = oneshot::channel();
            if conn.submit(Call { op, reply }).await.is_err() {
                return Err(AttemptFailure::Transport("the connection closed".into()));
            }
            call_answer(answer.await)
        };
        match tokio::time::timeout(self.inner.config.call_timeout, attempt).await {
            Ok(Err(AttemptFailure::Transport(_))) if self.inner.closed.load(Ordering::Acquire) => {
                Err(AttemptFailure::Closed)
            }
            Ok(result) => result,
            Err(_) => Err(AttemptFailure::Timeout),
        }
    }

    /// One attempt of the calls `todo` (indexes into `ops`): queue them on the pool's
    /// connections in frame-sized runs, then wait for their answers, all within one call
    /// timeout. Returns one result per index of `todo`, in its order.
    async fn call_many_attempt(&self, ops: &[Op], todo: &[usize]) -> Vec<Result<Response, AttemptFailure>> {
        let deadline = tokio::time::Instant::now() + self.inner.config.call_timeout;
        let mut waiting: Vec<Result<oneshot::Receiver<Result<Response, Lost>>, AttemptFailure>> =
            Vec::with_capacity(todo.len());
        let queue = async {
            for run in todo.chunks(self.inner.config.batch_requests_max.max(1)) {
                let conn = match self.inner.conn_pick().await {
                    Ok(conn) => conn,
                    Err(reason) => {
                        waiting.extend(run.iter().map(|_| Err(AttemptFailure::Transport(reason.clone()))));
                        continue;
                    }
                };
                for &index in run {
                    let (reply, answer) = oneshot::channel();
                    waiting.push(match conn.submit(Call { op: ops[index].clone(), reply }).await {
                        Ok(()) => Ok(answer),
                        Err(_) => Err(AttemptFailure::Transport("the connection closed".into())),
                    });
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, queue).await;
        let mut results = Vec::with_capacity(todo.len());
        let collect = async {
            for waited in waiting.drain(..) {
                results.push(match waited {
                    Err(failure) => Err(failure),
                    Ok(answer) => call_answer(answer.await),
                });
            }
        };
        let _ = tokio::time::timeout_at(deadline, collect).await;
        // Whatever was not queued or answered by the deadline timed out.
        results.resize_with(todo.len(), || Err(AttemptFailure::Timeout));
        let closed = self.inner.closed.load(Ordering::Acquire);
        for result in &mut results {
            if closed && matches!(result, Err(AttemptFailure::Transport(_))) {
                *result = Err(AttemptFailure::Closed);
            }
        }
        results
    }

    /// Holds every line of a cart until `ttl_ms` from now, all or nothing (`Reserved`
    /// with the hold, or a refusal such as `InsufficientStock`). Repeating it with the
    /// same `hold` returns the first answer.
    pub async fn reserve(&self, hold: HoldId, ttl_ms: u32, lines: Vec<CartLine>) -> Result<Outcome, ClientError> {
        self.call(Op::Reserve { hold, ttl_ms, lines }).await
    }

    /// Sells the held lines: all of them (`lines: None`), or the named ones, releasing
    /// the rest.
    pub async fn commit(&self, hold: HoldId, lines: Option<Vec<SkuAt>>) -> Result<Outcome, ClientError> {
        self.call(Op::Commit { hold, lines }).await
    }

    /// Gives the held stock back.
    pub async fn release(&self, hold: HoldId) -> Result<Outcome, ClientError> {
        self.call(Op::Release { hold }).await
    }

    /// Moves the hold's expiry to `ttl_ms` from now.
    pub async fn extend(&self, hold: HoldId, ttl_ms: u32) -> Result<Outcome, ClientError> {
        self.call(Op::Extend { hold, ttl_ms }).await
    }

    /// Reads the stock of the named SKUs (at a location, or at all of theirs).
    pub async fn query_stock(&self, items: Vec<SkuAt>) -> Result<Outcome, ClientError> {
        self.call(Op::QueryStock { items }).await
    }

    /// Reads open holds of a SKU, or one cart's hold.
    pub async fn query_holds(&self, of: HoldsOf) -> Result<Outcome, ClientError> {
        self.call(Op::QueryHolds { of }).await
    }

    /// Control role only: creates a SKU at a location, or changes its backorder limit.
    pub async fn upsert_sku(&self, sku: u64, location: u32, backorder_limit: u32) -> Result<Outcome, ClientError> {
        self.call(Op::UpsertSku { sku, location, backorder_limit }).await
    }

    /// Control role only: adds `delta` units to `on_hand` (negative removes), once per
    /// `adjustment` id however often it is retried.
    pub async fn adjust(&self, adjustment: u128, sku: u64, location: u32, delta: i64) -> Result<Outcome, ClientError> {
        self.call(Op::Adjust { adjustment, sku, location, delta }).await
    }

    /// Control role only: reads up to `max_entries` committed changes of `shard`'s
    /// journal from position `from`.
    pub async fn journal(&self, shard: u32, from: u64, max_entries: u32) -> Result<Outcome, ClientError> {
        self.call(Op::Journal { shard, from, max_entries }).await
    }

    /// Shuts the client down: new calls fail with [`ClientError::Closed`], calls in
    /// flight get up to one call timeout to be answered, then every connection is
    /// closed with `transport::close::NORMAL`. Every clone of the client is closed.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + self.inner.config.call_timeout;
        for slot in self.inner.slots.iter() {
            let _reconnecting = slot.reconnect.lock().await;
            let conn = slot.current().take();
            if let Some(conn) = conn {
                conn.close(deadline).await;
            }
        }
    }
}

impl Inner {
    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next live connection round-robin. A dead one on the way is replaced in the
    /// background; when none is live, the call reconnects its slot itself.
    async fn conn_pick(self: &Arc<Inner>) -> Result<Arc<Conn>, String> {
        let slots = self.slots.len();
        let start = self.next_slot.fetch_add(1, Ordering::Relaxed) % slots;
        for step in 0..slots {
            let index = (start + step) % slots;
            if let Some(conn) = self.slots[index].live() {
                return Ok(conn);
            }
            let inner = self.clone();
            if self.slots[index].reconnect.try_lock().is_ok() && !self.closed.load(Ordering::Acquire) {
                tokio::spawn(async move {
                    if let Err(reason) = inner.slot_reconnect(index).await {
                        tracing::warn!(slot = index, %reason, "reconnect failed");
                    }
                });
            }
        }
        self.slot_reconnect(start).await
    }

    /// Opens a new connection in slot `index` unless another task already did, trying
    /// each server address in turn, starting from the slot's next preferred one.
    async fn slot_reconnect(&self, index: usize) -> Result<Arc<Conn>, String> {
        let slot = &self.slots[index];
        let _reconnecting = slot.reconnect.lock().await;
        if let Some(conn) = slot.live() {
            return Ok(conn);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err("the client is closed".into());
        }
        let servers = &self.config.servers;
        let first = index + slot.opened.fetch_add(1, Ordering::Relaxed);
        let mut failures = Vec::new();
        for step in 0..servers.len() {
            let addr = servers[(first + step) % servers.len()];
            let params = ConnParams {
                addr,
                server_name: &self.config.server_name,
                quic: &self.quic,
                linger: self.config.linger,
                batch_requests_max: self.config.batch_requests_max,
                queue_depth: self.config.batch_requests_max * 4,
            };
            match tokio::time::timeout(self.config.connect_timeout, Conn::open(params))
                .await
                .unwrap_or_else(|_| Err(format!("no handshake within {:?}", self.config.connect_timeout)))
            {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    *slot.current() = Some(conn.clone());
                    return Ok(conn);
                }
                Err(reason) => failures.push(format!("{addr}: {reason}")),
            }
        }
        Err(failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClientConfig {
        let pems = tls::tests::test_pems("checkout");
        ClientConfig::from_pem(vec!["127.0.0.1:7400".parse().expect("address")], pems.ca, pems.cert, pems.key)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = config();
        assert_eq!(config.server_name, "localhost");
        assert_eq!(config.connections, 2);
        assert_eq!(config.linger, Duration::from_micros(100));
        assert_eq!(config.batch_requests_max, 256);
        assert_eq!(config.call_timeout, Duration::from_secs(1));
        assert_eq!(config.retries, 3);
        assert_eq!(config.breaker_failures, 5);
        assert_eq!(config.breaker_open, Duration::from_secs(1));
        config.check().expect("the defaults are valid");
        config.tls_config().expect("TLS from PEM bytes");
    }

    #[test]
    fn refuses_configurations_that_cannot_work() {
        let refused = |edit: fn(&mut ClientConfig)| {
            let mut config = config();
            edit(&mut config);
            matches!(config.check(), Err(ClientError::Config(_)))
        };
        assert!(refused(|config| config.servers.clear()));
        assert!(refused(|config| config.connections = 0));
        assert!(refused(|config| config.batch_requests_max = 0));
        assert!(refused(|config| config.batch_requests_max = Limits::REQUESTS_PER_FRAME_MAX_DEFAULT as usize + 1));
        assert!(refused(|config| config.call_timeout = Duration::ZERO));
        assert!(refused(|config| config.connect_timeout = Duration::ZERO));
    }

    #[test]
    fn a_missing_pem_file_is_named() {
        let config = ClientConfig::from_pem_files(
            vec!["127.0.0.1:1".parse().expect("address")],
            "/nonexistent/ca.pem",
            "c",
            "k",
        );
        match config.tls_config() {
            Err(ClientError::ReadPem { path, .. }) => assert_eq!(path, PathBuf::from("/nonexistent/ca.pem")),
            other => panic!("expected ReadPem, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn connect_gives_up_on_a_silent_address_within_the_connect_timeout() {
        // A bound UDP socket that never answers: the handshake cannot complete.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut config = config();
        config.servers = vec![silent.local_addr().expect("address")];
        config.connections = 1;
        config.connect_timeout = Duration::from_millis(200);
        let started = Instant::now();
        match Client::connect(config).await {
            Err(ClientError::Connect(reason)) => assert!(reason.contains("no handshake within"), "{reason}"),
            other => panic!("expected a connect error, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
