//! Ingesting a model: the received files (streamed under `tmp/` by the
//! handler) are opened as a checkpoint — every header, the index against
//! the shards, config.json — and only then moved into the blob store and
//! recorded. On any failure the upload's directory is removed, so nothing
//! of a refused upload remains.

use std::path::Path as FsPath;
use std::sync::Arc;

use super::forget;
use super::upload::Received;
use crate::api::error::ApiError;
use crate::api::models::TensorView;
use crate::blobs::{Blobs, TmpDir};
use crate::format::checkpoint::{read_header, Checkpoint, FormatError, CONFIG_FILE};
use crate::store::{ModelFile, ModelRecord, NewModel, Store};

/// Bytes a `name` or `version` may hold.
pub const MAX_TEXT_BYTES: usize = 256;

/// The text parts of an upload, as sent.
pub struct UploadMeta {
    pub name: Option<String>,
    pub version: Option<String>,
    pub labels: Option<String>,
}

/// Checks the received files as a checkpoint and stores them as a model.
/// Runs on a task of its own: a client that goes away meanwhile cannot
/// leave blobs stored but unrecorded.
pub async fn ingest(
    store: &Store,
    blobs: &Arc<Blobs>,
    tmp: TmpDir,
    files: Vec<Received>,
    meta: UploadMeta,
    total: u64,
) -> Result<ModelRecord, ApiError> {
    let (store, blobs) = (store.clone(), blobs.clone());
    tokio::spawn(async move {
        let dir = tmp.path().to_path_buf();
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        let checked = tokio::task::spawn_blocking(move || check_checkpoint(&dir, &names))
            .await
            .map_err(|e| ApiError::internal("checking an upload panicked", e))??;
        commit_upload(&store, &blobs, &tmp, files, meta, checked, total).await
    })
    .await
    .map_err(|e| ApiError::internal("storing an upload panicked", e))?
}

/// The `labels` of an upload: a JSON object (none: `{}`).
pub fn parse_labels(text: Option<&str>) -> Result<String, ApiError> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Ok("{}".into());
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v.to_string()),
        _ => Err(ApiError::bad_request(
            "invalid_labels",
            "`labels` must be a JSON object, e.g. {\"team\": \"vision\"}.",
        )),
    }
}

/// A `name` or `version`: at most [`MAX_TEXT_BYTES`]; empty is none.
pub fn check_text(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.len() > MAX_TEXT_BYTES => Err(ApiError::bad_request(
            "invalid_field",
            format!("`{field}` must be at most {MAX_TEXT_BYTES} bytes long."),
        )),
        Some(v) if v.is_empty() => Ok(None),
        v => Ok(v),
    }
}

/// The facts of a checked upload.
pub struct Checked {
    tensors: Vec<TensorView>,
    parameter_count: i64,
}

/// Opens the uploaded files as a checkpoint: every header, the index
/// against the shards, and config.json are checked. The index and the
/// uploaded shards must agree exactly: a shard the index does not use
/// would be stored and silently left out of every output.
fn check_checkpoint(dir: &FsPath, files: &[String]) -> Result<Checked, ApiError> {
    let invalid = |e: FormatError| {
        let text = e.to_string().replace(&format!("{}/", dir.display()), "");
        let text = text.replace(&dir.display().to_string(), "the upload");
        ApiError::bad_request("invalid_safetensors", text)
    };
    let ckpt = Checkpoint::open(dir).map_err(invalid)?;
    let shard_names = ckpt.shard_names();
    for name in files.iter().filter(|f| f.ends_with(".safetensors")) {
        if shard_names.contains(name) {
            continue;
        }
        let header = read_header(&dir.join(name)).map_err(invalid)?;
        return Err(ApiError::bad_request(
            "invalid_safetensors",
            match header.tensors.first() {
                Some(t) => format!(
                    "shard `{name}` holds tensor `{}`, which the index does not list",
                    t.name
                ),
                None => format!("shard `{name}` is not named by the index"),
            },
        ));
    }
    if ckpt.config_json().is_some_and(|c| !c.is_object()) {
        return Err(ApiError::bad_request(
            "invalid_config",
            format!("`{CONFIG_FILE}` must be a JSON object."),
        ));
    }
    let mut parameters = 0i64;
    let tensors = ckpt
        .tensors()
        .iter()
        .map(|t| {
            parameters =
                parameters.saturating_add(t.shape.iter().map(|&d| d as i64).product::<i64>());
            TensorView {
                name: t.name.clone(),
                dtype: t.dtype.name().to_string(),
                shape: t.shape.clone(),
                bytes: (t.end - t.start) as u64,
                file: shard_names.get(t.shard).cloned().unwrap_or_default(),
            }
        })
        .collect();
    Ok(Checked {
        tensors,
        parameter_count: parameters,
    })
}

/// Moves the checked files into the blob store and records the model.
async fn commit_upload(
    store: &Store,
    blobs: &Blobs,
    tmp: &TmpDir,
    files: Vec<Received>,
    meta: UploadMeta,
    checked: Checked,
    total: u64,
) -> Result<ModelRecord, ApiError> {
    let labels = parse_labels(meta.labels.as_deref())?;
    let name = check_text("name", meta.name)?;
    let version = check_text("version", meta.version)?;
    let new = NewModel {
        name,
        version,
        labels,
        total_bytes: total as i64,
        tensor_count: checked.tensors.len() as i64,
        parameter_count: checked.parameter_count,
        tensors: serde_json::to_string(&checked.tensors).expect("tensor views serialize"),
        files: files
            .iter()
            .map(|f| ModelFile {
                name: f.name.clone(),
                sha256: f.sha256.clone(),
                bytes: f.bytes as i64,
            })
            .collect(),
    };
    for f in &files {
        blobs
            .stage(&tmp.path().join(&f.name), &f.sha256)
            .await
            .map_err(|e| ApiError::io("could not store an uploaded file", e))?;
    }
    let _guard = blobs.lock().await?;
    let mut added = Vec::new();
    for f in &files {
        match blobs.commit(&tmp.path().join(&f.name), &f.sha256).await {
            Ok(true) => added.push(f.sha256.clone()),
            Ok(false) => {}
            Err(e) => {
                forget(store, blobs, &added).await;
                return Err(ApiError::io("could not store an uploaded file", e));
            }
        }
    }
    match store.insert_model(new).await {
        Ok(record) => Ok(record),
        Err(e) => {
            forget(store, blobs, &added).await;
            Err(e.into())
        }
    }
}
