//! Building and running the service: data directory, database, workers,
//! webhooks and the HTTP server.
//!
//! [`Application::build`] binds the listener (port 0 gives a free port,
//! which tests read back with [`Application::port`]); [`Application::run_until_stopped`]
//! serves until the shutdown future resolves, then stops gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig, AppState, JobView};
use crate::blobs::Blobs;
use crate::config::ServeConfig;
use crate::outbound::OutboundPolicy;
use crate::store::{now_ms, JobRecord, Store};
use crate::webhook::{RetryPolicy, Webhooks};
use crate::worker::{WorkerConfig, WorkerPool};

/// The process-wide metrics recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("modelpress_job_duration_seconds".into()),
                    &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0],
                )
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full(api::telemetry::DURATION.into()),
                    api::telemetry::DURATION_BUCKETS,
                )
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            metrics::describe_counter!(
                "modelpress_jobs_finished_total",
                "Jobs that reached a final status in this process since it started, by status; deleting jobs does not lower it (modelpress_jobs counts the jobs stored now)"
            );
            api::telemetry::describe();
            metrics::describe_histogram!(
                "modelpress_job_duration_seconds",
                metrics::Unit::Seconds,
                "Time a worker spent on a job, by final status"
            );
            metrics::describe_counter!(
                "modelpress_bytes_uploaded_total",
                metrics::Unit::Bytes,
                "Bytes of model files received"
            );
            metrics::describe_counter!(
                "modelpress_bytes_written_total",
                metrics::Unit::Bytes,
                "Bytes of artifacts written by succeeded jobs"
            );
            handle
        })
        .clone()
}

/// TLS for webhook deliveries uses the ring provider, installed once.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    pool: WorkerPool,
    store: Store,
    dispatcher: tokio::task::JoinHandle<()>,
    grace: Duration,
    /// Held while the service runs: one process per data directory.
    _lock: std::fs::File,
}

/// Takes the data directory for this process.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join("modelpress.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another modelpress process is using the data directory {}",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

fn event_of(job: &JobRecord) -> &'static str {
    match job.status {
        crate::store::JobStatus::Succeeded => "job.succeeded",
        crate::store::JobStatus::Failed => "job.failed",
        crate::store::JobStatus::Canceled => "job.canceled",
        _ => "job.updated",
    }
}

