//! Content-addressed files: every uploaded model file and every artifact is
//! stored once, under its sha256, in one of two places chosen by
//! `--blob-store`:
//!
//! - a directory (`file://DIR`, by default `DATA_DIR/blobs`), as
//!   `<first two hex digits>/<sha256>`;
//! - an S3-compatible bucket (`s3://BUCKET/PREFIX`), under the keys
//!   `PREFIX/blobs/<first two hex digits>/<sha256>` ([`s3`]), which several
//!   processes sharing one PostgreSQL database can share too. Blobs a job
//!   reads are fetched into a bounded local cache, `DATA_DIR/cache/`
//!   ([`cache`]).
//!
//! Files are written under `tmp/` and moved into the store only once
//! complete and synced (an atomic rename in a directory; an upload whose
//! object appears only once complete in a bucket), so a stored blob is
//! always whole. Whatever is under `tmp/` when the service starts was left
//! by a process that died, and is removed.
//!
//! Deciding that a blob is unreferenced and removing it must not interleave
//! with another request adding a reference to the same content: both happen
//! under [`Blobs::lock`], which on a PostgreSQL database also holds a lock
//! every process sharing that database takes.
//!
//! A temporary directory is removed as soon as its owner is done with it.
//! When that fails (a file system that turned read-only), the directory is
//! remembered and removal is tried again by [`Blobs::remove_leftovers`],
//! which the worker pool calls periodically, so it does not wait for the
//! next start.

mod cache;
pub mod s3;
#[cfg(test)]
mod tests;

use std::error::Error as StdError;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::store::{BlobsLock, Store, StoreError};
use cache::Cache;

pub struct Blobs {
    backend: Backend,
    tmp: PathBuf,
    lock: tokio::sync::Mutex<()>,
    /// The database whose lock [`Self::lock`] also takes, when it has one.
    shared_lock: Option<Store>,
    leftovers: Leftovers,
}

/// Where blobs are kept.
enum Backend {
    /// A directory, `<2 hex>/<sha256>` under it.
    Local(PathBuf),
    /// A bucket, read through the local cache.
    S3 { bucket: s3::Bucket, cache: Cache },
}

/// Where to keep blobs: `--blob-store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory.
    Local(PathBuf),
    /// An S3-compatible bucket.
    S3(s3::S3Location),
}

/// Holds [`Blobs::lock`]: the process's mutex and, on PostgreSQL, the
/// database-wide lock.
pub struct BlobsGuard<'a> {
    _shared: Option<BlobsLock>,
    _local: tokio::sync::MutexGuard<'a, ()>,
}

/// A stored blob opened for reading: its whole length and the bytes of
/// the range asked for.
pub struct BlobRead {
    pub len: u64,
    pub stream: futures_util::stream::BoxStream<'static, io::Result<bytes::Bytes>>,
}

/// Temporary directories whose removal failed, to be tried again.
type Leftovers = Arc<Mutex<Vec<PathBuf>>>;

/// A directory under `tmp/`, removed with everything in it when dropped.
#[derive(Debug)]
pub struct TmpDir {
    path: PathBuf,
    leftovers: Leftovers,
}

impl TmpDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), error = %e, "could not remove a temporary directory; trying again later");
                if let Ok(mut l) = self.leftovers.lock() {
                    l.push(self.path.clone());
                }
            }
        }
    }
}

/// A failure of the storage itself, as opposed to any other I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFault {
    /// No space left on the device, or a quota is exhausted.
    Full,
    /// The file system is read-only.
    ReadOnly,
    /// The bucket blobs are kept in cannot be reached, or failed.
    Unavailable,
}

