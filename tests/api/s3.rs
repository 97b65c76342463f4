//! Blobs in an S3-compatible bucket (a real server, s3s over a directory,
//! in process), whatever `MODELPRESS_TEST_BLOBS` says.

use std::sync::Arc;

use crate::helpers::{
    artifact, assert_error, id, sha256_hex, spawn_app_on_s3, tiny_model, TestApp,
};
use crate::s3_server::S3Server;

async fn range(app: &TestApp, url: &str, spec: &str) -> reqwest::Response {
    app.client
        .get(app.url(url))
        .header("range", spec)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_model_in_a_bucket_is_compressed_and_its_artifacts_download_whole_and_in_ranges() {
    let server = Arc::new(S3Server::start().await);
    let app = spawn_app_on_s3(server.clone(), &[]).await;
    let bytes = tiny_model(70);
    let model = app.upload_model(bytes.clone()).await;
    let sha = model["files"][0]["sha256"].as_str().unwrap();
    assert_eq!(sha, sha256_hex(&bytes));
    // The upload is in the bucket, not under the data directory's blobs/.
    let object = server.object_file(&format!("test/blobs/{}/{sha}", &sha[..2]));
    assert_eq!(std::fs::read(&object).unwrap(), bytes);
    assert!(!app.data_dir.join("blobs").exists());

    let job = app.submit(id(&model), "int8", "packed").await;
    let job = app.wait_succeeded(id(&job)).await;
    let weights = artifact(&job, "model.safetensors");
    let whole = app.download(weights).await;
    let sha = weights["sha256"].as_str().unwrap();
    assert_eq!(sha256_hex(&whole), sha);
    assert!(server
        .object_file(&format!("test/blobs/{}/{sha}", &sha[..2]))
        .is_file());

    let url = format!("/v1/jobs/{}/artifacts/model.safetensors", id(&job));
    let resp = range(&app, &url, "bytes=10-109").await;
    assert_eq!(resp.status(), 206);
    let len = whole.len();
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 10-109/{len}").as_str()
    );
    assert_eq!(resp.headers()["etag"], format!("\"{sha}\"").as_str());
    assert_eq!(resp.bytes().await.unwrap(), &whole[10..110]);
    let resp = range(&app, &url, "bytes=-7").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), &whole[len - 7..]);
    let resp = range(&app, &url, &format!("bytes={len}-")).await;
    assert_error(resp, 416, "range_not_satisfiable").await;
    let resp = app
        .client
        .get(app.url(&url))
        .header("if-none-match", format!("\"{sha}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);

    let report = app.get_json(&format!("/v1/jobs/{}/report", id(&job))).await;
    assert!(
        report["totals"]["ratio"].as_f64().unwrap() > 1.0,
        "{report}"
    );

    // Deleting the job and the model empties the bucket.
    assert_eq!(
        app.delete(&format!("/v1/jobs/{}", id(&job))).await.status(),
        204
    );
    assert_eq!(
        app.delete(&format!("/v1/models/{}", id(&model)))
            .await
            .status(),
        204
    );
    assert_eq!(server.objects(), Vec::<std::path::PathBuf>::new());
}

#[tokio::test]
async fn a_bucket_that_stops_answering_gives_503_and_the_service_recovers() {
    let server = Arc::new(S3Server::start().await);
    let app = spawn_app_on_s3(server.clone(), &[]).await;
    let model = app.upload_model(tiny_model(71)).await;
    let job = app.submit(id(&model), "int8", "packed").await;
    let job = app.wait_succeeded(id(&job)).await;
    let url = format!("/v1/jobs/{}/artifacts/model.safetensors", id(&job));
    assert_eq!(app.get("/readyz").await.status(), 200);

    server.stop();
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("bucket"), "{message}");
    assert_error(app.get(&url).await, 503, "storage_unavailable").await;
    let resp = app.upload_raw(tiny_model(72), "").await;
    assert_error(resp, 503, "storage_unavailable").await;
    assert!(app.tmp_entries().is_empty(), "{:?}", app.tmp_entries());
    // The service itself is alive.
    assert_eq!(app.get("/healthz").await.status(), 200);

    server.restart().await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    let again = app.download(artifact(&job, "model.safetensors")).await;
    assert!(!again.is_empty());
    let model = app.upload_model(tiny_model(72)).await;
    let job = app.submit(id(&model), "int8", "dense").await;
    app.wait_succeeded(id(&job)).await;
}

#[tokio::test]
async fn replicas_sharing_a_bucket_read_each_others_models() {
    if !crate::helpers::on_postgres() {
        modelpress::store::testing::say_skipped(
            "replicas_sharing_a_bucket_read_each_others_models: runs with MODELPRESS_TEST_BACKEND=postgres",
        );
        return;
    }
    let server = Arc::new(S3Server::start().await);
    let database = crate::helpers::Database::for_test().await;
    let api = crate::helpers::spawn_app_on_with_bucket(
        database.clone(),
        server.clone(),
        &["--workers", "0"],
    )
    .await;
    let runner =
        crate::helpers::spawn_app_on_with_bucket(database, server.clone(), &["--workers", "1"])
            .await;
    let model = api.upload_model(tiny_model(73)).await;
    let job = api.submit(id(&model), "int8", "packed").await;
    // Run by the other replica, which never saw the upload.
    let done = runner.wait_succeeded(id(&job)).await;
    let weights = artifact(&done, "model.safetensors");
    let bytes = api.download(weights).await;
    assert_eq!(sha256_hex(&bytes), weights["sha256"].as_str().unwrap());
    let sha = model["files"][0]["sha256"].as_str().unwrap();
    assert!(
        runner.data_dir.join("cache").join(sha).is_file(),
        "the runner fetched the model into its cache"
    );
}
