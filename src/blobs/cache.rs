//! The local cache of a bucket's blobs: `DATA_DIR/cache/<sha256>`, each a
//! complete file whose content was checked against its name.
//!
//! A blob is fetched into `tmp/` while it is hashed, and renamed into the
//! cache only when its sha256 matches; a mismatch or a failure leaves
//! nothing behind. Fetches of one blob in this process are serialized, so
//! it is downloaded once. Jobs get hard links to cached files: evicting a
//! file from the cache only removes its name there, never the job's.
//!
//! Eviction removes the least recently used files (by modification time,
//! touched on each use) until the cache is within its bound; a file still
//! linked into a job's directory frees nothing and is kept. An eviction
//! that fails is logged and never fails the job that triggered it.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::is_sha256;
use super::s3::Bucket;

type Slot = Arc<tokio::sync::Mutex<()>>;

pub struct Cache {
    dir: PathBuf,
    tmp: PathBuf,
    bound: u64,
    /// One lock per blob being fetched.
    fetching: Mutex<HashMap<String, Slot>>,
}

impl Cache {
    /// The cache in `dir`, fetching through `tmp` (on the same file system)
    /// and holding at most `bound` bytes beyond what running jobs use.
    pub fn open(dir: &Path, tmp: &Path, bound: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tmp: tmp.to_path_buf(),
            bound,
            fetching: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Hard-links the blob `sha256` at `dest`, fetching it first when it is
    /// not cached.
    pub async fn link(&self, bucket: &Bucket, sha256: &str, dest: &Path) -> io::Result<()> {
        // Eviction may remove the cached file between fetching and
        // linking; then it is fetched again.
        let mut tries = 0;
        loop {
            let cached = self.fetch(bucket, sha256).await?;
            match fs::hard_link(&cached, dest) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 2 => tries += 1,
                other => return other,
            }
        }
    }

    /// The cached file of `sha256`, fetched from the bucket when it is not
    /// cached, and touched as used.
    pub async fn fetch(&self, bucket: &Bucket, sha256: &str) -> io::Result<PathBuf> {
        let slot = self.slot(sha256);
        let fetched = {
            let _fetching = slot.lock().await;
            let path = self.path(sha256);
            if touch(&path).is_ok() {
                Ok(path)
            } else {
                self.download(bucket, sha256, &path).await.map(|()| path)
            }
        };
        self.release(sha256, slot);
        fetched
    }

    fn slot(&self, sha256: &str) -> Slot {
        let mut map = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(sha256.to_string()).or_default().clone()
    }

    fn release(&self, sha256: &str, slot: Slot) {
        let mut map = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and this one: nobody else waits for it.
        if Arc::strong_count(&slot) <= 2 {
            map.remove(sha256);
        }
    }

    /// Streams the blob into a file under `tmp/` while hashing it; renames
    /// it to `dest` only if its sha256 is `sha256`. The partial file is
    /// removed on every failure.
    async fn download(&self, bucket: &Bucket, sha256: &str, dest: &Path) -> io::Result<()> {
        let partial = self
            .tmp
            .join(format!("fetch-{sha256}-{}", uuid::Uuid::new_v4()));
        // Removes the partial file also when this future is dropped
        // half-way.
        let mut guard = Partial(Some(partial.clone()));
        let outcome = async {
            let mut stream = bucket.read(sha256, None).await?.stream;
            let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
            let path = partial.clone();
            // File writes and hashing off the runtime's threads; the
            // channel bounds what is held in memory.
            let writer = tokio::task::spawn_blocking(move || -> io::Result<String> {
                let mut out = io::BufWriter::with_capacity(1 << 20, fs::File::create(&path)?);
                let mut hasher = Sha256::new();
                while let Some(chunk) = rx.blocking_recv() {
                    hasher.update(&chunk);
                    out.write_all(&chunk)?;
                }
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                Ok(hex::encode(hasher.finalize()))
            });
            let mut received: io::Result<()> = Ok(());
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => {
                        if tx.send(chunk).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        received = Err(e);
                        break;
                    }
                }
            }
            drop(tx);
            let written = writer.await.map_err(io::Error::other)?;
            received?;
            let actual = written?;
            if actual != sha256 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the bucket's blob {sha256} is corrupt: its content hashes to {actual}"
                    ),
                ));
            }
            fs::rename(&partial, dest)
        }
        .await;
        if outcome.is_ok() {
            guard.0 = None;
        }
        outcome
    }

    /// Takes a just-uploaded file (under `tmp/`) into the cache, so that a
    /// job here reads it without fetching it back; then evicts. A failure
    /// only costs a later fetch.
    pub async fn adopt(&self, file: &Path, sha256: &str) {
        if let Err(e) = fs::rename(file, self.path(sha256)) {
            tracing::warn!(blob = sha256, error = %e, "could not keep an uploaded blob in the cache");
            let _ = fs::remove_file(file);
        }
        self.evict().await;
    }

    /// Removes the cached copy of a blob removed from the bucket.
    pub fn forget(&self, sha256: &str) {
        if let Err(e) = fs::remove_file(self.path(sha256)) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(blob = sha256, error = %e, "could not remove a cached blob");
            }
        }
    }

    /// Brings the cache within its bound; a failure is logged.
    pub async fn evict(&self) {
        let (dir, bound) = (self.dir.clone(), self.bound);
        match tokio::task::spawn_blocking(move || evict(&dir, bound)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not evict blobs from the cache"),
            Err(e) => tracing::warn!(error = %e, "evicting blobs from the cache panicked"),
        }
    }
}

/// A file removed when dropped, unless taken out.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// Marks a cached file as just used; fails when it is not there.
fn touch(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.set_modified(SystemTime::now())
}

/// Removes the least recently used files of `dir` that no job links to
/// until the files there hold at most `bound` bytes (or only linked ones
/// are left); returns the bytes held afterwards.
pub fn evict(dir: &Path, bound: u64) -> io::Result<u64> {
    let mut entries = Vec::new();
    let mut total = 0u64;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_str().is_some_and(is_sha256) {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) if m.is_file() => m,
            _ => continue,
        };
        total += meta.len();
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        entries.push((used, meta.len(), meta.nlink(), entry.path()));
    }
    entries.sort_by_key(|e| e.0);
    for (_, len, links, path) in entries {
        if total <= bound {
            break;
        }
        // Also linked from a job's directory: removing it frees nothing.
        if links > 1 {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => total -= len,
            Err(e) if e.kind() == io::ErrorKind::NotFound => total -= len,
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}
