//! The control plane's sync with the data plane, measured against a running data plane
//! and a real PostgreSQL (`make bench-sync` starts both; see `benches/sync.sh`).
//!
//! - `drain`: seeds SKUs with stock through the control plane's pusher, commits `--lines`
//!   cart lines through the checkout client while the drain is off (so they wait in the
//!   shards' journals), then times the drain of all of them into PostgreSQL (ledger rows,
//!   stock decrements and positions, one transaction per batch), checks that the ledger
//!   holds each line once and that reconcile finds no difference.
//! - `bootstrap`: puts `--skus` SKUs with stock into PostgreSQL, then times the pusher
//!   telling an empty data plane all of them (an upsert and an adjustment per SKU), and
//!   checks a sample of SKUs at the data plane and that nothing is left due.
//! - `rebootstrap`: puts `--skus` SKUs into PostgreSQL as books an earlier life of the
//!   data plane acknowledged and drained (100 units each, nothing pending), then times
//!   the control plane finding that the data plane restarted empty (the drain begins a
//!   new epoch) and telling it everything again, and checks that reconcile finds no
//!   difference.
//!
//! The database must be empty (the script makes a fresh one); the data plane must be
//! empty for `bootstrap` and `rebootstrap`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use stockplane_control_plane::config::DataplaneConfig;
use stockplane_control_plane::dataplane::Dataplane;
use stockplane_control_plane::db::{Db, DbError};
use stockplane_control_plane::reconcile::reconcile;
use stockplane_control_plane::sync::{drain_pass, push_pass, DrainOptions};
use stockplane_engine::shard_for;
use stockplane_wire::client::{Client, ClientConfig};
use stockplane_wire::{CartLine, HoldId, SkuAt, Status};

