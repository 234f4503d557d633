//! `stockplane-e2e`: the end-to-end benchmark driver. It puts reserve+commit load on a
//! running data plane over QUIC and prints throughput and latency as a plain-text report.
//!
//! What it measures: single-line carts, each reserved (qty 1, a SKU drawn uniformly or
//! from a Zipf popularity, TTL 60 s) and then committed once the reserve's answer has
//! arrived. Every reserve and every commit answered counts as one request. Any status
//! other than `Reserved` for a reserve or `Committed` for a commit is counted and printed,
//! and makes the driver exit with status 1: a benchmark that silently gets errors is
//! worthless.
//!
//! Modes:
//! - `saturate`: closed loop. C connections (each from its own UDP socket), S streams
//!   each, each stream keeping F frames of B requests in flight. Frame latency runs from
//!   the frame's send to its last response.
//! - `rate`: open loop. Frames of B requests are due at fixed intended times (one every
//!   B / R seconds, round-robin over the streams); each request's latency runs from its
//!   frame's *intended* send time to its response, so a driver or server that falls
//!   behind pays for the delay (coordinated omission corrected).
//! - `half`: `saturate`, then `rate` at `--rate-fraction` (0.5) of the rate it measured.
//!
//! Why raw quinn and not the `wire` client: the client's per-call machinery (a oneshot
//! per request, lingering batches) costs more than the server's work per request. Here
//! frames are encoded with `encode_requests_into` into reused buffers (a request's fields
//! are rewritten in place, so the steady state allocates nothing per request) and
//! responses are read as docs/wire.md says (`header_parse`, `check_limits`, a 16-byte
//! aligned `FrameBuf`, `decode_responses`) and counted from `archived.status` without
//! deserializing.
//!
//! The driver runs on one thread (a current-thread tokio runtime); pin it with `taskset`.
//! Before the load, a control-role connection creates the SKUs at location 0 and restocks
//! each with `--restock-units`, so that reserves never run out.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use stockplane_loadgen::machine::{counter_differences, report_header, Stolen};
use stockplane_loadgen::{KeyStream, Popularity};
use stockplane_wire::frame::{self, AlignedVec, FrameBuf, Limits, FRAME_ALIGN, HEADER_LEN};
use stockplane_wire::{transport, ArchivedResponseBatch, CartLine, HoldId, Op, Request, RequestBatch, Status};
use tokio::sync::Notify;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Requests per frame in the setup phase (the server allows 4,096).
const SETUP_BATCH: usize = 2_048;
/// The location every SKU is created at and reserved from.
const LOCATION: u32 = 0;
/// Latency histogram bounds: 1 ns to 60 s, three significant digits.
const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// How long the driver waits for outstanding answers after the run before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// UDP socket buffers of every connection, each direction (the kernel caps them at
/// net.core.rmem_max / wmem_max).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// A frame sent this much after its intended time counts as a late send.
const LATE_SEND: Duration = Duration::from_micros(50);
/// The width of a `--timeline` bin.
const TIMELINE_BIN: Duration = Duration::from_millis(10);

/// The end-to-end benchmark driver: reserve+commit load on a running data plane.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Cli {
    /// Closed loop (`saturate`), open loop at `--rate` (`rate`), or both (`half`).
    #[arg(long, value_enum, default_value_t = Mode::Saturate)]
    mode: Mode,
    /// The data plane's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    server: SocketAddr,
    /// The name the server's certificate is checked against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The directory of the development certificates (ca.pem, checkout.*, control.*).
    #[arg(long, default_value = "target/certs")]
    certs: PathBuf,
    /// QUIC connections, each from its own endpoint (UDP socket).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Streams per connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Frames each stream keeps in flight (saturate mode).
    #[arg(long, default_value_t = 8)]
    frames_in_flight: usize,
    /// Requests per frame.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// Requests per second (rate mode).
    #[arg(long)]
    rate: Option<f64>,
    /// In half mode, the fraction of the saturation rate to run at.
    #[arg(long, default_value_t = 0.5)]
    rate_fraction: f64,
    /// In rate mode, frames a stream may have outstanding before the pacer waits (the
    /// wait counts as latency); default: 8,192 requests' worth.
    #[arg(long)]
    rate_frames_in_flight_max: Option<usize>,
    /// SKUs to create and draw from.
    #[arg(long, default_value_t = 100_000)]
    skus: u64,
    /// How SKUs are drawn.
    #[arg(long, value_enum, default_value_t = Keys::Uniform)]
    popularity: Keys,
    /// Seed of the SKU draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Units each SKU is restocked with before the load.
    #[arg(long, default_value_t = 1_000_000_000)]
    restock_units: i64,
    /// Hold TTL of every reserve.
    #[arg(long, default_value_t = 60_000)]
    hold_ttl_ms: u32,
    /// The client's initial congestion window (QUIC, Cubic), in bytes. The default,
    /// 8 GiB, is above 4 GiB, which turns quinn's pacer off: the pacer waits on tokio
    /// timers, which tick in milliseconds, and in the open loop those waits inflate the
    /// measured RTT until the driver falls behind for good (seen at 150,000 requests/s
    /// on one connection). Loopback loses nothing, and the server's flow control still
    /// bounds what is in flight. 0 keeps quinn's default (window and pacing).
    #[arg(long, default_value_t = 1 << 33)]
    initial_window_bytes: u64,
    /// Print each connection's QUIC statistics (RTT, congestion window, losses, flow
    /// control) at the end of each phase.
    #[arg(long)]
    quic_stats: bool,
    /// Skip creating and restocking the SKUs (they exist from an earlier run).
    #[arg(long)]
    skip_setup: bool,
    /// The server's process id, when it runs on this machine: each phase then reports the
    /// CPU time its threads spent in the measured window (from /proc/PID/task/*/schedstat),
    /// which shows whether a closed loop saturated the server or left it waiting.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's admin address (`host:port`): each phase then reports how long the
    /// server's WAL writes, `fdatasync`s and rounds took in the measured window (the bucket
    /// counts of its `/metrics` histograms, sampled at the window's two ends), beside the
    /// latency the driver measured. Only with `--server-pid`.
    #[arg(long, requires = "server_pid")]
    server_admin: Option<String>,
    /// Open loop: also write the measured window's latency over time to this file, a line
    /// per 10 ms of intended send times (`TIMELINE_BIN`): its start (ms into the window),
    /// the requests, those that took over 1 ms, and the slowest (us). A tail set by a few
    /// stalls shows as a few bad bins; one spread evenly, as many.
    #[arg(long)]
    timeline: Option<PathBuf>,
}

/// What the driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Closed loop: every stream keeps `--frames-in-flight` frames outstanding.
    Saturate,
    /// Open loop at `--rate` requests per second.
    Rate,
    /// Saturate, then the open loop at `--rate-fraction` of the measured rate.
    Half,
}

