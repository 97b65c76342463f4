use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

use crate::common::{gaussian, Rng};
use tokio::io::AsyncWriteExt;

use crate::helpers::{
    assert_error, eventually, safetensors_bytes, sha256_hex, spawn_app, spawn_app_with, tiny_model,
};

#[tokio::test]
async fn a_raw_upload_is_stored_and_described() {
    let app = spawn_app().await;
    let bytes = tiny_model(1);
    let resp = app.upload_raw(bytes.clone(), "?name=mlp&version=3").await;
    assert_eq!(resp.status(), 201);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let model: Value = resp.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/models/{}", model["id"].as_str().unwrap())
    );
    assert_eq!(model["name"], "mlp");
    assert_eq!(model["version"], "3");
    assert_eq!(model["tensor_count"], 4);
    assert_eq!(model["parameter_count"], 64 * 64 * 2 + 128);
    assert_eq!(model["total_bytes"], bytes.len());
    assert_eq!(model["files"][0]["name"], "model.safetensors");
    assert_eq!(model["files"][0]["sha256"], sha256_hex(&bytes));

    assert_eq!(app.get_json(&location).await["id"], model["id"]);
    let tensors = app.get_json(&format!("{location}/tensors")).await;
    let tensors = tensors["tensors"].as_array().unwrap();
    let mut names: Vec<&str> = tensors
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["fc1.bias", "fc1.weight", "fc2.weight", "norm.weight"]
    );
    let fc1 = tensors.iter().find(|t| t["name"] == "fc1.weight").unwrap();
    assert_eq!(fc1["shape"], json!([64, 64]));
    assert_eq!(fc1["dtype"], "F32");
    assert_eq!(fc1["bytes"], 64 * 64 * 4);
    assert_eq!(fc1["file"], "model.safetensors");
    assert!(app.tmp_entries().is_empty());
}

#[tokio::test]
async fn a_multipart_upload_larger_than_a_buffered_body_limit_is_streamed() {
    let app = spawn_app().await;
    let bytes = safetensors_bytes(&[gaussian("big.weight", &[1024, 800], 0.05, &mut Rng::new(7))]);
    assert!(bytes.len() > 3 << 20);
    let form = Form::new().part(
        "file",
        Part::bytes(bytes.clone()).file_name("model.safetensors"),
    );
    let resp = app.upload_form(form).await;
    let status = resp.status();
    let model: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{model}");
    assert_eq!(model["files"][0]["sha256"], sha256_hex(&bytes));
}

#[tokio::test]
async fn identical_content_is_stored_once() {
    let app = spawn_app().await;
    let a = app.upload_model(tiny_model(2)).await;
    let b = app.upload_model(tiny_model(2)).await;
    assert_ne!(a["id"], b["id"]);
    assert_eq!(app.blob_count(), 1);
    // Deleting one model keeps the blob the other still uses.
    let resp = app
        .delete(&format!("/v1/models/{}", a["id"].as_str().unwrap()))
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(app.blob_count(), 1);
    let resp = app
        .delete(&format!("/v1/models/{}", b["id"].as_str().unwrap()))
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(app.blob_count(), 0);
}

