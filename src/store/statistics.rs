//! Calibration statistics uploaded for a model, each a blob.

use super::{now_ms, unreferenced, DeleteOutcome, Store, StoreError};

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
        let mut tx = self.write_tx().await?;
        let model: Option<String> = sqlx::query_scalar("SELECT id FROM models WHERE id = ?")
            .bind(&new.model_id)
            .fetch_optional(&mut *tx)
            .await?;
        if model.is_none() {
            return Ok(None);
        }
        let record: StatisticsRecord = sqlx::query_as(
            "INSERT INTO statistics (id, model_id, sha256, bytes, tensors, has_xtx, tokens,
                                     created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(new.model_id)
        .bind(new.sha256)
        .bind(new.bytes)
        .bind(new.tensors)
        .bind(new.has_xtx)
        .bind(new.tokens)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(record))
    }

    /// The statistics `id` of the model `model_id`.
    pub async fn get_statistics(
        &self,
        model_id: &str,
        id: &str,
    ) -> Result<Option<StatisticsRecord>, StoreError> {
        Ok(
            sqlx::query_as("SELECT * FROM statistics WHERE id = ? AND model_id = ?")
                .bind(id)
                .bind(model_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// A model's statistics, newest first, after `cursor` (an id) if given.
    pub async fn list_statistics(
        &self,
        model_id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<StatisticsRecord>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT * FROM statistics WHERE model_id = ?1 AND (?2 IS NULL OR id < ?2)
             ORDER BY id DESC LIMIT ?3",
        )
        .bind(model_id)
        .bind(cursor)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes statistics unless a queued or running job uses them.
    pub async fn delete_statistics(
        &self,
        model_id: &str,
        id: &str,
    ) -> Result<DeleteOutcome, StoreError> {
        let mut tx = self.write_tx().await?;
        let sha256: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM statistics WHERE id = ? AND model_id = ?")
                .bind(id)
                .bind(model_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(sha256) = sha256 else {
            return Ok(DeleteOutcome::NotFound);
        };
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs
             WHERE statistics_id = ? AND status IN ('queued', 'running')",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 {
            return Ok(DeleteOutcome::InUse);
        }
        sqlx::query("DELETE FROM statistics WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let unreferenced_blobs = unreferenced(&mut tx, vec![sha256]).await?;
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted { unreferenced_blobs })
    }
}