/// The popularity of SKUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Keys {
    /// Every SKU equally likely.
    Uniform,
    /// Zipf with exponent 1.1 (a few SKUs take most requests).
    Zipf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.batch == 0 || cli.batch > 4_096 || cli.connections == 0 || cli.streams == 0 || cli.frames_in_flight == 0 {
        bail!("--batch must be in 1..=4096; --connections, --streams and --frames-in-flight above 0");
    }
    if cli.skus == 0 || cli.seconds <= 0.0 || cli.warmup_seconds < 0.0 {
        bail!("--skus and --seconds must be above 0, --warmup-seconds at least 0");
    }
    if cli.mode == Mode::Rate && !cli.rate.is_some_and(|r| r > 0.0) {
        bail!("--mode rate needs --rate R (requests per second, above 0)");
    }
    print!("{}", report_header("stockplane end-to-end benchmark (stockplane-e2e)"));
    println!(
        "parameters: mode {:?}, server {}, {} connections x {} streams, {} frames in flight x {} requests, \
         {} s after {} s warm-up, {} SKUs ({:?}), seed {}, hold TTL {} ms",
        cli.mode,
        cli.server,
        cli.connections,
        cli.streams,
        cli.frames_in_flight,
        cli.batch,
        cli.seconds,
        cli.warmup_seconds,
        cli.skus,
        cli.popularity,
        cli.seed,
        cli.hold_ttl_ms
    );
    println!();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start tokio")?;
    let local = tokio::task::LocalSet::new();
    let clean = local.block_on(&runtime, run(cli))?;
    if !clean {
        println!("FAILED: some requests were not answered Reserved / Committed (see above)");
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the setup and the phases; true when every answer was the expected one.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let tls = Tls::load(&cli.certs, cli.initial_window_bytes)?;
    if !cli.skip_setup {
        setup(&cli, &tls).await.context("set up the SKUs")?;
    }
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    match cli.mode {
        Mode::Saturate => Ok(phase(&cli, &tls, Load::Saturate, nonce, 0).await?.print(&cli)),
        Mode::Rate => {
            let open = phase(&cli, &tls, Load::Rate(cli.rate.unwrap_or(1.0)), nonce, 0).await?;
            write_timeline(&cli, &open.stats)?;
            Ok(open.print(&cli))
        }
        Mode::Half => {
            let saturated = phase(&cli, &tls, Load::Saturate, nonce, 0).await?;
            let clean = saturated.print(&cli);
            let rate = saturated.requests_per_s() * cli.rate_fraction;
            println!(
                "half: open loop at {} x {:.0} = {:.0} requests/s (the saturation rate just measured)",
                cli.rate_fraction,
                saturated.requests_per_s(),
                rate
            );
            println!();
            if rate < 1.0 {
                bail!("the saturation phase answered nothing");
            }
            let open = phase(&cli, &tls, Load::Rate(rate), nonce, 1).await?;
            write_timeline(&cli, &open.stats)?;
            Ok(open.print(&cli) && clean)
        }
    }
}

/// Writes an open-loop phase's timeline to `--timeline`, when given.
fn write_timeline(cli: &Cli, stats: &Stats) -> anyhow::Result<()> {
    if let Some(path) = &cli.timeline {
        std::fs::write(path, stats.timeline_text()).with_context(|| format!("write {}", path.display()))?;
        println!("timeline: {} bins of {} ms in {}", stats.timeline.len(), TIMELINE_BIN.as_millis(), path.display());
    }
    Ok(())
}

/// The TLS material of the two roles.
struct Tls {
    checkout: quinn::ClientConfig,
    control: quinn::ClientConfig,
}

impl Tls {
    /// Reads ca.pem and each role's certificate and key from `dir`.
    fn load(dir: &Path, initial_window_bytes: u64) -> anyhow::Result<Tls> {
        let read =
            |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("read {}", dir.join(name).display()));
        let ca = read("ca.pem")?;
        Ok(Tls {
            checkout: tls_client_config(&ca, &read("checkout.pem")?, &read("checkout.key")?, initial_window_bytes)?,
            control: tls_client_config(&ca, &read("control.pem")?, &read("control.key")?, initial_window_bytes)?,
        })
    }
}

/// A QUIC client configuration: TLS 1.3 trusting `ca`, presenting `cert`, with ALPN
/// `stockplane/1`, and receive windows large enough for many frames in flight.
fn tls_client_config(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    initial_window_bytes: u64,
) -> anyhow::Result<quinn::ClientConfig> {
    let crypto = stockplane_wire::client::tls_config(ca, cert, key).context("TLS configuration")?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).context("QUIC TLS configuration")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_idle_timeout(Some(quinn::VarInt::from_u32(30_000).into()));
    if initial_window_bytes > 0 {
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(initial_window_bytes);
        transport.congestion_controller_factory(Arc::new(cubic));
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One connection from its own endpoint, so that every connection has its own 4-tuple
/// (the server's `SO_REUSEPORT` spreads connections by it).
async fn connect(cli: &Cli, config: &quinn::ClientConfig) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let bind: SocketAddr = if cli.server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let socket = socket2::Socket::new(socket2::Domain::for_address(bind), socket2::Type::DGRAM, None)
        .context("create a UDP socket")?;
    // The kernel's default receive buffer (about 200 KiB) overflows while the driver is
    // busy encoding a burst of frames; a lost datagram then costs QUIC a recovery.
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES).context("size the UDP receive buffer")?;
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES).context("size the UDP send buffer")?;
    socket.bind(&bind.into()).context("bind a UDP socket")?;
    socket.set_nonblocking(true).context("make the UDP socket non-blocking")?;
    let runtime = quinn::default_runtime().context("no async runtime for quinn")?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), runtime)
        .context("start a QUIC endpoint")?;
    endpoint.set_default_client_config(config.clone());
    let connection = endpoint
        .connect(cli.server, &cli.server_name)
        .context("start a connection")?
        .await
        .with_context(|| format!("connect to {}", cli.server))?;
    Ok((endpoint, connection))
}

/// Closes a connection and waits (briefly) until the server has heard it.
async fn disconnect(endpoint: quinn::Endpoint, connection: quinn::Connection) {
    connection.close(quinn::VarInt::from_u32(transport::close::NORMAL), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Reassembles response frames from a stream's bytes and hands each decoded batch over.
///
/// Frames are decoded in place when they start on a 16-byte boundary of the buffer, and
/// copied once into a second aligned buffer otherwise (docs/wire.md, "A stream reader").
struct FrameReader {
    pending: FrameBuf,
    unaligned: FrameBuf,
    limits: Limits,
}

impl FrameReader {
    fn new() -> FrameReader {
        FrameReader {
            pending: FrameBuf::with_capacity(1 << 20),
            unaligned: FrameBuf::with_capacity(1 << 20),
            limits: Limits::default(),
        }
    }

    /// Appends `bytes`, then calls `each` for every complete frame, in order.
    fn push(&mut self, bytes: &[u8], mut each: impl FnMut(&ArchivedResponseBatch)) -> anyhow::Result<()> {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            let rest = &self.pending.as_bytes()[start..];
            if rest.len() < HEADER_LEN {
                break;
            }
            let header = frame::header_parse(&rest[..HEADER_LEN]).context("read a response header")?;
            header.check_limits(&self.limits).context("check a response header")?;
            let len = header.frame_len();
            if rest.len() < len {
                break;
            }
            let bytes = &rest[..len];
            let batch = if bytes.as_ptr().addr().is_multiple_of(FRAME_ALIGN) {
                frame::decode_responses(bytes, &self.limits)
            } else {
                frame::decode_responses(self.unaligned.fill(bytes), &self.limits)
            }
            .context("decode a response frame")?;
            each(batch);
            start += len;
        }
        self.pending.consume(start);
        Ok(())
    }
}

/// Creates the SKUs at [`LOCATION`] and restocks each, on one control-role connection,
/// one frame at a time.
async fn setup(cli: &Cli, tls: &Tls) -> anyhow::Result<()> {
    let started = Instant::now();
    let (endpoint, connection) = connect(cli, &tls.control).await?;
    let (mut send, mut recv) = connection.open_bi().await.context("open a stream")?;
    let mut reader = FrameReader::new();
    let mut out = AlignedVec::<FRAME_ALIGN>::new();
    // Adjustment ids must differ from any earlier run's, or the server applies them once.
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut refused = [0u64; 256];
    let mut next_id = 0u64;
    for restock in [false, true] {
        let mut sku = 1u64;
        while sku <= cli.skus {
            let end = (sku + SETUP_BATCH as u64).min(cli.skus + 1);
            let requests: Vec<Request> = (sku..end)
                .map(|sku| {
                    next_id += 1;
                    let op = if restock {
                        Op::Adjust {
                            adjustment: (u128::from(nonce) << 64) | u128::from(sku),
                            sku,
                            location: LOCATION,
                            delta: cli.restock_units,
                        }
                    } else {
                        Op::UpsertSku { sku, location: LOCATION, backorder_limit: 0 }
                    };
                    Request { id: next_id, op }
                })
                .collect();
            frame::encode_requests_into(&mut out, &RequestBatch { requests });
            send.write_all(&out).await.context("send a setup frame")?;
            let mut missing = (end - sku) as usize;
            while missing > 0 {
                let chunk = recv.read_chunk(usize::MAX, true).await.context("read setup answers")?;
                let Some(chunk) = chunk else { bail!("the server finished the stream early") };
                reader.push(&chunk.bytes, |batch| {
                    for response in batch.responses.iter() {
                        missing = missing.saturating_sub(1);
                        let status = Status::from(response.status);
                        if status != Status::Ok {
                            refused[status.code() as usize] += 1;
                        }
                    }
                })?;
            }
            sku = end;
        }
    }
    send.finish().ok();
    disconnect(endpoint, connection).await;
    let refused: Vec<String> = status_counts(&refused);
    if !refused.is_empty() {
        bail!("the server refused setup requests: {}", refused.join(", "));
    }
    println!(
        "setup: {} SKUs created at location {LOCATION} and restocked with {} units each, in {:.2} s",
        cli.skus,
        cli.restock_units,
        started.elapsed().as_secs_f64()
    );
    println!();
    Ok(())
}

/// `Name xN` for every status counted.
fn status_counts(counts: &[u64; 256]) -> Vec<String> {
    (0..=255u8)
        .filter(|&code| counts[code as usize] > 0)
        .map(|code| match Status::from_code(code) {
            Some(status) => format!("{status:?} x{}", counts[code as usize]),
            None => format!("status {code} x{}", counts[code as usize]),
        })
        .collect()
}

/// The load of one phase.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// Closed loop.
    Saturate,
    /// Open loop at this many requests per second.
    Rate(f64),
}