impl StorageFault {
    /// The fault an I/O error reports, if it is one.
    pub fn of_io(e: &io::Error) -> Option<StorageFault> {
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                return Some(StorageFault::Full)
            }
            io::ErrorKind::ReadOnlyFilesystem => return Some(StorageFault::ReadOnly),
            _ => {}
        }
        if e.get_ref()
            .is_some_and(|inner| inner.is::<s3::BucketError>())
        {
            return Some(StorageFault::Unavailable);
        }
        // ENOSPC, EDQUOT and EROFS on Linux, for errors built from raw codes
        // that were not mapped to a kind.
        match e.raw_os_error() {
            Some(28 | 122) => Some(StorageFault::Full),
            Some(30) => Some(StorageFault::ReadOnly),
            _ => None,
        }
    }

    /// The first storage fault in an error's chain of sources.
    pub fn find(e: &(dyn StdError + 'static)) -> Option<StorageFault> {
        let mut next = Some(e);
        while let Some(e) = next {
            if let Some(fault) = e.downcast_ref::<io::Error>().and_then(Self::of_io) {
                return Some(fault);
            }
            next = e.source();
        }
        None
    }
}

/// Whether `s` looks like a sha256 in lowercase hex (the only names allowed
/// under `blobs/`).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Hashes a complete file under `tmp/` and flushes it to disk, so that it
/// is ready for [`Blobs::commit`]; returns its hex sha256 and length.
pub fn seal_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    file.sync_all()?;
    Ok((hex::encode(hasher.finalize()), len))
}

/// Writes a new file under `tmp/` while hashing it; [`Self::finish`] seals it
/// for [`Blobs::commit`] as [`seal_file`] does, without reading it again.
pub struct SealingWriter {
    out: io::BufWriter<fs::File>,
    hasher: Sha256,
    len: u64,
}

impl SealingWriter {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            out: io::BufWriter::with_capacity(1 << 20, fs::File::create(path)?),
            hasher: Sha256::new(),
            len: 0,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    /// Flushes the file to disk; returns its hex sha256 and length.
    pub fn finish(self) -> io::Result<(String, u64)> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((hex::encode(self.hasher.finalize()), self.len))
    }
}

impl Blobs {
    /// Opens the blob store of a data directory at `location`, creating
    /// `tmp/` (and the directory of blobs, or the cache of a bucket), and
    /// clears what a previous process left in `tmp/`. Nothing is asked of a
    /// bucket yet.
    pub fn open(data_dir: &Path, location: &Location) -> io::Result<Self> {
        let tmp = data_dir.join("tmp");
        let backend = match location {
            Location::Local(dir) => {
                fs::create_dir_all(dir)?;
                Backend::Local(dir.clone())
            }
            Location::S3(settings) => {
                let bucket = s3::Bucket::new(settings).map_err(io::Error::other)?;
                let cache = Cache::open(&data_dir.join("cache"), &tmp, settings.cache_bytes)?;
                Backend::S3 { bucket, cache }
            }
        };
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(Self {
            backend,
            tmp,
            lock: tokio::sync::Mutex::new(()),
            shared_lock: None,
            leftovers: Leftovers::default(),
        })
    }

    /// Makes [`Self::lock`] also take the lock of `store`'s database, which
    /// other processes sharing it take too.
    pub fn locking_with(mut self, store: Store) -> Self {
        self.shared_lock = Some(store);
        self
    }

    /// Tries again to remove temporary directories whose removal failed;
    /// returns how many are still there.
    pub fn remove_leftovers(&self) -> usize {
        let Ok(mut leftovers) = self.leftovers.lock() else {
            return 0;
        };
        leftovers.retain(|path| match fs::remove_dir_all(path) {
            Ok(()) => false,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        });
        leftovers.len()
    }

