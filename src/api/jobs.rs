//! `/v1/jobs`: submitting compression jobs, following them, and fetching
//! what they produced.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::error::{ApiError, ErrorBody, ErrorDetail, Json, Path, Query};
use super::models::{page_cursor, page_limit, split_page};
use super::time::rfc3339;
use super::AppState;
use crate::service::{self, jobs::Created};
use crate::store::{
    CancelOutcome, DeleteOutcome, JobFilter, JobRecord, JobStatus, NewArtifact, Store, StoreError,
};

impl PartialSchema for JobStatus {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(JobStatus::ALL.iter().map(|s| s.as_str())))
            .description(Some(
                "`queued` → `running` → `succeeded` | `failed` | `canceled` (the last three are final)",
            ))
            .into()
    }
}
impl ToSchema for JobStatus {}

/// A compression job to run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub model_id: String,
    /// A named pipeline (`GET /v1/presets`); give this or `pipeline`.
    #[schema(example = "int8")]
    pub preset: Option<String>,
    /// A pipeline: `{"stages": [{"stage": "prune", ...}, ...]}`; give this
    /// or `preset`.
    #[schema(value_type = Option<Object>)]
    pub pipeline: Option<serde_json::Value>,
    #[serde(default)]
    pub output: Option<OutputRequest>,
    /// Higher runs first (-1000..=1000, default 0).
    pub priority: Option<i64>,
    /// Receives the job as JSON when it reaches a final status.
    pub webhook_url: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub labels: Option<serde_json::Map<String, serde_json::Value>>,
    /// Calibration statistics of the same model to run with (the `id` of
    /// `POST /v1/models/{id}/statistics`): needed by `gptq`, `sparsegpt`,
    /// `wanda` and `compensate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputRequest {
    /// `dense`, `packed` (default) or `compressed-tensors`.
    #[schema(example = "packed")]
    pub format: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutputView {
    #[schema(example = "packed")]
    pub format: String,
}

/// How far a job got. `fraction` is of the current stage.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressView {
    /// `plan`, `threshold` or `compress` while running.
    pub stage: Option<String>,
    pub tensors_done: i64,
    pub tensors_total: i64,
    pub fraction: f64,
}

/// The totals of a finished job.
#[derive(Debug, Serialize, ToSchema)]
pub struct SummaryView {
    pub bytes_before: i64,
    pub bytes_after: i64,
    /// `bytes_before / bytes_after`.
    pub ratio: f64,
    /// Non-zero parameters after, over parameters before.
    pub parameters_kept: f64,
    pub duration_seconds: f64,
}

/// A file a job produced.
#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactView {
    #[schema(example = "model.safetensors")]
    pub name: String,
    pub bytes: i64,
    pub sha256: String,
    /// Where to download it.
    pub url: String,
}

/// A compression job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub model_id: String,
    pub status: JobStatus,
    pub priority: i64,
    /// The preset the pipeline came from, if any.
    pub preset: Option<String>,
    /// The calibration statistics it runs with, if any.
    pub statistics: Option<String>,
    #[schema(value_type = Object)]
    pub pipeline: serde_json::Value,
    pub output: OutputView,
    #[schema(value_type = Object)]
    pub labels: serde_json::Value,
    pub webhook_url: Option<String>,
    /// A cancel was asked for and the job has not stopped yet.
    pub cancel_requested: bool,
    pub progress: ProgressView,
    /// Present once the job succeeded.
    pub summary: Option<SummaryView>,
    /// Present once the job failed.
    pub error: Option<ErrorDetail>,
    /// How many times a worker started it.
    pub attempts: i64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
    /// The output files, once the job succeeded: weights, index, config,
    /// `report.json`.
    pub artifacts: Vec<ArtifactView>,
    /// The per-tensor report, once the job succeeded.
    pub report_url: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub items: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobListParams {
    /// Only jobs with this status: `queued`, `running`, `succeeded`,
    /// `failed` or `canceled` (empty: any).
    #[param(pattern = "^(queued|running|succeeded|failed|canceled)?$")]
    pub status: Option<String>,
    /// Only jobs of this model.
    pub model_id: Option<String>,
    /// At most this many items (1..=200, default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (empty: the first page).
    #[param(
        pattern = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"
    )]
    pub cursor: Option<String>,
}

