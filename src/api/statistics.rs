//! `/v1/models/{id}/statistics`: calibration statistics of a model, which
//! jobs name to run calibrated stages (`gptq`, `sparsegpt`, `wanda`,
//! `compensate`).

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, Path, Query};
use super::models::{page_cursor, page_limit, split_page, PageParams};
use super::time::rfc3339;
use super::AppState;
use crate::service::statistics;
use crate::service::upload::UploadError;
use crate::store::StatisticsRecord;

/// Calibration statistics of a model, checked against it when uploaded.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatisticsView {
    /// Name it in a job as `"statistics": "<id>"`.
    #[schema(example = "0193a6f0-7c1e-7b5a-9a35-1f2d3c4b5a69")]
    pub id: String,
    pub model_id: String,
    /// Of the uploaded file's bytes, lowercase hex.
    pub sha256: String,
    pub bytes: i64,
    /// The weights it has statistics for (aliases included), by name.
    pub tensors: Vec<String>,
    /// Whether every one of them has `xtx` (needed by `gptq`, `sparsegpt`
    /// and `compensate`); `in_sum2` is always there.
    pub has_xtx: bool,
    /// The number of calibration tokens (the largest `counts` of any
    /// weight).
    pub tokens: f64,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatisticsList {
    pub items: Vec<StatisticsView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn view(s: StatisticsRecord) -> Result<StatisticsView, ApiError> {
    let tensors = serde_json::from_str(&s.tensors).map_err(|e| {
        ApiError::internal(
            "a stored list of statistics tensors is unreadable",
            format!("statistics {}: {e}", s.id),
        )
    })?;
    Ok(StatisticsView {
        id: s.id,
        model_id: s.model_id,
        sha256: s.sha256,
        bytes: s.bytes,
        tensors,
        has_xtx: s.has_xtx,
        tokens: s.tokens,
        created_at: rfc3339(s.created_at),
    })
}

/// Upload calibration statistics for a model.
///
/// The body is the raw bytes of a statistics file: safetensors with, per
/// weight `W`, `W.in_sum2` F32 `[d_in]`, `W.counts` F32 `[1]` and
/// optionally `W.xtx` F32 `[d_in, d_in]`, and `__metadata__`
/// `modelpress.stats` = `"1"` (`scripts/collect_stats.py` writes it). It
/// is checked against the model before it is stored: every weight exists
/// and has `d_in` input columns, `counts` > 0, values finite, `xtx`
/// symmetric, no other tensor. Identical files are stored once.
#[utoipa::path(
    post,
    path = "/v1/models/{id}/statistics",
    tag = "statistics",
    params(("id" = String, Path, description = "Model id")),
    request_body(content((inline(super::BinaryFile) = "application/octet-stream"))),
    responses(
        (status = 201, description = "Checked against the model and stored", body = StatisticsView,
            headers(("Location" = String, description = "The statistics' URL"))),
        (status = 400, description = "Not a safetensors file (`invalid_safetensors`), or the upload could not be read (`upload_interrupted`)", body = ErrorBody),
        (status = 404, description = "No model has this id", body = ErrorBody),
        (status = 413, description = "Larger than the server's upload limit", body = ErrorBody),
        (status = 422, description = "Not statistics of this model (`invalid_statistics`): the message names the tensor (unknown, of the wrong shape or dtype, counts not positive, a value not finite, `xtx` not symmetric) or the weight that is not in the model", body = ErrorBody),
        (status = 507, description = "The server's storage is full (`insufficient_storage`)", body = ErrorBody),
    )
)]
pub async fn upload_statistics(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let limit = state.config.max_upload_bytes;
    super::models::refuse_declared_over(req.headers(), limit, limit)?;
    let body = req.into_body().into_data_stream().map(|chunk| {
        chunk.map_err(|e| {
            UploadError::Api(ApiError::bad_request(
                "upload_interrupted",
                format!("The upload could not be read to its end: {e}"),
            ))
        })
    });
    let record = statistics::ingest(&state.store, &state.blobs, &id, body, limit).await?;
    let location = format!("/v1/models/{}/statistics/{}", record.model_id, record.id);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(|e| ApiError::internal("a location", e))?,
    );
    Ok((StatusCode::CREATED, headers, axum::Json(view(record)?)).into_response())
}

/// List a model's statistics, newest first.
#[utoipa::path(
    get,
    path = "/v1/models/{id}/statistics",
    tag = "statistics",
    params(("id" = String, Path, description = "Model id"), PageParams),
    responses(
        (status = 200, description = "One page of the model's statistics, newest first", body = StatisticsList),
        (status = 400, description = "`limit` or `cursor` is not valid (`invalid_query`)", body = ErrorBody),
        (status = 404, description = "No model has this id", body = ErrorBody),
    )
)]
pub async fn list_statistics(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(page): Query<PageParams>,
) -> Result<axum::Json<StatisticsList>, ApiError> {
    let limit = page_limit(page.limit)?;
    let cursor = page_cursor(page.cursor)?;
    let mut records = statistics::list(&state.store, &id, limit + 1, cursor.as_deref()).await?;
    let next_cursor = split_page(&mut records, limit, |s| &s.id);
    let items = records.into_iter().map(view).collect::<Result<_, _>>()?;
    Ok(axum::Json(StatisticsList { items, next_cursor }))
}

/// Get statistics of a model.
#[utoipa::path(
    get,
    path = "/v1/models/{id}/statistics/{sid}",
    tag = "statistics",
    params(
        ("id" = String, Path, description = "Model id"),
        ("sid" = String, Path, description = "Statistics id"),
    ),
    responses(
        (status = 200, description = "The statistics", body = StatisticsView),
        (status = 404, description = "No model has this id, or it has no statistics of this id", body = ErrorBody),
    )
)]
pub async fn get_statistics(
    State(state): State<AppState>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<axum::Json<StatisticsView>, ApiError> {
    let record = statistics::get(&state.store, &id, &sid).await?;
    Ok(axum::Json(view(record)?))
}

/// Delete statistics that no queued or running job uses.
///
/// Finished jobs still name them; their reports keep the sha256.
#[utoipa::path(
    delete,
    path = "/v1/models/{id}/statistics/{sid}",
    tag = "statistics",
    params(
        ("id" = String, Path, description = "Model id"),
        ("sid" = String, Path, description = "Statistics id"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No model has this id, or it has no statistics of this id", body = ErrorBody),
        (status = 409, description = "A queued or running job uses them (`statistics_in_use`)", body = ErrorBody),
    )
)]
pub async fn delete_statistics(
    State(state): State<AppState>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    statistics::delete(&state.store, &state.blobs, &id, &sid).await?;
    Ok(StatusCode::NO_CONTENT)
}
