//! The compression engine: pipeline spec, kernels and metrics.
//!
//! Pure computation on tensors in memory: no files, no async runtime, no
//! database. The runner in [`crate::run`] feeds it one tensor at a time.
pub mod binarize;
pub mod bitpack;
pub mod calibrate;
pub mod coded;
pub mod fused;
pub mod huffman;
pub mod lowrank;
pub mod metrics;
pub mod prune;
pub mod quantize;
pub mod report;
pub mod rowwise;
pub mod share;
pub mod sparse;
pub mod spec;
pub mod structural;
pub mod tensor;
#[cfg(test)]
pub(crate) mod testing;
