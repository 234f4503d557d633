//! The admin endpoint: Prometheus metrics, `/healthz` and `/readyz` over plain HTTP/1.1.
//!
//! It runs on one std thread of its own, off every core's hot path, and answers one
//! connection at a time: a scrape or a probe is small and rare, and a slow client can hold
//! it for at most [`REQUEST_TIMEOUT`]. A request's head is bounded ([`REQUEST_HEAD_BYTES_MAX`]);
//! every answer closes the connection; bad input gets a 4xx, never a panic.
//!
//! The same thread runs the Prometheus recorder's upkeep every [`UPKEEP_INTERVAL`], so that
//! histogram samples are folded into their buckets even when nobody scrapes (without the
//! exporter's `http-listener` feature nothing else would, and the samples would pile up).
//!
//! This is a hand-written server on purpose: the exporter's own listener needs tokio and
//! hyper, and three fixed paths do not justify either.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The most bytes read of a request's line and headers; a longer head is refused with 431.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// How long a client has to send its request's head, from the moment it is accepted.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the recorder's upkeep runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How long `accept` waits before the thread looks at its stop flag and the upkeep clock;
/// it bounds how long stopping takes.
const ACCEPT_TICK: Duration = Duration::from_millis(100);
/// How long the server reads and discards what a client sent beyond the request's head
/// (a body it will not use), so that closing does not reset the connection under its answer.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(100);

/// Histogram buckets, in seconds, for every metric whose name ends in `_seconds`: from
/// 10 µs to 100 ms, three per decade (1, 2.5, 5), then 250 ms and 1 s for the outliers.
pub const LATENCY_BUCKETS_SECONDS: [f64; 15] = [
    0.000_010, 0.000_025, 0.000_050, 0.000_100, 0.000_250, 0.000_500, 0.001, 0.002_5, 0.005, 0.010, 0.025, 0.050,
    0.100, 0.250, 1.0,
];

/// Installs the Prometheus recorder as the process's global `metrics` recorder and returns
/// the handle that renders it.
///
/// A process can install a global recorder only once; every later call returns the handle
/// of the first (or its error), so that tests may start several servers in one process.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    static INSTALLED: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        let install = || -> anyhow::Result<PrometheusHandle> {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS_SECONDS)
                .context("set the latency buckets")?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|_| anyhow::anyhow!("another metrics recorder is already installed"))?;
            Ok(handle)
        };
        install().map_err(|error| format!("{error:#}"))
    });
    installed.clone().map_err(|error| anyhow::anyhow!(error)).context("install the Prometheus recorder")
}

/// Whether the process is ready to serve, and if not, why: what `/readyz` answers.
///
/// A process starts not ready ("starting"); the server marks it ready once every core
/// serves, and not ready again when it drains or loses its disk.
#[derive(Debug)]
pub struct Health {
    /// Whether `/readyz` answers 200.
    ready: AtomicBool,
    /// Why the process is not ready; meaningless while it is.
    reason: Mutex<String>,
}

impl Default for Health {
    fn default() -> Health {
        Health::new()
    }
}

impl Health {
    /// A health that is not ready, because the process is starting.
    pub fn new() -> Health {
        Health { ready: AtomicBool::new(false), reason: Mutex::new("starting".to_owned()) }
    }

    /// Marks the process ready: `/readyz` answers 200.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Marks the process not ready: `/readyz` answers 503 with `reason`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = reason.into();
        self.ready.store(false, Ordering::Release);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Why the process is not ready (the last reason given, even if it is ready since).
    pub fn reason(&self) -> String {
        self.reason.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The running admin endpoint. Dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct Admin {
    /// The address the listener is bound to (the real port when asked for port 0).
    local_addr: SocketAddr,
    /// Set to ask the thread to stop.
    stop: Arc<AtomicBool>,
    /// The thread; `None` once joined.
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `addr` (port 0 picks a free port) and serves metrics from `handle` and the
    /// probes from `health` on a new thread named `admin`.
    pub fn start(addr: SocketAddr, handle: PrometheusHandle, health: Arc<Health>) -> io::Result<Admin> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        // On Linux, a receive timeout on a listening socket bounds `accept` too (socket(7)),
        // which lets one thread both serve and wake up for its stop flag and the upkeep.
        socket2::SockRef::from(&listener).set_read_timeout(Some(ACCEPT_TICK))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("admin".to_owned()).spawn({
            let stop = stop.clone();
            move || admin_loop(&listener, &handle, &health, &stop)
        })?;
        Ok(Admin { local_addr, stop, thread: Some(thread) })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the endpoint and waits for its thread (at most about [`REQUEST_TIMEOUT`], if
    /// it is serving a slow client).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Asks the thread to stop and joins it; does nothing the second time.
    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the admin thread panicked");
            }
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The admin thread: accepts and answers connections one at a time, and runs the upkeep.
fn admin_loop(listener: &TcpListener, handle: &PrometheusHandle, health: &Health, stop: &AtomicBool) {
    let mut upkeep_at = Instant::now() + UPKEEP_INTERVAL;
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(error) = admin_serve(stream, handle, health) {
                    tracing::debug!(%peer, %error, "admin connection failed");
                }
            }
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(error) => {
                // Out of file descriptors, say: back off rather than spin.
                tracing::warn!(%error, "admin accept failed");
                std::thread::sleep(ACCEPT_TICK);
            }
        }
        if Instant::now() >= upkeep_at {
            handle.run_upkeep();
            upkeep_at = Instant::now() + UPKEEP_INTERVAL;
        }
    }
}

