//! Creating jobs: the request parsed and checked on its own, then against
//! the model and its statistics (the engine's own check, on the blocking
//! pool), then queued.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::engine_error;
use crate::api::error::ApiError;
use crate::api::jobs::CreateJob;
use crate::blobs::Blobs;
use crate::compress::spec::{preset, Pipeline, PipelineSpec, PRESETS};
use crate::format::stats::StatsFile;
use crate::outbound::{OutboundPolicy, Refusal};
use crate::run::{self, OutputFormat, RunError};
use crate::store::{InsertOutcome, JobRecord, NewJob, Store};
use crate::worker::WorkerHandle;

/// The name statistics are laid out under beside a job's input.
pub const STATISTICS_FILE: &str = "statistics.safetensors";

/// A JSON value with every object's keys sorted, so that two requests that
/// differ only in key order hash the same.
fn canonical(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(canonical).collect())
        }
        other => other,
    }
}

pub fn request_hash(req: &CreateJob) -> String {
    let value = canonical(serde_json::to_value(req).expect("a request serializes"));
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}

fn parse_format(name: &str) -> Result<OutputFormat, ApiError> {
    name.parse().map_err(|_| {
        ApiError::unprocessable(
            "invalid_output_format",
            format!(
                "Unknown output format `{name}`: use `dense`, `packed` or `compressed-tensors`."
            ),
        )
    })
}

/// The pipeline a request asks for, checked on its own.
fn requested_pipeline(req: &CreateJob) -> Result<(Option<String>, Pipeline), ApiError> {
    match (&req.preset, &req.pipeline) {
        (Some(name), None) => match preset(name) {
            Some(p) => Ok((Some(name.clone()), p.pipeline())),
            None => {
                let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
                Err(ApiError::unprocessable(
                    "unknown_preset",
                    format!(
                        "There is no preset `{name}`; the presets are {}.",
                        names.join(", ")
                    ),
                ))
            }
        },
        (None, Some(value)) => {
            let spec: PipelineSpec = serde_json::from_value(value.clone()).map_err(|e| {
                ApiError::unprocessable(
                    "invalid_pipeline",
                    format!("The pipeline is not of the expected form: {e}"),
                )
            })?;
            let pipeline = Pipeline::parse(spec)
                .map_err(|e| ApiError::unprocessable("invalid_pipeline", e.to_string()))?;
            Ok((None, pipeline))
        }
        (Some(_), Some(_)) => Err(ApiError::unprocessable(
            "invalid_pipeline",
            "Give either `preset` or `pipeline`, not both.",
        )),
        (None, None) => Err(ApiError::unprocessable(
            "invalid_pipeline",
            "Give a `preset` name or a `pipeline`.",
        )),
    }
}

/// Checks a webhook URL against the outbound policy as far as it can be
/// decided now: the scheme, an address given as the host, and the
/// addresses a name resolves to. A name that does not resolve now is
/// accepted; every delivery checks again.
async fn check_webhook_url(policy: &OutboundPolicy, url: &str) -> Result<(), ApiError> {
    match policy.resolve(url, Duration::from_secs(2)).await {
        Ok(_) => Ok(()),
        Err(Refusal::NotHttp(_)) => Err(ApiError::unprocessable(
            "invalid_webhook_url",
            format!("`webhook_url` must be an absolute http or https URL, not `{url}`."),
        )),
        Err(e) if e.is_transient() => Ok(()),
        Err(e) => Err(ApiError::unprocessable(
            "outbound_refused",
            format!("`webhook_url` is refused by the outbound policy: {e}."),
        )),
    }
}

/// Checks the pipeline, with the statistics if any, against the model's
/// tensors, as the worker would.
async fn check_against_model(
    store: &Store,
    blobs: &Arc<Blobs>,
    model_id: &str,
    statistics: Option<&str>,
    pipeline: Pipeline,
    format: OutputFormat,
) -> Result<(), ApiError> {
    let model_not_found = || {
        ApiError::unprocessable(
            "model_not_found",
            format!("No model has the id `{model_id}`."),
        )
    };
    let statistics_not_found = |id: &str| {
        ApiError::unprocessable(
            "statistics_not_found",
            format!("The model `{model_id}` has no statistics `{id}`."),
        )
    };
    let files = store.model_files(model_id).await?;
    if files.is_empty() {
        return Err(model_not_found());
    }
    let stats_blob = match statistics {
        None => None,
        Some(id) => Some(
            store
                .get_statistics(model_id, id)
                .await?
                .ok_or_else(|| statistics_not_found(id))?
                .sha256,
        ),
    };
    // A job needs room for its output: refused now rather than failing
    // once it runs.
    let laid_out = async {
        let space = blobs.clone();
        tokio::task::spawn_blocking(move || space.check_space())
            .await
            .map_err(std::io::Error::other)??;
        let dir = blobs.tmp_dir("check")?;
        let input = dir.path().join("in");
        std::fs::create_dir(&input)?;
        let names: Vec<(&str, &str)> = files
            .iter()
            .map(|f| (f.name.as_str(), f.sha256.as_str()))
            .collect();
        blobs.checkout(&names, &input).await?;
        if let Some(sha) = &stats_blob {
            blobs
                .checkout(&[(STATISTICS_FILE, sha.as_str())], dir.path())
                .await?;
        }
        Ok::<_, std::io::Error>((dir, input))
    }
    .await;
    let checked = match laid_out {
        Err(e) => Err(e),
        Ok((dir, input)) => tokio::task::spawn_blocking(move || -> Result<(), RunError> {
            let stats = match &stats_blob {
                None => None,
                Some(sha) => {
                    // Stored under its hash, its values checked at upload:
                    // names and shapes are what this job can change.
                    let mut s = StatsFile::open_hashed(&dir.path().join(STATISTICS_FILE), sha)?;
                    s.trust_values();
                    Some(s)
                }
            };
            run::check_with_stats(&input, &pipeline, format, stats.as_ref())
        })
        .await
        .map_err(|e| ApiError::internal("checking a job panicked", e))
        .map(Ok)?,
    };
    // A model (or statistics) deleted while it was being checked loses its
    // files under the check: that is the input missing, not a failure of
    // the server.
    let missing = || async {
        if matches!(store.get_model(model_id).await, Ok(None)) {
            return Some(model_not_found());
        }
        match statistics {
            Some(id) if matches!(store.get_statistics(model_id, id).await, Ok(None)) => {
                Some(statistics_not_found(id))
            }
            _ => None,
        }
    };
    match checked {
        Ok(Ok(())) => Ok(()),
        // The stored model and statistics were checked when they were
        // uploaded: an error reading them here is not the client's.
        Ok(Err(e)) => match engine_error(&e, |m| m) {
            Some(answer) if !matches!(e, RunError::Input(_)) => Err(answer),
            _ => match missing().await {
                Some(answer) => Err(answer),
                None => Err(ApiError::internal("a stored model could not be checked", e)),
            },
        },
        Err(e) => match missing().await {
            Some(answer) => Err(answer),
            None => Err(ApiError::io("could not lay out a model", e)),
        },
    }
}