/// The JSON of a job, as the API and webhooks show it.
pub fn render_job(j: JobRecord, artifacts: Vec<NewArtifact>) -> JobView {
    let succeeded = j.status == JobStatus::Succeeded;
    let fraction = if succeeded {
        1.0
    } else if j.tensors_total > 0 {
        (j.tensors_done as f64 / j.tensors_total as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let summary = match (j.bytes_before, j.bytes_after) {
        (Some(bytes_before), Some(bytes_after)) if succeeded => Some(SummaryView {
            bytes_before,
            bytes_after,
            ratio: j.ratio.unwrap_or(0.0),
            parameters_kept: j.parameters_kept.unwrap_or(0.0),
            duration_seconds: j.duration_seconds.unwrap_or(0.0),
        }),
        _ => None,
    };
    let error = match (j.error_code, j.error_message) {
        (Some(code), message) if j.status == JobStatus::Failed => Some(ErrorDetail {
            code,
            message: message.unwrap_or_default(),
        }),
        _ => None,
    };
    let artifacts = artifacts
        .into_iter()
        .map(|a| ArtifactView {
            url: format!("/v1/jobs/{}/artifacts/{}", j.id, path_segment(&a.name)),
            name: a.name,
            bytes: a.bytes,
            sha256: a.sha256,
        })
        .collect();
    JobView {
        report_url: succeeded.then(|| format!("/v1/jobs/{}/report", j.id)),
        model_id: j.model_id,
        status: j.status,
        priority: j.priority,
        preset: j.preset,
        statistics: j.statistics_id,
        pipeline: serde_json::to_value(j.pipeline.spec()).expect("a pipeline spec serializes"),
        output: OutputView {
            format: j.output_format.name().to_string(),
        },
        labels: serde_json::Value::Object(j.labels),
        webhook_url: j.webhook_url,
        cancel_requested: j.cancel_requested && !j.status.is_finished(),
        progress: ProgressView {
            stage: j.progress_stage,
            tensors_done: j.tensors_done,
            tensors_total: j.tensors_total,
            fraction,
        },
        summary,
        error,
        attempts: j.attempts,
        created_at: rfc3339(j.created_at),
        started_at: j.started_at.map(rfc3339),
        finished_at: j.finished_at.map(rfc3339),
        updated_at: rfc3339(j.updated_at),
        artifacts,
        id: j.id,
    }
}

impl JobView {
    /// Loads a job with its artifacts.
    pub async fn load(store: &Store, job: JobRecord) -> Result<JobView, StoreError> {
        let artifacts = if job.status == JobStatus::Succeeded {
            store.job_artifacts(&job.id).await?
        } else {
            Vec::new()
        };
        Ok(render_job(job, artifacts))
    }
}

fn created(view: JobView) -> Response {
    let location = format!("/v1/jobs/{}", view.id);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("ids are ASCII"),
    );
    (StatusCode::ACCEPTED, headers, axum::Json(view)).into_response()
}

/// Submit a job.
///
/// The pipeline is checked against the model's tensors before the job is
/// queued. With an `Idempotency-Key` header, sending the same request again
/// returns the job the first one made; the same key with another request is
/// refused.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = CreateJob,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries of this request safe")),
    responses(
        (status = 202, description = "Queued (or queued before, for a repeated idempotent request)", body = JobView,
            headers(("Location" = String, description = "The job's URL"))),
        (status = 400, description = "Malformed JSON or `Idempotency-Key`", body = ErrorBody),
        (status = 409, description = "The idempotency key was used with another request", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts for JSON", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "The pipeline does not fit the model (`invalid_pipeline`, e.g. a calibrated stage without the statistics it needs), the model or the statistics do not exist (`model_not_found`, `statistics_not_found`), a field is invalid, or the `webhook_url` is refused by the outbound policy (`outbound_refused`)", body = ErrorBody),
        (status = 507, description = "Not enough free space to run the job (`insufficient_storage`)", body = ErrorBody),
    )
)]
pub async fn create_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<CreateJob>,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_string()),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_idempotency_key",
                    "`Idempotency-Key` must be 1 to 255 visible ASCII characters.",
                ))
            }
        },
    };
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let job = match service::jobs::create(
        &state.store,
        &state.blobs,
        &state.outbound,
        &state.workers,
        &req,
        key,
        request_id,
    )
    .await?
    {
        Created::New(job) | Created::Repeated(job) => job,
    };
    Ok(created(JobView::load(&state.store, job).await?))
}

/// List jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(JobListParams),
    responses(
        (status = 200, description = "One page of jobs, newest first", body = JobList),
        (status = 400, description = "`status`, `limit` or `cursor` is not valid (`invalid_query`)", body = ErrorBody),
    )
)]
pub async fn list_jobs(
    State(state): State<AppState>,
    Query(params): Query<JobListParams>,
) -> Result<axum::Json<JobList>, ApiError> {
    let limit = page_limit(params.limit)?;
    let status = match params.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<JobStatus>().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("`status` must be one of queued, running, succeeded, failed, canceled, not `{s}`."),
            )
        })?),
    };
    let mut records = state
        .store
        .list_jobs(&JobFilter {
            status,
            model_id: params.model_id.filter(|m| !m.is_empty()),
            limit: limit + 1,
            cursor: page_cursor(params.cursor)?,
        })
        .await?;
    let next_cursor = split_page(&mut records, limit, |j| &j.id);
    let succeeded: Vec<&str> = records
        .iter()
        .filter(|j| j.status == JobStatus::Succeeded)
        .map(|j| j.id.as_str())
        .collect();
    let mut artifacts = state.store.artifacts_of_jobs(&succeeded).await?;
    let items = records
        .into_iter()
        .map(|j| {
            let a = artifacts.remove(&j.id).unwrap_or_default();
            render_job(j, a)
        })
        .collect();
    Ok(axum::Json(JobList { items, next_cursor }))
}

