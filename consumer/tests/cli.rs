//! `lanes-consume` refuses bad arguments clearly.

use std::process::Command;

#[test]
fn help_and_bad_arguments() {
    let exe = env!("CARGO_BIN_EXE_lanes-consume");
    let help = Command::new(exe).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--idle-exit-ms"));
    let bad_start = Command::new(exe)
        .args(["--topic", "t", "--from", "yesterday"])
        .output()
        .unwrap();
    assert!(!bad_start.status.success());
    assert!(String::from_utf8_lossy(&bad_start.stderr).contains("--from is earliest, latest"));
}