/// The clock marks of a phase: the load starts at `start`, is measured from `measure_from`
/// to `until`, and stops at `until`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    measure_from: Instant,
    until: Instant,
}

impl Window {
    fn contains(&self, at: Instant) -> bool {
        at >= self.measure_from && at < self.until
    }
}

/// What a request of an in-flight frame was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reserve,
    Commit,
}

/// A frame in flight: when it was sent (saturate) or due (rate), when it was handed to
/// its stream, and its requests.
struct Slot {
    at: Instant,
    sent: Instant,
    requests: Vec<(Kind, u128)>,
    missing: usize,
}

/// The counters of one stream (merged over streams at the end).
struct Stats {
    /// Requests answered inside the window.
    requests: u64,
    reserves: u64,
    commits: u64,
    /// Frames completed inside the window.
    frames: u64,
    /// Saturate: frame latency; rate: request latency from the intended send time (ns).
    latency_ns: Histogram<u64>,
    /// Rate mode: request latency from when its frame was handed to the stream (ns), which
    /// leaves out the pacer's own lateness (the driver's share of the tail).
    from_send_ns: Histogram<u64>,
    /// Unexpected statuses, by code, for reserves and for commits.
    reserve_refused: [u64; 256],
    commit_refused: [u64; 256],
    /// Responses whose id matches no request in flight.
    unmatched: u64,
    /// Requests still unanswered when the driver gave up waiting.
    unanswered: u64,
    /// Rate mode: frames sent more than [`LATE_SEND`] after their intended time, and the
    /// largest lag.
    late_sends: u64,
    lag_max: Duration,
    frames_sent: u64,
    /// Rate mode: the measured requests by `TIMELINE_BIN` of their intended send time.
    timeline: Vec<TimelineBin>,
}

/// The requests of one `--timeline` bin.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TimelineBin {
    requests: u64,
    over_1ms: u64,
    slowest_us: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            requests: 0,
            reserves: 0,
            commits: 0,
            frames: 0,
            latency_ns: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds"),
            from_send_ns: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds"),
            reserve_refused: [0; 256],
            commit_refused: [0; 256],
            unmatched: 0,
            unanswered: 0,
            late_sends: 0,
            lag_max: Duration::ZERO,
            frames_sent: 0,
            timeline: Vec::new(),
        }
    }

    /// Counts a request sent (as intended) `into` the measured window that took `latency`.
    fn timeline_record(&mut self, into: Duration, latency: Duration) {
        // In u64 (a window of 584 years): this runs for every answer, and a u128 division
        // is a call into the runtime.
        let index = (into.as_nanos() as u64 / TIMELINE_BIN.as_nanos() as u64) as usize;
        if self.timeline.len() <= index {
            self.timeline.resize(index + 1, TimelineBin::default());
        }
        let bin = &mut self.timeline[index];
        bin.requests += 1;
        bin.over_1ms += u64::from(latency > Duration::from_millis(1));
        bin.slowest_us = bin.slowest_us.max(latency.as_micros() as u64);
    }

    /// The `--timeline` file's text: a header, then a line per bin.
    fn timeline_text(&self) -> String {
        use std::fmt::Write;
        let mut text = String::from("# ms into the measured window, requests, over 1 ms, slowest us\n");
        for (i, bin) in self.timeline.iter().enumerate() {
            let ms = i as u128 * TIMELINE_BIN.as_millis();
            // Writing into a String cannot fail.
            let _ = writeln!(text, "{ms} {} {} {}", bin.requests, bin.over_1ms, bin.slowest_us);
        }
        text
    }

    fn merge(&mut self, other: &Stats) {
        self.requests += other.requests;
        self.reserves += other.reserves;
        self.commits += other.commits;
        self.frames += other.frames;
        self.latency_ns.add(&other.latency_ns).expect("histograms with the same bounds");
        self.from_send_ns.add(&other.from_send_ns).expect("histograms with the same bounds");
        for code in 0..256 {
            self.reserve_refused[code] += other.reserve_refused[code];
            self.commit_refused[code] += other.commit_refused[code];
        }
        self.unmatched += other.unmatched;
        self.unanswered += other.unanswered;
        self.late_sends += other.late_sends;
        self.lag_max = self.lag_max.max(other.lag_max);
        self.frames_sent += other.frames_sent;
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize(other.timeline.len(), TimelineBin::default());
        }
        for (bin, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            bin.requests += theirs.requests;
            bin.over_1ms += theirs.over_1ms;
            bin.slowest_us = bin.slowest_us.max(theirs.slowest_us);
        }
    }
}

/// One stream's state, shared by its sender and its receiver task.
struct Lane {
    index: u64,
    phase: u64,
    nonce: u64,
    batch: usize,
    hold_ttl_ms: u32,
    load: Load,
    window: Window,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
    /// Holds whose reserve was answered `Reserved`, waiting for their commit.
    to_commit: VecDeque<u128>,
    /// Whether the next request should be a commit (when one is waiting).
    commit_next: bool,
    holds_made: u64,
    keys: KeyStream,
    stats: Stats,
    /// Woken when a frame completes (a sender waiting for room).
    room: Rc<Notify>,
}

impl Lane {
    /// A new hold id: the run's nonce, then the phase, the lane and a counter.
    fn lane_hold_id(&mut self) -> u128 {
        self.holds_made += 1;
        (u128::from(self.nonce) << 64)
            | (u128::from(self.phase) << 56)
            | (u128::from(self.index) << 40)
            | u128::from(self.holds_made)
    }

