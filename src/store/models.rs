//! Uploaded models and the files they are made of.

use super::{now_ms, DeleteOutcome, Dialect, Store, StoreError};

/// A model as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModelRecord {
    pub id: String,
    pub name: Option<String>,
    pub version: Option<String>,
    /// A JSON object.
    pub labels: String,
    pub total_bytes: i64,
    pub tensor_count: i64,
    pub parameter_count: i64,
    /// A JSON array: `[{name, dtype, shape, bytes, file}]`.
    pub tensors: String,
    pub created_at: i64,
}

/// One file of a model, stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ModelFile {
    pub name: String,
    pub sha256: String,
    pub bytes: i64,
}

/// A model to record; its files are already blobs.
#[derive(Debug, Clone)]
pub struct NewModel {
    pub name: Option<String>,
    pub version: Option<String>,
    pub labels: String,
    pub total_bytes: i64,
    pub tensor_count: i64,
    pub parameter_count: i64,
    pub tensors: String,
    pub files: Vec<ModelFile>,
}

impl Store {
    pub async fn insert_model(&self, model: NewModel) -> Result<ModelRecord, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            let record: ModelRecord = sqlx::query_as(
                "INSERT INTO models (id, name, version, labels, total_bytes, tensor_count,
                                     parameter_count, tensors, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
            )
            .bind(&id)
            .bind(&model.name)
            .bind(&model.version)
            .bind(&model.labels)
            .bind(model.total_bytes)
            .bind(model.tensor_count)
            .bind(model.parameter_count)
            .bind(&model.tensors)
            .bind(now_ms())
            .fetch_one(&mut *tx)
            .await?;
            for f in &model.files {
                sqlx::query(
                    "INSERT INTO model_files (model_id, name, sha256, bytes)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&id)
                .bind(&f.name)
                .bind(&f.sha256)
                .bind(f.bytes)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(record)
        })
    }

    pub async fn get_model(&self, id: &str) -> Result<Option<ModelRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as("SELECT * FROM models WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        }))
    }

    pub async fn model_files(&self, id: &str) -> Result<Vec<ModelFile>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as(
                "SELECT name, sha256, bytes FROM model_files WHERE model_id = $1 ORDER BY name",
            )
            .bind(id)
            .fetch_all(pool)
            .await?
        }))
    }

    /// The files of several models in one query: model id → its files,
    /// by name. A model without files is absent.
    pub async fn files_of_models(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, Vec<ModelFile>>, StoreError> {
        let ids = serde_json::to_string(ids).expect("strings serialize");
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, |pool: Db| {
            sqlx::query_as(Db::pick(
                "SELECT model_id, name, sha256, bytes FROM model_files
                 WHERE model_id IN (SELECT value FROM json_each($1)) ORDER BY model_id, name",
                "SELECT model_id, name, sha256, bytes FROM model_files
                 WHERE model_id IN (SELECT json_array_elements_text($1::json))
                 ORDER BY model_id, name",
            ))
            .bind(&ids)
            .fetch_all(pool)
            .await?
        });
        let mut out: std::collections::HashMap<String, Vec<ModelFile>> = Default::default();
        for (model_id, name, sha256, bytes) in rows {
            out.entry(model_id).or_default().push(ModelFile {
                name,
                sha256,
                bytes,
            });
        }
        Ok(out)
    }

    /// Models, newest first, after the model `cursor` (its id) if given.
    pub async fn list_models(
        &self,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<ModelRecord>, StoreError> {
        Ok(on_pool!(self, |pool: Db| {
            sqlx::query_as(
                "SELECT * FROM models WHERE ($1 IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
            )
            .bind(cursor)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        }))
    }

    /// Deletes a model, and its statistics, unless a queued or running job
    /// uses it.
    pub async fn delete_model(&self, id: &str) -> Result<DeleteOutcome, StoreError> {
        on_pool!(self, |pool: Db| {
            let mut tx = Db::begin_write(pool).await?;
            // Locked until the end: a job queued on the model, or
            // statistics added to it, wait for this decision (and see it).
            let exists: Option<String> = sqlx::query_scalar(Db::pick(
                "SELECT id FROM models WHERE id = $1",
                "SELECT id FROM models WHERE id = $1 FOR UPDATE",
            ))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if exists.is_none() {
                return Ok(DeleteOutcome::NotFound);
            }
            let active: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE model_id = $1 AND status IN ('queued', 'running')",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            if active > 0 {
                return Ok(DeleteOutcome::InUse);
            }
            let mut blobs: Vec<String> =
                sqlx::query_scalar("DELETE FROM model_files WHERE model_id = $1 RETURNING sha256")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            // Its statistics go with it; no queued or running job uses them,
            // since such a job would be a job of this model.
            let statistics: Vec<String> =
                sqlx::query_scalar("DELETE FROM statistics WHERE model_id = $1 RETURNING sha256")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            blobs.extend(statistics);
            sqlx::query("DELETE FROM models WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let unreferenced_blobs = Db::unreferenced(&mut *tx, blobs).await?;
            tx.commit().await?;
            Ok(DeleteOutcome::Deleted { unreferenced_blobs })
        })
    }
}
