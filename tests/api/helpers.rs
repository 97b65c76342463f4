//! The service under test: a real server on a free port with its own data
//! directory and database, and a typed client for it.
//!
//! The database is SQLite in the data directory, or, with
//! `MODELPRESS_TEST_BACKEND=postgres`, a PostgreSQL database made for the
//! one test on the server of `MODELPRESS_TEST_POSTGRES_URL` (`.ci/run` runs
//! the API tests both ways). Blobs are kept in the data directory, or, with
//! `MODELPRESS_TEST_BLOBS=s3`, in a bucket of an S3-compatible server the
//! test runs in process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use modelpress::config::ServeConfig;
use modelpress::startup::Application;
use modelpress::store::testing::{say_skipped, TestDatabase, POSTGRES_URL_VAR};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::common::{self, gaussian, Rng, T};
use crate::s3_server::{self, S3Server};

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    database: Database,
    /// The S3 server blobs are kept on, if they are kept in a bucket.
    pub bucket: Option<Arc<S3Server>>,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Where a test service keeps its database.
#[derive(Clone)]
pub enum Database {
    /// The SQLite file of its data directory.
    DataDir,
    /// A PostgreSQL database of its own, dropped with the last holder.
    Postgres(Arc<TestDatabase>),
}

impl Database {
    /// The backend the API tests run on: `MODELPRESS_TEST_BACKEND`.
    pub async fn for_test() -> Database {
        if !on_postgres() {
            return Database::DataDir;
        }
        let url = std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| {
            panic!("MODELPRESS_TEST_BACKEND=postgres needs {POSTGRES_URL_VAR}, the URL of a PostgreSQL server's database")
        });
        Database::Postgres(Arc::new(TestDatabase::create(&url).await))
    }

    /// The `serve` flags that choose it.
    pub fn flags(&self) -> Vec<String> {
        match self {
            Database::DataDir => vec![],
            Database::Postgres(db) => vec!["--database-url".into(), db.url().into()],
        }
    }
}

/// Whether the API tests keep blobs in a bucket (`MODELPRESS_TEST_BLOBS=s3`)
/// rather than in the data directory.
pub fn on_s3() -> bool {
    switched_to("MODELPRESS_TEST_BLOBS", "file", "s3")
}

/// Whether the variable `var` names the alternative `to` rather than the
/// default `from` (also when unset or empty); any other value is a mistake.
fn switched_to(var: &str, from: &str, to: &str) -> bool {
    match std::env::var(var).as_deref() {
        Ok(v) if v == to => true,
        Ok("") | Err(_) => false,
        Ok(v) if v == from => false,
        Ok(other) => panic!("{var} is `{other}`: use {from} or {to}"),
    }
}

/// For a test of blobs in the data directory (files under `blobs/`, a full
/// disk holding them): whether to run it, saying so when the tests keep
/// blobs in a bucket and it is skipped.
pub fn local_blobs_only(test: &str) -> bool {
    run_unless(
        on_s3(),
        &format!("{test} with blobs in a bucket: it is about blobs in the data directory"),
    )
}

/// `!skip`, saying `why` the test is skipped when it is.
fn run_unless(skip: bool, why: &str) -> bool {
    if skip {
        say_skipped(why);
    }
    !skip
}

/// The `serve` flags that keep blobs in `server`'s bucket.
pub fn s3_flags(server: &S3Server) -> Vec<String> {
    vec![
        "--blob-store".into(),
        format!("s3://{}/test", s3_server::BUCKET),
        "--s3-endpoint".into(),
        server.endpoint(),
        "--s3-access-key-id".into(),
        s3_server::ACCESS_KEY.into(),
        "--s3-secret-access-key".into(),
        s3_server::SECRET_KEY.into(),
    ]
}

/// Whether the API tests run on PostgreSQL (`MODELPRESS_TEST_BACKEND=postgres`).
pub fn on_postgres() -> bool {
    switched_to("MODELPRESS_TEST_BACKEND", "sqlite", "postgres")
}

