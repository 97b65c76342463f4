//! Opening a safetensors checkpoint: one file, or a directory of shards
//! listed by `model.safetensors.index.json`, optionally with `config.json`.
//!
//! Nothing read from disk is trusted. Every header is held to the rules of
//! the reference safetensors reader — tensors tile the data section from its
//! first byte to the end of the file, and each tensor's byte range is its
//! shape times its element size, computed with checked arithmetic — and to
//! two more: no tensor name may appear twice (a JSON map would silently keep
//! the last), and across shards the index and the shards' own headers must
//! agree. Each failure is a variant of [`HeaderError`] or [`FormatError`]
//! whose message names the tensor, offset or file at fault.
//!
//! Shards are memory-mapped, so tensors are read straight from the page cache
//! and a checkpoint larger than memory can still be processed tensor by
//! tensor.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::dtype::{self, Dtype};

/// Largest header accepted, as in the reference reader: a larger one is
/// either corrupt or a denial of service.
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Name of the index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the model configuration carried beside the weights.
pub const CONFIG_FILE: &str = "config.json";
const METADATA_KEY: &str = "__metadata__";

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::shard_names`].
    pub shard: usize,
    /// Absolute file offset of the first byte.
    pub start: usize,
    /// Absolute file offset one past the last byte.
    pub end: usize,
}

/// A parsed and checked safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON text that follows the 8-byte length.
    pub json_len: u64,
    /// File offset of the data section (8 + `json_len`).
    pub data_start: usize,
    /// Tensors ordered by data offset, with absolute offsets and `shard` 0.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map (empty when absent or null).
    pub metadata: BTreeMap<String, String>,
}

/// What is wrong with one safetensors file, independent of where it is.
/// "Data offset" means an offset inside the data section, as written in the
/// header's `data_offsets`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the file is {file_len} bytes long, too short for the 8-byte header length")]
    TooShort { file_len: u64 },
    #[error(
        "the header length {len} (file bytes 0..8) exceeds the limit of {MAX_HEADER_LEN} bytes"
    )]
    HeaderTooLarge { len: u64 },
    #[error("the header length {len} (file bytes 0..8) runs past the end of the file: only {available} bytes follow")]
    HeaderPastEnd { len: u64, available: u64 },
    #[error("the header is not valid UTF-8 (file offset {offset})")]
    NotUtf8 { offset: u64 },
    #[error("the header is not valid JSON: {message}")]
    Json { message: String },
    #[error("the header is not a JSON object")]
    NotObject,
    #[error("tensor `{name}` appears more than once in the header")]
    DuplicateTensor { name: String },
    #[error("the entry of tensor `{tensor}` is {found}, not an object")]
    TensorNotObject { tensor: String, found: &'static str },
    #[error("tensor `{tensor}`: field `{field}` appears more than once")]
    DuplicateField { tensor: String, field: String },
    #[error("tensor `{tensor}` has no `{field}` field")]
    MissingField { tensor: String, field: &'static str },
    #[error("tensor `{tensor}`: `{field}` must be {expected}")]
    BadField {
        tensor: String,
        field: &'static str,
        expected: &'static str,
    },
    #[error("tensor `{tensor}` has unknown dtype `{dtype}`")]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor `{tensor}`: the byte size of shape {shape:?} overflows")]
    ShapeOverflow { tensor: String, shape: Vec<usize> },
    #[error("tensor `{tensor}`: data_offsets [{start}, {end}] end before they start")]
    EndBeforeStart {
        tensor: String,
        start: u64,
        end: u64,
    },
    #[error("tensor `{tensor}`: data_offsets end at {end}, past the end of the {data_len}-byte data section")]
    OutOfRange {
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error("tensor `{tensor}`: shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {actual}")]
    SizeMismatch {
        tensor: String,
        dtype: Dtype,
        shape: Vec<usize>,
        expected: usize,
        actual: u64,
    },
    #[error("tensor `{tensor}` at data offset {start} overlaps tensor `{other}`")]
    Overlap {
        tensor: String,
        other: String,
        start: u64,
    },
    #[error("data bytes {from}..{to} before tensor `{tensor}` belong to no tensor")]
    Gap { tensor: String, from: u64, to: u64 },
    #[error("data bytes {from}..{to} after the last tensor belong to no tensor")]
    TrailingBytes { from: u64, to: u64 },
    #[error("`__metadata__` is {found}, not an object of strings")]
    MetadataNotMap { found: &'static str },
    #[error("`__metadata__` entry `{key}` is not a string")]
    MetadataValue { key: String },
    #[error("`__metadata__` key `{key}` appears more than once")]
    DuplicateMetadataKey { key: String },
}

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

/// Reads and checks the header of the safetensors file at `path` without
/// mapping or reading its data.
pub fn read_header(path: &Path) -> Result<Header, FormatError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let file_len = file.metadata().map_err(io_error(path))?.len();
    let mut prefix = Vec::new();
    (&mut file)
        .take(8)
        .read_to_end(&mut prefix)
        .map_err(io_error(path))?;
    if let Ok(len) = <[u8; 8]>::try_from(prefix.as_slice()) {
        let len = u64::from_le_bytes(len);
        // Only a length that passes the checks is read, so a hostile length
        // never turns into an allocation.
        if len <= MAX_HEADER_LEN && len <= file_len - 8 {
            file.take(len)
                .read_to_end(&mut prefix)
                .map_err(io_error(path))?;
        }
    }
    parse_header(&prefix, file_len).map_err(|source| FormatError::Header {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses and checks a safetensors header.
///
/// `bytes` is the start of the file and holds at least the 8-byte length and
/// the JSON header (the whole file, when it is mapped); `file_len` is the
/// length of the file, against which the data offsets are checked.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let Some(len_bytes) = bytes.get(..8).filter(|_| file_len >= 8) else {
        return Err(HeaderError::TooShort {
            file_len: file_len.min(bytes.len() as u64),
        });
    };
    let mut len = [0u8; 8];
    len.copy_from_slice(len_bytes);
    let json_len = u64::from_le_bytes(len);
    if json_len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { len: json_len });
    }
    let past_end = |available: u64| HeaderError::HeaderPastEnd {
        len: json_len,
        available,
    };
    if json_len > file_len - 8 {
        return Err(past_end(file_len - 8));
    }
    // json_len <= MAX_HEADER_LEN, so this fits in usize on every platform.
    let data_start = 8 + json_len as usize;
    let json = bytes
        .get(8..data_start)
        .ok_or_else(|| past_end(bytes.len() as u64 - 8))?;
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        offset: 8 + e.valid_up_to() as u64,
    })?;
    let entries: Entries<Entry> = serde_json::from_str(text).map_err(|e| match e.classify() {
        // Every value below the top level is accepted as it is, so a data
        // error can only mean the top level is not an object.
        serde_json::error::Category::Data => HeaderError::NotObject,
        _ => HeaderError::Json {
            message: e.to_string(),
        },
    })?;

    let data_len = file_len - data_start as u64;
    let mut seen = HashSet::with_capacity(entries.0.len());
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, entry) in &entries.0 {
        if !seen.insert(name.as_str()) {
            return Err(HeaderError::DuplicateTensor { name: name.clone() });
        }
        if name == METADATA_KEY {
            metadata = parse_metadata(entry)?;
        } else {
            tensors.push(parse_tensor(name, entry, data_start, data_len)?);
        }
    }

    // Zero-length tensors may share an offset with the tensor after them;
    // the name keeps the order deterministic.
    tensors.sort_unstable_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    let mut cursor = data_start;
    let mut previous: Option<&TensorInfo> = None;
    let relative = |offset: usize| (offset - data_start) as u64;
    for t in &tensors {
        if t.start < cursor {
            return Err(HeaderError::Overlap {
                tensor: t.name.clone(),
                other: previous.map(|p| p.name.clone()).unwrap_or_default(),
                start: relative(t.start),
            });
        }
        if t.start > cursor {
            return Err(HeaderError::Gap {
                tensor: t.name.clone(),
                from: relative(cursor),
                to: relative(t.start),
            });
        }
        cursor = t.end;
        previous = Some(t);
    }
    if relative(cursor) != data_len {
        return Err(HeaderError::TrailingBytes {
            from: relative(cursor),
            to: data_len,
        });
    }
    Ok(Header {
        json_len,
        data_start,
        tensors,
        metadata,
    })
}

fn parse_metadata(entry: &Entry) -> Result<BTreeMap<String, String>, HeaderError> {
    let fields = match entry {
        Entry::Object(fields) => fields,
        Entry::Null => return Ok(BTreeMap::new()),
        Entry::Other(found) => return Err(HeaderError::MetadataNotMap { found }),
    };
    let mut metadata = BTreeMap::new();
    for (key, value) in fields {
        let value = value
            .as_str()
            .ok_or_else(|| HeaderError::MetadataValue { key: key.clone() })?;
        if metadata.insert(key.clone(), value.to_string()).is_some() {
            return Err(HeaderError::DuplicateMetadataKey { key: key.clone() });
        }
    }
    Ok(metadata)
}

fn parse_tensor(
    name: &str,
    entry: &Entry,
    data_start: usize,
    data_len: u64,
) -> Result<TensorInfo, HeaderError> {
    let tensor = || name.to_string();
    let fields = match entry {
        Entry::Object(fields) => fields,
        Entry::Null => {
            return Err(HeaderError::TensorNotObject {
                tensor: tensor(),
                found: "null",
            })
        }
        Entry::Other(found) => {
            return Err(HeaderError::TensorNotObject {
                tensor: tensor(),
                found,
            })
        }
    };
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    for (key, value) in fields {
        let slot = match key.as_str() {
            "dtype" => &mut dtype,
            "shape" => &mut shape,
            "data_offsets" => &mut offsets,
            // Unknown fields are ignored, as the reference reader does.
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(HeaderError::DuplicateField {
                tensor: tensor(),
                field: key.clone(),
            });
        }
    }
    let missing = |field| HeaderError::MissingField {
        tensor: tensor(),
        field,
    };
    let bad = |field, expected| HeaderError::BadField {
        tensor: tensor(),
        field,
        expected,
    };

    let dtype_name = dtype
        .ok_or_else(|| missing("dtype"))?
        .as_str()
        .ok_or_else(|| bad("dtype", "a string"))?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| HeaderError::UnknownDtype {
        tensor: tensor(),
        dtype: dtype_name.to_string(),
    })?;
    let shape: Vec<usize> = shape
        .ok_or_else(|| missing("shape"))?
        .as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        })
        .ok_or_else(|| bad("shape", "a list of non-negative integers"))?;
    let [start, end] = offsets
        .ok_or_else(|| missing("data_offsets"))?
        .as_array()
        .and_then(|pair| match pair.as_slice() {
            [s, e] => Some([s.as_u64()?, e.as_u64()?]),
            _ => None,
        })
        .ok_or_else(|| bad("data_offsets", "two non-negative integers"))?;

    if end < start {
        return Err(HeaderError::EndBeforeStart {
            tensor: tensor(),
            start,
            end,
        });
    }
    if end > data_len {
        return Err(HeaderError::OutOfRange {
            tensor: tensor(),
            end,
            data_len,
        });
    }
    let bits = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bitsize()))
        .ok_or_else(|| HeaderError::ShapeOverflow {
            tensor: tensor(),
            shape: shape.clone(),
        })?;
    let actual = end - start;
    if bits % 8 != 0 || bits / 8 != actual as usize || actual > usize::MAX as u64 {
        return Err(HeaderError::SizeMismatch {
            tensor: tensor(),
            dtype,
            shape,
            expected: bits.div_ceil(8),
            actual,
        });
    }
    // end <= data_len and data_start + data_len is the file length, which the
    // caller has in memory (or could map), so these fit in usize.
    let absolute = |offset: u64| {
        usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .ok_or_else(|| HeaderError::OutOfRange {
                tensor: tensor(),
                end,
                data_len,
            })
    };
    Ok(TensorInfo {
        name: tensor(),
        dtype,
        shape,
        shard: 0,
        start: absolute(start)?,
        end: absolute(end)?,
    })
}

/// A JSON object's entries in file order, duplicates kept so that they can
/// be reported rather than silently collapsed.
struct Entries<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// One top-level header value. Objects keep duplicate keys (a tensor entry
/// with two `shape`s is reported, not resolved); anything else is only
/// named, for the error message.
enum Entry {
    Object(Vec<(String, Value)>),
    Null,
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Entry, A::Error> {
                Entries::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|e| Entry::Object(e.0))
            }
            fn visit_unit<E>(self) -> Result<Entry, E> {
                Ok(Entry::Null)
            }
            fn visit_none<E>(self) -> Result<Entry, E> {
                Ok(Entry::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Entry, E> {
                Ok(Entry::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Entry, E> {
                Ok(Entry::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Entry, E> {
                Ok(Entry::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Entry, E> {
                Ok(Entry::Other("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Entry, E> {
                Ok(Entry::Other("a string"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Entry, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Entry::Other("an array"))
            }
        }
        deserializer.deserialize_any(EntryVisitor)
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap as StdHashMap;

    /// A file built by hand: length, JSON, then `data_len` bytes 0, 1, 2, ...
    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend(json.as_bytes());
        bytes.extend((0..data_len).map(|i| i as u8));
        bytes
    }

    fn parse(json: &str, data_len: usize) -> Result<Header, HeaderError> {
        let bytes = file(json, data_len);
        parse_header(&bytes, bytes.len() as u64)
    }

    macro_rules! assert_err {
        ($result:expr, $pattern:pat) => {
            match $result {
                Err(e @ $pattern) => e,
                other => panic!("expected {}, got {other:?}", stringify!($pattern)),
            }
        };
    }

    const TWO: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}"#;

    #[test]
    fn a_hand_built_header_gives_absolute_offsets_in_data_order() {
        // Listed out of order in the JSON; read back by offset.
        let json = r#"{"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let h = parse(json, 11).unwrap();
        let start = 8 + json.len();
        assert_eq!(h.data_start, start);
        assert_eq!(h.json_len, json.len() as u64);
        let names: Vec<_> = h
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.start, t.end))
            .collect();
        assert_eq!(
            names,
            [("a", start, start + 8), ("b", start + 8, start + 11)]
        );
        assert_eq!(h.tensors[0].shape, [2]);
        assert_eq!(h.tensors[1].dtype, Dtype::U8);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn zero_element_tensors_and_trailing_space_padding_are_legal() {
        let json = r#"{"e":{"dtype":"F32","shape":[0,4],"data_offsets":[4,4]},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"z":{"dtype":"BF16","shape":[0],"data_offsets":[4,4]}}       "#;
        let h = parse(json, 4).unwrap();
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "e", "z"]);
        assert_eq!(h.tensors[1].start, h.tensors[1].end);
        assert!(parse("{}  ", 0).unwrap().tensors.is_empty());
    }

    #[test]
    fn null_metadata_counts_as_empty() {
        assert!(parse(r#"{"__metadata__":null}"#, 0)
            .unwrap()
            .metadata
            .is_empty());
    }

    #[test]
    fn a_file_shorter_than_the_length_field_is_rejected() {
        assert_eq!(
            parse_header(&[1, 0, 0], 3),
            Err(HeaderError::TooShort { file_len: 3 })
        );
        assert_eq!(
            parse_header(&[], 0),
            Err(HeaderError::TooShort { file_len: 0 })
        );
    }

    #[test]
    fn an_absurd_header_length_is_rejected_before_anything_is_read() {
        let mut bytes = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        bytes.extend(b"{}");
        assert_err!(
            parse_header(&bytes, u64::MAX),
            HeaderError::HeaderTooLarge { len: 100_000_001 }
        );
        let bytes = u64::MAX.to_le_bytes();
        assert_err!(parse_header(&bytes, 8), HeaderError::HeaderTooLarge { .. });
    }

    #[test]
    fn a_header_length_past_the_end_of_the_file_is_rejected() {
        let mut bytes = 100u64.to_le_bytes().to_vec();
        bytes.extend(b"{}");
        let e = assert_err!(
            parse_header(&bytes, 10),
            HeaderError::HeaderPastEnd {
                len: 100,
                available: 2
            }
        );
        assert!(e.to_string().contains("100"), "{e}");
        // A prefix that stops inside the header is reported the same way.
        assert_err!(
            parse_header(&bytes, 1000),
            HeaderError::HeaderPastEnd { available: 2, .. }
        );
    }

    #[test]
    fn a_header_that_is_not_utf8_is_rejected_with_its_offset() {
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend([b'{', 0xFF, b'}', b' ']);
        let len = bytes.len() as u64;
        assert_eq!(
            parse_header(&bytes, len),
            Err(HeaderError::NotUtf8 { offset: 9 })
        );
    }

    #[test]
    fn a_header_that_is_not_json_is_rejected() {
        assert_err!(parse(r#"{"a":{"dtype":"F32""#, 0), HeaderError::Json { .. });
        assert_err!(parse("", 0), HeaderError::Json { .. });
        assert_err!(parse("{} x", 0), HeaderError::Json { .. });
    }

    #[test]
    fn a_header_that_is_not_an_object_is_rejected() {
        assert_err!(parse("[1, 2]", 0), HeaderError::NotObject);
        assert_err!(parse("\"weights\"", 0), HeaderError::NotObject);
        assert_err!(parse("null", 0), HeaderError::NotObject);
    }

    #[test]
    fn a_tensor_name_given_twice_is_rejected_not_collapsed() {
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let e = assert_err!(parse(json, 2), HeaderError::DuplicateTensor { .. });
        assert!(e.to_string().contains("`a`"), "{e}");
        assert_err!(
            parse(r#"{"__metadata__":{},"__metadata__":{}}"#, 0),
            HeaderError::DuplicateTensor { .. }
        );
    }

    #[test]
    fn an_unknown_dtype_is_rejected_with_the_tensor_name() {
        let e = assert_err!(
            parse(
                r#"{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
                1
            ),
            HeaderError::UnknownDtype { .. }
        );
        assert_eq!(e.to_string(), "tensor `w` has unknown dtype `F4`");
    }

    #[test]
    fn each_missing_field_is_named() {
        for (json, field) in [
            (r#"{"w":{"shape":[1],"data_offsets":[0,1]}}"#, "dtype"),
            (r#"{"w":{"dtype":"U8","data_offsets":[0,1]}}"#, "shape"),
            (r#"{"w":{"dtype":"U8","shape":[1]}}"#, "data_offsets"),
        ] {
            let e = assert_err!(parse(json, 1), HeaderError::MissingField { .. });
            assert_eq!(
                e,
                HeaderError::MissingField {
                    tensor: "w".into(),
                    field
                }
            );
        }
    }

    #[test]
    fn fields_of_the_wrong_type_are_rejected() {
        for (json, field) in [
            (
                r#"{"w":{"dtype":8,"shape":[1],"data_offsets":[0,1]}}"#,
                "dtype",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                "shape",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}"#,
                "shape",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}"#,
                "shape",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
                "data_offsets",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}}"#,
                "data_offsets",
            ),
        ] {
            match parse(json, 1) {
                Err(HeaderError::BadField { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_field_given_twice_in_one_tensor_is_rejected() {
        let json = r#"{"w":{"dtype":"U8","shape":[1],"shape":[2],"data_offsets":[0,1]}}"#;
        let e = assert_err!(parse(json, 1), HeaderError::DuplicateField { .. });
        assert_eq!(
            e.to_string(),
            "tensor `w`: field `shape` appears more than once"
        );
    }

    #[test]
    fn a_tensor_entry_that_is_not_an_object_is_rejected() {
        assert_err!(
            parse(r#"{"w":[1,2]}"#, 0),
            HeaderError::TensorNotObject {
                found: "an array",
                ..
            }
        );
        assert_err!(
            parse(r#"{"w":null}"#, 0),
            HeaderError::TensorNotObject { found: "null", .. }
        );
    }

    #[test]
    fn a_shape_whose_size_overflows_is_rejected() {
        let huge = usize::MAX / 2 + 1;
        let json = format!(r#"{{"w":{{"dtype":"U8","shape":[{huge},2],"data_offsets":[0,0]}}}}"#);
        assert_err!(parse(&json, 0), HeaderError::ShapeOverflow { .. });
        // Elements fit, bits do not.
        let json = format!(
            r#"{{"w":{{"dtype":"F64","shape":[{}],"data_offsets":[0,0]}}}}"#,
            usize::MAX / 8
        );
        assert_err!(parse(&json, 0), HeaderError::ShapeOverflow { .. });
        // A zero anywhere makes the product zero, however large the rest.
        let json =
            format!(r#"{{"w":{{"dtype":"U8","shape":[{huge},0,{huge}],"data_offsets":[0,0]}}}}"#);
        assert!(parse(&json, 0).is_ok());
    }

    #[test]
    fn a_byte_range_that_does_not_match_the_shape_is_rejected() {
        let e = assert_err!(
            parse(
                r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#,
                12
            ),
            HeaderError::SizeMismatch {
                expected: 16,
                actual: 12,
                ..
            }
        );
        assert!(e.to_string().contains("tensor `w`"), "{e}");
    }

    #[test]
    fn offsets_that_end_before_they_start_are_rejected() {
        assert_err!(
            parse(
                r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}"#,
                4
            ),
            HeaderError::EndBeforeStart {
                start: 4,
                end: 2,
                ..
            }
        );
    }

    #[test]
    fn offsets_past_the_data_section_are_rejected() {
        let e = assert_err!(
            parse(
                r#"{"w":{"dtype":"U8","shape":[9],"data_offsets":[0,9]}}"#,
                8
            ),
            HeaderError::OutOfRange {
                end: 9,
                data_len: 8,
                ..
            }
        );
        assert!(e.to_string().contains("tensor `w`"), "{e}");
        let json = format!(
            r#"{{"w":{{"dtype":"U8","shape":[1],"data_offsets":[{0},{0}]}}}}"#,
            u64::MAX
        );
        assert_err!(parse(&json, 0), HeaderError::OutOfRange { .. });
    }

    #[test]
    fn overlapping_tensors_are_rejected() {
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        let e = assert_err!(parse(json, 6), HeaderError::Overlap { start: 2, .. });
        assert_eq!(
            e.to_string(),
            "tensor `b` at data offset 2 overlaps tensor `a`"
        );
        // A zero-length tensor inside another overlaps it too.
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"e":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}"#;
        assert_err!(parse(json, 4), HeaderError::Overlap { .. });
        // Two tensors on the same bytes.
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#;
        assert_err!(parse(json, 4), HeaderError::Overlap { .. });
    }

    #[test]
    fn gaps_between_tensors_are_rejected() {
        let json = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#;
        let e = assert_err!(parse(json, 5), HeaderError::Gap { from: 2, to: 3, .. });
        assert!(e.to_string().contains("tensor `b`"), "{e}");
        // Data that does not start at offset 0 leaves a gap too.
        let json = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        assert_err!(parse(json, 3), HeaderError::Gap { from: 0, to: 1, .. });
    }

    #[test]
    fn bytes_after_the_last_tensor_are_rejected() {
        assert_err!(
            parse(TWO, 12),
            HeaderError::TrailingBytes { from: 11, to: 12 }
        );
        assert_err!(
            parse("{}", 1),
            HeaderError::TrailingBytes { from: 0, to: 1 }
        );
        assert!(parse(TWO, 11).is_ok());
    }

    #[test]
    fn metadata_must_be_a_map_of_strings_without_repeated_keys() {
        assert_err!(
            parse(r#"{"__metadata__":["x"]}"#, 0),
            HeaderError::MetadataNotMap { found: "an array" }
        );
        assert_err!(
            parse(r#"{"__metadata__":"x"}"#, 0),
            HeaderError::MetadataNotMap { found: "a string" }
        );
        let e = assert_err!(
            parse(r#"{"__metadata__":{"n":1}}"#, 0),
            HeaderError::MetadataValue { .. }
        );
        assert!(e.to_string().contains("`n`"), "{e}");
        assert_err!(
            parse(r#"{"__metadata__":{"k":"1","k":"2"}}"#, 0),
            HeaderError::DuplicateMetadataKey { .. }
        );
    }

    #[test]
    fn read_header_matches_parse_header_and_reads_only_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let bytes = file(TWO, 11);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read_header(&path).unwrap(),
            parse_header(&bytes, bytes.len() as u64).unwrap()
        );

        let mut hostile = u64::MAX.to_le_bytes().to_vec();
        hostile.extend(b"{}");
        fs::write(&path, &hostile).unwrap();
        match read_header(&path) {
            Err(FormatError::Header {
                source: HeaderError::HeaderTooLarge { .. },
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        fs::write(&path, [1, 2]).unwrap();
        let e = read_header(&path).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Header {
                    source: HeaderError::TooShort { file_len: 2 },
                    ..
                }
            ),
            "{e:?}"
        );
    }

    // ---- files on disk ----

    type Spec<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

    fn st_dtype(d: Dtype) -> safetensors::Dtype {
        serde_json::from_value(Value::String(d.name().into())).unwrap()
    }

    fn write_safetensors(path: &Path, tensors: &[Spec], metadata: &[(&str, &str)]) {
        let views: Vec<_> = tensors
            .iter()
            .map(|(name, d, shape, bytes)| {
                (
                    name.to_string(),
                    safetensors::tensor::TensorView::new(st_dtype(*d), shape.clone(), bytes)
                        .unwrap(),
                )
            })
            .collect();
        let meta: StdHashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let meta = (!meta.is_empty()).then_some(meta);
        safetensors::serialize_to_file(views, meta, path).unwrap();
    }

    fn bytes_of<const N: usize, T: Copy>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| f(v)).collect()
    }

    #[test]
    fn a_file_written_by_safetensors_opens_with_the_right_bytes_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        let w32 = [1.0f32, -2.5, 3.25, 0.0, 1e-3, 7.0];
        let w16 = [half::f16::from_f32(0.5), half::f16::from_f32(-1.0)];
        let wb16 = [
            half::bf16::from_f32(3.0),
            half::bf16::from_f32(-0.125),
            half::bf16::from_f32(2.0),
        ];
        let w64 = [0.1f64, -4.0];
        let tensors: Vec<Spec> = vec![
            (
                "layer.weight",
                Dtype::F32,
                vec![2, 3],
                bytes_of(&w32, f32::to_le_bytes),
            ),
            (
                "layer.f16",
                Dtype::F16,
                vec![2],
                bytes_of(&w16, half::f16::to_le_bytes),
            ),
            (
                "layer.bf16",
                Dtype::BF16,
                vec![3, 1],
                bytes_of(&wb16, half::bf16::to_le_bytes),
            ),
            (
                "layer.f64",
                Dtype::F64,
                vec![2],
                bytes_of(&w64, f64::to_le_bytes),
            ),
            ("steps", Dtype::I64, vec![1], 42i64.to_le_bytes().to_vec()),
            ("mask", Dtype::BOOL, vec![3], vec![1, 0, 1]),
            ("empty", Dtype::F32, vec![0, 5], vec![]),
        ];
        write_safetensors(&path, &tensors, &[("format", "pt")]);

        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(ckpt.shard_names(), ["weights.safetensors"]);
        assert!(!ckpt.is_sharded());
        assert!(ckpt.config_json().is_none());
        assert_eq!(
            ckpt.metadata().get("format").map(String::as_str),
            Some("pt")
        );
        assert_eq!(ckpt.shard_metadata(0), ckpt.metadata());
        assert_eq!(ckpt.tensors().len(), tensors.len());
        for (name, d, shape, bytes) in &tensors {
            let t = ckpt.get(name).unwrap();
            assert_eq!((t.dtype, &t.shape, t.shard), (*d, shape, 0), "{name}");
            assert_eq!(ckpt.bytes(t), bytes.as_slice(), "{name}");
        }
        let starts: Vec<_> = ckpt.tensors().iter().map(|t| t.start).collect();
        assert!(
            starts.windows(2).all(|w| w[0] <= w[1]),
            "not in data order: {starts:?}"
        );
        let total: usize = tensors.iter().map(|t| t.3.len()).sum();
        assert_eq!(ckpt.total_bytes(), total as u64);

        assert_eq!(ckpt.to_f32(ckpt.get("layer.weight").unwrap()), w32);
        assert_eq!(ckpt.to_f32(ckpt.get("layer.f16").unwrap()), [0.5, -1.0]);
        assert_eq!(
            ckpt.to_f32(ckpt.get("layer.bf16").unwrap()),
            [3.0, -0.125, 2.0]
        );
        assert_eq!(ckpt.to_f32(ckpt.get("layer.f64").unwrap()), [0.1f32, -4.0]);
        assert!(ckpt.to_f32(ckpt.get("empty").unwrap()).is_empty());
        assert!(ckpt.get("missing").is_none());
        for t in ckpt.tensors() {
            ckpt.advise_willneed(t);
        }
    }

    #[test]
    fn a_directory_with_one_file_and_a_config_opens_that_file() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[("w", Dtype::U8, vec![2], vec![7, 8])],
            &[],
        );
        fs::write(dir.path().join("config.json"), r#"{"model_type":"toy"}"#).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.shard_names(), ["model.safetensors"]);
        assert!(!ckpt.is_sharded());
        assert_eq!(ckpt.config_json().unwrap()["model_type"], "toy");
        assert_eq!(ckpt.bytes(&ckpt.tensors()[0]), [7, 8]);
    }

    #[test]
    fn an_invalid_config_json_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[("w", Dtype::U8, vec![1], vec![1])],
            &[],
        );
        fs::write(dir.path().join("config.json"), "{model_type").unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(e, FormatError::Config { .. }), "{e:?}");
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn a_path_that_does_not_exist_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nowhere.safetensors");
        let e = Checkpoint::open(&path).unwrap_err();
        assert!(matches!(e, FormatError::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("nowhere.safetensors"), "{e}");
    }

    #[test]
    fn a_directory_without_safetensors_files_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), "{}").unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(e, FormatError::NoSafetensors { .. }), "{e:?}");
    }

    #[test]
    fn several_files_without_an_index_are_rejected_as_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.safetensors", "b.safetensors"] {
            write_safetensors(
                &dir.path().join(name),
                &[(name, Dtype::U8, vec![1], vec![1])],
                &[],
            );
        }
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(e, FormatError::AmbiguousDirectory { .. }), "{e:?}");
        assert!(
            e.to_string().contains("a.safetensors, b.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_file_reports_its_path_and_the_header_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        fs::write(&path, file(TWO, 13)).unwrap();
        let e = Checkpoint::open(&path).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Header {
                    source: HeaderError::TrailingBytes { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("bad.safetensors"), "{e}");
        fs::write(&path, b"").unwrap();
        let e = Checkpoint::open(&path).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Header {
                    source: HeaderError::TooShort { file_len: 0 },
                    ..
                }
            ),
            "{e:?}"
        );
    }

    const SHARD1: &str = "model-00001-of-00002.safetensors";
    const SHARD2: &str = "model-00002-of-00002.safetensors";

    /// Two shards: `a`, `b` in the first; `c` in the second.
    fn sharded_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join(SHARD1),
            &[
                (
                    "a",
                    Dtype::F32,
                    vec![2],
                    bytes_of(&[1.0f32, 2.0], f32::to_le_bytes),
                ),
                (
                    "b",
                    Dtype::BF16,
                    vec![1],
                    half::bf16::from_f32(-3.0).to_le_bytes().to_vec(),
                ),
            ],
            &[("format", "pt"), ("shard", "1")],
        );
        write_safetensors(
            &dir.path().join(SHARD2),
            &[(
                "c",
                Dtype::F16,
                vec![2],
                bytes_of(
                    &[half::f16::ONE, half::f16::NEG_ONE],
                    half::f16::to_le_bytes,
                ),
            )],
            &[("shard", "2"), ("extra", "x")],
        );
        write_index(dir.path(), &[("c", SHARD2), ("a", SHARD1), ("b", SHARD1)]);
        fs::write(dir.path().join("config.json"), r#"{"hidden_size":2}"#).unwrap();
        dir
    }

    fn write_index(dir: &Path, map: &[(&str, &str)]) {
        let entries: Vec<String> = map
            .iter()
            .map(|(t, s)| format!("\"{t}\":\"{s}\""))
            .collect();
        let json = format!(
            r#"{{"metadata":{{"total_size":14}},"weight_map":{{{}}}}}"#,
            entries.join(",")
        );
        fs::write(dir.join(INDEX_FILE), json).unwrap();
    }

    #[test]
    fn a_sharded_checkpoint_opens_in_shard_then_offset_order() {
        let dir = sharded_dir();
        // An unrelated file beside the shards is not part of the checkpoint.
        write_safetensors(
            &dir.path().join("consolidated.safetensors"),
            &[("z", Dtype::U8, vec![1], vec![0])],
            &[],
        );
        for path in [dir.path().to_path_buf(), dir.path().join(INDEX_FILE)] {
            let ckpt = Checkpoint::open(&path).unwrap();
            assert!(ckpt.is_sharded());
            assert_eq!(ckpt.shard_names(), [SHARD1, SHARD2]);
            let order: Vec<_> = ckpt
                .tensors()
                .iter()
                .map(|t| (t.name.as_str(), t.shard))
                .collect();
            assert_eq!(order, [("a", 0), ("b", 0), ("c", 1)]);
            assert_eq!(ckpt.to_f32(ckpt.get("a").unwrap()), [1.0, 2.0]);
            assert_eq!(ckpt.to_f32(ckpt.get("b").unwrap()), [-3.0]);
            assert_eq!(ckpt.to_f32(ckpt.get("c").unwrap()), [1.0, -1.0]);
            assert_eq!(ckpt.total_bytes(), 8 + 2 + 4);
            assert_eq!(ckpt.config_json().unwrap()["hidden_size"], 2);
            // Merged metadata keeps the first shard's value on conflict.
            let merged: Vec<_> = ckpt
                .metadata()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(merged, [("extra", "x"), ("format", "pt"), ("shard", "1")]);
            assert_eq!(ckpt.shard_metadata(1)["shard"], "2");
            assert!(ckpt.get("z").is_none());
        }
    }

    fn open_err(dir: &Path) -> FormatError {
        Checkpoint::open(dir).unwrap_err()
    }

    #[test]
    fn an_index_that_is_not_valid_json_is_rejected() {
        let dir = sharded_dir();
        fs::write(dir.path().join(INDEX_FILE), "{\"weight_map\":").unwrap();
        assert!(matches!(open_err(dir.path()), FormatError::Index { .. }));
        fs::write(dir.path().join(INDEX_FILE), "{\"metadata\":{}}").unwrap();
        let e = open_err(dir.path());
        assert!(
            matches!(e, FormatError::Index { .. }) && e.to_string().contains("weight_map"),
            "{e}"
        );
        fs::write(dir.path().join(INDEX_FILE), r#"{"weight_map":{"a":1}}"#).unwrap();
        assert!(matches!(open_err(dir.path()), FormatError::Index { .. }));
    }

    #[test]
    fn an_index_listing_a_tensor_twice_is_rejected() {
        let dir = sharded_dir();
        write_index(
            dir.path(),
            &[("a", SHARD1), ("b", SHARD1), ("c", SHARD2), ("a", SHARD2)],
        );
        let e = open_err(dir.path());
        assert!(
            matches!(e, FormatError::Index { .. }) && e.to_string().contains("`a`"),
            "{e}"
        );
    }

    #[test]
    fn an_index_naming_a_path_outside_its_directory_is_rejected() {
        let dir = sharded_dir();
        write_index(
            dir.path(),
            &[
                ("a", "../model-00001-of-00002.safetensors"),
                ("b", SHARD1),
                ("c", SHARD2),
            ],
        );
        assert!(matches!(open_err(dir.path()), FormatError::Index { .. }));
    }

    #[test]
    fn an_index_naming_a_missing_shard_is_rejected() {
        let dir = sharded_dir();
        fs::remove_file(dir.path().join(SHARD2)).unwrap();
        let e = open_err(dir.path());
        assert!(
            matches!(&e, FormatError::MissingShard { shard, .. } if shard == SHARD2),
            "{e:?}"
        );
    }

    #[test]
    fn an_indexed_tensor_absent_from_its_shard_is_rejected() {
        let dir = sharded_dir();
        write_index(
            dir.path(),
            &[("a", SHARD1), ("b", SHARD1), ("c", SHARD2), ("d", SHARD2)],
        );
        let e = open_err(dir.path());
        assert!(
            matches!(&e, FormatError::NotInShard { tensor, shard } if tensor == "d" && shard == SHARD2),
            "{e:?}"
        );
    }

    #[test]
    fn a_shard_tensor_that_the_index_maps_elsewhere_is_rejected() {
        let dir = sharded_dir();
        write_index(dir.path(), &[("a", SHARD1), ("b", SHARD2), ("c", SHARD2)]);
        let e = open_err(dir.path());
        assert!(
            matches!(&e, FormatError::MappedElsewhere { tensor, shard, indexed } if tensor == "b" && shard == SHARD1 && indexed == SHARD2),
            "{e:?}"
        );
    }

    #[test]
    fn a_shard_tensor_missing_from_the_index_is_rejected() {
        let dir = sharded_dir();
        write_index(dir.path(), &[("a", SHARD1), ("c", SHARD2)]);
        let e = open_err(dir.path());
        assert!(
            matches!(&e, FormatError::Unindexed { tensor, .. } if tensor == "b"),
            "{e:?}"
        );
    }

    #[test]
    fn a_tensor_in_two_shards_is_rejected() {
        let dir = sharded_dir();
        write_safetensors(
            &dir.path().join(SHARD2),
            &[
                ("c", Dtype::U8, vec![1], vec![1]),
                ("a", Dtype::U8, vec![1], vec![1]),
            ],
            &[],
        );
        let e = open_err(dir.path());
        assert!(
            matches!(&e, FormatError::DuplicateAcrossShards { tensor, first, second } if tensor == "a" && first == SHARD1 && second == SHARD2),
            "{e:?}"
        );
    }

    #[test]
    fn a_malformed_shard_names_its_file() {
        let dir = sharded_dir();
        fs::write(
            dir.path().join(SHARD2),
            file(
                r#"{"c":{"dtype":"F16","shape":[2],"data_offsets":[0,3]}}"#,
                3,
            ),
        )
        .unwrap();
        let e = open_err(dir.path());
        assert!(
            matches!(
                e,
                FormatError::Header {
                    source: HeaderError::SizeMismatch { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(SHARD2), "{e}");
    }

    // ---- properties ----

    fn dtype_strategy() -> impl Strategy<Value = Dtype> {
        proptest::sample::select(Dtype::ALL.to_vec())
    }

    /// A valid file written by the safetensors crate: up to four tensors of
    /// random dtype and small shape, with random data and metadata.
    fn valid_file() -> impl Strategy<Value = Vec<u8>> {
        let tensor = (dtype_strategy(), proptest::collection::vec(0usize..4, 0..3));
        (
            proptest::collection::btree_map("[a-z.]{1,6}", tensor, 0..4),
            proptest::collection::hash_map("[a-z]{1,4}", "[ -~]{0,6}", 0..3),
            any::<u64>(),
        )
            .prop_map(|(tensors, metadata, seed)| {
                let data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
                    .into_iter()
                    .map(|(name, (d, shape))| {
                        let len = shape.iter().product::<usize>() * d.bitsize() / 8;
                        let bytes = (0..len as u64)
                            .map(|i| (seed.rotate_left(i as u32) ^ i) as u8)
                            .collect();
                        (name, d, shape, bytes)
                    })
                    .collect();
                let views: Vec<_> = data
                    .iter()
                    .map(|(n, d, s, b)| {
                        (
                            n.clone(),
                            safetensors::tensor::TensorView::new(st_dtype(*d), s.clone(), b)
                                .unwrap(),
                        )
                    })
                    .collect();
                let metadata = (!metadata.is_empty()).then_some(metadata);
                safetensors::serialize(views, metadata).unwrap()
            })
    }

    /// Asserts that a header we accept is one the reference reader accepts,
    /// with the same tensors.
    fn agrees_with_reference(bytes: &[u8], header: &Header) -> Result<(), TestCaseError> {
        let reference = safetensors::SafeTensors::deserialize(bytes);
        prop_assert!(
            reference.is_ok(),
            "accepted here, rejected by safetensors: {:?}",
            reference.err()
        );
        let reference = reference.unwrap();
        let mut theirs: Vec<_> = reference
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let dtype = serde_json::to_value(view.dtype()).unwrap();
                (
                    name,
                    dtype.as_str().map(str::to_string),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                )
            })
            .collect();
        theirs.sort();
        let mut ours: Vec<_> = header
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    Some(t.dtype.name().to_string()),
                    t.shape.clone(),
                    bytes[t.start..t.end].to_vec(),
                )
            })
            .collect();
        ours.sort();
        prop_assert_eq!(ours, theirs);
        let (_, reference_header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
        let their_meta: BTreeMap<String, String> = reference_header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        prop_assert_eq!(&header.metadata, &their_meta);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), extra in 0u64..1000) {
            let _ = parse_header(&bytes, bytes.len() as u64);
            let _ = parse_header(&bytes, bytes.len() as u64 + extra);
        }

        #[test]
        fn random_json_after_a_fitting_length_never_panics(
            body in proptest::collection::vec(proptest::sample::select(b"{}[],:\"0123456789 -e.\\aFU8_".to_vec()), 0..80),
            data in 0usize..32,
        ) {
            let body = String::from_utf8(body).unwrap();
            let _ = parse(&body, data);
        }

        #[test]
        fn files_written_by_safetensors_are_accepted_and_read_alike(bytes in valid_file()) {
            let header = parse_header(&bytes, bytes.len() as u64);
            prop_assert!(header.is_ok(), "{:?}", header);
            agrees_with_reference(&bytes, &header.unwrap())?;
        }

        #[test]
        fn mutated_headers_never_panic_and_are_accepted_only_when_valid(
            bytes in valid_file(),
            edits in proptest::collection::vec(
                (any::<prop::sample::Index>(), prop_oneof![
                    any::<u8>(),
                    proptest::sample::select(b"{}[],:\"0123456789 -e.".to_vec()),
                ]),
                1..4,
            ),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = bytes;
            // Aim most edits at the length field and the JSON.
            let json_len = bytes.get(..8).map_or(0, |b| {
                let mut len = [0; 8];
                len.copy_from_slice(b);
                u64::from_le_bytes(len).min(4096) as usize
            });
            let header_end = bytes.len().min(8 + json_len + 16);
            for (at, byte) in edits {
                let i = at.index(header_end.max(1));
                if let Some(b) = bytes.get_mut(i) {
                    *b = byte;
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            if let Ok(header) = parse_header(&bytes, bytes.len() as u64) {
                agrees_with_reference(&bytes, &header)?;
            }
        }
    }
}
