//! The API's one error type, and the extractors that turn every malformed request into it.
//!
//! Every 4xx and 5xx answer of the API is the same JSON object, [`ErrorBody`]: a machine
//! code (`not_found`, `invalid_request`, ...) and a message in words. The extractors
//! [`Body`], [`PathParams`] and [`QueryParams`] wrap axum's own and map their rejections
//! (malformed JSON, a wrong type, an unknown field, a path segment that is not a number)
//! into [`ApiError`], so that even a request no handler ever sees gets that body.
//! Input is refused with 400; axum's 422 for JSON that parses but does not fit the type
//! is folded into 400 too, so clients meet one status for "your request is wrong".
//!
//! PostgreSQL failures are logged here, where they are turned into a 500, and their text
//! never reaches the client.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;

use crate::db::DbError;

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A machine-readable code: `invalid_request`, `malformed_json`, `unauthorized`,
    /// `forbidden`, `not_found`, `route_not_found`, `method_not_allowed`,
    /// `already_exists`, `idempotency_key_reused`, `payload_too_large`,
    /// `unsupported_media_type`, `dataplane_unavailable` or `internal`.
    #[schema(example = "not_found")]
    pub error: String,
    /// What is wrong, in words, for a person.
    #[schema(example = "SKU not found")]
    pub message: String,
}

/// An error answer: a status, a machine code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine code (see [`ErrorBody::error`]).
    pub code: &'static str,
    /// The message in words.
    pub message: String,
}

impl ApiError {
    /// An error with any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    /// 400: the request is not one the API accepts (a value out of range, say).
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404: the thing asked for does not exist.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503: the data plane is not reachable, or has never been reached.
    pub fn dataplane_unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "dataplane_unavailable", message)
    }

    /// 500: something failed on our side; the details are in the log, not the answer.
    pub fn internal() -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "an internal error occurred; see the server's log")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.code.to_string(), message: self.message })).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> ApiError {
        match error {
            DbError::Exists(what) => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", format!("the {what} already exists"))
            }
            DbError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            DbError::KeyReused(key) => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                format!("the idempotency key {key:?} was used before for a different request"),
            ),
            DbError::ShardsUnknown => ApiError::dataplane_unavailable(
                "the data plane has not been reached yet, so its shard count is unknown",
            ),
            DbError::Sql(error) => {
                tracing::error!(error = %error, "a PostgreSQL statement of the API failed");
                ApiError::internal()
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let message = rejection.body_text();
        match rejection {
            JsonRejection::JsonSyntaxError(_) => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", message),
            JsonRejection::JsonDataError(_) => ApiError::invalid(message),
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            _ => ApiError::invalid(message),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        match rejection {
            PathRejection::FailedToDeserializePathParams(_) => ApiError::invalid(rejection.body_text()),
            // The route and the handler disagree: our bug, not the client's.
            other => {
                tracing::error!(rejection = %other.body_text(), "a route's path parameters do not fit its handler");
                ApiError::internal()
            }
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::invalid(rejection.body_text())
    }
}

/// A JSON request body, refused with an [`ApiError`] when it does not parse or fit `T`.
///
/// The body must be a JSON object: serde would also fill a struct from an array of its
/// fields in order, which no client means.
#[derive(Debug, Clone, Copy, Default)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Body<T>, ApiError> {
        let Json(value) = Json::<serde_json::Value>::from_request(request, state).await?;
        if !value.is_object() {
            return Err(ApiError::invalid("the request body must be a JSON object"));
        }
        match T::deserialize(value) {
            Ok(value) => Ok(Body(value)),
            Err(error) => Err(ApiError::invalid(format!("the request body does not fit: {error}"))),
        }
    }
}

/// Path parameters, refused with an [`ApiError`] when a segment does not parse.
#[derive(Debug, Clone, Copy, Default)]
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<PathParams<T>, ApiError> {
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(PathParams(value))
    }
}

/// Query parameters, refused with an [`ApiError`] when one does not parse.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<QueryParams<T>, ApiError> {
        let axum::extract::Query(value) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(QueryParams(value))
    }
}
