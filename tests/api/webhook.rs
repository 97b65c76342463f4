use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::helpers::{assert_error, eventually, spawn_app, spawn_app_with, tiny_model};

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
    let app = spawn_app_with(&[
        "--webhook-secret",
        secret,
        "--webhook-retry-ms",
        "50",
        "--allow-outbound",
        "127.0.0.1/32",
    ])
    .await;
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

#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_at_creation_naming_the_rule() {
    let app = spawn_app().await;
    let model = app.upload_model(tiny_model(41)).await;
    let cases = [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost:9/hook", "loopback"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://2130706433/", "loopback"),
        ("http://0x7f.1/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::1]:9/", "loopback"),
        ("http://10.0.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fd00::1]/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link_local"),
        ("http://[fe80::1]/", "link_local"),
        ("http://100.64.0.1/", "shared_address_space"),
        ("http://224.0.0.1/", "multicast"),
    ];
    for (url, rule) in cases {
        let resp = app
            .post_job(&json!({"model_id": model["id"], "preset": "int8", "webhook_url": url}))
            .await;
        let message = assert_error(resp, 422, "outbound_refused").await;
        assert!(message.contains(&format!("`{rule}`")), "{url}: {message}");
    }
    for url in ["ftp://example.com/", "file:///etc/passwd", "/relative"] {
        let resp = app
            .post_job(&json!({"model_id": model["id"], "preset": "int8", "webhook_url": url}))
            .await;
        assert_error(resp, 422, "invalid_webhook_url").await;
    }
    // This server's own address stays refused when loopback is allowed.
    let app = spawn_app_with(&["--allow-outbound", "127.0.0.0/8"]).await;
    let model = app.upload_model(tiny_model(41)).await;
    let resp = app
        .post_job(&json!({"model_id": model["id"], "preset": "int8",
                          "webhook_url": app.url("/v1/jobs")}))
        .await;
    let message = assert_error(resp, 422, "outbound_refused").await;
    assert!(message.contains("`own_address`"), "{message}");
}

#[tokio::test]
async fn a_webhook_redirect_is_not_followed() {
    let app = spawn_app_with(&["--webhook-retry-ms", "10", "--allow-outbound", "127.0.0.1"]).await;
    let (target, mut reached) = receiver().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let redirector = {
        let hits = hits.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let hits = hits.clone();
                let target = target.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::TEMPORARY_REDIRECT, [("location", target)])
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirector).await.unwrap() });

    let model = app.upload_model(tiny_model(42)).await;
    let resp = app
        .post_job(&json!({"model_id": model["id"], "preset": "int8", "webhook_url": url}))
        .await;
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    app.wait_succeeded(job["id"].as_str().unwrap()).await;
    // Every attempt stops at the redirect.
    eventually("every delivery attempt is made", || {
        hits.load(Ordering::SeqCst) == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 6);
    assert!(reached.try_recv().is_err(), "the redirect was not followed");
}

#[tokio::test]
async fn a_delivery_checks_the_target_again_and_never_connects_to_a_refused_one() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    {
        let connections = connections.clone();
        tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                connections.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let retry = modelpress::webhook::RetryPolicy {
        attempts: 2,
        first_delay: Duration::from_millis(10),
        timeout: Duration::from_secs(2),
    };
    let refusing = modelpress::webhook::Webhooks::new(
        None,
        retry.clone(),
        Arc::new(modelpress::outbound::OutboundPolicy::default()),
    );
    for url in [
        format!("http://{addr}/hook"),
        format!("http://localhost:{}/hook", addr.port()),
    ] {
        assert!(
            !refusing
                .deliver_now(&url, "job.succeeded", b"{}".to_vec())
                .await
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no connection was made"
    );
}
