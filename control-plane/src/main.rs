//! `control-plane`: the back-office API over PostgreSQL, and the sync with the data plane.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stockplane_control_plane::dataplane::Dataplane;
use stockplane_control_plane::db::Db;
use stockplane_control_plane::{app, reconcile, App, Config};

/// The stockplane control plane: PostgreSQL is the system of record for the catalog and
/// the books; this service serves the back-office API, pushes catalog and stock changes
/// to the data plane, and drains its sales into PostgreSQL exactly once.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// The TOML configuration file (see control-plane/control-plane.toml for every key).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service: migrations, the HTTP API, the drain and the pusher.
    Serve {
        /// Listen here instead of the configured address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Reach the data plane here instead of the configured address.
        #[arg(long)]
        dataplane: Option<std::net::SocketAddr>,
        /// Take the data plane's certificates (ca.pem, control.pem, control.key) from here.
        #[arg(long)]
        certs: Option<PathBuf>,
    },
    /// Run the migrations and exit.
    Migrate,
    /// Compare the books with the data plane, print the report as JSON, and exit 1 if
    /// any row differs.
    Reconcile {
        /// Reach the data plane here instead of the configured address.
        #[arg(long)]
        dataplane: Option<std::net::SocketAddr>,
        /// Take the data plane's certificates from here.
        #[arg(long)]
        certs: Option<PathBuf>,
    },
    /// Print the effective configuration as TOML.
    Config,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn with_overrides(
    mut config: Config,
    listen: Option<std::net::SocketAddr>,
    dataplane: Option<std::net::SocketAddr>,
    certs: Option<PathBuf>,
) -> Config {
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if let Some(addr) = dataplane {
        config.dataplane.addr = addr;
    }
    if let Some(dir) = certs {
        config.dataplane.ca = dir.join("ca.pem");
        config.dataplane.cert = dir.join("control.pem");
        config.dataplane.key = dir.join("control.key");
    }
    config
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve { listen, dataplane, certs } => {
            let config = with_overrides(config, listen, dataplane, certs);
            let metrics = app::metrics_install()?;
            let app = App::start(config).await?;
            app.spawn_sync();
            app.serve(Some(metrics), shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            Db::connect(&config.database.url, 1, config.database.statement_timeout_ms).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile { dataplane, certs } => {
            let config = with_overrides(config, None, dataplane, certs);
            let db = Db::connect(&config.database.url, 4, config.database.statement_timeout_ms).await?;
            let dataplane = Dataplane::connect(&config.dataplane).await?;
            db.shards_learn(dataplane.shards()).await?;
            let report = reconcile::reconcile(&db, &dataplane).await?;
            println!("{}", serde_json::to_string_pretty(&report).context("render the report")?);
            Ok(if report.differences.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Config => {
            print!("{}", toml::to_string(&config).context("render the configuration")?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
