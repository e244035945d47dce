//! `lanes-produce` refuses bad arguments clearly, before touching the network.

use std::process::Command;

#[test]
fn help_and_bad_arguments() {
    let exe = env!("CARGO_BIN_EXE_lanes-produce");
    let help = Command::new(exe).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--key-field"));
    let conflicting = Command::new(exe)
        .args(["--topic", "t", "--lane", "express", "--lane-field", "class"])
        .output()
        .unwrap();
    assert!(!conflicting.status.success());
    assert!(String::from_utf8_lossy(&conflicting.stderr).contains("cannot be used with"));
}

#[test]
fn an_unreachable_broker_is_a_clear_error() {
    let exe = env!("CARGO_BIN_EXE_lanes-produce");
    // Port 1 on loopback: nothing listens there.
    let output = Command::new(exe)
        .args(["--broker", "127.0.0.1:1", "--topic", "t"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot connect to 127.0.0.1:1"));
}