    /// Fills `builder` with the next frame's requests and takes a slot for it: `at` is when
    /// the frame counts from, `sent` when it actually goes (the same in saturate mode).
    fn lane_build(&mut self, builder: &mut FrameBuilder, at: Instant, sent: Instant) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot { at, sent, requests: Vec::with_capacity(self.batch), missing: 0 });
                self.slots.len() - 1
            }
        };
        let mut requests = std::mem::take(&mut self.slots[slot].requests);
        requests.clear();
        for i in 0..self.batch {
            let id = (slot * self.batch + i) as u64;
            let commit = if self.commit_next { self.to_commit.pop_front() } else { None };
            self.commit_next = !self.commit_next;
            match commit {
                Some(hold) => {
                    builder.frame_builder_commit(i, id, hold);
                    requests.push((Kind::Commit, hold));
                }
                None => {
                    let hold = self.lane_hold_id();
                    let sku = self.keys.next_rank() + 1;
                    builder.frame_builder_reserve(i, id, hold, sku, self.hold_ttl_ms);
                    requests.push((Kind::Reserve, hold));
                }
            }
        }
        self.slots[slot] = Slot { at, sent, requests, missing: self.batch };
        self.in_flight += 1;
        self.stats.frames_sent += 1;
    }

    /// Counts one response frame's answers; frees the slots of completed frames.
    fn lane_answers(&mut self, batch: &ArchivedResponseBatch, now: Instant) {
        let in_window = self.window.contains(now);
        for response in batch.responses.iter() {
            let id = response.id.to_native() as usize;
            let (slot, index) = (id / self.batch, id % self.batch);
            let Some(entry) = self.slots.get_mut(slot).filter(|s| s.missing > 0) else {
                self.stats.unmatched += 1;
                continue;
            };
            let (kind, hold) = entry.requests[index];
            entry.missing -= 1;
            let status = Status::from(response.status);
            match (kind, status) {
                (Kind::Reserve, Status::Reserved) => self.to_commit.push_back(hold),
                (Kind::Commit, Status::Committed) => {}
                (Kind::Reserve, other) => self.stats.reserve_refused[other.code() as usize] += 1,
                (Kind::Commit, other) => self.stats.commit_refused[other.code() as usize] += 1,
            }
            let (at, sent) = (entry.at, entry.sent);
            let done = entry.missing == 0;
            if in_window {
                self.stats.requests += 1;
                match kind {
                    Kind::Reserve => self.stats.reserves += 1,
                    Kind::Commit => self.stats.commits += 1,
                }
            }
            let measured = self.window.contains(at);
            let latency = now.saturating_duration_since(at);
            if matches!(self.load, Load::Rate(_)) && measured {
                self.stats.timeline_record(at.saturating_duration_since(self.window.measure_from), latency);
                self.stats.latency_ns.saturating_record(latency.as_nanos() as u64);
                self.stats.from_send_ns.saturating_record(now.saturating_duration_since(sent).as_nanos() as u64);
            }
            if done {
                if matches!(self.load, Load::Saturate) && measured {
                    self.stats.latency_ns.saturating_record(latency.as_nanos() as u64);
                }
                if in_window {
                    self.stats.frames += 1;
                }
                self.free.push(slot);
                self.in_flight -= 1;
                self.room.notify_one();
            }
        }
    }
}

/// A request frame rebuilt in place: each position keeps a reserve and a commit request
/// and swaps between them, so that rewriting a frame allocates nothing.
struct FrameBuilder {
    batch: RequestBatch,
    /// Per position, the request of the other kind.
    spare: Vec<Request>,
    out: AlignedVec<FRAME_ALIGN>,
}

impl FrameBuilder {
    fn new(batch: usize) -> FrameBuilder {
        let reserve = Request {
            id: 0,
            op: Op::Reserve {
                hold: HoldId(0),
                ttl_ms: 0,
                lines: vec![CartLine { sku: 0, location: Some(LOCATION), qty: 1 }],
            },
        };
        let commit = Request { id: 0, op: Op::Commit { hold: HoldId(0), lines: None } };
        FrameBuilder {
            batch: RequestBatch { requests: vec![reserve; batch] },
            spare: vec![commit; batch],
            out: AlignedVec::with_capacity(batch * 128 + 64),
        }
    }

    fn frame_builder_reserve(&mut self, i: usize, id: u64, hold_id: u128, sku_id: u64, ttl: u32) {
        if !matches!(self.batch.requests[i].op, Op::Reserve { .. }) {
            std::mem::swap(&mut self.batch.requests[i], &mut self.spare[i]);
        }
        let request = &mut self.batch.requests[i];
        request.id = id;
        if let Op::Reserve { hold, ttl_ms, lines } = &mut request.op {
            *hold = HoldId(hold_id);
            *ttl_ms = ttl;
            lines[0].sku = sku_id;
        }
    }

    fn frame_builder_commit(&mut self, i: usize, id: u64, hold_id: u128) {
        if !matches!(self.batch.requests[i].op, Op::Commit { .. }) {
            std::mem::swap(&mut self.batch.requests[i], &mut self.spare[i]);
        }
        let request = &mut self.batch.requests[i];
        request.id = id;
        if let Op::Commit { hold, .. } = &mut request.op {
            *hold = HoldId(hold_id);
        }
    }

    /// Encodes the frame; the bytes to send.
    fn frame_builder_encode(&mut self) -> &[u8] {
        frame::encode_requests_into(&mut self.out, &self.batch);
        &self.out
    }
}

/// The merged result of a phase.
struct PhaseResult {
    load: Load,
    stats: Stats,
    measured: Duration,
    /// What the machine did in the measured window, when `--server-pid` was given.
    machine: Option<Machine>,
}

/// What the machine did in a phase's measured window, sampled at its two ends.
struct Machine {
    /// The server's and the driver's CPU time: a driver that is itself saturated
    /// measures itself.
    cpu: [ProcessCpu; 2],
    /// The time the hypervisor took from each CPU.
    stolen: Stolen,
    /// The datagrams the kernel dropped.
    udp_drops: UdpDrops,
    /// The server's WAL rounds and QUIC counters, when `--server-admin` was given.
    server: Option<ServerFigures>,
}

/// The server's figures over a window, from the difference of two scrapes of its
/// `/metrics`: the bucket counts (cumulative, by upper bound in seconds, summed over
/// shards) of `stockplane_wal_write_seconds` and `stockplane_wal_fdatasync_seconds` (a
/// round's write and its `fdatasync` alone) and `stockplane_wal_sync_seconds` (a round,
/// from taking its records to durable), and its QUIC packet counters.
#[derive(Debug, PartialEq)]
struct ServerFigures {
    write: Vec<(f64, u64)>,
    fdatasync: Vec<(f64, u64)>,
    round: Vec<(f64, u64)>,
    /// The QUIC counters, summed over shards, in the order of `ServerFigures::QUIC`: packets
    /// sent, packets declared lost, congestion events.
    quic: [u64; 3],
}

impl ServerFigures {
    const WRITE: &'static str = "stockplane_wal_write_seconds_bucket";
    const FDATASYNC: &'static str = "stockplane_wal_fdatasync_seconds_bucket";
    const ROUND: &'static str = "stockplane_wal_sync_seconds_bucket";
    /// A slow round (or write, or fdatasync), and a stalled one, in seconds.
    const SLOW: f64 = 0.0025;
    const STALLED: f64 = 0.01;
    const QUIC: [&'static str; 3] = [
        "stockplane_quic_packets_sent_total",
        "stockplane_quic_packets_lost_total",
        "stockplane_quic_congestion_events_total",
    ];

    /// The server's histograms now (`GET http://ADMIN/metrics`, blocking).
    fn sample(admin: &str) -> anyhow::Result<ServerFigures> {
        use std::io::{Read, Write};
        let mut stream =
            std::net::TcpStream::connect(admin).with_context(|| format!("connect to the server's admin at {admin}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").context("ask for /metrics")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).context("read /metrics")?;
        let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer without a body")?;
        if !head.lines().next().is_some_and(|status| status.contains(" 200 ")) {
            bail!("GET http://{admin}/metrics: {}", head.lines().next().unwrap_or_default());
        }
        Ok(ServerFigures::parse(body))
    }

    /// The three histograms in a Prometheus text exposition (absent: empty).
    fn parse(text: &str) -> ServerFigures {
        let histogram = |name: &str| {
            let mut buckets: Vec<(f64, u64)> = Vec::new();
            for line in text.lines().filter(|line| line.starts_with(name) && line[name.len()..].starts_with('{')) {
                let Some(le) = line.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
                let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()).unwrap_or(0.0) as u64;
                match buckets.iter_mut().find(|(bound, _)| *bound == le) {
                    Some((_, total)) => *total += count,
                    None => buckets.push((le, count)),
                }
            }
            buckets.retain(|(bound, _)| !bound.is_nan());
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            buckets
        };
        let counter = |name: &str| -> u64 {
            text.lines()
                .filter(|line| line.starts_with(name) && matches!(line.as_bytes().get(name.len()), Some(b'{' | b' ')))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        ServerFigures {
            write: histogram(Self::WRITE),
            fdatasync: histogram(Self::FDATASYNC),
            round: histogram(Self::ROUND),
            quic: Self::QUIC.map(counter),
        }
    }

