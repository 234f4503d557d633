//! The sync with a real data plane over QUIC and a real PostgreSQL: the catalog and
//! stock pushed as deltas, sales drained exactly once, a data plane that restarts (with
//! its WAL, or empty) caught up by itself, and reconcile exactly zero when idle.

mod common;

use std::time::Duration;

use common::*;
use stockplane_control_plane::dataplane::JournalRead;
use stockplane_control_plane::db::{AdjustOutcome, AdjustmentAsk, Change, Db};
use stockplane_control_plane::reconcile::reconcile;
use stockplane_control_plane::App;
use stockplane_engine::shard_for;
use stockplane_wire::{CartLine, HoldId, SkuAt, Status};

const WAIT: Duration = Duration::from_secs(30);

/// Creates `skus` SKUs (1..=skus) at locations 1 and 2, each with `on_hand` units asked for
/// through an adjustment.
async fn seed(db: &Db, shards: u32, skus: u64, on_hand: i64) {
    db.location_create(1, "north").await.unwrap();
    db.location_create(2, "south").await.unwrap();
    for sku in 1..=skus {
        db.sku_create(sku, &format!("sku {sku}"), 0).await.unwrap();
        for location in [1, 2] {
            let ask = AdjustmentAsk {
                key: format!("seed-{sku}-{location}"),
                sku,
                location,
                change: Change::SetTo(on_hand),
                reason: "seed".into(),
            };
            let outcome = db.adjustment_ask(&ask, shard_for(sku, shards)).await.unwrap();
            assert!(matches!(outcome, AdjustOutcome::Created(_)), "{outcome:?}");
        }
    }
}

