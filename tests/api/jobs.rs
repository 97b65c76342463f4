use std::sync::atomic::AtomicBool;

use serde_json::{json, Value};

use crate::common;
use crate::helpers::{
    artifact, assert_error, id, layered_model, spawn_app, spawn_app_with, tiny_model, TestApp,
};

async fn run_to_success(app: &TestApp, model: &str, preset: &str, format: &str) -> Value {
    let job = app.submit(model, preset, format).await;
    assert_eq!(job["status"], "queued");
    app.wait_succeeded(id(&job)).await
}

#[tokio::test]
async fn a_job_runs_for_each_output_format_and_its_artifacts_download() {
    let app = spawn_app().await;
    let model = app.upload_model(tiny_model(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut downloaded = std::collections::HashMap::new();
    for (preset, format) in [
        ("int8", "dense"),
        ("int8", "packed"),
        ("int8", "compressed-tensors"),
    ] {
        let job = run_to_success(&app, id(&model), preset, format).await;
        assert_eq!(job["output"]["format"], format);
        assert_eq!(job["attempts"], 1);
        assert_eq!(job["progress"]["fraction"], 1.0);
        assert_eq!(
            job["progress"]["tensors_done"],
            job["progress"]["tensors_total"]
        );
        assert!(job["error"].is_null());
        let summary = &job["summary"];
        if format != "dense" {
            assert!(summary["ratio"].as_f64().unwrap() > 3.0, "{job}");
            assert!(
                summary["bytes_before"].as_i64().unwrap()
                    > summary["bytes_after"].as_i64().unwrap()
            );
        }
        assert!(summary["duration_seconds"].as_f64().unwrap() >= 0.0);
        assert!(job["finished_at"].is_string() && job["started_at"].is_string());

        let weights = app.download(artifact(&job, "model.safetensors")).await;
        let path = dir.path().join(format!("{format}.safetensors"));
        std::fs::write(&path, &weights).unwrap();
        assert!(
            !common::read(&path).is_empty(),
            "{format} opens in the reference reader"
        );
        downloaded.insert(format, path);

        let report = app.get_json(job["report_url"].as_str().unwrap()).await;
        assert_eq!(report["format"], format);
        assert_eq!(report["tensors"].as_array().unwrap().len(), 4);
        if format == "compressed-tensors" {
            let config = app.download(artifact(&job, "config.json")).await;
            let config: Value = serde_json::from_slice(&config).unwrap();
            assert!(config["quantization_config"].is_object());
        }
    }
    // The packed artifact decompresses to exactly the dense one.
    let restored = dir.path().join("restored");
    modelpress::run::decompress(
        &downloaded["packed"],
        &restored,
        &modelpress::run::Silent,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(restored.join("model.safetensors")).unwrap(),
        std::fs::read(&downloaded["dense"]).unwrap()
    );
    assert!(app.tmp_entries().is_empty());
}

#[tokio::test]
async fn an_artifact_is_served_in_ranges_and_revalidated_by_etag() {
    let app = spawn_app().await;
    let model = app.upload_model(tiny_model(11)).await;
    let job = run_to_success(&app, id(&model), "int8", "dense").await;
    let a = artifact(&job, "model.safetensors");
    let url = app.url(a["url"].as_str().unwrap());
    let whole = app.download(a).await;
    let len = whole.len();

    let resp = app
        .client
        .get(&url)
        .header("range", "bytes=8-99")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 8-99/{len}").as_str()
    );
    assert_eq!(resp.headers()["content-length"], "92");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &whole[8..100]);

    let resp = app
        .client
        .get(&url)
        .header("range", "bytes=-16")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &whole[len - 16..]);

    let resp = app
        .client
        .get(&url)
        .header("range", format!("bytes={len}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{len}").as_str()
    );
    assert_error(resp, 416, "range_not_satisfiable").await;

    let etag = format!("\"{}\"", a["sha256"].as_str().unwrap());
    let resp = app
        .client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);

    let resp = app.client.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], len.to_string().as_str());
}

