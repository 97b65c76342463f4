//! Parsing one safetensors header.
//!
//! Nothing read from disk is trusted. Every header is held to the rules of
//! the reference safetensors reader — tensors tile the data section from its
//! first byte to the end of the file, and each tensor's byte range is its
//! shape times its element size, computed with checked arithmetic — and to
//! one more: no tensor name may appear twice (a JSON map would silently keep
//! the last). Each failure is a variant of [`HeaderError`] whose message
//! names the tensor or offset at fault.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::dtype::Dtype;

/// Largest header accepted, as in the reference reader: a larger one is
/// either corrupt or a denial of service.
pub const MAX_HEADER_LEN: u64 = 100_000_000;
const METADATA_KEY: &str = "__metadata__";

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::shard_names`](crate::format::checkpoint::Checkpoint::shard_names).
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
pub(super) struct Entries<V>(pub(super) Vec<(String, V)>);

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

#[cfg(test)]
pub(crate) mod tests;
