//! Latency histograms (HdrHistogram, microsecond resolution) and their summaries.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// A histogram that many tasks record into.
#[derive(Debug)]
pub struct Latencies {
    histogram: Mutex<Histogram<u64>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            histogram: Mutex::new(new_histogram()),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // Up to an hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One task's histogram, recorded into without a lock and added to a [`Latencies`] at
/// the end: a task that records every record would otherwise take the shared lock
/// hundreds of thousands of times a second, on the cores the broker needs.
#[derive(Debug)]
pub struct LocalLatencies(Histogram<u64>);

impl Default for LocalLatencies {
    fn default() -> Self {
        LocalLatencies(new_histogram())
    }
}

impl LocalLatencies {
    pub fn record(&mut self, latency: Duration) {
        self.0.saturating_record(micros(latency));
    }
}

impl Latencies {
    pub fn record(&self, latency: Duration) {
        self.histogram
            .lock()
            .expect("histogram lock poisoned")
            .saturating_record(micros(latency));
    }

    /// Adds what one task recorded.
    pub fn add(&self, local: &LocalLatencies) {
        self.histogram
            .lock()
            .expect("histogram lock poisoned")
            .add(&local.0)
            .expect("histograms of the same bounds");
    }

    pub fn summary(&self) -> Summary {
        let histogram = self.histogram.lock().expect("histogram lock poisoned");
        let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
        Summary {
            count: histogram.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: histogram.max() as f64 / 1000.0,
        }
    }
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "p50": round(self.p50_ms),
            "p90": round(self.p90_ms),
            "p99": round(self.p99_ms),
            "p999": round(self.p999_ms),
            "max": round(self.max_ms),
        })
    }
}

/// Milliseconds to three decimals (microseconds), for output.
pub fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_values() {
        let latencies = Latencies::default();
        for ms in 1..=100 {
            latencies.record(Duration::from_millis(ms));
        }
        let summary = latencies.summary();
        assert_eq!(summary.count, 100);
        assert!((summary.p50_ms - 50.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p99_ms - 99.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max_ms - 100.0).abs() < 0.1, "{summary:?}");
    }
}
