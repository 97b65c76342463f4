//! What the service does, below HTTP: ingesting models and statistics
//! (streamed upload → checks → blobs and records) and creating jobs (parse
//! → check against the model → insert). The handlers in [`crate::api`]
//! read requests and write responses; everything they decide is here.
//!
//! Failures are [`ApiError`]s: a status, a stable code and a sentence, the
//! vocabulary the API answers in. Engine errors are classified by
//! [`crate::run::RunError::code`] only; [`engine_error`] turns that into
//! an answer.

pub mod jobs;
pub mod models;
pub mod statistics;
pub mod upload;

use crate::api::error::ApiError;
use crate::blobs::Blobs;
use crate::run::RunError;
use crate::store::Store;

/// Removes blobs an operation added before it failed, unless something
/// refers to them. Call under the blob lock.
pub async fn forget(store: &Store, blobs: &Blobs, added: &[String]) {
    for sha in added {
        if let Ok(false) = store.blob_is_referenced(sha).await {
            blobs.remove(sha).await;
        }
    }
}

/// The answer to an engine error about something the client sent: 400 when
/// a file is not safetensors at all, 422 when it does not fit; `None` for a
/// failure of this machine, which the caller reports as such. `scrub`
/// removes server paths from the message.
pub fn engine_error(e: &RunError, scrub: impl Fn(String) -> String) -> Option<ApiError> {
    let code = e.code()?;
    let message = scrub(e.to_string());
    Some(if code == "invalid_safetensors" {
        ApiError::bad_request(code, message)
    } else {
        ApiError::unprocessable(code, message)
    })
}
