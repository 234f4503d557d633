//! The stock routes: adjustments and "set on hand", the books (PostgreSQL), live
//! availability (the data plane), the sales ledger and reconcile.
//!
//! An adjustment is recorded in PostgreSQL as *intended* and pushed to the owning shard
//! in the background; the answer says it is `pending` until the shard acknowledged it.
//! Both writes are idempotent by the client's `idempotency_key`: the same key with the
//! same request answers the first adjustment again (200, header `Idempotent-Replayed`),
//! with a different request 409, and nothing new is written either way. An adjustment
//! needs the shard that owns the SKU, so before the data plane was ever reached the
//! writes answer 503 and record nothing.

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use stockplane_engine::shard_for;
use stockplane_wire::SkuAt;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ApiError, Body, ErrorBody, PathParams, QueryParams};
use super::input::{input_limit, input_reason, input_sku, input_text, KEY_CHARS_MAX, STOCK_UNITS_MAX};
use crate::dataplane::CallError;
use crate::db::{AdjustOutcome, Adjustment, AdjustmentAsk, Books, Change, Sale};
use crate::reconcile::{reconcile, Report};
use crate::App;

/// The header that marks an answer replayed from an earlier request with the same key.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A change of stock by a number of units.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentCreate {
    /// The client's key for this change, 1 to 200 characters: a retry with the same key
    /// and the same request is applied once.
    pub idempotency_key: String,
    /// The SKU, at most `i64::MAX`.
    #[schema(maximum = 9223372036854775807_u64)]
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// Units added (negative: removed); not zero, at most 1000000000 either way.
    #[schema(minimum = -1_000_000_000, maximum = 1_000_000_000)]
    pub delta: i64,
    /// Why, in words (at most 1000 characters).
    pub reason: Option<String>,
}

/// "Set on hand to N" at one SKU and location.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StockSet {
    /// The client's key for this change, 1 to 200 characters.
    pub idempotency_key: String,
    /// The on-hand figure wanted, 0 to 1000000000.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub on_hand: i64,
    /// Why, in words (at most 1000 characters).
    pub reason: Option<String>,
}

/// The answer to a set that changes nothing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NoChange {
    /// Always `no_change`.
    pub outcome: String,
    /// What was found, in words.
    pub message: String,
}

/// What a set answers: the adjustment it made (or made before, for a retry), or that
/// there was nothing to change.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum SetAnswer {
    /// The adjustment.
    Adjustment(Adjustment),
    /// Nothing to change.
    NoChange(NoChange),
}

/// The live stock of a SKU at one location, as the data plane has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StockLevel {
    /// The SKU.
    pub sku: u64,
    /// The location.
    pub location: u32,
    /// Sellable units: set by the back office, lowered by each sale.
    pub on_hand: i64,
    /// Units in live holds.
    pub held: i64,
    /// `on_hand - held`; never below `-backorder_limit`.
    pub available: i64,
    /// How far below zero `available` may go.
    pub backorder_limit: u32,
}

impl From<stockplane_wire::StockLevel> for StockLevel {
    fn from(level: stockplane_wire::StockLevel) -> StockLevel {
        StockLevel {
            sku: level.sku,
            location: level.location,
            on_hand: level.on_hand,
            held: level.held,
            available: level.available,
            backorder_limit: level.backorder_limit,
        }
    }
}

/// How many adjustments to list.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LimitQuery {
    /// Items to give, 1 to 1000; 100 when left out.
    pub limit: Option<u32>,
}

/// Which sales to list.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SalesQuery {
    /// Only sales of this SKU.
    pub sku: Option<u64>,
    /// Only sales of this hold (cart).
    pub hold: Option<Uuid>,
    /// The cursor's shard: give sales after (`after_shard`, `after_epoch`,
    /// `after_position`) in ledger order. The three go together.
    pub after_shard: Option<u32>,
    /// The cursor's epoch.
    pub after_epoch: Option<i64>,
    /// The cursor's journal position.
    pub after_position: Option<i64>,
    /// Items in the page, 1 to 1000; 100 when left out.
    pub limit: Option<u32>,
}

/// Where a page of sales ended: the `after_*` parameters of the next page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SaleCursor {
    /// The shard.
    pub after_shard: u32,
    /// The epoch.
    pub after_epoch: i64,
    /// The journal position.
    pub after_position: i64,
}

/// A page of sales.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SalePage {
    /// Sales in ledger order (shard, epoch, position).
    pub items: Vec<Sale>,
    /// The cursor of the next page; absent when this page is the last.
    pub next: Option<SaleCursor>,
}

/// The shard that owns `sku`, or 503 when the data plane was never reached.
async fn stock_shard(app: &App, sku: u64) -> Result<u32, ApiError> {
    match app.db.shards().await? {
        Some(shards) => Ok(shard_for(sku, shards)),
        None => Err(ApiError::dataplane_unavailable(
            "the data plane has not been reached yet, so the shard that owns the SKU is unknown; nothing was recorded",
        )),
    }
}

