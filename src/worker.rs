//! The worker pool: N tasks that take jobs from the queue and run them.
//!
//! Only workers run jobs; request handlers only enqueue and cancel. A worker
//! claims a job with a lease, runs [`run::compress_with_stats`] (with the
//! job's statistics, if any) on the blocking pool (never on the async
//! runtime's threads), renews the lease and writes the job's progress while
//! it runs, and writes the outcome — artifacts, summary and status together
//! — only if it still holds the lease. Cancellation is a flag the engine
//! polls between tensors; it is raised by a cancel request, by a shutdown
//! that outlasts its grace period, and by a lost lease.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::blobs::{seal_file, Blobs, StorageFault, TmpDir};
use crate::compress::report::Report;
use crate::compress::spec::Pipeline;
use crate::format::stats::StatsFile;
use crate::format::writer::Durability;
use crate::run::{self, CompressRequest, OutputFormat, Progress, RunError};
use crate::service::jobs::STATISTICS_FILE;
use crate::store::{
    now_ms, FinishOutcome, JobEvent, JobEvents, JobRecord, LeaseState, NewArtifact, ProgressUpdate,
    Store, Summary,
};

/// Called with every job that reaches a final status, wherever it happens.
pub type FinishedHook = Arc<dyn Fn(&JobRecord) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once; 0 runs none (a process that only serves the API,
    /// beside others that run the jobs).
    pub workers: usize,
    /// How often an idle worker looks for a job when nothing woke it: a
    /// job queued by another process, when no notification came.
    pub idle_poll: Duration,
    /// How long a claimed job is held without renewal before it counts as
    /// abandoned.
    pub lease: Duration,
    /// How many times an interrupted job is queued again before it fails.
    pub retry_limit: u32,
    /// How long running jobs may take to finish at shutdown before they are
    /// stopped and queued again.
    pub shutdown_grace: Duration,
    /// How often progress is written (at most).
    pub progress_interval: Duration,
    /// A pause after each tensor, to make jobs observable in tests and demos.
    pub tensor_delay: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            idle_poll: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            retry_limit: 2,
            shutdown_grace: Duration::from_secs(30),
            progress_interval: Duration::from_millis(250),
            tensor_delay: Duration::ZERO,
        }
    }
}

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum StopReason {
    None = 0,
    CancelRequested = 1,
    Shutdown = 2,
    LeaseLost = 3,
}

/// A running job's cancellation flag and the reason it was raised.
struct Stop {
    flag: AtomicBool,
    reason: AtomicU8,
}

impl Stop {
    fn new() -> Self {
        Self {
            flag: AtomicBool::new(false),
            reason: AtomicU8::new(StopReason::None as u8),
        }
    }

    /// Raises the flag; the first reason given is kept.
    fn raise(&self, reason: StopReason) {
        let _ = self.reason.compare_exchange(
            StopReason::None as u8,
            reason as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.flag.store(true, Ordering::SeqCst);
    }

    fn reason(&self) -> StopReason {
        match self.reason.load(Ordering::SeqCst) {
            1 => StopReason::CancelRequested,
            2 => StopReason::Shutdown,
            3 => StopReason::LeaseLost,
            _ => StopReason::None,
        }
    }
}

struct Shared {
    store: Store,
    blobs: Arc<Blobs>,
    config: WorkerConfig,
    /// Identifies this process; each lease is this and a claim's own id.
    owner: String,
    wake: Notify,
    running: Mutex<HashMap<String, Arc<Stop>>>,
    /// No new job is claimed once this is cancelled.
    stopping: CancellationToken,
    /// Running jobs are stopped (and queued again) once this is cancelled.
    interrupt: CancellationToken,
    on_finished: FinishedHook,
}

/// What request handlers may do with the pool.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
}

impl WorkerHandle {
    /// Tells idle workers that a job was queued.
    pub fn wake(&self) {
        self.shared.wake.notify_waiters();
    }