/// What [`create`] did.
pub enum Created {
    /// A new job, queued.
    New(JobRecord),
    /// The job an earlier request with the same idempotency key made.
    Repeated(JobRecord),
}

/// Creates a job: the request is parsed and checked on its own, then
/// against the model (and its statistics), then queued. `key` is the
/// request's idempotency key, `request_id` the id of the HTTP request.
pub async fn create(
    store: &Store,
    blobs: &Arc<Blobs>,
    outbound: &OutboundPolicy,
    workers: &WorkerHandle,
    req: &CreateJob,
    key: Option<String>,
    request_id: Option<String>,
) -> Result<Created, ApiError> {
    let format_name = req
        .output
        .as_ref()
        .and_then(|o| o.format.clone())
        .unwrap_or_else(|| OutputFormat::default().name().to_string());
    let format = parse_format(&format_name)?;
    let priority = req.priority.unwrap_or(0);
    if !(-1000..=1000).contains(&priority) {
        return Err(ApiError::unprocessable(
            "invalid_priority",
            "`priority` must be between -1000 and 1000.",
        ));
    }
    if let Some(url) = &req.webhook_url {
        check_webhook_url(outbound, url).await?;
    }
    let (preset_name, pipeline) = requested_pipeline(req)?;
    let hash = request_hash(req);
    if let Some(key) = &key {
        // A repeated request is answered without checking the model again.
        if let Some(job) = probe_key(store, key, &hash).await? {
            return Ok(Created::Repeated(job));
        }
    }
    let statistics = req.statistics.as_deref();
    check_against_model(
        store,
        blobs,
        &req.model_id,
        statistics,
        pipeline.clone(),
        format,
    )
    .await?;
    let outcome = store
        .insert_job(NewJob {
            model_id: req.model_id.clone(),
            priority,
            preset: preset_name,
            pipeline,
            output_format: format,
            webhook_url: req.webhook_url.clone(),
            labels: req.labels.clone().unwrap_or_default(),
            idempotency: key.map(|k| (k, hash)),
            request_id,
            statistics_id: req.statistics.clone(),
        })
        .await?;
    match outcome {
        InsertOutcome::Created(job) => {
            workers.wake();
            tracing::info!(job = %job.id, model = %job.model_id, "job queued");
            Ok(Created::New(job))
        }
        InsertOutcome::Existing(job) => Ok(Created::Repeated(job)),
        InsertOutcome::KeyConflict => Err(key_conflict()),
        InsertOutcome::ModelNotFound => Err(ApiError::unprocessable(
            "model_not_found",
            format!("No model has the id `{}`.", req.model_id),
        )),
        InsertOutcome::StatisticsNotFound => Err(ApiError::unprocessable(
            "statistics_not_found",
            format!(
                "The model `{}` has no statistics `{}`.",
                req.model_id,
                statistics.unwrap_or_default()
            ),
        )),
    }
}

fn key_conflict() -> ApiError {
    ApiError::conflict(
        "idempotency_key_reused",
        "This Idempotency-Key was already used with a different request; use a new key for a new job.",
    )
}

/// The job an idempotency key made, when it was used with the same request;
/// a conflict when it was used with another.
async fn probe_key(store: &Store, key: &str, hash: &str) -> Result<Option<JobRecord>, ApiError> {
    match store.job_by_idempotency_key(key).await? {
        Some(job) if job.request_hash.as_deref() == Some(hash) => Ok(Some(job)),
        Some(_) => Err(key_conflict()),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_does_not_change_the_request_hash() {
        let a: CreateJob = serde_json::from_str(
            r#"{"model_id":"m","pipeline":{"stages":[{"stage":"quantize","bits":8}]}}"#,
        )
        .unwrap();
        let b: CreateJob = serde_json::from_str(
            r#"{"pipeline":{"stages":[{"bits":8,"stage":"quantize"}]},"model_id":"m"}"#,
        )
        .unwrap();
        assert_eq!(request_hash(&a), request_hash(&b));
    }
}
