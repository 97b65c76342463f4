//! Several processes on one PostgreSQL database: a job queued through one
//! is claimed at once by another's idle worker, and a cancel sent through
//! one stops the job where it runs, both through `LISTEN/NOTIFY` rather
//! than polling. Each replica has a data directory of its own (one process
//! per data directory), and the model is uploaded to both, so each has the
//! blobs a job is laid out from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use modelpress::store::testing::{postgres_url_or_skip, TestDatabase};

use crate::helpers::{id, layered_model, spawn_app_on, tiny_model, Database, TestApp};

/// An idle worker's poll when nothing wakes it, in the replica that runs
/// the jobs: far longer than any bound below, so only a notification can
/// explain a prompt claim or stop.
const IDLE_POLL_MS: &str = "30000";
/// Renewed every third of it: the other path a cancel reaches a running
/// job by, kept far longer than the bound below.
const LEASE_MS: &str = "120000";
/// What "at once" means here, with a wide margin for a loaded machine:
/// a third of the poll interval and of the renewal period.
const PROMPT: Duration = Duration::from_secs(10);

/// A replica that only serves the API, and one that runs the jobs, on a
/// database of their own; the worker of the second is idle when this
/// returns. `None`, saying so, without a PostgreSQL server.
async fn replicas(test: &str, runner_flags: &[&str]) -> Option<(TestApp, TestApp)> {
    let url = postgres_url_or_skip(test)?;
    let database = Database::Postgres(Arc::new(TestDatabase::create(&url).await));
    let api = spawn_app_on(database.clone(), &["--workers", "0"]).await;
    let mut flags = vec!["--workers", "1", "--idle-poll-ms", IDLE_POLL_MS];
    flags.extend_from_slice(runner_flags);
    let runner = spawn_app_on(database, &flags).await;
    // Its worker has looked for a job once, found none, and now waits for
    // a wake-up or the end of its 30 s poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Some((api, runner))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_through_one_replica_is_claimed_at_once_by_another() {
    let Some((api, runner)) = replicas(
        "a_job_queued_through_one_replica_is_claimed_at_once_by_another",
        &[],
    )
    .await
    else {
        return;
    };
    let bytes = tiny_model(51);
    let model = api.upload_model(bytes.clone()).await;
    runner.upload_model(bytes).await;

    let submitted = Instant::now();
    let job = api.submit(id(&model), "int8", "packed").await;
    let claimed = api
        .wait_for(id(&job), "claimed", |j| j["status"] != "queued")
        .await;
    let waited = submitted.elapsed();
    assert!(
        waited < PROMPT,
        "claimed after {waited:?}, as if by the {IDLE_POLL_MS} ms poll: {claimed}"
    );
    // Run by the other replica, from its own copy of the model.
    let done = api.wait_succeeded(id(&job)).await;
    assert_eq!(done["attempts"], 1, "{done}");
    assert!(runner.tmp_entries().is_empty());

    api.stop().await;
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_through_one_replica_stops_the_job_on_another_at_once() {
    // Each tensor is followed by a long pause, so the job's progress, and
    // with it the lease renewal that would also carry the cancel, stays
    // put while the cancel travels.
    let Some((api, runner)) = replicas(
        "a_cancel_sent_through_one_replica_stops_the_job_on_another_at_once",
        &["--lease-ms", LEASE_MS, "--tensor-delay-ms", "120000"],
    )
    .await
    else {
        return;
    };
    let bytes = layered_model(52, 4);
    let model = api.upload_model(bytes.clone()).await;
    runner.upload_model(bytes).await;

    let job = api.submit(id(&model), "int8", "packed").await;
    api.wait_for(id(&job), "running with progress", |j| {
        j["status"] == "running" && j["progress"]["tensors_done"].as_i64().unwrap_or(0) >= 1
    })
    .await;

    let asked = Instant::now();
    let resp = api.post(&format!("/v1/jobs/{}/cancel", id(&job))).await;
    assert_eq!(resp.status(), 202);
    let stopped = api.wait_finished(id(&job)).await;
    let waited = asked.elapsed();
    assert_eq!(stopped["status"], "canceled", "{stopped}");
    assert!(
        waited < PROMPT,
        "stopped {waited:?} after the cancel, as if at a lease renewal: {stopped}"
    );
    assert!(
        stopped["progress"]["tensors_done"].as_i64().unwrap() < 4,
        "stopped early: {stopped}"
    );
    assert!(stopped["artifacts"].as_array().unwrap().is_empty());
    assert!(
        runner.tmp_entries().is_empty(),
        "{:?}",
        runner.tmp_entries()
    );

    api.stop().await;
    runner.stop().await;
}
