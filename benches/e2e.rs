//! End-to-end harness (placeholder until the benchmark harness lands).
fn main() {}
