//! Blobs in an S3-compatible bucket, under `PREFIX/blobs/<2 hex>/<sha256>`.
//!
//! Objects are written whole or not at all (a single put, or a multipart
//! upload that appears only once completed), so an object under its sha256
//! is always the complete content; identical content written twice is the
//! same object, so no conditional write is needed.
//!
//! Every failure of the bucket (refused connection, timeout, an error
//! status) comes back as an [`io::Error`] wrapping a [`BucketError`], which
//! [`super::StorageFault`] reads as [`super::StorageFault::Unavailable`]; a
//! missing object as [`io::ErrorKind::NotFound`].

use std::io;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig, WriteMultipart,
};
use tokio::io::AsyncReadExt;

use super::{is_sha256, BlobRead};

/// Bytes of each part of a multipart upload; files up to this size are
/// sent in one request.
pub const PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once: memory stays within
/// `(PARTS_IN_FLIGHT + 1) * PART_BYTES` whatever the file's size.
const PARTS_IN_FLIGHT: usize = 2;
/// How long a readiness probe waits for the bucket.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `s3://BUCKET/PREFIX` with the settings of its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
    /// `http(s)://HOST:PORT` of an S3-compatible server (path-style
    /// requests); AWS's endpoint for the region when `None`.
    pub endpoint: Option<String>,
    /// Credentials; taken from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (or AWS's other usual sources) when `None`.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Bytes the local cache of blobs may hold.
    pub cache_bytes: u64,
}

impl S3Location {
    /// Reads `s3://BUCKET/PREFIX` (the prefix may be empty); the other
    /// settings are left at their defaults.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("`{url}` is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!(
                "`{bucket}` is not a bucket name (3 to 63 lowercase letters, digits, `-` and `.`)"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || Path::parse(prefix).is_err()
        {
            return Err(format!("`{prefix}` is not a usable key prefix"));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            cache_bytes: 32 << 30,
        })
    }
}

/// A failure of the bucket: it could not be reached, or answered with an
/// error.
#[derive(Debug, thiserror::Error)]
#[error("the blob bucket failed: {0}")]
pub struct BucketError(#[source] pub object_store::Error);

fn bucket_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { path, .. } => {
            io::Error::new(io::ErrorKind::NotFound, format!("no object {path}"))
        }
        e => io::Error::other(BucketError(e)),
    }
}

/// The client of a bucket and where blobs are in it.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// `PREFIX/blobs`.
    root: Path,
}

impl Bucket {
    pub fn new(location: &S3Location) -> Result<Self, object_store::Error> {
        // The client's TLS (rustls) uses the ring provider, as every
        // outgoing connection of this process does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&location.bucket)
            // A bucket that does not answer fails a request within seconds
            // (503 to the client) rather than after minutes of retries.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(300)),
            );
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        if let Some(endpoint) = &location.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(key) = &location.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &location.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let root = if location.prefix.is_empty() {
            Path::from("blobs")
        } else {
            Path::from(format!("{}/blobs", location.prefix))
        };
        Ok(Self {
            store: Arc::new(builder.build()?),
            root,
        })
    }

    fn key(&self, sha256: &str) -> Path {
        self.root.clone().join(&sha256[..2]).join(sha256)
    }

    /// Whether the blob is stored.
    pub async fn exists(&self, sha256: &str) -> io::Result<bool> {
        match self.store.head(&self.key(sha256)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(bucket_error(e)),
        }
    }

    /// Uploads a complete file as the blob `sha256`: in one request when it
    /// is small, else in parts of [`PART_BYTES`], a bounded number at once.
    /// An upload that fails is aborted, leaving no object.
    pub async fn upload(&self, file: &FsPath, sha256: &str) -> io::Result<()> {
        let key = self.key(sha256);
        let mut f = tokio::fs::File::open(file).await?;
        let len = f.metadata().await?.len();
        if len <= PART_BYTES as u64 {
            let mut data = Vec::with_capacity(len as usize);
            f.read_to_end(&mut data).await?;
            self.store
                .put(&key, PutPayload::from(data))
                .await
                .map_err(bucket_error)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&key).await.map_err(bucket_error)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1 << 20];
        let sent: io::Result<()> = async {
            loop {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(bucket_error)?;
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                writer.write(&buf[..n]);
            }
        }
        .await;
        match sent {
            Ok(()) => {
                writer.finish().await.map_err(bucket_error)?;
                Ok(())
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(blob = sha256, error = %abort, "could not abort a failed upload; the bucket's lifecycle rules remove its parts");
                }
                Err(e)
            }
        }
    }

    /// Opens `range` of a blob (all of it when `None`) as a stream.
    pub async fn read(
        &self,
        sha256: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> io::Result<BlobRead> {
        let key = self.key(sha256);
        if let Some(r) = &range {
            if r.is_empty() {
                let meta = self.store.head(&key).await.map_err(bucket_error)?;
                return Ok(BlobRead {
                    len: meta.size,
                    stream: Box::pin(futures_util::stream::empty()),
                });
            }
        }
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let got = self
            .store
            .get_opts(&key, options)
            .await
            .map_err(bucket_error)?;
        let len = got.meta.size;
        Ok(BlobRead {
            len,
            stream: got.into_stream().map_err(bucket_error).boxed(),
        })
    }

    /// Deletes a blob; one that is not there is no error.
    pub async fn remove(&self, sha256: &str) -> io::Result<()> {
        match self.store.delete(&self.key(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(bucket_error(e)),
        }
    }

    /// Every blob in the bucket (under the prefix).
    pub async fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut objects = self.store.list(Some(&self.root));
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(bucket_error)?;
            let parts: Vec<_> = meta.location.parts().collect();
            let [.., dir, name] = parts.as_slice() else {
                continue;
            };
            let name = name.as_ref();
            if is_sha256(name) && dir.as_ref() == &name[..2] {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    /// Whether the bucket answers: one listing of the prefix, within a few
    /// seconds.
    pub async fn probe(&self) -> io::Result<()> {
        let listed = tokio::time::timeout(
            PROBE_TIMEOUT,
            self.store.list_with_delimiter(Some(&self.root)),
        )
        .await;
        match listed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(bucket_error(e)),
            Err(_) => Err(io::Error::other(BucketError(
                object_store::Error::Generic {
                    store: "S3",
                    source: "the bucket did not answer in time".into(),
                },
            ))),
        }
    }
}
