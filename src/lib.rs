//! modelpress: compression of trained neural-network checkpoints.
//!
//! [`compress`] is the engine (kernels and pipeline, no I/O), [`format`]
//! reads and writes checkpoints, [`run`] runs a pipeline over a checkpoint
//! on disk: the one entry point of the command line and the service.
pub mod compress;
pub mod format;
pub mod run;
