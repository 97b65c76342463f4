//! The command line as a Unix tool: output into a pipe closed early.

mod common;

use std::io::Read;
use std::process::Stdio;

use common::*;

#[test]
#[cfg(unix)]
fn a_closed_pipe_ends_inspect_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("many.safetensors");
    // Far more listing than a pipe buffers, so the writer meets the closed
    // end whatever the timing.
    let mut rng = Rng::new(1);
    let tensors: Vec<T> = (0..4000)
        .map(|i| {
            gaussian(
                &format!("blocks.{i}.some_rather_long_layer_name.weight"),
                &[2, 2],
                0.1,
                &mut rng,
            )
        })
        .collect();
    write(&input, &tensors);
    let mut child = bin()
        .args(["inspect", input.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little, as `head -n 1` does, then close the pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "nothing on stderr, got: {stderr}");
    // Ended by SIGPIPE, as `cat` and `ls` are, or exited cleanly.
    assert!(
        out.status.signal() == Some(13) || out.status.success(),
        "{:?}",
        out.status
    );
}
