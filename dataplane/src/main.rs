//! `dataplane`: the stockplane data plane server and its tools.
//!
//! Each subcommand is one variant of [`Command`] with its own arguments struct; the server
//! (`serve`) lands as another variant.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use stockplane_dataplane::certs::{write_dev_certs, DEV_CERT_FILES};

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
    /// Write development certificates (CA, server, one client per role).
    Certs(CertsArgs),
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
        Command::Certs(args) => certs(&args),
    }
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