    fn between(before: &ServerFigures, after: &ServerFigures) -> ServerFigures {
        ServerFigures {
            write: counter_differences(&before.write, &after.write),
            fdatasync: counter_differences(&before.fdatasync, &after.fdatasync),
            round: counter_differences(&before.round, &after.round),
            quic: std::array::from_fn(|i| after.quic[i].saturating_sub(before.quic[i])),
        }
    }

    /// How many a histogram counted in all (its last bucket, cumulative; 0 when empty).
    fn total(buckets: &[(f64, u64)]) -> u64 {
        buckets.last().map_or(0, |&(_, count)| count)
    }

    /// `N, p50 <= .. us, p90 <= .. us, p99 <= .. us` (each quantile's bucket bound).
    fn quantiles(buckets: &[(f64, u64)]) -> String {
        let total = Self::total(buckets);
        if total == 0 {
            return "none".into();
        }
        let bound = |q: f64| {
            let wanted = (q * total as f64).ceil() as u64;
            match buckets.iter().find(|&&(_, count)| count >= wanted) {
                Some(&(bound, _)) if bound.is_finite() => format!("<= {:.0} us", bound * 1e6),
                _ => format!("> {:.0} us", buckets.iter().rev().find(|b| b.0.is_finite()).map_or(0.0, |b| b.0) * 1e6),
            }
        };
        format!("{total}, p50 {}, p90 {}, p99 {}", bound(0.50), bound(0.90), bound(0.99))
    }

    /// How many took over 2.5 ms and over 10 ms (`None` without buckets at those bounds).
    fn over_slow(buckets: &[(f64, u64)]) -> Option<(u64, u64)> {
        let total = Self::total(buckets);
        let over = |seconds: f64| buckets.iter().find(|&&(bound, _)| bound == seconds).map(|&(_, count)| total - count);
        Some((over(Self::SLOW)?, over(Self::STALLED)?))
    }

    /// How many rounds took over 2.5 ms and over 10 ms, and the time those over 2.5 ms took
    /// at the least (each at its bucket's lower bound). A slow round is one among
    /// thousands, under the rounds' p99, but every request that arrives during it waits
    /// for it: what a window's requests see is the slow rounds' time, not their share.
    fn stalls(buckets: &[(f64, u64)]) -> String {
        let at_least: f64 = buckets
            .windows(2)
            .filter(|pair| pair[0].0 >= Self::SLOW)
            .map(|pair| pair[1].1.saturating_sub(pair[0].1) as f64 * pair[0].0)
            .sum();
        match Self::over_slow(buckets) {
            Some((slow, stalled)) => {
                format!("over 2.5 ms {slow} (at least {:.1} ms in all), over 10 ms {stalled}", at_least * 1e3)
            }
            None => "no 2.5 and 10 ms buckets".into(),
        }
    }

    /// A round's write or its fdatasync alone: its quantiles, then how many took over 2.5
    /// and over 10 ms, so that a window's slow rounds show which of the two was slow.
    fn step(buckets: &[(f64, u64)]) -> String {
        let quantiles = Self::quantiles(buckets);
        match Self::over_slow(buckets) {
            Some((slow, stalled)) if Self::total(buckets) > 0 => {
                format!("{quantiles}, over 2.5 ms {slow}, over 10 ms {stalled}")
            }
            _ => quantiles,
        }
    }

    /// The WAL's line, then the QUIC one: on loopback a packet the server declares lost
    /// was dropped on the way (a full socket buffer) or never left, and each loss shrinks
    /// that connection's congestion window and pacing rate.
    fn line(&self) -> String {
        let [sent, lost, congestion] = self.quic;
        format!(
            "server WAL in the measured window (its /metrics histograms): writes {}; fdatasyncs {}; rounds, taken to \
             durable {}{}\n\
             server QUIC in the measured window (its /metrics counters): {sent} packets sent, {lost} declared lost, \
             {congestion} congestion events",
            ServerFigures::step(&self.write),
            ServerFigures::step(&self.fdatasync),
            ServerFigures::quantiles(&self.round),
            // Without rounds (`--durability none`), nothing to say of their stalls.
            if Self::total(&self.round) > 0 {
                format!("; {}", ServerFigures::stalls(&self.round))
            } else {
                String::new()
            }
        )
    }
}

/// Datagrams the kernel dropped over a window, machine-wide (the `Udp:` counters of
/// `/proc/net/snmp`): a datagram dropped on loopback is a QUIC packet lost, which stalls
/// its stream until a retransmission, so a latency tail with drops in its window has
/// that cause before any other.
struct UdpDrops {
    /// Datagrams refused because the receiving socket's buffer was full.
    receive_buffer: u64,
    /// Datagrams refused because the sending socket's buffer was full.
    send_buffer: u64,
}

impl UdpDrops {
    /// The machine's `RcvbufErrors` and `SndbufErrors` so far.
    fn sample() -> anyhow::Result<UdpDrops> {
        UdpDrops::parse(&std::fs::read_to_string("/proc/net/snmp").context("read /proc/net/snmp")?)
    }

    fn parse(snmp: &str) -> anyhow::Result<UdpDrops> {
        // Two `Udp:` lines: the counters' names, then their values.
        let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            anyhow::bail!("no Udp counters in /proc/net/snmp");
        };
        let counter = |wanted: &str| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == wanted)
                .and_then(|(_, value)| value.parse().ok())
                .with_context(|| format!("the counter {wanted} of /proc/net/snmp"))
        };
        Ok(UdpDrops { receive_buffer: counter("RcvbufErrors")?, send_buffer: counter("SndbufErrors")? })
    }

    fn between(before: &UdpDrops, after: &UdpDrops) -> UdpDrops {
        UdpDrops {
            receive_buffer: after.receive_buffer.saturating_sub(before.receive_buffer),
            send_buffer: after.send_buffer.saturating_sub(before.send_buffer),
        }
    }

    fn print(&self) {
        println!(
            "UDP datagrams the kernel dropped in the measured window (/proc/net/snmp, every socket): \
             {} for a full receive buffer, {} for a full send buffer",
            self.receive_buffer, self.send_buffer
        );
    }
}

/// CPU time of each thread of a process, in nanoseconds, by thread id (with its name).
type ThreadTimes = std::collections::BTreeMap<u64, (String, u64)>;

/// What a process's threads ran during a window.
struct ProcessCpu {
    what: &'static str,
    pid: u32,
    window: Duration,
    /// (thread name, ns on a CPU in the window) of the threads that ran.
    threads: Vec<(String, u64)>,
}

impl ProcessCpu {
    /// Reads the time on CPU of every thread of `pid` (the first field of schedstat).
    fn sample(pid: u32) -> anyhow::Result<ThreadTimes> {
        let mut times = ThreadTimes::new();
        let tasks = PathBuf::from(format!("/proc/{pid}/task"));
        for task in std::fs::read_dir(&tasks).with_context(|| format!("list {}", tasks.display()))? {
            let task = task?.path();
            let Some(tid) = task.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            // A thread may exit between the listing and the reads: skip it.
            let (Ok(name), Ok(stat)) =
                (std::fs::read_to_string(task.join("comm")), std::fs::read_to_string(task.join("schedstat")))
            else {
                continue;
            };
            let ns = stat.split_whitespace().next().and_then(|f| f.parse().ok()).context("parse schedstat")?;
            times.insert(tid, (name.trim().to_string(), ns));
        }
        Ok(times)
    }

    /// The time each thread ran between two samples (threads born in the window count
    /// from zero).
    fn between(
        what: &'static str,
        pid: u32,
        window: Duration,
        before: &ThreadTimes,
        after: &ThreadTimes,
    ) -> ProcessCpu {
        let threads: Vec<(String, u64)> = after
            .iter()
            .map(|(tid, (name, ns))| (name.clone(), ns.saturating_sub(before.get(tid).map_or(0, |(_, b)| *b))))
            .filter(|(_, ns)| *ns > 0)
            .collect();
        ProcessCpu { what, pid, window, threads }
    }

