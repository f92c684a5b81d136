//! Criterion benchmarks of the CPU backend.
fn main() {}
