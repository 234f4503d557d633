//! Every SQL statement of the control plane.
//!
//! # What we store, and why
//! PostgreSQL is the system of record for the catalog and the books (DESIGN.md); the data
//! plane's WAL is the record only of live holds and of commits not yet drained. So we keep:
//! - **locations** and **skus**: the catalog the back office manages. A SKU's `version`
//!   goes up with every change.
//! - **stock_levels**: one row per SKU and location that the data plane must know. Its
//!   `on_hand` is *the books*: every adjustment the data plane applied minus every sale it
//!   committed, both as read from the shard's journal. Only the drain writes it, in the
//!   same transaction that moves the drained position, which is what makes it exact.
//! - **push_seq** (a sequence), on stock rows and adjustments, with each shard's
//!   `pushed_seq`: the *intended* state is every row and adjustment of the shard in
//!   `push_seq` order, the *observed* state is the shard's cursor into that order (it has
//!   acknowledged everything at or below it; drained adjustments are never told again).
//!   A row or adjustment that must be told again (its SKU changed, the shard forgot a
//!   row) takes a new, higher value; a shard that restarted empty has its cursor set
//!   back to 0. Acknowledging a batch moves one cursor instead of updating a flag on
//!   every row, which is what makes the bootstrap of a million rows cheap. Every writer
//!   of `push_seq` holds a shared advisory lock until it commits, and the pusher reads
//!   the sequence's value under the exclusive lock: so no value at or below what it read
//!   can still commit later, and the cursor never skips a row.
//! - **adjustments**: every *intended* change of stock, with the 128-bit id the data plane
//!   deduplicates by. A back-office "set on hand to N" is stored as the delta it amounts
//!   to against the books at that moment, never as an absolute value, so it cannot race
//!   with sales in flight. `state` says whether the drain has seen it in the shard's
//!   journal (applied) or the shard refused it (rejected).
//! - **sales**: the ledger, one row per committed line, keyed by (shard, epoch, journal
//!   position), so a batch drained twice cannot be written twice.
//! - **shard_positions**: per shard, the next journal position to drain (everything below
//!   is in the books) and the epoch: a shard that restarts without its state starts its
//!   journal again at 1, and we start a new epoch for it.
//! - **dataplane**: the data plane's shard count, learnt from it.
//!
//! Ids the data plane speaks in (SKU u64, location u32, adjustment and hold u128) are
//! stored as BIGINT and UUID; SKUs above `i64::MAX` are refused by the API.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

/// The advisory lock key of shard 0's books (shard k uses this plus k).
const BOOKS_LOCK_BASE: i64 = 0x5354_4f43_4b00_0000;

/// The advisory lock that orders `push_seq`: shared by every writer of the sequence until
/// it commits, taken exclusively by the pusher to read the sequence's stable value.
pub const PUSH_LOCK: i64 = 0x5354_4f43_4b50_5553;

/// Migrations, embedded in the binary; run on start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Errors a caller must tell apart; everything else is an `anyhow` error from PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The row exists already (a create of an existing id).
    #[error("{0} already exists")]
    Exists(&'static str),
    /// The row does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// An idempotency key was used before for a different request.
    #[error("idempotency key {0:?} was used for a different request")]
    KeyReused(String),
    /// The data plane's shard count is not known yet.
    #[error("the data plane's shard count is not known yet (it has never been reached)")]
    ShardsUnknown,
    /// PostgreSQL failed.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// The control plane's handle on PostgreSQL: a pool with statement timeouts.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
}

/// A location, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Location {
    /// The id the data plane knows it by.
    pub id: u32,
    /// A name for people.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A SKU, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Sku {
    /// The SKU number.
    pub sku: u64,
    /// A name for people.
    pub name: String,
    /// How far below zero `available` may go at each location.
    pub backorder_limit: u32,
    /// Goes up with every change.
    pub version: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// The books for one SKU at one location.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Books {
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// The shard that owns the SKU.
    pub shard: u32,
    /// Applied adjustments minus drained sales.
    pub on_hand: i64,
    /// Units sold, as drained.
    pub sold: i64,
    /// The sum of adjustments not yet in the books (not yet drained back from the
    /// shard's journal, and not refused): on hand as intended is `on_hand + pending_delta`.
    pub pending_delta: i64,
}

/// An adjustment, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Adjustment {
    /// The id the data plane deduplicates by.
    pub id: Uuid,
    /// The back office's idempotency key.
    pub idempotency_key: Option<String>,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// Units added (negative: removed).
    pub delta: i64,
    /// adjust, set, bootstrap or foreign.
    pub kind: String,
    /// For `set`: the on-hand figure asked for.
    pub set_to: Option<i64>,
    /// Why, in the back office's words.
    pub reason: String,
    /// pending, applied or rejected.
    pub state: String,
    /// For a rejected adjustment: the data plane's status.
    pub status: Option<String>,
    /// When it was asked for.
    pub created_at: DateTime<Utc>,
    /// When the data plane acknowledged it.
    pub applied_at: Option<DateTime<Utc>>,
}

/// What the back office asks of an adjustment (the part that must match on a retry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustmentAsk {
    /// The back office's idempotency key.
    pub key: String,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// `Delta(d)` adds d; `SetTo(n)` makes on hand n.
    pub change: Change,
    /// Why.
    pub reason: String,
}

/// A change of stock as the back office asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Add this many units (negative: remove).
    Delta(i64),
    /// Make on hand this many units.
    SetTo(i64),
}

/// What became of an adjustment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdjustOutcome {
    /// A new adjustment was recorded (pending until the drain finds it in the shard's journal).
    Created(Adjustment),
    /// The key was seen before with the same request: the first adjustment.
    Replayed(Adjustment),
    /// A set whose figure is already the intended on hand: nothing to change.
    NoChange,
}

/// A sale, as the ledger keeps it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Sale {
    /// The shard that committed it.
    pub shard: u32,
    /// The shard's epoch.
    pub epoch: i64,
    /// Its position in the shard's journal.
    pub position: i64,
    /// The hold (cart) it belongs to.
    pub hold_id: Uuid,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// Units sold.
    pub qty: i64,
    /// When the shard committed it (the data plane's clock).
    pub committed_at: DateTime<Utc>,
    /// When the control plane wrote it into the books.
    pub drained_at: DateTime<Utc>,
}

