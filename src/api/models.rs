//! `/v1/models`: uploads and the models they made.
//!
//! An upload is streamed to a directory under `tmp/` while its sha256 is
//! computed, never held in memory; it is checked as a checkpoint (every
//! header, and the index against the shards) and only then are its files
//! moved into the blob store and the model recorded. On any failure the
//! directory is removed, so nothing of a refused upload remains.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, Path, Query};
use super::time::rfc3339;
use super::AppState;
use crate::blobs::TmpDir;
use crate::format::checkpoint::CONFIG_FILE;
use crate::service::models::{self, check_text, parse_labels, UploadMeta, MAX_TEXT_BYTES};
use crate::service::upload::{receive, Received, UploadError};
use crate::store::{DeleteOutcome, ModelFile, ModelRecord};

/// Page size when none is asked for, and the largest allowed.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;

/// An uploaded checkpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    #[schema(example = "0193a6f0-7c1e-7b5a-9a35-1f2d3c4b5a69")]
    pub id: String,
    pub name: Option<String>,
    pub version: Option<String>,
    #[schema(value_type = Object)]
    pub labels: serde_json::Value,
    /// The files it is made of: one `.safetensors` file, or shards and
    /// their index, and maybe `config.json`.
    pub files: Vec<ModelFileView>,
    pub total_bytes: i64,
    pub tensor_count: i64,
    pub parameter_count: i64,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelFileView {
    pub name: String,
    pub bytes: i64,
    pub sha256: String,
}

/// One tensor of a model.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TensorView {
    pub name: String,
    #[schema(example = "F32")]
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
    /// The file holding it.
    pub file: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TensorList {
    pub model_id: String,
    pub tensors: Vec<TensorView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub items: Vec<ModelView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadParams {
    /// A name for the model (raw uploads; multipart uploads send a `name` part).
    pub name: Option<String>,
    pub version: Option<String>,
    /// A JSON object of labels, e.g. `{"team":"vision"}`.
    pub labels: Option<String>,
}

/// The parts of a multipart upload.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// One or more files: `.safetensors` shards, `model.safetensors.index.json`,
    /// `config.json`. Each part's filename is kept.
    #[schema(value_type = Vec<String>, format = Binary, content_media_type = "application/octet-stream")]
    file: Vec<Vec<u8>>,
    name: Option<String>,
    version: Option<String>,
    /// A JSON object.
    labels: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// At most this many items (1..=200, default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (empty: the first page).
    #[param(
        pattern = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"
    )]
    pub cursor: Option<String>,
}

/// A cursor is the id of the last item of the previous page; anything else
/// is refused rather than read as a position.
pub fn page_cursor(cursor: Option<String>) -> Result<Option<String>, ApiError> {
    match cursor.filter(|c| !c.is_empty()) {
        None => Ok(None),
        Some(c) if uuid::Uuid::try_parse(&c).is_ok() => Ok(Some(c)),
        Some(c) => Err(ApiError::bad_request(
            "invalid_query",
            format!("`cursor` must be the `next_cursor` of a previous page, not `{c}`."),
        )),
    }
}

pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be between 1 and {MAX_LIMIT}, not {n}."),
        )),
    }
}

/// Cuts a page fetched with `limit + 1` rows down to `limit`; the cursor of
/// the next page (the id of the last row kept) when there was one more.
pub fn split_page<T>(records: &mut Vec<T>, limit: u32, id: impl Fn(&T) -> &str) -> Option<String> {
    if records.len() > limit as usize {
        records.truncate(limit as usize);
        records.last().map(|r| id(r).to_string())
    } else {
        None
    }
}

