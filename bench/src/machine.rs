//! What the machine's CPUs did during a run: the kernel's counters in `/proc/stat`, and
//! how late a sleeping thread woke up.
//!
//! On a shared virtual machine the host runs other guests on our CPUs, and the guest
//! sees that time as *steal*. A run's tail latency follows steal more than anything the
//! broker does (docs/BENCHMARKS.md, "Time the host takes"), so every report carries
//! the split, and figures can be read against it.
//!
//! Steal misses the host's other delay: a CPU with nothing to run halts, and a thread
//! woken on it runs only once the host runs that CPU again, which on a busy host can
//! take milliseconds. The guest counts that time as idle. A probe thread that sleeps
//! 1 ms at a time meets the same delay, and counts it ([`LateWakeups`];
//! docs/BENCHMARKS.md, "Late wakeups").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// How long the probe sleeps at a time: a run of a few seconds wakes it thousands of
/// times, and its wakeups (under 1,000 a second) are a small part of a produce run's
/// (10,000 to 20,000 a second: docs/BENCHMARKS.md, "Late wakeups").
const PROBE_SLEEP: Duration = Duration::from_millis(1);

/// A wakeup later than this past its sleep counts as late: the scale of the p99 target
/// at half speed, and far above the timer's slack (50 µs).
const LATE: Duration = Duration::from_millis(1);

/// Cleared by `--no-wakeup-probe`.
static WAKEUP_PROBE: AtomicBool = AtomicBool::new(true);

/// Runs from now on without the probe thread: to measure what it costs.
pub fn leave_out_wakeup_probe() {
    WAKEUP_PROBE.store(false, Ordering::Relaxed);
}

/// Watches the machine over a run: CPU shares, and the wakeup probe.
#[derive(Debug)]
pub struct MachineWatch {
    cpu: Option<CpuTimes>,
    probe: Option<WakeupProbe>,
}

impl MachineWatch {
    pub fn start() -> MachineWatch {
        // Where there are no CPU times to report (not Linux), the probe's count would
        // have nowhere to go.
        let cpu = CpuTimes::read();
        let probe = if cpu.is_some() && WAKEUP_PROBE.load(Ordering::Relaxed) {
            WakeupProbe::start()
        } else {
            None
        };
        MachineWatch { cpu, probe }
    }

    /// What the machine did from the start to now (`None` where `/proc/stat` cannot be
    /// read: not Linux). Stops the probe.
    pub fn finish(self) -> Option<CpuShares> {
        let late_wakeups = self.probe.and_then(WakeupProbe::stop);
        let mut shares = self.cpu?.shares_until_now()?;
        shares.late_wakeups = late_wakeups;
        Some(shares)
    }
}

/// The probe's wakeups over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LateWakeups {
    pub wakeups: u64,
    /// Wakeups more than 1 ms (`LATE`) after the sleep's end.
    pub late_count: u64,
    /// The latest wakeup, past the sleep's end (ms).
    pub late_ms_max: f64,
    /// Time the late wakeups lost, summed (ms).
    pub late_ms_total: f64,
}

impl LateWakeups {
    fn count(&mut self, overslept: Duration) {
        self.wakeups += 1;
        if overslept > LATE {
            let ms = overslept.as_secs_f64() * 1e3;
            self.late_count += 1;
            self.late_ms_max = self.late_ms_max.max(ms);
            self.late_ms_total += ms;
        }
    }

    pub fn to_json(&self) -> Value {
        let round = |ms: f64| (ms * 10.0).round() / 10.0;
        json!({
            "wakeups": self.wakeups,
            "late_over_1ms": self.late_count,
            "late_ms_max": round(self.late_ms_max),
            "late_ms_total": round(self.late_ms_total),
        })
    }
}

#[derive(Debug)]
struct WakeupProbe {
    stop: Arc<AtomicBool>,
    /// Taken by [`WakeupProbe::stop`]; a probe dropped without it (a run that failed)
    /// still stops its thread.
    thread: Option<JoinHandle<LateWakeups>>,
}

impl WakeupProbe {
    fn start() -> Option<WakeupProbe> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("wakeup-probe".into()).spawn({
            let stop = Arc::clone(&stop);
            move || {
                // Sleeps before it looks at `stop`: a probe stopped at once still
                // reports a wakeup.
                let mut wakeups = LateWakeups::default();
                loop {
                    let asleep = Instant::now();
                    std::thread::sleep(PROBE_SLEEP);
                    wakeups.count(asleep.elapsed().saturating_sub(PROBE_SLEEP));
                    if stop.load(Ordering::Relaxed) {
                        return wakeups;
                    }
                }
            }
        });
        match thread {
            Ok(thread) => Some(WakeupProbe {
                stop,
                thread: Some(thread),
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot start the wakeup probe");
                None
            }
        }
    }

    fn stop(mut self) -> Option<LateWakeups> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take()?.join().ok()
    }
}

impl Drop for WakeupProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The machine's CPU time so far, all CPUs summed, in the kernel's clock ticks.
#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    /// `user nice system idle iowait irq softirq steal`, the first eight fields of the
    /// `cpu` line (guest time is already counted in user).
    ticks: [u64; 8],
}

/// Shares of all CPU time over an interval, in percent of the machine (all CPUs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuShares {
    /// User space, `nice`d processes included.
    pub user: f64,
    pub system: f64,
    /// Hard and soft interrupts: on loopback, much of TCP's receive path.
    pub interrupts: f64,
    pub idle: f64,
    pub iowait: f64,
    /// Time the host ran something else while this guest had work to run.
    pub steal: f64,
    /// The wakeup probe's count, where it ran.
    pub late_wakeups: Option<LateWakeups>,
}