/// Measures the control plane's drain and bootstrap.
#[derive(Parser, Debug)]
struct Args {
    /// The data plane's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    dataplane: SocketAddr,
    /// The development certificates (ca.pem, control.*, checkout.*).
    #[arg(long, default_value = "target/certs")]
    certs: PathBuf,
    /// PostgreSQL (an empty database).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Time the drain of committed lines into PostgreSQL.
    Drain {
        /// Cart lines to commit, then drain.
        #[arg(long, default_value_t = 1_000_000)]
        lines: u64,
        /// Lines per cart.
        #[arg(long, default_value_t = 16)]
        cart_lines: u32,
        /// SKUs the carts draw from (at location 1).
        #[arg(long, default_value_t = 10_000)]
        skus: u64,
        /// Carts in flight while committing.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Journal entries per PostgreSQL transaction.
        #[arg(long, default_value_t = 32_768)]
        batch_entries: u32,
        /// Transactions in flight per shard.
        #[arg(long, default_value_t = 2)]
        writers: usize,
    },
    /// Time the bootstrap of an empty data plane from PostgreSQL.
    Bootstrap {
        /// SKUs (each at location 1, with 100 units).
        #[arg(long, default_value_t = 1_000_000)]
        skus: u64,
        /// Upserts and adjustments per push round and shard (the control plane's
        /// default `push.batch`).
        #[arg(long, default_value_t = 32_768)]
        batch: u32,
    },
    /// Time the bootstrap of a data plane that restarted empty, from books it had drained.
    Rebootstrap {
        /// SKUs (each at location 1, with 100 units in the books).
        #[arg(long, default_value_t = 1_000_000)]
        skus: u64,
        /// Upserts and adjustments per push round and shard (the control plane's
        /// default `push.batch`).
        #[arg(long, default_value_t = 32_768)]
        batch: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    print!("{}", stockplane_loadgen::machine::report_header("stockplane control plane sync"));
    let db = Db::connect(&args.database_url, 16, 600_000).await?;
    let link = DataplaneConfig {
        addr: args.dataplane,
        ca: args.certs.join("ca.pem"),
        cert: args.certs.join("control.pem"),
        key: args.certs.join("control.key"),
        connections: 4,
        call_timeout_ms: 30_000,
        ..DataplaneConfig::default()
    };
    let dataplane = Dataplane::connect(&link).await?;
    db.shards_learn(dataplane.shards()).await?;
    println!("data plane: {} ({} shards)", args.dataplane, dataplane.shards());
    match args.mode {
        Mode::Drain { lines, cart_lines, skus, concurrency, batch_entries, writers } => {
            let options = DrainOptions { batch_entries, read_entries: 4_096, writers };
            drain(&db, &dataplane, &args.certs, args.dataplane, lines, cart_lines, skus, concurrency, options).await
        }
        Mode::Bootstrap { skus, batch } => bootstrap(&db, &dataplane, skus, batch).await,
        Mode::Rebootstrap { skus, batch } => rebootstrap(&db, &dataplane, skus, batch).await,
    }
}

/// Creates SKUs `1..=skus` at location 1 with `units` each, in PostgreSQL only.
async fn seed_books(db: &Db, shards: u32, skus: u64, units: i64) -> anyhow::Result<()> {
    match db.location_create(1, "bench").await {
        Ok(_) | Err(DbError::Exists(_)) => {}
        Err(error) => return Err(error.into()),
    }
    let chunk = 50_000u64;
    let mut first = 1;
    while first <= skus {
        let last = (first + chunk - 1).min(skus);
        let rows: Vec<(u64, String, u32)> = (first..=last).map(|sku| (sku, format!("sku {sku}"), 0)).collect();
        db.skus_create_many(&rows).await?;
        let stock: Vec<(u64, u32, u32)> = (first..=last).map(|sku| (sku, 1, shard_for(sku, shards))).collect();
        db.stock_rows_create_many(&stock).await?;
        let adjust: Vec<(u64, u32, u32, i64)> = stock.iter().map(|&(sku, l, s)| (sku, l, s, units)).collect();
        db.adjustments_create_many(&adjust, "bench seed").await?;
        first = last + 1;
    }
    Ok(())
}

/// Fails unless every shard has acknowledged every stock row and adjustment.
async fn push_backlog_none(db: &Db, shards: u32) -> anyhow::Result<()> {
    for shard in 0..shards {
        let (rows, adjustments) = db.push_backlog(shard).await?;
        anyhow::ensure!(
            rows == 0 && adjustments == 0,
            "shard {shard}: {rows} rows and {adjustments} adjustments not acknowledged"
        );
    }
    Ok(())
}

/// Runs push passes on every shard concurrently until none finds anything to do.
/// Returns (upserted, applied) in all.
async fn push_all(db: &Db, dataplane: &Dataplane, batch: u32) -> anyhow::Result<(u64, u64)> {
    let mut tasks = tokio::task::JoinSet::new();
    for shard in 0..dataplane.shards() {
        let (db, dataplane) = (db.clone(), dataplane.clone());
        tasks.spawn(async move {
            let (mut upserted, mut applied, mut waited, mut read) = (0, 0, Duration::ZERO, Duration::ZERO);
            let started = Instant::now();
            loop {
                let pass = push_pass(&db, &dataplane, shard, batch).await?;
                upserted += pass.upserted;
                applied += pass.applied;
                waited += pass.dataplane;
                read += pass.read;
                anyhow::ensure!(pass.rejected == 0, "shard {shard} rejected adjustments");
                if pass.is_idle() {
                    println!(
                        "shard {shard}: pushed for {:.2} s, of which {:.2} s reading what is due from PostgreSQL and {:.2} s waiting for the data plane's answers",
                        started.elapsed().as_secs_f64(),
                        read.as_secs_f64(),
                        waited.as_secs_f64()
                    );
                    return Ok((upserted, applied));
                }
            }
        });
    }
    let (mut upserted, mut applied) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (u, a) = joined.context("a push task")??;
        upserted += u;
        applied += a;
    }
    Ok((upserted, applied))
}