/// The JSON of a model; a stored value that does not read back is an
/// error naming the model, never a default.
fn model_view(m: ModelRecord, files: Vec<ModelFile>) -> Result<ModelView, ApiError> {
    let labels = match serde_json::from_str(&m.labels) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            return Err(ApiError::internal(
                "a stored model cannot be read",
                format!("model {}: its labels are not a JSON object", m.id),
            ))
        }
    };
    Ok(ModelView {
        labels,
        files: files
            .into_iter()
            .map(|f| ModelFileView {
                name: f.name,
                bytes: f.bytes,
                sha256: f.sha256,
            })
            .collect(),
        id: m.id,
        name: m.name,
        version: m.version,
        total_bytes: m.total_bytes,
        tensor_count: m.tensor_count,
        parameter_count: m.parameter_count,
        created_at: rfc3339(m.created_at),
    })
}

/// Bytes the `labels` JSON may hold.
const MAX_LABELS_BYTES: usize = 64 * 1024;
/// Parts a multipart upload may have.
const MAX_PARTS: usize = 1024;
/// Bytes the multipart reader may take from the connection at a time
/// before it must hand part data on.
const READ_BUDGET: usize = 256 * 1024;
/// Bytes the multipart reader may hold without handing any part data on:
/// part headers, boundaries, text before the first part. Its buffer never
/// grows past this plus one frame of the connection.
const MAX_UNDELIVERED: u64 = 1 << 20;

/// Why the meter stopped a multipart body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MeterRefusal {
    /// The body is larger than the upload limit allows.
    TooLarge,
    /// Too much was read without any part data coming of it.
    Framing,
}

/// Counts what a multipart body feeds its reader and what the reader hands
/// on, so that neither the reader's buffer nor the whole body is unbounded.
struct Meter {
    /// The upload limit plus room for the framing of every part.
    body_limit: u64,
    fed: AtomicU64,
    /// `fed` when part data or a new part was last handed on.
    mark: AtomicU64,
    refusal: std::sync::Mutex<Option<MeterRefusal>>,
}

impl Meter {
    fn new(limit: u64) -> Self {
        Self {
            body_limit: limit.saturating_add(MAX_PARTS as u64 * 1024 + MAX_UNDELIVERED),
            fed: AtomicU64::new(0),
            mark: AtomicU64::new(0),
            refusal: std::sync::Mutex::new(None),
        }
    }

    /// The reader handed something on: its buffer holds at most what was
    /// fed since.
    fn delivered(&self) {
        self.mark
            .store(self.fed.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn refusal(&self) -> Option<MeterRefusal> {
        self.refusal.lock().ok().and_then(|r| *r)
    }

    /// Counts `n` more bytes fed; the refusal if they are too many.
    fn feed(&self, n: usize) -> Option<MeterRefusal> {
        let fed = self.fed.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        let refusal = if fed > self.body_limit {
            MeterRefusal::TooLarge
        } else if fed - self.mark.load(Ordering::SeqCst).min(fed) > MAX_UNDELIVERED {
            MeterRefusal::Framing
        } else {
            return None;
        };
        if let Ok(mut r) = self.refusal.lock() {
            r.get_or_insert(refusal);
        }
        Some(refusal)
    }
}

/// A request body fed through a [`Meter`]. It also pauses after every
/// [`READ_BUDGET`] bytes (waking itself at once), because the multipart
/// reader otherwise takes all the connection offers before it hands
/// anything on.
struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
    since_pause: usize,
}

impl<S> Stream for Metered<S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.since_pause >= READ_BUDGET {
            self.since_pause = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match std::pin::Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.since_pause += chunk.len();
                match self.meter.feed(chunk.len()) {
                    None => Poll::Ready(Some(Ok(chunk))),
                    Some(refusal) => Poll::Ready(Some(Err(std::io::Error::other(format!(
                        "multipart body refused: {refusal:?}"
                    ))))),
                }
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                self.since_pause = 0;
                Poll::Pending
            }
        }
    }
}