/// For a test of what only SQLite in the data directory does (its file on
/// a full disk, recovery of the data directory): whether to run it, saying
/// so when the tests run on PostgreSQL and it is skipped.
pub fn sqlite_only(test: &str) -> bool {
    run_unless(
        on_postgres(),
        &format!("{test} on PostgreSQL: it is about SQLite in the data directory"),
    )
}

/// A service with 2 workers and otherwise default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A service started with these extra `serve` flags.
pub async fn spawn_app_with(flags: &[&str]) -> TestApp {
    spawn_fresh(Database::for_test().await, blobs_for_test().await, flags).await
}

/// A bucket of its own when the tests keep blobs in one.
async fn blobs_for_test() -> Option<Arc<S3Server>> {
    if on_s3() {
        Some(Arc::new(S3Server::start().await))
    } else {
        None
    }
}

/// A service whose blobs are kept in the bucket of `server`, whatever
/// `MODELPRESS_TEST_BLOBS` says.
pub async fn spawn_app_on_s3(server: Arc<S3Server>, flags: &[&str]) -> TestApp {
    spawn_fresh(Database::for_test().await, Some(server), flags).await
}

/// A service on a fresh data directory and the given database, its blobs
/// kept in the bucket of `server`.
pub async fn spawn_app_on_with_bucket(
    database: Database,
    server: Arc<S3Server>,
    flags: &[&str],
) -> TestApp {
    spawn_fresh(database, Some(server), flags).await
}

/// A service on a fresh data directory and the given database.
pub async fn spawn_app_on(database: Database, flags: &[&str]) -> TestApp {
    spawn_fresh(database, blobs_for_test().await, flags).await
}

/// A service on a fresh data directory, removed with the app.
async fn spawn_fresh(database: Database, bucket: Option<Arc<S3Server>>, flags: &[&str]) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut app = spawn_with(&dir.path().join("data"), database, bucket, flags).await;
    app._dir = Some(dir);
    app
}

/// A service on an existing data directory, with its SQLite database.
pub async fn spawn_on(data_dir: &Path, flags: &[&str]) -> TestApp {
    spawn_with(data_dir, Database::DataDir, blobs_for_test().await, flags).await
}

