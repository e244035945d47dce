//! `lanes-bench` end to end, small: each scenario runs against an embedded broker and
//! its JSON carries the figures its issue asks for; an interrupted run cleans up.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    // Four phases of a second or more: many of the kernel's CPU clock ticks.
    if cfg!(target_os = "linux") {
        assert_machine_cpu(&report);
    }
}

/// 100-byte records, no warm-up, one JSON object out: small, quick runs.
const SMALL_RECORDS_JSON: [&str; 5] = ["--record-bytes", "100", "--warmup-s", "0", "--json"];

fn run_json(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_lanes-bench"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stderr}"))
}

#[test]
fn produce_consume_and_e2e_report_the_common_fields() {
    for scenario in ["produce", "consume", "e2e"] {
        let mut args = vec![scenario, "--count", "20000"];
        args.extend(SMALL_RECORDS_JSON);
        let report = run_json(&args);
        assert_eq!(report["scenario"], scenario);
        assert_eq!(report["records"], 20000, "{report}");
        assert_eq!(report["bytes"], 20000 * 100, "{report}");
        for key in ["seconds", "msgs_per_s", "mb_per_s"] {
            assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {report}");
        }
        assert_eq!(report["errors"], 0);
        if scenario != "consume" {
            assert!(
                report["latency_ms"]["p99"].as_f64().is_some_and(|v| v > 0.0),
                "{report}"
            );
        }
        if scenario != "produce" {
            assert_eq!(report["lost"], 0, "{report}");
        }
        if scenario == "e2e" {
            assert_eq!(report["duplicates"], 0, "{report}");
        }
        // A run this short may end within one of the kernel's CPU clock ticks.
        if report.get("machine_cpu_percent").is_some() {
            assert_machine_cpu(&report);
        }
    }
}

