//! `lanes-bench lanes` end to end, small: every phase runs against an embedded broker
//! and the JSON carries the figures the priority-lanes issue asks for.

use std::process::Command;

#[test]
fn lanes_scenario_runs_and_reports() {
    let output = Command::new(env!("CARGO_BIN_EXE_lanes-bench"))
        .args([
            "lanes",
            "--backlog",
            "3000",
            "--window-s",
            "1",
            "--express-rate",
            "50",
            "--record-bytes",
            "200",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["scenario"], "lanes");
    for key in [
        "express_p99_ms_idle",
        "express_p99_ms_backlog",
        "express_p99_ms_fifo",
        "bulk_share_pct",
    ] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {report}");
    }
    for phase in ["idle", "backlog", "fifo"] {
        let count = report["latency_ms"][phase]["count"].as_u64().unwrap();
        assert!(count >= 40, "{phase}: {count} express records measured");
    }
    // Every bulk record of the backlog and fifo phases was handled, and the express ones.
    assert!(report["records"].as_u64().unwrap() >= 2 * 3000);
}
