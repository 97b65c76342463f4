use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::helpers::{layered_model, sqlite_only, Database, TestApp};

/// `modelpress serve` as a child process on a free port.
struct ServerProcess {
    child: KillOnDrop,
    app: TestApp,
    /// What it logged before it listened.
    startup_log: Vec<String>,
}

/// A child process killed when dropped: a failed assertion, even while the
/// server starts, must not leave it running past the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(data_dir: &Path, tensor_delay_ms: u64) -> ServerProcess {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--workers",
                "1",
                "--data-dir",
            ])
            // Relative, as the default `./data` is.
            .arg(data_dir.file_name().unwrap())
            .current_dir(data_dir.parent().unwrap())
            .env("MODELPRESS_TENSOR_DELAY_MS", tensor_delay_ms.to_string())
            .env("RUST_LOG", "info")
            .env_remove("MODELPRESS_API_KEYS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut startup_log = Vec::new();
    let address = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs the address it listens on");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        startup_log.push(line);
    };
    // Keep draining, so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    ServerProcess {
        child,
        app: TestApp::external(address, data_dir, Database::DataDir),
        startup_log,
    }
}

/// SQLite only: the restart takes back every job left running in its data
/// directory at once. On PostgreSQL, which other processes may share, a
/// restart takes back only jobs whose lease expired.
#[tokio::test]
async fn a_job_interrupted_by_a_killed_server_completes_after_a_restart() {
    if !sqlite_only("a_job_interrupted_by_a_killed_server_completes_after_a_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut first = start_server(&data_dir, 200);
    let model = first.app.upload_model(layered_model(30, 10)).await;
    let job = first
        .app
        .submit(model["id"].as_str().unwrap(), "int8", "packed")
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    first
        .app
        .wait_for(&id, "running with progress", |j| {
            j["status"] == "running" && j["progress"]["tensors_done"].as_i64().unwrap_or(0) >= 2
        })
        .await;
    first.child.0.kill().unwrap(); // SIGKILL: no chance to clean up
    first.child.0.wait().unwrap();

    let second = start_server(&data_dir, 0);
    let done = second.app.wait_succeeded(&id).await;
    assert_eq!(done["attempts"], 2, "{done}");
    for artifact in done["artifacts"].as_array().unwrap() {
        second.app.download(artifact).await;
    }
    assert!(
        second.app.tmp_entries().is_empty(),
        "{:?}",
        second.app.tmp_entries()
    );
    let requeued = second
        .startup_log
        .iter()
        .any(|l| l.contains(&id) && l.contains("queued again"));
    assert!(requeued, "the restart logs that it took the job back");
}
