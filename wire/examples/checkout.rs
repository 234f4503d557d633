//! A checkout session against a running data plane, step by step.
//!
//! ```text
//! cargo run -p stockplane-wire --features client --example checkout -- \
//!     --addr 127.0.0.1:7400 --certs target/certs
//! ```
//!
//! With the control certificate it creates a few demo SKUs and restocks them (unless
//! `--catalog-ready`: the control plane has stocked them, 10 units each); with the
//! checkout certificate it reserves a cart, reads the stock, commits, reserves another
//! cart and releases it, tries to reserve more than is available, and repeats a reserve
//! with the same hold id to show that the retry returns the first answer. Hold and
//! adjustment ids are drawn from the clock, so every run starts fresh carts.
//!
//! The certificate directory holds what `make certs` writes: `ca.pem`, `control.pem`,
//! `control.key`, `checkout.pem`, `checkout.key`.

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use stockplane_wire::client::{Client, ClientConfig, Outcome};
use stockplane_wire::{Body, CartLine, HoldId, HoldsOf, SkuAt, Status};

/// The demo catalog: SKUs at location 1, each restocked with this many units.
const SKUS: [u64; 3] = [1001, 1002, 1003];
const LOCATION: u32 = 1;
const RESTOCK_UNITS: i64 = 10;
const HOLD_TTL_MS: u32 = 60_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let (addr, certs, catalog_ready) = args()?;
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    println!("data plane {addr}, certificates in {}, run {run:#x}", certs.display());

    if !catalog_ready {
        let control = Client::connect(config(addr, &certs, "control")).await?;
        println!("\n== control: catalog and stock");
        for (i, sku) in SKUS.into_iter().enumerate() {
            show(&format!("upsert sku {sku} at location {LOCATION}"), &control.upsert_sku(sku, LOCATION, 0).await?);
            let adjustment = run.wrapping_add(i as u128);
            let outcome = control.adjust(adjustment, sku, LOCATION, RESTOCK_UNITS).await?;
            show(&format!("restock sku {sku} with {RESTOCK_UNITS} units"), &outcome);
        }
        control.close().await;
    }

    let checkout = Client::connect(config(addr, &certs, "checkout")).await?;
    let stock: Vec<SkuAt> = SKUS.iter().map(|&sku| SkuAt { sku, location: Some(LOCATION) }).collect();
    println!("\n== checkout");
    show("stock before", &checkout.query_stock(stock.clone()).await?);

    let cart_a = HoldId(run << 8 | 1);
    let lines_a = vec![line(1001, 2), line(1002, 1)];
    show("reserve cart A (2 x 1001, 1 x 1002)", &checkout.reserve(cart_a, HOLD_TTL_MS, lines_a).await?);
    show("stock while cart A is held", &checkout.query_stock(stock.clone()).await?);
    show("holds of cart A", &checkout.query_holds(HoldsOf::Hold(cart_a)).await?);
    show("commit cart A", &checkout.commit(cart_a, None).await?);

    let cart_b = HoldId(run << 8 | 2);
    show("reserve cart B (3 x 1003)", &checkout.reserve(cart_b, HOLD_TTL_MS, vec![line(1003, 3)]).await?);
    show("release cart B", &checkout.release(cart_b).await?);

    let cart_c = HoldId(run << 8 | 3);
    let too_many = u32::try_from(RESTOCK_UNITS + 1)?;
    let outcome = checkout.reserve(cart_c, HOLD_TTL_MS, vec![line(1003, too_many)]).await?;
    show(&format!("reserve cart C ({too_many} x 1003, more than there is)"), &outcome);
    if outcome.status != Status::InsufficientStock {
        println!("   (expected InsufficientStock)");
    }

    let cart_d = HoldId(run << 8 | 4);
    let first = checkout.reserve(cart_d, HOLD_TTL_MS, vec![line(1002, 1)]).await?;
    show("reserve cart D (1 x 1002)", &first);
    let again = checkout.reserve(cart_d, HOLD_TTL_MS, vec![line(1002, 1)]).await?;
    show("reserve cart D again, same hold id (a retry)", &again);
    println!("   the retry returned the first answer: {}", if again == first { "yes" } else { "NO" });
    show("release cart D", &checkout.release(cart_d).await?);

    show("stock after", &checkout.query_stock(stock).await?);
    checkout.close().await;
    Ok(())
}

/// `--addr`, `--certs` and `--catalog-ready`, with their defaults.
fn args() -> Result<(SocketAddr, PathBuf, bool), Box<dyn Error>> {
    let mut addr: SocketAddr = "127.0.0.1:7400".parse()?;
    let mut certs = PathBuf::from("target/certs");
    let mut catalog_ready = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--addr" => addr = value()?.parse()?,
            "--certs" => certs = PathBuf::from(value()?),
            "--catalog-ready" => catalog_ready = true,
            "-h" | "--help" => {
                println!("usage: checkout [--addr 127.0.0.1:7400] [--certs target/certs] [--catalog-ready]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}; try --help").into()),
        }
    }
    Ok((addr, certs, catalog_ready))
}

/// A one-connection client configuration with the certificate of `role`.
fn config(addr: SocketAddr, certs: &Path, role: &str) -> ClientConfig {
    let mut config = ClientConfig::from_pem_files(
        vec![addr],
        certs.join("ca.pem"),
        certs.join(format!("{role}.pem")),
        certs.join(format!("{role}.key")),
    );
    config.connections = 1;
    config
}

fn line(sku: u64, qty: u32) -> CartLine {
    CartLine { sku, location: Some(LOCATION), qty }
}

/// Prints a step's status and body, one line per item.
fn show(step: &str, outcome: &Outcome) {
    println!("-> {step}: {:?} ({})", outcome.status, outcome.status.code());
    match &outcome.body {
        Body::Empty => {}
        Body::Hold(hold) => println!(
            "   hold {:#x} {:?}, expires at {} ms, lines {:?}",
            hold.hold.0, hold.state, hold.expires_at_ms, hold.lines
        ),
        Body::Stock(levels) => {
            for level in levels {
                println!(
                    "   sku {} at {}: on hand {}, held {}, available {}",
                    level.sku, level.location, level.on_hand, level.held, level.available
                );
            }
        }
        Body::Holds(holds) => {
            for hold in holds {
                println!("   hold {:#x} {:?}, lines {:?}", hold.hold.0, hold.state, hold.lines);
            }
        }
        Body::Journal { entries, next, .. } => println!("   {} journal entries, next {next}", entries.len()),
    }
}