/// Whether `name` may be a file of a model: a bare file name of a
/// safetensors file, an index, or the config.
fn check_file_name(name: &str) -> Result<(), ApiError> {
    let bare = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 255;
    let known = name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name == CONFIG_FILE;
    if bare && known {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "unsupported_file",
            format!("The file `{name}` is not accepted: send `.safetensors` files, `model.safetensors.index.json` and `config.json`, each under its bare file name."),
        ))
    }
}

/// Upload a checkpoint.
///
/// Send either the raw bytes of one `.safetensors` file (any content type
/// but multipart; name it with `?name=&version=`), or `multipart/form-data`
/// with one or more `file` parts — shards, `model.safetensors.index.json`,
/// `config.json`, each part named by its filename — and optional `name`,
/// `version` and `labels` (a JSON object) parts. Identical files are stored
/// once.
#[utoipa::path(
    post,
    path = "/v1/models",
    tag = "models",
    params(UploadParams),
    request_body(content(
        (inline(super::BinaryFile) = "application/octet-stream"),
        (inline(UploadForm) = "multipart/form-data"),
    )),
    responses(
        (status = 201, description = "Stored", body = ModelView,
            headers(("Location" = String, description = "The model's URL"))),
        (status = 400, description = "Not a valid checkpoint (`invalid_safetensors`) or a malformed upload", body = ErrorBody),
        (status = 413, description = "Larger than the server's upload limit", body = ErrorBody),
        (status = 507, description = "The server's storage is full (`insufficient_storage`)", body = ErrorBody),
    )
)]
pub async fn upload_model(
    State(state): State<AppState>,
    Query(params): Query<UploadParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let limit = state.config.max_upload_bytes;
    // Multipart framing adds a little to the files themselves.
    refuse_declared_over(req.headers(), limit, limit.saturating_add(64 * 1024))?;
    // Refused before any byte is read, rather than after the whole upload.
    parse_labels(params.labels.as_deref())?;
    check_text("name", params.name.clone())?;
    check_text("version", params.version.clone())?;
    let tmp = state
        .blobs
        .tmp_dir("upload")
        .map_err(|e| ApiError::io("could not create an upload directory", e))?;
    let received = match receive_upload(&state, &tmp, params, req, limit).await {
        Ok(r) => r,
        Err(UploadError::TooLarge) => return Err(ApiError::too_large(limit)),
        Err(UploadError::Api(e)) => return Err(e),
    };
    let (files, meta) = received;
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    metrics::counter!("modelpress_bytes_uploaded_total").increment(total);

    let record = models::ingest(&state.store, &state.blobs, tmp, files, meta, total).await?;
    let files = state.store.model_files(&record.id).await?;
    let location = format!("/v1/models/{}", record.id);
    let view = model_view(record, files)?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("ids are ASCII"),
    );
    Ok((StatusCode::CREATED, headers, axum::Json(view)).into_response())
}

