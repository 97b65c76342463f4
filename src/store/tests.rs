//! The store's behaviour, checked on SQLite and, where the test server is
//! set (`MODELPRESS_TEST_POSTGRES_URL`), on PostgreSQL: every test of
//! [`on_both_backends!`] runs once per database, as `sqlite::NAME` and
//! `postgres::NAME`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::testing::{postgres_url_or_skip, TestDatabase};
use super::*;
use crate::compress::spec::Pipeline;
use crate::run::OutputFormat;

const INT8: &str = r#"{"stages":[{"stage":"quantize","bits":8}]}"#;

/// What a scratch store lives on; removed when dropped.
#[allow(dead_code)]
enum Scratch {
    Dir(tempfile::TempDir),
    Database(TestDatabase),
}

/// A fresh SQLite store, with the model `m` the jobs below are queued on.
async fn store() -> (Store, Scratch) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::default_url(dir.path())).await.unwrap();
    insert_model_m(&store).await;
    (store, Scratch::Dir(dir))
}

/// The same on a fresh PostgreSQL database, where the test server is set.
async fn pg_store(test: &str) -> Option<(Store, Scratch)> {
    let url = postgres_url_or_skip(&format!("store::tests::postgres::{test}"))?;
    let database = TestDatabase::create(&url).await;
    let store = Store::open(database.url()).await.unwrap();
    insert_model_m(&store).await;
    Some((store, Scratch::Database(database)))
}

async fn insert_model_m(store: &Store) {
    on_pool!(store, |pool: Db| {
        sqlx::query(
            "INSERT INTO models (id, total_bytes, tensor_count, parameter_count, tensors, created_at)
             VALUES ('m', 0, 0, 0, '[]', 0)",
        )
        .execute(pool)
        .await
        .unwrap();
    });
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

/// Defines each `async fn NAME(store: Store)` as it is, and two tests that
/// run it on a fresh store: `sqlite::NAME` and `postgres::NAME` (the
/// latter prints that it is skipped where the test server is not set).
macro_rules! on_both_backends {
    ($(
        $(#[$meta:meta])*
        async fn $name:ident($store:ident: Store) $body:block
    )*) => {
        $(
            $(#[$meta])*
            async fn $name($store: Store) $body
        )*
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let (store, _scratch) = super::store().await;
                    super::$name(store.clone()).await;
                    store.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some((store, _scratch)) = super::pg_store(stringify!($name)).await else {
                        return;
                    };
                    super::$name(store.clone()).await;
                    store.close().await;
                }
            )*
        }
    };
}

