//! The HTTP API: routes, request and response types (each with its OpenAPI
//! schema), errors, authentication and the documentation page.

pub mod error;
pub mod jobs;
pub mod models;
mod statistics;
mod system;
pub mod telemetry;
mod time;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::SecurityRequirement;
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::blobs::Blobs;
use crate::outbound::OutboundPolicy;
use crate::store::Store;
use crate::worker::WorkerHandle;
use error::{error_response, ApiError};

pub use jobs::JobView;

/// Settings the routes need.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub max_upload_bytes: u64,
    /// When not empty, every `/v1` route needs `Authorization: Bearer <key>`
    /// with one of these keys.
    pub api_keys: Vec<String>,
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub blobs: Arc<Blobs>,
    pub workers: WorkerHandle,
    pub config: Arc<ApiConfig>,
    pub metrics: Option<PrometheusHandle>,
    /// What outgoing requests (webhooks) may reach.
    pub outbound: Arc<OutboundPolicy>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "modelpress"),
    tags(
        (name = "models", description = "Uploaded checkpoints"),
        (name = "statistics", description = "Calibration statistics of a model, for the calibrated stages"),
        (name = "jobs", description = "Compression jobs, their progress and artifacts"),
        (name = "service", description = "Presets, health and metrics"),
    ),
)]
struct ApiDoc;

/// Declares the optional bearer authentication on every `/v1` operation.
struct BearerOnV1;

impl Modify for BearerOnV1 {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Needed only when the server is started with API keys.",
                    ))
                    .build(),
            ),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.security = Some(vec![
                    SecurityRequirement::new("api_key", Vec::<String>::new()),
                    SecurityRequirement::default(),
                ]);
            }
        }
    }
}

/// Statuses every operation can answer whatever its handler does: 401 on
/// `/v1` when the server has API keys, 503 on `/v1` when the database or
/// the blob store does not answer, 500 anywhere. Also gives any
/// response documented without a description its status' reason phrase, so
/// the document stays valid OpenAPI.
struct StandardResponses;

impl Modify for StandardResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut op.responses.responses;
                if path.starts_with("/v1/") {
                    responses.entry("401".into()).or_insert_with(|| {
                        error("No or an unknown API key (`missing_api_key`, `invalid_api_key`); only when the server has API keys")
                    });
                    responses.entry("503".into()).or_insert_with(|| {
                        error("The database or the blob store cannot be reached (`storage_unavailable`); try again later")
                    });
                }
                responses.entry("500".into()).or_insert_with(|| {
                    error("The server failed (`internal_error`); its log has the details under the `x-request-id` of the answer")
                });
                for (status, response) in responses.iter_mut() {
                    if let RefOr::T(r) = response {
                        if r.description.is_empty() {
                            r.description = status
                                .parse::<u16>()
                                .ok()
                                .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
                                .and_then(|s| s.canonical_reason())
                                .unwrap_or("Response")
                                .to_string();
                        }
                    }
                }
            }
        }
    }
}

fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let v1 = OpenApiRouter::new()
        // Uploads are streamed to disk and limited by the upload limit, not
        // by axum's default limit for buffered bodies.
        .routes(
            routes!(models::upload_model, models::list_models).layer(DefaultBodyLimit::disable()),
        )
        .routes(routes!(models::get_model, models::delete_model))
        .routes(routes!(models::model_tensors))
        .routes(
            routes!(statistics::upload_statistics, statistics::list_statistics)
                .layer(DefaultBodyLimit::disable()),
        )
        .routes(routes!(
            statistics::get_statistics,
            statistics::delete_statistics
        ))
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job, jobs::delete_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(jobs::job_report))
        .routes(routes!(jobs::download_artifact))
        .routes(routes!(system::presets));
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(v1)
        .routes(routes!(system::healthz))
        .routes(routes!(system::readyz))
        .routes(routes!(system::metrics))
        .split_for_parts();
    // After the routes are in: it marks their operations.
    BearerOnV1.modify(&mut doc);
    StandardResponses.modify(&mut doc);
    (router, doc)
}

/// Bytes of a file, as a schema.
pub struct BinaryFile;

impl utoipa::PartialSchema for BinaryFile {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}
impl ToSchema for BinaryFile {}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The application: every route with its middleware.
pub fn router(state: AppState) -> Router {
    let (api, doc) = routes();
    let docs = SwaggerUi::new("/docs")
        .url("/openapi.json", doc)
        .config(Config::new(["/openapi.json"]).validator_url("none"));
    let request_id = HeaderName::from_static("x-request-id");
    api.route_layer(middleware::from_fn_with_state(
        state.clone(),
        require_api_key,
    ))
    .merge(Router::<AppState>::from(docs))
    .route_layer(middleware::from_fn(telemetry::record_route))
    .fallback(error::not_found)
    .method_not_allowed_fallback(method_not_allowed)
    .with_state(state)
    .layer(middleware::map_response(error::uniform_errors))
    .layer(middleware::map_response(no_sniffing))
    .layer(middleware::from_fn(telemetry::observe))
    .layer(PropagateRequestIdLayer::new(request_id.clone()))
    .layer(
        TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
        }),
    )
    .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This path does not accept this method.",
    )
}

/// Tells browsers to take every response for the type it declares (an
/// artifact is never run as a script or a page).
async fn no_sniffing(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Compares two secrets in time independent of their content and their
/// lengths: both are hashed first, and the digests compared in full.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The credentials of an `Authorization: Bearer <key>` header; the scheme
/// is case-insensitive (RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    if keys.is_empty() || !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match given {
        // Every key is compared, so the time taken does not tell which
        // matched.
        Some(key)
            if keys.iter().fold(false, |hit, k| {
                same_secret(k.as_bytes(), key.as_bytes()) | hit
            }) =>
        {
            next.run(req).await
        }
        Some(_) => error_response(
            axum::http::StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "The API key is not valid.".into(),
        ),
        None => error_response(
            axum::http::StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "This server needs an API key: send `Authorization: Bearer <key>`.".into(),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_without_regard_to_case() {
        assert_eq!(bearer_token("Bearer k1"), Some("k1"));
        assert_eq!(bearer_token("bearer k1"), Some("k1"));
        assert_eq!(bearer_token("BEARER   k1 "), Some("k1"));
        assert_eq!(bearer_token("Basic k1"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearerk1"), None);
    }

    #[test]
    fn secrets_of_any_length_compare_by_content() {
        assert!(same_secret(b"key", b"key"));
        assert!(!same_secret(b"key", b"kez"));
        assert!(!same_secret(b"key", b"key-longer"));
        assert!(!same_secret(b"", b"key"));
    }
}