    fn print(&self) {
        let share = |ns: u64| ns as f64 / self.window.as_nanos() as f64 * 100.0;
        let total: u64 = self.threads.iter().map(|(_, ns)| ns).sum();
        // Threads of one name (io_uring's workers share theirs) count together.
        let mut named: Vec<(&str, u64, usize)> = Vec::new();
        for (name, ns) in &self.threads {
            match named.iter_mut().find(|(n, _, _)| n == name) {
                Some((_, sum, count)) => (*sum, *count) = (*sum + ns, *count + 1),
                None => named.push((name, *ns, 1)),
            }
        }
        named.sort_by_key(|&(_, ns, _)| std::cmp::Reverse(ns));
        let busiest: Vec<String> = named
            .iter()
            .take(4)
            .map(|(name, ns, count)| match count {
                1 => format!("{name} {:.1}%", share(*ns)),
                _ => format!("{name} (x{count}) {:.1}%", share(*ns)),
            })
            .collect();
        println!(
            "{} CPU in the measured window (pid {}, /proc schedstat): {:.1}% of one core over all threads; \
             busiest: {}",
            self.what,
            self.pid,
            share(total),
            busiest.join(", ")
        );
    }
}

impl PhaseResult {
    fn requests_per_s(&self) -> f64 {
        self.stats.requests as f64 / self.measured.as_secs_f64()
    }

    /// Prints the phase's report; true when every answer was the expected one.
    fn print(&self, cli: &Cli) -> bool {
        let s = &self.stats;
        let secs = self.measured.as_secs_f64();
        let (title, what) = match self.load {
            Load::Saturate => (
                format!(
                    "saturate (closed loop): {} connections x {} streams x {} frames in flight x {} requests per frame",
                    cli.connections, cli.streams, cli.frames_in_flight, cli.batch
                ),
                "frame latency, send to last response",
            ),
            Load::Rate(rate) => (
                format!(
                    "rate (open loop): {rate:.0} requests/s intended, frames of {} requests every {:.1} us \
                     round-robin over {} connections x {} streams",
                    cli.batch,
                    cli.batch as f64 / rate * 1e6,
                    cli.connections,
                    cli.streams
                ),
                "request latency from the intended send time (coordinated omission corrected)",
            ),
        };
        println!("== {title}");
        println!("measured: {secs:.2} s after {} s warm-up", cli.warmup_seconds);
        println!(
            "requests answered: {} ({} reserves, {} commits), frames completed: {}",
            s.requests, s.reserves, s.commits, s.frames
        );
        println!("throughput: {:.0} requests/s, {:.0} frames/s", s.requests as f64 / secs, s.frames as f64 / secs);
        let us = |ns: u64| ns as f64 / 1_000.0;
        let quantiles = |what: &str, h: &Histogram<u64>| {
            println!(
                "{what}, us ({} samples): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                h.len(),
                us(h.value_at_quantile(0.50)),
                us(h.value_at_quantile(0.90)),
                us(h.value_at_quantile(0.99)),
                us(h.value_at_quantile(0.999)),
                us(h.max())
            )
        };
        quantiles(what, &s.latency_ns);
        if let Load::Rate(_) = self.load {
            quantiles("request latency from the actual send time (without the pacer's lateness)", &s.from_send_ns);
        }
        if let Some(machine) = &self.machine {
            for cpu in &machine.cpu {
                cpu.print();
            }
            println!("{}", machine.stolen.line("the measured window"));
            machine.udp_drops.print();
            if let Some(server) = &machine.server {
                println!("{}", server.line());
            }
        }
        if let Load::Rate(_) = self.load {
            println!(
                "pacer: {} frames sent, {} more than {} us after their intended time, largest lag {:.1} us",
                s.frames_sent,
                s.late_sends,
                LATE_SEND.as_micros(),
                s.lag_max.as_secs_f64() * 1e6
            );
        }
        let reserve = status_counts(&s.reserve_refused);
        let commit = status_counts(&s.commit_refused);
        let clean = reserve.is_empty() && commit.is_empty() && s.unmatched == 0 && s.unanswered == 0;
        if clean {
            println!("statuses: every reserve Reserved, every commit Committed");
        } else {
            println!("UNEXPECTED: reserves: [{}]; commits: [{}]", reserve.join(", "), commit.join(", "));
            println!("UNEXPECTED: {} responses matched no request, {} requests unanswered", s.unmatched, s.unanswered);
        }
        println!();
        clean
    }
}

/// Runs one phase on fresh connections and returns its merged counters.
async fn phase(cli: &Cli, tls: &Tls, load: Load, nonce: u64, phase: u64) -> anyhow::Result<PhaseResult> {
    let mut connections = Vec::with_capacity(cli.connections);
    for _ in 0..cli.connections {
        connections.push(connect(cli, &tls.checkout).await?);
    }
    let mut streams = Vec::new();
    for (_, connection) in &connections {
        for _ in 0..cli.streams {
            streams.push(connection.open_bi().await.context("open a stream")?);
        }
    }
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(cli.warmup_seconds);
    let window = Window { start, measure_from, until: measure_from + Duration::from_secs_f64(cli.seconds) };
    let popularity = match cli.popularity {
        Keys::Uniform => Popularity::Uniform,
        Keys::Zipf => Popularity::zipf(),
    };
    // What the machine did over the measured window (`Machine`), sampled at its two ends.
    let admin = cli.server_admin.clone();
    let machine = cli.server_pid.map(|pid| {
        tokio::task::spawn_local(async move {
            let me = std::process::id();
            // The server's /metrics, off the driver's thread.
            let figures = |admin: Option<String>| async move {
                match admin {
                    None => anyhow::Ok(None),
                    Some(admin) => Ok(Some(tokio::task::spawn_blocking(move || ServerFigures::sample(&admin)).await??)),
                }
            };
            tokio::time::sleep_until(measure_from.into()).await;
            let server_before = figures(admin.clone()).await?;
            let before = (ProcessCpu::sample(pid)?, ProcessCpu::sample(me)?, Stolen::sample()?, UdpDrops::sample()?);
            let from = Instant::now();
            tokio::time::sleep_until(window.until.into()).await;
            let after = (ProcessCpu::sample(pid)?, ProcessCpu::sample(me)?, Stolen::sample()?, UdpDrops::sample()?);
            let window = from.elapsed();
            let server_after = figures(admin).await?;
            anyhow::Ok(Machine {
                cpu: [
                    ProcessCpu::between("server", pid, window, &before.0, &after.0),
                    ProcessCpu::between("driver", me, window, &before.1, &after.1),
                ],
                stolen: Stolen::between(window, &before.2, &after.2),
                udp_drops: UdpDrops::between(&before.3, &after.3),
                server: server_before.zip(server_after).map(|(before, after)| ServerFigures::between(&before, &after)),
            })
        })
    });
    let mut lanes = Vec::with_capacity(streams.len());
    let mut receivers = Vec::with_capacity(streams.len());
    let mut sends = Vec::with_capacity(streams.len());
    for (index, (send, recv)) in streams.into_iter().enumerate() {
        let lane = Rc::new(RefCell::new(Lane {
            index: index as u64,
            phase,
            nonce,
            batch: cli.batch,
            hold_ttl_ms: cli.hold_ttl_ms,
            load,
            window,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            to_commit: VecDeque::new(),
            commit_next: false,
            holds_made: 0,
            keys: KeyStream::new(popularity, cli.skus, cli.seed ^ (phase << 32) ^ index as u64)
                .context("a SKU sampler")?,
            stats: Stats::new(),
            room: Rc::new(Notify::new()),
        }));
        receivers.push(tokio::task::spawn_local(receive(lane.clone(), recv)));
        lanes.push(lane);
        sends.push(send);
    }
    let sending = match load {
        Load::Saturate => {
            let tasks: Vec<_> = lanes
                .iter()
                .zip(sends)
                .map(|(lane, send)| {
                    tokio::task::spawn_local(saturate(lane.clone(), send, cli.batch, cli.frames_in_flight))
                })
                .collect();
            async move {
                for task in tasks {
                    task.await.context("a sender task")??;
                }
                anyhow::Ok(())
            }
            .await
        }
        Load::Rate(rate) => {
            let max = cli.rate_frames_in_flight_max.unwrap_or((8_192 / cli.batch).max(1));
            pace(&lanes, sends, cli.batch, rate, max).await
        }
    };
    sending.context("send the load")?;
    let machine = match machine {
        Some(task) => Some(task.await.context("the machine's sampler")?.context("sample the machine")?),
        None => None,
    };
    // Every stream is finished; the server finishes its side once all is answered.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        for task in receivers {
            task.await.context("a receiver task")??;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result.context("receive the answers")?,
        Err(_) => println!("warning: answers still missing {} s after the run", DRAIN_TIMEOUT.as_secs()),
    }
    let mut stats = Stats::new();
    for lane in &lanes {
        let lane = lane.borrow();
        let mut lane_stats = Stats::new();
        lane_stats.merge(&lane.stats);
        lane_stats.unanswered += lane.slots.iter().map(|s| s.missing as u64).sum::<u64>();
        stats.merge(&lane_stats);
    }
    if cli.quic_stats {
        for (index, (_, connection)) in connections.iter().enumerate() {
            let stats = connection.stats();
            let (path, tx, rx) = (&stats.path, &stats.frame_tx, &stats.frame_rx);
            println!(
                "quic connection {index}: rtt {:?} (min {:?}), cwnd {} bytes, {} congestion events, {} packets lost \
                 of {} sent; sent {} acks, {} stream_data_blocked, {} data_blocked; received {} acks, \
                 {} max_stream_data, {} max_data, {} stream_data_blocked",
                path.rtt,
                path.min_rtt,
                path.cwnd,
                path.congestion_events,
                path.lost_packets,
                path.sent_packets,
                tx.acks,
                tx.stream_data_blocked,
                tx.data_blocked,
                rx.acks,
                rx.max_stream_data,
                rx.max_data,
                rx.stream_data_blocked
            );
        }
    }
    for (endpoint, connection) in connections {
        disconnect(endpoint, connection).await;
    }
    Ok(PhaseResult { load, stats, measured: window.until - window.measure_from, machine })
}