    /// Stops a job running in this process at its next tensor boundary (the
    /// cancel is also recorded in the database, where the worker would see
    /// it at its next lease renewal).
    pub fn cancel_running(&self, job_id: &str) {
        raise_cancel(&self.shared, job_id);
    }

    /// Reports a job that reached a final status outside a worker.
    pub fn finished(&self, job: &JobRecord) {
        record_finished(job);
        (self.shared.on_finished)(job);
    }

    /// How many jobs this process is running.
    pub fn running_jobs(&self) -> usize {
        self.shared.running.lock().map(|r| r.len()).unwrap_or(0)
    }
}

pub struct WorkerPool {
    handle: WorkerHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts the workers, the task that takes back abandoned jobs and,
    /// on a database other processes share, the task that hears their
    /// queued jobs and cancel requests (`events`, subscribed beforehand so
    /// that nothing sent once this returns is missed; made here, with
    /// retries, when `None`).
    pub fn start(
        store: Store,
        blobs: Arc<Blobs>,
        config: WorkerConfig,
        on_finished: FinishedHook,
        events: Option<JobEvents>,
    ) -> Self {
        let shared = Arc::new(Shared {
            store,
            blobs,
            owner: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4()),
            config,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            stopping: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            on_finished,
        });
        let mut tasks: Vec<JoinHandle<()>> = (0..shared.config.workers)
            .map(|n| tokio::spawn(worker_loop(shared.clone(), n)))
            .collect();
        tasks.push(tokio::spawn(reaper_loop(shared.clone())));
        if shared.store.is_shared() {
            tasks.push(tokio::spawn(listen_loop(shared.clone(), events)));
        }
        Self {
            handle: WorkerHandle { shared },
            tasks,
        }
    }

    pub fn handle(&self) -> WorkerHandle {
        self.handle.clone()
    }

    /// Stops claiming jobs, lets running ones finish within the grace
    /// period, then stops the rest and queues them again.
    pub async fn shutdown(self) {
        let shared = &self.handle.shared;
        shared.stopping.cancel();
        shared.wake.notify_waiters();
        let grace = shared.config.shutdown_grace;
        let interrupt = shared.interrupt.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::warn!(
                "jobs still running after the shutdown grace period; stopping them to run again later"
            );
            interrupt.cancel();
        });
        for t in self.tasks {
            let _ = t.await;
        }
        timer.abort();
    }
}

/// The lease a claimed job was taken with: every write of its worker names
/// it.
fn lease_of(job: &JobRecord) -> &str {
    job.lease_owner.as_deref().unwrap_or_default()
}

fn lease_until(config: &WorkerConfig) -> i64 {
    now_ms() + config.lease.as_millis() as i64
}

async fn worker_loop(shared: Arc<Shared>, n: usize) {
    let idle_poll = shared.config.idle_poll;
    loop {
        if shared.stopping.is_cancelled() {
            break;
        }
        // Registered before looking for work, so a job queued in between
        // still wakes this worker.
        let notified = shared.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A lease is one claim's, not the process's: a worker of this
        // process that stalled past its lease, while another worker here
        // claimed the job again, must find the job no longer its own.
        let lease = format!("{}/{}", shared.owner, uuid::Uuid::new_v4());
        match shared
            .store
            .claim_next_job(&lease, lease_until(&shared.config))
            .await
        {
            Ok(Some(job)) => {
                // Every line of the job carries the request that created it.
                let span = tracing::info_span!(
                    "job",
                    job = %job.id,
                    request_id = job.request_id.as_deref().unwrap_or("-"),
                );
                async {
                    tracing::info!(worker = n, attempt = job.attempts, "job claimed");
                    run_job(&shared, job).await;
                }
                .instrument(span)
                .await;
            }
            Ok(None) => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(idle_poll) => {}
                    _ = shared.stopping.cancelled() => {}
                }
            }
            Err(e) => {
                tracing::error!(worker = n, error = %e, "could not claim a job");
                tokio::select! {
                    _ = tokio::time::sleep(idle_poll) => {}
                    _ = shared.stopping.cancelled() => {}
                }
            }
        }
    }
}

