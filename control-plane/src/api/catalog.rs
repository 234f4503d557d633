//! The catalog routes: locations and SKUs, created, listed, read and changed.
//!
//! Ids are the client's (a location is the `u32` the data plane knows it by, a SKU its
//! `u64` number), so a create of an existing id is a conflict (409), never an update.
//! A SKU change bumps its version and wakes the pusher, which tells the owning shards.
//! Lists are pages in id order: `next_after` is the `after` of the next page, present
//! only when this page is full.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Body, ErrorBody, PathParams, QueryParams};
use super::input::{input_limit, input_sku, input_text, NAME_CHARS_MAX};
use crate::db::{Location, Sku};
use crate::App;

/// A new location.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationCreate {
    /// The id the data plane will know it by.
    pub id: u32,
    /// A name for people, 1 to 200 characters.
    pub name: String,
}

/// A change of a location.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationPatch {
    /// The new name, 1 to 200 characters.
    pub name: String,
}

/// A new SKU.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkuCreate {
    /// The SKU number, at most 9223372036854775807 (`i64::MAX`).
    #[schema(maximum = 9223372036854775807_u64)]
    pub sku: u64,
    /// A name for people, 1 to 200 characters.
    pub name: String,
    /// How far below zero `available` may go at each location (0: no backorders).
    #[serde(default)]
    pub backorder_limit: u32,
}

/// A change of a SKU: at least one field.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkuPatch {
    /// The new name, 1 to 200 characters.
    pub name: Option<String>,
    /// The new backorder limit.
    pub backorder_limit: Option<u32>,
}

/// Which page of a list to give.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Give only ids above this one (the previous page's `next_after`).
    pub after: Option<u64>,
    /// Items in the page, 1 to 1000; 100 when left out.
    pub limit: Option<u32>,
}

/// A page of locations.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LocationPage {
    /// Locations in id order.
    pub items: Vec<Location>,
    /// The `after` of the next page; absent when this page is the last.
    pub next_after: Option<u32>,
}

/// A page of SKUs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SkuPage {
    /// SKUs in order.
    pub items: Vec<Sku>,
    /// The `after` of the next page; absent when this page is the last.
    pub next_after: Option<u64>,
}

/// Creates a location.
#[utoipa::path(
    post, path = "/v1/locations", tag = "catalog",
    request_body = LocationCreate,
    responses(
        (status = 201, description = "Created", body = Location),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 409, description = "The location exists", body = ErrorBody),
    )
)]
pub async fn location_create(
    State(app): State<App>,
    Body(create): Body<LocationCreate>,
) -> Result<impl IntoResponse, ApiError> {
    input_text("name", &create.name, NAME_CHARS_MAX)?;
    if create.id == stockplane_engine::wal::ANY_LOCATION {
        return Err(ApiError::invalid(format!(
            "id {} is reserved: the data plane reads it as \"any location\"",
            stockplane_engine::wal::ANY_LOCATION
        )));
    }
    let location = app.db.location_create(create.id, &create.name).await?;
    let url = format!("/v1/locations/{}", location.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, url)], Json(location)))
}

/// Lists locations in id order.
#[utoipa::path(
    get, path = "/v1/locations", tag = "catalog",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of locations", body = LocationPage),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    )
)]
pub async fn locations_list(
    State(app): State<App>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<LocationPage>, ApiError> {
    let limit = input_limit(query.limit)?;
    // An `after` beyond every u32 id: nothing is after it.
    let Ok(after) = query.after.map(u32::try_from).transpose() else {
        return Ok(Json(LocationPage { items: vec![], next_after: None }));
    };
    let items = app.db.locations(after, limit).await?;
    let next_after = if items.len() == limit as usize { items.last().map(|l| l.id) } else { None };
    Ok(Json(LocationPage { items, next_after }))
}

/// One location.
#[utoipa::path(
    get, path = "/v1/locations/{id}", tag = "catalog",
    params(("id" = u32, Path, description = "The location's id")),
    responses(
        (status = 200, description = "The location", body = Location),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such location", body = ErrorBody),
    )
)]
pub async fn location_get(State(app): State<App>, PathParams(id): PathParams<u32>) -> Result<Json<Location>, ApiError> {
    Ok(Json(app.db.location(id).await?))
}

