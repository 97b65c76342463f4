//! What an operator sees: request metrics, process metrics, the access log
//! and job log lines that carry the request that created the job.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, tiny_model, Database, TestApp};

/// The value of the first sample of `metrics` whose line starts with
/// `prefix` (a name with its labels).
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn requests_are_counted_and_timed_by_route_template_and_process_metrics_are_there() {
    let app = spawn_app().await;
    let missing = uuid::Uuid::now_v7();
    for _ in 0..3 {
        assert_eq!(app.get(&format!("/v1/jobs/{missing}")).await.status(), 404);
    }
    assert_eq!(app.get("/no/such/route/at/all").await.status(), 404);
    let text = app.get("/metrics").await.text().await.unwrap();
    // Counters are process-wide and other tests run in this process too:
    // at least what this test sent.
    let by_route =
        r#"modelpress_http_requests_total{method="GET",route="/v1/jobs/{id}",status="404"}"#;
    assert!(sample(&text, by_route).unwrap_or(0.0) >= 3.0, "{text}");
    let unmatched =
        r#"modelpress_http_requests_total{method="GET",route="unmatched",status="404"}"#;
    assert!(sample(&text, unmatched).unwrap_or(0.0) >= 1.0, "{text}");
    // No label holds a concrete id.
    assert!(!text.contains(&missing.to_string()), "{text}");
    assert!(
        text.contains("# TYPE modelpress_http_request_duration_seconds histogram"),
        "{text}"
    );
    let bucket = r#"modelpress_http_request_duration_seconds_bucket{method="GET",route="/v1/jobs/{id}",status="404",le="+Inf"}"#;
    assert!(sample(&text, bucket).unwrap_or(0.0) >= 3.0, "{text}");
    assert!(
        sample(&text, "process_cpu_seconds_total ").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(
        sample(&text, "process_resident_memory_bytes ").is_some_and(|v| v > 1e6),
        "{text}"
    );
    assert!(
        sample(&text, "process_open_fds ").is_some_and(|v| v >= 3.0),
        "{text}"
    );
    // What the two job metrics mean is said in their help.
    assert!(
        text.contains("# HELP modelpress_jobs Jobs stored in the database now"),
        "{text}"
    );
}

#[tokio::test]
async fn a_cursor_that_is_not_an_id_is_refused() {
    let app = spawn_app().await;
    for path in [
        "/v1/models?cursor=zzz",
        "/v1/jobs?cursor=zzz",
        "/v1/jobs?limit=1&cursor=1%27%20OR%201",
    ] {
        assert_error(app.get(path).await, 400, "invalid_query").await;
    }
    // An id that names nothing is a position like any other.
    let page = app
        .get_json(&format!("/v1/models?cursor={}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(page["items"], json!([]));
}

#[tokio::test]
async fn list_pages_carry_every_model_files_and_every_job_artifacts() {
    let app = spawn_app().await;
    let mut models = Vec::new();
    for seed in 0..3 {
        models.push(app.upload_model(tiny_model(seed)).await);
    }
    let job = app
        .submit(models[0]["id"].as_str().unwrap(), "int8", "dense")
        .await;
    let id = job["id"].as_str().unwrap();
    let done = app
        .wait_for(id, "succeeded", |j| j["status"] == "succeeded")
        .await;
    let page = app.get_json("/v1/models?limit=2").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    for item in page["items"].as_array().unwrap() {
        let one = app
            .get_json(&format!("/v1/models/{}", item["id"].as_str().unwrap()))
            .await;
        assert_eq!(item["files"], one["files"]);
        assert!(!item["files"].as_array().unwrap().is_empty());
    }
    let jobs = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["items"][0]["artifacts"], done["artifacts"]);
    assert!(!done["artifacts"].as_array().unwrap().is_empty());
}

/// `modelpress serve` in a child process whose log lines are kept.
struct LoggedServer {
    child: Child,
    app: TestApp,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    _database: Database,
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LoggedServer {
    async fn start(log_format: &str) -> LoggedServer {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::for_test().await;
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--workers",
                "1",
                "--log-format",
                log_format,
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(database.flags())
            .env_remove("RUST_LOG")
            .env_remove("MODELPRESS_API_KEYS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let address = loop {
            let found = lines.lock().unwrap().iter().find_map(|l| {
                let rest = l.split("listening on ").nth(1)?;
                Some(rest.split([' ', '"']).next()?.to_string())
            });
            if let Some(a) = found {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not log its address"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let app = TestApp::external(address, &dir.path().join("data"), database.clone());
        LoggedServer {
            child,
            app,
            lines,
            _dir: dir,
            _database: database,
        }
    }

    /// The lines logged so far that contain every one of `needles`,
    /// waiting up to 10 s for `n` of them.
    async fn lines_with(&self, needles: &[&str], n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<String> = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .cloned()
                .collect();
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn each_request_leaves_one_json_access_line_and_job_lines_carry_its_request_id() {
    let server = LoggedServer::start("json").await;
    let app = &server.app;
    let model = app.upload_model(tiny_model(1)).await;
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("x-request-id", "create-job-7f3a")
        .json(&json!({"model_id": model["id"], "preset": "int8", "output": {"format": "dense"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    app.wait_for(job["id"].as_str().unwrap(), "succeeded", |j| {
        j["status"] == "succeeded"
    })
    .await;
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("x-request-id", "bad-request-91c2")
        .json(&json!({"model_id": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);

    let access = server
        .lines_with(&["bad-request-91c2", "\"route\""], 1)
        .await;
    assert_eq!(access.len(), 1, "one access line: {access:?}");
    let line: Value = serde_json::from_str(&access[0]).unwrap();
    assert_eq!(line["level"], "INFO", "{line}");
    let f = &line["fields"];
    assert_eq!(f["method"], "POST", "{line}");
    assert_eq!(f["route"], "/v1/jobs", "{line}");
    assert_eq!(f["status"], 422, "{line}");
    assert!(f["duration_ms"].as_f64().is_some(), "{line}");
    assert!(f["bytes"].as_u64().is_some_and(|b| b > 0), "{line}");

    let job_lines = server
        .lines_with(&["create-job-7f3a", "job succeeded"], 1)
        .await;
    assert_eq!(
        job_lines.len(),
        1,
        "the worker's lines name the request: {job_lines:?}"
    );
}

#[tokio::test]
async fn the_text_log_has_the_same_access_line() {
    let server = LoggedServer::start("text").await;
    let resp = server
        .app
        .client
        .get(server.app.url("/healthz"))
        .header("x-request-id", "health-5e1d")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let access = server
        .lines_with(&["health-5e1d", "route=/healthz"], 1)
        .await;
    assert_eq!(access.len(), 1, "{access:?}");
    for field in ["INFO", "method=GET", "status=200", "duration_ms=", "bytes="] {
        assert!(access[0].contains(field), "{field} in {}", access[0]);
    }
}