/// Raises the stop flag of a job if this process runs it.
fn raise_cancel(shared: &Shared, job_id: &str) -> bool {
    let stop = shared
        .running
        .lock()
        .ok()
        .and_then(|r| r.get(job_id).cloned());
    match stop {
        Some(stop) => {
            stop.raise(StopReason::CancelRequested);
            true
        }
        None => false,
    }
}

/// Hears other processes (and this one) through the shared database: a
/// queued job wakes the idle workers, a cancel request stops the job if it
/// runs here. Polling and lease renewals stay the fallback: while the
/// connection is down, or after it was lost (notifications sent meanwhile
/// are gone), nothing is slower than without this task.
async fn listen_loop(shared: Arc<Shared>, events: Option<JobEvents>) {
    let retry = Duration::from_secs(1)..Duration::from_secs(30);
    let mut delay = retry.start;
    let mut events = events;
    loop {
        if events.is_none() {
            match shared.store.job_events().await {
                Ok(Some(e)) => {
                    tracing::info!("listening for queued jobs and cancels again");
                    delay = retry.start;
                    events = Some(e);
                    // Whatever was sent while not listening was missed.
                    shared.wake.notify_waiters();
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for queued jobs and cancels; polling meanwhile");
                    if !back_off(&shared, &mut delay, retry.end).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(subscribed) = events.as_mut() else {
            continue;
        };
        let event = tokio::select! {
            e = subscribed.next() => e,
            _ = shared.stopping.cancelled() => return,
        };
        match event {
            Ok(JobEvent::Queued) => shared.wake.notify_waiters(),
            Ok(JobEvent::CancelRequested(id)) => {
                if raise_cancel(&shared, &id) {
                    tracing::info!(job = %id, "cancel requested; stopping the job");
                }
            }
            Ok(JobEvent::Reconnected) => shared.wake.notify_waiters(),
            Err(e) => {
                // The subscription is dropped and made again: its
                // connection may be gone with the server.
                tracing::warn!(error = %e, "lost the connection that listens for queued jobs and cancels; polling meanwhile");
                events = None;
                if !back_off(&shared, &mut delay, retry.end).await {
                    return;
                }
            }
        }
    }
}

/// Waits `delay` and doubles it up to `max`; false when the service stops
/// meanwhile.
async fn back_off(shared: &Shared, delay: &mut Duration, max: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {}
        _ = shared.stopping.cancelled() => return false,
    }
    *delay = (*delay * 2).min(max);
    true
}

/// Takes back jobs whose lease expired: a worker that stalls or a process
/// that stopped renewing.
async fn reaper_loop(shared: Arc<Shared>) {
    let period = (shared.config.lease / 2).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.stopping.cancelled() => break,
        }
        match shared
            .store
            .requeue_abandoned(now_ms(), false, shared.config.retry_limit)
            .await
        {
            Ok(r) => {
                for id in &r.queued {
                    tracing::warn!(job = %id, "lease expired; job queued again");
                }
                for job in &r.finished {
                    tracing::warn!(job = %job.id, status = job.status.as_str(), "lease expired; job finished");
                    record_finished(job);
                    (shared.on_finished)(job);
                }
                if !r.queued.is_empty() {
                    shared.wake.notify_waiters();
                }
            }
            Err(e) => tracing::error!(error = %e, "could not take back abandoned jobs"),
        }
        let blobs = shared.blobs.clone();
        let _ = tokio::task::spawn_blocking(move || blobs.remove_leftovers()).await;
    }
}

/// Progress of a running job, written by the engine's thread and read by
/// the worker task that records it.
struct JobProgress {
    state: Mutex<ProgressUpdate>,
    version: AtomicU64,
    delay: Duration,
    /// Cuts the delay short.
    stop: Arc<Stop>,
}

impl JobProgress {
    fn snapshot(&self) -> (u64, Option<ProgressUpdate>) {
        let version = self.version.load(Ordering::SeqCst);
        (version, self.state.lock().ok().map(|s| s.clone()))
    }
}

