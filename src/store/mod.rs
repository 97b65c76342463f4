//! What the service remembers: models, the job queue and the artifacts of
//! finished jobs, in SQLite (WAL).
//!
//! The `jobs` table is the queue. Anyone may enqueue or cancel; only a worker
//! holding a job's lease may write its progress and its outcome, and every
//! such write is conditioned on the lease, so a worker that lost its lease
//! (because it stalled past the expiry and the job was queued again) can no
//! longer touch the job.
//!
//! A write that fails half-way (a full disk, an I/O error) never leaves a
//! pooled connection inside a transaction: SQLite may have rolled the
//! transaction back on its own, so the rollback sqlx sends afterwards fails
//! and its count of open transactions stays up. Such a connection is
//! discarded when it is next taken from the pool, and a fresh one opened.

mod jobs;
mod models;
mod statistics;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqlitePool};

use crate::blobs::StorageFault;

pub use jobs::{
    CancelOutcome, CorruptJob, FinishOutcome, InsertOutcome, JobFilter, JobRecord, JobStatus,
    LeaseState, NewArtifact, NewJob, ProgressUpdate, Requeued, Summary,
};
pub use models::{ModelFile, ModelRecord, NewModel};
pub use statistics::{NewStatistics, StatisticsRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether the database failed because its storage is full or
    /// read-only, rather than for any other reason.
    pub fn storage_fault(&self) -> Option<StorageFault> {
        let StoreError::Database(e) = self else {
            return None;
        };
        match e {
            sqlx::Error::Io(io) => StorageFault::of_io(io),
            sqlx::Error::Database(db) => {
                // The primary result code is the low byte of the extended one.
                let code: i32 = db.code()?.parse().ok()?;
                match code & 0xff {
                    SQLITE_FULL => Some(StorageFault::Full),
                    SQLITE_READONLY => Some(StorageFault::ReadOnly),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

const SQLITE_READONLY: i32 = 8;
const SQLITE_FULL: i32 = 13;

/// The outcome of deleting a model or a job.
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// Deleted; these blobs are no longer referenced by anything.
    Deleted {
        unreferenced_blobs: Vec<String>,
    },
    NotFound,
    /// The model is used by a queued or running job, or the job has not
    /// finished.
    InUse,
}

/// The database of one data directory.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

/// Milliseconds since the Unix epoch, the unit of every timestamp stored.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating it if needed) the database at `url` — `sqlite://PATH`
    /// or a bare path — and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url)?
        } else {
            SqliteConnectOptions::new().filename(url)
        }
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL with NORMAL is durable across process crashes; only a power
        // loss may drop the last transactions.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // By now the rollback of a transaction dropped unfinished has
            // run (the pool pings a connection when it comes back); a
            // connection still counted inside one is out of step with SQLite.
            .before_acquire(|conn, _meta| {
                Box::pin(async move {
                    let clean = !conn.is_in_transaction();
                    if !clean {
                        tracing::warn!(
                            "discarding a database connection left inside a failed transaction"
                        );
                    }
                    Ok(clean)
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The database URL of a data directory.
    pub fn default_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("modelpress.db").display())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Whether the database takes a write: one small committed update.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE write_probe SET written_at = ? WHERE id = 1")
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether any model file, artifact or statistics still refers to the
    /// blob.
    pub async fn blob_is_referenced(&self, sha256: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(REFERENCES_OF_BLOB)
            .bind(sha256)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Every blob the database refers to.
    pub async fn referenced_blobs(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT sha256 FROM model_files UNION SELECT sha256 FROM job_artifacts
             UNION SELECT sha256 FROM statistics",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// A transaction that takes the write lock at once: a deferred one that
    /// reads first could find, when it comes to write, that another writer
    /// committed in between, and SQLite would refuse it without waiting.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// How many rows refer to the blob `?1`: model files, artifacts and
/// statistics.
const REFERENCES_OF_BLOB: &str = "SELECT (SELECT COUNT(*) FROM model_files WHERE sha256 = ?1)
      + (SELECT COUNT(*) FROM job_artifacts WHERE sha256 = ?1)
      + (SELECT COUNT(*) FROM statistics WHERE sha256 = ?1)";

/// Of `candidates`, those that nothing in the database refers to any more.
async fn unreferenced(
    conn: &mut sqlx::SqliteConnection,
    candidates: Vec<String>,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for sha in candidates {
        let n: i64 = sqlx::query_scalar(REFERENCES_OF_BLOB)
            .bind(&sha)
            .fetch_one(&mut *conn)
            .await?;
        if n == 0 && !out.contains(&sha) {
            out.push(sha);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::spec::Pipeline;
    use crate::run::OutputFormat;

    const INT8: &str = r#"{"stages":[{"stage":"quantize","bits":8}]}"#;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Store::default_url(dir.path())).await.unwrap();
        // The model the jobs below are queued on.
        sqlx::query(
            "INSERT INTO models (id, total_bytes, tensor_count, parameter_count, tensors, created_at)
             VALUES ('m', 0, 0, 0, '[]', 0)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        (store, dir)
    }

    fn job(priority: i64) -> NewJob {
        NewJob {
            model_id: "m".into(),
            priority,
            preset: None,
            pipeline: Pipeline::parse(serde_json::from_str(INT8).unwrap()).unwrap(),
            output_format: OutputFormat::Packed,
            webhook_url: None,
            labels: Default::default(),
            idempotency: None,
            request_id: None,
            statistics_id: None,
        }
    }

    async fn enqueue(store: &Store, priority: i64) -> String {
        match store.insert_job(job(priority)).await.unwrap() {
            InsertOutcome::Created(j) => j.id,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_corrupt_job_row_is_an_error_naming_the_job_not_a_default() {
        let (store, _dir) = store().await;
        let id = enqueue(&store, 0).await;
        assert_eq!(
            store.get_job(&id).await.unwrap().unwrap().output_format,
            OutputFormat::Packed
        );
        for (column, value) in [
            ("pipeline", r#"{"stages":[{"stage":"nope"}]}"#),
            ("output_format", "zip"),
            ("labels", "[1]"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE jobs SET pipeline = ?3, output_format = 'packed', labels = '{{}}',
                                 {column} = ?1 WHERE id = ?2"
            )))
            .bind(value)
            .bind(&id)
            .bind(INT8)
            .execute(&store.pool)
            .await
            .unwrap();
            let e = store.get_job(&id).await.unwrap_err().to_string();
            assert!(e.contains(&id) && e.contains(column), "{column}: {e}");
            let e = store
                .list_jobs(&JobFilter {
                    limit: 10,
                    ..Default::default()
                })
                .await;
            assert!(e.is_err(), "{column}: a listing does not skip it");
        }
        // A worker that claims it fails it, so the queue moves past it.
        let e = store
            .claim_next_job("w", now_ms() + 60_000)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&id), "{e}");
        let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(&id)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(status, "failed");
        assert!(store
            .claim_next_job("w", now_ms() + 60_000)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn a_job_is_not_queued_for_a_missing_model() {
        let (store, _dir) = store().await;
        let mut orphan = job(0);
        orphan.model_id = "gone".into();
        assert!(matches!(
            store.insert_job(orphan).await.unwrap(),
            InsertOutcome::ModelNotFound
        ));
    }

    #[tokio::test]
    async fn claims_take_the_highest_priority_then_the_oldest_job_once() {
        let (store, _dir) = store().await;
        let low = enqueue(&store, 0).await;
        let high = enqueue(&store, 5).await;
        let low2 = enqueue(&store, 0).await;
        let far = now_ms() + 60_000;
        let mut order = Vec::new();
        while let Some(j) = store.claim_next_job("w", far).await.unwrap() {
            assert_eq!(j.status, JobStatus::Running);
            assert_eq!(j.attempts, 1);
            order.push(j.id);
        }
        assert_eq!(order, [high, low, low2]);
    }

    #[tokio::test]
    async fn an_expired_lease_is_requeued_and_fails_past_the_retry_limit() {
        let (store, _dir) = store().await;
        let id = enqueue(&store, 0).await;
        let retry_limit = 1;
        // First attempt: the lease runs out, the job is queued again.
        let past = now_ms() - 1;
        store.claim_next_job("a", past).await.unwrap().unwrap();
        let r = store
            .requeue_abandoned(now_ms(), false, retry_limit)
            .await
            .unwrap();
        assert_eq!(r.queued, std::slice::from_ref(&id));
        // A live lease is left alone.
        store
            .claim_next_job("b", now_ms() + 60_000)
            .await
            .unwrap()
            .unwrap();
        let r = store
            .requeue_abandoned(now_ms(), false, retry_limit)
            .await
            .unwrap();
        assert!(r.queued.is_empty() && r.finished.is_empty());
        // ...unless the whole process is known dead; the second interruption
        // is past the limit.
        let r = store
            .requeue_abandoned(now_ms(), true, retry_limit)
            .await
            .unwrap();
        assert_eq!(r.finished.len(), 1);
        let failed = &r.finished[0];
        assert_eq!(failed.status, JobStatus::Failed);
        assert_eq!(failed.error_code.as_deref(), Some("retry_limit_reached"));
        assert_eq!(failed.attempts, 2);
    }

    #[tokio::test]
    async fn a_worker_that_lost_its_lease_cannot_record_an_outcome() {
        let (store, _dir) = store().await;
        let id = enqueue(&store, 0).await;
        store
            .claim_next_job("old", now_ms() - 1)
            .await
            .unwrap()
            .unwrap();
        store.requeue_abandoned(now_ms(), false, 3).await.unwrap();
        store
            .claim_next_job("new", now_ms() + 60_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .renew_lease(&id, "old", now_ms() + 60_000, None)
                .await
                .unwrap(),
            LeaseState::Lost
        );
        let summary = Summary {
            bytes_before: 1,
            bytes_after: 1,
            ratio: 1.0,
            parameters_kept: 1.0,
            duration_seconds: 0.0,
        };
        assert!(matches!(
            store
                .finish_succeeded(&id, "old", &summary, &[])
                .await
                .unwrap(),
            FinishOutcome::LeaseLost
        ));
        assert!(store
            .finish_failed(&id, "old", "x", "y")
            .await
            .unwrap()
            .is_none());
        assert!(matches!(
            store
                .finish_succeeded(&id, "new", &summary, &[])
                .await
                .unwrap(),
            FinishOutcome::Finished(_)
        ));
    }

    #[tokio::test]
    async fn a_cancel_reaches_a_running_job_through_its_lease_renewal() {
        let (store, _dir) = store().await;
        let id = enqueue(&store, 0).await;
        store
            .claim_next_job("w", now_ms() + 60_000)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            store.request_cancel(&id).await.unwrap(),
            CancelOutcome::Requested(_)
        ));
        assert_eq!(
            store
                .renew_lease(&id, "w", now_ms() + 60_000, None)
                .await
                .unwrap(),
            LeaseState::Held {
                cancel_requested: true
            }
        );
        let done = store.finish_canceled(&id, "w").await.unwrap().unwrap();
        assert_eq!(done.status, JobStatus::Canceled);
        assert!(matches!(
            store.request_cancel(&id).await.unwrap(),
            CancelOutcome::AlreadyFinished(_)
        ));
    }
}