    /// Serializes adding and removing references to blobs: in this process,
    /// and on a PostgreSQL database across every process sharing it.
    pub async fn lock(&self) -> Result<BlobsGuard<'_>, StoreError> {
        let local = self.lock.lock().await;
        let shared = match &self.shared_lock {
            Some(store) => store.lock_blobs().await?,
            None => None,
        };
        Ok(BlobsGuard {
            _shared: shared,
            _local: local,
        })
    }

    fn local_path(dir: &Path, sha256: &str) -> PathBuf {
        debug_assert!(is_sha256(sha256), "not a sha256: {sha256}");
        dir.join(&sha256[..2]).join(sha256)
    }

    pub fn tmp_root(&self) -> &Path {
        &self.tmp
    }

    /// A new empty directory under `tmp/`.
    pub fn tmp_dir(&self, prefix: &str) -> io::Result<TmpDir> {
        let path = self.tmp.join(format!("{prefix}-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&path)?;
        Ok(TmpDir {
            path,
            leftovers: self.leftovers.clone(),
        })
    }

    /// Before [`Self::commit`], and outside [`Self::lock`]: in a bucket,
    /// uploads a complete file (sealed by [`seal_file`] or
    /// [`SealingWriter::finish`]) unless its content is stored already, so
    /// that no process waits for the lock while a large upload runs. In a
    /// directory there is nothing to do before the rename.
    ///
    /// A staged object nothing refers to yet may be removed by another
    /// process's cleanup before this one commits; [`Self::commit`] checks
    /// again under the lock and uploads it again then.
    pub async fn stage(&self, file: &Path, sha256: &str) -> io::Result<()> {
        check_sha256(sha256)?;
        if let Backend::S3 { bucket, .. } = &self.backend {
            if !bucket.exists(sha256).await? {
                bucket.upload(file, sha256).await?;
            }
        }
        Ok(())
    }

    /// Moves a complete file (under `tmp/`) whose sha256 is `sha256`, sealed
    /// by [`seal_file`] or [`SealingWriter::finish`], into the store. In a
    /// directory: a rename, with no long disk wait under the lock. In a
    /// bucket: the object [`Self::stage`] uploaded, checked to be there
    /// (uploaded now if it is not), after which the file is kept in the
    /// local cache, where a job reading it finds it. Returns whether the
    /// blob may have been added by this call: in a directory, whether it is
    /// new; in a bucket always, since a staged object cannot be told from
    /// one another process stored (a caller that fails afterwards removes
    /// it only if nothing refers to it). Call under [`Self::lock`].
    pub async fn commit(&self, file: &Path, sha256: &str) -> io::Result<bool> {
        check_sha256(sha256)?;
        match &self.backend {
            Backend::Local(dir) => {
                let dest = Self::local_path(dir, sha256);
                if dest.is_file() {
                    fs::remove_file(file)?;
                    return Ok(false);
                }
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)?;
                }
                move_file(file, &dest)?;
                Ok(true)
            }
            Backend::S3 { bucket, cache } => {
                if !bucket.exists(sha256).await? {
                    bucket.upload(file, sha256).await?;
                }
                cache.adopt(file, sha256).await;
                Ok(true)
            }
        }
    }

    /// Removes a blob that nothing refers to (and its cached copy). Call
    /// under [`Self::lock`]. A failure is logged: the blob stays, unused.
    pub async fn remove(&self, sha256: &str) {
        if !is_sha256(sha256) {
            return;
        }
        match &self.backend {
            Backend::Local(dir) => {
                let path = Self::local_path(dir, sha256);
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(blob = sha256, error = %e, "could not remove an unreferenced blob");
                    }
                }
            }
            Backend::S3 { bucket, cache } => {
                if let Err(e) = bucket.remove(sha256).await {
                    tracing::warn!(blob = sha256, error = %e, "could not remove an unreferenced blob from the bucket");
                }
                cache.forget(sha256);
            }
        }
    }

    /// Lays out stored files under their names in `dir`, so that a
    /// checkpoint reader sees the model as it was uploaded: symbolic links
    /// to a directory's blobs; hard links to cached copies of a bucket's
    /// (fetched, and checked against their sha256, when not cached), which
    /// stay whole for the job whatever the cache evicts meanwhile.
    pub async fn checkout(&self, files: &[(&str, &str)], dir: &Path) -> io::Result<()> {
        match &self.backend {
            Backend::Local(blobs) => {
                for &(name, sha256) in files {
                    if !is_sha256(sha256) {
                        return Err(missing(name, sha256));
                    }
                    let target = Self::local_path(blobs, sha256);
                    if !target.is_file() {
                        return Err(missing(name, sha256));
                    }
                    std::os::unix::fs::symlink(&target, dir.join(name))?;
                }
                Ok(())
            }
            Backend::S3 { bucket, cache } => {
                for &(name, sha256) in files {
                    if !is_sha256(sha256) {
                        return Err(missing(name, sha256));
                    }
                    cache
                        .link(bucket, sha256, &dir.join(name))
                        .await
                        .map_err(|e| match e.kind() {
                            io::ErrorKind::NotFound => missing(name, sha256),
                            _ => e,
                        })?;
                }
                cache.evict().await;
                Ok(())
            }
        }
    }

    /// Opens a stored blob for reading `range` of it (all of it when
    /// `None`); the range must lie within the blob.
    pub async fn read(
        &self,
        sha256: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> io::Result<BlobRead> {
        if !is_sha256(sha256) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no blob is named {sha256}"),
            ));
        }
        match &self.backend {
            Backend::Local(dir) => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let mut file = tokio::fs::File::open(Self::local_path(dir, sha256)).await?;
                let len = file.metadata().await?.len();
                let range = range.unwrap_or(0..len);
                if range.start > 0 {
                    file.seek(io::SeekFrom::Start(range.start)).await?;
                }
                let reader = file.take(range.end.saturating_sub(range.start));
                let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
                Ok(BlobRead {
                    len,
                    stream: Box::pin(stream),
                })
            }
            Backend::S3 { bucket, .. } => bucket.read(sha256, range).await,
        }
    }

    /// Whether a file can be written and synced under `tmp/`, and a bucket
    /// answers.
    pub async fn check_writable(&self) -> io::Result<()> {
        let tmp = self.tmp.clone();
        tokio::task::spawn_blocking(move || probe(&tmp, true))
            .await
            .map_err(io::Error::other)??;
        if let Backend::S3 { bucket, .. } = &self.backend {
            bucket.probe().await?;
        }
        Ok(())
    }

    /// Whether a block can be written under `tmp/` at all (not synced: a
    /// cheap check before work that needs space).
    pub fn check_space(&self) -> io::Result<()> {
        probe(&self.tmp, false)
    }

    /// Every stored blob.
    pub async fn list(&self) -> io::Result<Vec<String>> {
        match &self.backend {
            Backend::Local(dir) => list_dir(dir),
            Backend::S3 { bucket, .. } => bucket.list().await,
        }
    }
}