impl Progress for JobProgress {
    fn phase(&self, name: &str, total: usize) {
        if let Ok(mut s) = self.state.lock() {
            *s = ProgressUpdate {
                stage: name.to_string(),
                tensors_done: 0,
                tensors_total: total as i64,
            };
        }
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    fn tensor_done(&self, _name: &str, done: usize, total: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.tensors_done = done as i64;
            s.tensors_total = total as i64;
        }
        self.version.fetch_add(1, Ordering::SeqCst);
        // The pause ends early once the job is asked to stop, so that a
        // stop is seen as soon as with no pause.
        let until = Instant::now() + self.delay;
        while !self.stop.flag.load(Ordering::SeqCst) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// Why a job failed, as shown to the client.
struct Failure {
    code: &'static str,
    message: String,
}

impl Failure {
    fn internal() -> Self {
        Self {
            code: "internal_error",
            message: "The job failed because of a problem on the server; the server log has the details. Submitting it again may work.".into(),
        }
    }

    fn storage(fault: StorageFault) -> Self {
        match fault {
            StorageFault::Full => Self {
                code: "insufficient_storage",
                message: "The server's storage filled up while the job ran; its partial output was removed. Submit it again once the operator has freed space.".into(),
            },
            StorageFault::ReadOnly => Self {
                code: "storage_unavailable",
                message: "The server's storage could not be written while the job ran. Submit it again once the operator has fixed it.".into(),
            },
            StorageFault::Unavailable => Self {
                code: "storage_unavailable",
                message: "The server's blob storage could not be reached while the job ran. Submit it again later.".into(),
            },
        }
    }

    /// A failure of the machine rather than of the job: logged, and told
    /// to the client as a storage fault when it is one.
    fn of_server(job: &str, context: &str, e: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(job, error = %e, "{context}");
        match StorageFault::find(e) {
            Some(fault) => Self::storage(fault),
            None => Self::internal(),
        }
    }
}

/// The inputs of a job, laid out under `tmp/`.
struct Prepared {
    dir: TmpDir,
    input: PathBuf,
    output: PathBuf,
    pipeline: Pipeline,
    format: OutputFormat,
    /// The statistics file and its sha256, when the job runs with
    /// statistics.
    statistics: Option<(PathBuf, String)>,
}

async fn prepare(shared: &Shared, job: &JobRecord) -> Result<Prepared, Failure> {
    let (pipeline, format) = (job.pipeline.clone(), job.output_format);
    let files = shared.store.model_files(&job.model_id).await.map_err(|e| {
        tracing::error!(job = %job.id, error = %e, "could not read the model's files");
        e.storage_fault()
            .map_or_else(Failure::internal, Failure::storage)
    })?;
    if files.is_empty() {
        return Err(Failure {
            code: "model_not_found",
            message: format!("Model {} no longer exists.", job.model_id),
        });
    }
    let dir = shared
        .blobs
        .tmp_dir(&format!("job-{}", job.id))
        .map_err(|e| Failure::of_server(&job.id, "could not create the job's directory", &e))?;
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    let names: Vec<(&str, &str)> = files
        .iter()
        .map(|f| (f.name.as_str(), f.sha256.as_str()))
        .collect();
    let laid_out = match std::fs::create_dir(&input) {
        Ok(()) => shared.blobs.checkout(&names, &input).await,
        Err(e) => Err(e),
    };
    if let Err(e) = laid_out {
        return Err(Failure::of_server(
            &job.id,
            "could not lay out the model's files",
            &e,
        ));
    }
    let statistics = match &job.statistics_id {
        None => None,
        Some(id) => {
            let record = shared
                .store
                .get_statistics(&job.model_id, id)
                .await
                .map_err(|e| {
                    tracing::error!(job = %job.id, error = %e, "could not read the job's statistics");
                    e.storage_fault()
                        .map_or_else(Failure::internal, Failure::storage)
                })?
                .ok_or_else(|| Failure {
                    code: "statistics_not_found",
                    message: format!("Statistics {id} of model {} no longer exist.", job.model_id),
                })?;
            shared
                .blobs
                .checkout(&[(STATISTICS_FILE, record.sha256.as_str())], dir.path())
                .await
                .map_err(|e| {
                    Failure::of_server(&job.id, "could not lay out the job's statistics", &e)
                })?;
            Some((dir.path().join(STATISTICS_FILE), record.sha256))
        }
    };
    Ok(Prepared {
        dir,
        input,
        output,
        pipeline,
        format,
        statistics,
    })
}

/// Runs `f` on the blocking thread pool, off the async runtime; a panic in
/// it comes back as its message, and the calling worker goes on.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let task = tokio::task::spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(f)));
    match task.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(payload)) => Err(panic_message(&*payload)),
        Err(e) => Err(e.to_string()),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

async fn run_job(shared: &Arc<Shared>, job: JobRecord) {
    let id = job.id.clone();
    let stop = Arc::new(Stop::new());
    if let Ok(mut r) = shared.running.lock() {
        r.insert(id.clone(), stop.clone());
    }
    if job.cancel_requested {
        stop.raise(StopReason::CancelRequested);
    }
    let started = Instant::now();
    let outcome = match prepare(shared, &job).await {
        Ok(prepared) => execute(shared, &job, prepared, &stop).await,
        Err(f) => Outcome::Failed(f),
    };
    if let Ok(mut r) = shared.running.lock() {
        r.remove(&id);
    }
    let owner = lease_of(&job);
    let store = &shared.store;
    let finished = match outcome {
        Outcome::Succeeded(record) => Ok(Some(*record)),
        Outcome::Failed(f) => {
            tracing::info!(job = %id, code = f.code, "job failed");
            store.finish_failed(&id, owner, f.code, &f.message).await
        }
        Outcome::Stopped(StopReason::Shutdown) => {
            match store.release_job(&id, owner).await {
                Ok(true) => tracing::info!(job = %id, "job interrupted by shutdown; queued again"),
                Ok(false) => {}
                Err(e) => tracing::error!(job = %id, error = %e, "could not queue the job again"),
            }
            Ok(None)
        }
        Outcome::Stopped(StopReason::LeaseLost) => {
            tracing::warn!(job = %id, "lease lost while running; the result is discarded");
            Ok(None)
        }
        Outcome::Stopped(_) => store.finish_canceled(&id, owner).await,
    };
    match finished {
        Ok(Some(record)) => {
            metrics::histogram!("modelpress_job_duration_seconds", "status" => record.status.as_str())
                .record(started.elapsed().as_secs_f64());
            record_finished(&record);
            (shared.on_finished)(&record);
        }
        Ok(None) => {}
        Err(e) => tracing::error!(job = %id, error = %e, "could not record the job's outcome"),
    }
}

enum Outcome {
    Succeeded(Box<JobRecord>),
    Failed(Failure),
    Stopped(StopReason),
}

fn record_finished(job: &JobRecord) {
    metrics::counter!("modelpress_jobs_finished_total", "status" => job.status.as_str())
        .increment(1);
}

async fn execute(
    shared: &Arc<Shared>,
    job: &JobRecord,
    prepared: Prepared,
    stop: &Arc<Stop>,
) -> Outcome {
    let progress = Arc::new(JobProgress {
        state: Mutex::new(ProgressUpdate {
            stage: "queued".into(),
            tensors_done: 0,
            tensors_total: 0,
        }),
        version: AtomicU64::new(0),
        delay: shared.config.tensor_delay,
        stop: stop.clone(),
    });
    let Prepared {
        dir,
        input,
        output,
        pipeline,
        format,
        statistics,
    } = prepared;
    let engine = {
        let progress = progress.clone();
        let stop = stop.clone();
        let (input, output) = (input.clone(), output.clone());
        off_runtime(move || {
            // Success is recorded only for output that is on the disk.
            let req = CompressRequest {
                pipeline: &pipeline,
                format,
                config: None,
                durability: Durability::Synced,
            };
            // Stored under its hash, its values checked at upload and
            // again by each stage as it reads them.
            let stats = match &statistics {
                None => None,
                Some((path, sha256)) => {
                    let mut s = StatsFile::open_hashed(path, sha256)?;
                    s.trust_values();
                    Some(s)
                }
            };
            run::compress_with_stats(
                &input,
                &output,
                &req,
                stats.as_ref(),
                &*progress,
                &stop.flag,
            )
        })
    };
    tokio::pin!(engine);
    let mut ticker = tokio::time::interval(shared.config.progress_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_every = shared.config.lease / 3;
    let mut last_renewal = Instant::now();
    let mut written_version = 0;
    let interrupt = shared.interrupt.clone();
    // The engine's result, or the message of its panic.
    let ran: Result<Result<Report, RunError>, String> = loop {
        tokio::select! {
            r = &mut engine => break r,
            _ = ticker.tick() => {
                let (version, state) = progress.snapshot();
                if version == written_version && last_renewal.elapsed() < renew_every {
                    continue;
                }
                let update = state.filter(|_| version != written_version);
                match shared
                    .store
                    .renew_lease(&job.id, lease_of(job), lease_until(&shared.config), update.as_ref())
                    .await
                {
                    Ok(LeaseState::Held { cancel_requested }) => {
                        written_version = version;
                        last_renewal = Instant::now();
                        if cancel_requested {
                            stop.raise(StopReason::CancelRequested);
                        }
                    }
                    Ok(LeaseState::Lost) => stop.raise(StopReason::LeaseLost),
                    Err(e) => tracing::warn!(job = %job.id, error = %e, "could not renew the lease"),
                }
            }
            _ = interrupt.cancelled(), if !stop.flag.load(Ordering::SeqCst) => {
                stop.raise(StopReason::Shutdown);
            }
        }
    };
    let outcome = match ran {
        Err(message) => {
            tracing::error!(job = %job.id, panic = %message, "the engine panicked");
            Outcome::Failed(Failure {
                code: "internal_error",
                message: "The compression engine failed unexpectedly on this job; the server log has the details.".into(),
            })
        }
        Ok(Err(RunError::Canceled)) => Outcome::Stopped(match stop.reason() {
            StopReason::None => StopReason::CancelRequested,
            r => r,
        }),
        Ok(Err(e)) => match e.code() {
            Some(code) => Outcome::Failed(Failure {
                code,
                message: e
                    .to_string()
                    .replace(&format!("{}/", input.display()), "")
                    .replace(&format!("{}/", dir.path().display()), ""),
            }),
            None => Outcome::Failed(Failure::of_server(&job.id, "the job failed", &e)),
        },
        // Finished despite a late stop: the work is kept unless the job
        // was canceled or is no longer ours, which recording it checks.
        Ok(Ok(report)) => return store_outcome(shared, job, dir, &output, &report).await,
    };
    // Removed before the outcome is recorded: a finished job has nothing
    // left under tmp/.
    drop(dir);
    outcome
}

/// The order artifacts are listed in: weights, index, config, report.
fn artifact_rank(name: &str) -> (u8, String) {
    let rank = if name.ends_with(".safetensors") {
        0
    } else if name.ends_with(".index.json") {
        1
    } else if name == "report.json" {
        3
    } else {
        2
    };
    (rank, name.to_string())
}

/// Hashes the output files, moves them into the blob store and records the
/// success, all or nothing. The job's directory under `tmp/` is removed
/// before the success is recorded.
async fn store_outcome(
    shared: &Arc<Shared>,
    job: &JobRecord,
    dir: TmpDir,
    output: &Path,
    report: &Report,
) -> Outcome {
    let out_dir = output.to_path_buf();
    let hashed =
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<(PathBuf, NewArtifact)>> {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(&out_dir)? {
                let entry = entry?;
                if !entry.file_type()?.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let (sha256, bytes) = seal_file(&entry.path())?;
                files.push((
                    entry.path(),
                    NewArtifact {
                        name,
                        sha256,
                        bytes: bytes as i64,
                    },
                ));
            }
            files.sort_by_key(|(_, a)| artifact_rank(&a.name));
            Ok(files)
        })
        .await;
    let files = match hashed {
        Ok(Ok(files)) => files,
        Ok(Err(e)) => {
            return Outcome::Failed(Failure::of_server(
                &job.id,
                "could not hash the job's output",
                &e,
            ))
        }
        Err(e) => {
            tracing::error!(job = %job.id, error = %e, "hashing the job's output panicked");
            return Outcome::Failed(Failure::internal());
        }
    };
    let summary = Summary {
        bytes_before: report.totals.bytes_before as i64,
        bytes_after: report.totals.bytes_after as i64,
        ratio: report.totals.ratio,
        parameters_kept: report.totals.parameters_kept,
        duration_seconds: report.totals.seconds_total,
    };
    let artifacts: Vec<NewArtifact> = files.iter().map(|(_, a)| a.clone()).collect();

    // Uploaded before the lock is taken, which other processes wait for.
    for (path, a) in &files {
        if let Err(e) = shared.blobs.stage(path, &a.sha256).await {
            return Outcome::Failed(Failure::of_server(
                &job.id,
                "could not store an artifact",
                &e,
            ));
        }
    }
    let _guard = match shared.blobs.lock().await {
        Ok(guard) => guard,
        Err(e) => {
            tracing::error!(job = %job.id, error = %e, "could not take the blob lock");
            return Outcome::Failed(
                e.storage_fault()
                    .map_or_else(Failure::internal, Failure::storage),
            );
        }
    };
    let mut added = Vec::new();
    for (path, a) in &files {
        match shared.blobs.commit(path, &a.sha256).await {
            Ok(true) => added.push(a.sha256.clone()),
            Ok(false) => {}
            Err(e) => {
                remove_unreferenced(shared, &added).await;
                return Outcome::Failed(Failure::of_server(
                    &job.id,
                    "could not store an artifact",
                    &e,
                ));
            }
        }
    }
    drop(dir);
    let finished = shared
        .store
        .finish_succeeded(&job.id, lease_of(job), &summary, &artifacts)
        .await;
    match finished {
        Ok(FinishOutcome::Finished(record)) => {
            let written: i64 = artifacts.iter().map(|a| a.bytes).sum();
            metrics::counter!("modelpress_bytes_written_total").increment(written as u64);
            tracing::info!(job = %job.id, ratio = summary.ratio, "job succeeded");
            Outcome::Succeeded(record)
        }
        Ok(FinishOutcome::CancelRequested) => {
            remove_unreferenced(shared, &added).await;
            Outcome::Stopped(StopReason::CancelRequested)
        }
        Ok(FinishOutcome::LeaseLost) => {
            remove_unreferenced(shared, &added).await;
            Outcome::Stopped(StopReason::LeaseLost)
        }
        Err(e) => {
            remove_unreferenced(shared, &added).await;
            tracing::error!(job = %job.id, error = %e, "could not record the job's success");
            Outcome::Failed(
                e.storage_fault()
                    .map_or_else(Failure::internal, Failure::storage),
            )
        }
    }
}

/// Removes blobs this job added that nothing refers to. Call under the blob
/// lock.
async fn remove_unreferenced(shared: &Shared, added: &[String]) {
    for sha in added {
        if let Ok(false) = shared.store.blob_is_referenced(sha).await {
            shared.blobs.remove(sha).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_off_the_runtime_comes_back_as_its_message() {
        let r: Result<(), String> = off_runtime(|| panic!("tensor {} broke", 3)).await;
        assert_eq!(r, Err("tensor 3 broke".to_string()));
        let r: Result<(), String> = off_runtime(|| std::panic::panic_any(7u8)).await;
        assert_eq!(r, Err("a panic without a message".to_string()));
        // The caller goes on: the next job runs.
        assert_eq!(off_runtime(|| 2 + 2).await, Ok(4));
    }
}