impl Application {
    pub async fn build(config: &ServeConfig) -> anyhow::Result<Self> {
        install_tls_provider();
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
        // Absolute, so that the links a job's input is laid out with hold
        // wherever they are resolved from.
        let data_dir = std::fs::canonicalize(&config.data_dir)
            .with_context(|| format!("cannot resolve {}", config.data_dir.display()))?;
        let lock = lock_data_dir(&data_dir)?;
        let database_url = config
            .database_url
            .clone()
            .unwrap_or_else(|| Store::default_url(&data_dir));
        let store = Store::open(&database_url)
            .await
            .context("cannot open the database")?;
        let location = config
            .blob_location(&data_dir)
            .context("cannot resolve the blob directory")?;
        let blobs = Arc::new(
            Blobs::open(&data_dir, &location)
                .context("cannot open the blob store")?
                .locking_with(store.clone()),
        );

        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.addr))?;
        // The address this server answers on is never a target of its own
        // outgoing requests.
        let outbound = Arc::new(OutboundPolicy::new(
            config.allow_outbound.clone(),
            Some(listener.local_addr()?),
        ));
        let webhooks = Webhooks::new(
            config.webhook_secret.clone(),
            RetryPolicy {
                first_delay: Duration::from_millis(config.webhook_retry_ms),
                ..RetryPolicy::default()
            },
            outbound.clone(),
        );
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<JobRecord>();
        let dispatcher = {
            let store = store.clone();
            tokio::spawn(async move {
                while let Some(job) = finished_rx.recv().await {
                    let Some(url) = job.webhook_url.clone() else {
                        continue;
                    };
                    let event = event_of(&job);
                    match JobView::load(&store, job).await {
                        Ok(view) => {
                            let body = serde_json::to_vec(&view).expect("a job view serializes");
                            webhooks.deliver(url, event, body);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "could not load a job for its webhook")
                        }
                    }
                }
            })
        };

        // Whatever was running when the last process stopped was abandoned;
        // on a database other processes share, only what no process renewed
        // in time (a running job may be another process's).
        let recovered = store
            .requeue_abandoned(now_ms(), !store.is_shared(), config.retry_limit)
            .await?;
        for id in &recovered.queued {
            tracing::warn!(job = %id, "job interrupted by the previous process; queued again");
        }
        for job in recovered.finished {
            tracing::warn!(job = %job.id, status = job.status.as_str(), "job interrupted by the previous process; finished");
            let _ = finished_tx.send(job);
        }
        remove_orphan_blobs(&store, &blobs).await?;

        // Subscribed before the API answers, so a job queued or canceled
        // through another process from now on is heard.
        let events = store.job_events().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot listen for queued jobs and cancels yet; polling meanwhile");
            None
        });
        let hook_tx = finished_tx.clone();
        let pool = WorkerPool::start(
            store.clone(),
            blobs.clone(),
            WorkerConfig {
                workers: config.worker_count(),
                idle_poll: Duration::from_millis(config.idle_poll_ms.max(10)),
                lease: Duration::from_millis(config.lease_ms.max(100)),
                retry_limit: config.retry_limit,
                shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
                progress_interval: Duration::from_millis(250),
                tensor_delay: Duration::from_millis(config.tensor_delay_ms),
            },
            Arc::new(move |job: &JobRecord| {
                let _ = hook_tx.send(job.clone());
            }),
            events,
        );
        let state = AppState {
            store: store.clone(),
            blobs,
            workers: pool.handle(),
            config: Arc::new(ApiConfig {
                max_upload_bytes: config.max_upload_bytes,
                api_keys: config
                    .api_keys
                    .iter()
                    .filter(|k| !k.is_empty())
                    .cloned()
                    .collect(),
            }),
            metrics: Some(prometheus()),
            outbound,
        };
        let router = api::router(state);
        Ok(Self {
            listener,
            router,
            pool,
            store,
            dispatcher,
            grace: Duration::from_secs(config.shutdown_grace_seconds),
            _lock: lock,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` resolves, then stops accepting requests,
    /// lets running jobs finish within the grace period (queuing the rest
    /// again) and closes the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let server = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        let mut server = tokio::spawn(async move { server.await });
        let server_ended = tokio::select! {
            _ = shutdown => None,
            r = &mut server => Some(r),
        };
        tracing::info!("stopping: no new requests or jobs");
        stop.cancel();
        self.pool.shutdown().await;
        let served = match server_ended {
            Some(r) => r,
            // In-flight requests get a bounded time to finish.
            None => match tokio::time::timeout(self.grace.max(Duration::from_secs(1)), &mut server)
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    server.abort();
                    Ok(Ok(()))
                }
            },
        };
        self.dispatcher.abort();
        self.store.close().await;
        tracing::info!("stopped");
        served
            .context("the server task failed")?
            .context("the server failed")
    }
}

/// Removes blobs that nothing refers to: left by a process that died
/// between storing a file and recording it. Under the blob lock, which
/// every process sharing the database (and so the bucket) takes to add a
/// reference: a blob another process has stored but not yet recorded is
/// stored and recorded under that lock, so it is never seen unreferenced
/// here.
async fn remove_orphan_blobs(store: &Store, blobs: &Blobs) -> anyhow::Result<()> {
    let _guard = blobs.lock().await?;
    let referenced: std::collections::HashSet<String> =
        store.referenced_blobs().await?.into_iter().collect();
    for sha in blobs.list().await.context("cannot list the blob store")? {
        if !referenced.contains(&sha) {
            tracing::info!(blob = %sha, "removing an unreferenced blob");
            blobs.remove(&sha).await;
        }
    }
    Ok(())
}
