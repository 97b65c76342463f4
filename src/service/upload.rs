//! Receiving an upload: a body stream written to a file under `tmp/` while
//! its sha256 is computed, never held in memory, and refused as soon as it
//! passes the upload limit.

use std::path::Path as FsPath;

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};

use crate::api::error::ApiError;
use crate::blobs::SealingWriter;

/// Why an upload was refused.
pub enum UploadError {
    TooLarge,
    Api(ApiError),
}

impl From<ApiError> for UploadError {
    fn from(e: ApiError) -> Self {
        UploadError::Api(e)
    }
}

/// A file received into the upload directory.
pub struct Received {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Writes a body stream to `path`, hashing it, and refuses it as soon as it
/// would take the upload past `limit` (with `used` bytes already taken).
///
/// Hashing and writing happen on a blocking thread fed through a short
/// queue, so the next chunks arrive from the network while earlier ones are
/// hashed and written, and the final flush to disk never holds up the async
/// runtime.
pub async fn receive<S>(
    stream: S,
    path: &FsPath,
    used: u64,
    limit: u64,
) -> Result<(String, u64), UploadError>
where
    S: Stream<Item = Result<Bytes, UploadError>>,
{
    // `None` marks the end of a complete body; a queue closed without it
    // means the upload is refused, and the file is not worth flushing.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(16);
    let path = path.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || {
        let mut out = SealingWriter::create(&path)?;
        while let Some(message) = rx.blocking_recv() {
            match message {
                Some(chunk) => out.write(&chunk)?,
                None => return out.finish().map(Some),
            }
        }
        Ok(None)
    });
    let fed = async {
        let mut stream = std::pin::pin!(stream);
        let mut len = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            len += chunk.len() as u64;
            if used + len > limit {
                return Err(UploadError::TooLarge);
            }
            if tx.send(Some(chunk)).await.is_err() {
                // The writer stopped on an error, reported below.
                return Ok(());
            }
        }
        let _ = tx.send(None).await;
        Ok(())
    }
    .await;
    // The writer finishes (or stops) before the caller may remove the file.
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiError::internal("writing an upload file panicked", e))?
        .map_err(|e| ApiError::io("could not write an upload file", e));
    fed?;
    match written? {
        Some(sealed) => Ok(sealed),
        None => Err(ApiError::internal(
            "an upload file was not finished",
            "the writer saw the queue close early",
        )
        .into()),
    }
}
