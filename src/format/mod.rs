//! Checkpoints on disk: safetensors in (memory-mapped, sharded, distrusted)
//! and out (dense, packed, compressed-tensors).
pub mod checkpoint;
pub mod compressed_tensors;
pub mod ct_targets;
pub mod dense;
pub mod dtype;
pub mod header;
pub mod packed;
pub mod sink;
pub mod stats;
pub mod writer;