/// Waits until the data plane holds `on_hand` for every seeded row.
async fn wait_pushed(dataplane: &TestDataplane, skus: u64, on_hand: i64) {
    let client = dataplane.client("checkout").await;
    eventually("the stock to reach the data plane", WAIT, || {
        let client = client.clone();
        async move {
            for sku in 1..=skus {
                let outcome = client.query_stock(vec![SkuAt { sku, location: None }]).await.ok()?;
                let stockplane_wire::Body::Stock(levels) = outcome.body else { return None };
                if levels.len() != 2 || levels.iter().any(|l| l.on_hand != on_hand) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

async fn sales_count(app: &App) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sales").fetch_one(app.db.pool()).await.unwrap()
}

/// Waits until the ledger holds `lines` sales and every shard's drained position has
/// reached its journal's end: the drain commits a batch's sales before it moves the
/// position, and a reconcile between the two would count the batch twice (in the books
/// and as undrained), as a `make test` under load once did.
async fn wait_drained(app: &App, dataplane: &TestDataplane, lines: i64) {
    let control = dataplane.control().await;
    eventually("every sale to be drained and the drained positions to follow", WAIT, || {
        let control = control.clone();
        async move {
            if sales_count(app).await != lines {
                return None;
            }
            for position in app.db.positions().await.ok()? {
                match control.journal(position.shard, position.drained, 1).await.ok()? {
                    JournalRead::Entries { entries, .. } if entries.is_empty() => {}
                    _ => return None,
                }
            }
            Some(())
        }
    })
    .await;
}

/// Reserves and commits `carts` two-line carts (SKUs i and i+1 at location 1, one unit
/// each); returns the committed lines.
async fn sell(dataplane: &TestDataplane, carts: u64, skus: u64, seed: u128) -> i64 {
    let client = dataplane.client("checkout").await;
    let mut lines = 0;
    for cart in 0..carts {
        let hold = HoldId(seed << 64 | u128::from(cart));
        let a = cart % skus + 1;
        let b = a % skus + 1;
        let cart_lines =
            vec![CartLine { sku: a, location: Some(1), qty: 1 }, CartLine { sku: b, location: Some(1), qty: 1 }];
        let reserved = client.reserve(hold, 60_000, cart_lines).await.unwrap();
        assert_eq!(reserved.status, Status::Reserved);
        let committed = client.commit(hold, None).await.unwrap();
        assert_eq!(committed.status, Status::Committed);
        lines += 2;
    }
    lines
}

async fn assert_reconciles(app: &App, dataplane: &TestDataplane) {
    let control = dataplane.control().await;
    let report = reconcile(&app.db, &control).await.unwrap();
    assert!(report.differences.is_empty(), "the books do not reconcile: {report:#?}");
    assert!(report.rows > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_is_pushed_and_sales_drain_exactly_once() {
    let dataplane = TestDataplane::start(2);
    let app = control_plane(control_config(&fresh_database().await, Some(&dataplane)), true).await;
    let shards = app.link.wait().await.shards();
    assert_eq!(shards, 2);
    seed(&app.db, shards, 8, 100).await;
    wait_pushed(&dataplane, 8, 100).await;

    let before_sales = chrono::Utc::now() - chrono::Duration::seconds(5);
    let lines = sell(&dataplane, 40, 8, 1).await;
    wait_drained(&app, &dataplane, lines).await;
    // Each ledger row has the shard's commit time, which came before the drain wrote it.
    let times: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT committed_at, drained_at FROM sales").fetch_all(app.db.pool()).await.unwrap();
    assert!(times.iter().all(|(committed, drained)| *committed > before_sales && committed <= drained), "{times:?}");
    // Every sold unit is in the ledger once, and the books fell by as much.
    let sold: i64 = sqlx::query_scalar("SELECT sum(qty)::bigint FROM sales").fetch_one(app.db.pool()).await.unwrap();
    assert_eq!(sold, lines);
    let on_hand: i64 = sqlx::query_scalar("SELECT sum(on_hand)::bigint FROM stock_levels WHERE location = 1")
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    assert_eq!(on_hand, 8 * 100 - lines);
    assert_reconciles(&app, &dataplane).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adjustment_retried_ten_times_is_applied_once() {
    let dataplane = TestDataplane::start(1);
    let app = control_plane(control_config(&fresh_database().await, Some(&dataplane)), true).await;
    let shards = app.link.wait().await.shards();
    seed(&app.db, shards, 1, 10).await;
    wait_pushed(&dataplane, 1, 10).await;
    let ask =
        AdjustmentAsk { key: "restock-7".into(), sku: 1, location: 1, change: Change::Delta(5), reason: "".into() };
    let first = app.db.adjustment_ask(&ask, 0).await.unwrap();
    let AdjustOutcome::Created(first) = first else { panic!("{first:?}") };
    for _ in 0..10 {
        let again = app.db.adjustment_ask(&ask, 0).await.unwrap();
        let AdjustOutcome::Replayed(again) = again else { panic!("a retry makes nothing new: {again:?}") };
        assert_eq!((again.id, again.delta), (first.id, first.delta));
        // And pushed directly, by its id, ten times too: the shard applies it once.
        let control = dataplane.control().await;
        let outcome = control.client().adjust(first.id.as_u128(), 1, 1, 5).await.unwrap();
        assert_eq!(outcome.status, Status::Ok);
    }
    let other = AdjustmentAsk { change: Change::Delta(6), ..ask };
    assert!(app.db.adjustment_ask(&other, 0).await.is_err(), "the same key with another delta is refused");
    eventually("the books to hold the adjustment once", WAIT, || async {
        let books = app.db.books(1, Some(1)).await.unwrap();
        (books[0].on_hand == 15 && books[0].pending_delta == 0).then_some(())
    })
    .await;
    assert_reconciles(&app, &dataplane).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_that_restarts_with_its_wal_or_empty_catches_up() {
    let mut dataplane = TestDataplane::start(2);
    let app = control_plane(control_config(&fresh_database().await, Some(&dataplane)), true).await;
    let shards = app.link.wait().await.shards();
    seed(&app.db, shards, 6, 50).await;
    wait_pushed(&dataplane, 6, 50).await;
    let mut lines = sell(&dataplane, 10, 6, 1).await;
    wait_drained(&app, &dataplane, lines).await;

    // Restart from its WAL: nothing to redo, and the drain goes on where it was.
    dataplane.restart("data");
    lines += sell(&dataplane, 10, 6, 2).await;
    wait_drained(&app, &dataplane, lines).await;
    assert_reconciles(&app, &dataplane).await;

    // Restart empty: the shards are told the catalog and the books' stock again.
    dataplane.restart("data-empty");
    let books: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT sku, location, on_hand FROM stock_levels ORDER BY sku, location")
            .fetch_all(app.db.pool())
            .await
            .unwrap();
    assert_eq!(books.len(), 12);
    let client = dataplane.client("checkout").await;
    eventually("the empty data plane to be bootstrapped from the books", WAIT, || {
        let (client, books) = (client.clone(), books.clone());
        async move {
            for (sku, location, on_hand) in books {
                let item = SkuAt { sku: sku as u64, location: Some(location as u32) };
                let outcome = client.query_stock(vec![item]).await.ok()?;
                let stockplane_wire::Body::Stock(levels) = outcome.body else { return None };
                if levels.first()?.on_hand != on_hand {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    lines += sell(&dataplane, 10, 6, 3).await;
    wait_drained(&app, &dataplane, lines).await;
    eventually("the bootstrap adjustments to drain", WAIT, || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM adjustments WHERE journal_position IS NULL")
            .fetch_one(app.db.pool())
            .await
            .unwrap();
        (pending == 0).then_some(())
    })
    .await;
    assert_reconciles(&app, &dataplane).await;
}

/// A drain batch written again (after a crash between its commit and the position's
/// move), or a batch that overlaps one already written, adds to the books only what was
/// not there: the ledger's key and the adjustments' ids make every write idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_batch_written_twice_or_overlapping_counts_once() {
    use stockplane_control_plane::db::{DrainedEntry, DrainedKind};
    let db = Db::connect(&fresh_database().await, 4, 30_000).await.unwrap();
    db.shards_learn(1).await.unwrap();
    db.location_create(1, "north").await.unwrap();
    db.sku_create(5, "five", 0).await.unwrap();
    db.stock_rows_create_many(&[(5, 1, 0)]).await.unwrap();
    let sale = |position: u64| DrainedEntry {
        position,
        sku: 5,
        location: 1,
        kind: DrainedKind::Sale { hold: u128::from(position), qty: 2, at_ms: 1_795_000_000_000 + position },
    };
    let restock =
        DrainedEntry { position: 1, sku: 5, location: 1, kind: DrainedKind::Adjustment { id: 77, delta: 100 } };
    let first: Vec<DrainedEntry> = [restock].into_iter().chain((2..=4).map(sale)).collect();
    assert_eq!(db.drain_write(0, 1, &first).await.unwrap(), 4);
    assert_eq!(db.drain_write(0, 1, &first).await.unwrap(), 0, "the same batch again writes nothing");
    let overlapping: Vec<DrainedEntry> = (3..=6).map(sale).collect();
    assert_eq!(db.drain_write(0, 1, &overlapping).await.unwrap(), 2, "only positions 5 and 6 are new");
    let books = db.books(5, Some(1)).await.unwrap();
    assert_eq!((books[0].on_hand, books[0].sold), (100 - 5 * 2, 5 * 2));
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM sales").fetch_one(db.pool()).await.unwrap();
    assert_eq!(ledger, 5);
    // The position moves only from where it is.
    assert!(db.drain_advance(0, 1, 1, 7).await.unwrap());
    assert!(!db.drain_advance(0, 1, 1, 7).await.unwrap());
    assert_eq!(db.position(0).await.unwrap().drained, 7);
}

/// A shard that restarted without its data, and whose new journal grew past the old
/// drained position before the drain looked, is still recognised by its incarnation:
/// the drain begins a new epoch instead of reading the new journal as the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_shard_is_known_by_its_incarnation_not_its_journal_length() {
    use stockplane_control_plane::sync::{drain_pass, push_pass, DrainOptions};
    let mut dataplane = TestDataplane::start(1);
    let app = control_plane(control_config(&fresh_database().await, Some(&dataplane)), false).await;
    let control = dataplane.control().await;
    app.db.shards_learn(1).await.unwrap();
    seed(&app.db, 1, 2, 50).await;
    while !push_pass(&app.db, &control, 0, 64).await.unwrap().is_idle() {}
    let options = DrainOptions { batch_entries: 64, read_entries: 16, writers: 1 };
    let lines = sell(&dataplane, 3, 2, 1).await;
    let pass = drain_pass(&app.db, &control, 0, options).await.unwrap();
    assert_eq!(pass.entries as i64, 4 + lines, "the seed's four adjustments and the sales");
    let drained = app.db.position(0).await.unwrap().drained;

    dataplane.restart("data-empty");
    // The new shard's journal outgrows the old drained position (adjustments from a tool
    // the control plane does not know).
    let tool = dataplane.client("control").await;
    assert_eq!(tool.upsert_sku(9, 1, 0).await.unwrap().status, Status::Ok);
    for id in 0..drained + 5 {
        assert_eq!(tool.adjust(u128::from(id) + 1_000, 9, 1, 1).await.unwrap().status, Status::Ok);
    }
    let control = dataplane.control().await;
    let pass = drain_pass(&app.db, &control, 0, options).await.unwrap();
    assert!(pass.new_epoch, "the new incarnation begins a new epoch");
    let position = app.db.position(0).await.unwrap();
    assert_eq!((position.epoch, position.drained), (2, 1));
    let sold: i64 = sqlx::query_scalar("SELECT count(*) FROM sales").fetch_one(app.db.pool()).await.unwrap();
    assert_eq!(sold, lines, "nothing of the new journal was read as the old one");
}

/// The pusher's cursor never skips a row whose transaction commits after a later one:
/// a writer that took a place in the push order holds the shared push lock until it
/// commits, and the pusher reads the order's end only under the exclusive lock, so it
/// waits for that writer and then finds its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_order_waits_for_a_writer_that_took_a_place_in_it() {
    use stockplane_control_plane::db::PUSH_LOCK;
    let db = Db::connect(&fresh_database().await, 4, 30_000).await.unwrap();
    db.shards_learn(1).await.unwrap();
    db.location_create(1, "north").await.unwrap();
    db.sku_create(5, "five", 0).await.unwrap();
    db.sku_create(6, "six", 0).await.unwrap();
    // A writer takes a place for SKU 5's row and stays open.
    let mut writer = db.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(PUSH_LOCK).execute(&mut *writer).await.unwrap();
    sqlx::query("INSERT INTO stock_levels (sku, location, shard) VALUES (5, 1, 0)")
        .execute(&mut *writer)
        .await
        .unwrap();
    // A later writer commits first.
    db.stock_rows_create_many(&[(6, 1, 0)]).await.unwrap();
    let pusher = {
        let db = db.clone();
        tokio::spawn(async move { db.push_batch(0, 100).await.unwrap() })
    };
    eventually("the pusher to wait for the push lock", WAIT, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ExclusiveLock'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        (waiting == 1).then_some(())
    })
    .await;
    assert!(!pusher.is_finished(), "the pusher read the order while a writer could still commit into it");
    writer.commit().await.unwrap();
    let batch = pusher.await.unwrap();
    let skus: Vec<u64> = batch.rows.iter().map(|r| r.sku).collect();
    assert_eq!(skus, vec![5, 6], "both rows, in the order their places were taken");
    assert!(db.push_advance(0, batch.cursor, batch.upto).await.unwrap());
    assert_eq!(db.push_backlog(0).await.unwrap(), (0, 0));
    assert!(!db.push_advance(0, batch.cursor, batch.upto).await.unwrap(), "the cursor moves only from where it is");
}

/// The cursor moves past what the shard acknowledged and no further: with the data
/// plane away nothing is acknowledged and everything stays queued; once it is back, one
/// pass tells it all. A SKU that changes afterwards queues its rows again, and a shard
/// that forgot a row it had acknowledged is told the row again before its adjustment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_cursor_moves_only_past_what_the_shard_acknowledged() {
    use stockplane_control_plane::sync::push_pass;
    let mut dataplane = TestDataplane::start(1);
    let app = control_plane(control_config(&fresh_database().await, Some(&dataplane)), false).await;
    // Calls to a data plane that is away fail after 200 ms, not the default 5 s.
    let impatient =
        stockplane_control_plane::config::DataplaneConfig { call_timeout_ms: 200, ..dataplane.link_config() };
    let control = stockplane_control_plane::dataplane::Dataplane::connect(&impatient).await.unwrap();
    app.db.shards_learn(1).await.unwrap();
    seed(&app.db, 1, 3, 20).await;
    assert_eq!(app.db.push_backlog(0).await.unwrap(), (6, 6));

    dataplane.stop();
    let pass = push_pass(&app.db, &control, 0, 64).await.unwrap();
    assert!(pass.failed > 0 && pass.upserted + pass.applied == 0, "{pass:?}");
    assert_eq!(app.db.push_backlog(0).await.unwrap(), (6, 6), "nothing acknowledged, nothing skipped");

    dataplane.restart("data");
    let control = dataplane.control().await;
    let pass = push_pass(&app.db, &control, 0, 64).await.unwrap();
    assert_eq!((pass.upserted, pass.applied, pass.failed), (6, 6, 0));
    assert_eq!(app.db.push_backlog(0).await.unwrap(), (0, 0));
    wait_pushed(&dataplane, 3, 20).await;
    assert!(push_pass(&app.db, &control, 0, 64).await.unwrap().is_idle());

    // A SKU that changes is told again at both its locations, with its new limit.
    app.db.sku_update(2, None, Some(7)).await.unwrap();
    assert_eq!(app.db.push_backlog(0).await.unwrap(), (2, 0));
    let pass = push_pass(&app.db, &control, 0, 64).await.unwrap();
    assert_eq!((pass.upserted, pass.applied), (2, 0));
    let client = dataplane.client("checkout").await;
    let outcome = client.query_stock(vec![SkuAt { sku: 2, location: Some(1) }]).await.unwrap();
    let stockplane_wire::Body::Stock(levels) = outcome.body else { panic!("{outcome:?}") };
    assert_eq!(levels[0].backorder_limit, 7);

    // The shard forgets a row (it restarted empty, unseen by the drain): the adjustment
    // for it is refused UnknownSku, and the row and then the adjustment are queued
    // again and told in that order, so the next pass applies it.
    app.db.location_create(3, "east").await.unwrap();
    let ask = AdjustmentAsk { key: "east-1".into(), sku: 1, location: 3, change: Change::Delta(4), reason: "".into() };
    assert!(matches!(app.db.adjustment_ask(&ask, 0).await.unwrap(), AdjustOutcome::Created(_)));
    sqlx::query(
        "UPDATE shard_positions SET pushed_seq = (SELECT push_seq FROM stock_levels WHERE sku = 1 AND location = 3)",
    )
    .execute(app.db.pool())
    .await
    .unwrap();
    let pass = push_pass(&app.db, &control, 0, 64).await.unwrap();
    assert_eq!((pass.applied, pass.failed), (0, 1), "the shard does not know the row: {pass:?}");
    assert_eq!(app.db.push_backlog(0).await.unwrap(), (1, 1), "the row and its adjustment are queued again");
    let pass = push_pass(&app.db, &control, 0, 64).await.unwrap();
    assert_eq!((pass.upserted, pass.applied, pass.failed), (1, 1, 0));
    let outcome = client.query_stock(vec![SkuAt { sku: 1, location: Some(3) }]).await.unwrap();
    let stockplane_wire::Body::Stock(levels) = outcome.body else { panic!("{outcome:?}") };
    assert_eq!(levels[0].on_hand, 4);
}

/// Two callers learning the data plane's shape at once (the link connecting while an
/// operator's command does too) both succeed; a shape that differs from the books' is
/// refused. It once failed with a duplicate key: both found the table empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_planes_shape_is_learnt_once_by_concurrent_callers() {
    let db = Db::connect(&fresh_database().await, 4, 30_000).await.unwrap();
    let (a, b) = tokio::join!(db.shards_learn(2), db.shards_learn(2));
    a.unwrap();
    b.unwrap();
    assert_eq!(db.shards().await.unwrap(), Some(2));
    assert_eq!(db.positions().await.unwrap().len(), 2);
    let refused = db.shards_learn(3).await.unwrap_err();
    assert!(refused.to_string().contains("made for 2"), "{refused:#}");
}

/// A stock row the shard refuses for good (here at the location id the data plane keeps
/// for "any location") does not hold the push order back: the rows behind it are told,
/// its adjustment is refused with it, and nothing is left queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_row_the_shard_refuses_does_not_hold_back_the_rows_behind_it() {
    use stockplane_control_plane::sync::push_pass;
    let dataplane = TestDataplane::start(1);
    let app = control_plane(control_config(&fresh_database().await, Some(&dataplane)), false).await;
    let control = dataplane.control().await;
    app.db.shards_learn(1).await.unwrap();
    app.db.location_create(u32::MAX, "any").await.unwrap();
    app.db.location_create(1, "north").await.unwrap();
    app.db.sku_create(1, "one", 0).await.unwrap();
    for (key, location) in [("refused", u32::MAX), ("fine", 1)] {
        let ask = AdjustmentAsk { key: key.into(), sku: 1, location, change: Change::Delta(3), reason: "".into() };
        assert!(matches!(app.db.adjustment_ask(&ask, 0).await.unwrap(), AdjustOutcome::Created(_)));
    }
    let pass = push_pass(&app.db, &control, 0, 64).await.unwrap();
    assert_eq!((pass.upserted, pass.applied, pass.rejected, pass.failed), (1, 1, 2, 0), "{pass:?}");
    assert_eq!(app.db.push_backlog(0).await.unwrap(), (0, 0));
    let states: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, status FROM adjustments WHERE location = $1")
            .bind(i64::from(u32::MAX))
            .fetch_all(app.db.pool())
            .await
            .unwrap();
    assert_eq!(states, vec![("rejected".to_string(), Some("StockRowRefused".to_string()))]);
    assert!(push_pass(&app.db, &control, 0, 64).await.unwrap().is_idle());
    let client = dataplane.client("checkout").await;
    let outcome = client.query_stock(vec![SkuAt { sku: 1, location: Some(1) }]).await.unwrap();
    let stockplane_wire::Body::Stock(levels) = outcome.body else { panic!("{outcome:?}") };
    assert_eq!(levels[0].on_hand, 3);
}