fn check_sha256(sha256: &str) -> io::Result<()> {
    if is_sha256(sha256) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a sha256: {sha256}"),
        ))
    }
}

fn missing(name: &str, sha256: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("blob {sha256} (file `{name}`) is missing"),
    )
}

/// Renames `from` to `to`; across file systems (a blob directory
/// elsewhere), copies to a temporary name beside `to`, syncs, renames it
/// into place and removes `from`.
fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let partial = to.with_extension(format!("partial-{}", uuid::Uuid::new_v4()));
            let copied = (|| {
                fs::copy(from, &partial)?;
                fs::File::open(&partial)?.sync_all()?;
                fs::rename(&partial, to)
            })();
            if copied.is_err() {
                let _ = fs::remove_file(&partial);
            }
            copied?;
            fs::remove_file(from)
        }
        other => other,
    }
}

fn probe(tmp: &Path, sync: bool) -> io::Result<()> {
    let path = tmp.join(format!("probe-{}", uuid::Uuid::new_v4()));
    let outcome = (|| {
        let mut f = fs::File::create(&path)?;
        // A whole page, so that a file system with no block left
        // refuses it even where tiny files are stored inline.
        f.write_all(&[0u8; 4096])?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    })();
    let _ = fs::remove_file(&path);
    outcome
}

fn list_dir(blobs: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for dir in fs::read_dir(blobs)? {
        let dir = dir?;
        if !dir.file_type()?.is_dir() {
            continue;
        }
        for f in fs::read_dir(dir.path())? {
            let name = f?.file_name().to_string_lossy().into_owned();
            if is_sha256(&name) {
                out.push(name);
            }
        }
    }
    Ok(out)
}
