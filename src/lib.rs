//! modelpress: compression of trained neural-network checkpoints.
//!
//! [`compress`] is the engine (kernels and pipeline, no I/O), [`format`]
//! reads and writes checkpoints, [`run`] runs a pipeline over a checkpoint
//! on disk: the one entry point of the command line and the service.
//!
//! The service: [`service`] (what requests do, below HTTP), [`store`] (the
//! database and the job queue), [`blobs`] (content-addressed files),
//! [`worker`] (the pool that runs jobs),
//! [`webhook`] with the [`outbound`] policy every outgoing request obeys,
//! [`api`] (HTTP routes and the OpenAPI document), [`config`]
//! and [`startup`] — built with the `service` feature (on by default).
#[cfg(feature = "service")]
pub mod api;
#[cfg(feature = "service")]
pub mod blobs;
pub mod compress;
#[cfg(feature = "service")]
pub mod config;
pub mod cpu;
pub mod format;
#[cfg(feature = "service")]
pub mod outbound;
pub mod run;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "service")]
pub mod startup;
#[cfg(feature = "service")]
pub mod store;
#[cfg(feature = "service")]
pub mod webhook;
#[cfg(feature = "service")]
pub mod worker;
