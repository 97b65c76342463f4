//! Opening a safetensors checkpoint: one file, or a directory of shards
//! listed by `model.safetensors.index.json`, optionally with `config.json`.
//!
//! Each shard's header is checked by [`parse_header`], and across shards the
//! index and the shards' own headers must agree. Each failure is a variant of
//! [`FormatError`] whose message names the file at fault.
//!
//! Shards are memory-mapped, so tensors are read straight from the page cache
//! and a checkpoint larger than memory can still be processed tensor by
//! tensor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;
use serde_json::Value;

use super::dtype;
use super::header::{parse_header, Entries, Header, HeaderError, TensorInfo};

/// Name of the index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the model configuration carried beside the weights.
pub const CONFIG_FILE: &str = "config.json";

/// Why a checkpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{} holds no .safetensors file", dir.display())]
    NoSafetensors { dir: PathBuf },
    #[error("{} holds several candidate files ({}) and no {INDEX_FILE} saying how they fit together; open one file, or add the index", dir.display(), files.join(", "))]
    AmbiguousDirectory { dir: PathBuf, files: Vec<String> },
    #[error("{}: {reason}", path.display())]
    Index { path: PathBuf, reason: String },
    #[error("{} maps tensors to shard `{shard}`, which does not exist", index.display())]
    MissingShard { index: PathBuf, shard: String },
    #[error("the index maps tensor `{tensor}` to shard `{shard}`, which does not contain it")]
    NotInShard { tensor: String, shard: String },
    #[error("shard `{shard}` holds tensor `{tensor}`, which the index maps to `{indexed}`")]
    MappedElsewhere {
        tensor: String,
        shard: String,
        indexed: String,
    },
    #[error("shard `{shard}` holds tensor `{tensor}`, which the index does not list")]
    Unindexed { tensor: String, shard: String },
    #[error("tensor `{tensor}` is in both shard `{first}` and shard `{second}`")]
    DuplicateAcrossShards {
        tensor: String,
        first: String,
        second: String,
    },
    #[error("{} is not valid JSON: {message}", path.display())]
    Config { path: PathBuf, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct Shard {
    map: Mmap,
    metadata: BTreeMap<String, String>,
}

/// A checkpoint opened for reading: every shard mapped, every header checked.
pub struct Checkpoint {
    shards: Vec<Shard>,
    shard_names: Vec<String>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    config: Option<Value>,
    sharded: bool,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("shards", &self.shard_names)
            .field("tensors", &self.tensors.len())
            .field("sharded", &self.sharded)
            .finish_non_exhaustive()
    }
}