#[allow(clippy::too_many_arguments)]
async fn drain(
    db: &Db,
    dataplane: &Dataplane,
    certs: &std::path::Path,
    addr: SocketAddr,
    lines: u64,
    cart_lines: u32,
    skus: u64,
    concurrency: usize,
    options: DrainOptions,
) -> anyhow::Result<()> {
    anyhow::ensure!(u64::from(cart_lines) <= skus, "a cart's lines must be distinct SKUs");
    let shards = dataplane.shards();
    let units = (lines / skus + 1) as i64 * 2;
    seed_books(db, shards, skus, units).await?;
    push_all(db, dataplane, 8_192).await?;
    // The seed's adjustments are journal entries too: drain them first, untimed.
    for shard in 0..shards {
        while drain_pass(db, dataplane, shard, options).await?.entries > 0 {}
    }
    println!("seeded {skus} SKUs with {units} units each");

    let mut config = ClientConfig::from_pem_files(
        vec![addr],
        certs.join("ca.pem"),
        certs.join("checkout.pem"),
        certs.join("checkout.key"),
    );
    config.connections = 4;
    config.call_timeout = Duration::from_secs(30);
    let client = Client::connect(config).await?;
    let carts = lines / u64::from(cart_lines);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next) = (client.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let cart = next.fetch_add(1, Ordering::Relaxed);
                if cart >= carts {
                    return anyhow::Ok(());
                }
                let cart_skus = (0..u64::from(cart_lines)).map(|j| (cart * u64::from(cart_lines) + j) % skus + 1);
                let lines: Vec<CartLine> = cart_skus.map(|sku| CartLine { sku, location: Some(1), qty: 1 }).collect();
                let hold = HoldId(0xbe4c_u128 << 64 | u128::from(cart));
                let reserved = client.reserve(hold, 600_000, lines).await?;
                anyhow::ensure!(reserved.status == Status::Reserved, "reserve: {:?}", reserved.status);
                let committed = client.commit(hold, None).await?;
                anyhow::ensure!(committed.status == Status::Committed, "commit: {:?}", committed.status);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a cart task")??;
    }
    let committed_lines = carts * u64::from(cart_lines);
    let commit_seconds = started.elapsed().as_secs_f64();
    println!(
        "committed {carts} carts of {cart_lines} lines ({committed_lines} lines) in {commit_seconds:.2} s through the checkout client (drain off)"
    );

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for shard in 0..shards {
        let (db, dataplane) = (db.clone(), dataplane.clone());
        tasks.spawn(async move {
            let (mut entries, mut batches, mut read_wait, mut write) = (0, 0, Duration::ZERO, Duration::ZERO);
            loop {
                let pass = drain_pass(&db, &dataplane, shard, options).await?;
                entries += pass.entries;
                batches += pass.batches;
                read_wait += pass.read_wait;
                write += pass.write;
                if pass.entries == 0 {
                    println!(
                        "shard {shard}: {:.2} s writing into PostgreSQL, {:.2} s waiting for journal reads",
                        write.as_secs_f64(),
                        read_wait.as_secs_f64()
                    );
                    return anyhow::Ok((entries, batches));
                }
            }
        });
    }
    let (mut entries, mut batches) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (e, b) = joined.context("a drain task")??;
        entries += e;
        batches += b;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "drained {entries} journal entries in {batches} transactions ({} entries each, {} in flight per shard) in {seconds:.2} s: {:.0} lines/s",
        options.batch_entries,
        options.writers,
        entries as f64 / seconds
    );
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM sales").fetch_one(db.pool()).await?;
    anyhow::ensure!(ledger as u64 == committed_lines, "the ledger holds {ledger} lines, not {committed_lines}");
    let report = reconcile(db, dataplane).await?;
    anyhow::ensure!(report.differences.is_empty(), "reconcile found {} differences", report.differences.len());
    println!(
        "check: the ledger holds each of the {committed_lines} lines once; reconcile: {} rows, no difference",
        report.rows
    );
    Ok(())
}

/// Pushes everything due (`push_all`), then checks that nothing is left unacknowledged;
/// returns the upserts and adjustments acknowledged and the seconds since `started`
/// (taken when the push was done, before the check).
async fn push_timed(db: &Db, dataplane: &Dataplane, batch: u32, started: Instant) -> anyhow::Result<(u64, u64, f64)> {
    let (upserted, applied) = push_all(db, dataplane, batch).await?;
    let seconds = started.elapsed().as_secs_f64();
    push_backlog_none(db, dataplane.shards()).await?;
    Ok((upserted, applied, seconds))
}

