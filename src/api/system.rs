//! Presets, health, readiness and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{error_response, ErrorBody};
use super::AppState;
use crate::blobs::StorageFault;
use crate::compress::spec::PRESETS;
use crate::store::JobStatus;

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
    responses((status = 200, description = "The named pipelines with their stages", body = PresetList))
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
    responses((status = 200, description = "The process answers", body = Health))
)]
pub async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the database takes a write and the data directory has room
/// for one.
///
/// Checked afresh on every call, so it turns back to 200 by itself once
/// space is freed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready; the message says which check failed", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut failed = Vec::new();
    if let Err(e) = state.store.check_writable().await {
        tracing::error!(error = %e, "readiness: the database does not take a write");
        failed.push("the database does not take a write");
    }
    // With blobs in a bucket, the bucket must answer too.
    if let Err(e) = state.blobs.check_writable().await {
        if StorageFault::of_io(&e) == Some(StorageFault::Unavailable) {
            tracing::error!(error = %e, "readiness: the bucket of blobs does not answer");
            failed.push("the bucket of blobs does not answer");
        } else {
            tracing::error!(error = %e, "readiness: the data directory is not writable");
            failed.push("the data directory is not writable");
        }
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

/// Prometheus metrics: jobs stored by status, queue depth, jobs finished in
/// this process, job durations, bytes uploaded and written, HTTP requests
/// by route and their durations, and the process's CPU, memory and open
/// files.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    use std::fmt::Write;
    // Counts come from this service's database at each scrape; counters and
    // histograms from the process's recorder.
    let mut text = String::new();
    match state.store.count_jobs_by_status().await {
        Ok(counts) => {
            // Database-wide: every replica on one database reports the same
            // values, so they carry `scope="database"` to be told apart from
            // the per-process series (aggregate them with max, not sum).
            text.push_str("# HELP modelpress_jobs Jobs stored in the database now, by status, counted at each scrape; the same on every replica sharing the database; deleting a job lowers it (modelpress_jobs_finished_total counts finishes in this process).\n");
            text.push_str("# TYPE modelpress_jobs gauge\n");
            for (status, n) in &counts {
                let _ = writeln!(
                    text,
                    "modelpress_jobs{{scope=\"database\",status=\"{}\"}} {n}",
                    status.as_str()
                );
            }
            let queued = counts
                .iter()
                .find(|(s, _)| *s == JobStatus::Queued)
                .map_or(0, |c| c.1);
            text.push_str(
                "# HELP modelpress_queue_depth Jobs waiting for a worker, in the whole database.\n",
            );
            text.push_str("# TYPE modelpress_queue_depth gauge\n");
            let _ = writeln!(
                text,
                "modelpress_queue_depth{{scope=\"database\"}} {queued}"
            );
        }
        Err(e) => tracing::error!(error = %e, "metrics: could not count jobs"),
    }
    text.push_str("# HELP modelpress_jobs_running_here Jobs this process is running.\n");
    text.push_str("# TYPE modelpress_jobs_running_here gauge\n");
    let _ = writeln!(
        text,
        "modelpress_jobs_running_here {}",
        state.workers.running_jobs()
    );
    text.push_str(&super::telemetry::process_metrics());
    if let Some(handle) = &state.metrics {
        handle.run_upkeep();
        text.push_str(&handle.render());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