/// The answer to a recorded adjustment request.
fn stock_answer(outcome: AdjustOutcome, app: &App) -> Response {
    match outcome {
        AdjustOutcome::Created(adjustment) => {
            app.push_wake.notify_waiters();
            (StatusCode::CREATED, Json(adjustment)).into_response()
        }
        AdjustOutcome::Replayed(adjustment) => (
            StatusCode::OK,
            [(HeaderName::from_static(REPLAYED_HEADER), HeaderValue::from_static("true"))],
            Json(adjustment),
        )
            .into_response(),
        AdjustOutcome::NoChange => (
            StatusCode::OK,
            Json(NoChange {
                outcome: "no_change".into(),
                message: "on hand is already the figure asked for (counting pending adjustments): nothing to change"
                    .into(),
            }),
        )
            .into_response(),
    }
}

/// Adds or removes units of a SKU at a location.
#[utoipa::path(
    post, path = "/v1/stock/adjustments", tag = "stock",
    request_body = AdjustmentCreate,
    responses(
        (status = 201, description = "Recorded; pending until the drain finds it in the shard's journal", body = Adjustment),
        (status = 200, description = "A retry: the first adjustment with this key", body = Adjustment),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such SKU or location", body = ErrorBody),
        (status = 409, description = "The key was used for a different request", body = ErrorBody),
        (status = 503, description = "The data plane was never reached", body = ErrorBody),
    )
)]
pub async fn adjustment_create(
    State(app): State<App>,
    Body(create): Body<AdjustmentCreate>,
) -> Result<Response, ApiError> {
    if create.delta == 0 {
        return Err(ApiError::invalid("delta must not be zero"));
    }
    if create.delta.unsigned_abs() > STOCK_UNITS_MAX as u64 {
        return Err(ApiError::invalid(format!("delta must be at most {STOCK_UNITS_MAX} either way")));
    }
    let ask = AdjustmentAsk {
        key: create.idempotency_key,
        sku: create.sku,
        location: create.location,
        change: Change::Delta(create.delta),
        reason: create.reason.unwrap_or_default(),
    };
    stock_ask(&app, ask).await
}

/// Checks what both stock changes share (the key, the SKU, the reason), records the
/// change on the SKU's shard and answers as `stock_answer` says.
async fn stock_ask(app: &App, ask: AdjustmentAsk) -> Result<Response, ApiError> {
    input_sku("sku", ask.sku)?;
    input_text("idempotency_key", &ask.key, KEY_CHARS_MAX)?;
    input_reason(&ask.reason)?;
    let shard = stock_shard(app, ask.sku).await?;
    Ok(stock_answer(app.db.adjustment_ask(&ask, shard).await?, app))
}

/// Sets the on-hand figure of a SKU at a location, as the delta against the books.
#[utoipa::path(
    put, path = "/v1/stock/{sku}/{location}", tag = "stock",
    params(
        ("sku" = u64, Path, description = "The SKU number"),
        ("location" = u32, Path, description = "The location's id"),
    ),
    request_body = StockSet,
    responses(
        (status = 201, description = "Recorded as an adjustment; pending until the drain finds it in the shard's journal", body = Adjustment),
        (status = 200, description = "A retry (the first adjustment with this key), or nothing to change", body = SetAnswer),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such SKU or location", body = ErrorBody),
        (status = 409, description = "The key was used for a different request", body = ErrorBody),
        (status = 503, description = "The data plane was never reached", body = ErrorBody),
    )
)]
pub async fn stock_set(
    State(app): State<App>,
    PathParams((sku, location)): PathParams<(u64, u32)>,
    Body(set): Body<StockSet>,
) -> Result<Response, ApiError> {
    if !(0..=STOCK_UNITS_MAX).contains(&set.on_hand) {
        return Err(ApiError::invalid(format!("on_hand must be between 0 and {STOCK_UNITS_MAX}")));
    }
    let ask = AdjustmentAsk {
        key: set.idempotency_key,
        sku,
        location,
        change: Change::SetTo(set.on_hand),
        reason: set.reason.unwrap_or_default(),
    };
    stock_ask(&app, ask).await
}

/// One adjustment.
#[utoipa::path(
    get, path = "/v1/stock/adjustments/{id}", tag = "stock",
    params(("id" = Uuid, Path, description = "The adjustment's id")),
    responses(
        (status = 200, description = "The adjustment", body = Adjustment),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such adjustment", body = ErrorBody),
    )
)]
pub async fn adjustment_get(
    State(app): State<App>,
    PathParams(id): PathParams<Uuid>,
) -> Result<Json<Adjustment>, ApiError> {
    Ok(Json(app.db.adjustment(id).await?))
}

