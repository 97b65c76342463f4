//! Calibration statistics of a model: ingest (streamed upload → the
//! engine's checks against the model → blob and record), listing and
//! deletion.
//!
//! An upload is written under `tmp/` while its sha256 is computed, opened
//! as a statistics file (every header distrusted) and held to the model's
//! tensors by [`StatsFile::check_against`]: every weight it names exists
//! and is a matrix with `d_in` input columns, counts are positive, values
//! finite, `xtx` symmetric, and no tensor is anything else. Only then is
//! the file moved into the blob store and recorded; on any refusal the
//! upload's directory is removed and nothing of it remains.

use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use futures_util::Stream;
use serde::Deserialize;

use super::upload::{receive, UploadError};
use super::{engine_error, forget};
use crate::api::error::ApiError;
use crate::blobs::Blobs;
use crate::format::stats::StatsFile;
use crate::run::RunError;
use crate::store::{DeleteOutcome, NewStatistics, StatisticsRecord, Store};

/// The name the uploaded file has under its directory in `tmp/`.
const FILE_NAME: &str = "statistics.safetensors";

/// A tensor of a model as its stored list has it (the fields needed here).
#[derive(Deserialize)]
struct ModelTensor {
    name: String,
    shape: Vec<usize>,
}

/// What an accepted statistics file holds.
struct Checked {
    tensors: Vec<String>,
    has_xtx: bool,
    tokens: f64,
}

fn model_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No model has the id `{id}`."))
}

/// Opens the file (hashed as it arrived) and holds it to the model's
/// tensors, values included: the one full read of the values in the
/// service (jobs trust them afterwards, see [`StatsFile::trust_values`]).
fn check(path: &Path, sha256: &str, tensors: &[ModelTensor]) -> Result<Checked, RunError> {
    let stats = StatsFile::open_hashed(path, sha256)?;
    stats.check_against(
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice())),
    )?;
    let mut names: Vec<String> = stats.weights().map(str::to_string).collect();
    names.sort();
    use crate::compress::spec::StatsCatalog;
    let has_xtx = names.iter().all(|w| stats.has_xtx(w));
    Ok(Checked {
        has_xtx,
        tokens: stats.tokens(),
        tensors: names,
    })
}

/// Receives statistics for the model `model_id` from `body`, checks them
/// against the model and stores them.
pub async fn ingest<S>(
    store: &Store,
    blobs: &Arc<Blobs>,
    model_id: &str,
    body: S,
    limit: u64,
) -> Result<StatisticsRecord, ApiError>
where
    S: Stream<Item = Result<Bytes, UploadError>>,
{
    let model = store
        .get_model(model_id)
        .await?
        .ok_or_else(|| model_not_found(model_id))?;
    let tensors: Vec<ModelTensor> = serde_json::from_str(&model.tensors)
        .map_err(|e| ApiError::internal("a stored tensor list is unreadable", e))?;
    let tmp = blobs
        .tmp_dir("statistics")
        .map_err(|e| ApiError::io("could not create an upload directory", e))?;
    let path = tmp.path().join(FILE_NAME);
    let (sha256, bytes) = match receive(body, &path, 0, limit).await {
        Ok(r) => r,
        Err(UploadError::TooLarge) => return Err(ApiError::too_large(limit)),
        Err(UploadError::Api(e)) => return Err(e),
    };
    metrics::counter!("modelpress_bytes_uploaded_total").increment(bytes);

    // Checked and stored on a task of its own: a client that goes away now
    // cannot leave a blob stored but unrecorded.
    let (store, blobs) = (store.clone(), blobs.clone());
    let model_id = model_id.to_string();
    tokio::spawn(async move {
        let dir = tmp.path().to_path_buf();
        let hash = sha256.clone();
        let checked =
            tokio::task::spawn_blocking(move || check(&dir.join(FILE_NAME), &hash, &tensors))
                .await
                .map_err(|e| ApiError::internal("checking statistics panicked", e))?;
        let dir = tmp.path().display().to_string();
        let scrub = |text: String| {
            text.replace(&format!("{dir}/{FILE_NAME}"), "the upload")
                .replace(&dir, "the upload")
        };
        let checked = match checked {
            Ok(c) => c,
            Err(e) => {
                return Err(engine_error(&e, scrub).unwrap_or_else(|| {
                    ApiError::internal("could not read uploaded statistics", e)
                }))
            }
        };
        let new = NewStatistics {
            model_id: model_id.clone(),
            sha256: sha256.clone(),
            bytes: bytes as i64,
            tensors: serde_json::to_string(&checked.tensors).expect("names serialize"),
            has_xtx: checked.has_xtx,
            tokens: checked.tokens,
        };
        blobs
            .stage(&tmp.path().join(FILE_NAME), &sha256)
            .await
            .map_err(|e| ApiError::io("could not store uploaded statistics", e))?;
        let _guard = blobs.lock().await?;
        let added = blobs
            .commit(&tmp.path().join(FILE_NAME), &sha256)
            .await
            .map_err(|e| ApiError::io("could not store uploaded statistics", e))?;
        let added: Vec<String> = if added { vec![sha256] } else { Vec::new() };
        match store.insert_statistics(new).await {
            Ok(Some(record)) => Ok(record),
            Ok(None) => {
                forget(&store, &blobs, &added).await;
                Err(model_not_found(&model_id))
            }
            Err(e) => {
                forget(&store, &blobs, &added).await;
                Err(e.into())
            }
        }
    })
    .await
    .map_err(|e| ApiError::internal("storing statistics panicked", e))?
}

fn statistics_not_found(model_id: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("The model `{model_id}` has no statistics `{id}`."))
}

/// The statistics `id` of a model; 404 when either does not exist.
pub async fn get(store: &Store, model_id: &str, id: &str) -> Result<StatisticsRecord, ApiError> {
    if let Some(s) = store.get_statistics(model_id, id).await? {
        return Ok(s);
    }
    if store.get_model(model_id).await?.is_none() {
        return Err(model_not_found(model_id));
    }
    Err(statistics_not_found(model_id, id))
}

/// A page of a model's statistics, newest first; 404 when the model does
/// not exist.
pub async fn list(
    store: &Store,
    model_id: &str,
    limit: u32,
    cursor: Option<&str>,
) -> Result<Vec<StatisticsRecord>, ApiError> {
    if store.get_model(model_id).await?.is_none() {
        return Err(model_not_found(model_id));
    }
    Ok(store.list_statistics(model_id, limit, cursor).await?)
}

/// Deletes statistics that no queued or running job uses.
pub async fn delete(
    store: &Store,
    blobs: &Blobs,
    model_id: &str,
    id: &str,
) -> Result<(), ApiError> {
    let _guard = blobs.lock().await?;
    match store.delete_statistics(model_id, id).await? {
        DeleteOutcome::Deleted { unreferenced_blobs } => {
            for sha in unreferenced_blobs {
                blobs.remove(&sha).await;
            }
            Ok(())
        }
        DeleteOutcome::NotFound => {
            if store.get_model(model_id).await?.is_none() {
                Err(model_not_found(model_id))
            } else {
                Err(statistics_not_found(model_id, id))
            }
        }
        DeleteOutcome::InUse => Err(ApiError::conflict(
            "statistics_in_use",
            "A queued or running job uses these statistics; cancel it or wait for it to finish.",
        )),
    }
}
