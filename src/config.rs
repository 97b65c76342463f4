//! The settings of `modelpress serve`: flags, each with a `MODELPRESS_*`
//! environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Run the HTTP service.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "modelpress serve", args_override_self = true)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "MODELPRESS_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Directory of the database, blobs and temporary files.
    #[arg(long, env = "MODELPRESS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Database URL: `sqlite://PATH` (or a bare path), or
    /// `postgres://USER@HOST:PORT/DB` for a PostgreSQL database that
    /// exists; default `sqlite://DATA_DIR/modelpress.db`.
    #[arg(long, env = "MODELPRESS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where blobs (uploaded files, artifacts) are kept: `file://DIR`, or
    /// `s3://BUCKET/PREFIX` for an S3-compatible bucket that processes
    /// sharing a PostgreSQL database can share too; default
    /// `file://DATA_DIR/blobs`.
    #[arg(long, env = "MODELPRESS_BLOB_STORE", value_name = "URL", value_parser = parse_blob_store)]
    pub blob_store: Option<BlobStore>,
    /// Endpoint of an S3-compatible server, e.g. `http://127.0.0.1:9000`
    /// (path-style requests; `http://` allowed); default AWS's. Region and
    /// credentials come from the usual `AWS_*` variables (region
    /// `us-east-1` when unset).
    #[arg(long, env = "MODELPRESS_S3_ENDPOINT", value_name = "URL", value_parser = parse_endpoint)]
    pub s3_endpoint: Option<String>,
    /// Access key of the bucket; `AWS_ACCESS_KEY_ID` is the usual way.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide = true, hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// Secret key of the bucket; `AWS_SECRET_ACCESS_KEY` is the usual way.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        hide = true,
        hide_env_values = true
    )]
    pub s3_secret_access_key: Option<String>,
    /// Bytes the local cache of a bucket's blobs (`DATA_DIR/cache`) may
    /// hold, beyond the files running jobs use.
    #[arg(long, env = "MODELPRESS_BLOB_CACHE_BYTES", default_value_t = 32 << 30)]
    pub blob_cache_bytes: u64,
    /// Jobs run at once; default: the number of cores. 0 runs none: the
    /// process serves the API while others sharing its database run the
    /// jobs.
    #[arg(long, env = "MODELPRESS_WORKERS")]
    pub workers: Option<usize>,
    /// Largest upload accepted, in bytes (all files of one upload together).
    #[arg(long, env = "MODELPRESS_MAX_UPLOAD_BYTES", default_value_t = 16 << 30)]
    pub max_upload_bytes: u64,
    /// An API key clients must send as `Authorization: Bearer KEY` on /v1
    /// routes; repeat for several (the variable takes a comma-separated list).
    /// Without any, the API is open.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "MODELPRESS_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// How many times a job interrupted by a crash or a stall is queued
    /// again before it fails.
    #[arg(long, env = "MODELPRESS_RETRY_LIMIT", default_value_t = 2)]
    pub retry_limit: u32,
    /// Seconds running jobs get to finish at shutdown before they are
    /// stopped and queued again.
    #[arg(long, env = "MODELPRESS_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// Log line format; `RUST_LOG` sets what is logged (default `info`).
    #[arg(
        long,
        env = "MODELPRESS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// A target outgoing requests (webhooks) may reach although the
    /// outbound policy refuses it (loopback, private, link-local and other
    /// special addresses): a CIDR block (`10.20.0.0/16`), an address, or a
    /// host name. Repeat for several (the variable takes a comma-separated
    /// list). This server's own address stays refused.
    #[arg(
        long = "allow-outbound",
        value_name = "CIDR|HOST",
        env = "MODELPRESS_ALLOW_OUTBOUND",
        value_delimiter = ','
    )]
    pub allow_outbound: Vec<crate::outbound::Allow>,
    /// Secret of the webhook signatures (HMAC-SHA256 of the body, in
    /// `X-Modelpress-Signature: sha256=<hex>`); unsigned when absent.
    #[arg(long, env = "MODELPRESS_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Milliseconds a job's lease lasts without renewal.
    #[arg(
        long,
        env = "MODELPRESS_LEASE_MS",
        default_value_t = 30_000,
        hide = true
    )]
    pub lease_ms: u64,
    /// Milliseconds between an idle worker's looks for a job when nothing
    /// woke it (a job queued by another process that sent no notification).
    #[arg(
        long,
        env = "MODELPRESS_IDLE_POLL_MS",
        default_value_t = 1_000,
        hide = true
    )]
    pub idle_poll_ms: u64,
    /// Milliseconds before a failed webhook delivery is retried (doubling).
    #[arg(
        long,
        env = "MODELPRESS_WEBHOOK_RETRY_MS",
        default_value_t = 1_000,
        hide = true
    )]
    pub webhook_retry_ms: u64,
    /// A pause after each tensor of a job, in milliseconds, so that progress
    /// and cancellation can be watched on small models (tests, demos).
    #[arg(
        long,
        env = "MODELPRESS_TENSOR_DELAY_MS",
        default_value_t = 0,
        hide = true
    )]
    pub tensor_delay_ms: u64,
}

/// `--blob-store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobStore {
    /// `file://DIR`.
    Dir(PathBuf),
    /// `s3://BUCKET/PREFIX`.
    S3 { bucket: String, prefix: String },
}

fn parse_blob_store(text: &str) -> Result<BlobStore, String> {
    if let Some(dir) = text.strip_prefix("file://") {
        if dir.is_empty() {
            return Err(
                "`file://` needs a directory, e.g. file:///var/lib/modelpress/blobs".into(),
            );
        }
        return Ok(BlobStore::Dir(PathBuf::from(dir)));
    }
    if text.starts_with("s3://") {
        let location = crate::blobs::s3::S3Location::parse(text)?;
        return Ok(BlobStore::S3 {
            bucket: location.bucket,
            prefix: location.prefix,
        });
    }
    Err(format!(
        "`{text}` is neither file://DIR nor s3://BUCKET/PREFIX"
    ))
}

fn parse_endpoint(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or_else(|| format!("`{text}` is not an http:// or https:// URL"))?;
    if rest.trim_end_matches('/').is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("`{text}` names no host"));
    }
    Ok(text.trim_end_matches('/').to_string())
}

impl ServeConfig {
    /// Where blobs are kept, `data_dir` being the (absolute) data
    /// directory; a directory is made absolute, so that the links jobs
    /// read blobs through hold wherever they are resolved from.
    pub fn blob_location(
        &self,
        data_dir: &std::path::Path,
    ) -> std::io::Result<crate::blobs::Location> {
        use crate::blobs::{s3::S3Location, Location};
        Ok(match &self.blob_store {
            None => Location::Local(data_dir.join("blobs")),
            Some(BlobStore::Dir(dir)) => Location::Local(std::path::absolute(dir)?),
            Some(BlobStore::S3 { bucket, prefix }) => Location::S3(S3Location {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                endpoint: self.s3_endpoint.clone(),
                access_key_id: self.s3_access_key_id.clone(),
                secret_access_key: self.s3_secret_access_key.clone(),
                cache_bytes: self.blob_cache_bytes,
            }),
        })
    }

    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}
