//! Three `modelpress serve` processes sharing one PostgreSQL database and
//! one bucket, as replicas behind a load balancer are: jobs submitted to
//! any of them run exactly once on one of them, every replica serves every
//! artifact, and a replica killed in the middle of a job loses nothing: the
//! job's lease expires, another replica runs it again to the end, and the
//! killed one, restarted, leaves it as the other recorded it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelpress::store::testing::{postgres_url_or_skip, TestDatabase};
use serde_json::Value;

use crate::helpers::{self, layered_model, s3_flags, tiny_model, Database, TestApp};
use crate::s3_server::S3Server;

/// A lease short enough that a killed replica's job is taken back soon.
const LEASE_MS: &str = "2000";
/// Each tensor takes at least this long, so a job runs long enough to be
/// caught running.
const TENSOR_DELAY_MS: &str = "150";

/// `modelpress serve` as a child process, killed when dropped, its log
/// lines kept.
struct Replica {
    child: Child,
    app: TestApp,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn start(data_dir: &Path, database_url: &str, bucket: &S3Server) -> Replica {
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args(["serve", "--addr", "127.0.0.1:0", "--workers", "1"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--database-url", database_url])
            .args(["--lease-ms", LEASE_MS, "--idle-poll-ms", "200"])
            .args(s3_flags(bucket))
            .env("MODELPRESS_TENSOR_DELAY_MS", TENSOR_DELAY_MS)
            .env("MODELPRESS_LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .env_remove("MODELPRESS_API_KEYS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let address = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the replica did not listen: {:?}", log.lock().unwrap()));
        Replica {
            child,
            app: TestApp::external(address, data_dir, Database::DataDir),
            log,
        }
    }

    /// Whether this replica logged that it claimed the job.
    fn claimed(&self, job: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(job) && l.contains("job claimed"))
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL: no chance to clean up
        self.child.wait().unwrap();
    }
}

fn id(v: &Value) -> String {
    helpers::id(v).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_run_each_job_once_and_finish_the_job_of_a_killed_one() {
    let Some(admin) =
        postgres_url_or_skip("three_replicas_run_each_job_once_and_finish_the_job_of_a_killed_one")
    else {
        return;
    };
    let database = TestDatabase::create(&admin).await;
    let bucket = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data_dirs: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("r{i}"))).collect();
    let mut replicas: Vec<Option<Replica>> = data_dirs
        .iter()
        .map(|d| Some(Replica::start(d, database.url(), &bucket)))
        .collect();
    let app = |replicas: &[Option<Replica>], i: usize| -> TestApp {
        let r = replicas[i % 3].as_ref().unwrap();
        TestApp::external(r.app.address.clone(), &r.app.data_dir, Database::DataDir)
    };

    // A model uploaded through one replica is there for all.
    let model = id(&app(&replicas, 0).upload_model(tiny_model(61)).await);
    for i in 1..3 {
        let seen = app(&replicas, i).get(&format!("/v1/models/{model}")).await;
        assert_eq!(seen.status(), 200);
    }

    // 60 jobs, submitted round-robin, each polled and downloaded through
    // the two other replicas.
    let mut jobs = Vec::new();
    for i in 0..60 {
        let job = app(&replicas, i).submit(&model, "int8", "packed").await;
        jobs.push(id(&job));
    }
    for (i, job) in jobs.iter().enumerate() {
        let done = app(&replicas, i + 1).wait_succeeded(job).await;
        assert_eq!(done["attempts"], 1, "run once: {done}");
        for artifact in done["artifacts"].as_array().unwrap() {
            // `download` checks the bytes against the artifact's sha256.
            app(&replicas, i + 2).download(artifact).await;
        }
    }
    let claims: Vec<usize> = replicas
        .iter()
        .map(|r| {
            jobs.iter()
                .filter(|j| r.as_ref().unwrap().claimed(j))
                .count()
        })
        .collect();
    assert_eq!(
        claims.iter().sum::<usize>(),
        60,
        "each job claimed once: {claims:?}"
    );
    assert!(
        claims.iter().filter(|&&n| n > 0).count() >= 2,
        "the replicas shared the jobs: {claims:?}"
    );

    // A longer job; the replica that claims it is killed while it runs.
    let long = id(&app(&replicas, 0).upload_model(layered_model(62, 12)).await);
    let job = id(&app(&replicas, 1).submit(&long, "int8", "packed").await);
    let running = app(&replicas, 2)
        .wait_for(&job, "running with progress", |j| {
            j["status"] == "running" && j["progress"]["tensors_done"].as_i64().unwrap_or(0) >= 1
        })
        .await;
    assert_eq!(running["attempts"], 1);
    let victim = (0..3)
        .find(|&i| replicas[i].as_ref().unwrap().claimed(&job))
        .expect("a replica logged the claim");
    replicas[victim].take().unwrap().kill();
    let killed_at = Instant::now();

    let survivor = (victim + 1) % 3;
    let done = app(&replicas, survivor).wait_succeeded(&job).await;
    assert_eq!(
        done["attempts"], 2,
        "run again after the lease expired: {done}"
    );
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1000),
        "not taken back before the lease could expire"
    );
    let rerun_by = (0..3)
        .filter(|&i| i != victim)
        .find(|&i| replicas[i].as_ref().unwrap().claimed(&job))
        .expect("another replica logged the second claim");
    assert_ne!(rerun_by, victim);
    for artifact in done["artifacts"].as_array().unwrap() {
        app(&replicas, survivor + 1).download(artifact).await;
    }

    // The killed replica comes back on its data directory: it records
    // nothing for the job another replica finished.
    replicas[victim] = Some(Replica::start(&data_dirs[victim], database.url(), &bucket));
    tokio::time::sleep(Duration::from_millis(2 * 2000)).await;
    let after = app(&replicas, victim).job(&job).await;
    assert_eq!(after, done, "the restarted replica changed nothing");
    assert!(app(&replicas, victim).tmp_entries().is_empty());

    // The replicas stop before their database is dropped.
    drop(replicas);
    drop(database);
}