/// A group drains the whole topic whether it joins after the topic filled or before
/// (`--join-first`: it joins, commits its start and pauses while the topic fills), with
/// fewer or more members than partitions (4); and split consumers find the partitions of
/// a topic created with the broker's default count (`--partitions 0`).
#[test]
fn consume_as_a_group_new_or_behind_reads_every_record() {
    for extra in [
        &["--group", "--consumers", "2"][..],
        &["--group", "--join-first", "--consumers", "2"][..],
        &["--group", "--join-first", "--consumers", "5"][..],
        &["--partitions", "0", "--consumers", "2"][..],
    ] {
        let mut args = vec!["consume", "--count", "20000"];
        args.extend(extra);
        args.extend(SMALL_RECORDS_JSON);
        let report = run_json(&args);
        assert_eq!(report["records"], 20000, "{extra:?}: {report}");
        assert_eq!(report["lost"], 0, "{extra:?}: {report}");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_lanes-bench"))
        .args(["consume", "--join-first", "--count", "10"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("--group"), "{stderr}");
}

/// The catching-up consumer reads its own topic: the e2e group still gets every record
/// once, and nothing more.
#[test]
fn e2e_beside_a_consumer_catching_up_reports_what_it_read() {
    let mut args = vec!["e2e", "--count", "20000", "--catch-up-mb", "4"];
    args.extend(SMALL_RECORDS_JSON);
    let report = run_json(&args);
    assert_eq!(report["records"], 20000, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    // It reads something in every run, and whole records.
    let bytes = report["catch_up_bytes"].as_u64().expect("catch_up_bytes");
    assert!(bytes > 0 && bytes.is_multiple_of(100), "{report}");
    for key in ["catch_up_mb_per_s", "catch_up_laps"] {
        assert!(report[key].is_number(), "{key}: {report}");
    }
    let plain = run_json(&["e2e", "--count", "1000", "--warmup-s", "0", "--json"]);
    assert!(plain.get("catch_up_mb_per_s").is_none(), "{plain}");
}

/// The machine's CPU over the run, in shares of all of it, steal included.
fn assert_machine_cpu(report: &serde_json::Value) {
    let cpu = report["machine_cpu_percent"]
        .as_object()
        .unwrap_or_else(|| panic!("machine_cpu_percent: {report}"));
    let total: f64 = cpu.values().map(|share| share.as_f64().expect("a number")).sum();
    assert!((99.0..=101.0).contains(&total), "{report}");
    for key in ["user", "system", "interrupts", "idle", "iowait", "steal"] {
        assert!(cpu.contains_key(key), "{key}: {report}");
    }
    // The wakeup probe ran beside it.
    let late = &report["late_wakeups"];
    assert!(late["wakeups"].as_u64().is_some_and(|n| n >= 1), "{report}");
    assert!(
        late["late_over_1ms"].as_u64() <= late["wakeups"].as_u64(),
        "{report}"
    );
}

/// With `--rate`, produce also reports how late the generator sent records against
/// the schedule; every 64th record is sampled.
#[test]
fn paced_produce_reports_the_send_delay() {
    let mut args = vec!["produce", "--count", "6400", "--rate", "20000"];
    args.extend(SMALL_RECORDS_JSON);
    let report = run_json(&args);
    assert_eq!(report["records"], 6400, "{report}");
    let delay = &report["send_delay_ms"];
    assert_eq!(delay["count"], 100, "{report}");
    // A record's send delay is part of its latency, which starts at the same place.
    let delay_max = delay["max"].as_f64().expect("a max");
    let latency_max = report["latency_ms"]["max"].as_f64().expect("a latency max");
    assert!(delay_max <= latency_max, "{report}");
    // 0.3 s: dozens of the kernel's clock ticks.
    if cfg!(target_os = "linux") {
        assert_machine_cpu(&report);
    }
    let unpaced = run_json(&["produce", "--count", "1000", "--warmup-s", "0", "--json"]);
    assert!(unpaced.get("send_delay_ms").is_none(), "{unpaced}");
}

#[test]
fn the_orders_demo_checks_order_loss_and_double_effects() {
    let report = run_json(&[
        "orders",
        "--orders",
        "2000",
        "--workers",
        "2",
        "--call-ms",
        "1",
        "--json",
    ]);
    assert_eq!(report["scenario"], "orders");
    assert_eq!(report["orders_complete"], 2000, "{report}");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["events_in_order"], true);
    for lane in ["express", "standard", "bulk"] {
        assert!(report["lanes"][lane]["records"].as_u64().unwrap() > 0, "{report}");
        assert!(
            report["lanes"][lane]["latency_ms"]["p99"].as_f64().is_some(),
            "{report}"
        );
    }
}

/// Ctrl-C ends a run cleanly: the embedded broker's data directory, which a produce run
/// fills with gigabytes, is removed, and the exit status says the run was interrupted.
#[test]
fn an_interrupted_run_removes_the_embedded_brokers_data() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bench = Command::new(env!("CARGO_BIN_EXE_lanes-bench"))
        .args([
            "produce",
            "--duration-s",
            "600",
            "--rate",
            "1000",
            "--acks",
            "written",
        ])
        .args(SMALL_RECORDS_JSON)
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data_dirs = || -> Vec<PathBuf> {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("lanes-bench-")
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data_dirs()
        .iter()
        .any(|dir| dir.join("topics/bench-produce").exists())
    {
        assert!(Instant::now() < deadline, "the bench never created its topic");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = bench.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(status) = bench.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            bench.kill().unwrap();
            panic!("the bench did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut bench.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(
        data_dirs(),
        Vec::<PathBuf>::new(),
        "the embedded broker's data is gone"
    );
}

/// The embedded broker takes its settings from `LANES_<SETTING>` as `lanes-broker` does,
/// and a bad one is named.
#[test]
fn the_embedded_broker_reads_its_settings_from_the_environment() {
    let run = |variable: &str, value: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_lanes-bench"))
            .args(["produce", "--count", "100", "--partitions", "4"])
            .args(SMALL_RECORDS_JSON)
            .env(variable, value)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run("LANES_TOPIC_PARTITIONS_MAX", "2");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("topic_partitions_max"), "{stderr}");
    let (code, stderr) = run("LANES_WRITEBACK_BYTES", "lots");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--writeback-bytes") && stderr.contains("'lots'"),
        "{stderr}"
    );
    // A setting taken from the environment is part of what the run measured.
    let output = Command::new(env!("CARGO_BIN_EXE_lanes-bench"))
        .args(["produce", "--count", "100", "--partitions", "4"])
        .args(SMALL_RECORDS_JSON)
        .env("LANES_TOPIC_PARTITIONS_MAX", "4")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["broker_environment"]["topic_partitions_max"], "4",
        "{report}"
    );
}