#[tokio::test]
async fn a_sharded_multipart_upload_with_index_and_config_is_accepted() {
    let app = spawn_app().await;
    let mut rng = Rng::new(3);
    let shard1 = safetensors_bytes(&[gaussian("a.weight", &[32, 32], 0.05, &mut rng)]);
    let shard2 = safetensors_bytes(&[gaussian("b.weight", &[32, 32], 0.05, &mut rng)]);
    let index = json!({"metadata": {}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"}});
    let form = Form::new()
        .part(
            "file",
            Part::bytes(shard1).file_name("model-00001-of-00002.safetensors"),
        )
        .part(
            "file",
            Part::bytes(shard2).file_name("model-00002-of-00002.safetensors"),
        )
        .part(
            "file",
            Part::bytes(index.to_string().into_bytes()).file_name("model.safetensors.index.json"),
        )
        .part(
            "file",
            Part::bytes(br#"{"model_type":"mlp"}"#.to_vec()).file_name("config.json"),
        )
        .text("name", "sharded")
        .text("labels", r#"{"team":"vision"}"#);
    let resp = app.upload_form(form).await;
    let status = resp.status();
    let model: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{model}");
    assert_eq!(model["name"], "sharded");
    assert_eq!(model["labels"], json!({"team": "vision"}));
    assert_eq!(model["files"].as_array().unwrap().len(), 4);
    assert_eq!(model["tensor_count"], 2);

    // The sharded model compresses like any other.
    let job = app
        .submit(model["id"].as_str().unwrap(), "int8", "packed")
        .await;
    let job = app.wait_succeeded(job["id"].as_str().unwrap()).await;
    let names: Vec<&str> = job["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "report.json"
        ]
    );
}

#[tokio::test]
async fn a_truncated_upload_is_rejected_and_nothing_is_stored() {
    let app = spawn_app().await;
    let mut bytes = tiny_model(4);
    bytes.truncate(bytes.len() - 10);
    let message = assert_error(app.upload_raw(bytes, "").await, 400, "invalid_safetensors").await;
    assert!(
        message.contains("fc2.weight") || message.contains("data"),
        "{message}"
    );
    assert!(
        !message.contains(app.data_dir.to_str().unwrap()),
        "no server paths: {message}"
    );
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn an_upload_cut_off_by_its_client_leaves_nothing_behind() {
    let app = spawn_app().await;
    let bytes = tiny_model(8);
    let addr = app.address.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/models HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        bytes.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    conn.flush().await.unwrap();
    eventually("the server starts receiving into tmp/", || {
        !app.tmp_entries().is_empty()
    })
    .await;
    drop(conn);
    eventually("the partial upload is removed from tmp/", || {
        app.tmp_entries().is_empty()
    })
    .await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn a_broken_multipart_body_is_refused_and_nothing_is_stored() {
    let app = spawn_app().await;
    let mut body = b"--XYZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"model.safetensors\"\r\n\r\n".to_vec();
    body.extend_from_slice(&tiny_model(9));
    // No closing boundary: the body ends inside the file part.
    let resp = app
        .client
        .post(app.url("/v1/models"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "invalid_multipart").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn garbage_and_empty_bodies_are_not_safetensors() {
    let app = spawn_app().await;
    for body in [Vec::new(), b"hello world, not a model".to_vec(), {
        let mut b = 1_000_000_000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        b
    }] {
        assert_error(app.upload_raw(body, "").await, 400, "invalid_safetensors").await;
    }
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn an_index_that_disagrees_with_its_shards_is_rejected() {
    let app = spawn_app().await;
    let mut rng = Rng::new(5);
    let shard = safetensors_bytes(&[gaussian("a.weight", &[8, 8], 0.05, &mut rng)]);
    let index = json!({"weight_map": {"a.weight": "model-00001-of-00001.safetensors", "ghost.weight": "model-00001-of-00001.safetensors"}});
    let form = Form::new()
        .part(
            "file",
            Part::bytes(shard).file_name("model-00001-of-00001.safetensors"),
        )
        .part(
            "file",
            Part::bytes(index.to_string().into_bytes()).file_name("model.safetensors.index.json"),
        );
    let resp = app.upload_form(form).await;
    let message = assert_error(resp, 400, "invalid_safetensors").await;
    assert!(message.contains("ghost.weight"), "{message}");
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn files_other_than_checkpoint_files_are_refused() {
    let app = spawn_app().await;
    let form = Form::new().part(
        "file",
        Part::bytes(b"x".to_vec()).file_name("../../etc/passwd"),
    );
    let resp = app.upload_form(form).await;
    assert_error(resp, 400, "unsupported_file").await;
    let form = Form::new()
        .part(
            "file",
            Part::bytes(tiny_model(1)).file_name("model.safetensors"),
        )
        .text("labels", "[1,2]");
    let resp = app.upload_form(form).await;
    assert_error(resp, 400, "invalid_labels").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_with_413_and_nothing_is_kept() {
    let app = spawn_app_with(&["--max-upload-bytes", "20000"]).await;
    let bytes = tiny_model(6);
    assert!(bytes.len() > 20000);
    // Declared too large: refused before reading.
    assert_error(
        app.upload_raw(bytes.clone(), "").await,
        413,
        "payload_too_large",
    )
    .await;
    // Streamed without a length: refused when the limit is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = app
        .client
        .post(app.url("/v1/models"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error(resp, 413, "payload_too_large").await;
    assert!(app.tmp_entries().is_empty());
    // Several multipart files together.
    let half = safetensors_bytes(&[gaussian("a", &[50, 50], 1.0, &mut Rng::new(1))]);
    let form = Form::new()
        .part("file", Part::bytes(half.clone()).file_name("a.safetensors"))
        .part("file", Part::bytes(half.clone()).file_name("b.safetensors"))
        .part("file", Part::bytes(half).file_name("c.safetensors"));
    let resp = app.upload_form(form).await;
    assert_error(resp, 413, "payload_too_large").await;
    app.assert_nothing_stored().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_uploads_are_all_stored() {
    let app = spawn_app().await;
    let uploads = (0..20u64).map(|i| {
        let app = &app;
        // Two copies of each content: the blob store keeps 10.
        async move { app.upload_model(tiny_model(100 + i % 10)).await }
    });
    let models = futures_util::future::join_all(uploads).await;
    let mut ids: Vec<&str> = models.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    assert_eq!(app.model_count().await, 20);
    assert_eq!(app.blob_count(), 10);
    assert!(app.tmp_entries().is_empty());
}

#[tokio::test]
async fn models_are_listed_newest_first_with_a_cursor() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.upload_model(tiny_model(200 + i)).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    ids.reverse();
    let seen = app.all_pages("/v1/models", 2).await;
    assert_eq!(seen, ids);
}

/// A multipart body that sends `head`, then `filler` bytes in chunks of
/// 64 KiB, then stalls without ever ending: only a server that refuses the
/// part while it streams can answer it.
fn stalling_multipart(head: &str, filler: usize) -> reqwest::Body {
    let mut chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(head.as_bytes().to_vec())];
    let mut left = filler;
    while left > 0 {
        let n = left.min(64 << 10);
        chunks.push(Ok(vec![b'a'; n]));
        left -= n;
    }
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::iter(chunks),
        futures_util::stream::pending(),
    );
    reqwest::Body::wrap_stream(stream)
}

async fn post_multipart(app: &crate::helpers::TestApp, body: reqwest::Body) -> reqwest::Response {
    let send = app
        .client
        .post(app.url("/v1/models"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(body)
        .send();
    tokio::time::timeout(std::time::Duration::from_secs(30), send)
        .await
        .expect("the server answers before the body ends")
        .unwrap()
}

#[tokio::test]
async fn an_oversized_text_part_is_refused_while_it_streams() {
    let app = spawn_app().await;
    let head = "--XYZ\r\ncontent-disposition: form-data; name=\"name\"\r\n\r\n";
    let resp = post_multipart(&app, stalling_multipart(head, 4 << 20)).await;
    let message = assert_error(resp, 400, "invalid_field").await;
    assert!(message.contains("256"), "{message}");
    let head = "--XYZ\r\ncontent-disposition: form-data; name=\"labels\"\r\n\r\n";
    let resp = post_multipart(&app, stalling_multipart(head, 4 << 20)).await;
    assert_error(resp, 400, "invalid_field").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn endless_part_headers_are_refused_while_they_stream() {
    let app = spawn_app().await;
    let head = "--XYZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"model.safetensors\"\r\nx-padding: ";
    let resp = post_multipart(&app, stalling_multipart(head, 4 << 20)).await;
    assert_error(resp, 400, "invalid_multipart").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn text_parts_count_toward_the_upload_limit() {
    let bytes = tiny_model(60);
    let limit = bytes.len() + 100;
    let app = spawn_app_with(&["--max-upload-bytes", &limit.to_string()]).await;
    let labels = format!(r#"{{"note": "{}"}}"#, "x".repeat(200));
    let form = Form::new()
        .part(
            "file",
            Part::bytes(bytes.clone()).file_name("model.safetensors"),
        )
        .text("labels", labels);
    assert_error(app.upload_form(form).await, 413, "payload_too_large").await;
    app.assert_nothing_stored().await;
    // Within the limit, the same upload is stored.
    let form = Form::new()
        .part("file", Part::bytes(bytes).file_name("model.safetensors"))
        .text("labels", r#"{"a": "b"}"#);
    assert_eq!(app.upload_form(form).await.status(), 201);
}

#[tokio::test]
async fn a_name_that_is_not_utf8_is_refused() {
    let app = spawn_app().await;
    let form = Form::new()
        .part(
            "file",
            Part::bytes(tiny_model(61)).file_name("model.safetensors"),
        )
        .part("name", Part::bytes(vec![b'm', 0xff, 0xfe]));
    let message = assert_error(app.upload_form(form).await, 400, "invalid_field").await;
    assert!(message.contains("UTF-8"), "{message}");
    app.assert_nothing_stored().await;
}
