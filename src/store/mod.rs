//! What the service remembers: models, the job queue and the artifacts of
//! finished jobs, in SQLite (WAL; the default, one process per database)
//! or PostgreSQL (a server several processes may share), chosen by the
//! scheme of the database URL.
//!
//! The `jobs` table is the queue. Anyone may enqueue or cancel; only a worker
//! holding a job's lease may write its progress and its outcome, and every
//! such write is conditioned on the lease, so a worker that lost its lease
//! (because it stalled past the expiry and the job was queued again) can no
//! longer touch the job.
//!
//! Each query is written once, with `$N` parameters (which sqlx's SQLite
//! driver binds by number as PostgreSQL does), in SQL both databases run,
//! and compiled for each by [`on_pool!`]; where the two differ (row locks,
//! claiming a job, JSON arrays) [`Dialect::pick`] holds both statements
//! side by side. SQLite serializes writers (`BEGIN IMMEDIATE`); on
//! PostgreSQL a transaction that decides on a row it read (does this model
//! exist, is this job still queued) locks that row first, so the same
//! decisions hold under concurrency.
//!
//! A write that fails half-way (a full disk, an I/O error) never leaves a
//! pooled SQLite connection inside a transaction: SQLite may have rolled the
//! transaction back on its own, so the rollback sqlx sends afterwards fails
//! and its count of open transactions stays up. Such a connection is
//! discarded when it is next taken from the pool, and a fresh one opened.

/// Runs `$body`, written once, on the store's backend: `$pool` is the
/// backend's pool and `$db` names its sqlx database type (a [`Dialect`]).
/// The body is compiled once for each database.
macro_rules! on_pool {
    ($store:expr, |$pool:ident: $db:ident| $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite($pool) => {
                #[allow(dead_code)]
                type $db = ::sqlx::Sqlite;
                $body
            }
            $crate::store::Backend::Postgres($pool) => {
                #[allow(dead_code)]
                type $db = ::sqlx::Postgres;
                $body
            }
        }
    };
}

mod dialect;
mod jobs;
mod models;
mod notify;
mod statistics;
#[doc(hidden)]
pub mod testing;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, PgPool, SqlitePool};

use crate::blobs::StorageFault;
use dialect::Dialect;

pub use jobs::{
    CancelOutcome, CorruptJob, FinishOutcome, InsertOutcome, JobFilter, JobRecord, JobStatus,
    LeaseState, NewArtifact, NewJob, ProgressUpdate, Requeued, Summary,
};
pub use models::{ModelFile, ModelRecord, NewModel};
pub use notify::{JobEvent, JobEvents};
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
                if let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() {
                    return match pg.code() {
                        PG_DISK_FULL => Some(StorageFault::Full),
                        PG_READ_ONLY_SQL_TRANSACTION => Some(StorageFault::ReadOnly),
                        _ => None,
                    };
                }
                // SQLite: the primary result code is the low byte of the
                // extended one.
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

    /// Whether the database could not be reached: a server that is down,
    /// restarting or refusing connections, or a pool that found no
    /// connection in time. Trying again later may work.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Database(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::PoolTimedOut => true,
            sqlx::Error::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::NotConnected
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::TimedOut
            ),
            sqlx::Error::Database(db) => {
                db.try_downcast_ref::<PgDatabaseError>().is_some_and(|pg| {
                    // Class 08: connection exceptions; 57P01-57P03: the
                    // server is shutting down or starting.
                    pg.code().starts_with("08") || matches!(pg.code(), "57P01" | "57P02" | "57P03")
                })
            }
            _ => false,
        }
    }
}

const SQLITE_READONLY: i32 = 8;
const SQLITE_FULL: i32 = 13;
/// SQLSTATE `disk_full`.
const PG_DISK_FULL: &str = "53100";
/// SQLSTATE `read_only_sql_transaction`: a standby, or
/// `default_transaction_read_only`.
const PG_READ_ONLY_SQL_TRANSACTION: &str = "25006";

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

/// The advisory lock key of the blob lock ("mpblobs" in ASCII).
const BLOBS_LOCK_KEY: i64 = 0x006d_7062_6c6f_6273;

/// Holds the blob lock across every process on a PostgreSQL database;
/// released when dropped: the transaction holding it is rolled back when
/// its connection returns to the pool, or ends with the connection.
pub struct BlobsLock {
    _tx: sqlx::Transaction<'static, sqlx::Postgres>,
}

/// The database of the service.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Milliseconds since the Unix epoch, the unit of every timestamp stored.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether `url` names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Store {
    /// Opens the database at `url` and brings its schema up to date:
    /// `postgres://…` or `postgresql://…` (the database must exist), else
    /// SQLite, `sqlite://PATH` or a bare path (the file is created if
    /// needed).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if is_postgres_url(url) {
            Self::open_postgres(url).await
        } else {
            Self::open_sqlite(url).await
        }
    }

    async fn open_sqlite(url: &str) -> Result<Self, StoreError> {
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
        // The SQLite migrations were once at ./migrations: sqlx knows an
        // applied migration by its version and checksum, not its path, so
        // existing databases go on from where they were.
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self {
            backend: Backend::Sqlite(pool),
        })
    }

    async fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // A server that is down answers requests with an error within
            // seconds (503), rather than holding them for the default 30 s.
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        // sqlx takes an advisory lock while it migrates, so processes that
        // start together migrate once.
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self {
            backend: Backend::Postgres(pool),
        })
    }

    /// The database URL of a data directory.
    pub fn default_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("modelpress.db").display())
    }

    /// Whether other processes may use this database at the same time
    /// (PostgreSQL): then a job running when this process starts may be
    /// another process's, and only an expired lease shows it abandoned.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The database-wide half of the blob lock (see [`crate::blobs::Blobs::lock`]):
    /// on PostgreSQL, which several processes may share, a transaction
    /// holding an advisory lock until it is dropped (and rolled back); on
    /// SQLite, one process per database, nothing.
    pub async fn lock_blobs(&self) -> Result<Option<BlobsLock>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(BLOBS_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                Ok(Some(BlobsLock { _tx: tx }))
            }
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool: Db| {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Whether the database takes a write: one small committed update.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            sqlx::query("UPDATE write_probe SET written_at = $1 WHERE id = 1")
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Whether any model file, artifact or statistics still refers to the
    /// blob.
    pub async fn blob_is_referenced(&self, sha256: &str) -> Result<bool, StoreError> {
        let n: i64 = on_pool!(self, |pool: Db| {
            sqlx::query_scalar(REFERENCES_OF_BLOB)
                .bind(sha256)
                .fetch_one(pool)
                .await?
        });
        Ok(n > 0)
    }

    /// Every blob the database refers to.
    pub async fn referenced_blobs(&self) -> Result<Vec<String>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_scalar(
                "SELECT sha256 FROM model_files UNION SELECT sha256 FROM job_artifacts
                 UNION SELECT sha256 FROM statistics",
            )
            .fetch_all(pool)
            .await?
        }))
    }

    pub async fn close(&self) {
        on_pool!(self, |pool: Db| pool.close().await)
    }
}

/// How many rows refer to the blob `$1`: model files, artifacts and
/// statistics.
const REFERENCES_OF_BLOB: &str = "SELECT (SELECT COUNT(*) FROM model_files WHERE sha256 = $1)
      + (SELECT COUNT(*) FROM job_artifacts WHERE sha256 = $1)
      + (SELECT COUNT(*) FROM statistics WHERE sha256 = $1)";

#[cfg(test)]
mod tests;
