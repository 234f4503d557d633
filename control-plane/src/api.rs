//! The back-office HTTP API: JSON in and out under `/v1`, its OpenAPI document at
//! `/openapi.json`.
//!
//! - [`catalog`]: locations and SKUs;
//! - [`stock`]: adjustments, "set on hand", the books, live availability, sales, reconcile;
//! - [`error`]: the one error body, and extractors that map axum's rejections into it;
//! - [`input`]: checks that serde's types alone cannot express.
//!
//! # Invariants
//! - Every `/v1` route needs `Authorization: Bearer <token>`. GET and HEAD accept an
//!   admin or a read token; every other method needs an admin token. No or an unknown
//!   token is 401, a read token on a write 403. Tokens are compared in constant time.
//!   `/openapi.json` is public: it describes the API, it holds no data.
//! - Every 4xx and 5xx answer is `{"error": <code>, "message": <words>}` — including
//!   unknown routes, wrong methods, and bodies or paths that do not parse. Bad input is
//!   refused with 400 before anything is written.
//! - Request bodies are limited to [`BODY_BYTES_MAX`].
//! - [`ROUTES`] is the one list of what is served: the router is built from it, and a
//!   test holds it equal to the paths of the OpenAPI document.
//! - Every answer is counted in `stockplane_cp_http_requests_total{route, status}`.
//!
//! This module holds no SQL (that is `db`'s) and keeps no state of its own.

pub mod catalog;
pub mod error;
pub mod input;
pub mod stock;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::{Json, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi;

use self::error::{ApiError, ErrorBody};
use crate::App;

/// The largest request body the API reads; a larger one is refused with 413.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// The path of the OpenAPI document.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// Makes a route's handlers (a function, so that [`ROUTES`] can be a constant).
pub type Handlers = fn() -> MethodRouter<App>;

/// Every `/v1` route: its path and its handlers. The router is built from this list.
pub const ROUTES: &[(&str, Handlers)] = &[
    ("/v1/locations", || post(catalog::location_create).get(catalog::locations_list)),
    ("/v1/locations/{id}", || get(catalog::location_get).patch(catalog::location_patch)),
    ("/v1/skus", || post(catalog::sku_create).get(catalog::skus_list)),
    ("/v1/skus/{sku}", || get(catalog::sku_get).patch(catalog::sku_patch)),
    ("/v1/skus/{sku}/adjustments", || get(stock::sku_adjustments)),
    ("/v1/skus/{sku}/books", || get(stock::sku_books)),
    ("/v1/skus/{sku}/availability", || get(stock::sku_availability)),
    ("/v1/stock/adjustments", || post(stock::adjustment_create)),
    ("/v1/stock/adjustments/{id}", || get(stock::adjustment_get)),
    ("/v1/stock/{sku}/{location}", || put(stock::stock_set)),
    ("/v1/sales", || get(stock::sales_list)),
    ("/v1/reconcile", || post(stock::reconcile_run)),
];

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(title = "stockplane control plane", description = "The back-office API: catalog, stock, books, sales."),
    paths(
        catalog::location_create,
        catalog::locations_list,
        catalog::location_get,
        catalog::location_patch,
        catalog::sku_create,
        catalog::skus_list,
        catalog::sku_get,
        catalog::sku_patch,
        stock::adjustment_create,
        stock::stock_set,
        stock::adjustment_get,
        stock::sku_adjustments,
        stock::sku_books,
        stock::sku_availability,
        stock::sales_list,
        stock::reconcile_run,
    ),
    components(schemas(
        ErrorBody,
        crate::db::Location,
        crate::db::Sku,
        crate::db::Books,
        crate::db::Adjustment,
        crate::db::Sale,
        crate::reconcile::Report,
        crate::reconcile::Difference,
        crate::reconcile::ShardTail,
        catalog::LocationCreate,
        catalog::LocationPatch,
        catalog::LocationPage,
        catalog::SkuCreate,
        catalog::SkuPatch,
        catalog::SkuPage,
        stock::AdjustmentCreate,
        stock::StockSet,
        stock::NoChange,
        stock::SetAnswer,
        stock::StockLevel,
        stock::SaleCursor,
        stock::SalePage,
    )),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
    tags(
        (name = "catalog", description = "Locations and SKUs"),
        (name = "stock", description = "Adjustments, books, live availability, sales and reconcile"),
    )
)]
pub struct ApiDoc;

/// Adds the bearer-token security scheme that every path names.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The API's routes: every `/v1` route behind the bearer-token check, the OpenAPI
/// document, JSON answers for unknown routes and methods, the body limit and the
/// request counter.
pub fn router(app: App) -> Router {
    let mut v1 = Router::new();
    for (path, handlers) in ROUTES {
        v1 = v1.route(path, handlers());
    }
    let v1 = v1
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), router_auth));
    Router::new()
        .route(OPENAPI_PATH, get(openapi_json))
        .merge(v1)
        .fallback(route_not_found)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn(router_count))
        .with_state(app)
}

/// The OpenAPI document.
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn route_not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", format!("there is no route {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

/// What a bearer token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Read,
}

/// Checks the bearer token: reads need any known token, everything else an admin one.
async fn router_auth(State(app): State<App>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        // The scheme's name is case-insensitive (RFC 9110, section 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(token) = token else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <token>")
            .into_response();
    };
    let auth = &app.config.auth;
    let role = if auth_known(&auth.admin_tokens, token) {
        Role::Admin
    } else if auth_known(&auth.read_tokens, token) {
        Role::Read
    } else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the bearer token is not known")
            .into_response();
    };
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    if role == Role::Read && !read {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read; changes need an admin token",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether `token` is one of `known`, looking at every known token and every byte of
/// each that has the same length, so the time taken does not tell how much matched.
fn auth_known(known: &[String], token: &str) -> bool {
    let mut found = false;
    for candidate in known {
        found |= auth_equal(candidate.as_bytes(), token.as_bytes());
    }
    found
}

/// Compares two byte strings in time that depends only on their lengths.
fn auth_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Counts every answer by route (the matched pattern, not the raw path) and status.
async fn router_count(request: Request, next: Next) -> Response {
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => path.as_str().to_owned(),
        None => "unmatched".to_owned(),
    };
    let response = next.run(request).await;
    metrics::counter!(
        "stockplane_cp_http_requests_total",
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_document_lists_every_route_and_only_those() {
        let document = ApiDoc::openapi();
        let documented: BTreeSet<&str> = document.paths.paths.keys().map(String::as_str).collect();
        let served: BTreeSet<&str> = ROUTES.iter().map(|(path, _)| *path).collect();
        assert_eq!(documented, served);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(auth_equal(b"abcdef", b"abcdef"));
        assert!(!auth_equal(b"abcdef", b"abcdeg"));
        assert!(!auth_equal(b"abcdef", b"abcde"));
        assert!(!auth_equal(b"", b"a"));
        let known = vec!["one-token".to_string(), "two-token".to_string()];
        assert!(auth_known(&known, "two-token"));
        assert!(!auth_known(&known, "three-token"));
        assert!(!auth_known(&[], "one-token"));
    }
}