/// Reads one request's head from `stream`, answers it, and closes the connection.
fn admin_serve(mut stream: TcpStream, handle: &PrometheusHandle, health: &Health) -> io::Result<()> {
    // An accepted socket does not inherit the listener's timeout in every case; set both.
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let answer = match admin_read_head(&mut stream, deadline) {
        Ok(head) => admin_route(&head, handle, health),
        Err(HeadError::TooLarge) => Answer::text(431, "Request Header Fields Too Large", "request head too large\n"),
        Err(HeadError::TimedOut) => Answer::text(408, "Request Timeout", "request timed out\n"),
        Err(HeadError::Closed) => return Ok(()),
        Err(HeadError::Io(error)) => return Err(error),
    };
    answer.write_to(&mut stream)?;
    stream.shutdown(Shutdown::Write)?;
    admin_drain(&mut stream);
    Ok(())
}

/// Why no request head could be read.
#[derive(Debug)]
enum HeadError {
    /// The head is longer than [`REQUEST_HEAD_BYTES_MAX`].
    TooLarge,
    /// The client did not send a whole head within [`REQUEST_TIMEOUT`].
    TimedOut,
    /// The client closed the connection before sending a whole head.
    Closed,
    /// Reading failed otherwise.
    Io(io::Error),
}

/// Reads up to the blank line that ends a request's head, within `deadline` and
/// [`REQUEST_HEAD_BYTES_MAX`] bytes. Returns the head without that blank line.
fn admin_read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head.windows(4).position(|window| window == b"\r\n\r\n") {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() >= REQUEST_HEAD_BYTES_MAX {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(HeadError::Io)?;
        let want = chunk.len().min(REQUEST_HEAD_BYTES_MAX + 4 - head.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(read) => head.extend_from_slice(&chunk[..read]),
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(HeadError::TimedOut)
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(HeadError::Io(error)),
        }
    }
}

/// Reads and discards what the client still sends, briefly, before the socket is closed.
fn admin_drain(stream: &mut TcpStream) {
    if stream.set_read_timeout(Some(DRAIN_TIMEOUT)).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(read) => left -= read.min(left),
        }
    }
}

/// The answer to a request head: only its request line matters.
fn admin_route(head: &[u8], handle: &PrometheusHandle, health: &Health) -> Answer {
    let line_end = head.iter().position(|&byte| byte == b'\r').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Answer::bad_request();
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Answer::bad_request();
    };
    let token = |text: &str| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_alphabetic());
    if !token(method) || !target.starts_with('/') || !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Answer::bad_request();
    }
    if method != "GET" {
        let mut answer = Answer::text(405, "Method Not Allowed", "only GET\n");
        answer.allow_get = true;
        return answer;
    }
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Answer {
            status: 200,
            reason: "OK",
            content_type: "text/plain; version=0.0.4",
            body: handle.render(),
            allow_get: false,
        },
        "/healthz" => Answer::text(200, "OK", "ok\n"),
        "/readyz" if health.is_ready() => Answer::text(200, "OK", "ready\n"),
        "/readyz" => Answer::text(503, "Service Unavailable", &format!("{}\n", health.reason())),
        _ => Answer::text(404, "Not Found", "not found\n"),
    }
}

/// An HTTP answer; every one closes the connection.
struct Answer {
    /// The status code.
    status: u16,
    /// The status line's reason phrase.
    reason: &'static str,
    /// The body's content type.
    content_type: &'static str,
    /// The body.
    body: String,
    /// Whether to send `Allow: GET` (with 405).
    allow_get: bool,
}

impl Answer {
    /// A plain-text answer.
    fn text(status: u16, reason: &'static str, body: &str) -> Answer {
        Answer { status, reason, content_type: "text/plain; charset=utf-8", body: body.to_owned(), allow_get: false }
    }

    /// The answer to a request line that is not HTTP/1.x.
    fn bad_request() -> Answer {
        Answer::text(400, "Bad Request", "bad request\n")
    }