fn map_shard(path: &Path) -> Result<(Mmap, Header), FormatError> {
    let file = File::open(path).map_err(io_error(path))?;
    // SAFETY: the mapping is read-only and lives as long as the Checkpoint.
    // A checkpoint is an input that nothing modifies while it is being read
    // (uploaded models are content-addressed files, never rewritten in
    // place); if another process did truncate or rewrite the file, reads of
    // the mapping could see changed bytes or fault, which is the documented
    // limit of reading through mmap.
    let map = unsafe { Mmap::map(&file) }.map_err(io_error(path))?;
    let header = parse_header(&map, map.len() as u64).map_err(|source| FormatError::Header {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((map, header))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file; a directory holding one
    /// `.safetensors` file, or shards and their index; or the index file
    /// itself. `config.json` is read when a directory (or index) is opened.
    pub fn open(path: &Path) -> Result<Checkpoint, FormatError> {
        let meta = fs::metadata(path).map_err(io_error(path))?;
        if meta.is_dir() {
            return Self::open_dir(path);
        }
        if file_name(path).ends_with(".index.json") {
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut ckpt = Self::open_index(dir, path)?;
            ckpt.config = read_config(dir)?;
            return Ok(ckpt);
        }
        let (map, header) = map_shard(path)?;
        Ok(Self::assemble(vec![(file_name(path), map, header)], false))
    }

    fn open_dir(dir: &Path) -> Result<Checkpoint, FormatError> {
        let mut indexes = Vec::new();
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let entry = entry.map_err(io_error(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_file() {
                continue;
            }
            if name.ends_with(".safetensors.index.json") {
                indexes.push(name);
            } else if name.ends_with(".safetensors") {
                files.push(name);
            }
        }
        indexes.sort();
        files.sort();
        let mut ckpt = if indexes.iter().any(|i| i == INDEX_FILE) {
            Self::open_index(dir, &dir.join(INDEX_FILE))?
        } else if let [index] = indexes.as_slice() {
            Self::open_index(dir, &dir.join(index))?
        } else if !indexes.is_empty() {
            return Err(FormatError::AmbiguousDirectory {
                dir: dir.to_path_buf(),
                files: indexes,
            });
        } else {
            match files.as_slice() {
                [] => {
                    return Err(FormatError::NoSafetensors {
                        dir: dir.to_path_buf(),
                    })
                }
                [only] => {
                    let (map, header) = map_shard(&dir.join(only))?;
                    Self::assemble(vec![(only.clone(), map, header)], false)
                }
                _ => {
                    return Err(FormatError::AmbiguousDirectory {
                        dir: dir.to_path_buf(),
                        files,
                    })
                }
            }
        };
        ckpt.config = read_config(dir)?;
        Ok(ckpt)
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Checkpoint, FormatError> {
        let index_error = |reason: String| FormatError::Index {
            path: index_path.to_path_buf(),
            reason,
        };
        #[derive(Deserialize)]
        struct IndexFile {
            weight_map: Option<Entries<Value>>,
        }
        let text = fs::read(index_path).map_err(io_error(index_path))?;
        let index: IndexFile = serde_json::from_slice(&text)
            .map_err(|e| index_error(format!("not a valid index: {e}")))?;
        let entries = index
            .weight_map
            .ok_or_else(|| index_error("no `weight_map`".into()))?
            .0;
        let mut weight_map: HashMap<String, String> = HashMap::with_capacity(entries.len());
        for (tensor, shard) in &entries {
            let shard = shard.as_str().ok_or_else(|| {
                index_error(format!("the shard of tensor `{tensor}` is not a string"))
            })?;
            // Only bare file names: an index must not reach outside its directory.
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == "." || shard == ".." {
                return Err(index_error(format!(
                    "tensor `{tensor}` is mapped to `{shard}`, which is not a file name"
                )));
            }
            if weight_map
                .insert(tensor.clone(), shard.to_string())
                .is_some()
            {
                return Err(index_error(format!(
                    "tensor `{tensor}` appears more than once in `weight_map`"
                )));
            }
        }

        let names: BTreeSet<&str> = weight_map.values().map(String::as_str).collect();
        let mut shards = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(FormatError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: name.to_string(),
                });
            }
            let (map, header) = map_shard(&path)?;
            shards.push((name.to_string(), map, header));
        }

        let mut found: HashMap<&str, &str> = HashMap::with_capacity(weight_map.len());
        for (shard, _, header) in &shards {
            for t in &header.tensors {
                if let Some(first) = found.insert(&t.name, shard) {
                    return Err(FormatError::DuplicateAcrossShards {
                        tensor: t.name.clone(),
                        first: first.to_string(),
                        second: shard.clone(),
                    });
                }
            }
        }
        for (tensor, shard) in shards
            .iter()
            .flat_map(|(shard, _, header)| header.tensors.iter().map(move |t| (&t.name, shard)))
        {
            match weight_map.get(tensor) {
                None => {
                    return Err(FormatError::Unindexed {
                        tensor: tensor.clone(),
                        shard: shard.clone(),
                    })
                }
                Some(indexed) if indexed != shard => {
                    return Err(FormatError::MappedElsewhere {
                        tensor: tensor.clone(),
                        shard: shard.clone(),
                        indexed: indexed.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        // Every shard tensor is indexed to its own shard, so an index entry
        // without a match names a tensor its shard does not hold.
        for (tensor, shard) in &entries {
            if !found.contains_key(tensor.as_str()) {
                return Err(FormatError::NotInShard {
                    tensor: tensor.clone(),
                    shard: shard.as_str().unwrap_or_default().to_string(),
                });
            }
        }
        Ok(Self::assemble(shards, true))
    }

    fn assemble(shards: Vec<(String, Mmap, Header)>, sharded: bool) -> Checkpoint {
        let mut out = Checkpoint {
            shards: Vec::with_capacity(shards.len()),
            shard_names: Vec::with_capacity(shards.len()),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            metadata: BTreeMap::new(),
            config: None,
            sharded,
        };
        for (i, (name, map, header)) in shards.into_iter().enumerate() {
            for mut t in header.tensors {
                t.shard = i;
                out.by_name.insert(t.name.clone(), out.tensors.len());
                out.tensors.push(t);
            }
            for (k, v) in &header.metadata {
                out.metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            out.shard_names.push(name);
            out.shards.push(Shard {
                map,
                metadata: header.metadata,
            });
        }
        out
    }

    /// Every tensor: shards in order of [`Self::shard_names`], and within a
    /// shard by data offset.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, straight from the mapped file.
    ///
    /// # Panics
    /// If `t` does not come from this checkpoint.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.shards[t.shard].map[t.start..t.end]
    }

    /// The tensor's values as f32 (see [`dtype::to_f32`] for how each dtype
    /// converts; F16, BF16 and F32 are exact).
    ///
    /// # Panics
    /// If `t` does not come from this checkpoint.
    pub fn to_f32(&self, t: &TensorInfo) -> Vec<f32> {
        let bytes = self.bytes(t);
        let mut out = vec![0.0; bytes.len() / (t.dtype.bitsize() / 8)];
        dtype::to_f32(t.dtype, bytes, &mut out);
        out
    }

    /// `__metadata__` of all shards merged; where shards disagree on a key,
    /// the first shard's value is kept.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// `__metadata__` of shard `i` alone.
    ///
    /// # Panics
    /// If `i` is not below `shard_names().len()`.
    pub fn shard_metadata(&self, i: usize) -> &BTreeMap<String, String> {
        &self.shards[i].metadata
    }

    /// File names of the shards, in order: sorted for a sharded checkpoint,
    /// the file's own name for a single file.
    pub fn shard_names(&self) -> &[String] {
        &self.shard_names
    }

    /// `config.json` from the checkpoint's directory, when a directory or
    /// index was opened and the file exists.
    pub fn config_json(&self) -> Option<&Value> {
        self.config.as_ref()
    }

    /// Whether the checkpoint was opened through an index.
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// Bytes of tensor data (headers excluded), as `total_size` in an index.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| (t.end - t.start) as u64).sum()
    }

    /// Asks the kernel to start reading the tensor's pages, so that the next
    /// tensor loads while the current one is processed. Only a hint: errors
    /// are ignored.
    pub fn advise_willneed(&self, t: &TensorInfo) {
        #[cfg(unix)]
        if let Some(shard) = self.shards.get(t.shard) {
            if t.start < t.end && t.end <= shard.map.len() {
                let _ = shard
                    .map
                    .advise_range(memmap2::Advice::WillNeed, t.start, t.end - t.start);
            }
        }
        #[cfg(not(unix))]
        let _ = t;
    }
}

fn read_config(dir: &Path) -> Result<Option<Value>, FormatError> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = fs::read(&path).map_err(io_error(&path))?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| FormatError::Config {
            path,
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests;
