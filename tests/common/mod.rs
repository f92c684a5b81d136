//! Shared by the integration tests that run the `dllm` binary: the embedded model's path, one
//! way to run the binary (the environment pinned: no `DLLM_MODEL`, two rayon threads), and the
//! success checks that print its stderr when it failed.
#![allow(dead_code)] // each test crate uses part of it

pub mod checkpoint;
pub mod emulation;
pub mod logits;
pub mod naive;
pub mod odd;

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// The embedded tiny model.
pub const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");

/// Runs `dllm args`, feeding `stdin` (none: an empty, closed stdin), whatever its exit status.
pub fn run_dllm(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dllm"))
        .args(args)
        .env_remove("DLLM_MODEL")
        .env("RAYON_NUM_THREADS", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dllm");
    let mut pipe = child.stdin.take().expect("stdin piped");
    if let Some(text) = stdin {
        // A run that fails before reading its input (a bad flag) closes the pipe first: that is
        // its answer, judged by its status and stderr, not an error of the test.
        if let Err(e) = pipe.write_all(text.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
    }
    drop(pipe);
    child.wait_with_output().expect("wait for dllm")
}

/// Asserts that the run succeeded (showing its stderr otherwise) and returns it.
pub fn succeeded(out: Output) -> Output {
    assert!(
        out.status.success(),
        "dllm failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The stdout of a successful run, as text.
pub fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// The stdout of a successful run, parsed as one JSON value.
pub fn json_ok(out: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout_ok(out)).expect("stdout is one JSON value")
}

/// The `canvas` ids of a `--json` result.
pub fn canvas_ids(v: &serde_json::Value) -> Vec<u32> {
    v["canvas"]
        .as_array()
        .expect("a canvas array")
        .iter()
        .map(|t| t.as_u64().expect("an id") as u32)
        .collect()
}
