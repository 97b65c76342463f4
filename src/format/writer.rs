//! Writing a safetensors file tensor by tensor, in bounded memory.
//!
//! The header must come first but is only known at the end (entropy-coded
//! sizes are not known in advance), so the writer reserves room for it, writes
//! tensor data sequentially after the reserved room, and at the end writes
//! the header padded with spaces (which the format allows). If the header
//! outgrew the reservation the data is copied once behind a larger header.
//! Everything goes to a temporary file in the destination directory that is
//! renamed into place only by [`SafetensorsWriter::finish`]; dropping an
//! unfinished writer removes it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::ser::{SerializeMap, Serializer};

use super::dtype::Dtype;

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// Whether a finished file is on the disk or may still be in the page cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// [`SafetensorsWriter::finish`] waits until the file's data has reached
    /// the disk (fsync) before renaming it into place: what a service must
    /// do before it records the file as done.
    #[default]
    Synced,
    /// The operating system writes the file back when it chooses, as `cp`
    /// does; a crash soon after may lose it.
    Cached,
}

pub struct SafetensorsWriter {
    out: Option<BufWriter<File>>,
    durability: Durability,
    tmp: PathBuf,
    dest: PathBuf,
    reserved: u64,
    cursor: u64,
    entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("tensor `{name}`: {len} bytes do not match shape {shape:?} of dtype {dtype}")]
    Size {
        name: String,
        shape: Vec<usize>,
        dtype: &'static str,
        len: usize,
    },
}

/// Bytes of the header JSON entry of one tensor, an upper bound used to
/// reserve room for the header before the data is written.
pub fn header_bound(name: &str, rank: usize) -> u64 {
    // Escaping can at most make a name 6x longer ("\u00XX"); each dimension
    // and offset is at most 20 digits.
    (name.len() as u64) * 6 + 60 + (rank as u64 + 2) * 21
}

/// Room to reserve for a header holding `entries` (name, rank) and
/// `metadata`. A function of the tensor list only, so two writers of the
/// same tensors produce the same bytes.
pub fn header_reserve<'a>(
    entries: impl IntoIterator<Item = (&'a str, usize)>,
    metadata: &BTreeMap<String, String>,
) -> u64 {
    let tensors: u64 = entries
        .into_iter()
        .map(|(name, rank)| header_bound(name, rank))
        .sum();
    let meta = serde_json::to_string(metadata).map_or(0, |s| s.len() as u64);
    tensors + meta * 2 + 64
}

impl SafetensorsWriter {
    /// Starts a file that will appear at `dest` when finished, synced.
    /// `header_reserve` is the expected header size in bytes.
    pub fn create(dest: &Path, header_reserve: u64) -> Result<Self, WriteError> {
        Self::create_with(dest, header_reserve, Durability::Synced)
    }

