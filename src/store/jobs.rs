//! Jobs: the queue, leases, outcomes and artifacts.

use serde::{Deserialize, Serialize};

use crate::compress::spec::{Pipeline, PipelineSpec};
use crate::run::OutputFormat;

use super::notify::{CANCEL_CHANNEL, JOBS_CHANNEL};
use super::{now_ms, DeleteOutcome, Dialect, Store, StoreError};

/// Where a job is in its life. `succeeded`, `failed` and `canceled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

/// A name that is not a job status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status `{0}`: use queued, running, succeeded, failed or canceled")]
pub struct UnknownStatus(pub String);

impl std::str::FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, UnknownStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// A job as stored, its pipeline, output format and labels read back into
/// their types. A row whose values do not read is an error naming the job
/// ([`CorruptJob`]), never a default.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    pub model_id: String,
    pub status: JobStatus,
    pub priority: i64,
    pub preset: Option<String>,
    /// The pipeline, presets expanded.
    pub pipeline: Pipeline,
    pub output_format: OutputFormat,
    pub webhook_url: Option<String>,
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub attempts: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub cancel_requested: bool,
    pub progress_stage: Option<String>,
    pub tensors_done: i64,
    pub tensors_total: i64,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub bytes_before: Option<i64>,
    pub bytes_after: Option<i64>,
    pub ratio: Option<f64>,
    pub parameters_kept: Option<f64>,
    pub duration_seconds: Option<f64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
    /// The `x-request-id` of the request that created the job.
    pub request_id: Option<String>,
    /// The statistics it runs with.
    pub statistics_id: Option<String>,
}

/// A row of `jobs` as SQL has it.
#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    model_id: String,
    status: JobStatus,
    priority: i64,
    preset: Option<String>,
    pipeline: String,
    output_format: String,
    webhook_url: Option<String>,
    labels: String,
    idempotency_key: Option<String>,
    request_hash: Option<String>,
    attempts: i64,
    lease_owner: Option<String>,
    lease_expires_at: Option<i64>,
    cancel_requested: bool,
    progress_stage: Option<String>,
    tensors_done: i64,
    tensors_total: i64,
    error_code: Option<String>,
    error_message: Option<String>,
    bytes_before: Option<i64>,
    bytes_after: Option<i64>,
    ratio: Option<f64>,
    parameters_kept: Option<f64>,
    duration_seconds: Option<f64>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    updated_at: i64,
    request_id: Option<String>,
    statistics_id: Option<String>,
}

/// A stored job whose values do not read back.
#[derive(Debug, thiserror::Error)]
#[error("job {id}: the stored {column} cannot be read: {reason}")]
pub struct CorruptJob {
    pub id: String,
    pub column: &'static str,
    pub reason: String,
}

impl TryFrom<JobRow> for JobRecord {
    type Error = CorruptJob;

    fn try_from(r: JobRow) -> Result<Self, CorruptJob> {
        let corrupt = |column, reason: String| CorruptJob {
            id: r.id.clone(),
            column,
            reason,
        };
        let pipeline = serde_json::from_str::<PipelineSpec>(&r.pipeline)
            .map_err(|e| e.to_string())
            .and_then(|spec| Pipeline::parse(spec).map_err(|e| e.to_string()))
            .map_err(|e| corrupt("pipeline", e))?;
        let output_format = r
            .output_format
            .parse::<OutputFormat>()
            .map_err(|e| corrupt("output_format", e.to_string()))?;
        let labels = match serde_json::from_str(&r.labels) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(other) => return Err(corrupt("labels", format!("not a JSON object: {other}"))),
            Err(e) => return Err(corrupt("labels", e.to_string())),
        };
        Ok(JobRecord {
            id: r.id,
            model_id: r.model_id,
            status: r.status,
            priority: r.priority,
            preset: r.preset,
            pipeline,
            output_format,
            webhook_url: r.webhook_url,
            labels,
            idempotency_key: r.idempotency_key,
            request_hash: r.request_hash,
            attempts: r.attempts,
            lease_owner: r.lease_owner,
            lease_expires_at: r.lease_expires_at,
            cancel_requested: r.cancel_requested,
            progress_stage: r.progress_stage,
            tensors_done: r.tensors_done,
            tensors_total: r.tensors_total,
            error_code: r.error_code,
            error_message: r.error_message,
            bytes_before: r.bytes_before,
            bytes_after: r.bytes_after,
            ratio: r.ratio,
            parameters_kept: r.parameters_kept,
            duration_seconds: r.duration_seconds,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            updated_at: r.updated_at,
            request_id: r.request_id,
            statistics_id: r.statistics_id,
        })
    }
}

