//! What the machine's CPUs did during a run, from the kernel's counters in `/proc/stat`.
//!
//! On a shared virtual machine the host runs other guests on our CPUs, and the guest
//! sees that time as *steal*. A run's tail latency follows steal more than anything the
//! broker does (docs/BENCHMARKS.md, "Time the host takes"), so every report carries
//! the split, and figures can be read against it.

use serde_json::{Value, json};

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
    pub fn to_json(&self) -> Value {
        json!({
            "user": self.user,
            "system": self.system,
            "interrupts": self.interrupts,
            "idle": self.idle,
            "iowait": self.iowait,
            "steal": self.steal,
        })
    }

    /// One line for the table.
    pub fn line(&self) -> String {
        format!(
            "machine CPU during the run: {}% user, {}% system, {}% interrupts, {}% idle, {}% iowait, {}% taken by the host (steal)",
            self.user, self.system, self.interrupts, self.idle, self.iowait, self.steal
        )
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
    fn this_machine_has_a_cpu_line() {
        if cfg!(target_os = "linux") {
            assert!(CpuTimes::read().is_some());
        }
    }
}
