//! A real data plane on loopback for end-to-end tests: development certificates in a
//! fresh directory, every core serving, and clients (the `wire` client, or raw quinn for
//! what the client would never send).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stockplane_dataplane::certs::{write_dev_certs, DevCa};
use stockplane_dataplane::{Config, Server};
use stockplane_wire::client::{Client, ClientConfig};
use stockplane_wire::frame::{self, FrameBuf, Limits, HEADER_LEN};
use stockplane_wire::{transport, ArchivedResponseBatch, Request, RequestBatch, Response};

/// A running server and the directory of its certificates.
pub struct TestServer {
    pub server: Server,
    pub dir: PathBuf,
    pub ca: DevCa,
}

/// Bounds small enough that a shard starts in milliseconds.
pub fn test_config(cores: usize) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        cores,
        io_memory_bytes: 512 << 10,
        ..Config::default()
    };
    config.shard.skus_max = 1 << 12;
    config.shard.sku_locations_max = 1 << 12;
    config.shard.holds_max = 1 << 12;
    config.shard.holds_finished_max = 1 << 10;
    config.shard.hold_extra_lines_max = 1 << 12;
    config.shard.carts_max = 1 << 10;
    config.shard.carts_finished_max = 1 << 8;
    config.shard.journal_entries_max = 1 << 12;
    config.shard.adjustments_retained_max = 1 << 10;
    config.shard.outbox_max = 1 << 12;
    config.shard.hold_ttl_ms_min = 10;
    config.wal.segment_bytes = 1 << 20;
    config
}

/// Starts a server with `cores` cores; `tweak` adjusts the configuration first.
pub fn start(cores: usize, tweak: impl FnOnce(&mut Config)) -> TestServer {
    // RUST_LOG=debug shows the server's logs with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "stockplane-e2e-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    write_dev_certs(&dir).expect("write certificates");
    let ca = DevCa::load(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca.key")).unwrap(),
    )
    .expect("load the CA");
    let mut config = test_config(cores);
    config.tls.cert = dir.join("server.pem");
    config.tls.key = dir.join("server.key");
    config.tls.client_ca = dir.join("ca.pem");
    config.data_dir = dir.join("data");
    tweak(&mut config);
    let server = Server::start(config).expect("start the server");
    TestServer { server, dir, ca }
}

impl TestServer {
    /// Stops the server (every core must stop cleanly) and removes the certificates.
    pub fn stop(self) {
        self.server.stop().expect("every core stops cleanly");
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The PEM files of a role's development certificate.
    pub fn pems(&self, role: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let read = |name: String| std::fs::read(self.dir.join(name)).unwrap();
        (read("ca.pem".into()), read(format!("{role}.pem")), read(format!("{role}.key")))
    }

    /// The `wire` client with a role's certificate.
    pub async fn client(&self, role: &str) -> Client {
        let (ca, cert, key) = self.pems(role);
        let mut config = ClientConfig::from_pem(vec![self.server.addr()], ca, cert, key);
        config.connections = 2;
        Client::connect(config).await.expect("connect")
    }

    /// A raw quinn connection with a role's certificate.
    pub async fn raw(&self, role: &str) -> quinn::Connection {
        let (ca, cert, key) = self.pems(role);
        raw_connect(self.server.addr(), &ca, Some((&cert, &key))).await.expect("connect")
    }
}

/// A TLS 1.3 client configuration trusting `ca`, presenting `identity` when given.
pub fn client_crypto(ca: &[u8], identity: Option<(&[u8], &[u8])>) -> rustls::ClientConfig {
    if let Some((cert, key)) = identity {
        return stockplane_wire::client::tls_config(ca, cert, key).expect("TLS configuration");
    }
    // Without a certificate: what the client itself never does.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut crypto = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![transport::ALPN.to_vec()];
    crypto
}

/// Connects with raw quinn; the error is whatever the handshake said.
pub async fn raw_connect(
    addr: SocketAddr,
    ca: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let crypto = client_crypto(ca, identity);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let connecting = endpoint.connect(addr, "localhost").unwrap();
    let connection = connecting.await?;
    // The handshake may complete on our side before the server has checked our role;
    // a round trip makes sure that a refusal has arrived (or that none will).
    Ok(connection)
}

/// An encoded request frame.
pub fn request_frame(requests: Vec<Request>) -> Vec<u8> {
    frame::encode_requests(&RequestBatch { requests }).to_vec()
}

/// Reads response frames from `recv` until `count` responses have arrived.
pub async fn read_responses(recv: &mut quinn::RecvStream, count: usize) -> Vec<Response> {
    let mut out = Vec::new();
    let mut buf = FrameBuf::new();
    while out.len() < count {
        let mut header = [0u8; HEADER_LEN];
        recv.read_exact(&mut header).await.expect("read a header");
        let parsed = frame::header_parse(&header).expect("a valid header");
        let mut payload = vec![0u8; parsed.frame_len() - HEADER_LEN];
        recv.read_exact(&mut payload).await.expect("read a payload");
        buf.clear();
        buf.extend_from_slice(&header);
        buf.extend_from_slice(&payload);
        let batch: &ArchivedResponseBatch = frame::decode_responses(buf.as_bytes(), &Limits::default()).unwrap();
        for response in batch.responses.iter() {
            out.push(rkyv::deserialize::<Response, rkyv::rancor::Error>(response).unwrap());
        }
    }
    out
}

/// Sends one frame on a new stream and reads `count` responses, sorted by request id.
pub async fn round_trip(conn: &quinn::Connection, requests: Vec<Request>) -> Vec<Response> {
    let count = requests.len();
    let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
    send.write_all(&request_frame(requests)).await.expect("write");
    send.finish().unwrap();
    let mut responses = read_responses(&mut recv, count).await;
    responses.sort_by_key(|r| r.id);
    responses
}

/// A client certificate signed by `ca`, valid for `roles` between the two times.
pub fn client_cert(ca: &DevCa, roles: &[&str], valid_from: SystemTime, valid_until: SystemTime) -> (String, String) {
    ca.client_cert(roles, valid_from, valid_until).expect("sign a client certificate")
}

/// A day, for certificate validity.
pub const DAY: Duration = Duration::from_secs(86_400);

/// `GET path` from the admin endpoint at `addr` (the whole answer, head and body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The wall clock in milliseconds since the epoch, the clock of the data plane's expiries.
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
