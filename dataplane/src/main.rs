//! `dataplane`: the stockplane data plane server and its tools.
//!
//! Each subcommand is one variant of [`Command`] with its own arguments struct.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use stockplane_dataplane::certs::{write_dev_certs, DEV_CERT_FILES};
use stockplane_dataplane::{Config, Server};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The stockplane data plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve: one shard per core behind QUIC with mutual TLS, until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Print the configuration that `serve` would use (the defaults, the file, the flags), as TOML.
    Config(ServeArgs),
    /// Write development certificates (CA, server, one client per role).
    Certs(CertsArgs),
}

/// Arguments of `dataplane serve`; each flag overrides the key of the same name in the file.
#[derive(Debug, Args)]
struct ServeArgs {
    /// A TOML configuration file (see dataplane/dataplane.toml for every key and its default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The UDP address for QUIC (`listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The HTTP address for /metrics, /healthz and /readyz (`admin_listen`).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// How many cores (shards) to run; 0 = every core (`cores`).
    #[arg(long)]
    cores: Option<usize>,
    /// The first CPU to pin to (`cpu_first`).
    #[arg(long)]
    cpu_first: Option<usize>,
    /// The directory holding server.pem, server.key and ca.pem (overrides the `tls` keys).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Where each shard keeps its write-ahead log (`data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `sync` (acknowledged = on disk), `batch=<ms>` (up to <ms> of acknowledged work can
    /// be lost with the machine) or `none` (no log: benchmarks only) (`wal.durability`).
    #[arg(long)]
    durability: Option<String>,
    /// Cut a shard's log at a damaged record instead of refusing to start, losing what
    /// follows it (`wal.truncate_corrupt_tail`).
    #[arg(long)]
    truncate_corrupt_tail: bool,
}

impl ServeArgs {
    /// The configuration: defaults, then the file, then the flags.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(admin_listen) = self.admin_listen {
            config.admin_listen = admin_listen;
        }
        if let Some(cores) = self.cores {
            config.cores = cores;
        }
        if let Some(cpu_first) = self.cpu_first {
            config.cpu_first = cpu_first;
        }
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(durability) = &self.durability {
            config.wal.durability = durability.clone();
        }
        if self.truncate_corrupt_tail {
            config.wal.truncate_corrupt_tail = true;
        }
        if let Some(dir) = &self.certs {
            config.tls.cert = dir.join("server.pem");
            config.tls.key = dir.join("server.key");
            config.tls.client_ca = dir.join("ca.pem");
        }
        config.validate()?;
        Ok(config)
    }
}

/// Arguments of `dataplane certs`.
#[derive(Debug, Args)]
struct CertsArgs {
    /// The directory to write into; created if missing, existing files are overwritten.
    #[arg(long, default_value = "target/certs")]
    dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Config(args) => {
            print!("{}", toml::to_string(&args.config()?).context("print the configuration")?);
            Ok(())
        }
        Command::Certs(args) => certs(&args),
    }
}

/// `dataplane serve`: runs until SIGINT or SIGTERM, then closes connections and stops.
fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    // Logs on stderr; stdout carries only the line that says where the server listens.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let config = args.config()?;
    let server = Server::start(config).context("start the data plane")?;
    println!("serving on {} (admin on http://{})", server.addr(), server.admin_addr());
    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, signalled.clone()).context("install signal handlers")?;
    }
    while !signalled.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!("signal received; stopping");
    server.stop().map(|_| ())
}

/// `dataplane certs`: writes the development certificates and lists them.
fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    write_dev_certs(&args.dir).with_context(|| format!("write development certificates to {}", args.dir.display()))?;
    for name in DEV_CERT_FILES {
        println!("wrote {}", args.dir.join(name).display());
    }
    println!("development only: ca.key can sign certificates this server trusts");
    Ok(())
}
