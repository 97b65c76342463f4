//! The dense output: the input's tensor names, shapes and dtypes, holding
//! the values the pipeline decompresses to.

use std::collections::BTreeMap;

use serde_json::Value;

use super::sink::{
    encode_f32, Finished, OutputTensor, ProcessedTensor, ShardFiles, Sink, SinkError,
};
use super::writer::header_reserve;

pub struct DenseSink {
    files: ShardFiles,
    /// The input's `__metadata__`, kept in every shard.
    metadata: BTreeMap<String, String>,
}

impl DenseSink {
    pub fn new(files: ShardFiles, metadata: BTreeMap<String, String>) -> Self {
        Self { files, metadata }
    }
}

impl Sink for DenseSink {
    fn wants_dense(&self) -> bool {
        true
    }

    fn begin_shard(&mut self, shard: &str, tensors: &[OutputTensor<'_>]) -> Result<(), SinkError> {
        let reserve = header_reserve(
            tensors.iter().map(|t| (t.name, t.shape.len())),
            &self.metadata,
        );
        Ok(self.files.begin(shard, reserve)?)
    }

    fn write_untouched(&mut self, t: OutputTensor<'_>, bytes: &[u8]) -> Result<(), SinkError> {
        Ok(self.files.append(t.name, t.dtype, t.shape, bytes)?)
    }

    fn write_processed(&mut self, t: &ProcessedTensor<'_>) -> Result<(), SinkError> {
        let dense = t.dense.unwrap_or_default();
        let bytes = encode_f32(t.tensor.dtype, dense);
        Ok(self
            .files
            .append(t.tensor.name, t.tensor.dtype, &t.processed.shape, &bytes)?)
    }

    fn data_bytes(&self) -> u64 {
        self.files.data_bytes()
    }

    fn finish_shard(&mut self) -> Result<(), SinkError> {
        Ok(self.files.finish(&self.metadata)?)
    }

    fn finish(self: Box<Self>, config: Option<Value>) -> Result<Finished, SinkError> {
        Ok(self.files.into_finished(config))
    }
}
