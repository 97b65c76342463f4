//! Where compressed tensors go: one [`Sink`] per output format.
//!
//! The runner hands a sink every output tensor in checkpoint order, each
//! either untouched (its bytes straight from the input) or processed (the
//! result of its stages), grouped in shards; the sink decides the stored
//! pieces and the shard metadata. [`ShardFiles`] is what every sink writes
//! through: the open shard's [`SafetensorsWriter`] and the weight map of
//! the index.
//!
//! - [`DenseSink`](super::dense::DenseSink): the input's names and dtypes,
//!   decompressed values;
//! - [`PackedSink`](super::packed::PackedSink): the compact pieces, restorable
//!   with `decompress`;
//! - [`CompressedTensorsSink`](super::compressed_tensors::CompressedTensorsSink):
//!   the layout vLLM and llm-compressor load.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use super::dtype::{from_f32_vec, Dtype};
use super::writer::{Durability, SafetensorsWriter, WriteError};
use crate::compress::tensor::Processed;

/// One output tensor as the runner planned it.
#[derive(Debug, Clone, Copy)]
pub struct OutputTensor<'a> {
    pub name: &'a str,
    /// The dtype of the input tensor it comes from.
    pub dtype: Dtype,
    pub shape: &'a [usize],
}

/// A processed tensor and what a sink may need besides its values.
pub struct ProcessedTensor<'a> {
    pub tensor: OutputTensor<'a>,
    pub processed: &'a Processed,
    /// The dense values in the tensor's dtype precision; present when
    /// [`Sink::wants_dense`] or when the values are low-rank factors.
    pub dense: Option<&'a [f32]>,
    /// The pipeline stages that ran on it (indices).
    pub stages: &'a [usize],
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The pipeline made something the output format cannot hold.
    #[error("{0}")]
    Unexpressible(String),
    #[error("config.json is not a JSON object")]
    ConfigNotObject,
}

/// What a sink leaves besides the shard files.
pub struct Finished {
    /// Stored tensor name → shard file, for the index.
    pub weight_map: BTreeMap<String, String>,
    /// The `config.json` to write beside the shards.
    pub config: Option<Value>,
}

/// An output format.
pub trait Sink {
    /// Whether [`ProcessedTensor::dense`] must be filled for every processed
    /// tensor.
    fn wants_dense(&self) -> bool {
        false
    }

    /// Opens shard file `shard`, which will hold `tensors` in that order.
    fn begin_shard(&mut self, shard: &str, tensors: &[OutputTensor<'_>]) -> Result<(), SinkError>;

    /// Writes a tensor that no stage touched, as stored in the input.
    fn write_untouched(&mut self, t: OutputTensor<'_>, bytes: &[u8]) -> Result<(), SinkError>;

    /// Writes a tensor after its stages.
    fn write_processed(&mut self, t: &ProcessedTensor<'_>) -> Result<(), SinkError>;

    /// Bytes of tensor data written to the open shard so far.
    fn data_bytes(&self) -> u64;

    /// Completes the open shard's file.
    fn finish_shard(&mut self) -> Result<(), SinkError>;

    /// Ends the output; `config` is the input's `config.json` (or the one
    /// given instead).
    fn finish(self: Box<Self>, config: Option<Value>) -> Result<Finished, SinkError>;
}

/// The shard files of one output, in a directory.
pub struct ShardFiles {
    dir: PathBuf,
    durability: Durability,
    open: Option<(String, SafetensorsWriter)>,
    weight_map: BTreeMap<String, String>,
}

impl ShardFiles {
    pub fn new(dir: PathBuf, durability: Durability) -> Self {
        Self {
            dir,
            durability,
            open: None,
            weight_map: BTreeMap::new(),
        }
    }

    /// Starts shard file `name` with `header_reserve` bytes of room for its
    /// header.
    pub fn begin(&mut self, name: &str, header_reserve: u64) -> Result<(), WriteError> {
        let writer =
            SafetensorsWriter::create_with(&self.dir.join(name), header_reserve, self.durability)?;
        self.open = Some((name.to_string(), writer));
        Ok(())
    }

    /// Appends a stored tensor to the open shard.
    pub fn append(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        let (shard, writer) = self.open.as_mut().expect("a shard is open");
        writer.append(name, dtype, shape, bytes)?;
        self.weight_map.insert(name.to_string(), shard.clone());
        Ok(())
    }

    pub fn data_bytes(&self) -> u64 {
        self.open.as_ref().map_or(0, |(_, w)| w.data_bytes())
    }

    /// Writes the open shard's header with `metadata` and moves the file
    /// into place.
    pub fn finish(&mut self, metadata: &BTreeMap<String, String>) -> Result<(), WriteError> {
        let (_, writer) = self.open.take().expect("a shard is open");
        writer.finish(metadata)?;
        Ok(())
    }

    /// The weight map, with `config` to write.
    pub fn into_finished(self, config: Option<Value>) -> Finished {
        Finished {
            weight_map: self.weight_map,
            config,
        }
    }
}

/// `values` encoded in `dtype` (see [`from_f32_vec`]); F32 on a
/// little-endian machine is the values' own bytes, not a copy.
pub fn encode_f32(dtype: Dtype, values: &[f32]) -> Cow<'_, [u8]> {
    if dtype == Dtype::F32 && cfg!(target_endian = "little") {
        // SAFETY: any initialized memory can be read as bytes, and u8 has
        // no alignment requirement, so the whole slice is the middle part.
        let (head, bytes, tail) = unsafe { values.align_to::<u8>() };
        debug_assert!(head.is_empty() && tail.is_empty());
        return Cow::Borrowed(bytes);
    }
    Cow::Owned(from_f32_vec(dtype, values))
}
