//! The `dllm` command-line tool.
fn main() {}
