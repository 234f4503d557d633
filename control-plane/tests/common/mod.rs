//! What the control plane's tests run against, all real: a PostgreSQL database of their
//! own (in the cluster that `DATABASE_URL` names, or else the private cluster under
//! `target/pg` that `scripts/pg.sh` starts), a data plane on loopback with development
//! certificates, and the control plane itself, in process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::Connection;
use stockplane_control_plane::dataplane::Dataplane;
use stockplane_control_plane::{App, Config};
use stockplane_dataplane::certs::write_dev_certs;
use stockplane_dataplane::Server;

/// The workspace's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// Runs `scripts/pg.sh <command> <dir>` and returns what it printed (a URL for start).
pub fn pg_script(command: &str, dir: &Path) -> String {
    let out = std::process::Command::new(root().join("scripts/pg.sh"))
        .arg(command)
        .arg(dir)
        .output()
        .expect("run scripts/pg.sh");
    assert!(out.status.success(), "scripts/pg.sh {command} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8").trim().to_string()
}

/// The URL of the cluster the tests use: `DATABASE_URL`, or the private cluster.
pub fn cluster_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => pg_script("start", &root().join("target/pg")),
    })
    .clone()
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a URL with a database");
    let query = url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    format!("{base}/{name}{query}")
}

/// A new, empty database in `cluster` (a URL of any database in it); returns its URL.
pub async fn fresh_database_in(cluster: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "cp_test_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 1_000_000
    );
    let mut admin = sqlx::PgConnection::connect(cluster).await.expect("connect to the test cluster");
    drop_stale_databases(&mut admin).await;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create a test database");
    with_database(cluster, &name)
}

/// Drops, once per test process, the databases that earlier test processes made and left
/// behind (named `cp_test_<pid>_...` after a process that no longer runs), so that the
/// private cluster does not grow with every `make test`.
async fn drop_stale_databases(admin: &mut sqlx::PgConnection) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::AcqRel) {
        return;
    }
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'cp\\_test\\_%'")
        .fetch_all(&mut *admin)
        .await
        .expect("list test databases");
    for name in names {
        let pid = name.split('_').nth(2).and_then(|pid| pid.parse::<u32>().ok());
        let gone = pid.is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            // Another test process may be dropping it too: either way it goes.
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut *admin).await;
        }
    }
}

/// A new, empty database in the tests' cluster.
pub async fn fresh_database() -> String {
    fresh_database_in(&cluster_url()).await
}

/// A data plane on loopback, its certificates and data in a fresh directory.
pub struct TestDataplane {
    pub server: Option<Server>,
    pub dir: PathBuf,
    pub cores: usize,
    /// The port it listens on, kept across restarts.
    pub port: u16,
}

/// A fresh directory under the system's temporary folder.
pub fn temp_dir(what: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "stockplane-cp-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("make a temporary directory");
    dir
}

/// The data plane's configuration for tests: small bounds, loopback, data in `dir`.
pub fn dataplane_config(dir: &Path, cores: usize, data: &str) -> stockplane_dataplane::Config {
    let mut config = stockplane_dataplane::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        cores,
        io_memory_bytes: 512 << 10,
        ..stockplane_dataplane::Config::default()
    };
    config.shard.skus_max = 1 << 14;
    config.shard.sku_locations_max = 1 << 15;
    config.shard.holds_max = 1 << 13;
    config.shard.holds_finished_max = 1 << 12;
    config.shard.hold_extra_lines_max = 1 << 13;
    config.shard.carts_max = 1 << 11;
    config.shard.carts_finished_max = 1 << 10;
    config.shard.journal_entries_max = 1 << 16;
    config.shard.adjustments_retained_max = 1 << 14;
    config.shard.outbox_max = 1 << 13;
    config.shard.hold_ttl_ms_min = 10;
    config.wal.segment_bytes = 1 << 22;
    config.tls.cert = dir.join("server.pem");
    config.tls.key = dir.join("server.key");
    config.tls.client_ca = dir.join("ca.pem");
    config.data_dir = dir.join(data);
    config
}

impl TestDataplane {
    /// Starts a data plane with `cores` shards.
    pub fn start(cores: usize) -> TestDataplane {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = temp_dir("dp");
        write_dev_certs(&dir).expect("write certificates");
        let server = Server::start(dataplane_config(&dir, cores, "data")).expect("start the data plane");
        let port = server.addr().port();
        TestDataplane { server: Some(server), dir, cores, port }
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("the data plane runs")
    }

    /// Stops the server, keeping its data.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().expect("the data plane stops cleanly");
        }
    }

    /// Starts it again (stopping it first if it runs) on the same port, from its data
    /// (or from a fresh, empty data directory named `data`).
    pub fn restart(&mut self, data: &str) {
        let port = self.port;
        self.stop();
        let mut config = dataplane_config(&self.dir, self.cores, data);
        config.listen = format!("127.0.0.1:{port}").parse().unwrap();
        // The port may take a moment to be free again after the stop.
        let mut tries = 0;
        let server = loop {
            match Server::start(config.clone()) {
                Ok(server) => break server,
                Err(error) if tries < 50 => {
                    tries += 1;
                    let _ = error;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(error) => panic!("restart the data plane: {error:#}"),
            }
        };
        self.server = Some(server);
    }

    /// The control plane's configuration for reaching this data plane.
    pub fn link_config(&self) -> stockplane_control_plane::config::DataplaneConfig {
        stockplane_control_plane::config::DataplaneConfig {
            addr: self.server().addr(),
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join("control.pem"),
            key: self.dir.join("control.key"),
            ..Default::default()
        }
    }

    /// A `wire` client with a role's certificate (`checkout` or `control`).
    pub async fn client(&self, role: &str) -> stockplane_wire::client::Client {
        let config = stockplane_wire::client::ClientConfig::from_pem_files(
            vec![self.server().addr()],
            self.dir.join("ca.pem"),
            self.dir.join(format!("{role}.pem")),
            self.dir.join(format!("{role}.key")),
        );
        stockplane_wire::client::Client::connect(config).await.expect("connect to the data plane")
    }

    /// The control plane's connection to it.
    pub async fn control(&self) -> Dataplane {
        Dataplane::connect(&self.link_config()).await.expect("connect the control plane to the data plane")
    }
}

impl Drop for TestDataplane {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Admin and read-only tokens of the tests.
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";
pub const READ_TOKEN: &str = "read-token-0123456789";

/// A control plane configuration over `database_url` and `dataplane`, listening on a
/// free port, with fast idle periods.
pub fn control_config(database_url: &str, dataplane: Option<&TestDataplane>) -> Config {
    let mut config = Config { listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
    config.database.url = database_url.to_string();
    config.database.connections = 8;
    config.auth.admin_tokens = vec![ADMIN_TOKEN.into()];
    config.auth.read_tokens = vec![READ_TOKEN.into()];
    config.drain.idle_ms = 5;
    config.push.idle_ms = 20;
    if let Some(dataplane) = dataplane {
        config.dataplane = dataplane.link_config();
    }
    config
}

/// Starts the control plane in process (without its background sync unless `sync`).
pub async fn control_plane(config: Config, sync: bool) -> App {
    let app = App::start(config).await.expect("start the control plane");
    if sync {
        app.spawn_sync();
    }
    app
}

/// Serves the app's HTTP router on a free port; returns its base URL.
pub async fn serve_http(app: &App) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app.router(None);
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve HTTP");
    });
    format!("http://{addr}")
}

/// Polls `check` every 10 ms until it returns `Some`, for at most `within`; panics
/// with `what` otherwise. For waiting on background work whose completion the test
/// then asserts on, not for timing.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
