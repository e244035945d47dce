//! Open-loop pacing finer than tokio's timer.
//!
//! Tokio's timer counts whole milliseconds, and a 1 ms sleep ends on the next tick but
//! one: a producer that slept on it sent a millisecond's records in one burst and
//! added up to 2 ms to a record's latency from its place in the schedule, twice the
//! latency being measured. A thread that ticks every [`TICK`] wakes the paced tasks
//! instead. Each tick wakes every paced task, so a shorter tick costs CPU the broker
//! shares; docs/BENCHMARKS.md ("Open-loop pacing") has how 100 µs and 250 µs compared.

use std::time::Duration;

use tokio::sync::watch;

/// How often paced tasks wake (the kernel adds its timer slack, about 50 µs).
pub const TICK: Duration = Duration::from_micros(250);

/// Wakes its holder once per tick; clones share one ticking thread, which stops once
/// every clone is dropped.
#[derive(Clone, Debug)]
pub struct Ticks(watch::Receiver<u64>);

impl Ticks {
    pub fn start() -> std::io::Result<Self> {
        let (sender, receiver) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("lanes-bench-pacer".into())
            .spawn(move || {
                let mut tick = 0u64;
                loop {
                    std::thread::sleep(TICK);
                    tick += 1;
                    if sender.send(tick).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self(receiver))
    }

    /// Waits for the next tick.
    pub async fn next(&mut self) {
        // Fails only once the thread is gone, which it is not while `self` lives.
        let _ = self.0.changed().await;
    }
}
