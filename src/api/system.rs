//! Presets, health, readiness and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{error_response, ErrorBody};
use super::AppState;
use crate::compress::spec::PRESETS;

/// A named pipeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct PresetView {
    #[schema(example = "int8")]
    pub name: String,
    pub description: String,
    /// The full pipeline, as `POST /v1/jobs` accepts it in `pipeline`.
    #[schema(value_type = Object)]
    pub pipeline: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PresetList {
    pub items: Vec<PresetView>,
}

/// The named pipelines with their stages.
#[utoipa::path(
    get,
    path = "/v1/presets",
    tag = "service",
    responses((status = 200, body = PresetList))
)]
pub async fn presets() -> axum::Json<PresetList> {
    let items = PRESETS
        .iter()
        .map(|p| PresetView {
            name: p.name.to_string(),
            description: p.description.to_string(),
            pipeline: serde_json::to_value(p.spec()).expect("a preset serializes"),
        })
        .collect();
    axum::Json(PresetList { items })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses((status = 200, body = Health))
)]
pub async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the database answers and the data directory is writable.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, body = Health),
        (status = 503, description = "Not ready; the message says which check failed", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut failed = Vec::new();
    if let Err(e) = state.store.ping().await {
        tracing::error!(error = %e, "readiness: the database does not answer");
        failed.push("the database does not answer");
    }
    let blobs = state.blobs.clone();
    let disk = tokio::task::spawn_blocking(move || blobs.check_writable()).await;
    if !matches!(disk, Ok(Ok(()))) {
        tracing::error!(outcome = ?disk, "readiness: the data directory is not writable");
        failed.push("the data directory is not writable");
    }
    if failed.is_empty() {
        axum::Json(Health {
            status: "ready".into(),
        })
        .into_response()
    } else {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("Not ready: {}.", failed.join("; ")),
        )
    }
}

/// Prometheus metrics: jobs by status, queue depth, job durations, bytes
/// uploaded and written.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.store.count_jobs_by_status().await {
        Ok(counts) => {
            for (status, n) in counts {
                metrics::gauge!("modelpress_jobs", "status" => status.as_str()).set(n as f64);
                if status == crate::store::JobStatus::Queued {
                    metrics::gauge!("modelpress_queue_depth").set(n as f64);
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "metrics: could not count jobs"),
    }
    metrics::gauge!("modelpress_jobs_running_here").set(state.workers.running_jobs() as f64);
    let text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