async fn receive_upload(
    state: &AppState,
    tmp: &TmpDir,
    params: UploadParams,
    req: Request,
    limit: u64,
) -> Result<(Vec<Received>, UploadMeta), UploadError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let mut meta = UploadMeta {
        name: params.name,
        version: params.version,
        labels: params.labels,
    };
    let mut files: Vec<Received> = Vec::new();
    if !is_multipart {
        let name = "model.safetensors".to_string();
        let stream = req.into_body().into_data_stream().map(|chunk| {
            chunk.map_err(|e| {
                UploadError::Api(ApiError::bad_request(
                    "upload_interrupted",
                    format!("The upload could not be read to its end: {e}"),
                ))
            })
        });
        let (sha256, bytes) = receive(stream, &tmp.path().join(&name), 0, limit).await?;
        files.push(Received {
            name,
            sha256,
            bytes,
        });
        return Ok((files, meta));
    }
    // The multipart reader buffers what it has not handed on yet (part
    // headers, the text before the first part): it is fed through a meter
    // that bounds that, and the whole body.
    let meter = Arc::new(Meter::new(limit));
    let (parts, body) = req.into_parts();
    let body = Body::from_stream(Metered {
        inner: body.into_data_stream(),
        meter: meter.clone(),
        since_pause: 0,
    });
    let req = Request::from_parts(parts, body);
    let mut form = Multipart::from_request(req, state).await.map_err(|e| {
        ApiError::bad_request(
            "invalid_multipart",
            format!("The multipart body cannot be read: {}", e.body_text()),
        )
    })?;
    let bad_multipart = |e: axum::extract::multipart::MultipartError| {
        match meter.refusal() {
        Some(MeterRefusal::TooLarge) => UploadError::TooLarge,
        Some(MeterRefusal::Framing) => UploadError::Api(ApiError::bad_request(
            "invalid_multipart",
            format!("The multipart body cannot be read: more than {MAX_UNDELIVERED} bytes of part headers or text between parts."),
        )),
        None => UploadError::Api(ApiError::bad_request(
            "invalid_multipart",
            format!("The multipart body cannot be read: {}", e.body_text()),
        )),
    }
    };
    let mut used = 0u64;
    let mut parts = 0usize;
    while let Some(mut field) = form.next_field().await.map_err(bad_multipart)? {
        meter.delivered();
        parts += 1;
        if parts > MAX_PARTS {
            return Err(ApiError::bad_request(
                "invalid_multipart",
                format!("The multipart body has more than {MAX_PARTS} parts."),
            )
            .into());
        }
        let field_name = field.name().unwrap_or_default().to_string();
        match field_name.as_str() {
            "file" => {
                let name = field.file_name().unwrap_or_default().to_string();
                check_file_name(&name)?;
                if files.iter().any(|f| f.name == name) {
                    return Err(ApiError::bad_request(
                        "duplicate_file",
                        format!("The file `{name}` is sent twice."),
                    )
                    .into());
                }
                let path: PathBuf = tmp.path().join(&name);
                let stream = field.map(|chunk| {
                    meter.delivered();
                    chunk.map_err(bad_multipart)
                });
                let (sha256, bytes) = receive(stream, &path, used, limit).await?;
                used += bytes;
                files.push(Received {
                    name,
                    sha256,
                    bytes,
                });
            }
            "name" | "version" | "labels" => {
                let cap = if field_name == "labels" {
                    MAX_LABELS_BYTES
                } else {
                    MAX_TEXT_BYTES
                };
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
                    meter.delivered();
                    used += chunk.len() as u64;
                    if used > limit {
                        return Err(UploadError::TooLarge);
                    }
                    if bytes.len() + chunk.len() > cap {
                        return Err(ApiError::bad_request(
                            "invalid_field",
                            format!("`{field_name}` must be at most {cap} bytes long."),
                        )
                        .into());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(bytes).map_err(|_| {
                    ApiError::bad_request(
                        "invalid_field",
                        format!("`{field_name}` must be UTF-8 text."),
                    )
                })?;
                match field_name.as_str() {
                    "name" => meta.name = Some(text),
                    "version" => meta.version = Some(text),
                    _ => meta.labels = Some(text),
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    "unexpected_field",
                    format!("The multipart part `{other}` is not known: send `file`, `name`, `version` and `labels`."),
                )
                .into())
            }
        }
    }
    let indexes = files
        .iter()
        .filter(|f| f.name.ends_with(".safetensors.index.json"))
        .count();
    if indexes > 1 {
        return Err(ApiError::bad_request(
            "invalid_safetensors",
            "The upload holds several index files; send one `model.safetensors.index.json`.",
        )
        .into());
    }
    if !files.iter().any(|f| f.name.ends_with(".safetensors")) {
        return Err(ApiError::bad_request(
            "invalid_safetensors",
            "The upload holds no `.safetensors` file.",
        )
        .into());
    }
    Ok((files, meta))
}