#[tokio::test]
async fn a_pipeline_that_does_not_fit_is_refused_with_422_naming_the_stage() {
    let app = spawn_app().await;
    let model = app.upload_model(tiny_model(12)).await;
    let m = id(&model);

    let resp = app
        .post_job(&json!({"model_id": m, "preset": "no-such"}))
        .await;
    let message = assert_error(resp, 422, "unknown_preset").await;
    assert!(message.contains("int8"), "{message}");

    // Sharing and quantizing the same tensor.
    let resp = app
        .post_job(&json!({"model_id": m, "pipeline": {"stages": [
        {"stage": "share", "clusters": 16},
        {"stage": "quantize", "bits": 8}]}}))
        .await;
    let message = assert_error(resp, 422, "invalid_pipeline").await;
    assert!(
        message.contains("stage 1") && message.contains("quantize"),
        "{message}"
    );

    // A group size that does not divide the tensors (checked against the model).
    let resp = app
        .post_job(&json!({"model_id": m, "pipeline": {"stages": [
        {"stage": "quantize", "bits": 4, "granularity": "group", "group_size": 48}]}}))
        .await;
    let message = assert_error(resp, 422, "invalid_pipeline").await;
    assert!(
        message.contains("stage 0") && message.contains("48"),
        "{message}"
    );

    // Not expressible as compressed-tensors.
    let resp = app.post_job(&json!({"model_id": m, "preset": "deep-compression", "output": {"format": "compressed-tensors"}})).await;
    assert_error(resp, 422, "unsupported_by_format").await;

    let resp = app
        .post_job(&json!({"model_id": m, "preset": "int8", "output": {"format": "zip"}}))
        .await;
    assert_error(resp, 422, "invalid_output_format").await;
    let resp = app.post_job(&json!({"model_id": m})).await;
    assert_error(resp, 422, "invalid_pipeline").await;
    let resp = app
        .post_job(&json!({"model_id": m, "preset": "int8", "webhook_url": "ftp://x"}))
        .await;
    assert_error(resp, 422, "invalid_webhook_url").await;
    let resp = app
        .post_job(&json!({"model_id": "nope", "preset": "int8"}))
        .await;
    assert_error(resp, 422, "model_not_found").await;
    let resp = app
        .post_job(&json!({"model_id": m, "preset": "int8", "colour": "red"}))
        .await;
    assert_error(resp, 422, "invalid_body").await;

    assert!(app.get_json("/v1/jobs").await["items"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn missing_things_are_404_and_unfinished_things_are_409() {
    let app = spawn_app_with(&["--workers", "1", "--tensor-delay-ms", "100"]).await;
    assert_error(app.get("/v1/jobs/nope").await, 404, "not_found").await;
    assert_error(app.get("/v1/models/nope").await, 404, "not_found").await;
    assert_error(app.get("/v1/models/nope/tensors").await, 404, "not_found").await;
    assert_error(app.get("/v1/jobs/nope/report").await, 404, "not_found").await;
    assert_error(
        app.get("/v1/jobs/nope/artifacts/model.safetensors").await,
        404,
        "not_found",
    )
    .await;
    let resp = app.post("/v1/jobs/nope/cancel").await;
    assert_error(resp, 404, "not_found").await;
    let resp = app.delete("/v1/jobs/nope").await;
    assert_error(resp, 404, "not_found").await;

    let model = app.upload_model(layered_model(13, 6)).await;
    let job = app.submit(id(&model), "int8", "packed").await;
    let j = id(&job);
    // Before it succeeded: no artifacts, no report, no deleting.
    let resp = app
        .get(&format!("/v1/jobs/{j}/artifacts/model.safetensors"))
        .await;
    assert_error(resp, 409, "job_not_succeeded").await;
    assert_error(
        app.get(&format!("/v1/jobs/{j}/report")).await,
        409,
        "job_not_succeeded",
    )
    .await;
    let resp = app.delete(&format!("/v1/jobs/{j}")).await;
    assert_error(resp, 409, "job_not_finished").await;
    let resp = app.delete(&format!("/v1/models/{}", id(&model))).await;
    assert_error(resp, 409, "model_in_use").await;

    let done = app.wait_succeeded(j).await;
    let resp = app.post(&format!("/v1/jobs/{j}/cancel")).await;
    assert_error(resp, 409, "job_finished").await;
    assert_error(
        app.get(&format!("/v1/jobs/{j}/artifacts/nothing.bin"))
            .await,
        404,
        "not_found",
    )
    .await;

    // Finished: the job and then the model can go, and their blobs with them.
    let blobs_before = app.blob_count();
    assert_eq!(
        blobs_before,
        1 + done["artifacts"].as_array().unwrap().len()
    );
    let resp = app.delete(&format!("/v1/jobs/{j}")).await;
    assert_eq!(resp.status(), 204);
    assert_error(app.get(&format!("/v1/jobs/{j}")).await, 404, "not_found").await;
    let resp = app.delete(&format!("/v1/models/{}", id(&model))).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(app.blob_count(), 0);
}

#[tokio::test]
async fn a_queued_job_is_canceled_at_once_and_a_running_one_at_the_next_tensor() {
    let app = spawn_app_with(&["--workers", "1", "--tensor-delay-ms", "150"]).await;
    let model = app.upload_model(layered_model(14, 8)).await;
    let running = app.submit(id(&model), "int8", "packed").await;
    let queued = app.submit(id(&model), "int8", "dense").await;
    let running = app
        .wait_for(id(&running), "running with progress", |j| {
            j["status"] == "running" && j["progress"]["tensors_done"].as_i64().unwrap_or(0) >= 1
        })
        .await;
    assert_eq!(running["progress"]["stage"], "compress");
    assert_eq!(running["progress"]["tensors_total"], 8);
    assert!(running["progress"]["fraction"].as_f64().unwrap() > 0.0);

    // The second job waits behind the first on the only worker.
    let resp = app.post(&format!("/v1/jobs/{}/cancel", id(&queued))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "canceled");
    assert_eq!(body["attempts"], 0);

    let resp = app.post(&format!("/v1/jobs/{}/cancel", id(&running))).await;
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["cancel_requested"], true);
    let stopped = app.wait_finished(id(&running)).await;
    assert_eq!(stopped["status"], "canceled", "{stopped}");
    assert!(
        stopped["progress"]["tensors_done"].as_i64().unwrap() < 8,
        "stopped early: {stopped}"
    );
    assert!(stopped["artifacts"].as_array().unwrap().is_empty());
    assert_eq!(
        app.blob_count(),
        1,
        "only the model: no partial output was kept"
    );
    assert!(app.tmp_entries().is_empty(), "{:?}", app.tmp_entries());
}

#[tokio::test]
async fn the_same_idempotency_key_and_body_give_the_same_job() {
    let app = spawn_app().await;
    let model = app.upload_model(tiny_model(15)).await;
    let body = json!({"model_id": id(&model), "preset": "int8", "labels": {"run": 1}});
    let send = |body: Value, key: &'static str| {
        let app = &app;
        async move {
            app.client
                .post(app.url("/v1/jobs"))
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let first = send(body.clone(), "k-1").await;
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].to_str().unwrap().to_string();
    let first: Value = first.json().await.unwrap();
    let again = send(body.clone(), "k-1").await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["location"].to_str().unwrap(), location);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);

    let other = json!({"model_id": id(&model), "preset": "int4-g128"});
    assert_error(send(other, "k-1").await, 409, "idempotency_key_reused").await;
    let fresh: Value = send(body, "k-2").await.json().await.unwrap();
    assert_ne!(fresh["id"], first["id"]);
    assert_eq!(
        app.get_json("/v1/jobs").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_on_four_workers_each_run_exactly_once() {
    let app = spawn_app_with(&["--workers", "4"]).await;
    let model = app.upload_model(layered_model(16, 2)).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        let preset = if i % 2 == 0 { "int8" } else { "binary" };
        ids.push(id(&app.submit(id(&model), preset, "packed").await).to_string());
    }
    for j in &ids {
        let job = app.wait_succeeded(j).await;
        assert_eq!(job["attempts"], 1, "claimed once: {job}");
    }
    let listed = app
        .get_json(&format!(
            "/v1/jobs?status=succeeded&model_id={}&limit=200",
            id(&model)
        ))
        .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 50);
    assert!(app.get_json("/v1/jobs?status=queued").await["items"]
        .as_array()
        .unwrap()
        .is_empty());

    // Pages of 20 cover the list once, newest first.
    let seen = app.all_pages("/v1/jobs", 20).await;
    ids.reverse();
    assert_eq!(seen, ids);

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("modelpress_jobs{scope=\"database\",status=\"succeeded\"} 50"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelpress_queue_depth{scope=\"database\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelpress_job_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelpress_bytes_uploaded_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelpress_bytes_written_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_graceful_stop_lets_a_running_job_finish() {
    let app = spawn_app_with(&["--workers", "1", "--tensor-delay-ms", "50"]).await;
    let model = app.upload_model(layered_model(17, 6)).await;
    let job = app.submit(id(&model), "int8", "packed").await;
    let job_id = id(&job).to_string();
    app.wait_for(&job_id, "running", |j| j["status"] == "running")
        .await;
    let again = app.stop().await.restart(&[]).await;
    let job = again.job(&job_id).await;
    assert_eq!(
        job["status"], "succeeded",
        "finished before the stop completed: {job}"
    );
    assert_eq!(job["attempts"], 1);
}

#[tokio::test]
async fn a_stop_past_the_grace_period_queues_the_running_job_again() {
    let app = spawn_app_with(&[
        "--workers",
        "1",
        "--tensor-delay-ms",
        "300",
        "--shutdown-grace-seconds",
        "0",
    ])
    .await;
    let model = app.upload_model(layered_model(18, 8)).await;
    let job = app.submit(id(&model), "int8", "packed").await;
    let job_id = id(&job).to_string();
    app.wait_for(&job_id, "running", |j| j["status"] == "running")
        .await;
    let again = app.stop().await.restart(&[]).await;
    let job = again.wait_succeeded(&job_id).await;
    assert_eq!(
        job["attempts"], 1,
        "an interrupted attempt does not count: {job}"
    );
}

#[tokio::test]
async fn a_job_that_fails_is_recorded_with_its_error_and_the_worker_goes_on() {
    let app = spawn_app_with(&["--workers", "1", "--tensor-delay-ms", "50"]).await;
    let slow_model = app.upload_model(layered_model(19, 6)).await;
    let broken = app.upload_model(tiny_model(50)).await;
    let good = app.upload_model(tiny_model(51)).await;
    // The only worker is busy, so the next jobs wait in the queue.
    let slow = app.submit(id(&slow_model), "int8", "packed").await;
    app.wait_for(id(&slow), "running", |j| j["status"] == "running")
        .await;
    let failing = app.submit(id(&broken), "int8", "packed").await;
    let next = app.submit(id(&good), "int8", "packed").await;
    // Its stored file is damaged behind the service's back after it was
    // accepted, before a worker takes it.
    let sha = broken["files"][0]["sha256"].as_str().unwrap();
    for file in app.files_of_blob(sha) {
        std::fs::write(&file, b"no longer a checkpoint").unwrap();
    }
    assert_eq!(app.job(id(&failing)).await["status"], "queued");

    let failed = app.wait_finished(id(&failing)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let code = failed["error"]["code"].as_str().unwrap();
    let message = failed["error"]["message"].as_str().unwrap();
    assert_eq!(code, "invalid_safetensors", "{failed}");
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(
        !message.contains(app.data_dir.to_str().unwrap()),
        "no server paths: {message}"
    );
    assert!(failed["artifacts"].as_array().unwrap().is_empty());
    assert_error(
        app.get(&format!("/v1/jobs/{}/report", id(&failing))).await,
        409,
        "job_not_succeeded",
    )
    .await;

    // The same worker goes on with the next job.
    app.wait_succeeded(id(&slow)).await;
    app.wait_succeeded(id(&next)).await;
    assert!(app.tmp_entries().is_empty(), "{:?}", app.tmp_entries());
}

#[tokio::test]
async fn artifact_names_are_percent_encoded_in_urls_and_dispositions() {
    use reqwest::multipart::{Form, Part};
    let app = spawn_app().await;
    let mut rng = common::Rng::new(70);
    let shards = ["a?x=1.safetensors", "b#c d.safetensors"];
    let shard1 = crate::helpers::safetensors_bytes(&[common::gaussian(
        "a.weight",
        &[16, 16],
        0.05,
        &mut rng,
    )]);
    let shard2 = crate::helpers::safetensors_bytes(&[common::gaussian(
        "b.weight",
        &[16, 16],
        0.05,
        &mut rng,
    )]);
    let index = json!({"weight_map": {"a.weight": shards[0], "b.weight": shards[1]}});
    let form = Form::new()
        .part("file", Part::bytes(shard1).file_name(shards[0]))
        .part("file", Part::bytes(shard2).file_name(shards[1]))
        .part(
            "file",
            Part::bytes(index.to_string().into_bytes()).file_name("model.safetensors.index.json"),
        );
    let resp = app.upload_form(form).await;
    assert_eq!(resp.status(), 201);
    let model: Value = resp.json().await.unwrap();
    let job = run_to_success(&app, id(&model), "int8", "dense").await;
    let a = artifact(&job, shards[0]);
    assert_eq!(
        a["url"],
        format!("/v1/jobs/{}/artifacts/a%3Fx%3D1.safetensors", id(&job))
    );
    let b = artifact(&job, shards[1]);
    assert_eq!(
        b["url"],
        format!("/v1/jobs/{}/artifacts/b%23c%20d.safetensors", id(&job))
    );
    for art in [a, b] {
        app.download(art).await;
    }
    let resp = app.get(a["url"].as_str().unwrap()).await;
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename=\"a?x=1.safetensors\"; filename*=UTF-8''a%3Fx%3D1.safetensors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_job_while_its_model_is_deleted_is_decided_one_way_or_the_other() {
    let app = spawn_app().await;
    let (mut jobs_won, mut deletes_won) = (0, 0);
    let mut accepted = Vec::new();
    for round in 0..120u64 {
        let model = app.upload_model(tiny_model(1000 + round)).await;
        let model_id = id(&model).to_string();
        let body = json!({"model_id": model_id, "preset": "int8"});
        let path = format!("/v1/models/{model_id}");
        let (created, deleted) = tokio::join!(app.post_job(&body), app.delete(&path));
        let (created_status, deleted_status) = (created.status(), deleted.status());
        let body: Value = created.json().await.unwrap();
        match (created_status.as_u16(), deleted_status.as_u16()) {
            // The job came first: the delete waits for it, unless it already
            // finished.
            (202, 409 | 204) => {
                jobs_won += 1;
                accepted.push(id(&body).to_string());
            }
            (422, 204) => {
                assert_eq!(body["error"]["code"], "model_not_found", "{body}");
                deletes_won += 1;
            }
            other => panic!("round {round}: {other:?}, {body}"),
        }
    }
    for job in &accepted {
        let done = app.wait_finished(job).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    assert_eq!(jobs_won + deletes_won, 120);
    // Both outcomes happen, or the race was not exercised.
    eprintln!("jobs first: {jobs_won}, deletes first: {deletes_won}");
}
