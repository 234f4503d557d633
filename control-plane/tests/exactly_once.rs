//! Exactly once, under failure: sales keep coming while the control plane is killed
//! with SIGKILL at random moments (mid-batch: its batches are small), and while
//! PostgreSQL restarts; afterwards the ledger holds every committed line exactly once,
//! the books fell by exactly what was sold, and reconcile finds no difference.
//!
//! The control plane here is the real `control-plane` binary (a process to kill), and
//! the PostgreSQL that restarts is a private cluster of the test's own.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use stockplane_control_plane::db::{AdjustmentAsk, Change, Db};
use stockplane_control_plane::reconcile::reconcile;
use stockplane_control_plane::sync::push_pass;
use stockplane_engine::shard_for;
use stockplane_wire::{CartLine, HoldId, Status};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const SKUS: u64 = 8;
const UNITS: i64 = 100_000;

/// Seeds SKUs 1..=SKUS at location 1 with UNITS each, and pushes them to the data plane.
async fn seed(db: &Db, dataplane: &TestDataplane) {
    let shards = dataplane.control().await.shards();
    db.shards_learn(shards).await.unwrap();
    db.location_create(1, "north").await.unwrap();
    for sku in 1..=SKUS {
        db.sku_create(sku, &format!("sku {sku}"), 0).await.unwrap();
        let ask = AdjustmentAsk {
            key: format!("seed-{sku}"),
            sku,
            location: 1,
            change: Change::SetTo(UNITS),
            reason: String::new(),
        };
        db.adjustment_ask(&ask, shard_for(sku, shards)).await.unwrap();
    }
    // Pushed here, before any control plane runs, so selling can start at once.
    let control = dataplane.control().await;
    for shard in 0..shards {
        while !push_pass(db, &control, shard, 64).await.unwrap().is_idle() {}
    }
}

/// Sells two-line carts until `stop`; returns the (hold, sku) of every committed line.
async fn seller(dataplane: &TestDataplane, stop: Arc<AtomicBool>, seed: u128) -> JoinHandle<Vec<(u128, u64)>> {
    let client = dataplane.client("checkout").await;
    tokio::spawn(async move {
        let mut sold = Vec::new();
        let mut cart = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let hold = HoldId(seed << 64 | u128::from(cart));
            let a = cart % SKUS + 1;
            let b = a % SKUS + 1;
            let lines =
                vec![CartLine { sku: a, location: Some(1), qty: 1 }, CartLine { sku: b, location: Some(1), qty: 1 }];
            let reserved = client.reserve(hold, 60_000, lines).await.expect("reserve");
            assert_eq!(reserved.status, Status::Reserved, "the seed's stock lasts the whole test");
            let committed = client.commit(hold, None).await.expect("commit");
            assert_eq!(committed.status, Status::Committed);
            sold.push((hold.0, a));
            sold.push((hold.0, b));
            cart += 1;
        }
        sold
    })
}

/// Checks the ledger against what was sold: every line once, the books down by as much,
/// and reconcile exact.
async fn assert_exactly_once(db: &Db, dataplane: &TestDataplane, sold: &[(u128, u64)]) {
    let expected: HashSet<(u128, u64)> = sold.iter().copied().collect();
    assert_eq!(expected.len(), sold.len());
    let rows: Vec<(uuid::Uuid, i64, i64)> = eventually("the drain to catch up", WAIT, || async {
        let rows: Vec<(uuid::Uuid, i64, i64)> =
            sqlx::query_as("SELECT hold_id, sku, qty FROM sales").fetch_all(db.pool()).await.ok()?;
        (rows.len() >= sold.len()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), sold.len(), "the ledger holds more lines than were sold");
    let ledger: HashSet<(u128, u64)> = rows.iter().map(|(hold, sku, _)| (hold.as_u128(), *sku as u64)).collect();
    assert_eq!(ledger, expected, "the ledger is not exactly what was sold");
    assert!(rows.iter().all(|r| r.2 == 1));
    let on_hand: i64 =
        sqlx::query_scalar("SELECT sum(on_hand)::bigint FROM stock_levels").fetch_one(db.pool()).await.unwrap();
    assert_eq!(on_hand, SKUS as i64 * UNITS - sold.len() as i64);
    let report = reconcile(db, &dataplane.control().await).await.unwrap();
    assert!(report.differences.is_empty(), "{report:#?}");
}

/// The real control plane with a small drain batch (so a kill lands mid-batch).
fn control_plane_process(dir: &std::path::Path, database_url: &str, dataplane: &TestDataplane) -> Child {
    let config = dir.join("control-plane.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[database]\nurl = \"{database_url}\"\nconnections = 4\n\
             [dataplane]\naddr = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [drain]\nbatch_entries = 16\nread_entries = 8\nidle_ms = 1\n[push]\nidle_ms = 20\n",
            dataplane.server().addr(),
            dataplane.dir.join("ca.pem").display(),
            dataplane.dir.join("control.pem").display(),
            dataplane.dir.join("control.key").display(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the control plane")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_mid_batch_loses_and_duplicates_nothing() {
    let dataplane = TestDataplane::start(2);
    let url = fresh_database().await;
    let db = Db::connect(&url, 4, 30_000).await.unwrap();
    seed(&db, &dataplane).await;
    let dir = temp_dir("kill");
    let stop = Arc::new(AtomicBool::new(false));
    let seller = seller(&dataplane, stop.clone(), 7).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let cycles = std::env::var("CP_KILL_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    for _ in 0..cycles {
        let mut child = control_plane_process(&dir, &url, &dataplane);
        // A random moment to kill it: anywhere in its start, its pushes or its drain.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        child.kill().expect("SIGKILL the control plane");
        child.wait().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let sold = seller.await.unwrap();
    assert!(!sold.is_empty());
    let mut child = control_plane_process(&dir, &url, &dataplane);
    assert_exactly_once(&db, &dataplane, &sold).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarting_during_the_drain_loses_and_duplicates_nothing() {
    let dataplane = TestDataplane::start(2);
    let pg_dir = temp_dir("pg");
    let cluster = pg_script("start", &pg_dir);
    let url = fresh_database_in(&cluster).await;
    let db = Db::connect(&url, 4, 30_000).await.unwrap();
    seed(&db, &dataplane).await;
    let mut config = control_config(&url, Some(&dataplane));
    config.drain.batch_entries = 16;
    config.drain.read_entries = 8;
    let app = control_plane(config, true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let seller = seller(&dataplane, stop.clone(), 8).await;
    let mut drained = 0;
    for _ in 0..3 {
        // Let more sales drain, then restart PostgreSQL under the drain.
        drained = eventually("more sales to drain", WAIT, || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales").fetch_one(db.pool()).await.ok()?;
            (n > drained).then_some(n)
        })
        .await;
        tokio::task::block_in_place(|| pg_script("restart", &pg_dir));
    }
    stop.store(true, Ordering::Relaxed);
    let sold = seller.await.unwrap();
    assert_exactly_once(&db, &dataplane, &sold).await;
    drop(app);
    tokio::task::block_in_place(|| pg_script("stop", &pg_dir));
    let _ = std::fs::remove_dir_all(&pg_dir);
}
