//! Benchmarks for accl; see benches/.
