//! `lanes-bench`: the throughput and latency harness and the order-fulfilment demo.
//!
//! Not built yet (issue 6). The storage engine's own benchmarks live in
//! `broker/benches` (criterion) and are described in docs/BENCHMARKS.md.
