//! Criterion micro-benchmarks (placeholder until the benchmark harness lands).
fn main() {}