async fn bootstrap(db: &Db, dataplane: &Dataplane, skus: u64, batch: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    seed_books(db, dataplane.shards(), skus, 100).await?;
    println!(
        "books: {skus} SKUs with 100 units each written to PostgreSQL in {:.2} s (not timed below)",
        started.elapsed().as_secs_f64()
    );
    let (upserted, applied, seconds) = push_timed(db, dataplane, batch, Instant::now()).await?;
    println!(
        "bootstrap: {upserted} upserts and {applied} adjustments acknowledged by an empty data plane in {seconds:.2} s ({:.0} SKUs/s, batch {batch} per shard and round)",
        skus as f64 / seconds
    );
    let sample: Vec<SkuAt> =
        (0..1_000).map(|i| SkuAt { sku: i * (skus / 1_000).max(1) + 1, location: Some(1) }).collect();
    let sample: Vec<SkuAt> = sample.into_iter().filter(|s| s.sku <= skus).collect();
    let levels = dataplane.stock(&sample).await?;
    anyhow::ensure!(
        levels.len() == sample.len(),
        "the data plane knows {} of {} sampled SKUs",
        levels.len(),
        sample.len()
    );
    anyhow::ensure!(levels.iter().all(|l| l.on_hand == 100), "a sampled SKU does not hold 100 units");
    println!(
        "check: nothing left unacknowledged in PostgreSQL; {} sampled SKUs hold 100 units at the data plane",
        levels.len()
    );
    Ok(())
}

async fn rebootstrap(db: &Db, dataplane: &Dataplane, skus: u64, batch: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    seed_books(db, dataplane.shards(), skus, 100).await?;
    // As an earlier life of the data plane left the books: every adjustment applied and
    // drained into on_hand, everything acknowledged, the journal drained far along.
    sqlx::query("UPDATE stock_levels s SET on_hand = a.delta FROM adjustments a WHERE a.sku = s.sku AND a.location = s.location")
        .execute(db.pool())
        .await?;
    sqlx::query(
        "UPDATE adjustments SET state = 'applied', applied_at = now(), journal_epoch = 1,
                journal_position = push_seq",
    )
    .execute(db.pool())
    .await?;
    sqlx::query(
        "UPDATE shard_positions SET drained = 1000000000, incarnation = 1,
                pushed_seq = (SELECT last_value FROM push_seq)",
    )
    .execute(db.pool())
    .await?;
    sqlx::query("VACUUM ANALYZE stock_levels").execute(db.pool()).await?;
    sqlx::query("VACUUM ANALYZE adjustments").execute(db.pool()).await?;
    println!(
        "books: {skus} SKUs with 100 units each, drained from an earlier life of the data plane, written to PostgreSQL in {:.2} s (not timed below)",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let options = DrainOptions { batch_entries: 16_384, read_entries: 4_096, writers: 1 };
    for shard in 0..dataplane.shards() {
        let pass = drain_pass(db, dataplane, shard, options).await?;
        anyhow::ensure!(pass.new_epoch, "shard {shard}: the drain did not see that the shard restarted empty");
    }
    let epoch = started.elapsed().as_secs_f64();
    let (upserted, applied, seconds) = push_timed(db, dataplane, batch, started).await?;
    println!(
        "rebootstrap: new epochs begun in {epoch:.2} s, then {upserted} upserts and {applied} bootstrap adjustments acknowledged by the empty data plane: {seconds:.2} s in all ({:.0} SKUs/s, batch {batch} per shard and round)",
        skus as f64 / seconds
    );
    let report = reconcile(db, dataplane).await?;
    anyhow::ensure!(report.differences.is_empty(), "reconcile: {} rows differ", report.differences.len());
    println!("check: nothing left unacknowledged; reconcile: {} rows, no difference", report.rows);
    Ok(())
}