/// A shard's drain state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ShardPosition {
    /// The shard.
    pub shard: u32,
    /// Its epoch.
    pub epoch: i64,
    /// The next journal position to drain.
    pub drained: u64,
    /// The shard's incarnation this epoch drains, once seen.
    pub incarnation: Option<u64>,
}

/// One journal entry to write into the books (a sale or an adjustment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainedEntry {
    /// Its journal position.
    pub position: u64,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// What it was.
    pub kind: DrainedKind,
}

/// What a drained entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainedKind {
    /// A committed line.
    Sale {
        /// The hold.
        hold: u128,
        /// Units sold.
        qty: u32,
        /// When the shard committed it (Unix milliseconds).
        at_ms: u64,
    },
    /// An applied adjustment.
    Adjustment {
        /// Its id.
        id: u128,
        /// Units added.
        delta: i64,
    },
}

/// What a shard must be told next, in `push_seq` order: everything above its cursor up
/// to `upto`, the stock rows (upserts) before the adjustments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushBatch {
    /// The shard's epoch.
    pub epoch: i64,
    /// The shard's incarnation this epoch, once seen.
    pub incarnation: Option<u64>,
    /// The shard's cursor: everything at or below it is acknowledged.
    pub cursor: i64,
    /// The batch covers `push_seq` values in `(cursor, upto]`.
    pub upto: i64,
    /// Stock rows to upsert.
    pub rows: Vec<PushRow>,
    /// Adjustments to push.
    pub adjustments: Vec<PushAdjustment>,
}

impl PushBatch {
    /// True if there is nothing to tell the shard.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.adjustments.is_empty()
    }
}

/// A stock row to upsert, with what to tell the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushRow {
    /// Its place in the order of pushes.
    pub seq: i64,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// The SKU's backorder limit.
    pub backorder_limit: u32,
}

/// An adjustment to push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushAdjustment {
    /// Its place in the order of pushes.
    pub seq: i64,
    /// Its id.
    pub id: u128,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// Units added.
    pub delta: i64,
}

/// A bootstrap adjustment not yet seen in its shard's journal (reconcile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootstrapPending {
    /// Its id.
    pub id: Uuid,
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// The books' figure it hands to the shard.
    pub delta: i64,
}

