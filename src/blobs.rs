//! Content-addressed files: every uploaded model file and every artifact is
//! stored once, under `blobs/<first two hex digits>/<sha256>`.
//!
//! Files are written under `tmp/` and moved into `blobs/` by an atomic
//! rename only once complete and synced, so a file under `blobs/` is always
//! whole. Whatever is under `tmp/` when the service starts was left by a
//! process that died, and is removed.
//!
//! Deciding that a blob is unreferenced and removing it must not interleave
//! with another request adding a reference to the same content: both happen
//! under [`Blobs::lock`].
//!
//! A temporary directory is removed as soon as its owner is done with it.
//! When that fails (a file system that turned read-only), the directory is
//! remembered and removal is tried again by [`Blobs::remove_leftovers`],
//! which the worker pool calls periodically, so it does not wait for the
//! next start.

use std::error::Error as StdError;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

pub struct Blobs {
    blobs: PathBuf,
    tmp: PathBuf,
    lock: tokio::sync::Mutex<()>,
    leftovers: Leftovers,
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
    /// Opens the blob store of a data directory, creating `blobs/` and
    /// `tmp/`, and clears what a previous process left in `tmp/`.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let blobs = data_dir.join("blobs");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&blobs)?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(Self {
            blobs,
            tmp,
            lock: tokio::sync::Mutex::new(()),
            leftovers: Leftovers::default(),
        })
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

    /// Serializes adding and removing references to blobs.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        debug_assert!(is_sha256(sha256), "not a sha256: {sha256}");
        self.blobs.join(&sha256[..2]).join(sha256)
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

    /// Moves a complete file (under `tmp/`) whose sha256 is `sha256`, sealed
    /// by [`seal_file`] or [`SealingWriter::finish`], into the store: a
    /// rename, with no long disk wait under the lock. When the content is
    /// already stored, the file is dropped instead. Returns whether the blob
    /// is new. Call under [`Self::lock`].
    pub fn commit(&self, file: &Path, sha256: &str) -> io::Result<bool> {
        let dest = self.path(sha256);
        if dest.is_file() {
            fs::remove_file(file)?;
            return Ok(false);
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(file, &dest)?;
        Ok(true)
    }

    /// Removes a blob that nothing refers to. Call under [`Self::lock`].
    pub fn remove(&self, sha256: &str) {
        if !is_sha256(sha256) {
            return;
        }
        let path = self.path(sha256);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(blob = sha256, error = %e, "could not remove an unreferenced blob");
            }
        }
    }

    /// Lays out stored files under their names in `dir` (as symbolic links),
    /// so that a checkpoint reader sees the model as it was uploaded.
    pub fn checkout<'a>(
        &self,
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
        dir: &Path,
    ) -> io::Result<()> {
        for (name, sha256) in files {
            let target = self.path(sha256);
            if !target.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("blob {sha256} (file `{name}`) is missing"),
                ));
            }
            std::os::unix::fs::symlink(&target, dir.join(name))?;
        }
        Ok(())
    }

    /// Whether a file can be written and synced under `tmp/`.
    pub fn check_writable(&self) -> io::Result<()> {
        self.probe(true)
    }

    /// Whether a block can be written under `tmp/` at all (not synced: a
    /// cheap check before work that needs space).
    pub fn check_space(&self) -> io::Result<()> {
        self.probe(false)
    }

    fn probe(&self, sync: bool) -> io::Result<()> {
        let path = self.tmp.join(format!("probe-{}", uuid::Uuid::new_v4()));
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

    /// Every blob under `blobs/`.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for dir in fs::read_dir(&self.blobs)? {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_file_is_stored_once_under_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let mut shas = Vec::new();
        for _ in 0..2 {
            let tmp = blobs.tmp_dir("t").unwrap();
            let f = tmp.path().join("x");
            fs::write(&f, b"hello").unwrap();
            let (sha, len) = seal_file(&f).unwrap();
            assert_eq!(len, 5);
            shas.push((sha.clone(), blobs.commit(&f, &sha).unwrap()));
        }
        assert_eq!(shas[0].0, shas[1].0);
        assert!(shas[0].1 && !shas[1].1, "the second copy is not stored");
        assert_eq!(blobs.list().unwrap(), vec![shas[0].0.clone()]);
        assert_eq!(fs::read_dir(blobs.tmp_root()).unwrap().count(), 0);
    }

    #[test]
    fn opening_clears_what_a_dead_process_left_in_tmp() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp/upload-x")).unwrap();
        fs::write(dir.path().join("tmp/upload-x/half"), b"..").unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(blobs.tmp_root()).unwrap().count(), 0);
    }
}
