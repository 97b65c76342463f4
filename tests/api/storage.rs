//! A full disk, on a real tmpfs: the service answers 507, stays healthy and
//! recovers by itself once space returns.
//!
//! SQLite only: the database file is on the disk that fills up. (On
//! PostgreSQL, the server's own disk-full code, 53100, is recognised as
//! such by `StoreError::storage_fault`.)

use serde_json::json;

use crate::common::{gaussian, Rng};
use crate::helpers::{
    assert_error, id, local_blobs_only, safetensors_bytes, spawn_on, sqlite_only, tiny_model, Tmpfs,
};

#[tokio::test]
async fn a_full_disk_answers_507_and_the_service_recovers_when_space_returns() {
    let test = "a_full_disk_answers_507_and_the_service_recovers_when_space_returns";
    if !sqlite_only(test) || !local_blobs_only(test) {
        return;
    }
    let Some(fs) = Tmpfs::mount(32) else { return };
    let app = spawn_on(&fs.path().join("data"), &[]).await;
    let kept = app.upload_model(tiny_model(1)).await;
    let doomed = app.upload_model(tiny_model(2)).await;
    assert_eq!(app.get("/readyz").await.status(), 200);

    let filler = fs.fill("filler");
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("data directory"), "{message}");
    assert_error(
        app.upload_raw(tiny_model(3), "").await,
        507,
        "insufficient_storage",
    )
    .await;
    assert!(app.tmp_entries().is_empty(), "{:?}", app.tmp_entries());
    assert_error(
        app.post_job(&json!({"model_id": id(&kept), "preset": "int8"}))
            .await,
        507,
        "insufficient_storage",
    )
    .await;
    // A write to the database alone fails too, and must not leave its
    // connection inside the failed transaction.
    let resp = app.delete(&format!("/v1/models/{}", id(&doomed))).await;
    assert_error(resp, 507, "insufficient_storage").await;

    std::fs::remove_file(filler).unwrap();
    assert_eq!(app.get("/readyz").await.status(), 200);
    // More writes than the pool has connections: none meets a poisoned one.
    let mut jobs = Vec::new();
    for seed in 10..30 {
        let model = app.upload_model(tiny_model(seed)).await;
        jobs.push(app.submit(id(&model), "int8", "packed").await);
    }
    for job in &jobs {
        app.wait_succeeded(id(job)).await;
    }
    assert!(app.tmp_entries().is_empty(), "{:?}", app.tmp_entries());
}

#[tokio::test]
async fn a_job_that_runs_out_of_space_fails_with_insufficient_storage_and_leaves_nothing() {
    let test = "a_job_that_runs_out_of_space_fails_with_insufficient_storage_and_leaves_nothing";
    if !sqlite_only(test) || !local_blobs_only(test) {
        return;
    }
    let Some(fs) = Tmpfs::mount(32) else { return };
    let app = spawn_on(&fs.path().join("data"), &[]).await;
    let mut rng = Rng::new(5);
    let tensors: Vec<_> = (0..3)
        .map(|i| gaussian(&format!("l{i}.weight"), &[1024, 1024], 0.05, &mut rng))
        .collect();
    let model = app.upload_model(safetensors_bytes(&tensors)).await;

    // Room for the job to be accepted and claimed, not for its 12 MB output.
    let filler = fs.fill("filler");
    let len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len - (512 << 10))
        .unwrap();
    let job = app.submit(id(&model), "int8", "dense").await;
    let failed = app.wait_finished(id(&job)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "insufficient_storage", "{failed}");
    // Its partial output went with it.
    assert!(app.tmp_entries().is_empty(), "{:?}", app.tmp_entries());

    std::fs::remove_file(filler).unwrap();
    let again = app.submit(id(&model), "int8", "dense").await;
    app.wait_succeeded(id(&again)).await;
}
