//! What the store does differently on SQLite and on PostgreSQL, beyond
//! the SQL both run.

use super::{StoreError, REFERENCES_OF_BLOB};

/// A database the store runs on.
pub(super) trait Dialect: sqlx::Database {
    /// Of a statement written for each database, this one's.
    fn pick(sqlite: &'static str, postgres: &'static str) -> &'static str;

    /// A transaction for a change that reads before it writes.
    async fn begin_write(
        pool: &sqlx::Pool<Self>,
    ) -> Result<sqlx::Transaction<'static, Self>, sqlx::Error>;

    /// Tells every process listening on `channel` (PostgreSQL's `NOTIFY`,
    /// sent when the transaction commits, not at all if it rolls back).
    /// Nothing on SQLite: one process per database, told in process.
    async fn notify(
        conn: &mut Self::Connection,
        channel: &str,
        payload: &str,
    ) -> Result<(), sqlx::Error>;

    /// Of `candidates`, those that nothing in the database refers to any
    /// more.
    async fn unreferenced(
        conn: &mut Self::Connection,
        candidates: Vec<String>,
    ) -> Result<Vec<String>, StoreError>;
}

/// The body of [`Dialect::unreferenced`], the same SQL on both databases.
macro_rules! unreferenced_body {
    ($conn:ident, $candidates:ident) => {{
        let mut out = Vec::new();
        for sha in $candidates {
            let n: i64 = sqlx::query_scalar(REFERENCES_OF_BLOB)
                .bind(&sha)
                .fetch_one(&mut *$conn)
                .await?;
            if n == 0 && !out.contains(&sha) {
                out.push(sha);
            }
        }
        Ok(out)
    }};
}

impl Dialect for sqlx::Sqlite {
    fn pick(sqlite: &'static str, _postgres: &'static str) -> &'static str {
        sqlite
    }

    /// Takes the write lock at once: a deferred transaction that reads
    /// first could find, when it comes to write, that another writer
    /// committed in between, and SQLite would refuse it without waiting.
    /// Writers are serialized, so what such a transaction read still holds
    /// when it writes.
    async fn begin_write(
        pool: &sqlx::Pool<Self>,
    ) -> Result<sqlx::Transaction<'static, Self>, sqlx::Error> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn notify(
        _conn: &mut Self::Connection,
        _channel: &str,
        _payload: &str,
    ) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn unreferenced(
        conn: &mut Self::Connection,
        candidates: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        unreferenced_body!(conn, candidates)
    }
}

impl Dialect for sqlx::Postgres {
    fn pick(_sqlite: &'static str, postgres: &'static str) -> &'static str {
        postgres
    }

    /// READ COMMITTED: writers run concurrently, so a transaction that
    /// decides on a row it read locks that row (`FOR SHARE` / `FOR UPDATE`
    /// in the statements picked for PostgreSQL).
    async fn begin_write(
        pool: &sqlx::Pool<Self>,
    ) -> Result<sqlx::Transaction<'static, Self>, sqlx::Error> {
        pool.begin().await
    }

    async fn notify(
        conn: &mut Self::Connection,
        channel: &str,
        payload: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn unreferenced(
        conn: &mut Self::Connection,
        candidates: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        unreferenced_body!(conn, candidates)
    }
}
