//! The one error shape of the API, `{"error": {"code", "message"}}`, and the
//! extractors that answer in it when a request cannot be read.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::blobs::StorageFault;
use crate::store::StoreError;

/// An error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable snake_case code for programs and a sentence
/// for people.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    #[schema(example = "not_found")]
    pub code: String,
    #[schema(example = "No job has the id 0193...")]
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("The upload exceeds the limit of {limit} bytes."),
        )
    }

    /// A failure of the server: logged in full (the log line carries the
    /// request id), answered with no detail.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "The server failed to handle the request; its log has the details under the request id in the x-request-id header.",
        )
    }

    /// The answer to a storage fault: 507 when the disk is full, 503 when
    /// it cannot be written at all or the bucket of blobs cannot be reached.
    pub fn storage(fault: StorageFault, context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        match fault {
            StorageFault::Full => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                "The server's storage is full; try again once the operator has freed space.",
            ),
            StorageFault::ReadOnly => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "The server's storage cannot be written at the moment; try again later.",
            ),
            StorageFault::Unavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "The server's blob storage cannot be reached at the moment; try again later.",
            ),
        }
    }

    /// A failed file operation: a storage fault as such, anything else as
    /// an internal error.
    pub fn io(context: &str, error: std::io::Error) -> Self {
        match StorageFault::of_io(&error) {
            Some(fault) => Self::storage(fault, context, error),
            None => Self::internal(context, error),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e.storage_fault() {
            Some(fault) => ApiError::storage(fault, "database request failed", e),
            // A database server that cannot be reached is storage that
            // cannot be used at the moment: the same 503 and code as a
            // read-only disk, which clients already retry.
            None if e.is_unavailable() => {
                tracing::error!(error = %e, "database request failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "The server's database cannot be reached at the moment; try again later.",
                )
            }
            None => ApiError::internal("database request failed", e),
        }
    }
}

pub fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_string(),
            message,
        },
    };
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status, self.code, self.message)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => ApiError::unprocessable(
                "invalid_body",
                format!(
                    "The JSON body does not have the expected fields: {}",
                    e.body_text()
                ),
            ),
            JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(
                "malformed_json",
                format!("The body is not valid JSON: {}", e.body_text()),
            ),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Send the body as JSON with `Content-Type: application/json`.",
            ),
            // A body over the limit is the same condition as an upload
            // over it.
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The request body is too large: {}", other.body_text()),
            ),
            other => ApiError::new(other.status(), "invalid_body", other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(
            "invalid_query",
            format!("The query string is not valid: {}", r.body_text()),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request(
            "invalid_path",
            format!("The path is not valid: {}", r.body_text()),
        )
    }
}

/// `axum::Json`, answering malformed bodies in the API's error shape.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

/// `axum::extract::Query`, answering in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path`, answering in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// Error answers that something other than a handler produced (an unknown
/// method, a limit layer) are rewritten into the error shape.
pub async fn uniform_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "There is nothing at this path.".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "This path does not accept this method.".to_string(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "The request body is too large.".to_string(),
        ),
        StatusCode::REQUEST_TIMEOUT => (
            "timeout",
            "The request took too long and was abandoned.".to_string(),
        ),
        s if s.is_server_error() => (
            "internal_error",
            "The server failed to handle the request; its log has the details under the request id in the x-request-id header.".to_string(),
        ),
        s => (
            "bad_request",
            format!(
                "The request was refused ({}).",
                s.canonical_reason().unwrap_or("client error")
            ),
        ),
    };
    let mut out = error_response(status, code, message);
    for (name, value) in resp.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("There is nothing at this path.")
}