    /// Writes the status line, the headers and the body.
    fn write_to(&self, stream: &mut TcpStream) -> io::Result<()> {
        let allow = if self.allow_get { "Allow: GET\r\n" } else { "" };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(self.body.as_bytes())?;
        stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `request` as is and returns the whole answer (the server closes after it).
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    /// A GET of `path`.
    fn get(addr: SocketAddr, path: &str) -> String {
        exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
    }

    /// The status code of an answer.
    fn status(answer: &str) -> u16 {
        answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("{answer:?}"))
    }

    /// The body of an answer.
    fn body(answer: &str) -> &str {
        answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_else(|| panic!("{answer:?}"))
    }

    fn start() -> (Admin, Arc<Health>) {
        let handle = install_recorder().unwrap();
        let health = Arc::new(Health::new());
        let admin = Admin::start("127.0.0.1:0".parse().unwrap(), handle, health.clone()).unwrap();
        (admin, health)
    }

    #[test]
    fn probes_answer_health_and_readiness() {
        let (admin, health) = start();
        let addr = admin.local_addr();
        let answer = get(addr, "/healthz");
        assert_eq!((status(&answer), body(&answer)), (200, "ok\n"));
        assert!(answer.contains("Connection: close\r\n"), "{answer:?}");
        let answer = get(addr, "/readyz");
        assert_eq!((status(&answer), body(&answer)), (503, "starting\n"));
        health.set_ready();
        let answer = get(addr, "/readyz");
        assert_eq!((status(&answer), body(&answer)), (200, "ready\n"));
        health.set_not_ready("draining");
        let answer = get(addr, "/readyz?verbose=1");
        assert_eq!((status(&answer), body(&answer)), (503, "draining\n"));
        admin.stop();
    }

    #[test]
    fn metrics_render_the_global_recorder() {
        let (admin, _health) = start();
        metrics::counter!("stockplane_test_total").increment(1);
        metrics::histogram!("stockplane_test_latency_seconds").record(0.000_3);
        let answer = get(admin.local_addr(), "/metrics");
        assert_eq!(status(&answer), 200);
        assert!(answer.contains("Content-Type: text/plain; version=0.0.4\r\n"), "{answer:?}");
        assert!(body(&answer).contains("stockplane_test_total 1"), "{answer:?}");
        assert!(body(&answer).contains("stockplane_test_latency_seconds_bucket{le=\"0.0005\"} 1"), "{answer:?}");
        // A second installation returns the same recorder's handle.
        assert!(install_recorder().unwrap().render().contains("stockplane_test_total"));
    }

    #[test]
    fn bad_requests_get_4xx_and_the_server_goes_on() {
        let (admin, _health) = start();
        let addr = admin.local_addr();
        assert_eq!(status(&get(addr, "/nowhere")), 404);
        let answer = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(status(&answer), 405);
        assert!(answer.contains("Allow: GET\r\n"), "{answer:?}");
        assert_eq!(status(&exchange(addr, b"\x00\xffgarbage\r\n\r\n")), 400);
        assert_eq!(status(&exchange(addr, b"GET /healthz\r\n\r\n")), 400);
        assert_eq!(status(&exchange(addr, b"GET healthz HTTP/1.1\r\n\r\n")), 400);
        let long = format!("GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(REQUEST_HEAD_BYTES_MAX));
        assert_eq!(status(&exchange(addr, long.as_bytes())), 431);
        // A client that connects and says nothing, then one that closes at once.
        drop(TcpStream::connect(addr).unwrap());
        assert_eq!(status(&get(addr, "/healthz")), 200);
    }

    #[test]
    fn a_silent_client_times_out_and_stop_is_prompt() {
        let (admin, _health) = start();
        let addr = admin.local_addr();
        let answer = exchange(addr, b"GET /hea");
        assert_eq!(status(&answer), 408);
        assert_eq!(status(&get(addr, "/healthz")), 200);
        // The listening socket, by inode: a connect to the port says nothing of this socket
        // (another listener may take the freed port; a forked process may still hold this
        // one, as a snapshot copy once did), its inode gone from the table does.
        let ours = listening_inodes(addr);
        assert_eq!(ours.len(), 1, "{ours:?}");
        let stopping = Instant::now();
        drop(admin);
        assert!(stopping.elapsed() < Duration::from_secs(1));
        assert!(!listening_inodes(addr).contains(&ours[0]), "the listener on {addr} is still open");
    }

    /// The inodes of the IPv4 TCP sockets listening on `addr` (`/proc/net/tcp`).
    fn listening_inodes(addr: SocketAddr) -> Vec<u64> {
        let SocketAddr::V4(v4) = addr else { panic!("{addr} is not IPv4") };
        // The kernel writes the address as the hex of its bytes in memory order.
        let local = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .filter(|fields| fields[1] == local && fields[3] == "0A")
            .map(|fields| fields[9].parse().unwrap())
            .collect()
    }
}