    /// [`create`](Self::create) with the given durability.
    pub fn create_with(
        dest: &Path,
        header_reserve: u64,
        durability: Durability,
    ) -> Result<Self, WriteError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let file_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = dir.join(format!(".{file_name}.partial-{}", std::process::id()));
        let io_err = |source| WriteError::Io {
            path: tmp.clone(),
            source,
        };
        let reserved = (8 + header_reserve).next_multiple_of(8);
        // Read access too: a header that outgrows its room means copying
        // the data back out of this file.
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err)?;
        file.seek(SeekFrom::Start(reserved)).map_err(io_err)?;
        Ok(Self {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            durability,
            tmp,
            dest: dest.to_path_buf(),
            reserved,
            cursor: 0,
            entries: Vec::new(),
        })
    }

    fn io(&self, source: io::Error) -> WriteError {
        WriteError::Io {
            path: self.tmp.clone(),
            source,
        }
    }

    /// Appends one tensor. `bytes` must be exactly the shape's size.
    pub fn append(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        let expected = shape
            .iter()
            .try_fold(dtype.bitsize(), |a, &d| a.checked_mul(d))
            .map(|bits| bits.div_ceil(8));
        if expected != Some(bytes.len()) {
            return Err(WriteError::Size {
                name: name.to_string(),
                shape: shape.to_vec(),
                dtype: dtype.name(),
                len: bytes.len(),
            });
        }
        let out = self.out.as_mut().expect("writer used after finish");
        if let Err(e) = out.write_all(bytes) {
            return Err(self.io(e));
        }
        let start = self.cursor;
        self.cursor += bytes.len() as u64;
        self.entries.push(Entry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            start,
            end: self.cursor,
        });
        Ok(())
    }

    /// Bytes of tensor data written so far.
    pub fn data_bytes(&self) -> u64 {
        self.cursor
    }

    fn header(&self, metadata: &BTreeMap<String, String>) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.entries.len() * 96 + 64);
        let mut ser = serde_json::Serializer::new(&mut buf);
        let mut write = || -> Result<(), serde_json::Error> {
            let mut map = ser.serialize_map(None)?;
            if !metadata.is_empty() {
                map.serialize_entry("__metadata__", metadata)?;
            }
            for e in &self.entries {
                map.serialize_entry(
                    &e.name,
                    &serde_json::json!({
                        "dtype": e.dtype.name(),
                        "shape": e.shape,
                        "data_offsets": [e.start, e.end],
                    }),
                )?;
            }
            map.end()
        };
        write().expect("serializing to memory cannot fail");
        buf
    }

    /// Writes the header and renames the file into place (after waiting for
    /// the disk when [`Durability::Synced`]). Returns the file's size in
    /// bytes.
    pub fn finish(mut self, metadata: &BTreeMap<String, String>) -> Result<u64, WriteError> {
        let mut header = self.header(metadata);
        let out = self.out.take().expect("finish called once");
        let mut file = out.into_inner().map_err(|e| self.io(e.into_error()))?;
        let needed = (8 + header.len() as u64).next_multiple_of(8);
        // Padding that would be a noticeable share of a small file is not
        // worth keeping: copy the data once behind an exact header instead.
        let waste = self.reserved.saturating_sub(needed);
        let fits = needed <= self.reserved && waste * 100 <= self.cursor.max(1);
        if fits {
            header.resize((self.reserved - 8) as usize, b' ');
            file.seek(SeekFrom::Start(0)).map_err(|e| self.io(e))?;
            file.write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|_| file.write_all(&header))
                .map_err(|e| self.io(e))?;
        } else {
            file = self.rewrite_with_header(file, header)?;
        }
        if self.durability == Durability::Synced {
            file.sync_all().map_err(|e| self.io(e))?;
        }
        let size = file.metadata().map_err(|e| self.io(e))?.len();
        drop(file);
        fs::rename(&self.tmp, &self.dest).map_err(|e| self.io(e))?;
        Ok(size)
    }

    fn rewrite_with_header(&self, mut old: File, mut header: Vec<u8>) -> Result<File, WriteError> {
        let padded = (8 + header.len()).next_multiple_of(8) - 8;
        header.resize(padded, b' ');
        let tmp2 = self.tmp.with_extension("rewrite");
        let io2 = |source| WriteError::Io {
            path: tmp2.clone(),
            source,
        };
        let mut new = File::create(&tmp2).map_err(io2)?;
        new.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| new.write_all(&header))
            .map_err(io2)?;
        old.seek(SeekFrom::Start(self.reserved))
            .map_err(|e| self.io(e))?;
        io::copy(&mut old, &mut new).map_err(io2)?;
        drop(old);
        fs::rename(&tmp2, &self.tmp).map_err(io2)?;
        Ok(new)
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            self.out = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        let bytes = fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_written_file_opens_in_the_reference_reader() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.safetensors");
        let mut w = SafetensorsWriter::create(&dest, 1024).unwrap();
        w.append("a", Dtype::F32, &[2], &[0, 0, 128, 63, 0, 0, 0, 64])
            .unwrap();
        w.append("b", Dtype::U8, &[3], &[1, 2, 3]).unwrap();
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        w.finish(&meta).unwrap();
        let t = read_back(&dest);
        assert_eq!(
            t[0],
            ("a".into(), vec![2], vec![0, 0, 128, 63, 0, 0, 0, 64])
        );
        assert_eq!(t[1], ("b".into(), vec![3], vec![1, 2, 3]));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn a_header_larger_than_reserved_still_gives_a_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.safetensors");
        let mut w = SafetensorsWriter::create(&dest, 0).unwrap();
        for i in 0..50 {
            w.append(&format!("tensor_{i}"), Dtype::U8, &[1], &[i as u8])
                .unwrap();
        }
        w.finish(&BTreeMap::new()).unwrap();
        let t = read_back(&dest);
        assert_eq!(t.len(), 50);
        assert!(t.iter().any(|(n, _, d)| n == "tensor_7" && d == &[7]));
    }

    #[test]
    fn a_size_mismatch_is_an_error_and_an_abandoned_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.safetensors");
        let mut w = SafetensorsWriter::create(&dest, 64).unwrap();
        assert!(matches!(
            w.append("a", Dtype::F32, &[2], &[0; 7]),
            Err(WriteError::Size { .. })
        ));
        drop(w);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