/// List models, newest first.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    params(PageParams),
    responses(
        (status = 200, description = "One page of models, newest first", body = ModelList),
        (status = 400, description = "`limit` or `cursor` is not valid (`invalid_query`)", body = ErrorBody),
    )
)]
pub async fn list_models(
    State(state): State<AppState>,
    Query(page): Query<PageParams>,
) -> Result<axum::Json<ModelList>, ApiError> {
    let limit = page_limit(page.limit)?;
    let cursor = page_cursor(page.cursor)?;
    let mut records = state
        .store
        .list_models(limit + 1, cursor.as_deref())
        .await?;
    let next_cursor = split_page(&mut records, limit, |m| &m.id);
    let ids: Vec<&str> = records.iter().map(|m| m.id.as_str()).collect();
    let mut files = state.store.files_of_models(&ids).await?;
    let items = records
        .into_iter()
        .map(|m| {
            let f = files.remove(&m.id).unwrap_or_default();
            model_view(m, f)
        })
        .collect::<Result<_, _>>()?;
    Ok(axum::Json(ModelList { items, next_cursor }))
}

async fn find_model(state: &AppState, id: &str) -> Result<ModelRecord, ApiError> {
    state
        .store
        .get_model(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No model has the id `{id}`.")))
}

/// Get a model.
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "models",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The model", body = ModelView),
        (status = 404, description = "No model has this id", body = ErrorBody),
    )
)]
pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<ModelView>, ApiError> {
    let m = find_model(&state, &id).await?;
    let files = state.store.model_files(&id).await?;
    Ok(axum::Json(model_view(m, files)?))
}

/// List a model's tensors.
#[utoipa::path(
    get,
    path = "/v1/models/{id}/tensors",
    tag = "models",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The model's tensors: name, dtype, shape", body = TensorList),
        (status = 404, description = "No model has this id", body = ErrorBody),
    )
)]
pub async fn model_tensors(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<TensorList>, ApiError> {
    let m = find_model(&state, &id).await?;
    let tensors = serde_json::from_str(&m.tensors)
        .map_err(|e| ApiError::internal("a stored tensor list is unreadable", e))?;
    Ok(axum::Json(TensorList {
        model_id: m.id,
        tensors,
    }))
}

/// Delete a model that no queued or running job uses.
///
/// Finished jobs keep their artifacts and still name the model.
#[utoipa::path(
    delete,
    path = "/v1/models/{id}",
    tag = "models",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No model has this id", body = ErrorBody),
        (status = 409, description = "A queued or running job uses it", body = ErrorBody),
    )
)]
pub async fn delete_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _guard = state.blobs.lock().await?;
    match state.store.delete_model(&id).await? {
        DeleteOutcome::Deleted { unreferenced_blobs } => {
            for sha in unreferenced_blobs {
                state.blobs.remove(&sha).await;
            }
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteOutcome::NotFound => Err(ApiError::not_found(format!("No model has the id `{id}`."))),
        DeleteOutcome::InUse => Err(ApiError::conflict(
            "model_in_use",
            "A queued or running job uses this model; cancel it or wait for it to finish.",
        )),
    }
}

/// Refuses a request whose declared `Content-Length` is over `allowed`
/// (413 naming the upload limit `limit`) before any byte is read; the
/// stream is still counted, as the length may be absent or false.
pub(super) fn refuse_declared_over(
    headers: &axum::http::HeaderMap,
    limit: u64,
    allowed: u64,
) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > allowed) {
        return Err(ApiError::too_large(limit));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_names_of_checkpoint_files_are_accepted() {
        for ok in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "config.json",
        ] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x.safetensors",
            "a/b.safetensors",
            ".hidden.safetensors",
            "notes.txt",
            "config.yaml",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_must_be_an_object() {
        assert_eq!(parse_labels(None).unwrap(), "{}");
        assert_eq!(parse_labels(Some(r#"{"a":"b"}"#)).unwrap(), r#"{"a":"b"}"#);
        assert!(parse_labels(Some("[1]")).is_err());
        assert!(parse_labels(Some("{")).is_err());
    }
}
