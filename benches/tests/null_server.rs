//! The null server speaks the data plane's protocol: the checkout client (mutual TLS,
//! ALPN, validated frames) gets the statuses a healthy data plane gives, so that the
//! calibration run of `make bench-e2e` measures the same work on the wire.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use stockplane_wire::client::{Client, ClientConfig};
use stockplane_wire::{Body, CartLine, HoldId, HoldInfo, HoldState, Status};

/// The null server on a port the kernel picks; killed when dropped.
struct NullServer {
    child: Child,
    addr: SocketAddr,
}

impl NullServer {
    fn start(certs: &std::path::Path) -> NullServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_null_server"))
            .args(["--listen", "127.0.0.1:0", "--certs"])
            .arg(certs)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the null server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read its first line");
        let addr = line.trim().strip_prefix("serving on ").expect("a 'serving on' line").parse().expect("an address");
        NullServer { child, addr }
    }
}

impl Drop for NullServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_null_server_answers_as_a_healthy_data_plane_would() {
    let certs = std::env::temp_dir().join(format!("stockplane-null-certs-{}", std::process::id()));
    stockplane_dataplane::certs::write_dev_certs(&certs).expect("write development certificates");
    let server = NullServer::start(&certs);
    let mut config = ClientConfig::from_pem_files(
        vec![server.addr],
        certs.join("ca.pem"),
        certs.join("checkout.pem"),
        certs.join("checkout.key"),
    );
    config.connections = 1;
    let client = Client::connect(config).await.expect("connect with mutual TLS");
    let hold = HoldId(0x5eed);
    let reserved = client.reserve(hold, 60_000, vec![CartLine { sku: 7, location: None, qty: 1 }]).await.unwrap();
    assert_eq!(reserved.status, Status::Reserved);
    let Body::Hold(info) = reserved.body else { panic!("a reserve answers with its hold: {:?}", reserved.body) };
    assert_eq!((info.hold, info.state), (hold, HoldState::Held));
    let committed = client.commit(hold, None).await.unwrap();
    assert_eq!(committed.status, Status::Committed);
    assert!(matches!(committed.body, Body::Hold(HoldInfo { state: HoldState::Committed, .. })));
    drop(server);
    let _ = std::fs::remove_dir_all(&certs);
}