/// Maps a row to a location.
fn location_of(row: &sqlx::postgres::PgRow) -> Location {
    Location {
        id: row.get::<i64, _>("id") as u32,
        name: row.get("name"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    }
}

fn sku_of(row: &sqlx::postgres::PgRow) -> Sku {
    Sku {
        sku: row.get::<i64, _>("sku") as u64,
        name: row.get("name"),
        backorder_limit: row.get::<i64, _>("backorder_limit") as u32,
        version: row.get("version"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    }
}

fn adjustment_of(row: &sqlx::postgres::PgRow) -> Adjustment {
    Adjustment {
        id: row.get("id"),
        idempotency_key: row.get("idempotency_key"),
        sku: row.get::<i64, _>("sku") as u64,
        location: row.get::<i64, _>("location") as u32,
        delta: row.get("delta"),
        kind: row.get("kind"),
        set_to: row.get("set_to"),
        reason: row.get("reason"),
        state: row.get("state"),
        status: row.get("status"),
        created_at: row.get("created_at"),
        applied_at: row.get("applied_at"),
    }
}

const ADJUSTMENT_COLUMNS: &str =
    "id, idempotency_key, sku, location, delta, kind, set_to, reason, state, status, created_at, applied_at";

/// Takes the shared push lock until the transaction ends: before any write that takes a
/// `push_seq` value.
async fn push_lock_shared(tx: &mut Transaction<'_, Postgres>) -> Result<(), DbError> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(PUSH_LOCK).execute(&mut **tx).await?;
    Ok(())
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

impl Db {
    /// Connects a pool to `url`, with every statement limited to `statement_timeout_ms`,
    /// and runs the migrations. The pool reconnects by itself when PostgreSQL restarts.
    pub async fn connect(url: &str, connections: u32, statement_timeout_ms: u64) -> anyhow::Result<Db> {
        let options: PgConnectOptions = url.parse().context("parse the database URL")?;
        let options = options
            // JIT compiles plans for seconds' worth of rows; ours touch thousands at a
            // time by index, where its few milliseconds per statement are pure cost.
            .options([("statement_timeout", statement_timeout_ms.to_string()), ("jit", "off".to_string())])
            .application_name("stockplane-control-plane");
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .context("connect to PostgreSQL")?;
        MIGRATOR.run(&pool).await.context("run the migrations")?;
        Ok(Db { pool })
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// True when PostgreSQL answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    // ---------------------------------------------------------------- the data plane

    /// The data plane's shard count, if it has been learnt.
    pub async fn shards(&self) -> Result<Option<u32>, DbError> {
        let row = sqlx::query("SELECT shards FROM dataplane").fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.get::<i32, _>("shards") as u32))
    }

    /// Records the data plane's shard count and makes a drain position for every shard.
    /// Refuses a count that differs from the one recorded: SKUs would move between shards.
    pub async fn shards_learn(&self, shards: u32) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        // One statement, so that two callers at once (the link connecting while an
        // operator's command does too) cannot both find the table empty.
        let known: i32 = sqlx::query_scalar(
            "INSERT INTO dataplane (shards) VALUES ($1)
             ON CONFLICT (id) DO UPDATE SET seen_at = now() RETURNING shards",
        )
        .bind(shards as i32)
        .fetch_one(&mut *tx)
        .await?;
        if known as u32 != shards {
            anyhow::bail!("the data plane has {shards} shards, but the books were made for {known}");
        }
        sqlx::query("INSERT INTO shard_positions (shard) SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING")
            .bind(shards as i32)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---------------------------------------------------------------- catalog (API)

    /// Creates a location.
    pub async fn location_create(&self, id: u32, name: &str) -> Result<Location, DbError> {
        let result = sqlx::query("INSERT INTO locations (id, name) VALUES ($1, $2) RETURNING *")
            .bind(i64::from(id))
            .bind(name)
            .fetch_one(&self.pool)
            .await;
        match result {
            Ok(row) => Ok(location_of(&row)),
            Err(e) if is_unique_violation(&e) => Err(DbError::Exists("location")),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames a location.
    pub async fn location_update(&self, id: u32, name: &str) -> Result<Location, DbError> {
        let row = sqlx::query("UPDATE locations SET name = $2, updated_at = now() WHERE id = $1 RETURNING *")
            .bind(i64::from(id))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| location_of(&r)).ok_or(DbError::NotFound("location"))
    }

    /// One location.
    pub async fn location(&self, id: u32) -> Result<Location, DbError> {
        let row =
            sqlx::query("SELECT * FROM locations WHERE id = $1").bind(i64::from(id)).fetch_optional(&self.pool).await?;
        row.map(|r| location_of(&r)).ok_or(DbError::NotFound("location"))
    }

    /// Locations with ids above `after`, in id order, at most `limit`.
    pub async fn locations(&self, after: Option<u32>, limit: u32) -> Result<Vec<Location>, DbError> {
        let rows = sqlx::query("SELECT * FROM locations WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after.map_or(-1, i64::from))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(location_of).collect())
    }

    /// Creates a SKU.
    pub async fn sku_create(&self, sku: u64, name: &str, backorder_limit: u32) -> Result<Sku, DbError> {
        let result = sqlx::query("INSERT INTO skus (sku, name, backorder_limit) VALUES ($1, $2, $3) RETURNING *")
            .bind(sku as i64)
            .bind(name)
            .bind(i64::from(backorder_limit))
            .fetch_one(&self.pool)
            .await;
        match result {
            Ok(row) => Ok(sku_of(&row)),
            Err(e) if is_unique_violation(&e) => Err(DbError::Exists("SKU")),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates many SKUs at once (seeding, benchmarks); existing ones are left alone.
    /// Returns how many were new.
    pub async fn skus_create_many(&self, skus: &[(u64, String, u32)]) -> Result<u64, DbError> {
        let ids: Vec<i64> = skus.iter().map(|s| s.0 as i64).collect();
        let names: Vec<&str> = skus.iter().map(|s| s.1.as_str()).collect();
        let limits: Vec<i64> = skus.iter().map(|s| i64::from(s.2)).collect();
        let done = sqlx::query(
            "INSERT INTO skus (sku, name, backorder_limit)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&limits)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Changes a SKU's name or backorder limit (bumping its version, and queueing its
    /// stock rows for an upsert again).
    pub async fn sku_update(&self, sku: u64, name: Option<&str>, backorder_limit: Option<u32>) -> Result<Sku, DbError> {
        let mut tx = self.pool.begin().await?;
        push_lock_shared(&mut tx).await?;
        let row = sqlx::query(
            "UPDATE skus SET name = COALESCE($2, name), backorder_limit = COALESCE($3, backorder_limit),
                    version = version + 1, updated_at = now()
             WHERE sku = $1 RETURNING *",
        )
        .bind(sku as i64)
        .bind(name)
        .bind(backorder_limit.map(i64::from))
        .fetch_optional(&mut *tx)
        .await?;
        let sku = row.map(|r| sku_of(&r)).ok_or(DbError::NotFound("SKU"))?;
        sqlx::query("UPDATE stock_levels SET backorder_limit = $2, push_seq = nextval('push_seq') WHERE sku = $1")
            .bind(sku.sku as i64)
            .bind(i64::from(sku.backorder_limit))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(sku)
    }

    /// One SKU.
    pub async fn sku(&self, sku: u64) -> Result<Sku, DbError> {
        let row = sqlx::query("SELECT * FROM skus WHERE sku = $1").bind(sku as i64).fetch_optional(&self.pool).await?;
        row.map(|r| sku_of(&r)).ok_or(DbError::NotFound("SKU"))
    }

    /// SKUs above `after`, in order, at most `limit`.
    pub async fn skus(&self, after: Option<u64>, limit: u32) -> Result<Vec<Sku>, DbError> {
        let rows = sqlx::query("SELECT * FROM skus WHERE sku > $1 ORDER BY sku LIMIT $2")
            .bind(after.map_or(-1, |a| a as i64))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(sku_of).collect())
    }

    /// Makes the stock rows (on hand 0) for many SKU-locations at once, each on its shard;
    /// existing rows are left alone. Returns how many were new.
    pub async fn stock_rows_create_many(&self, rows: &[(u64, u32, u32)]) -> Result<u64, DbError> {
        let skus: Vec<i64> = rows.iter().map(|r| r.0 as i64).collect();
        let locations: Vec<i64> = rows.iter().map(|r| i64::from(r.1)).collect();
        let shards: Vec<i32> = rows.iter().map(|r| r.2 as i32).collect();
        let mut tx = self.pool.begin().await?;
        push_lock_shared(&mut tx).await?;
        // The SKUs' limits under a share lock, as in `adjustment_ask`.
        sqlx::query("SELECT 1 FROM skus WHERE sku = ANY($1) FOR SHARE").bind(&skus).execute(&mut *tx).await?;
        let done = sqlx::query(
            "INSERT INTO stock_levels (sku, location, shard, backorder_limit)
             SELECT u.sku, u.location, u.shard, k.backorder_limit
             FROM UNNEST($1::bigint[], $2::bigint[], $3::int[]) AS u(sku, location, shard)
             JOIN skus k ON k.sku = u.sku
             ON CONFLICT DO NOTHING",
        )
        .bind(&skus)
        .bind(&locations)
        .bind(&shards)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Records many adjustments at once, pending, without idempotency keys (seeding and
    /// benchmarks): `(sku, location, shard, delta)` each, in the shard's current epoch.
    /// Returns how many were recorded.
    pub async fn adjustments_create_many(&self, rows: &[(u64, u32, u32, i64)], reason: &str) -> Result<u64, DbError> {
        let ids: Vec<Uuid> = rows.iter().map(|_| Uuid::new_v4()).collect();
        let skus: Vec<i64> = rows.iter().map(|r| r.0 as i64).collect();
        let locations: Vec<i64> = rows.iter().map(|r| i64::from(r.1)).collect();
        let shards: Vec<i32> = rows.iter().map(|r| r.2 as i32).collect();
        let deltas: Vec<i64> = rows.iter().map(|r| r.3).collect();
        let mut tx = self.pool.begin().await?;
        push_lock_shared(&mut tx).await?;
        let done = sqlx::query(
            "INSERT INTO adjustments (id, sku, location, shard, delta, kind, reason, epoch)
             SELECT u.id, u.sku, u.location, u.shard, u.delta, 'adjust', $6,
                    COALESCE((SELECT epoch FROM shard_positions p WHERE p.shard = u.shard), 1)
             FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::int[], $5::bigint[])
                  AS u(id, sku, location, shard, delta)",
        )
        .bind(&ids)
        .bind(&skus)
        .bind(&locations)
        .bind(&shards)
        .bind(&deltas)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// The books of a SKU at every location it is stocked at (or one location).
    pub async fn books(&self, sku: u64, location: Option<u32>) -> Result<Vec<Books>, DbError> {
        let rows = sqlx::query(
            "SELECT s.sku, s.location, s.shard, s.on_hand, s.sold,
                    COALESCE((SELECT sum(a.delta) FROM adjustments a
                              WHERE a.sku = s.sku AND a.location = s.location AND a.journal_position IS NULL
                        AND a.state <> 'rejected' AND a.kind <> 'bootstrap'), 0)::bigint
                      AS pending_delta
             FROM stock_levels s WHERE s.sku = $1 AND ($2::bigint IS NULL OR s.location = $2)
             ORDER BY s.location",
        )
        .bind(sku as i64)
        .bind(location.map(i64::from))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(books_of).collect())
    }

    /// The books of every stock row of the given shards (reconcile), keyed by SKU and location.
    pub async fn books_of_shards(&self, shards: &[u32]) -> Result<HashMap<(u64, u32), Books>, DbError> {
        let shards: Vec<i32> = shards.iter().map(|&s| s as i32).collect();
        let rows = sqlx::query(
            "SELECT s.sku, s.location, s.shard, s.on_hand, s.sold, COALESCE(p.pending, 0)::bigint AS pending_delta
             FROM stock_levels s
             LEFT JOIN (SELECT sku, location, sum(delta) AS pending FROM adjustments
                        WHERE journal_position IS NULL AND state <> 'rejected' AND kind <> 'bootstrap'
                        GROUP BY sku, location) p ON p.sku = s.sku AND p.location = s.location
             WHERE s.shard = ANY($1)",
        )
        .bind(&shards)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(books_of).map(|b| ((b.sku, b.location), b)).collect())
    }

    /// Records an adjustment asked for by the back office, idempotent by its key: the
    /// same key with the same request returns the first adjustment; with another
    /// request, `KeyReused`. A set is turned into the delta against the books plus the
    /// adjustments still pending, under a lock on the stock row. The stock row is made if
    /// missing, on `shard`, in `epoch` (the shard's current epoch).
    pub async fn adjustment_ask(&self, ask: &AdjustmentAsk, shard: u32) -> Result<AdjustOutcome, DbError> {
        let mut tx = self.pool.begin().await?;
        if let Some(existing) = adjustment_by_key(&mut tx, &ask.key).await? {
            let same = existing.sku == ask.sku
                && existing.location == ask.location
                && match ask.change {
                    Change::Delta(d) => existing.kind == "adjust" && existing.delta == d,
                    Change::SetTo(n) => existing.kind == "set" && existing.set_to == Some(n),
                };
            return if same { Ok(AdjustOutcome::Replayed(existing)) } else { Err(DbError::KeyReused(ask.key.clone())) };
        }
        // The push lock before any row lock, in every writer: the pusher waits for it
        // holding nothing, so writers cannot wait for one another in a circle.
        push_lock_shared(&mut tx).await?;
        // Locked until commit, so that a concurrent change of the SKU's limit waits and
        // then finds (and queues again) the row made here.
        let backorder_limit: Option<i64> =
            sqlx::query_scalar("SELECT backorder_limit FROM skus WHERE sku = $1 FOR SHARE")
                .bind(ask.sku as i64)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(backorder_limit) = backorder_limit else {
            return Err(DbError::NotFound("SKU"));
        };
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM locations WHERE id = $1")
            .bind(i64::from(ask.location))
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(DbError::NotFound("location"));
        }
        sqlx::query(
            "INSERT INTO stock_levels (sku, location, shard, backorder_limit) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(ask.sku as i64)
        .bind(i64::from(ask.location))
        .bind(shard as i32)
        .bind(backorder_limit)
        .execute(&mut *tx)
        .await?;
        let on_hand: i64 =
            sqlx::query_scalar("SELECT on_hand FROM stock_levels WHERE sku = $1 AND location = $2 FOR UPDATE")
                .bind(ask.sku as i64)
                .bind(i64::from(ask.location))
                .fetch_one(&mut *tx)
                .await?;
        let (delta, set_to, kind) = match ask.change {
            Change::Delta(d) => (d, None, "adjust"),
            Change::SetTo(n) => {
                let pending: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(sum(delta), 0)::bigint FROM adjustments
                     WHERE sku = $1 AND location = $2 AND journal_position IS NULL
                       AND state <> 'rejected' AND kind <> 'bootstrap'",
                )
                .bind(ask.sku as i64)
                .bind(i64::from(ask.location))
                .fetch_one(&mut *tx)
                .await?;
                (n - on_hand - pending, Some(n), "set")
            }
        };
        if delta == 0 {
            tx.commit().await?;
            return Ok(AdjustOutcome::NoChange);
        }
        let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM shard_positions WHERE shard = $1")
            .bind(shard as i32)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(1);
        let result = sqlx::query(&format!(
            "INSERT INTO adjustments (id, idempotency_key, sku, location, shard, delta, kind, set_to, reason, epoch)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {ADJUSTMENT_COLUMNS}"
        ))
        .bind(Uuid::new_v4())
        .bind(&ask.key)
        .bind(ask.sku as i64)
        .bind(i64::from(ask.location))
        .bind(shard as i32)
        .bind(delta)
        .bind(kind)
        .bind(set_to)
        .bind(&ask.reason)
        .bind(epoch)
        .fetch_one(&mut *tx)
        .await;
        let row = match result {
            Ok(row) => row,
            // Another request with the same key won the race: answer as a retry would.
            Err(e) if is_unique_violation(&e) => {
                drop(tx);
                return Box::pin(self.adjustment_ask(ask, shard)).await;
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(AdjustOutcome::Created(adjustment_of(&row)))
    }

    /// One adjustment by id.
    pub async fn adjustment(&self, id: Uuid) -> Result<Adjustment, DbError> {
        let row = sqlx::query(&format!("SELECT {ADJUSTMENT_COLUMNS} FROM adjustments WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| adjustment_of(&r)).ok_or(DbError::NotFound("adjustment"))
    }

    /// Adjustments of a SKU, newest first.
    pub async fn adjustments_of(&self, sku: u64, limit: u32) -> Result<Vec<Adjustment>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {ADJUSTMENT_COLUMNS} FROM adjustments WHERE sku = $1 ORDER BY created_at DESC LIMIT $2"
        ))
        .bind(sku as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(adjustment_of).collect())
    }

    /// Sales in ledger order, optionally of one SKU or one hold, after a cursor
    /// (shard, epoch, position), at most `limit`.
    pub async fn sales(
        &self,
        sku: Option<u64>,
        hold: Option<Uuid>,
        after: Option<(u32, i64, i64)>,
        limit: u32,
    ) -> Result<Vec<Sale>, DbError> {
        let (shard, epoch, position) = after.map_or((-1, 0, 0), |(s, e, p)| (s as i32, e, p));
        let rows = sqlx::query(
            "SELECT * FROM sales
             WHERE ($1::bigint IS NULL OR sku = $1) AND ($2::uuid IS NULL OR hold_id = $2)
               AND (shard, epoch, position) > ($3, $4, $5)
             ORDER BY shard, epoch, position LIMIT $6",
        )
        .bind(sku.map(|s| s as i64))
        .bind(hold)
        .bind(shard)
        .bind(epoch)
        .bind(position)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Sale {
                shard: r.get::<i32, _>("shard") as u32,
                epoch: r.get("epoch"),
                position: r.get("position"),
                hold_id: r.get("hold_id"),
                sku: r.get::<i64, _>("sku") as u64,
                location: r.get::<i64, _>("location") as u32,
                qty: r.get("qty"),
                committed_at: r.get("committed_at"),
                drained_at: r.get("drained_at"),
            })
            .collect())
    }

    // ---------------------------------------------------------------- sync (drain, push)

    /// Every shard's drain state.
    pub async fn positions(&self) -> Result<Vec<ShardPosition>, DbError> {
        let rows = sqlx::query("SELECT shard, epoch, drained, incarnation FROM shard_positions ORDER BY shard")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(position_of).collect())
    }

    /// One shard's drain state.
    pub async fn position(&self, shard: u32) -> Result<ShardPosition, DbError> {
        let row = sqlx::query("SELECT shard, epoch, drained, incarnation FROM shard_positions WHERE shard = $1")
            .bind(shard as i32)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| position_of(&r)).ok_or(DbError::ShardsUnknown)
    }

    /// Writes drained journal entries into the books and moves the drained position from
    /// `from` to `next`, in one transaction. It applies only if the shard is still at
    /// `from` in `epoch` (another drainer, or a retry after a lost commit
    /// acknowledgement, finds it moved and writes nothing). Returns whether it applied.
    pub async fn drain_apply(
        &self,
        shard: u32,
        epoch: i64,
        from: u64,
        next: u64,
        entries: &[DrainedEntry],
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        if !position_move(&mut tx, shard, epoch, from, next).await? {
            return Ok(false);
        }
        drain_write_in(&mut tx, shard, epoch, entries).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Writes drained journal entries into the books in one transaction, without moving
    /// the drained position: idempotent, since an entry already in the books (by its
    /// shard, epoch and position, or its adjustment id) is skipped, so batches can be
    /// written concurrently and the position moved after them ([`Db::drain_advance`]).
    /// Returns how many entries were new.
    pub async fn drain_write(&self, shard: u32, epoch: i64, entries: &[DrainedEntry]) -> Result<u64, DbError> {
        let mut tx = self.pool.begin().await?;
        let written = drain_write_in(&mut tx, shard, epoch, entries).await?;
        tx.commit().await?;
        Ok(written)
    }

    /// Moves the drained position from `from` to `next` if it is still at `from` in
    /// `epoch`; every entry below `next` must already be in the books.
    pub async fn drain_advance(&self, shard: u32, epoch: i64, from: u64, next: u64) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let moved = position_move(&mut tx, shard, epoch, from, next).await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// Records the shard's incarnation for `epoch`, if none is recorded yet. Returns the
    /// incarnation recorded (this one, or the one seen before).
    pub async fn incarnation_note(&self, shard: u32, epoch: i64, incarnation: u64) -> Result<Option<u64>, DbError> {
        let recorded: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE shard_positions SET incarnation = COALESCE(incarnation, $3)
             WHERE shard = $1 AND epoch = $2 RETURNING incarnation",
        )
        .bind(shard as i32)
        .bind(epoch)
        .bind(incarnation as i64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(recorded.flatten().map(|i| i as u64))
    }

    /// Starts a new epoch for a shard that lost its state: the drain starts again at 1,
    /// and the shard's push cursor goes back to the start of the order, so that every
    /// stock row is told again where it stands, without rewriting the rows. After the
    /// rows come, for every row with stock in the books, a bootstrap adjustment that
    /// hands that figure to the shard, then every adjustment the books never saw drained
    /// (queued again behind the bootstrap; the shard deduplicates by id one it already
    /// has). Bootstrap adjustments of earlier epochs that were never drained are
    /// superseded by the new ones (rejected), so no shard is handed the books twice.
    /// Applies only if the shard is still in `epoch`. Returns the new epoch.
    pub async fn epoch_begin(&self, shard: u32, epoch: i64) -> Result<Option<i64>, DbError> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE shard_positions SET epoch = epoch + 1, drained = 1, incarnation = NULL, pushed_seq = 0,
                    updated_at = now()
             WHERE shard = $1 AND epoch = $2",
        )
        .bind(shard as i32)
        .bind(epoch)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Ok(None);
        }
        let new_epoch = epoch + 1;
        push_lock_shared(&mut tx).await?;
        sqlx::query(
            "UPDATE adjustments SET state = 'rejected', status = 'superseded by a later bootstrap'
             WHERE shard = $1 AND kind = 'bootstrap' AND journal_position IS NULL AND state = 'pending'",
        )
        .bind(shard as i32)
        .execute(&mut *tx)
        .await?;
        // Ids in the order they are made (a tag, then the place in the push order, which
        // no other adjustment has): a million of them append to the id index instead of
        // landing at random places in it.
        sqlx::query(
            "WITH rows AS (SELECT sku, location, shard, on_hand, nextval('push_seq') AS seq FROM stock_levels
                           WHERE shard = $1 AND on_hand <> 0 ORDER BY push_seq)
             INSERT INTO adjustments (id, sku, location, shard, delta, kind, reason, epoch, push_seq)
             SELECT ('b0075eed' || lpad(to_hex(seq), 24, '0'))::uuid, sku, location, shard, on_hand,
                    'bootstrap', 'the shard restarted empty', $2, seq
             FROM rows",
        )
        .bind(shard as i32)
        .bind(new_epoch)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "WITH again AS (SELECT id FROM adjustments
                            WHERE shard = $1 AND kind <> 'bootstrap' AND journal_position IS NULL
                              AND state <> 'rejected' AND push_seq IS NOT NULL
                            ORDER BY push_seq)
             UPDATE adjustments a SET push_seq = nextval('push_seq'), epoch = $2, state = 'pending'
             FROM again WHERE a.id = again.id",
        )
        .bind(shard as i32)
        .bind(new_epoch)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(new_epoch))
    }

    /// Which of `ids` are bootstrap adjustments (reconcile).
    pub async fn bootstrap_ids_among(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, DbError> {
        let rows = sqlx::query_scalar("SELECT id FROM adjustments WHERE id = ANY($1) AND kind = 'bootstrap'")
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// Bootstrap adjustments not yet seen in their shard's journal (reconcile).
    pub async fn bootstrap_pending(&self) -> Result<Vec<BootstrapPending>, DbError> {
        let rows = sqlx::query(
            "SELECT id, sku, location, delta FROM adjustments
             WHERE kind = 'bootstrap' AND state = 'pending' AND journal_position IS NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| BootstrapPending {
                id: r.get("id"),
                sku: r.get::<i64, _>("sku") as u64,
                location: r.get::<i64, _>("location") as u32,
                delta: r.get("delta"),
            })
            .collect())
    }

    /// What `shard` must be told next: up to `limit` stock rows and up to `limit`
    /// adjustments above its cursor, in `push_seq` order, cut where the first of the two
    /// lists was cut so that nothing in `(cursor, upto]` is left out. Only values that
    /// can no longer change are read: the sequence's value is taken under the exclusive
    /// push lock, which waits for every writer that took a value to commit or abort.
    pub async fn push_batch(&self, shard: u32, limit: u32) -> Result<PushBatch, DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PUSH_LOCK).execute(&mut *tx).await?;
        let (last, called): (i64, bool) =
            sqlx::query_as("SELECT last_value, is_called FROM push_seq").fetch_one(&mut *tx).await?;
        let row = sqlx::query("SELECT epoch, incarnation, pushed_seq FROM shard_positions WHERE shard = $1")
            .bind(shard as i32)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(DbError::ShardsUnknown)?;
        tx.commit().await?;
        let horizon = if called { last } else { 0 };
        let mut batch = PushBatch {
            epoch: row.get("epoch"),
            incarnation: row.get::<Option<i64>, _>("incarnation").map(|i| i as u64),
            cursor: row.get("pushed_seq"),
            upto: horizon,
            ..PushBatch::default()
        };
        if horizon <= batch.cursor {
            batch.upto = batch.cursor;
            return Ok(batch);
        }
        // Both reads walk their (shard, push_seq) index in order and stop at the limit.
        // Right after a bulk load PostgreSQL has no statistics, guesses that few rows
        // match, and would rather fetch all of them and sort (450 ms instead of 13 ms for
        // 32,768 of a million rows, every batch): sorting is ruled out for these reads.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL enable_sort = off").execute(&mut *tx).await?;
        let rows = sqlx::query(
            "SELECT push_seq, sku, location, backorder_limit FROM stock_levels
             WHERE shard = $1 AND push_seq > $2 AND push_seq <= $3 ORDER BY push_seq LIMIT $4",
        )
        .bind(shard as i32)
        .bind(batch.cursor)
        .bind(horizon)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        batch.rows = rows
            .iter()
            .map(|r| PushRow {
                seq: r.get("push_seq"),
                sku: r.get::<i64, _>("sku") as u64,
                location: r.get::<i64, _>("location") as u32,
                backorder_limit: r.get::<i64, _>("backorder_limit") as u32,
            })
            .collect();
        if batch.rows.len() == limit as usize {
            batch.upto = batch.rows.last().map_or(horizon, |r| r.seq);
        }
        let adjustments = sqlx::query(
            "SELECT push_seq, id, sku, location, delta FROM adjustments
             WHERE shard = $1 AND push_seq > $2 AND push_seq <= $3 AND state <> 'rejected'
               AND journal_position IS NULL
             ORDER BY push_seq LIMIT $4",
        )
        .bind(shard as i32)
        .bind(batch.cursor)
        .bind(batch.upto)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        batch.adjustments = adjustments
            .iter()
            .map(|r| PushAdjustment {
                seq: r.get("push_seq"),
                id: r.get::<Uuid, _>("id").as_u128(),
                sku: r.get::<i64, _>("sku") as u64,
                location: r.get::<i64, _>("location") as u32,
                delta: r.get("delta"),
            })
            .collect();
        if batch.adjustments.len() == limit as usize {
            let last = batch.adjustments.last().map_or(batch.upto, |a| a.seq);
            batch.upto = last;
            batch.rows.retain(|r| r.seq <= last);
        }
        Ok(batch)
    }

    /// Moves the shard's push cursor from `from` to `to`: the shard acknowledged
    /// everything in between. Applies only if the cursor is still at `from` (another
    /// pusher moved it otherwise). Returns whether it applied.
    pub async fn push_advance(&self, shard: u32, from: i64, to: i64) -> Result<bool, DbError> {
        let moved = sqlx::query("UPDATE shard_positions SET pushed_seq = $3 WHERE shard = $1 AND pushed_seq = $2")
            .bind(shard as i32)
            .bind(from)
            .bind(to)
            .execute(&self.pool)
            .await?;
        Ok(moved.rows_affected() == 1)
    }

    /// Queues stock rows and adjustments to be told again, in that order, after
    /// everything queued so far: the shard answered that it does not know the rows.
    pub async fn push_again(&self, rows: &[(u64, u32)], adjustments: &[u128]) -> Result<(), DbError> {
        let skus: Vec<i64> = rows.iter().map(|r| r.0 as i64).collect();
        let locations: Vec<i64> = rows.iter().map(|r| i64::from(r.1)).collect();
        let ids: Vec<Uuid> = adjustments.iter().map(|&id| Uuid::from_u128(id)).collect();
        let mut tx = self.pool.begin().await?;
        push_lock_shared(&mut tx).await?;
        sqlx::query(
            "UPDATE stock_levels s SET push_seq = nextval('push_seq')
             FROM UNNEST($1::bigint[], $2::bigint[]) AS u(sku, location)
             WHERE s.sku = u.sku AND s.location = u.location",
        )
        .bind(&skus)
        .bind(&locations)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE adjustments SET push_seq = nextval('push_seq') WHERE id = ANY($1) AND state = 'pending'")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records adjustments the shard refused for good, with the status's name.
    pub async fn pushes_rejected(&self, rejected: &[(u128, String)]) -> Result<(), DbError> {
        if rejected.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = rejected.iter().map(|r| Uuid::from_u128(r.0)).collect();
        let statuses: Vec<&str> = rejected.iter().map(|r| r.1.as_str()).collect();
        sqlx::query(
            "UPDATE adjustments a SET state = 'rejected', status = u.status
             FROM UNNEST($1::uuid[], $2::text[]) AS u(id, status) WHERE a.id = u.id AND a.state = 'pending'",
        )
        .bind(&ids)
        .bind(&statuses)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stock rows and adjustments of `shard` not yet acknowledged (above its cursor).
    pub async fn push_backlog(&self, shard: u32) -> Result<(i64, i64), DbError> {
        let backlog: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM stock_levels s WHERE s.shard = p.shard AND s.push_seq > p.pushed_seq),
                    (SELECT count(*) FROM adjustments a WHERE a.shard = p.shard AND a.push_seq > p.pushed_seq
                                                          AND a.state <> 'rejected' AND a.journal_position IS NULL)
             FROM shard_positions p WHERE p.shard = $1",
        )
        .bind(shard as i32)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::ShardsUnknown)?;
        Ok(backlog)
    }
}