/// The adjustments of a SKU, newest first.
#[utoipa::path(
    get, path = "/v1/skus/{sku}/adjustments", tag = "stock",
    params(("sku" = u64, Path, description = "The SKU number"), LimitQuery),
    responses(
        (status = 200, description = "Adjustments, newest first", body = Vec<Adjustment>),
        (status = 400, description = "Bad SKU or query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such SKU", body = ErrorBody),
    )
)]
pub async fn sku_adjustments(
    State(app): State<App>,
    PathParams(sku): PathParams<u64>,
    QueryParams(query): QueryParams<LimitQuery>,
) -> Result<Json<Vec<Adjustment>>, ApiError> {
    input_sku("sku", sku)?;
    let limit = input_limit(query.limit)?;
    app.db.sku(sku).await?;
    Ok(Json(app.db.adjustments_of(sku, limit).await?))
}

/// The books of a SKU at every location it is stocked at.
#[utoipa::path(
    get, path = "/v1/skus/{sku}/books", tag = "stock",
    params(("sku" = u64, Path, description = "The SKU number")),
    responses(
        (status = 200, description = "The books, by location", body = Vec<Books>),
        (status = 400, description = "Bad SKU", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such SKU", body = ErrorBody),
    )
)]
pub async fn sku_books(State(app): State<App>, PathParams(sku): PathParams<u64>) -> Result<Json<Vec<Books>>, ApiError> {
    input_sku("sku", sku)?;
    app.db.sku(sku).await?;
    Ok(Json(app.db.books(sku, None).await?))
}

/// The live stock of a SKU at every location, from the data plane.
#[utoipa::path(
    get, path = "/v1/skus/{sku}/availability", tag = "stock",
    params(("sku" = u64, Path, description = "The SKU number")),
    responses(
        (status = 200, description = "The data plane's stock, by location (empty: not yet pushed)", body = Vec<StockLevel>),
        (status = 400, description = "Bad SKU", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such SKU", body = ErrorBody),
        (status = 503, description = "The data plane is unreachable or was never reached", body = ErrorBody),
    )
)]
pub async fn sku_availability(
    State(app): State<App>,
    PathParams(sku): PathParams<u64>,
) -> Result<Json<Vec<StockLevel>>, ApiError> {
    input_sku("sku", sku)?;
    app.db.sku(sku).await?;
    let Some(dataplane) = app.link.get() else {
        return Err(ApiError::dataplane_unavailable("the data plane has not been reached yet"));
    };
    match dataplane.stock(&[SkuAt { sku, location: None }]).await {
        Ok(levels) => {
            let mut levels: Vec<StockLevel> = levels.into_iter().map(StockLevel::from).collect();
            levels.sort_by_key(|level| level.location);
            Ok(Json(levels))
        }
        Err(error) => Err(stock_call_failed(error)),
    }
}

/// A failed data plane call, logged here and answered as 503.
fn stock_call_failed(error: CallError) -> ApiError {
    tracing::warn!(error = %error, "a data plane call of the API failed");
    ApiError::dataplane_unavailable(format!("the data plane did not answer: {error}"))
}

/// The sales ledger, in ledger order.
#[utoipa::path(
    get, path = "/v1/sales", tag = "stock",
    params(SalesQuery),
    responses(
        (status = 200, description = "A page of sales", body = SalePage),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    )
)]
pub async fn sales_list(
    State(app): State<App>,
    QueryParams(query): QueryParams<SalesQuery>,
) -> Result<Json<SalePage>, ApiError> {
    let limit = input_limit(query.limit)?;
    if let Some(sku) = query.sku {
        input_sku("sku", sku)?;
    }
    let after = match (query.after_shard, query.after_epoch, query.after_position) {
        (Some(shard), Some(epoch), Some(position)) => Some((shard, epoch, position)),
        (None, None, None) => None,
        _ => return Err(ApiError::invalid("after_shard, after_epoch and after_position go together")),
    };
    let items = app.db.sales(query.sku, query.hold, after, limit).await?;
    let next = match items.last() {
        Some(last) if items.len() == limit as usize => {
            Some(SaleCursor { after_shard: last.shard, after_epoch: last.epoch, after_position: last.position })
        }
        _ => None,
    };
    Ok(Json(SalePage { items, next }))
}

/// Compares the books with the data plane, per SKU and location.
#[utoipa::path(
    post, path = "/v1/reconcile", tag = "stock",
    responses(
        (status = 200, description = "What reconcile found (no differences: the books reconcile)", body = Report),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 500, description = "Reconcile failed", body = ErrorBody),
        (status = 503, description = "The data plane is unreachable or was never reached", body = ErrorBody),
    )
)]
pub async fn reconcile_run(State(app): State<App>) -> Result<Json<Report>, ApiError> {
    let Some(dataplane) = app.link.get() else {
        return Err(ApiError::dataplane_unavailable("the data plane has not been reached yet"));
    };
    match reconcile(&app.db, &dataplane).await {
        Ok(report) => Ok(Json(report)),
        Err(error) => match error.downcast::<CallError>() {
            Ok(call) => Err(stock_call_failed(call)),
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "reconcile failed");
                Err(ApiError::internal())
            }
        },
    }
}