/// Renames a location.
#[utoipa::path(
    patch, path = "/v1/locations/{id}", tag = "catalog",
    params(("id" = u32, Path, description = "The location's id")),
    request_body = LocationPatch,
    responses(
        (status = 200, description = "The location as changed", body = Location),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such location", body = ErrorBody),
    )
)]
pub async fn location_patch(
    State(app): State<App>,
    PathParams(id): PathParams<u32>,
    Body(patch): Body<LocationPatch>,
) -> Result<Json<Location>, ApiError> {
    input_text("name", &patch.name, NAME_CHARS_MAX)?;
    Ok(Json(app.db.location_update(id, &patch.name).await?))
}

/// Creates a SKU.
#[utoipa::path(
    post, path = "/v1/skus", tag = "catalog",
    request_body = SkuCreate,
    responses(
        (status = 201, description = "Created", body = Sku),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 409, description = "The SKU exists", body = ErrorBody),
    )
)]
pub async fn sku_create(State(app): State<App>, Body(create): Body<SkuCreate>) -> Result<impl IntoResponse, ApiError> {
    input_sku("sku", create.sku)?;
    input_text("name", &create.name, NAME_CHARS_MAX)?;
    let sku = app.db.sku_create(create.sku, &create.name, create.backorder_limit).await?;
    let url = format!("/v1/skus/{}", sku.sku);
    Ok((StatusCode::CREATED, [(header::LOCATION, url)], Json(sku)))
}

/// Lists SKUs in order.
#[utoipa::path(
    get, path = "/v1/skus", tag = "catalog",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of SKUs", body = SkuPage),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    )
)]
pub async fn skus_list(
    State(app): State<App>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<SkuPage>, ApiError> {
    let limit = input_limit(query.limit)?;
    // An `after` at or beyond the largest SKU the books can hold: nothing is after it.
    if query.after.is_some_and(|after| after >= i64::MAX as u64) {
        return Ok(Json(SkuPage { items: vec![], next_after: None }));
    }
    let items = app.db.skus(query.after, limit).await?;
    let next_after = if items.len() == limit as usize { items.last().map(|s| s.sku) } else { None };
    Ok(Json(SkuPage { items, next_after }))
}

/// One SKU.
#[utoipa::path(
    get, path = "/v1/skus/{sku}", tag = "catalog",
    params(("sku" = u64, Path, description = "The SKU number")),
    responses(
        (status = 200, description = "The SKU", body = Sku),
        (status = 400, description = "Bad SKU", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such SKU", body = ErrorBody),
    )
)]
pub async fn sku_get(State(app): State<App>, PathParams(sku): PathParams<u64>) -> Result<Json<Sku>, ApiError> {
    input_sku("sku", sku)?;
    Ok(Json(app.db.sku(sku).await?))
}

/// Changes a SKU's name or backorder limit; the shards that stock it are told.
#[utoipa::path(
    patch, path = "/v1/skus/{sku}", tag = "catalog",
    params(("sku" = u64, Path, description = "The SKU number")),
    request_body = SkuPatch,
    responses(
        (status = 200, description = "The SKU as changed (its version bumped)", body = Sku),
        (status = 400, description = "Bad input, or nothing to change", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such SKU", body = ErrorBody),
    )
)]
pub async fn sku_patch(
    State(app): State<App>,
    PathParams(sku): PathParams<u64>,
    Body(patch): Body<SkuPatch>,
) -> Result<Json<Sku>, ApiError> {
    input_sku("sku", sku)?;
    if let Some(name) = &patch.name {
        input_text("name", name, NAME_CHARS_MAX)?;
    }
    if patch.name.is_none() && patch.backorder_limit.is_none() {
        return Err(ApiError::invalid("give name, backorder_limit or both: there is nothing to change"));
    }
    let sku = app.db.sku_update(sku, patch.name.as_deref(), patch.backorder_limit).await?;
    app.push_wake.notify_waiters();
    Ok(Json(sku))
}