fn position_of(row: &sqlx::postgres::PgRow) -> ShardPosition {
    ShardPosition {
        shard: row.get::<i32, _>("shard") as u32,
        epoch: row.get("epoch"),
        drained: row.get::<i64, _>("drained") as u64,
        incarnation: row.get::<Option<i64>, _>("incarnation").map(|i| i as u64),
    }
}

fn books_of(row: &sqlx::postgres::PgRow) -> Books {
    Books {
        sku: row.get::<i64, _>("sku") as u64,
        location: row.get::<i64, _>("location") as u32,
        shard: row.get::<i32, _>("shard") as u32,
        on_hand: row.get("on_hand"),
        sold: row.get("sold"),
        pending_delta: row.get("pending_delta"),
    }
}

async fn position_move(
    tx: &mut Transaction<'_, Postgres>,
    shard: u32,
    epoch: i64,
    from: u64,
    next: u64,
) -> Result<bool, DbError> {
    let moved = sqlx::query(
        "UPDATE shard_positions SET drained = $4, updated_at = now()
         WHERE shard = $1 AND epoch = $2 AND drained = $3",
    )
    .bind(shard as i32)
    .bind(epoch)
    .bind(from as i64)
    .bind(next as i64)
    .execute(&mut **tx)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Adds `changes` (SKU, location, on-hand delta, units sold) to the books of `shard`.
/// Concurrent drain transactions of a shard update overlapping rows; each first takes
/// the shard's transaction-level advisory lock, so their updates queue up behind one
/// another (held until commit) instead of locking rows in different orders and
/// deadlocking. Their ledger inserts, the bulk of the work, still run side by side.
async fn books_change(
    tx: &mut Transaction<'_, Postgres>,
    shard: u32,
    mut changes: Vec<((u64, u32), (i64, i64))>,
) -> Result<(), DbError> {
    if changes.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(BOOKS_LOCK_BASE + i64::from(shard)).execute(&mut **tx).await?;
    changes.sort_unstable_by_key(|c| c.0);
    let skus: Vec<i64> = changes.iter().map(|c| c.0 .0 as i64).collect();
    let locations: Vec<i64> = changes.iter().map(|c| i64::from(c.0 .1)).collect();
    let deltas: Vec<i64> = changes.iter().map(|c| c.1 .0).collect();
    let sold: Vec<i64> = changes.iter().map(|c| c.1 .1).collect();
    sqlx::query(
        "UPDATE stock_levels s SET on_hand = s.on_hand + u.delta, sold = s.sold + u.sold
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS u(sku, location, delta, sold)
         WHERE s.sku = u.sku AND s.location = u.location",
    )
    .bind(&skus)
    .bind(&locations)
    .bind(&deltas)
    .bind(&sold)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The body of a drain write: ledger rows for sales, adjustments marked as journaled,
/// and the books changed by exactly the entries that were not there yet.
async fn drain_write_in(
    tx: &mut Transaction<'_, Postgres>,
    shard: u32,
    epoch: i64,
    entries: &[DrainedEntry],
) -> Result<u64, DbError> {
    let (mut positions, mut holds, mut skus, mut locations, mut qtys) = (vec![], vec![], vec![], vec![], vec![]);
    let mut committed_at: Vec<DateTime<Utc>> = vec![];
    let (mut ids, mut adj_positions, mut adj_skus, mut adj_locations, mut deltas) =
        (vec![], vec![], vec![], vec![], vec![]);
    for entry in entries {
        match entry.kind {
            DrainedKind::Sale { hold, qty, at_ms } => {
                committed_at.push(DateTime::from_timestamp_millis(at_ms as i64).unwrap_or_default());
                positions.push(entry.position as i64);
                holds.push(Uuid::from_u128(hold));
                skus.push(entry.sku as i64);
                locations.push(i64::from(entry.location));
                qtys.push(i64::from(qty));
            }
            DrainedKind::Adjustment { id, delta } => {
                ids.push(Uuid::from_u128(id));
                adj_positions.push(entry.position as i64);
                adj_skus.push(entry.sku as i64);
                adj_locations.push(i64::from(entry.location));
                deltas.push(delta);
            }
        }
    }
    let mut written = 0;
    let mut changes: HashMap<(u64, u32), (i64, i64)> = HashMap::new();
    if !positions.is_empty() {
        // A batch is a range of positions; if none of them is in the ledger yet (the
        // usual case), COPY writes them all (a concurrent writer of the same range makes
        // it fail on the key, and the batch is tried again). Otherwise (a batch written
        // before a crash, read again) an insert skips what is there; that costs more, so
        // it is only the fallback.
        let (first, last) = (positions.iter().min().copied(), positions.iter().max().copied());
        let present: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sales WHERE shard = $1 AND epoch = $2 AND position BETWEEN $3 AND $4",
        )
        .bind(shard as i32)
        .bind(epoch)
        .bind(first)
        .bind(last)
        .fetch_one(&mut **tx)
        .await?;
        // The positions written, or `None` when all of them were.
        let inserted: Option<std::collections::HashSet<i64>> = if present == 0 {
            // All new: COPY, which PostgreSQL loads faster than an INSERT of the arrays.
            let mut text = String::with_capacity(positions.len() * 112);
            for i in 0..positions.len() {
                let at = committed_at[i].to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let row = (positions[i], holds[i], skus[i], locations[i], qtys[i]);
                let _ = writeln!(text, "{shard}\t{epoch}\t{}\t{}\t{}\t{}\t{}\t{at}", row.0, row.1, row.2, row.3, row.4);
            }
            let mut copy = (**tx)
                .copy_in_raw(
                    "COPY sales (shard, epoch, position, hold_id, sku, location, qty, committed_at) FROM STDIN",
                )
                .await?;
            copy.send(text.into_bytes()).await?;
            let rows = copy.finish().await?;
            if rows != positions.len() as u64 {
                return Err(DbError::Sql(sqlx::Error::Protocol(format!(
                    "COPY wrote {rows} ledger rows of {}",
                    positions.len()
                ))));
            }
            None
        } else {
            let inserted: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO sales (shard, epoch, position, hold_id, sku, location, qty, committed_at)
                 SELECT $1, $2, * FROM UNNEST($3::bigint[], $4::uuid[], $5::bigint[], $6::bigint[], $7::bigint[],
                                              $8::timestamptz[])
                 ON CONFLICT DO NOTHING RETURNING position",
            )
            .bind(shard as i32)
            .bind(epoch)
            .bind(&positions)
            .bind(&holds)
            .bind(&skus)
            .bind(&locations)
            .bind(&qtys)
            .bind(&committed_at)
            .fetch_all(&mut **tx)
            .await?;
            Some(inserted.into_iter().collect())
        };
        written += inserted.as_ref().map_or(positions.len(), |some| some.len()) as u64;
        for i in 0..positions.len() {
            if inserted.as_ref().is_none_or(|some| some.contains(&positions[i])) {
                let change = changes.entry((skus[i] as u64, locations[i] as u32)).or_default();
                change.0 -= qtys[i];
                change.1 += qtys[i];
            }
        }
    }
    if !ids.is_empty() {
        // An adjustment we asked for is now applied and in the journal; one we never
        // asked for (pushed by another tool) is recorded as foreign. Only those not yet
        // seen in a journal come back, and of those only the non-bootstrap ones change
        // the books (a bootstrap adjustment hands the books' own figure to the shard).
        let newly: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "INSERT INTO adjustments (id, sku, location, shard, delta, kind, state, epoch, applied_at,
                                      journal_epoch, journal_position, push_seq)
             SELECT u.id, u.sku, u.location, $1, u.delta, 'foreign', 'applied', $2, now(), $2, u.position, NULL
             FROM UNNEST($3::uuid[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])
                  AS u(id, position, sku, location, delta)
             ON CONFLICT (id) DO UPDATE SET state = 'applied', status = NULL,
                applied_at = COALESCE(adjustments.applied_at, now()),
                journal_epoch = EXCLUDED.journal_epoch, journal_position = EXCLUDED.journal_position
             WHERE adjustments.journal_position IS NULL
             RETURNING sku, location, delta, kind",
        )
        .bind(shard as i32)
        .bind(epoch)
        .bind(&ids)
        .bind(&adj_positions)
        .bind(&adj_skus)
        .bind(&adj_locations)
        .bind(&deltas)
        .fetch_all(&mut **tx)
        .await?;
        written += newly.len() as u64;
        for (sku, location, delta, kind) in newly {
            if kind != "bootstrap" {
                changes.entry((sku as u64, location as u32)).or_default().0 += delta;
            }
        }
    }
    books_change(tx, shard, changes.into_iter().collect()).await?;
    Ok(written)
}

async fn adjustment_by_key(tx: &mut Transaction<'_, Postgres>, key: &str) -> Result<Option<Adjustment>, DbError> {
    let row = sqlx::query(&format!("SELECT {ADJUSTMENT_COLUMNS} FROM adjustments WHERE idempotency_key = $1"))
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.map(|r| adjustment_of(&r)))
}