/// A stream's receiver: counts answers until the server finishes the stream.
async fn receive(lane: Rc<RefCell<Lane>>, mut recv: quinn::RecvStream) -> anyhow::Result<()> {
    let mut reader = FrameReader::new();
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.context("read answers")? {
        let now = Instant::now();
        let mut lane = lane.borrow_mut();
        reader.push(&chunk.bytes, |batch| lane.lane_answers(batch, now))?;
    }
    Ok(())
}

/// A closed-loop sender: keeps `frames_in_flight` frames outstanding until the window ends.
async fn saturate(
    lane: Rc<RefCell<Lane>>,
    mut send: quinn::SendStream,
    batch: usize,
    frames_in_flight: usize,
) -> anyhow::Result<()> {
    let mut builder = FrameBuilder::new(batch);
    let (room, until, start) = {
        let lane = lane.borrow();
        (lane.room.clone(), lane.window.until, lane.window.start)
    };
    tokio::time::sleep_until(start.into()).await;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if lane.borrow().in_flight >= frames_in_flight {
            room.notified().await;
            continue;
        }
        lane.borrow_mut().lane_build(&mut builder, now, now);
        send.write_all(builder.frame_builder_encode()).await.context("send a frame")?;
    }
    send.finish().context("finish a stream")?;
    Ok(())
}

/// A one-shot timer of microsecond resolution for the pacer: a `timerfd` that the
/// runtime's epoll waits on like any socket.
///
/// tokio's own timers tick in milliseconds, so a pacer that must send a frame every
/// 100 µs or so could only spin between frames. It must not: this host's two vCPUs may
/// not both run flat out (measured with `jitter` on both CPUs at once: every few seconds
/// the whole VM stops for up to 100 ms, against gaps of at most 0.2 ms with one CPU
/// busy), so a spinning driver beside a busy server stalls both, and the stalls, not the
/// server, made the tail.
struct FineTimer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl FineTimer {
    fn new() -> std::io::Result<FineTimer> {
        // SAFETY: timerfd_create takes two flags and returns a new descriptor or -1.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: the `OwnedFd` owns the timerfd and is neither replaced nor closed while
        // the `AsyncFd` holds it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
        Ok(FineTimer { fd })
    }

    /// Returns once `wait` has passed (at once for zero).
    async fn sleep(&self, wait: Duration) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        if wait.is_zero() {
            return Ok(());
        }
        let fd = self.fd.get_ref().as_raw_fd();
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as _ },
        };
        // SAFETY: `fd` is this timer's open timerfd; `spec` is a valid itimerspec that the
        // call only reads, and the old value is not asked for (null).
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reads at most 8 bytes into `expirations`, which has room for them.
            let read = unsafe { libc::read(fd, (&raw mut expirations).cast(), std::mem::size_of::<u64>()) };
            if read == std::mem::size_of::<u64>() as isize {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(error);
            }
            guard.clear_ready();
        }
    }
}

