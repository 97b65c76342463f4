use serde_json::Value;

use crate::helpers::{assert_error, spawn_app, spawn_app_with, tiny_model};

#[tokio::test]
async fn malformed_requests_get_the_one_error_shape() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "malformed_json").await;
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(resp, 415, "unsupported_media_type").await;
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(resp, 422, "invalid_body").await;
    assert_error(app.get("/v1/jobs?limit=0").await, 400, "invalid_query").await;
    assert_error(app.get("/v1/jobs?limit=abc").await, 400, "invalid_query").await;
    assert_error(app.get("/v1/jobs?status=done").await, 400, "invalid_query").await;
    assert_error(app.get("/no/such/route").await, 404, "not_found").await;
    let resp = app.client.put(app.url("/v1/jobs")).send().await.unwrap();
    assert_error(resp, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let resp = app.get("/healthz").await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    let resp = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
}

#[tokio::test]
async fn api_keys_guard_v1_and_leave_health_metrics_and_docs_open() {
    let app = spawn_app_with(&["--api-key", "k1", "--api-key", "k2"]).await;
    assert_error(app.get("/v1/presets").await, 401, "missing_api_key").await;
    let resp = app
        .client
        .get(app.url("/v1/presets"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_error(resp, 401, "invalid_api_key").await;
    let resp = app
        .client
        .post(app.url("/v1/models"))
        .body(tiny_model(1))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "missing_api_key").await;
    app.assert_nothing_stored().await;
    for key in ["k1", "k2"] {
        let resp = app
            .client
            .get(app.url("/v1/presets"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs/"] {
        assert_eq!(app.get(open).await.status(), 200, "{open}");
    }
}

#[tokio::test]
async fn health_readiness_and_presets_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get_json("/healthz").await["status"], "ok");
    assert_eq!(app.get_json("/readyz").await["status"], "ready");
    let presets = app.get_json("/v1/presets").await;
    let names: Vec<&str> = presets["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for expected in [
        "deep-compression",
        "int8",
        "int4-g128",
        "sparse-2of4-int8",
        "fp8",
        "binary",
        "ternary",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let int8: &Value = presets["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "int8")
        .unwrap();
    assert_eq!(int8["pipeline"]["stages"][0]["stage"], "quantize");
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_keys_of_any_length_are_refused() {
    let app = spawn_app_with(&["--api-key", "k1"]).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let resp = app
            .client
            .get(app.url("/v1/presets"))
            .header("authorization", format!("{scheme} k1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
    }
    for wrong in ["k", "k2", "k1k1", ""] {
        let resp = app
            .client
            .get(app.url("/v1/presets"))
            .header("authorization", format!("Bearer {wrong}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{wrong:?}");
    }
}

#[tokio::test]
async fn every_response_says_nosniff() {
    let app = spawn_app().await;
    for path in [
        "/healthz",
        "/v1/models",
        "/no/such/route",
        "/openapi.json",
        "/docs/",
    ] {
        let resp = app.get(path).await;
        assert_eq!(
            resp.headers()["x-content-type-options"],
            "nosniff",
            "{path}"
        );
    }
    let resp = app.upload_raw(b"junk".to_vec(), "").await;
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test]
async fn a_json_body_over_the_limit_is_payload_too_large_like_an_upload() {
    let app = spawn_app().await;
    let body = format!(
        r#"{{"model_id": "m", "preset": "int8", "labels": {{"pad": "{}"}}}}"#,
        "x".repeat(3 << 20)
    );
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error(resp, 413, "payload_too_large").await;
}