async fn find_job(state: &AppState, id: &str) -> Result<JobRecord, ApiError> {
    state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No job has the id `{id}`.")))
}

/// Get a job: its status, progress, summary and artifacts.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 404, description = "No job has this id", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let job = find_job(&state, &id).await?;
    Ok(axum::Json(JobView::load(&state.store, job).await?))
}

/// Cancel a job.
///
/// A queued job is canceled at once (200); a running one stops at its next
/// tensor (202, then `canceled`), and its partial output is removed.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Canceled", body = JobView),
        (status = 202, description = "Stopping at the next tensor", body = JobView),
        (status = 404, description = "No job has this id", body = ErrorBody),
        (status = 409, description = "Already finished", body = ErrorBody),
    )
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.store.request_cancel(&id).await? {
        CancelOutcome::Canceled(job) => {
            state.workers.finished(&job);
            let view = JobView::load(&state.store, job).await?;
            Ok((StatusCode::OK, axum::Json(view)).into_response())
        }
        CancelOutcome::Requested(job) => {
            state.workers.cancel_running(&id);
            let view = JobView::load(&state.store, job).await?;
            Ok((StatusCode::ACCEPTED, axum::Json(view)).into_response())
        }
        CancelOutcome::AlreadyFinished(job) => Err(ApiError::conflict(
            "job_finished",
            format!("The job already finished ({}).", job.status.as_str()),
        )),
        CancelOutcome::NotFound => Err(ApiError::not_found(format!("No job has the id `{id}`."))),
    }
}

/// Delete a finished job and its artifacts.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No job has this id", body = ErrorBody),
        (status = 409, description = "Not finished: cancel it first", body = ErrorBody),
    )
)]
pub async fn delete_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _guard = state.blobs.lock().await?;
    match state.store.delete_job(&id).await? {
        DeleteOutcome::Deleted { unreferenced_blobs } => {
            for sha in unreferenced_blobs {
                state.blobs.remove(&sha).await;
            }
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(ApiError::not_found(format!("No job has the id `{id}`."))),
        DeleteOutcome::InUse => Err(ApiError::conflict(
            "job_not_finished",
            "The job has not finished; cancel it first.",
        )),
    }
}

/// The artifact `name` of a succeeded job.
async fn find_artifact(state: &AppState, id: &str, name: &str) -> Result<NewArtifact, ApiError> {
    let job = find_job(state, id).await?;
    if job.status != JobStatus::Succeeded {
        return Err(ApiError::conflict(
            "job_not_succeeded",
            format!(
                "The job is {}; its artifacts exist once it has succeeded.",
                job.status.as_str()
            ),
        ));
    }
    state
        .store
        .job_artifacts(id)
        .await?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found(format!("The job has no artifact `{name}`.")))
}

/// The per-tensor report of a succeeded job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/report",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The report: per tensor shape, dtype, stages, bytes, fidelity; and totals", content_type = "application/json", body = Object),
        (status = 404, description = "No job has this id", body = ErrorBody),
        (status = 409, description = "The job has not succeeded", body = ErrorBody),
    )
)]
pub async fn job_report(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let artifact = find_artifact(&state, &id, "report.json").await?;
    let read = state
        .blobs
        .read(&artifact.sha256, None)
        .await
        .map_err(|e| ApiError::io("could not open a stored report", e))?;
    let body = Body::from_stream(read.stream);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A byte range asked for with `Range`.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    Whole,
    /// Inclusive bounds.
    Part(u64, u64),
    Unsatisfiable,
}