/// The open-loop pacer: frame `j` is due at `start + j * batch / rate` on stream
/// `j % streams`. Between frames it sleeps on a [`FineTimer`], never spinning; a frame
/// sent late keeps its intended time.
async fn pace(
    lanes: &[Rc<RefCell<Lane>>],
    mut sends: Vec<quinn::SendStream>,
    batch: usize,
    rate: f64,
    frames_in_flight_max: usize,
) -> anyhow::Result<()> {
    let mut builder = FrameBuilder::new(batch);
    let timer = FineTimer::new().context("a timerfd for the pacer")?;
    let (start, until) = {
        let lane = lanes[0].borrow();
        (lane.window.start, lane.window.until)
    };
    let interval_ns = batch as f64 / rate * 1e9;
    for j in 0u64.. {
        let due = start + Duration::from_nanos((j as f64 * interval_ns) as u64);
        if due >= until {
            break;
        }
        timer.sleep(due.saturating_duration_since(Instant::now())).await.context("the pacer's timer")?;
        let k = (j % lanes.len() as u64) as usize;
        let room = lanes[k].borrow().room.clone();
        while lanes[k].borrow().in_flight >= frames_in_flight_max {
            room.notified().await;
        }
        let now = Instant::now();
        {
            let mut lane = lanes[k].borrow_mut();
            let lag = now.saturating_duration_since(due);
            if lane.window.contains(due) {
                if lag > LATE_SEND {
                    lane.stats.late_sends += 1;
                }
                lane.stats.lag_max = lane.stats.lag_max.max(lag);
            }
            lane.lane_build(&mut builder, due, now);
        }
        sends[k].write_all(builder.frame_builder_encode()).await.context("send a frame")?;
        // `write_all` rarely waits, so a pacer that is behind would otherwise never let the
        // connections' drivers transmit, nor the receivers read, until it caught up.
        tokio::task::yield_now().await;
    }
    for send in &mut sends {
        send.finish().context("finish a stream")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drop counters are found by name in `/proc/net/snmp`'s `Udp:` lines (their
    /// columns moved between kernels), not taken from `UdpLite:`; a file without them is
    /// an error, not zero drops.
    #[test]
    fn udp_drops_are_read_by_name_from_the_udp_lines() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    Udp: 8952227 0 1084 8953312 1083 7 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    UdpLite: 0 0 0 0 5 6 0\n";
        let drops = UdpDrops::parse(snmp).expect("the Udp counters");
        assert_eq!((drops.receive_buffer, drops.send_buffer), (1083, 7));
        let later = UdpDrops { receive_buffer: 1100, send_buffer: 7 };
        let window = UdpDrops::between(&drops, &later);
        assert_eq!((window.receive_buffer, window.send_buffer), (17, 0));
        assert!(UdpDrops::parse("Udp: InDatagrams NoPorts\nUdp: 1 2\n").is_err());
        assert!(UdpDrops::parse("Ip: Forwarding\nIp: 1\n").is_err());
        UdpDrops::sample().expect("this machine's /proc/net/snmp has the Udp counters");
    }

    /// The pacer's timer never returns early (a frame sent before its intended time would
    /// flatter the latency), fires again after firing once (it is re-armed per frame), and
    /// returns at once for a zero wait.
    #[test]
    fn fine_timer_waits_at_least_as_asked_and_rearms() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async {
            let timer = FineTimer::new().expect("a timerfd");
            for wait in [Duration::from_micros(150), Duration::from_millis(3), Duration::from_micros(1)] {
                let started = Instant::now();
                timer.sleep(wait).await.expect("the timer fires");
                assert!(started.elapsed() >= wait, "woke after {:?}, asked {wait:?}", started.elapsed());
            }
            timer.sleep(Duration::ZERO).await.expect("a zero wait returns");
        });
    }

    #[test]
    fn the_timeline_bins_requests_by_intended_send_time_and_merges_lanes() {
        let mut lane = Stats::new();
        lane.timeline_record(Duration::from_millis(3), Duration::from_micros(200));
        lane.timeline_record(Duration::from_millis(9), Duration::from_micros(1_500));
        lane.timeline_record(Duration::from_millis(25), Duration::from_micros(900));
        let mut other = Stats::new();
        other.timeline_record(Duration::from_millis(1), Duration::from_millis(7));
        let mut all = Stats::new();
        all.merge(&other);
        all.merge(&lane);
        assert_eq!(
            all.timeline,
            vec![
                TimelineBin { requests: 3, over_1ms: 2, slowest_us: 7_000 },
                TimelineBin::default(),
                TimelineBin { requests: 1, over_1ms: 0, slowest_us: 900 },
            ]
        );
        assert_eq!(
            all.timeline_text(),
            "# ms into the measured window, requests, over 1 ms, slowest us\n0 3 2 7000\n10 0 0 0\n20 1 0 900\n"
        );
    }

    #[test]
    fn stalls_count_the_rounds_over_two_and_a_half_and_ten_ms_and_their_least_time() {
        // 1,000 rounds: 990 under 1 ms, 6 of 2.5 to 5 ms, 3 of 10 to 25 ms, 1 over 25 ms.
        let buckets = vec![(0.001, 990), (0.0025, 990), (0.005, 996), (0.01, 996), (0.025, 999), (f64::INFINITY, 1000)];
        assert_eq!(ServerFigures::stalls(&buckets), "over 2.5 ms 10 (at least 70.0 ms in all), over 10 ms 4");
        assert_eq!(ServerFigures::stalls(&[(0.001, 5), (f64::INFINITY, 5)]), "no 2.5 and 10 ms buckets");
        assert_eq!(ServerFigures::stalls(&[]), "no 2.5 and 10 ms buckets");
    }

    /// The WAL's histograms are summed over shards by bucket bound, other metrics are
    /// ignored, a window is the difference of two scrapes, and each quantile is named by
    /// the bound of the bucket it falls in.
    #[test]
    fn wal_rounds_are_bucket_differences_summed_over_shards() {
        let scrape = |fast: u64, slow: u64| {
            format!(
                "# TYPE stockplane_wal_fdatasync_seconds histogram\n\
                 stockplane_wal_fdatasync_seconds_bucket{{shard=\"0\",le=\"0.0005\"}} {fast}\n\
                 stockplane_wal_fdatasync_seconds_bucket{{shard=\"0\",le=\"0.0025\"}} {}\n\
                 stockplane_wal_fdatasync_seconds_bucket{{shard=\"0\",le=\"+Inf\"}} {}\n\
                 stockplane_wal_fdatasync_seconds_bucket{{shard=\"1\",le=\"0.0005\"}} 10\n\
                 stockplane_wal_fdatasync_seconds_bucket{{shard=\"1\",le=\"0.0025\"}} 10\n\
                 stockplane_wal_fdatasync_seconds_bucket{{shard=\"1\",le=\"+Inf\"}} 10\n\
                 stockplane_wal_fdatasync_seconds_sum{{shard=\"0\"}} 1.5\n\
                 stockplane_wal_fdatasync_seconds_count{{shard=\"0\"}} {}\n\
                 stockplane_wal_write_seconds_bucket{{shard=\"0\",le=\"0.0005\"}} 999\n\
                 stockplane_wal_write_seconds_bucket{{shard=\"0\",le=\"+Inf\"}} {}\n\
                 stockplane_wal_sync_seconds_bucket{{shard=\"0\",le=\"0.001\"}} {fast}\n\
                 stockplane_wal_sync_seconds_bucket{{shard=\"0\",le=\"+Inf\"}} {}\n",
                fast + slow,
                fast + slow,
                fast + slow,
                999 + slow,
                fast + slow
            )
        };
        let before = ServerFigures::parse(&scrape(100, 0));
        assert_eq!(before.fdatasync, vec![(0.0005, 110), (0.0025, 110), (f64::INFINITY, 110)]);
        assert_eq!(before.round, vec![(0.001, 100), (f64::INFINITY, 100)]);
        assert_eq!(before.write, vec![(0.0005, 999), (f64::INFINITY, 999)]);
        // In the window: 90 fast and 10 slow (between 0.5 and 2.5 ms); shard 1 idle.
        let window = ServerFigures::between(&before, &ServerFigures::parse(&scrape(190, 10)));
        assert_eq!(window.fdatasync, vec![(0.0005, 90), (0.0025, 100), (f64::INFINITY, 100)]);
        // The 10 slow writes of the window are above the last finite bound.
        assert_eq!(window.write, vec![(0.0005, 0), (f64::INFINITY, 10)]);
        assert_eq!(ServerFigures::quantiles(&window.fdatasync), "100, p50 <= 500 us, p90 <= 500 us, p99 <= 2500 us");
        // Rounds slower than the largest finite bound are said to be above it.
        assert_eq!(ServerFigures::quantiles(&window.round), "100, p50 <= 1000 us, p90 <= 1000 us, p99 > 1000 us");
        // QUIC counters, summed over shards, and their differences over the window.
        let quic = |sent: u64, lost: u64| {
            format!(
                "stockplane_quic_packets_sent_total{{shard=\"0\"}} {sent}\n\
                 stockplane_quic_packets_sent_total{{shard=\"1\"}} 5\n\
                 stockplane_quic_packets_lost_total{{shard=\"0\"}} {lost}\n\
                 stockplane_quic_packets_lost_totally_else 99\n"
            )
        };
        assert_eq!(ServerFigures::parse(&quic(100, 1)).quic, [105, 1, 0]);
        let window = ServerFigures::between(&ServerFigures::parse(&quic(100, 1)), &ServerFigures::parse(&quic(150, 4)));
        assert_eq!(window.quic, [50, 3, 0]);
        assert!(window.line().ends_with("50 packets sent, 3 declared lost, 0 congestion events"), "{}", window.line());
        // A server without a log (`--durability none`) has none.
        let empty = ServerFigures::parse("stockplane_requests_total 5\n");
        assert_eq!(empty, ServerFigures { write: vec![], fdatasync: vec![], round: vec![], quic: [0; 3] });
        assert_eq!(ServerFigures::quantiles(&empty.fdatasync), "none");
        // ... and no stalls to count; a window with rounds counts them.
        assert!(empty.line().starts_with("server WAL in the measured window (its /metrics histograms): writes none; fdatasyncs none; rounds, taken to durable none\n"), "{}", empty.line());
        // Writes and fdatasyncs count theirs after their quantiles, so that a slow round
        // shows which of the two was slow; without those buckets, only the quantiles.
        let slow = ServerFigures {
            write: vec![(0.0025, 8), (0.01, 10), (f64::INFINITY, 10)],
            fdatasync: vec![(0.0005, 9), (f64::INFINITY, 10)],
            round: vec![(0.0025, 9), (0.01, 9), (f64::INFINITY, 10)],
            quic: [0; 3],
        };
        assert!(
            slow.line().starts_with(
                "server WAL in the measured window (its /metrics histograms): writes 10, p50 <= 2500 us, p90 <= \
                 10000 us, p99 <= 10000 us, over 2.5 ms 2, over 10 ms 0; fdatasyncs 10, p50 <= 500 us, p90 <= 500 \
                 us, p99 > 500 us; rounds, taken to durable 10,"
            ),
            "{}",
            slow.line()
        );
        assert!(
            slow.line().contains("p99 > 10000 us; over 2.5 ms 1 (at least 10.0 ms in all), over 10 ms 1\n"),
            "{}",
            slow.line()
        );
    }
}
