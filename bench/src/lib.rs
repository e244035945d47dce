//! `lanes-bench`: the throughput and latency harness (and, with issue 6, the
//! order-fulfilment demo). Each scenario runs against an embedded broker (in-process, on
//! a temp dir) or a running one.
//!
//! - [`target`]: the broker under test, embedded or remote.
//! - [`latency`]: latency histograms and their summaries.
//! - [`report`]: the settings every scenario shares, and what it reports.
//! - [`produce`], [`consume`], [`e2e`]: throughput and latency of producers, consumers,
//!   and both at once.
//! - [`orders`]: the order-fulfilment demo.
//! - [`machine`]: what the machine's CPUs did during a run, steal included.
//! - [`pace`]: open-loop pacing for `--rate`, finer than tokio's timer.
//! - [`lanes`]: the priority scenario: express latency idle, behind a bulk backlog, and
//!   on a one-lane topic (plain FIFO), and bulk's share while express is saturated.
//!
//! The storage engine's own benchmarks live in `broker/benches` (criterion).

pub mod consume;
pub mod e2e;
pub mod lanes;
pub mod latency;
pub mod machine;
pub mod orders;
pub mod pace;
pub mod produce;
pub mod report;
pub mod target;

/// Spawns a scenario's task so that it ends when its handle is dropped: an interrupted
/// scenario stops its producers and consumers instead of leaving them retrying against
/// a broker that is shutting down.
pub(crate) fn spawn_scoped<F>(future: F) -> tokio_util::task::AbortOnDropHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(future))
}
