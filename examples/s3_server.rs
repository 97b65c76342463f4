//! A real S3-compatible server (s3s over a temporary directory) for trying
//! and measuring `--blob-store s3://…` without installing one: prints its
//! endpoint, the bucket and the credentials, and serves until killed.
//!
//!   cargo run --release --example s3_server

#[path = "../tests/common/s3.rs"]
mod s3;

#[tokio::main]
async fn main() {
    let server = s3::S3Server::start().await;
    println!(
        "endpoint {} bucket {} access-key {} secret-key {}",
        server.endpoint(),
        s3::BUCKET,
        s3::ACCESS_KEY,
        s3::SECRET_KEY
    );
    let _ = tokio::signal::ctrl_c().await;
}
