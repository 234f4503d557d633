//! A null server for calibrating `make bench-e2e`: the data plane's protocol (QUIC with
//! mutual TLS, ALPN `stockplane/1`, validated request frames, response frames) on one
//! thread, with no engine, no log and no limits behind it. Each request is answered at
//! once with the status a healthy data plane would give it (`Reserved`, `Committed`,
//! `Released`, else `Ok`) and, for holds, a body of the same shape as the real one.
//!
//! It is built on quinn and tokio (the client's stack), not on the data plane's glommio
//! driver, so it measures what QUIC and framing alone cost on this host today: the issue
//! expects a bare quinn echo of 128-request frames to move about 6 to 8 million requests
//! per second on the machine it was written on. Run beside the data plane in the same
//! report, it tells a slow host from a slow server. It is a benchmark's yardstick and
//! must never be mistaken for a server: it keeps no state and checks nothing but frames.
//!
//! Usage: `null_server --certs target/certs --listen 127.0.0.1:0`; it prints
//! `serving on ADDR` and serves until killed. Pin it with `taskset`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stockplane_wire::frame::{self, AlignedVec, Limits, FRAME_ALIGN, HEADER_LEN};
use stockplane_wire::{ArchivedOp, Body, HoldId, HoldInfo, HoldState, Response, ResponseBatch, Status};

#[derive(Parser)]
#[command(about = "A null stockplane server (QUIC and framing only) for calibrating benchmarks")]
struct Cli {
    /// The UDP address to serve on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The directory of the development certificates (server.pem, server.key, ca.pem).
    #[arg(long, default_value = "target/certs")]
    certs: PathBuf,
    /// UDP socket buffer size, both directions: by default the data plane's own
    /// (`quic.socket_buffer_bytes`), so that the yardstick drops no more datagrams than the
    /// server it calibrates (the kernel caps it at net.core.rmem_max / wmem_max).
    #[arg(long, default_value_t = stockplane_dataplane::config::Config::default().quic.socket_buffer_bytes)]
    socket_buffer_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let crypto = stockplane_dataplane::tls::server_crypto(
        &cli.certs.join("server.pem"),
        &cli.certs.join("server.key"),
        &cli.certs.join("ca.pem"),
    )
    .context("load the server's TLS configuration")?;
    let mut config = stockplane_dataplane::tls::quic_server_config(crypto)?;
    // Windows as large as the driver's, so that flow control never paces the calibration.
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1_024))
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20);
    config.transport_config(Arc::new(transport));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start tokio")?;
    runtime.block_on(async move {
        // Bound as the data plane binds each core's socket (one core here).
        let socket = stockplane_dataplane::udp::bind_reuseport(cli.listen, 1, cli.socket_buffer_bytes)?
            .pop()
            .context("one socket")?;
        let endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, Arc::new(quinn::TokioRuntime))
                .context("start the endpoint")?;
        println!("serving on {}", endpoint.local_addr()?);
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                if let Ok(connection) = incoming.await {
                    while let Ok((send, recv)) = connection.accept_bi().await {
                        tokio::spawn(null_serve_stream(send, recv));
                    }
                }
            });
        }
        Ok(())
    })
}

/// Answers every frame of one stream until it ends or breaks.
async fn null_serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let limits = Limits::default();
    let mut frame = AlignedVec::<FRAME_ALIGN>::new();
    let mut encoded = AlignedVec::<FRAME_ALIGN>::new();
    let mut batch = ResponseBatch::default();
    loop {
        let mut header = [0u8; HEADER_LEN];
        if recv.read_exact(&mut header).await.is_err() {
            return;
        }
        let Ok(parsed) = frame::header_parse(&header) else { return };
        if parsed.check_limits(&limits).is_err() {
            return;
        }
        frame.clear();
        frame.extend_from_slice(&header);
        // quinn's chunks are copied once, into the aligned frame; nothing is zeroed first.
        while frame.len() < parsed.frame_len() {
            match recv.read_chunk(parsed.frame_len() - frame.len(), true).await {
                Ok(Some(chunk)) => frame.extend_from_slice(&chunk.bytes),
                _ => return,
            }
        }
        let Ok(requests) = frame::decode_requests(&frame, &limits) else { return };
        batch.responses.clear();
        batch.responses.extend(requests.requests.iter().map(|request| {
            let body = |hold: u128, state| {
                Body::Hold(HoldInfo { hold: HoldId(hold), state, expires_at_ms: 0, lines: Vec::new() })
            };
            let (status, body) = match &request.op {
                ArchivedOp::Reserve { hold, .. } => (Status::Reserved, body(hold.0.to_native(), HoldState::Held)),
                ArchivedOp::Commit { hold, .. } => (Status::Committed, body(hold.0.to_native(), HoldState::Committed)),
                ArchivedOp::Release { hold } => (Status::Released, body(hold.0.to_native(), HoldState::Released)),
                _ => (Status::Ok, Body::Empty),
            };
            Response { id: request.id.to_native(), status, body }
        }));
        frame::encode_responses_into(&mut encoded, &batch);
        if send.write_all(&encoded).await.is_err() {
            return;
        }
    }
}
