//! modelpress: compression of trained neural-network checkpoints.
//!
//! [`compress`] is the engine (kernels and pipeline, no I/O), [`format`]
//! reads and writes checkpoints, [`run`] runs a pipeline over a checkpoint
//! on disk: the one entry point of the command line and the service.
//!
//! The service: [`service`] (what requests do, below HTTP), [`store`] (the database and the job queue), [`blobs`]
//! (content-addressed files), [`worker`] (the pool that runs jobs),
//! [`webhook`] with the [`outbound`] policy every outgoing request obeys,
//! [`api`] (HTTP routes and the OpenAPI document), [`config`]
//! and [`startup`].
pub mod api;
pub mod blobs;
pub mod compress;
pub mod config;
pub mod format;
pub mod outbound;
pub mod run;
pub mod service;
pub mod startup;
pub mod store;
pub mod webhook;
pub mod worker;