/// Rows are read through [`JobRow`], so every query that returns jobs
/// checks their values; a corrupt one fails the query with a
/// [`CorruptJob`] naming it.
macro_rules! job_record_from_row {
    ($row:ty) => {
        impl<'r> sqlx::FromRow<'r, $row> for JobRecord {
            fn from_row(row: &'r $row) -> Result<Self, sqlx::Error> {
                JobRow::from_row(row)?
                    .try_into()
                    .map_err(|e: CorruptJob| sqlx::Error::Decode(Box::new(e)))
            }
        }
    };
}
job_record_from_row!(sqlx::sqlite::SqliteRow);
job_record_from_row!(sqlx::postgres::PgRow);

/// A status is stored as its name, as text, on both databases.
macro_rules! job_status_as_text {
    ($db:ty) => {
        impl sqlx::Type<$db> for JobStatus {
            fn type_info() -> <$db as sqlx::Database>::TypeInfo {
                <str as sqlx::Type<$db>>::type_info()
            }
            fn compatible(ty: &<$db as sqlx::Database>::TypeInfo) -> bool {
                <str as sqlx::Type<$db>>::compatible(ty)
            }
        }
        impl<'q> sqlx::Encode<'q, $db> for JobStatus {
            fn encode_by_ref(
                &self,
                buf: &mut <$db as sqlx::Database>::ArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, $db>>::encode(self.as_str(), buf)
            }
        }
        impl<'r> sqlx::Decode<'r, $db> for JobStatus {
            fn decode(
                value: <$db as sqlx::Database>::ValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<'r, $db>>::decode(value)?.parse()?)
            }
        }
    };
}
job_status_as_text!(sqlx::Sqlite);
job_status_as_text!(sqlx::Postgres);

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub model_id: String,
    pub priority: i64,
    pub preset: Option<String>,
    pub pipeline: Pipeline,
    pub output_format: OutputFormat,
    pub webhook_url: Option<String>,
    pub labels: serde_json::Map<String, serde_json::Value>,
    /// With the hash of the request it came with: the same key with another
    /// request is a conflict.
    pub idempotency: Option<(String, String)>,
    /// The `x-request-id` of the request that creates it.
    pub request_id: Option<String>,
    /// Statistics of the same model it runs with.
    pub statistics_id: Option<String>,
}

#[derive(Debug)]
pub enum InsertOutcome {
    Created(JobRecord),
    /// The idempotency key was used before with the same request.
    Existing(JobRecord),
    /// The idempotency key was used before with another request.
    KeyConflict,
    /// The model does not exist (any more): deleting a model and queuing
    /// a job on it are serialized, so one of them sees the other.
    ModelNotFound,
    /// The statistics do not exist (any more) for this model: deleting
    /// them and queuing a job that uses them are serialized the same way.
    StatisticsNotFound,
}

/// Filters of a job listing; `cursor` is the id of the last job of the
/// previous page.
#[derive(Debug, Default, Clone)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub model_id: Option<String>,
    pub limit: u32,
    pub cursor: Option<String>,
}

/// What a lease renewal found.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseState {
    Held {
        cancel_requested: bool,
    },
    /// The job is no longer this worker's.
    Lost,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProgressUpdate {
    pub stage: String,
    pub tensors_done: i64,
    pub tensors_total: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub bytes_before: i64,
    pub bytes_after: i64,
    pub ratio: f64,
    pub parameters_kept: f64,
    pub duration_seconds: f64,
}

/// An artifact of a job: a file of its output, stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NewArtifact {
    pub name: String,
    pub sha256: String,
    pub bytes: i64,
}

#[derive(Debug)]
pub enum FinishOutcome {
    Finished(Box<JobRecord>),
    /// A cancel arrived before the outcome was written: the job was not
    /// marked succeeded.
    CancelRequested,
    /// The job is no longer this worker's: nothing was written.
    LeaseLost,
}

#[derive(Debug)]
pub enum CancelOutcome {
    /// The job was queued and is now canceled.
    Canceled(JobRecord),
    /// The job is running; it stops at its next tensor.
    Requested(JobRecord),
    AlreadyFinished(JobRecord),
    NotFound,
}