/// Reads a `Range` header for a file of `len` bytes. Only one range is
/// served; anything unreadable is ignored (the whole file is sent), as
/// RFC 9110 allows.
fn parse_range(value: Option<&str>, len: u64) -> RangeRequest {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        match end.parse::<u64>() {
            Ok(0) => return RangeRequest::Unsatisfiable,
            Ok(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            Err(_) => return RangeRequest::Whole,
        }
    } else {
        let Ok(s) = start.parse::<u64>() else {
            return RangeRequest::Whole;
        };
        let e = if end.is_empty() {
            len.saturating_sub(1)
        } else {
            match end.parse::<u64>() {
                Ok(e) if e >= s => e.min(len.saturating_sub(1)),
                _ => return RangeRequest::Whole,
            }
        };
        (s, e)
    };
    if len == 0 || range.0 >= len {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Part(range.0, range.1)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so
/// that a name is one path segment (or one RFC 5987 value) whatever it holds.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A name as one segment of a URL path.
pub fn path_segment(name: &str) -> String {
    percent_encode(name)
}

/// `Content-Disposition` for a download named `name` (RFC 6266): a plain
/// ASCII `filename` for old clients, and the exact name in `filename*`.
fn content_disposition(name: &str) -> String {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "attachment; filename=\"{fallback}\"; filename*=UTF-8''{}",
        percent_encode(name)
    )
}

fn content_type_of(name: &str) -> &'static str {
    if name.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

/// Download an artifact of a succeeded job.
///
/// Supports `Range` (one range), `If-None-Match` against the `ETag` (the
/// sha256), and `HEAD`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/artifacts/{name}",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("name" = String, Path, description = "Artifact name, e.g. `model.safetensors`"),
        ("Range" = Option<String>, Header, description = "`bytes=START-END`"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier download: 304 if unchanged"),
    ),
    responses(
        (status = 200, description = "The file: JSON artifacts (`config.json`, `report.json`) as `application/json`, the others as `application/octet-stream`",
            content((inline(super::BinaryFile) = "application/octet-stream"), (Object = "application/json")),
            headers(("ETag" = String, description = "The sha256, quoted"), ("Content-Disposition" = String, description = "`attachment` with the artifact's name"))),
        (status = 206, description = "The range asked for, with the artifact's content type",
            content((inline(super::BinaryFile) = "application/octet-stream"), (inline(super::BinaryFile) = "application/json")),
            headers(("Content-Range" = String, description = "`bytes START-END/LENGTH`"))),
        (status = 304, description = "Unchanged (If-None-Match)"),
        (status = 404, description = "No job has this id, or the job has no artifact of this name", body = ErrorBody),
        (status = 409, description = "The job has not succeeded", body = ErrorBody),
        (status = 416, description = "The range is outside the file", body = ErrorBody),
    )
)]
pub async fn download_artifact(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let artifact = find_artifact(&state, &id, &name).await?;
    let etag = format!("\"{}\"", artifact.sha256);
    let len = artifact.bytes as u64;
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if if_none_match.is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*")) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    // A range is honoured only if `If-Range` (when sent) names this content.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = if if_range_ok {
        parse_range(
            headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
            len,
        )
    } else {
        RangeRequest::Whole
    };
    let disposition = content_disposition(&name);
    let mut resp_headers = HeaderMap::new();
    let put = |h: &mut HeaderMap, k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put(&mut resp_headers, header::ETAG, etag);
    put(&mut resp_headers, header::ACCEPT_RANGES, "bytes".into());
    put(&mut resp_headers, header::CONTENT_DISPOSITION, disposition);
    put(
        &mut resp_headers,
        header::CONTENT_TYPE,
        content_type_of(&name).into(),
    );
    let (status, start, count) = match range {
        RangeRequest::Whole => (StatusCode::OK, 0, len),
        RangeRequest::Part(s, e) => {
            put(
                &mut resp_headers,
                header::CONTENT_RANGE,
                format!("bytes {s}-{e}/{len}"),
            );
            (StatusCode::PARTIAL_CONTENT, s, e - s + 1)
        }
        RangeRequest::Unsatisfiable => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("The range is outside the file of {len} bytes."),
            )
            .into_response();
            put(
                resp.headers_mut(),
                header::CONTENT_RANGE,
                format!("bytes */{len}"),
            );
            return Ok(resp);
        }
    };
    put(&mut resp_headers, header::CONTENT_LENGTH, count.to_string());
    let read = state
        .blobs
        .read(&artifact.sha256, Some(start..start + count))
        .await
        .map_err(|e| ApiError::io("could not open a stored artifact", e))?;
    Ok((status, resp_headers, Body::from_stream(read.stream)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Whole);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Part(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Part(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Part(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Part(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Part(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Whole);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Whole);
        assert_eq!(parse_range(Some("items=0-1"), 10), Whole);
    }

    #[test]
    fn names_are_percent_encoded_in_paths_and_dispositions() {
        assert_eq!(path_segment("model.safetensors"), "model.safetensors");
        assert_eq!(path_segment("a?x=1.safetensors"), "a%3Fx%3D1.safetensors");
        assert_eq!(path_segment("a b/c#é"), "a%20b%2Fc%23%C3%A9");
        assert_eq!(
            content_disposition("modèle\t\"x\".json"),
            "attachment; filename=\"mod_le__x_.json\"; filename*=UTF-8''mod%C3%A8le%09%22x%22.json"
        );
    }
}
