//! Wake-ups across processes that share a PostgreSQL database: a queued
//! job and a cancel request are announced with `NOTIFY` in the transaction
//! that makes them, and each process listens with one connection.
//!
//! Notifications are a shortcut, never the only path: one sent while a
//! listener was disconnected is lost, so idle workers still poll and a
//! running job still sees a cancel at its next lease renewal. SQLite has
//! one process per database and no notifications.

use sqlx::postgres::PgListener;

use super::{Backend, Store, StoreError};

/// A job was queued (created, or queued again); the payload is its id, or
/// empty when several were.
pub(crate) const JOBS_CHANNEL: &str = "modelpress_jobs";
/// A running job was asked to stop; the payload is its id.
pub(crate) const CANCEL_CHANNEL: &str = "modelpress_cancel";

/// What a listener heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// A job is waiting to be claimed.
    Queued,
    /// This job, if it runs here, should stop.
    CancelRequested(String),
    /// The connection was lost and made again: anything sent meanwhile was
    /// missed.
    Reconnected,
}

/// This process's subscription to the store's notifications.
pub struct JobEvents {
    listener: PgListener,
}

impl std::fmt::Debug for JobEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobEvents").finish_non_exhaustive()
    }
}

impl Store {
    /// Listens for queued jobs and cancel requests on PostgreSQL, on one
    /// connection of the pool (made again when lost); `None` on SQLite.
    /// Once this returns, every later notification is heard.
    pub async fn job_events(&self) -> Result<Option<JobEvents>, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen_all([JOBS_CHANNEL, CANCEL_CHANNEL]).await?;
        Ok(Some(JobEvents { listener }))
    }
}

impl JobEvents {
    /// The next notification. An error (the server unreachable, the pool
    /// closed) leaves the subscription usable: the next call connects
    /// again.
    pub async fn next(&mut self) -> Result<JobEvent, StoreError> {
        loop {
            let Some(n) = self.listener.try_recv().await? else {
                return Ok(JobEvent::Reconnected);
            };
            match n.channel() {
                JOBS_CHANNEL => return Ok(JobEvent::Queued),
                CANCEL_CHANNEL => return Ok(JobEvent::CancelRequested(n.payload().to_string())),
                _ => continue,
            }
        }
    }
}
