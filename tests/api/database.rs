//! The service on a database server that goes away and comes back
//! (PostgreSQL; SQLite is a file in the data directory).

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelpress::store::testing::{say_skipped, TestDatabase, POSTGRES_URL_VAR};
use sqlx::postgres::PgConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::helpers::{assert_error, on_postgres, spawn_app_on, tiny_model, Database};

/// A TCP relay to the PostgreSQL server that can be cut, as a server that
/// stops or a network that fails would cut it, and put back on the same
/// port.
struct Relay {
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(addr: SocketAddr, target: SocketAddr) -> Relay {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Default::default();
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Relay { addr, tasks }
    }

    /// Closes every connection and the port: the database is unreachable.
    async fn cut(self) -> SocketAddr {
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        self.addr
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_server_that_goes_away_answers_503_and_the_service_recovers() {
    if !on_postgres() {
        say_skipped(
            "a_database_server_that_goes_away_answers_503_and_the_service_recovers: runs with MODELPRESS_TEST_BACKEND=postgres",
        );
        return;
    }
    let server_url = std::env::var(POSTGRES_URL_VAR).unwrap();
    let database = TestDatabase::create(&server_url).await;
    let options = PgConnectOptions::from_str(database.url()).unwrap();
    let target: SocketAddr = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), target).await;
    let relayed = format!(
        "postgres://{}@{}/{}",
        options.get_username(),
        relay.addr,
        options.get_database().unwrap()
    );
    let app = spawn_app_on(
        Database::Postgres(Arc::new(database)),
        &["--database-url", &relayed],
    )
    .await;
    let model = app.upload_model(tiny_model(1)).await;
    let model_path = format!("/v1/models/{}", model["id"].as_str().unwrap());
    assert_eq!(app.get("/readyz").await.status(), 200);

    // Each answer waits for the pool's 5 s attempt to connect.
    let addr = relay.cut().await;
    let started = std::time::Instant::now();
    assert_error(app.get(&model_path).await, 503, "storage_unavailable").await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered in {:?}",
        started.elapsed()
    );
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("database"), "{message}");
    // Liveness is not readiness: the process itself is fine.
    assert_eq!(app.get("/healthz").await.status(), 200);

    let _relay = Relay::start(addr, target).await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.get_json(&model_path).await;
    let job = app
        .submit(model["id"].as_str().unwrap(), "int8", "packed")
        .await;
    app.wait_succeeded(job["id"].as_str().unwrap()).await;
}