/// Jobs whose lease was given up on.
#[derive(Debug, Default)]
pub struct Requeued {
    pub queued: Vec<String>,
    /// Jobs that reached the retry limit, or were being canceled: now final.
    pub finished: Vec<JobRecord>,
}

impl Store {
    pub async fn insert_job(&self, job: NewJob) -> Result<InsertOutcome, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            if let Some((key, hash)) = &job.idempotency {
                let existing: Option<JobRecord> =
                    sqlx::query_as("SELECT * FROM jobs WHERE idempotency_key = $1")
                        .bind(key)
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some(existing) = existing {
                    return Ok(same_request(existing, hash));
                }
            }
            // Locked until the end: deleting the model, or the statistics,
            // waits for this job to be queued (and sees it).
            let model: Option<String> = sqlx::query_scalar(Db::pick(
                "SELECT id FROM models WHERE id = $1",
                "SELECT id FROM models WHERE id = $1 FOR SHARE",
            ))
            .bind(&job.model_id)
            .fetch_optional(&mut *tx)
            .await?;
            if model.is_none() {
                return Ok(InsertOutcome::ModelNotFound);
            }
            if let Some(statistics) = &job.statistics_id {
                let found: Option<String> = sqlx::query_scalar(Db::pick(
                    "SELECT id FROM statistics WHERE id = $1 AND model_id = $2",
                    "SELECT id FROM statistics WHERE id = $1 AND model_id = $2 FOR SHARE",
                ))
                .bind(statistics)
                .bind(&job.model_id)
                .fetch_optional(&mut *tx)
                .await?;
                if found.is_none() {
                    return Ok(InsertOutcome::StatisticsNotFound);
                }
            }
            let now = now_ms();
            let (key, hash) = job.idempotency.clone().unzip();
            // A request with the same key may be queuing its job at the same
            // moment (PostgreSQL does not serialize the two): one inserts,
            // the other finds its job.
            let record: Option<JobRecord> = sqlx::query_as(
                "INSERT INTO jobs (id, model_id, status, priority, preset, pipeline, output_format,
                                   webhook_url, labels, idempotency_key, request_hash,
                                   created_at, updated_at, request_id, statistics_id)
                 VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, $13)
                 ON CONFLICT (idempotency_key) DO NOTHING
                 RETURNING *",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&job.model_id)
            .bind(job.priority)
            .bind(&job.preset)
            .bind(serde_json::to_string(job.pipeline.spec()).expect("a pipeline spec serializes"))
            .bind(job.output_format.name())
            .bind(&job.webhook_url)
            .bind(serde_json::Value::Object(job.labels.clone()).to_string())
            .bind(&key)
            .bind(&hash)
            .bind(now)
            .bind(&job.request_id)
            .bind(&job.statistics_id)
            .fetch_optional(&mut *tx)
            .await?;
            let outcome = match (record, key, hash) {
                (Some(record), _, _) => {
                    // Idle workers of every process wake when it commits.
                    Db::notify(&mut *tx, JOBS_CHANNEL, &record.id).await?;
                    InsertOutcome::Created(record)
                }
                (None, Some(key), Some(hash)) => {
                    let existing: JobRecord =
                        sqlx::query_as("SELECT * FROM jobs WHERE idempotency_key = $1")
                            .bind(&key)
                            .fetch_one(&mut *tx)
                            .await?;
                    same_request(existing, &hash)
                }
                (None, _, _) => unreachable!("only the idempotency key can conflict"),
            };
            tx.commit().await?;
            Ok(outcome)
        })
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        }))
    }

    pub async fn job_by_idempotency_key(&self, key: &str) -> Result<Option<JobRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as("SELECT * FROM jobs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Jobs, newest first.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as(
                "SELECT * FROM jobs
                 WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR model_id = $2)
                   AND ($3 IS NULL OR id < $3)
                 ORDER BY id DESC LIMIT $4",
            )
            .bind(filter.status)
            .bind(filter.model_id.as_deref())
            .bind(filter.cursor.as_deref())
            .bind(i64::from(filter.limit))
            .fetch_all(pool)
            .await?
        }))
    }

    /// The artifacts of several jobs in one query: job id → its artifacts,
    /// in order. A job without artifacts is absent.
    pub async fn artifacts_of_jobs(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, Vec<NewArtifact>>, StoreError> {
        let ids = serde_json::to_string(ids).expect("strings serialize");
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, |pool: Db| {
            sqlx::query_as(Db::pick(
                "SELECT job_id, name, sha256, bytes FROM job_artifacts
                 WHERE job_id IN (SELECT value FROM json_each($1)) ORDER BY job_id, position",
                "SELECT job_id, name, sha256, bytes FROM job_artifacts
                 WHERE job_id IN (SELECT json_array_elements_text($1::json))
                 ORDER BY job_id, position",
            ))
            .bind(&ids)
            .fetch_all(pool)
            .await?
        });
        let mut out: std::collections::HashMap<String, Vec<NewArtifact>> = Default::default();
        for (job_id, name, sha256, bytes) in rows {
            out.entry(job_id).or_default().push(NewArtifact {
                name,
                sha256,
                bytes,
            });
        }
        Ok(out)
    }

    pub async fn job_artifacts(&self, id: &str) -> Result<Vec<NewArtifact>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as(
                "SELECT name, sha256, bytes FROM job_artifacts WHERE job_id = $1 ORDER BY position",
            )
            .bind(id)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Claims the next queued job — highest priority first, then oldest —
    /// in one statement, with a lease until `lease_until` (ms).
    pub async fn claim_next_job(
        &self,
        owner: &str,
        lease_until: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        on_pool!(self, |pool: Db| {
            // SQLite runs one writer at a time. On PostgreSQL, claimers run
            // at once: each skips the rows the others have locked, rather
            // than waiting for them and then finding them taken.
            let row: Option<JobRow> = sqlx::query_as(Db::pick(
                "UPDATE jobs
                 SET status = 'running', attempts = attempts + 1, lease_owner = $1,
                     lease_expires_at = $2, started_at = COALESCE(started_at, $3),
                     updated_at = $3, progress_stage = NULL, tensors_done = 0, tensors_total = 0
                 WHERE id = (SELECT id FROM jobs WHERE status = 'queued'
                             ORDER BY priority DESC, id LIMIT 1)
                 RETURNING *",
                "UPDATE jobs
                 SET status = 'running', attempts = attempts + 1, lease_owner = $1,
                     lease_expires_at = $2, started_at = COALESCE(started_at, $3),
                     updated_at = $3, progress_stage = NULL, tensors_done = 0, tensors_total = 0
                 WHERE id = (SELECT id FROM jobs WHERE status = 'queued'
                             ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING *",
            ))
            .bind(owner)
            .bind(lease_until)
            .bind(now_ms())
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let id = row.id.clone();
            match JobRecord::try_from(row) {
                Ok(job) => Ok(Some(job)),
                Err(corrupt) => {
                    // Failed at once, so the queue moves past it rather than
                    // claiming it again and again.
                    sqlx::query(
                        "UPDATE jobs
                         SET status = 'failed', lease_owner = NULL, lease_expires_at = NULL,
                             finished_at = $3, updated_at = $3, error_code = 'internal_error',
                             error_message = 'The stored job cannot be read; the server log has the details.'
                         WHERE id = $1 AND lease_owner = $2",
                    )
                    .bind(&id)
                    .bind(owner)
                    .bind(now_ms())
                    .execute(pool)
                    .await?;
                    Err(StoreError::Database(sqlx::Error::Decode(Box::new(corrupt))))
                }
            }
        })
    }

    /// Extends the lease of a running job and records its progress.
    pub async fn renew_lease(
        &self,
        id: &str,
        owner: &str,
        lease_until: i64,
        progress: Option<&ProgressUpdate>,
    ) -> Result<LeaseState, StoreError> {
        let cancel: Option<bool> = on_pool!(self, |pool: Db| {
            sqlx::query_scalar(
                "UPDATE jobs
                 SET lease_expires_at = $3, updated_at = $4,
                     progress_stage = COALESCE($5, progress_stage),
                     tensors_done = COALESCE($6, tensors_done),
                     tensors_total = COALESCE($7, tensors_total)
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'
                 RETURNING cancel_requested",
            )
            .bind(id)
            .bind(owner)
            .bind(lease_until)
            .bind(now_ms())
            .bind(progress.map(|p| p.stage.clone()))
            .bind(progress.map(|p| p.tensors_done))
            .bind(progress.map(|p| p.tensors_total))
            .fetch_optional(pool)
            .await?
        });
        Ok(match cancel {
            Some(cancel_requested) => LeaseState::Held { cancel_requested },
            None => LeaseState::Lost,
        })
    }

    /// Records a success: the artifacts, the summary and the status, in one
    /// transaction, if the job is still this worker's and not being canceled.
    pub async fn finish_succeeded(
        &self,
        id: &str,
        owner: &str,
        summary: &Summary,
        artifacts: &[NewArtifact],
    ) -> Result<FinishOutcome, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            let now = now_ms();
            let record: Option<JobRecord> = sqlx::query_as(
                "UPDATE jobs
                 SET status = 'succeeded', lease_owner = NULL, lease_expires_at = NULL,
                     finished_at = $3, updated_at = $3, tensors_done = tensors_total,
                     bytes_before = $4, bytes_after = $5, ratio = $6, parameters_kept = $7,
                     duration_seconds = $8, error_code = NULL, error_message = NULL
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'
                   AND cancel_requested = FALSE
                 RETURNING *",
            )
            .bind(id)
            .bind(owner)
            .bind(now)
            .bind(summary.bytes_before)
            .bind(summary.bytes_after)
            .bind(summary.ratio)
            .bind(summary.parameters_kept)
            .bind(summary.duration_seconds)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(record) = record else {
                let held: Option<bool> = sqlx::query_scalar(
                    "SELECT cancel_requested FROM jobs
                     WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
                )
                .bind(id)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
                return Ok(match held {
                    Some(true) => FinishOutcome::CancelRequested,
                    _ => FinishOutcome::LeaseLost,
                });
            };
            for (position, a) in artifacts.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO job_artifacts (job_id, name, sha256, bytes, position)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(&a.name)
                .bind(&a.sha256)
                .bind(a.bytes)
                .bind(position as i64)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(FinishOutcome::Finished(Box::new(record)))
        })
    }

    /// Records a failure, if the job is still this worker's.
    pub async fn finish_failed(
        &self,
        id: &str,
        owner: &str,
        code: &str,
        message: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as(
                "UPDATE jobs
                 SET status = 'failed', lease_owner = NULL, lease_expires_at = NULL,
                     finished_at = $3, updated_at = $3, error_code = $4, error_message = $5
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'
                 RETURNING *",
            )
            .bind(id)
            .bind(owner)
            .bind(now_ms())
            .bind(code)
            .bind(message)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Records that a running job stopped on a cancel.
    pub async fn finish_canceled(
        &self,
        id: &str,
        owner: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as(
                "UPDATE jobs
                 SET status = 'canceled', lease_owner = NULL, lease_expires_at = NULL,
                     finished_at = $3, updated_at = $3
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'
                 RETURNING *",
            )
            .bind(id)
            .bind(owner)
            .bind(now_ms())
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Puts a running job back in the queue because this process is
    /// stopping; the interrupted attempt does not count.
    pub async fn release_job(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let released = on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            let released = sqlx::query(
                "UPDATE jobs
                 SET status = 'queued',
                     attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                     lease_owner = NULL, lease_expires_at = NULL, updated_at = $3,
                     progress_stage = NULL, tensors_done = 0, tensors_total = 0
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'
                   AND cancel_requested = FALSE",
            )
            .bind(id)
            .bind(owner)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if released == 1 {
                // Another process's idle worker may take it at once.
                Db::notify(&mut *tx, JOBS_CHANNEL, id).await?;
            }
            tx.commit().await?;
            released
        });
        Ok(released == 1)
    }

    /// Takes back running jobs whose lease expired before `now` (or every
    /// running job, when `all`, as at start when no other process can hold
    /// one): each is queued again, or failed once it has been attempted more
    /// than `retry_limit` extra times, or canceled if a cancel was pending.
    pub async fn requeue_abandoned(
        &self,
        now: i64,
        all: bool,
        retry_limit: u32,
    ) -> Result<Requeued, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            let mut finished: Vec<JobRecord> = sqlx::query_as(
                "UPDATE jobs
                 SET status = 'canceled', lease_owner = NULL, lease_expires_at = NULL,
                     finished_at = $1, updated_at = $1
                 WHERE status = 'running' AND ($2 OR lease_expires_at < $1)
                   AND cancel_requested = TRUE
                 RETURNING *",
            )
            .bind(now)
            .bind(all)
            .fetch_all(&mut *tx)
            .await?;
            let failed: Vec<JobRecord> = sqlx::query_as(
                "UPDATE jobs
                 SET status = 'failed', lease_owner = NULL, lease_expires_at = NULL,
                     finished_at = $1, updated_at = $1, error_code = 'retry_limit_reached',
                     error_message = 'The job was interrupted ' || attempts || ' times (the server stopped or stalled while running it) and is not retried again.'
                 WHERE status = 'running' AND ($2 OR lease_expires_at < $1) AND attempts > $3
                 RETURNING *",
            )
            .bind(now)
            .bind(all)
            .bind(i64::from(retry_limit))
            .fetch_all(&mut *tx)
            .await?;
            finished.extend(failed);
            let queued: Vec<String> = sqlx::query_scalar(
                "UPDATE jobs
                 SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
                     updated_at = $1, progress_stage = NULL, tensors_done = 0, tensors_total = 0
                 WHERE status = 'running' AND ($2 OR lease_expires_at < $1)
                 RETURNING id",
            )
            .bind(now)
            .bind(all)
            .fetch_all(&mut *tx)
            .await?;
            if !queued.is_empty() {
                // The payload is one job's id; several would outgrow
                // NOTIFY's 8000 bytes, and listeners only need the wake-up.
                let payload = if queued.len() == 1 {
                    queued[0].as_str()
                } else {
                    ""
                };
                Db::notify(&mut *tx, JOBS_CHANNEL, payload).await?;
            }
            tx.commit().await?;
            Ok(Requeued { queued, finished })
        })
    }

    /// Cancels a queued job at once, or asks a running one to stop.
    pub async fn request_cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            // Locked until the end: a claim skips the job meanwhile, so a
            // job seen queued is canceled before any worker can start it.
            let status: Option<JobStatus> = sqlx::query_scalar(Db::pick(
                "SELECT status FROM jobs WHERE id = $1",
                "SELECT status FROM jobs WHERE id = $1 FOR UPDATE",
            ))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let now = now_ms();
            let outcome = match status {
                None => CancelOutcome::NotFound,
                Some(JobStatus::Queued) => CancelOutcome::Canceled(
                    sqlx::query_as(
                        "UPDATE jobs SET status = 'canceled', cancel_requested = TRUE,
                                finished_at = $2, updated_at = $2
                         WHERE id = $1 RETURNING *",
                    )
                    .bind(id)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?,
                ),
                Some(JobStatus::Running) => {
                    let job = sqlx::query_as(
                        "UPDATE jobs SET cancel_requested = TRUE, updated_at = $2
                         WHERE id = $1 RETURNING *",
                    )
                    .bind(id)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                    // The process running it stops it at once rather than
                    // at its next lease renewal.
                    Db::notify(&mut *tx, CANCEL_CHANNEL, id).await?;
                    CancelOutcome::Requested(job)
                }
                Some(_) => CancelOutcome::AlreadyFinished(
                    sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?,
                ),
            };
            tx.commit().await?;
            Ok(outcome)
        })
    }

    /// Deletes a finished job and its artifacts.
    pub async fn delete_job(&self, id: &str) -> Result<DeleteOutcome, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            let status: Option<JobStatus> = sqlx::query_scalar(Db::pick(
                "SELECT status FROM jobs WHERE id = $1",
                "SELECT status FROM jobs WHERE id = $1 FOR UPDATE",
            ))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            match status {
                None => return Ok(DeleteOutcome::NotFound),
                Some(s) if !s.is_finished() => return Ok(DeleteOutcome::InUse),
                Some(_) => {}
            }
            let blobs: Vec<String> =
                sqlx::query_scalar("DELETE FROM job_artifacts WHERE job_id = $1 RETURNING sha256")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            sqlx::query("DELETE FROM jobs WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let unreferenced_blobs = Db::unreferenced(&mut *tx, blobs).await?;
            tx.commit().await?;
            Ok(DeleteOutcome::Deleted { unreferenced_blobs })
        })
    }

    /// How many jobs are in each status (statuses with none included).
    pub async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows: Vec<(JobStatus, i64)> = on_pool!(self, |pool: Db| {
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                .fetch_all(pool)
                .await?
        });
        Ok(JobStatus::ALL
            .into_iter()
            .map(|s| {
                let n = rows.iter().find(|r| r.0 == s).map_or(0, |r| r.1);
                (s, n)
            })
            .collect())
    }
}

/// The outcome of a request whose idempotency key names `existing`: the
/// same job if the request is the same, else a conflict.
fn same_request(existing: JobRecord, hash: &str) -> InsertOutcome {
    if existing.request_hash.as_deref() == Some(hash) {
        InsertOutcome::Existing(existing)
    } else {
        InsertOutcome::KeyConflict
    }
}
