//! The HTTP service, end to end: each test starts the real server on a free
//! port with its own data directory.

#[path = "../common/mod.rs"]
mod common;
mod contract;
mod database;
mod errors;
mod helpers;
mod jobs;
mod openapi;
mod recovery;
mod replicas;
mod s3;
#[path = "../common/s3.rs"]
mod s3_server;
mod scale;
mod statistics;
mod storage;
mod telemetry;
mod uploads;
mod webhook;