impl CpuTimes {
    /// Now, or `None` where `/proc/stat` cannot be read (not Linux).
    pub fn read() -> Option<CpuTimes> {
        parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Shares from `self` to now.
    pub fn shares_until_now(&self) -> Option<CpuShares> {
        CpuTimes::read().and_then(|now| now.shares_since(self))
    }

    fn shares_since(&self, earlier: &CpuTimes) -> Option<CpuShares> {
        let [user, nice, system, idle, iowait, irq, softirq, steal] =
            std::array::from_fn(|i| self.ticks[i].saturating_sub(earlier.ticks[i]) as f64);
        let total = user + nice + system + idle + iowait + irq + softirq + steal;
        if total <= 0.0 {
            return None;
        }
        let percent = |ticks: f64| (ticks * 1000.0 / total).round() / 10.0;
        Some(CpuShares {
            user: percent(user + nice),
            system: percent(system),
            interrupts: percent(irq + softirq),
            idle: percent(idle),
            iowait: percent(iowait),
            steal: percent(steal),
            late_wakeups: None,
        })
    }
}

/// The aggregate `cpu` line of `/proc/stat`. Kernels before 2.6.11 have no steal field;
/// a missing field counts as 0.
fn parse(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let mut ticks = [0u64; 8];
    for (slot, field) in ticks.iter_mut().zip(line.split_whitespace().skip(1)) {
        *slot = field.parse().ok()?;
    }
    Some(CpuTimes { ticks })
}

impl CpuShares {
    /// Adds `machine_cpu_percent` and `late_wakeups` to a report's JSON object.
    pub fn insert_into(&self, object: &mut Map<String, Value>) {
        object.insert("machine_cpu_percent".into(), self.shares_json());
        if let Some(late) = &self.late_wakeups {
            object.insert("late_wakeups".into(), late.to_json());
        }
    }

    fn shares_json(&self) -> Value {
        json!({
            "user": self.user,
            "system": self.system,
            "interrupts": self.interrupts,
            "idle": self.idle,
            "iowait": self.iowait,
            "steal": self.steal,
        })
    }

    /// Lines for the table.
    pub fn lines(&self) -> String {
        let mut line = format!(
            "machine CPU during the run: {}% user, {}% system, {}% interrupts, {}% idle, {}% iowait, {}% taken by the host (steal)",
            self.user, self.system, self.interrupts, self.idle, self.iowait, self.steal
        );
        if let Some(late) = &self.late_wakeups {
            line += &format!(
                "\nwakeups of a thread sleeping 1 ms: {} late by over 1 ms of {} (latest {:.1} ms, {:.1} ms lost in all)",
                late.late_count, late.wakeups, late.late_ms_max, late.late_ms_total
            );
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  100 0 50 800 10 0 20 20 0 0\ncpu0 50 0 25 400 5 0 10 10 0 0\nintr 1\n";
    const AFTER: &str =
        "cpu  300 100 250 1000 60 10 40 140 7 0\ncpu0 150 50 125 500 30 5 20 70 3 0\nintr 2\n";

    #[test]
    fn shares_are_the_differences_over_their_sum() {
        let before = parse(BEFORE).expect("parses");
        let after = parse(AFTER).expect("parses");
        // Differences: user 200 + nice 100, system 200, idle 200, iowait 50, irq 10 +
        // softirq 20, steal 120; 900 in all.
        let shares = after.shares_since(&before).expect("time passed");
        assert_eq!(
            shares,
            CpuShares {
                user: 33.3,
                system: 22.2,
                interrupts: 3.3,
                idle: 22.2,
                iowait: 5.6,
                steal: 13.3,
                late_wakeups: None,
            }
        );
    }

    #[test]
    fn no_time_passed_gives_no_shares_and_a_short_line_counts_missing_fields_as_zero() {
        let before = parse(BEFORE).expect("parses");
        assert_eq!(before.shares_since(&before), None);
        let old_kernel = parse("cpu  1 2 3 4\n").expect("parses");
        assert_eq!(old_kernel.ticks, [1, 2, 3, 4, 0, 0, 0, 0]);
        assert!(parse("intr 1\n").is_none());
        assert!(parse("cpu  1 x 3\n").is_none());
    }

    #[test]
    fn a_wakeup_counts_as_late_past_a_millisecond_and_adds_up() {
        let mut late = LateWakeups::default();
        for overslept_us in [50, 1_000, 1_500, 4_000] {
            late.count(Duration::from_micros(overslept_us));
        }
        assert_eq!(
            late,
            LateWakeups {
                wakeups: 4,
                late_count: 2,
                late_ms_max: 4.0,
                late_ms_total: 5.5,
            }
        );
        let json = late.to_json();
        assert_eq!(json["late_over_1ms"], 2);
        assert_eq!(json["late_ms_total"], 5.5);
    }

    #[test]
    fn the_probe_counts_its_wakeups_until_stopped() {
        let watch = MachineWatch::start();
        std::thread::sleep(Duration::from_millis(30));
        if cfg!(target_os = "linux") {
            let shares = watch.finish().expect("Linux has /proc/stat");
            let late = shares.late_wakeups.expect("the probe ran");
            assert!(late.wakeups >= 1, "{late:?}");
            assert!(late.late_count <= late.wakeups, "{late:?}");
        }
    }

    #[test]
    fn this_machine_has_a_cpu_line() {
        if cfg!(target_os = "linux") {
            assert!(CpuTimes::read().is_some());
        }
    }
}
