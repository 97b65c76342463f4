//! Calibration statistics uploaded for a model, each a blob.

use super::{now_ms, DeleteOutcome, Dialect, Store, StoreError};

/// Statistics as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StatisticsRecord {
    pub id: String,
    pub model_id: String,
    pub sha256: String,
    pub bytes: i64,
    /// A JSON array of the weight names it covers.
    pub tensors: String,
    pub has_xtx: bool,
    pub tokens: f64,
    pub created_at: i64,
}

/// Statistics to record; the file is already a blob.
#[derive(Debug, Clone)]
pub struct NewStatistics {
    pub model_id: String,
    pub sha256: String,
    pub bytes: i64,
    pub tensors: String,
    pub has_xtx: bool,
    pub tokens: f64,
}

impl Store {
    /// Records statistics of a model; `None` when the model does not exist
    /// (any more): deleting a model and adding statistics to it are
    /// serialized, so one of them sees the other.
    pub async fn insert_statistics(
        &self,
        new: NewStatistics,
    ) -> Result<Option<StatisticsRecord>, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            let model: Option<String> = sqlx::query_scalar(Db::pick(
                "SELECT id FROM models WHERE id = $1",
                "SELECT id FROM models WHERE id = $1 FOR SHARE",
            ))
            .bind(&new.model_id)
            .fetch_optional(&mut *tx)
            .await?;
            if model.is_none() {
                return Ok(None);
            }
            let record: StatisticsRecord = sqlx::query_as(
                "INSERT INTO statistics (id, model_id, sha256, bytes, tensors, has_xtx, tokens,
                                         created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&new.model_id)
            .bind(&new.sha256)
            .bind(new.bytes)
            .bind(&new.tensors)
            .bind(new.has_xtx)
            .bind(new.tokens)
            .bind(now_ms())
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Some(record))
        })
    }

    /// The statistics `id` of the model `model_id`.
    pub async fn get_statistics(
        &self,
        model_id: &str,
        id: &str,
    ) -> Result<Option<StatisticsRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as("SELECT * FROM statistics WHERE id = $1 AND model_id = $2")
                .bind(id)
                .bind(model_id)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// A model's statistics, newest first, after `cursor` (an id) if given.
    pub async fn list_statistics(
        &self,
        model_id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<StatisticsRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as(
                "SELECT * FROM statistics WHERE model_id = $1 AND ($2 IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3",
            )
            .bind(model_id)
            .bind(cursor)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        }))
    }

    /// Deletes statistics unless a queued or running job uses them.
    pub async fn delete_statistics(
        &self,
        model_id: &str,
        id: &str,
    ) -> Result<DeleteOutcome, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            // Locked until the end: a job queued with them waits for this
            // decision (and sees it).
            let sha256: Option<String> = sqlx::query_scalar(Db::pick(
                "SELECT sha256 FROM statistics WHERE id = $1 AND model_id = $2",
                "SELECT sha256 FROM statistics WHERE id = $1 AND model_id = $2 FOR UPDATE",
            ))
            .bind(id)
            .bind(model_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(sha256) = sha256 else {
                return Ok(DeleteOutcome::NotFound);
            };
            let active: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs
                 WHERE statistics_id = $1 AND status IN ('queued', 'running')",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            if active > 0 {
                return Ok(DeleteOutcome::InUse);
            }
            sqlx::query("DELETE FROM statistics WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let unreferenced_blobs = Db::unreferenced(&mut *tx, vec![sha256]).await?;
            tx.commit().await?;
            Ok(DeleteOutcome::Deleted { unreferenced_blobs })
        })
    }
}