async fn spawn_with(
    data_dir: &Path,
    database: Database,
    bucket: Option<Arc<S3Server>>,
    flags: &[&str],
) -> TestApp {
    let mut args = vec![
        "serve".to_string(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--workers".into(),
        "2".into(),
        "--shutdown-grace-seconds".into(),
        "5".into(),
    ];
    args.extend(database.flags());
    if let Some(server) = &bucket {
        args.extend(s3_flags(server));
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    let config = ServeConfig::parse_from(args);
    let app = Application::build(&config)
        .await
        .expect("the service starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    TestApp {
        address,
        client: client(),
        data_dir: data_dir.to_path_buf(),
        database,
        bucket,
        _dir: None,
        stop: Some(tx),
        server: Some(server),
    }
}

/// A stopped service's data directory and database, kept to start it
/// again.
pub struct Stopped {
    data_dir: PathBuf,
    database: Database,
    bucket: Option<Arc<S3Server>>,
    dir: Option<tempfile::TempDir>,
}

impl Stopped {
    /// The service again, on the same data directory and database.
    pub async fn restart(self, flags: &[&str]) -> TestApp {
        let mut app = spawn_with(&self.data_dir, self.database, self.bucket, flags).await;
        app._dir = self.dir;
        app
    }
}

/// An HTTP client. Its TLS needs a crypto provider installed first: the
/// service installs one when it starts, but a test may start none in this
/// process.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A model made of `tensors`, as the bytes of one safetensors file.
pub fn safetensors_bytes(tensors: &[T]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    common::write(&path, tensors);
    std::fs::read(&path).unwrap()
}

/// A small model: two 64x64 layers, a bias and a norm vector.
pub fn tiny_model(seed: u64) -> Vec<u8> {
    safetensors_bytes(&tiny_tensors(seed))
}

pub fn tiny_tensors(seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    vec![
        gaussian("fc1.weight", &[64, 64], 0.05, &mut rng),
        gaussian("fc1.bias", &[64], 0.01, &mut rng),
        gaussian("norm.weight", &[64], 1.0, &mut rng),
        gaussian("fc2.weight", &[64, 64], 0.05, &mut rng),
    ]
}

/// A model with `n` small layers, so a job on it has `n` tensor steps.
pub fn layered_model(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let tensors: Vec<T> = (0..n)
        .map(|i| gaussian(&format!("layers.{i}.weight"), &[32, 32], 0.05, &mut rng))
        .collect();
    safetensors_bytes(&tensors)
}

/// The `id` of a JSON record.
pub fn id(v: &Value) -> &str {
    v["id"].as_str().unwrap()
}

/// The artifact of a finished job with this name.
pub fn artifact<'a>(job: &'a Value, name: &str) -> &'a Value {
    job["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no artifact {name} in {job}"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

impl TestApp {
    /// A client for a service running elsewhere (another process).
    pub fn external(address: String, data_dir: &Path, database: Database) -> TestApp {
        TestApp {
            address,
            client: client(),
            data_dir: data_dir.to_path_buf(),
            database,
            bucket: None,
            _dir: None,
            stop: None,
            server: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// A POST with no body.
    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.client.post(self.url(path)).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    /// The ids of every item of a paginated list, following `next_cursor`
    /// with pages of `limit`.
    pub async fn all_pages(&self, path: &str, limit: u32) -> Vec<String> {
        let mut ids = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self
                .get_json(&format!("{path}?limit={limit}&cursor={cursor}"))
                .await;
            ids.extend(
                page["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|item| item["id"].as_str().unwrap().to_string()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => return ids,
            }
        }
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let resp = self.get(path).await;
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.unwrap()
    }

    pub async fn upload_raw(&self, bytes: Vec<u8>, query: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/models{query}")))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    pub async fn upload_form(&self, form: reqwest::multipart::Form) -> reqwest::Response {
        self.client
            .post(self.url("/v1/models"))
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// Uploads a model and returns its JSON.
    pub async fn upload_model(&self, bytes: Vec<u8>) -> Value {
        let resp = self.upload_raw(bytes, "?name=test&version=1").await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 201, "upload: {body}");
        body
    }

    pub async fn post_job(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/jobs"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Submits a job and returns its JSON.
    pub async fn submit(&self, model_id: &str, preset: &str, format: &str) -> Value {
        let resp = self
            .post_job(
                &json!({"model_id": model_id, "preset": preset, "output": {"format": format}}),
            )
            .await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 202, "submit: {body}");
        body
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    /// Polls the job until `done` holds for it (30 s at most).
    pub async fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not become {what} in time: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_for(id, "finished", |j| {
            matches!(
                j["status"].as_str(),
                Some("succeeded" | "failed" | "canceled")
            )
        })
        .await
    }

    pub async fn wait_succeeded(&self, id: &str) -> Value {
        let job = self.wait_finished(id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        job
    }

    /// Downloads an artifact's bytes, checking the headers that describe it.
    pub async fn download(&self, artifact: &Value) -> Vec<u8> {
        let resp = self.get(artifact["url"].as_str().unwrap()).await;
        assert_eq!(resp.status(), 200);
        let sha = artifact["sha256"].as_str().unwrap();
        assert_eq!(resp.headers()["etag"], format!("\"{sha}\"").as_str());
        assert_eq!(
            resp.headers()["content-length"],
            artifact["bytes"].to_string().as_str()
        );
        let disposition = resp.headers()["content-disposition"].to_str().unwrap();
        assert!(disposition.contains(artifact["name"].as_str().unwrap()));
        let bytes = resp.bytes().await.unwrap().to_vec();
        assert_eq!(sha256_hex(&bytes), sha, "the bytes match the sha256");
        bytes
    }

    /// Files left under `tmp/`.
    pub fn tmp_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Blobs stored under `blobs/`, or in the bucket.
    pub fn blob_count(&self) -> usize {
        if let Some(server) = &self.bucket {
            return server.objects().len();
        }
        let mut n = 0;
        for d in std::fs::read_dir(self.data_dir.join("blobs")).unwrap() {
            n += std::fs::read_dir(d.unwrap().path()).unwrap().count();
        }
        n
    }

    /// The files holding a stored blob: under `blobs/`, or the bucket's
    /// object and its cached copy.
    pub fn files_of_blob(&self, sha: &str) -> Vec<PathBuf> {
        match &self.bucket {
            None => vec![self.data_dir.join("blobs").join(&sha[..2]).join(sha)],
            Some(server) => {
                let mut files =
                    vec![server.object_file(&format!("test/blobs/{}/{sha}", &sha[..2]))];
                let cached = self.data_dir.join("cache").join(sha);
                if cached.exists() {
                    files.push(cached);
                }
                files
            }
        }
    }

    /// Rows in the tables an upload writes (`models`, `model_files`), read
    /// from the database itself rather than through the API.
    pub async fn upload_rows(&self) -> i64 {
        self.count_rows("SELECT (SELECT COUNT(*) FROM models) + (SELECT COUNT(*) FROM model_files)")
            .await
    }

    /// The number a counting query gives, asked of the service's database
    /// directly.
    pub async fn count_rows(&self, sql: &'static str) -> i64 {
        match &self.database {
            Database::DataDir => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(self.data_dir.join("modelpress.db"))
                    .read_only(true);
                let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
                let rows = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                rows
            }
            Database::Postgres(db) => {
                let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
                let rows = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                rows
            }
        }
    }

    /// Asserts that refused uploads left nothing behind: no file under
    /// `tmp/`, no blob, no database row.
    pub async fn assert_nothing_stored(&self) {
        assert!(
            self.tmp_entries().is_empty(),
            "tmp/: {:?}",
            self.tmp_entries()
        );
        assert_eq!(self.blob_count(), 0, "blobs/");
        assert_eq!(self.upload_rows().await, 0, "models and model_files rows");
    }

    pub async fn model_count(&self) -> usize {
        self.get_json("/v1/models?limit=200").await["items"]
            .as_array()
            .unwrap()
            .len()
    }

    /// Stops the service gracefully and waits for it; the data directory
    /// and the database live as long as the returned guard.
    pub async fn stop(mut self) -> Stopped {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        Stopped {
            data_dir: self.data_dir.clone(),
            database: self.database.clone(),
            bucket: self.bucket.clone(),
            dir: self._dir.take(),
        }
    }
}

/// Waits until `cond` holds (60 s at most), for effects the server
/// completes after its response or without one.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts the error shape and code of a response; returns the message.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> String {
    let actual = resp.status().as_u16();
    let body: Value = resp.json().await.expect("an error body is JSON");
    assert_eq!(actual, status, "status of {body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"]
        .as_str()
        .expect("a message")
        .to_string();
    assert!(!message.is_empty());
    assert_eq!(body.as_object().unwrap().len(), 1, "only `error`: {body}");
    message
}

/// A small tmpfs mounted for one test, to run the service on a disk that
/// really fills up; unmounted when dropped.
///
/// Mounting needs root (or CAP_SYS_ADMIN), as in CI. Where that is not
/// available, set `MODELPRESS_SKIP_MOUNT_TESTS=1` to skip these tests
/// knowingly; without it they fail rather than pass without checking.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            other => {
                if std::env::var_os("MODELPRESS_SKIP_MOUNT_TESTS").is_some() {
                    eprintln!("skipped: cannot mount a tmpfs ({other:?})");
                    return None;
                }
                panic!("cannot mount a tmpfs ({other:?}): run as root, or set MODELPRESS_SKIP_MOUNT_TESTS=1 to skip the disk-full tests");
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name` until the file system refuses another byte.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        for size in [1 << 20, 4096, 1] {
            let chunk = vec![0xa5u8; size];
            while f.write_all(&chunk).is_ok() {}
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