on_both_backends! {
    async fn a_corrupt_job_row_is_an_error_naming_the_job_not_a_default(store: Store) {
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
            // Every column good again, then this one bad (PostgreSQL takes
            // one assignment per column and statement).
            on_pool!(store, |pool: Db| {
                sqlx::query(
                    "UPDATE jobs SET pipeline = $2, output_format = 'packed', labels = '{}'
                     WHERE id = $1",
                )
                .bind(&id)
                .bind(INT8)
                .execute(pool)
                .await
                .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE jobs SET {column} = $1 WHERE id = $2"
                )))
                .bind(value)
                .bind(&id)
                .execute(pool)
                .await
                .unwrap();
            });
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
        let status: String = on_pool!(store, |pool: Db| {
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
                .bind(&id)
                .fetch_one(pool)
                .await
                .unwrap()
        });
        assert_eq!(status, "failed");
        assert!(store
            .claim_next_job("w", now_ms() + 60_000)
            .await
            .unwrap()
            .is_none());
    }

    async fn a_job_is_not_queued_for_a_missing_model(store: Store) {
        let mut orphan = job(0);
        orphan.model_id = "gone".into();
        assert!(matches!(
            store.insert_job(orphan).await.unwrap(),
            InsertOutcome::ModelNotFound
        ));
    }

    async fn claims_take_the_highest_priority_then_the_oldest_job_once(store: Store) {
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

    async fn an_expired_lease_is_requeued_and_fails_past_the_retry_limit(store: Store) {
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

    async fn a_worker_that_lost_its_lease_cannot_record_an_outcome(store: Store) {
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

    async fn a_cancel_reaches_a_running_job_through_its_lease_renewal(store: Store) {
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

    /// Claimers race over one queue; each job is held by one claimer at a
    /// time, and every job reaches its end exactly once. Claimers finish,
    /// fail or hand back (as at a shutdown) what they claim, chosen by a
    /// seeded generator, and priorities are mixed.
    async fn concurrent_claimers_never_share_a_job_and_each_job_ends_once(store: Store) {
        const JOBS: usize = 200;
        const CLAIMERS: usize = 8;
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut ids = HashSet::new();
        for _ in 0..JOBS {
            ids.insert(enqueue(&store, (xorshift(&mut rng) % 4) as i64).await);
        }
        let held: Arc<Mutex<HashSet<String>>> = Default::default();
        let ended: Arc<Mutex<Vec<String>>> = Default::default();
        let started = Instant::now();
        let claimers: Vec<_> = (0..CLAIMERS)
            .map(|n| {
                let (store, held, ended) = (store.clone(), held.clone(), ended.clone());
                tokio::spawn(async move {
                    let owner = format!("claimer-{n}");
                    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ (n as u64 + 1);
                    let far = now_ms() + 600_000;
                    while let Some(job) = store.claim_next_job(&owner, far).await.unwrap() {
                        assert_eq!(job.lease_owner.as_deref(), Some(owner.as_str()));
                        assert!(
                            held.lock().unwrap().insert(job.id.clone()),
                            "job {} claimed while another claimer held it",
                            job.id
                        );
                        let roll = xorshift(&mut rng) % 10;
                        // Let go of it in the books before the store does, so
                        // that a claim by another never finds it still held.
                        held.lock().unwrap().remove(&job.id);
                        if roll == 0 {
                            assert!(store.release_job(&job.id, &owner).await.unwrap());
                            continue;
                        }
                        let finished = if roll == 1 {
                            store.finish_failed(&job.id, &owner, "x", "y").await.unwrap()
                        } else {
                            match store
                                .finish_succeeded(&job.id, &owner, &summary(), &[])
                                .await
                                .unwrap()
                            {
                                FinishOutcome::Finished(j) => Some(*j),
                                other => panic!("{other:?}"),
                            }
                        };
                        let finished = finished.expect("the claimer holds the lease");
                        assert!(finished.status.is_finished());
                        ended.lock().unwrap().push(job.id);
                    }
                })
            })
            .collect();
        for c in claimers {
            c.await.unwrap();
        }
        eprintln!(
            "{} store: {JOBS} jobs through {CLAIMERS} claimers in {:.3} s",
            if store.is_shared() { "PostgreSQL" } else { "SQLite" },
            started.elapsed().as_secs_f64()
        );
        let ended = ended.lock().unwrap().clone();
        assert_eq!(ended.len(), JOBS, "every job ended once");
        assert_eq!(ended.iter().cloned().collect::<HashSet<_>>(), ids);
        let counts = store.count_jobs_by_status().await.unwrap();
        let open: i64 = counts
            .iter()
            .filter(|(s, _)| !s.is_finished())
            .map(|c| c.1)
            .sum();
        assert_eq!(open, 0, "{counts:?}");
        for id in &ids {
            let job = store.get_job(id).await.unwrap().unwrap();
            assert_eq!(job.attempts, 1, "a handed-back attempt does not count: {id}");
            assert!(job.lease_owner.is_none());
        }
    }

    /// The lease runs out, another owner claims the job (attempt 2): from
    /// then on nothing the first owner writes is taken.
    async fn a_claim_after_an_expired_lease_fences_off_the_first_owner(store: Store) {
        let id = enqueue(&store, 0).await;
        let first = store.claim_next_job("first", now_ms() - 1).await.unwrap().unwrap();
        assert_eq!(first.attempts, 1);
        let r = store.requeue_abandoned(now_ms(), false, 3).await.unwrap();
        assert_eq!(r.queued, std::slice::from_ref(&id));
        let second = store
            .claim_next_job("second", now_ms() + 60_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((second.id.as_str(), second.attempts), (id.as_str(), 2));

        let progress = ProgressUpdate {
            stage: "late".into(),
            tensors_done: 99,
            tensors_total: 99,
        };
        assert_eq!(
            store
                .renew_lease(&id, "first", now_ms() + 60_000, Some(&progress))
                .await
                .unwrap(),
            LeaseState::Lost
        );
        assert!(matches!(
            store.finish_succeeded(&id, "first", &summary(), &[artifact()]).await.unwrap(),
            FinishOutcome::LeaseLost
        ));
        assert!(store.finish_failed(&id, "first", "x", "y").await.unwrap().is_none());
        assert!(store.finish_canceled(&id, "first").await.unwrap().is_none());
        assert!(!store.release_job(&id, "first").await.unwrap());

        let job = store.get_job(&id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.lease_owner.as_deref(), Some("second"));
        assert_eq!(job.progress_stage, None, "the first owner's progress was not written");
        assert!(store.job_artifacts(&id).await.unwrap().is_empty());
        assert!(!store.blob_is_referenced(&artifact().sha256).await.unwrap());
        // The owner of the lease still can.
        assert!(matches!(
            store.finish_succeeded(&id, "second", &summary(), &[artifact()]).await.unwrap(),
            FinishOutcome::Finished(_)
        ));
        assert_eq!(store.job_artifacts(&id).await.unwrap(), [artifact()]);
    }

    /// What the API reads back: listings with cursors and filters, batched
    /// files and artifacts, deletes and the blobs they free.
    async fn models_jobs_and_their_blobs_read_back_and_delete(store: Store) {
        let new_model = |name: &str, sha: &str| NewModel {
            name: Some(name.into()),
            version: None,
            labels: "{}".into(),
            total_bytes: 10,
            tensor_count: 1,
            parameter_count: 4,
            tensors: "[]".into(),
            files: vec![ModelFile {
                name: "model.safetensors".into(),
                sha256: sha.into(),
                bytes: 10,
            }],
        };
        let a = store.insert_model(new_model("a", "aa")).await.unwrap();
        let b = store.insert_model(new_model("b", "bb")).await.unwrap();
        // Newest first by id; the model `m` sorts after every generated id.
        let ids = |page: Vec<ModelRecord>| page.into_iter().map(|m| m.id).collect::<Vec<_>>();
        let page = store.list_models(2, None).await.unwrap();
        assert_eq!(ids(page), ["m", b.id.as_str()]);
        let next = store.list_models(2, Some(&b.id)).await.unwrap();
        assert_eq!(ids(next), [a.id.as_str()]);
        let files = store.files_of_models(&[&a.id, &b.id, "nope"]).await.unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[&a.id][0].sha256, "aa");

        let id = enqueue(&store, 0).await;
        store.claim_next_job("w", now_ms() + 60_000).await.unwrap().unwrap();
        assert_eq!(store.delete_job(&id).await.unwrap(), DeleteOutcome::InUse);
        store.finish_succeeded(&id, "w", &summary(), &[artifact()]).await.unwrap();
        let arts = store.artifacts_of_jobs(&[&id]).await.unwrap();
        assert_eq!(arts[&id], [artifact()]);
        let succeeded = store
            .list_jobs(&JobFilter {
                status: Some(JobStatus::Succeeded),
                model_id: Some("m".into()),
                limit: 10,
                cursor: None,
            })
            .await
            .unwrap();
        assert_eq!(succeeded.len(), 1);
        let mut referenced = store.referenced_blobs().await.unwrap();
        referenced.sort();
        assert_eq!(referenced, ["aa", "bb", "cc"]);
        assert_eq!(
            store.delete_job(&id).await.unwrap(),
            DeleteOutcome::Deleted {
                unreferenced_blobs: vec!["cc".into()]
            }
        );
        assert_eq!(
            store.delete_model(&a.id).await.unwrap(),
            DeleteOutcome::Deleted {
                unreferenced_blobs: vec!["aa".into()]
            }
        );
        assert_eq!(store.delete_model(&a.id).await.unwrap(), DeleteOutcome::NotFound);
        store.check_writable().await.unwrap();
        store.ping().await.unwrap();
    }

    /// The same idempotency key twice gives the one job; with another
    /// request, a conflict.
    async fn an_idempotency_key_names_one_job(store: Store) {
        let keyed = |hash: &str| {
            let mut j = job(0);
            j.idempotency = Some(("k".into(), hash.into()));
            j
        };
        let InsertOutcome::Created(first) = store.insert_job(keyed("h")).await.unwrap() else {
            panic!("created")
        };
        let InsertOutcome::Existing(again) = store.insert_job(keyed("h")).await.unwrap() else {
            panic!("existing")
        };
        assert_eq!(again.id, first.id);
        assert!(matches!(
            store.insert_job(keyed("other")).await.unwrap(),
            InsertOutcome::KeyConflict
        ));
    }
}

fn summary() -> Summary {
    Summary {
        bytes_before: 1,
        bytes_after: 1,
        ratio: 1.0,
        parameters_kept: 1.0,
        duration_seconds: 0.0,
    }
}

fn artifact() -> NewArtifact {
    NewArtifact {
        name: "model.safetensors".into(),
        sha256: "cc".into(),
        bytes: 3,
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn database_urls_choose_the_backend_by_scheme() {
    assert!(is_postgres_url("postgres://u@h/db"));
    assert!(is_postgres_url("postgresql://u@h/db"));
    assert!(!is_postgres_url("sqlite://data/modelpress.db"));
    assert!(!is_postgres_url("data/modelpress.db"));
}

#[test]
fn an_unreachable_database_is_unavailable_not_a_storage_fault() {
    let refused = StoreError::Database(sqlx::Error::Io(std::io::Error::from(
        std::io::ErrorKind::ConnectionRefused,
    )));
    assert!(refused.is_unavailable());
    assert_eq!(refused.storage_fault(), None);
    assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_unavailable());
    let full = StoreError::Database(sqlx::Error::Io(std::io::Error::from(
        std::io::ErrorKind::StorageFull,
    )));
    assert!(!full.is_unavailable());
    assert_eq!(full.storage_fault(), Some(StorageFault::Full));
}

#[tokio::test]
async fn a_write_postgresql_refuses_as_read_only_is_a_read_only_storage_fault() {
    let Some((store, _scratch)) =
        pg_store("a_write_postgresql_refuses_as_read_only_is_a_read_only_storage_fault").await
    else {
        return;
    };
    let Backend::Postgres(pool) = &store.backend else {
        unreachable!("a PostgreSQL store")
    };
    // What a standby or a database set read-only answers: SQLSTATE 25006.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET default_transaction_read_only = on")
        .execute(&mut *conn)
        .await
        .unwrap();
    let refused = sqlx::query("UPDATE write_probe SET written_at = 1")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    let _ = conn.close().await;
    let e = StoreError::from(refused);
    assert_eq!(e.storage_fault(), Some(StorageFault::ReadOnly), "{e}");
    assert!(!e.is_unavailable());
    store.close().await;
}

/// The blob lock on PostgreSQL holds across processes (here two pools on
/// one database): the second waits until the first is dropped.
#[tokio::test]
async fn the_blob_lock_holds_across_processes_sharing_a_postgres_database() {
    let Some((first, _scratch)) = pg_store("the_blob_lock_holds_across_processes").await else {
        return;
    };
    let Scratch::Database(database) = &_scratch else {
        unreachable!("a PostgreSQL store lives on a database");
    };
    let second = Store::open(database.url()).await.unwrap();
    let held = first.lock_blobs().await.unwrap();
    assert!(held.is_some());
    let waiting = tokio::time::timeout(Duration::from_millis(300), second.lock_blobs()).await;
    assert!(waiting.is_err(), "taken twice at once");
    drop(held);
    let taken = tokio::time::timeout(Duration::from_secs(5), second.lock_blobs())
        .await
        .expect("taken once the first is released")
        .unwrap();
    assert!(taken.is_some());
    // SQLite: one process per database, nothing to take.
    let (sqlite, _dir) = store().await;
    assert!(sqlite.lock_blobs().await.unwrap().is_none());
}
