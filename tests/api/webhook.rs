use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::helpers::{spawn_app_with, tiny_model};

/// A local receiver that refuses the first delivery and records the rest.
async fn receiver() -> (String, mpsc::UnboundedReceiver<(HeaderMap, Bytes)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let _ = tx.send((headers, body));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

#[tokio::test]
async fn a_finished_job_is_posted_to_its_webhook_with_a_valid_signature() {
    let secret = "s3cret";
    let app = spawn_app_with(&["--webhook-secret", secret, "--webhook-retry-ms", "50"]).await;
    let (url, mut deliveries) = receiver().await;
    let model = app.upload_model(tiny_model(40)).await;
    let resp = app
        .post_job(&json!({"model_id": model["id"], "preset": "int8", "webhook_url": url}))
        .await;
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();

    let (headers, body) = tokio::time::timeout(Duration::from_secs(60), deliveries.recv())
        .await
        .expect("the webhook arrives, after one refused attempt")
        .unwrap();
    let expected = modelpress::webhook::signature(secret.as_bytes(), &body);
    assert_eq!(
        headers["x-modelpress-signature"].to_str().unwrap(),
        expected
    );
    // Checked independently of the service's own code.
    {
        use hmac::{Mac, SimpleHmac};
        let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&body);
        let hex_sig = headers["x-modelpress-signature"]
            .to_str()
            .unwrap()
            .strip_prefix("sha256=")
            .unwrap();
        mac.verify_slice(&hex::decode(hex_sig).unwrap())
            .expect("the signature verifies");
    }
    assert_eq!(headers["x-modelpress-event"], "job.succeeded");
    assert_eq!(headers["content-type"], "application/json");
    let delivered: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(delivered["id"], job["id"]);
    assert_eq!(delivered["status"], "succeeded");
    assert!(!delivered["artifacts"].as_array().unwrap().is_empty());
}
